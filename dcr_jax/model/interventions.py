"""Declarative interventions on the residual stream, and the weight form of directional ablation.

An `Edit` says what to do to the residual stream x [B T D] at some layers and positions; the decoder applies a tuple
of them in every forward (full, prefill and KV-cache decode alike) and knows nothing of where they came from:

- `add`:    x ← x + c·v                (activation addition; v one vector per listed layer)
- `ablate`: x ← x − c·(x·r̂) r̂          (directional ablation of a unit r̂; c = 1 removes the component entirely)

Sites. `residual` layer ℓ is the stream after ℓ blocks, as everywhere in the model: ℓ = 0 is the (scaled)
embedding output, ℓ = L the last block's output (before the final norm). `mid` layer ℓ is inside block ℓ, after its
attention has been added and before its MLP reads the stream (0 ≤ ℓ < L). Ablating r̂ at every residual and every
mid site removes r̂ wherever a block writes it, which is what orthogonalising the writing matrices does
(`orthogonalize`).

Positions are counted per row over valid tokens (the model's `positions`: left padding does not count; a decode
step continues the count). An edit applies where start ≤ position < stop, `start`/`stop` scalars or [B] (`span`
builds the usual windows), or where an explicit `mask` [B T] (matching this call's tokens) is non-zero. `coef` is a
scalar or [B], so different rows can be steered differently in one forward.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcr_jax.errors import UserError

Array = jax.Array
KINDS = ("add", "ablate")
SITES = ("residual", "mid")
SPANS = ("all", "prompt", "after_instruction")
END = 2 ** 30  # a stop beyond any sequence: "to the end, generated tokens included"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Edit:
  """One intervention: `kind` at `site` for each of `layers` (static), with per-layer vectors and a window."""

  vectors: Array  # [N D]: v (add) or unit r̂ (ablate) for each of the N listed layers
  coef: Array  # [] or [B]
  start: Array  # [] or [B]: first edited position
  stop: Array  # [] or [B]: first position past the window
  mask: Array | None  # [B T] non-zero where edited (instead of start/stop), or None
  kind: str = dataclasses.field(metadata=dict(static=True), default="add")
  layers: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
  site: str = dataclasses.field(metadata=dict(static=True), default="residual")


def _edit(kind: str, vectors, layers: Sequence[int], coef, start, stop, mask, site: str) -> Edit:
  layers = tuple(int(l) for l in layers)
  vectors = jnp.asarray(vectors)
  if vectors.ndim == 1:
    vectors = jnp.broadcast_to(vectors, (len(layers), vectors.shape[0]))
  if vectors.ndim != 2 or vectors.shape[0] != len(layers):
    raise UserError(f"{kind} edit: vectors of shape {vectors.shape} for {len(layers)} layers; give one [D] vector "
                    "or one per layer [N D]")
  if site not in SITES:
    raise UserError(f"{kind} edit: site {site!r} is unknown; choose {', '.join(SITES)}")
  return Edit(vectors, jnp.asarray(coef), jnp.asarray(start, jnp.int32), jnp.asarray(stop, jnp.int32),
              None if mask is None else jnp.asarray(mask), kind, layers, site)


def add(vectors, layers: Sequence[int], coef=1.0, start=0, stop=END, mask=None, site: str = "residual") -> Edit:
  """x ← x + coef·v at each of `layers` (v [D] shared, or [N D] one per layer) within the window."""
  return _edit("add", vectors, layers, coef, start, stop, mask, site)


def ablate(direction, layers: Sequence[int], coef=1.0, start=0, stop=END, mask=None, site: str = "residual") -> Edit:
  """x ← x − coef·(x·r̂) r̂ at each of `layers`; `direction` [D] or [N D] is normalised to unit length here."""
  direction = jnp.asarray(direction)
  norm = jnp.linalg.norm(direction, axis=-1, keepdims=True)
  return _edit("ablate", direction / jnp.where(norm > 0, norm, 1), layers, coef, start, stop, mask, site)


def ablate_everywhere(direction, num_layers: int, coef=1.0, start=0, stop=END) -> tuple[Edit, Edit]:
  """Ablation of r̂ at every residual site 0..L and every mid-block site: the hook form of `orthogonalize`."""
  return (ablate(direction, range(num_layers + 1), coef, start, stop),
          ablate(direction, range(num_layers), coef, start, stop, site="mid"))


def span(where: str, prompt_lengths, template_tail: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(start [B], stop [B]) positions of a window: `all`; `prompt` (the prompt's tokens, nothing generated);
  `after_instruction` (from the first of the `template_tail` chat-template tokens that follow the user's message
  on, generated tokens included). `prompt_lengths` [B] counts each row's valid prompt tokens."""
  lengths = np.asarray(prompt_lengths, np.int32)
  if where == "all":
    return np.zeros_like(lengths), np.full_like(lengths, END)
  if where == "prompt":
    return np.zeros_like(lengths), lengths
  if where == "after_instruction":
    return np.maximum(lengths - template_tail, 0), np.full_like(lengths, END)
  raise UserError(f"positions {where!r} are unknown; choose {', '.join(SPANS)} (or give a mask)")


