"""Stage-1 options: early stopping on the contrastive loss (and resuming a stopped stage), the L2-SP pull to θ₀."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct

from dcr_jax import checkpoints, parallel
from dcr_jax.config import base_config
from dcr_jax.errors import UserError
from dcr_jax.model import Decoder, tiny
from dcr_jax.pipeline import builtin_corpus
from dcr_jax.spec import resolve
from dcr_jax.train import refine
from dcr_jax.train.loop import EarlyStopping, MetricsWriter, TrainContext, logged_values, train_loop
from dcr_jax.train.state import anchor, create_state, make_optimizer, trainable_filter, with_anchor
from dcr_jax.train.steps import make_refine_step
from dcr_jax.weights.tokenizer import tiny_tokenizer

LAYER = 1  # one block below ℓ: the smallest program to compile


def test_the_rule_stops_after_patience_logged_steps_without_a_large_enough_improvement():
  losses = [(1, 5.0), (2, 4.0), (3, 3.95), (4, 3.99), (5, 1.0)]
  assert EarlyStopping("loss", patience=2, min_delta=0.1).stopped_at(losses) == 4  # 3.95 is not 0.1 below 4.0
  assert EarlyStopping("loss", patience=2).stopped_at(losses) is None  # 3.95 improves; 1.0 resets the wait
  assert EarlyStopping("loss", patience=1).stopped_at(losses) == 4


class CountingState(struct.PyTreeNode):
  step: jax.Array
  w: jax.Array


LOSSES = jnp.array([5.0, 4.0, 3.0, 3.0, 3.0, 3.0, 2.0, 1.0, 0.5, 0.1])  # flat from step 3: stops at logged step 5


def crafted_step(state, batch):
  return CountingState(step=state.step + 1, w=state.w + 1), {"loss": LOSSES[state.step]}


def loop(tmp_path, state, step_fn=crafted_step):
  return train_loop(stage="refine", step_fn=step_fn, state=state, batch_fn=lambda i: {"mask": np.ones((1, 1))},
                    num_steps=10, manager=checkpoints.manager(tmp_path / "ck", keep=5), save_every=4, log_every=1,
                    writer=MetricsWriter(tmp_path), show_progress=False, early_stopping=EarlyStopping("loss", 2),
                    logged=logged_values(tmp_path / "metrics.jsonl", "refine", "loss"))


def test_the_loop_stops_saves_there_and_a_resumed_run_does_not_continue(tmp_path):
  start = CountingState(step=jnp.zeros((), jnp.int32), w=jnp.zeros(()))
  state, summary = loop(tmp_path, start)
  assert (summary["stopped_at"], summary["steps"], int(state.step)) == (5, 5, 5)
  assert list(checkpoints.manager(tmp_path / "ck", keep=5).all_steps()) == [4, 5]
  rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(rows) == 5

  def must_not_run(state, batch):
    raise AssertionError("a stopped stage trained again")

  again, resumed = loop(tmp_path, state.replace(), must_not_run)  # the checkpoint at the stop: step 5
  assert (resumed["stopped_at"], resumed["steps"], resumed["resumed_from"]) == (5, 5, 5)
  assert int(again.step) == 5 and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5


def test_a_run_resumed_before_the_stop_stops_where_an_uninterrupted_one_does(tmp_path):
  first = CountingState(step=jnp.zeros((), jnp.int32), w=jnp.zeros(()))
  train_loop(stage="refine", step_fn=crafted_step, state=first, batch_fn=lambda i: {"mask": np.ones((1, 1))},
             num_steps=3, manager=checkpoints.manager(tmp_path / "ck3", keep=5), save_every=4, log_every=1,
             writer=MetricsWriter(tmp_path), show_progress=False)  # killed after step 3 (a row for step 3 logged)
  resumed = CountingState(step=jnp.full((), 3, jnp.int32), w=jnp.full((), 3.0))
  state, summary = loop(tmp_path, resumed)
  assert (summary["stopped_at"], int(state.step), summary["resumed_from"]) == (5, 5, 3)


@pytest.fixture(scope="module")
def tokenizer():
  return tiny_tokenizer(512, builtin_corpus())


def tiny_spec(**refine_changes):
  config = base_config()
  config.model.name, config.model.random_init = "tiny-gemma3", True
  config.stages = "refine"
  config.refine.update({"steps": 6, "log_every": 1, "probe": False, "lr": 1e-3, **refine_changes})
  config.checkpoint.every = 10
  return resolve(config)


def test_stage_one_stops_early_on_the_contrastive_loss_and_stays_stopped(tokenizer, tmp_path):
  spec = tiny_spec(patience=1, min_delta=100.0)  # no step improves by 100: stops at the second logged step
  data = refine.load_data(spec, tokenizer)
  stage = refine.program(spec, spec.model.architecture, data)
  ctx = TrainContext(workdir=tmp_path, mesh=parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                     writer=MetricsWriter(tmp_path), seed=0, save_every=10, keep=3)
  _, summary = refine.run(spec, stage, data, Decoder(spec.model.architecture, rngs=nnx.Rngs(0)), ctx)
  assert (summary["stopped_at"], summary["steps"]) == (2, 2)
  assert checkpoints.kept_steps(tmp_path, "refine") == [2]
  logged = logged_values(tmp_path / "metrics.jsonl", "refine", "contrastive")
  assert [s for s, _ in logged] == [1, 2] and all(np.isfinite(v) for _, v in logged)
  _, again = refine.run(spec, stage, data, Decoder(spec.model.architecture, rngs=nnx.Rngs(0)), ctx)
  assert (again["stopped_at"], again["resumed_from"], again["train_seconds"]) == (2, 2, 0.0)
  assert checkpoints.kept_steps(tmp_path, "refine") == [2]


def batch(seed, b=8, t=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 512, (b, t)).astype(np.int32)
  mask = (np.arange(t)[None] < rng.integers(4, t + 1, b)[:, None]).astype(np.int32)
  return {"tokens": tokens * mask, "mask": mask, "labels": np.array([0, 1] * (b // 2), np.int32)}


def trained(l2sp: float, steps: int):
  """(θ₀, θ after `steps` refine steps, the metrics of one more step) on a tiny model, same seed and batches."""
  model = Decoder(tiny("gemma3"), rngs=nnx.Rngs(0))
  opt = make_optimizer(lr=1e-2, steps=steps + 1, warmup=0, weight_decay=0.0, clip=1.0)
  opt = with_anchor(opt) if l2sp else opt
  graphdef, state = create_state(model, trainable_filter("refine", LAYER), opt, seed=0)
  theta0 = jax.tree.map(np.asarray, state.params)
  step = jax.jit(make_refine_step(graphdef, opt, layers=[LAYER], pooling="last", loss="circle",
                                  loss_kwargs={"margin": 0.25, "gamma": 64.0}, l2sp=l2sp))
  for i in range(steps):
    state, _ = step(state, batch(i))
  theta = jax.tree.map(np.asarray, state.params)
  _, metrics = step(state, batch(steps))
  return theta0, theta, metrics


def sq_drift(a, b) -> float:
  return float(sum(np.sum((np.float64(x) - np.float64(y)) ** 2) for x, y in zip(jax.tree.leaves(a),
                                                                                  jax.tree.leaves(b))))


def test_l2sp_is_lambda_times_the_squared_distance_to_the_start_and_pulls_toward_it():
  lam = 50.0
  theta0, theta, metrics = trained(lam, steps=4)
  drift = sq_drift(theta, theta0)
  assert drift > 0
  np.testing.assert_allclose(float(metrics["l2sp"]), lam * drift, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["loss"]), float(metrics["contrastive"]) + lam * drift, rtol=1e-4)
  free0, free, free_metrics = trained(0.0, steps=4)
  assert "l2sp" not in free_metrics
  assert sq_drift(free0, theta0) == 0  # same seed, same start
  assert drift < 0.5 * sq_drift(free, free0), (drift, sq_drift(free, free0))


def test_the_anchor_is_the_start_and_is_not_trained():
  opt = with_anchor(make_optimizer(lr=1e-2, steps=3, warmup=0, weight_decay=0.0, clip=1.0))
  params = {"w": jnp.arange(3.0)}
  state = opt.init(params)
  updates, state = opt.update({"w": jnp.ones(3)}, state, params)
  np.testing.assert_array_equal(anchor(state)["w"], [0.0, 1.0, 2.0])


@pytest.mark.parametrize("key", ["l2sp", "patience", "min_delta"])
def test_negative_values_are_refused_naming_the_key(key):
  config = base_config()
  config.model.name, config.model.random_init = "tiny-gemma3", True
  config.refine[key] = -1 if key == "patience" else -1.0
  with pytest.raises(UserError, match=f"config.refine.{key}=-1"):
    resolve(config)


def test_a_workdir_written_before_the_new_keys_resumes_unless_one_is_set(tmp_path):
  from dcr_jax.pipeline import prepare_workdir

  config = base_config()
  prepare_workdir(tmp_path, config)
  saved = json.loads((tmp_path / "config.json").read_text())
  for key in ("l2sp", "patience", "min_delta"):
    del saved["refine"][key]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  prepare_workdir(tmp_path, config)  # the defaults are what the earlier version ran
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config.refine.patience = 3
  with pytest.raises(UserError, match="config.refine.patience"):
    prepare_workdir(tmp_path, config)
