"""Stage programs: one value per stage whose batch shapes are the batches it trains on; training returns a new
model (the one handed in is untouched) that its checkpoint restores exactly."""

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from dcr_jax import checkpoints, parallel
from dcr_jax.config import base_config
from dcr_jax.model import Decoder
from dcr_jax.pipeline import builtin_corpus, restore_stage
from dcr_jax.spec import resolve
from dcr_jax.train import align, refine
from dcr_jax.train.loop import MetricsWriter, TrainContext
from dcr_jax.weights.tokenizer import tiny_tokenizer


def tiny_spec(**refine_changes):
  config = base_config()
  config.model.name, config.model.random_init = "tiny-gemma3", True
  config.refine.steps, config.align.steps, config.checkpoint.every = 3, 3, 2
  config.refine.update(refine_changes)
  return resolve(config)


@pytest.fixture(scope="module")
def tokenizer():
  return tiny_tokenizer(512, builtin_corpus())


def shapes(batch: dict) -> dict:
  return {k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}


@pytest.mark.parametrize("module, changes", [(refine, {}), (refine, {"lm_weight": 0.5}), (align, {})])
def test_batch_shapes_are_the_shapes_of_the_batches(module, changes, tokenizer):
  spec = tiny_spec(**changes)
  stage = module.program(spec, spec.model.architecture, module.load_data(spec, tokenizer))
  for step in (0, 5):
    declared = {k: (s.shape, np.dtype(s.dtype)) for k, s in stage.batch_shapes.items()}
    built = shapes(stage.batches(step))
    if "loss_index" in declared:  # planned at its widest; a batch lists only as many loss positions as it has
      (groups, widest), dtype = declared.pop("loss_index")
      (built_groups, width), built_dtype = built.pop("loss_index")
      assert (built_groups, built_dtype) == (groups, dtype) and 0 < width <= widest
    assert declared == built
  assert module.program(spec, spec.model.architecture).batches is None  # built without data: shapes only (planning)


def test_training_returns_a_new_model_that_its_checkpoint_restores(tokenizer, tmp_path):
  spec = tiny_spec()
  model = Decoder(spec.model.architecture, rngs=nnx.Rngs(0))
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  stage = align.program(spec, spec.model.architecture, align.load_data(spec, tokenizer))
  ctx = TrainContext(workdir=tmp_path, mesh=parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                     writer=MetricsWriter(tmp_path, enabled=False), seed=0, save_every=2, keep=3)
  trained, summary = align.run(spec, stage, align.load_data(spec, tokenizer), model, ctx)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.state(model, nnx.Param)), before)  # untouched
  assert summary["steps"] == 3 and checkpoints.kept_steps(tmp_path, "align") == [2, 3]
  lora = nnx.state(trained, nnx.Param)["layers"][0]["attn"]["q_proj"]
  assert float(np.abs(np.asarray(lora["lora_b"][...])).max()) > 0  # the adapters trained
  restored = restore_stage(spec, model, tmp_path, "align")
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.state(restored, nnx.Param)),
                              jax.tree.map(np.asarray, nnx.state(trained, nnx.Param)))
  earlier = restore_stage(spec, model, tmp_path, "align", step=2)
  assert not np.array_equal(np.asarray(nnx.state(earlier, nnx.Param)["layers"][0]["attn"]["q_proj"]["lora_b"][...]),
                            np.asarray(lora["lora_b"][...]))
  again, resumed = align.run(spec, stage, align.load_data(spec, tokenizer), model, ctx)  # finished: nothing to do
  assert resumed["resumed_from"] == 3
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.state(again, nnx.Param)),
                              jax.tree.map(np.asarray, nnx.state(trained, nnx.Param)))


@pytest.mark.parametrize("module, changes", [(refine, {"lm_weight": 0.5}), (align, {})])
def test_a_process_builds_only_its_rows_and_they_equal_the_global_batch(module, changes, tokenizer, monkeypatch):
  monkeypatch.setattr(align, "batch_shards", lambda mesh: 4)  # a 4-shard mesh: stage 2's loss positions in 4 groups
  spec = tiny_spec(**changes)
  stage = module.program(spec, spec.model.architecture, module.load_data(spec, tokenizer))
  for step in (0, 7):
    whole = stage.batches(step)
    for part, parts in ((0, 2), (1, 2), (3, 4)):
      rows = lambda size: slice(part * size // parts, (part + 1) * size // parts)
      local = stage.batches(step, rows)
      for key, value in whole.items():
        np.testing.assert_array_equal(local[key], np.asarray(value)[rows(len(value))], err_msg=key)