def check_edits(edits: Sequence[Edit], num_layers: int, embed_dim: int) -> None:
  """Each edit's kind, layers (residual 0..L, mid 0..L-1) and vector size fit the model; else a UserError."""
  for e in edits:
    top = num_layers if e.site == "residual" else num_layers - 1
    bad = [l for l in e.layers if not 0 <= l <= top]
    if e.kind not in KINDS:
      raise UserError(f"edit kind {e.kind!r} is unknown; choose {', '.join(KINDS)}")
    if bad:
      raise UserError(f"{e.kind} edit at {e.site} layer {bad[0]} is out of range 0..{top}; "
                      f"choose layers within the model's {num_layers} blocks")
    if e.vectors.shape[-1] != embed_dim:
      raise UserError(f"{e.kind} edit vectors have size {e.vectors.shape[-1]}, the model's residual stream "
                      f"{embed_dim}; estimate them on this model")


def edit_layers(edits: Sequence[Edit], site: str) -> set[int]:
  """The layers where some edit of `site` applies."""
  return {l for e in edits if e.site == site for l in e.layers}


def _per_row(value: Array, ndim: int) -> Array:
  """A scalar or [B] value shaped to broadcast against [B, 1, ...] (`ndim` dims in all)."""
  return value.reshape(value.shape + (1,) * (ndim - value.ndim)) if value.ndim else value


def apply_edits(x: Array, edits: Sequence[Edit], layer: int, site: str, positions: Array) -> Array:
  """x [B T D] after every edit of `site` at `layer`, in order; positions [B T] as the model counts them."""
  for e in edits:
    if e.site != site or layer not in e.layers:
      continue
    v = e.vectors[e.layers.index(layer)].astype(x.dtype)
    if e.mask is not None:
      where = e.mask != 0
    else:
      where = (positions >= _per_row(e.start, 2)) & (positions < _per_row(e.stop, 2))
    coef = _per_row(e.coef.astype(x.dtype), 3)
    delta = coef * v if e.kind == "add" else -coef * jnp.einsum("btd,d->bt", x, v)[..., None] * v
    x = x + jnp.where(where[..., None], delta, 0).astype(x.dtype)
  return x


def _project_out(w: Array, r: Array) -> Array:
  """w [..., D] − (w·r) r with r [..., D] broadcast against w (computed in float32 or wider)."""
  compute = jnp.promote_types(w.dtype, jnp.float32)
  wc, rc = w.astype(compute), r.astype(compute)
  return (wc - jnp.sum(wc * rc, axis=-1, keepdims=True) * rc).astype(w.dtype)


def _writing_direction(r: Array, norm) -> Array:
  """The unit direction a matrix writing through `norm` (a post-norm, or None) must not write along so that the
  stream gains no component along r: r itself, or (offset + w)∘r normalised (per layer when stacked)."""
  if norm is None:
    return r
  scaled = (norm.offset + norm.scale[...].astype(r.dtype)) * r  # [D] or [L D]
  return scaled / jnp.linalg.norm(scaled, axis=-1, keepdims=True)


def orthogonalize(model, direction) -> "nnx.Module":
  """A copy of `model` that never writes along `direction` [D] (normalised here): the embedding, every attention
  output (o_proj kernel, bias and LoRA B) and every MLP output (down_proj) projected off it.

  Without post-norms (Llama, Mistral, Qwen, Gemma 1) it computes what `ablate_everywhere` computes by hooks. Gemma
  2/3 rescale a block's output by a post-norm after o_proj/down_proj; there the matrices are projected off
  (offset + w)∘r̂ instead, which leaves the residual stream with no component along r̂ as the hooks do, though the
  outputs differ (the post-norm sees a different vector). With a tied embedding (`tie_embeddings`) the output head
  is the embedding table, so its logits change too: logit_v = (E_v − (E_v·r̂) r̂)·h, which the hook form does not do.
  """
  graphdef, state = nnx.split(model)
  out = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))  # a copy; `model` is left as it is
  r = jnp.asarray(direction, jnp.promote_types(out.embedding[...].dtype, jnp.float32))
  r = r / jnp.linalg.norm(r)
  out.embedding[...] = _project_out(out.embedding[...], r)
  layers = [out.layers] if out.config.scan_layers else list(out.layers)
  for block in layers:
    post = out.config.use_post_norms
    for dense, norm in ((block.attn.o_proj, block.post_attn_norm if post else None),
                        (block.mlp.down_proj, block.post_ffw_norm if post else None)):
      w = _writing_direction(r, norm)
      dense.kernel[...] = _project_out(dense.kernel[...], w[..., None, :])
      if dense.use_bias:
        dense.bias[...] = _project_out(dense.bias[...], w)
      if dense.lora_b is not None:
        dense.lora_b[...] = _project_out(dense.lora_b[...], w[..., None, :])
  return out
