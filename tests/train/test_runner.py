"""StageRun: validation at saved steps measures the saved params, and load_validation reads the configured sets."""

import types

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from dcr_jax import parallel
from dcr_jax.config import base_config
from dcr_jax.evaluate.refusal_prob import refusal_probability
from dcr_jax.model import Decoder, tiny
from dcr_jax.pipeline import builtin_corpus
from dcr_jax.train.runner import StageRun, load_validation
from dcr_jax.train.state import trainable_filter
from dcr_jax.weights.tokenizer import tiny_tokenizer


def test_validation_is_the_refusal_probability_of_the_saved_params(tmp_path):
  config = base_config()
  config.data.val_toxic, config.data.val_seemingly_toxic = "builtin:toxic@0:3", "builtin:seemingly_toxic@::40"
  validation = load_validation(config)
  assert [len(validation[g]) for g in ("toxic", "seemingly_toxic")] == [3, 4]
  model = Decoder(tiny("gemma3"), rngs=nnx.Rngs(0))
  tokenizer = tiny_tokenizer(512, builtin_corpus())
  ctx = types.SimpleNamespace(config=config, workdir=tmp_path, model=model, tokenizer=tokenizer,
                              mesh=parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]), writer=None)
  run = StageRun(ctx, "align", trainable_filter("full"), optax.sgd(0.1))
  moved = run.state.replace(params=jax.tree.map(lambda x: x * 1.5, run.state.params))
  got = run._validator(validation)(1, moved)
  before = {g: float(np.mean(refusal_probability(model, tokenizer, p))) for g, p in validation.items()}
  nnx.update(model, moved.params)
  after = {g: float(np.mean(refusal_probability(model, tokenizer, p))) for g, p in validation.items()}
  for group in validation:
    assert got[f"val_refusal_prob_{group}"] == pytest.approx(after[group], rel=1e-5)
    assert got[f"val_refusal_prob_{group}"] != pytest.approx(before[group], rel=1e-3)


def test_no_validation_sets_means_no_validation():
  assert load_validation(base_config()) == {}
