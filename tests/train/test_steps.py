"""Pure train steps on a tiny model: frozen tail, loss decrease, gradient accumulation, no packing leaks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dcr_jax.data.batching import SFTMixture, SFTSet
from dcr_jax.model import Decoder, tiny
from dcr_jax.model.lora import attach_lora
from dcr_jax.train.losses import masked_cross_entropy
from dcr_jax.train.state import create_state, make_optimizer, merge, trainable_filter
from dcr_jax.train.align import loss_index, loss_width
from dcr_jax.train.steps import make_align_step, make_refine_step, pool

LAYER = 3


def tiny_model(seed=0):
  return Decoder(tiny("gemma3"), rngs=nnx.Rngs(seed))


def refine_batch(seed=0, b=8, t=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 512, (b, t)).astype(np.int32)
  lengths = rng.integers(4, t + 1, b)
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  return {"tokens": tokens * mask, "mask": mask, "labels": np.array([0, 1] * (b // 2), np.int32)}


def sft_sources(seed=0, n=24):
  rng = np.random.default_rng(seed)
  ids, masks = [], []
  for _ in range(n):
    p, r = int(rng.integers(3, 8)), int(rng.integers(2, 8))
    ids.append(rng.integers(1, 512, p + r).tolist())
    masks.append([0] * p + [1] * r)
  return {"general": SFTSet(ids, masks)}


def run_steps(step, state, batches):
  step = jax.jit(step)
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


def test_refine_updates_only_layers_below_l_and_embedding():
  model = tiny_model()
  before = nnx.state(model, nnx.Param)
  opt = make_optimizer(lr=1e-2, steps=3, warmup=0, weight_decay=0.0, clip=1.0)
  graphdef, state = create_state(model, trainable_filter("refine", LAYER), opt, seed=0)
  step = make_refine_step(graphdef, opt, layers=[LAYER], pooling="last", loss="circle",
                          loss_kwargs={"margin": 0.25, "gamma": 64.0})
  state, _ = run_steps(step, state, [refine_batch(i) for i in range(3)])
  after = nnx.state(merge(graphdef, state), nnx.Param)
  for path, old in nnx.to_flat_state(before):
    new = dict(nnx.to_flat_state(after))[path]
    trained = path[0] == "embedding" or (path[0] == "layers" and path[1] < LAYER)
    changed = not np.array_equal(np.asarray(old[...]), np.asarray(new[...]))
    assert changed == trained or (trained and path[-1] == "scale"), path  # some norms may get no gradient
    if not trained:
      assert np.asarray(old[...]).tobytes() == np.asarray(new[...]).tobytes(), path


@pytest.mark.parametrize("loss, kwargs", [("circle", {"margin": 0.25, "gamma": 32.0}), ("supcon", {"temperature": 0.1}),
                                          ("infonce", {"temperature": 0.1}), ("triplet", {"margin": 0.25})])
def test_refine_loss_decreases(loss, kwargs):
  model = tiny_model()
  opt = make_optimizer(lr=3e-3, steps=20, warmup=0, weight_decay=0.0, clip=1.0, schedule="constant")
  graphdef, state = create_state(model, trainable_filter("refine", LAYER), opt, seed=0)
  step = make_refine_step(graphdef, opt, layers=[LAYER], pooling="mean", loss=loss, loss_kwargs=kwargs)
  batch = refine_batch(0)
  _, losses = run_steps(step, state, [batch] * 20)
  assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("lora", [False, True])
def test_align_loss_decreases(lora):
  model = tiny_model()
  if lora:
    attach_lora(model, rank=4, alpha=8.0, targets=["q", "v", "gate", "up", "down"], rngs=nnx.Rngs(1))
  opt = make_optimizer(lr=1e-2 if lora else 3e-3, steps=25, warmup=0, weight_decay=0.0, clip=1.0,
                       schedule="constant")
  graphdef, state = create_state(model, trainable_filter("lora" if lora else "full"), opt, seed=0)
  mixture = SFTMixture(sft_sources(), {"general": 1.0}, batch_size=4, max_len=32, seed=0)
  batch = mixture.batch(0)
  frozen_before = state.frozen
  final, losses = run_steps(make_align_step(graphdef, opt), state, [batch] * 25)
  assert losses[-1] < 0.7 * losses[0], losses
  chex.assert_trees_all_equal(final.frozen, frozen_before)  # with LoRA: every base weight bitwise unchanged


def test_gradient_accumulation_equals_one_big_batch():
  mixture = SFTMixture(sft_sources(), {"general": 1.0}, batch_size=4, max_len=32, seed=0)
  batch = mixture.batch(3)
  results = []
  for accum in (1, 2, 4):
    opt = make_optimizer(lr=1e-3, steps=2, warmup=0, weight_decay=0.0, clip=1e9, schedule="constant")
    graphdef, state = create_state(tiny_model(), trainable_filter("full"), opt, seed=0)
    state, metrics = jax.jit(make_align_step(graphdef, opt, grad_accum=accum))(state, batch)
    results.append((state.params, float(metrics["loss"])))
  for params, loss in results[1:]:
    assert abs(loss - results[0][1]) < 1e-5
    chex.assert_trees_all_close(params, results[0][0], atol=1e-6)


@pytest.mark.parametrize("accum, group_rows", [(1, 4), (2, 1)])  # one group per microbatch; one per row
def test_response_only_logits_equal_the_full_head(accum, group_rows):
  """The head at the listed loss positions only: same loss and gradients as every position's logits."""
  mixture = SFTMixture(sft_sources(), {"general": 1.0}, batch_size=4, max_len=32, seed=0)
  batch = mixture.batch(1)
  width = loss_width(mixture.loss_counts(1), group_rows, 32)
  assert width < group_rows * 32  # fewer positions than the full head (the point of it)
  index = loss_index(batch["loss_mask"], group_rows, width)
  assert (index >= 0).sum() == np.count_nonzero(batch["loss_mask"])  # every loss token listed once
  results = []
  for b in (batch, {**batch, "loss_index": index}):
    opt = make_optimizer(lr=1e-3, steps=2, warmup=0, weight_decay=0.0, clip=1e9, schedule="constant")
    graphdef, state = create_state(tiny_model(), trainable_filter("full"), opt, seed=0)
    state, metrics = jax.jit(make_align_step(graphdef, opt, grad_accum=accum))(state, b)
    results.append((state.params, float(metrics["loss"]), float(metrics["grad_norm"]), float(metrics["tokens"])))
  (full, *full_m), (sparse, *sparse_m) = results
  np.testing.assert_allclose(sparse_m, full_m, rtol=1e-5)
  chex.assert_trees_all_close(sparse, full, atol=1e-6)


