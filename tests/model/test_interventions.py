"""Interventions on the residual stream: ablation leaves no component, addition equals a hand-written forward,
prefill and cached decode agree, the scan path agrees with the layer loop, and the weight form of ablation equals
the hooks (untied) or changes the head as documented (tied)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dcr_jax.errors import UserError
from dcr_jax.model import default_positions, stack_layers, tiny
from dcr_jax.model.interventions import ablate, ablate_everywhere, add, orthogonalize, span
from dcr_jax.model.layers import layer_specs
from helpers import random_model


THREE = dict(num_layers=3, layer_types=("local", "local", "global"))  # 3 blocks compile fast


def f64(family, **overrides):
  """A tiny float64 model of 3 blocks (local and global ones where the family has a sliding window)."""
  three = THREE if tiny(family).sliding_window else dict(num_layers=3, layer_types=("global",) * 3)
  return random_model(tiny(family, dtype="float64", param_dtype="float64", **{**three, **overrides}))


@nnx.jit(static_argnames=("return_hidden",))
def forward(model, tokens, mask, edits=(), return_hidden=()):
  """One compiled forward (much faster than op-by-op on a tiny model)."""
  return model(tokens, mask=mask, return_hidden=return_hidden, interventions=edits)


@nnx.jit
def cached(model, tokens, mask, cache, edits):
  return model(tokens, mask=mask, cache=cache, interventions=edits)


def batch(b=2, t=12, seed=1):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 512, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  mask[0, :3] = 0  # left padding: positions count valid tokens only
  return tokens, mask


def unit(d, seed):
  v = np.random.default_rng(seed).normal(size=d)
  return v / np.linalg.norm(v)


def test_ablation_leaves_no_component_at_any_layer_in_float64():
  with jax.enable_x64(True):
    model = f64("gemma3")
    r = unit(model.config.embed_dim, 0)
    tokens, mask = batch()
    layers = range(model.config.num_layers + 1)
    out = forward(model, tokens, mask, (ablate(r * 3.0, layers),), tuple(layers))
    plain = forward(model, tokens, mask, (), tuple(layers))
    for l in layers:
      assert np.abs(np.asarray(out.hidden[l]) @ r).max() < 1e-12
      assert np.abs(np.asarray(plain.hidden[l]) @ r).max() > 1e-2  # the direction was there to remove


def test_addition_at_a_layer_equals_a_hand_written_forward():
  """Per-row coefficients and a per-row window (from the instruction end on) in one forward."""
  with jax.enable_x64(True):
    model = f64("gemma2")
    cfg = model.config
    tokens, mask = batch()
    v = np.random.default_rng(2).normal(size=cfg.embed_dim)
    coef = np.array([1.5, -0.7])
    start, stop = span("after_instruction", mask.sum(1), template_tail=4)
    got = forward(model, tokens, mask, (add(v, [2], coef, start, stop),))

    @nnx.jit  # compiled like `forward`: RoPE's float32 angles round alike
    def by_hand(model, tokens, mask):
      positions = default_positions(mask)
      slots = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
      x = model.embedding[...][tokens] * cfg.embed_dim ** 0.5
      for i, spec in enumerate(layer_specs(cfg)):
        x, _ = model.block(i)(x, spec, positions, mask, slots)
        if i + 1 == 2:
          window = (positions >= start[:, None])[..., None]
          x = x + jnp.where(window, coef[:, None, None] * v, 0.0)
      return model.logits(model.final_norm(x))

    want = by_hand(model, tokens, mask)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-11)
    assert np.abs(np.asarray(got - forward(model, tokens, mask))).max() > 1e-3  # the addition did something
    # rows 0 and 1 edit from valid positions 5 and 8 on: the first prompt tokens are untouched
    early = forward(model, tokens[:, :6], mask[:, :6], (add(v, [2], coef, start, stop),))
    np.testing.assert_allclose(early, forward(model, tokens[:, :6], mask[:, :6]), atol=1e-12)


def test_prefill_and_cached_decode_agree():
  model = random_model(tiny("gemma3", **THREE))  # float32: the cached path indexes its slots in int32
  cfg = model.config
  tokens, mask = batch(t=14)
  lengths = mask[:, :10].sum(1)  # the "prompt" is the first 10 slots; the last 4 are decoded one by one
  edits = (add(np.random.default_rng(3).normal(size=cfg.embed_dim), [1, 3], np.array([0.8, -1.2]),
               *span("after_instruction", lengths, 3)),
           *ablate_everywhere(unit(cfg.embed_dim, 4), cfg.num_layers, 1.0, *span("prompt", lengths)))
  full = forward(model, tokens, mask, edits)
  out = cached(model, tokens[:, :10], mask[:, :10], model.init_cache(2, 14), edits)
  steps = [out.logits]
  cache = out.cache
  for j in range(10, 14):
    step = cached(model, tokens[:, j:j + 1], mask[:, j:j + 1], cache, edits)
    steps.append(step.logits)
    cache = step.cache
  valid = mask.astype(bool)  # padding slots attend to nothing in the cache: not compared
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1))[valid], np.asarray(full)[valid], rtol=0, atol=2e-5)


def test_scanned_layers_apply_the_same_edits():
  with jax.enable_x64(True):
    model = f64("gemma3", remat="full")
    cfg = model.config
    tokens, mask = batch()
    edits = (add(np.random.default_rng(5).normal(size=(2, cfg.embed_dim)), [0, 2], np.array([1.0, 2.0])),
             ablate(unit(cfg.embed_dim, 6), [1, 2], site="mid"))
    loop = forward(model, tokens, mask, edits, (2,))
    scanned = forward(stack_layers(model), tokens, mask, edits, (2,))
    np.testing.assert_allclose(scanned.logits, loop.logits, rtol=0, atol=1e-11)
    np.testing.assert_allclose(scanned.hidden[2], loop.hidden[2], rtol=0, atol=1e-11)


def test_weight_form_equals_the_hooks_on_an_untied_model():
  with jax.enable_x64(True):
    model = f64("mistral")  # untied head, no post-norms
    r = unit(model.config.embed_dim, 7)
    tokens, mask = batch()
    hooks = forward(model, tokens, mask, ablate_everywhere(r, model.config.num_layers))
    weights = orthogonalize(model, r)
    np.testing.assert_allclose(forward(weights, tokens, mask), hooks, rtol=0, atol=1e-11)
    assert np.abs(np.asarray(forward(model, tokens, mask) - hooks)).max() > 1e-3
    assert np.abs(np.asarray(model.embedding[...]) @ r).max() > 1e-2  # the model itself is left as it was


def test_weight_form_with_a_tied_embedding_changes_the_head():
  """Documented behaviour: the stream is the hooks' stream, but the head (the embedding) is orthogonalised too."""
  with jax.enable_x64(True):
    model = f64("llama")  # tied head, no post-norms
    cfg = model.config
    r = unit(cfg.embed_dim, 8)
    tokens, mask = batch()
    layers = tuple(range(cfg.num_layers + 1))
    hooks = forward(model, tokens, mask, ablate_everywhere(r, cfg.num_layers), layers)
    out = forward(orthogonalize(model, r), tokens, mask, (), layers)
    for l in layers:
      np.testing.assert_allclose(out.hidden[l], hooks.hidden[l], rtol=0, atol=1e-11)
    normed = np.asarray(model.final_norm(hooks.hidden[cfg.num_layers]))
    table = np.asarray(model.embedding[...])
    head = table - np.outer(table @ r, r)
    np.testing.assert_allclose(out.logits, normed @ head.T, rtol=0, atol=1e-10)
    assert np.abs(np.asarray(out.logits - hooks.logits)).max() > 1e-3  # unlike the hooks, the head changed


