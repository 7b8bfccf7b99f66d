"""Building blocks of the decoder: norms, projections (LoRA-ready), rotary embeddings, attention, MLP, block."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dcr_jax.model.config import ModelConfig

Array = jax.Array


class LoRAParam(nnx.Param):
  """A low-rank adapter weight; filter on this type to train or export adapters only."""


def param(value: Array, axes: tuple[str | None, ...]) -> nnx.Param:
  """A parameter carrying logical axis names (resolved to mesh axes by `dcr_jax.parallel`)."""
  return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32 (float64 for float64 inputs), scaled by (offset + w): Gemma w ~ 0, Llama w ~ 1.

  w starts at 1 - offset, so a fresh norm of either kind scales by one.
  """

  def __init__(self, dim: int, *, eps: float, offset: float, param_dtype):
    self.scale = param(jnp.full((dim,), 1.0 - offset, param_dtype), ("norm",))
    self.eps = eps
    self.offset = offset

  def __call__(self, x: Array) -> Array:
    compute = jnp.promote_types(x.dtype, jnp.float32)
    xc = x.astype(compute)
    normed = xc * jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + self.eps)
    return (normed * (self.offset + self.scale[...].astype(compute))).astype(x.dtype)


def matmul(x: Array, w: Array) -> Array:
  """`x @ w` in x's dtype. A narrower `w` (bfloat16 decode weights under float32 activations) is read as stored:
  x is rounded to w's dtype and the products accumulate in x's dtype, so no widened copy of w is made."""
  if jnp.dtype(w.dtype).itemsize < jnp.dtype(x.dtype).itemsize:
    return jax.lax.dot_general(x.astype(w.dtype), w, (((x.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=x.dtype)
  return x @ w.astype(x.dtype)


class Dense(nnx.Module):
  """`x @ kernel (+ bias)` with kernel [in, out], plus `(x @ lora_a) @ lora_b * lora_scale` once LoRA is attached."""

  def __init__(self, in_dim: int, out_dim: int, axes: tuple[str, str], *, rngs: nnx.Rngs, param_dtype,
               bias: bool = False):
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    self.kernel = param(init(rngs.params(), (in_dim, out_dim), param_dtype), axes)
    if bias:
      self.bias = param(jnp.zeros((out_dim,), param_dtype), axes[1:])
    self.use_bias = bias
    self.lora_a: LoRAParam | None = nnx.data(None)
    self.lora_b: LoRAParam | None = nnx.data(None)
    self.lora_scale = 0.0

  def __call__(self, x: Array) -> Array:
    y = matmul(x, self.kernel[...])
    if self.use_bias:
      y = y + self.bias[...].astype(x.dtype)
    if self.lora_a is not None:
      y = y + ((x @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype)) * self.lora_scale
    return y


def rope_inverse_frequencies(head_dim: int, theta: float, scale: float) -> Array:
  """[H/2] inverse frequencies, divided by the linear scaling factor."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)) / scale


def llama3_inverse_frequencies(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                               high_freq_factor: float, original_max_positions: int) -> Array:
  """[H/2] inverse frequencies of Llama 3.1's scaling: long wavelengths divided by `factor`, short ones kept, the
  band between interpolated smoothly (transformers' `_compute_llama3_parameters`)."""
  inv_freq = rope_inverse_frequencies(head_dim, theta, 1.0)
  low_freq_wavelen = original_max_positions / low_freq_factor
  high_freq_wavelen = original_max_positions / high_freq_factor
  wavelen = 2 * jnp.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(medium, smoothed, scaled)


def global_inverse_frequencies(cfg: ModelConfig) -> Array:
  """[H/2] inverse frequencies of the global layers: base theta, scaled per `cfg.rope_type`."""
  if cfg.rope_type == "llama3" and cfg.rope_scale_global != 1.0:
    return llama3_inverse_frequencies(cfg.head_dim, cfg.rope_theta_global, cfg.rope_scale_global,
                                      cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                                      cfg.rope_original_max_positions)
  return rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta_global, cfg.rope_scale_global)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """Rotary embedding in the rotate-half layout. x [B T N H], positions [B T]."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # B T H/2
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # B T 1 H
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class LayerSpec(NamedTuple):
  """What differs between layers besides weights: the sliding window (None = global) and the RoPE frequencies.

  Unscanned layers get a Python int / None and a constant; under `scan` both are per-layer arrays (window 2**30 for
  global layers).
  """

  window: int | Array | None
  inv_freq: Array  # [H/2]


def layer_specs(cfg: ModelConfig) -> list[LayerSpec]:
  """Per-layer window and RoPE frequencies from `cfg.layer_types` (local: sliding window, local base, unscaled)."""
  local_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta_local, 1.0)
  global_freq = global_inverse_frequencies(cfg)
  return [LayerSpec(cfg.sliding_window, local_freq) if kind == "local" else LayerSpec(None, global_freq)
          for kind in cfg.layer_types]


def attention_mask(q_segments: Array, kv_segments: Array, q_slots: Array, kv_slots: Array,
                   window: int | None) -> Array:
  """[B T S] bool from segments and slots ([B T], [B S]): same non-zero segment, causal in slots, and within the sliding window when given."""
  same = (q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_segments[:, None, :] != 0)
  q_slots, kv_slots = q_slots[:, :, None], kv_slots[:, None, :]
  mask = same & (kv_slots <= q_slots)
  if window is not None:
    mask = mask & (kv_slots > q_slots - window)
  return mask


class Attention(nnx.Module):
  """Grouped-query attention with optional q/k/v biases, q/k norm, logit soft-capping and per-layer RoPE base."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = jnp.dtype(cfg.param_dtype)
    self.q_proj = Dense(d, n * h, ("embed", "heads"), rngs=rngs, param_dtype=pd, bias=cfg.qkv_bias)
    self.k_proj = Dense(d, k * h, ("embed", "kv_heads"), rngs=rngs, param_dtype=pd, bias=cfg.qkv_bias)
    self.v_proj = Dense(d, k * h, ("embed", "kv_heads"), rngs=rngs, param_dtype=pd, bias=cfg.qkv_bias)
    self.o_proj = Dense(n * h, d, ("heads", "embed"), rngs=rngs, param_dtype=pd, bias=cfg.o_bias)
    if cfg.use_qk_norm:
      self.q_norm = RMSNorm(h, eps=cfg.norm_eps, offset=cfg.norm_scale_offset, param_dtype=pd)
      self.k_norm = RMSNorm(h, eps=cfg.norm_eps, offset=cfg.norm_scale_offset, param_dtype=pd)
    self.heads = (n, k, h)
    self.scale = cfg.attn_scale
    self.softcap = cfg.attn_logit_softcap
    self.use_qk_norm = cfg.use_qk_norm

  def __call__(self, x: Array, layer: "LayerSpec", positions: Array, segments: Array, slots: Array,
               kv_cache: dict | None, cache_segments: Array | None, write_at: Array | None) -> tuple[Array, dict | None]:
    b, t, _ = x.shape
    n, k, h = self.heads
    q = self.q_proj(x).reshape(b, t, n, h)
    key = self.k_proj(x).reshape(b, t, k, h)
    value = self.v_proj(x).reshape(b, t, k, h)
    if self.use_qk_norm:
      q, key = self.q_norm(q), self.k_norm(key)
    q, key = apply_rope(q, positions, layer.inv_freq), apply_rope(key, positions, layer.inv_freq)
    q = (q * self.scale).reshape(b, t, k, n // k, h)
    if kv_cache is None:
      kv_segments, kv_slots = segments, slots
      logits = jnp.einsum("btkgh,bskh->bkgts", q, key.astype(q.dtype))
    else:  # write this chunk into the cache, then attend over every cache slot
      keys = jax.lax.dynamic_update_slice(kv_cache["k"], key.transpose(0, 2, 3, 1).astype(kv_cache["k"].dtype),
                                          (0, 0, 0, write_at))
      value = jax.lax.dynamic_update_slice(kv_cache["v"], value.astype(kv_cache["v"].dtype), (0, write_at, 0, 0))
      kv_cache = {"k": keys, "v": value}
      kv_segments = cache_segments
      kv_slots = jnp.broadcast_to(jnp.arange(keys.shape[-1], dtype=jnp.int32), cache_segments.shape)
      logits = jnp.einsum("btkgh,bkhs->bkgts", q, keys.astype(q.dtype))
    mask = attention_mask(segments, kv_segments, slots, kv_slots, layer.window)  # B T S
    logits = logits.astype(jnp.promote_types(q.dtype, jnp.float32))  # float32, float64 for float64 runs
    if self.softcap is not None:
      logits = jnp.tanh(logits / self.softcap) * self.softcap
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, value.astype(x.dtype)).reshape(b, t, n * h)
    return self.o_proj(out), kv_cache


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) * up(x)); GeGLU (tanh GELU) for Gemma, SwiGLU for Llama/Qwen."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.gate_proj = Dense(cfg.embed_dim, cfg.mlp_dim, ("embed", "mlp"), rngs=rngs, param_dtype=pd)
    self.up_proj = Dense(cfg.embed_dim, cfg.mlp_dim, ("embed", "mlp"), rngs=rngs, param_dtype=pd)
    self.down_proj = Dense(cfg.mlp_dim, cfg.embed_dim, ("mlp", "embed"), rngs=rngs, param_dtype=pd)
    self.activation = cfg.activation

  def __call__(self, x: Array) -> Array:
    gate = self.gate_proj(x)
    gate = jax.nn.gelu(gate, approximate=True) if self.activation == "gelu_tanh" else jax.nn.silu(gate)
    return self.down_proj(gate * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm residual block, with the Gemma 2/3 post-norms when configured."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    norm = lambda: RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, offset=cfg.norm_scale_offset, param_dtype=pd)
    self.pre_attn_norm = norm()
    self.attn = Attention(cfg, rngs=rngs)
    self.pre_ffw_norm = norm()
    self.mlp = MLP(cfg, rngs=rngs)
    self.use_post_norms = cfg.use_post_norms
    if cfg.use_post_norms:
      self.post_attn_norm = norm()
      self.post_ffw_norm = norm()

  def __call__(self, x, layer: "LayerSpec", positions, segments, slots, kv_cache=None, cache_segments=None,
               write_at=None, mid=None):
    """x [B T D] -> (x after the block, updated KV cache); `mid` edits the stream between attention and MLP."""
    attn_out, kv_cache = self.attn(self.pre_attn_norm(x), layer, positions, segments, slots, kv_cache,
                                   cache_segments, write_at)
    if self.use_post_norms:
      attn_out = self.post_attn_norm(attn_out)
    x = x + attn_out
    if mid is not None:
      x = mid(x)
    mlp_out = self.mlp(self.pre_ffw_norm(x))
    if self.use_post_norms:
      mlp_out = self.post_ffw_norm(mlp_out)
    return x + mlp_out, kv_cache