def test_a_bfloat16_state_keeps_its_dtypes_across_steps():
  """bf16 params: the optimizer's moments stay bf16 (no recompilation, the donated buffers are reused)."""
  model = Decoder(tiny("gemma3").replace(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
  opt = make_optimizer(lr=1e-3, steps=4, warmup=0, weight_decay=0.01, clip=1.0)
  graphdef, state = create_state(model, trainable_filter("full"), opt, seed=0)
  batch = SFTMixture(sft_sources(), {"general": 1.0}, batch_size=2, max_len=16, seed=0).batch(0)
  step = jax.jit(make_align_step(graphdef, opt)).lower(state, batch).compile()  # AOT: a dtype change would raise
  dtypes = jax.tree.map(lambda x: x.dtype, state)
  for _ in range(2):
    state, metrics = step(state, batch)
  assert jax.tree.map(lambda x: x.dtype, state) == dtypes and np.isfinite(float(metrics["loss"]))


def test_loss_width_buckets_the_widest_group():
  counts = np.array([5, 9, 30, 3])
  assert loss_width(counts, group_rows=2, max_len=32) == 40  # groups hold 14 and 33 tokens; buckets of 64/8 = 8
  assert loss_width(counts, group_rows=1, max_len=32) == 32  # a full row: the whole width
  assert loss_width(np.zeros(4, int), group_rows=4, max_len=32) == 16  # never zero-width


def test_packed_rows_equal_examples_alone():
  """The packed CE (token-weighted) equals the CE of each example run on its own row."""
  sources = sft_sources(n=6)
  mixture = SFTMixture(sources, {"general": 1.0}, batch_size=2, max_len=40, seed=5, pack=True)
  batch = mixture.batch(0)
  assert batch["segments"].max() >= 2  # something was packed
  model = tiny_model()
  logits = model(batch["tokens"], batch["positions"], batch["segments"])
  packed_loss, packed_tokens = masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])
  total, tokens = 0.0, 0.0
  for row in range(2):
    for seg in range(1, batch["segments"][row].max() + 1):
      sel = batch["segments"][row] == seg
      alone = model(batch["tokens"][row][sel][None])
      loss, count = masked_cross_entropy(alone, batch["targets"][row][sel][None], batch["loss_mask"][row][sel][None])
      total, tokens = total + float(loss) * float(count), tokens + float(count)
  assert tokens == float(packed_tokens)
  np.testing.assert_allclose(float(packed_loss), total / tokens, rtol=1e-5)