def test_weight_form_with_post_norms_removes_the_direction_from_the_stream():
  """Gemma 3 (post-norms, tied): the writing matrices are projected off (1 + w)∘r̂, so no layer carries r̂."""
  with jax.enable_x64(True):
    model = f64("gemma3")
    r = unit(model.config.embed_dim, 9)
    layers = tuple(range(model.config.num_layers + 1))
    tokens, mask = batch()
    for candidate in (orthogonalize(model, r), orthogonalize(stack_layers(model), r)):
      out = forward(candidate, tokens, mask, (), layers)
      assert max(np.abs(np.asarray(out.hidden[l]) @ r).max() for l in layers) < 1e-11


@pytest.mark.parametrize("edit, needle", [
    (lambda d: add(np.ones(d), [7]), "residual layer 7 is out of range 0..6"),
    (lambda d: ablate(np.ones(d), [6], site="mid"), "mid layer 6 is out of range 0..5"),
    (lambda d: add(np.ones(d + 1), [1]), "size 65"),
])
def test_bad_edits_are_one_line_errors(edit, needle):
  model = random_model("gemma3")
  with pytest.raises(UserError, match=needle):
    model(np.ones((1, 4), np.int32), interventions=(edit(model.config.embed_dim),))
  with pytest.raises(UserError, match="positions 'middle'"):
    span("middle", [3])
