"""`scan_layers`: stacked block params run by jax.lax.scan compute what the per-layer loop computes."""

import chex
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from dcr_jax.model import Decoder, stack_layers, tiny, unstack_layers
from dcr_jax.model.lora import attach_lora
from dcr_jax.train.losses import masked_cross_entropy
from dcr_jax.train.state import create_state, merge, trainable_filter
from dcr_jax.train.steps import make_align_step, make_refine_step
from dcr_jax.weights import export_hf, load_params
from dcr_jax.weights.sources import SafetensorsSource
from helpers import random_model

FAMILIES = ["gemma", "gemma2", "gemma3"]


def tokens_and_mask(vocab=512, b=2, t=20, seed=1):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  mask[0, :3] = 0  # left padding; t > the tiny sliding window (8), so local layers really are local
  return tokens, mask


def pair(family, **overrides):
  """(per-layer model, the same model stacked)."""
  model = random_model(tiny(family, **overrides))
  return model, stack_layers(model)


def flat_params(model):
  """{"layers/3/attn/q_proj/kernel": array, ...} in the per-layer layout, whichever layout `model` has."""
  return {"/".join(map(str, path)): np.asarray(var.get_value())
          for path, var in nnx.to_flat_state(nnx.state(unstack_layers(model), nnx.Param))}