def test_pool_last_and_mean():
  hidden = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  mask = jnp.array([[1, 1, 0], [1, 1, 1]])
  last = pool(hidden, mask, "last")
  expected = np.array([[2.0, 3.0], [10.0, 11.0]])
  np.testing.assert_allclose(last, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-6)
  mean = pool(hidden, mask, "mean")
  expected = np.array([[1.0, 2.0], [8.0, 9.0]])
  np.testing.assert_allclose(mean, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-6)


def _refine_metrics(batch, **kwargs):
  """Loss and metrics of one stage-1 step from a fixed model (SGD with lr 0: the state does not move)."""
  import optax

  model = tiny_model()
  graphdef, state = create_state(model, trainable_filter("refine", 4), optax.sgd(0.0), seed=0)
  step = make_refine_step(graphdef, optax.sgd(0.0), pooling="last", loss="circle",
                          loss_kwargs={"margin": 0.25, "gamma": 64.0}, **kwargs)
  return model, jax.jit(step)(state, batch)[1]


def _circle_at(model, batch, layer):
  from dcr_jax.train.losses import get_loss

  hidden = model(batch["tokens"], mask=batch["mask"], stop_at_layer=layer).hidden[layer]
  return float(get_loss("circle")(pool(hidden, batch["mask"], "last"), batch["labels"], margin=0.25, gamma=64.0))


def test_lm_retention_term_adds_lambda_times_the_masked_ce():
  lm = SFTMixture(sft_sources(), {"general": 1.0}, batch_size=2, max_len=16, seed=0).batch(0)
  batch = {**refine_batch(), "lm_tokens": lm["tokens"], "lm_targets": lm["targets"], "lm_mask": lm["loss_mask"],
           "lm_segments": lm["segments"], "lm_positions": lm["positions"]}
  model, metrics = _refine_metrics(batch, layers=[2], lm_weight=0.3)
  logits = model(lm["tokens"], lm["positions"], lm["segments"])
  ce = float(masked_cross_entropy(logits, lm["targets"], lm["loss_mask"])[0])
  assert float(metrics["lm_loss"]) == pytest.approx(ce, rel=1e-5)
  assert float(metrics["loss"]) == pytest.approx(_circle_at(model, batch, 2) + 0.3 * ce, rel=1e-5)


def test_a_list_of_layers_averages_their_losses():
  batch = refine_batch()
  model, metrics = _refine_metrics(batch, layers=[1, 3])
  expected = (_circle_at(model, batch, 1) + _circle_at(model, batch, 3)) / 2
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
  assert expected != pytest.approx(_circle_at(model, batch, 3), rel=1e-3)


def test_a_third_benign_class_is_sampled_and_pushed_apart():
  from dcr_jax.data.batching import BalancedSampler

  labels = np.array([0] * 10 + [1] * 10 + [2] * 10)
  sampler = BalancedSampler(labels, batch_size=12, ratio=(2, 1, 1), seed=0)
  for step in range(3):
    drawn = labels[sampler.indices(step)]
    assert np.bincount(drawn, minlength=3).tolist() == [6, 3, 3]
  batch = {**refine_batch(b=12), "labels": labels[sampler.indices(0)].astype(np.int32)}
  model, metrics = _refine_metrics(batch, layers=[2])
  assert float(metrics["loss"]) == pytest.approx(_circle_at(model, batch, 2), rel=1e-5)
  two_class = {**batch, "labels": np.where(batch["labels"] == 2, 1, batch["labels"]).astype(np.int32)}
  assert _circle_at(model, two_class, 2) != pytest.approx(_circle_at(model, batch, 2), rel=1e-3)  # 3 classes count