@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_params_carry_a_layer_axis_and_round_trip_bitwise(family):
  model, stacked = pair(family)
  kernel = stacked.layers.attn.q_proj.kernel
  assert kernel.shape == (model.config.num_layers, *model.layers[0].attn.q_proj.kernel.shape)
  assert kernel.get_metadata()["logical_axes"][0] == "layers"
  assert stacked.config.scan_layers and not unstack_layers(stacked).config.scan_layers
  chex.assert_trees_all_equal(flat_params(model), flat_params(stacked))
  fresh = Decoder(tiny(family, scan_layers=True), rngs=nnx.Rngs(0))  # built stacked == built per layer, stacked
  chex.assert_trees_all_equal(flat_params(fresh), flat_params(Decoder(tiny(family), rngs=nnx.Rngs(0))))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_matches_the_layer_loop_in_float64(family, remat):
  """Local/global patterns (Gemma 2 alternation, Gemma 3 5:1) ride along as per-layer window and RoPE arrays."""
  with jax.enable_x64(True):
    model, stacked = pair(family, dtype="float64", param_dtype="float64", remat=remat)
    tokens, mask = tokens_and_mask()
    np.testing.assert_allclose(np.asarray(stacked(tokens, mask=mask)), np.asarray(model(tokens, mask=mask)),
                               rtol=1e-12, atol=1e-12)
    a = model(tokens, mask=mask, stop_at_layer=3, return_hidden=(0, 1, 3))
    b = stacked(tokens, mask=mask, stop_at_layer=3, return_hidden=(0, 1, 3))
    assert sorted(b.hidden) == [0, 1, 3]
    for layer in a.hidden:
      np.testing.assert_allclose(np.asarray(b.hidden[layer]), np.asarray(a.hidden[layer]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_loss_and_gradients_with_and_without_scan(remat):
  tokens, _ = tokens_and_mask()
  model, stacked = pair("gemma3", remat=remat)
  base = random_model(tiny("gemma3"))

  def loss_and_grads(m):
    graphdef, params = nnx.split(m, nnx.Param)

    def loss(p):
      logits = nnx.merge(graphdef, p)(tokens[:, :-1])
      return masked_cross_entropy(logits, tokens[:, 1:], np.ones((2, 19)))[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), flat_params(nnx.merge(graphdef, grads))

  (base_loss, base_grads), (loss, grads) = loss_and_grads(base), loss_and_grads(stacked)
  assert abs(loss - base_loss) <= 1e-6 * abs(base_loss)  # float32: scan only reorders fused sums
  for key in base_grads:
    np.testing.assert_allclose(grads[key], base_grads[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_with_stacked_params(family):
  model, stacked = pair(family)
  tokens, mask = tokens_and_mask()
  outs = []
  for m in (model, stacked):
    cache = m.init_cache(2, 32)
    first = m(tokens[:, :12], mask=mask[:, :12], cache=cache)
    second = m(tokens[:, 12:], mask=mask[:, 12:], cache=first.cache)
    outs.append(np.concatenate([np.asarray(first.logits), np.asarray(second.logits)], axis=1))
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_lora_on_stacked_projections_equals_per_layer_lora():
  model, stacked = pair("gemma3")
  n = attach_lora(model, rank=4, alpha=8.0, targets=["q", "v", "down"], rngs=nnx.Rngs(3))
  m = attach_lora(stacked, rank=4, alpha=8.0, targets=["q", "v", "down"], rngs=nnx.Rngs(3))
  assert n == m == 3 * model.config.num_layers
  assert stacked.layers.attn.q_proj.lora_a.shape == (model.config.num_layers, 64, 4)
  chex.assert_trees_all_equal(flat_params(stacked), flat_params(model))


def test_export_and_load_of_a_stacked_model(tmp_path):
  model, stacked = pair("gemma2")
  export_hf(stacked, tmp_path)
  loaded = load_params(tiny("gemma2", scan_layers=True), SafetensorsSource(tmp_path), progress=False)
  assert loaded.config.scan_layers and loaded.layers.mlp.up_proj.kernel.ndim == 3
  chex.assert_trees_all_equal(flat_params(loaded), flat_params(model))


def sgd_with_decay(lr):
  """Weight decay + SGD: an update linear in the gradient, so float32 reordering stays float32-small (Adam's
  g/sqrt(v) would blow a 1e-9 difference in a near-zero gradient up to a whole step)."""
  return optax.chain(optax.add_decayed_weights(0.1), optax.sgd(lr))


def refine_batch(b=8, t=12):
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 512, (b, t)).astype(np.int32)
  mask = (np.arange(t)[None] < rng.integers(4, t + 1, b)[:, None]).astype(np.int32)
  return {"tokens": tokens * mask, "mask": mask, "labels": np.array([0, 1] * (b // 2), np.int32)}


def test_refine_step_with_scan_trains_only_rows_below_l():
  """Stacked weights are trained whole, so rows >= ℓ are restored after the update: bitwise unchanged despite
  weight decay; the result equals the per-layer run."""
  layer = 3
  runs = []
  for m in pair("gemma3"):
    opt = sgd_with_decay(1e-2)
    graphdef, state = create_state(m, trainable_filter("refine", layer), opt, seed=0)
    step = jax.jit(make_refine_step(graphdef, opt, layers=[layer], pooling="last", loss="circle",
                                    loss_kwargs={"margin": 0.25, "gamma": 32.0}))
    losses = []
    for _ in range(2):
      state, metrics = step(state, refine_batch())
      losses.append(float(metrics["loss"]))
    runs.append((losses, flat_params(merge(graphdef, state))))
  (base_losses, base), (losses, scanned) = runs
  np.testing.assert_allclose(losses, base_losses, rtol=1e-5)
  before = flat_params(random_model(tiny("gemma3")))
  for key, value in scanned.items():
    np.testing.assert_allclose(value, base[key], rtol=1e-4, atol=1e-6, err_msg=key)
    if key.startswith("layers/") and int(key.split("/")[1]) >= layer:
      assert value.tobytes() == before[key].tobytes(), key


def test_align_step_with_scan_equals_the_layer_loop():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 512, (4, 16)).astype(np.int32)
  batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": np.ones((4, 16), np.float32),
           "segments": np.ones((4, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1))}
  results = []
  for m in pair("gemma3", remat="full"):
    opt = sgd_with_decay(1e-1)
    graphdef, state = create_state(m, trainable_filter("full"), opt, seed=0)
    step = jax.jit(make_align_step(graphdef, opt, grad_accum=2))
    for _ in range(2):
      state, metrics = step(state, batch)
    results.append((float(metrics["loss"]), flat_params(merge(graphdef, state))))
  (base_loss, base), (loss, scanned) = results
  assert abs(loss - base_loss) <= 1e-5 * abs(base_loss)
  for key in base:
    np.testing.assert_allclose(scanned[key], base[key], rtol=1e-4, atol=1e-6, err_msg=key)
