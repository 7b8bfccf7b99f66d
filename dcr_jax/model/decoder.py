"""The decoder: embeddings, blocks, final norm and tied (or separate) head; no training logic."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcr_jax.errors import UserError
from dcr_jax.model.config import ModelConfig
from dcr_jax.model.interventions import Edit, apply_edits, check_edits, edit_layers
from dcr_jax.model.layers import Block, LayerSpec, RMSNorm, layer_specs, matmul, param

Array = jax.Array


class DecoderOutput(NamedTuple):
  """What a forward returns when more than logits is asked for."""

  logits: Array | None  # [B T V] float32, [B V] with logits_index, None with stop_at_layer
  hidden: dict[int, Array]  # layer ℓ -> residual stream after ℓ blocks [B T D] (ℓ = 0 is the embedding)
  cache: dict | None  # updated KV cache when one was given


def default_positions(mask: Array, offset: Array | int = 0) -> Array:
  """[B T] positions counting only valid tokens (left or right padding), starting at `offset` [B] or scalar."""
  valid = (mask != 0).astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0) + jnp.asarray(offset, jnp.int32)[..., None]


class Decoder(nnx.Module):
  """The decoder of every family. `model(tokens [B T])` -> float32 logits [B T V]; options documented on __call__."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    pd = jnp.dtype(config.param_dtype)
    init = nnx.initializers.normal(stddev=1.0 / np.sqrt(config.embed_dim))
    self.embedding = param(init(rngs.params(), (config.vocab_size, config.embed_dim), pd), ("vocab", "embed"))
    blocks = [Block(config, rngs=rngs) for _ in range(config.num_layers)]
    self.layers = stack_blocks(blocks) if config.scan_layers else nnx.List(blocks)
    self.final_norm = RMSNorm(config.embed_dim, eps=config.norm_eps, offset=config.norm_scale_offset, param_dtype=pd)
    if not config.tie_embeddings:
      self.head = param(init(rngs.params(), (config.embed_dim, config.vocab_size), pd), ("embed", "vocab"))
    self.constrain_activations = None  # optional callable on the residual stream at block boundaries

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache: per-layer keys k [B K H S] and values v [B S K H], slot segments [B S] (0 = empty) and the
    next write slot. Keys are stored slot-last, the layout the q.k product reads, so a decode step neither transposes
    nor copies them (on CPU that saved ~5% of a gemma-3-270m decode step)."""
    cfg = self.config
    dtype = dtype or jnp.dtype(cfg.dtype)
    k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, max_len)
    v_shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    layers = [{"k": jnp.zeros(k_shape, dtype), "v": jnp.zeros(v_shape, dtype)} for _ in range(cfg.num_layers)]
    return {"index": jnp.zeros((), jnp.int32), "segments": jnp.zeros((batch, max_len), jnp.int32), "layers": layers}

  def __call__(self, tokens, positions=None, mask=None, *, cache: dict | None = None,
               stop_at_layer: int | None = None, return_hidden: Sequence[int] = (), logits_index=None,
               interventions: Sequence[Edit] = ()):
    """Forward pass.

    tokens [B T] int; mask [B T] (0 = padding; equal non-zero values form one sequence, so packed rows do not attend
    across examples); positions [B T] (default: count of valid tokens). With `cache`, tokens are written at slot
    cache["index"] and attend to all earlier slots. `stop_at_layer=ℓ` runs only blocks < ℓ and returns no logits.
    `logits_index` [B] picks one position per row. `interventions`: edits of the residual stream
    (`dcr_jax.model.interventions`), applied at their layers and positions; `hidden[ℓ]` is the stream after them.
    Returns the logits alone unless `cache`, `return_hidden` or `stop_at_layer` is given; then a DecoderOutput.
    """
    cfg = self.config
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    mask = jnp.ones((b, t), jnp.int32) if mask is None else jnp.asarray(mask).astype(jnp.int32)
    depth = cfg.num_layers if stop_at_layer is None else stop_at_layer
    wanted = set(return_hidden) | ({depth} if stop_at_layer is not None else set())
    if not 0 <= depth <= cfg.num_layers or any(not 0 <= l <= depth for l in wanted):
      raise UserError(f"layers {sorted(wanted)} / stop_at_layer={stop_at_layer} out of range 0..{cfg.num_layers}")
    edits = tuple(interventions)
    check_edits(edits, cfg.num_layers, cfg.embed_dim)

    if cache is None:
      slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      cache_segments = write_at = None
      if positions is None:
        positions = default_positions(mask)
    else:
      write_at = cache["index"]
      slots = jnp.broadcast_to(write_at + jnp.arange(t, dtype=jnp.int32), (b, t))
      if positions is None:
        positions = default_positions(mask, offset=jnp.sum(cache["segments"] != 0, axis=-1))
      cache_segments = jax.lax.dynamic_update_slice(cache["segments"], mask, (0, write_at))

    x = self.embedding[...][tokens].astype(cfg.dtype)
    if cfg.scale_embeddings:
      x = x * jnp.asarray(cfg.embed_dim ** 0.5, cfg.dtype)
    x = apply_edits(x, edits, 0, "residual", positions)
    hidden = {0: x} if 0 in wanted else {}
    specs = layer_specs(cfg)
    new_layers = []
    if cfg.scan_layers and cache is None:
      x, hidden = self._scan_blocks(x, specs, depth, wanted, hidden, positions, mask, slots, edits)
    else:
      run_block = _rematerialized(cfg.remat) if cache is None else _call_block
      mid_layers = edit_layers(edits, "mid")
      for i in range(depth):
        layer_cache = None if cache is None else cache["layers"][i]
        mid = _mid_edit(edits, i, positions) if i in mid_layers else None
        x, layer_cache = run_block(self.block(i), x, specs[i], positions, mask, slots, layer_cache, cache_segments,
                                   write_at, mid)
        x = apply_edits(x, edits, i + 1, "residual", positions)
        if self.constrain_activations is not None:
          x = self.constrain_activations(x)
        new_layers.append(layer_cache)
        if i + 1 in wanted:
          hidden[i + 1] = x

    new_cache = None
    if cache is not None:
      new_cache = {"index": write_at + t, "segments": cache_segments,
                   "layers": new_layers + list(cache["layers"][depth:])}
    if stop_at_layer is not None:
      return DecoderOutput(None, hidden, new_cache)

    if logits_index is not None:
      x = jnp.take_along_axis(x, jnp.asarray(logits_index, jnp.int32)[:, None, None], axis=1)[:, 0]
    logits = self.logits(self.final_norm(x), decoding=cache is not None)
    if cache is None and not return_hidden:
      return logits
    return DecoderOutput(logits, hidden, new_cache)

  def block(self, i: int) -> Block:
    """Layer i as a Block (a slice of the stacked params when `scan_layers`)."""
    if not self.config.scan_layers:
      return self.layers[i]
    graphdef, state = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

  def _scan_blocks(self, x, specs, depth, wanted, hidden, positions, mask, slots, edits):
    """Blocks < depth under jax.lax.scan over the stacked params, split at the layers whose output is wanted or
    edited; a block with a mid-block edit runs as a segment of its own."""
    graphdef, state = nnx.split(self.layers)
    per_layer = (jnp.asarray([2 ** 30 if s.window is None else s.window for s in specs], jnp.int32),
                 jnp.stack([s.inv_freq for s in specs]))
    constrain = self.constrain_activations

    def segment_body(mid):
      def body(x, layer):
        params, window, inv_freq = layer
        x, _ = nnx.merge(graphdef, params)(x, LayerSpec(window, inv_freq), positions, mask, slots, mid=mid)
        return (x if constrain is None else constrain(x)), None

      if self.config.remat != "none":
        return jax.checkpoint(body, policy=_REMAT_POLICIES[self.config.remat], prevent_cse=False)
      return body

    residual, mid_layers = edit_layers(edits, "residual"), edit_layers(edits, "mid")
    cuts = {l for l in wanted | residual if l > 0} | {m for l in mid_layers for m in (l, l + 1)}
    start = 0
    for end in sorted({l for l in cuts if l <= depth} | {depth}):
      if end > start:
        xs = jax.tree.map(lambda a: a[start:end], (state, *per_layer))
        mid = _mid_edit(edits, start, positions) if start in mid_layers else None
        x, _ = jax.lax.scan(segment_body(mid), x, xs)
      x = apply_edits(x, edits, end, "residual", positions)
      if end in wanted:
        hidden[end] = x
      start = end
    return x, hidden

  def logits(self, x: Array, decoding: bool = False, vocab_major: bool = False) -> Array:
    """Final-normed hidden [..., D] -> float32 logits [..., V] (float64 for float64 activations), soft-capped.

    `decoding` (a KV-cache step, never differentiated) with few rows reads the table in one fused multiply-and-sum,
    ~25% faster than a skinny matmul on CPU; its derivatives are slow, so training and kernels use the matmul.
    `vocab_major` (hidden [N D] only) returns the logits transposed, [V N], as table @ hidden.T: on CPU the fastest
    form when the next op reduces over the vocabulary (greedy decoding), 2-4 ms per gemma-3-270m step below the
    fused form.
    """
    rows = int(np.prod(x.shape[:-1]))
    table = self.embedding[...] if self.config.tie_embeddings else self.head[...].T  # [V D]
    narrow = jnp.dtype(table.dtype).itemsize < jnp.dtype(x.dtype).itemsize  # decode weights: read as stored
    if vocab_major:
      if x.ndim != 2:
        raise ValueError(f"vocab_major logits need hidden [N D], got shape {x.shape}")
      logits = matmul(x, table.T).T if narrow else table.astype(x.dtype) @ x.T
    elif decoding and rows <= _FEW_ROWS and not narrow:
      flat = x.reshape(rows, 1, x.shape[-1])
      logits = jnp.sum(table.astype(x.dtype)[None] * flat, axis=-1).reshape(*x.shape[:-1], -1)
    else:
      logits = matmul(x, table.T)
    logits = logits.astype(jnp.promote_types(x.dtype, jnp.float32))
    if self.config.final_logit_softcap is not None:
      cap = self.config.final_logit_softcap
      logits = jnp.tanh(logits / cap) * cap
    return logits


_FEW_ROWS = 64  # at most this many positions of a decode step take the fused multiply-and-sum head


def _call_block(block, *args):
  return block(*args)


def _mid_edit(edits, layer: int, positions):
  """The mid-block edits of block `layer` as a function of the stream."""
  return lambda x: apply_edits(x, edits, layer, "mid", positions)


_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}


def _rematerialized(policy: str):
  """The block call, recomputed in the backward pass per `policy` (none | full | dots), as a pure jax.checkpoint."""
  if policy == "none":
    return _call_block
  saveable = _REMAT_POLICIES[policy]

  def run(block, *args):
    *args, mid = args  # a function (mid-block edits) is closed over, not passed through jax.checkpoint
    graphdef, state = nnx.split(block)
    pure = jax.checkpoint(lambda state, *args: nnx.merge(graphdef, state)(*args, mid=mid), policy=saveable)
    return pure(state, *args)

  return run


def _with_axes(state: nnx.State, edit) -> nnx.State:
  """`state` with every Variable's logical axes replaced by `edit(axes)` (None stays None)."""
  for _, var in nnx.to_flat_state(state):
    axes = var.get_metadata().get("logical_axes")
    if axes is not None:
      var.set_metadata("logical_axes", edit(tuple(axes)))
  return state


def stack_blocks(blocks: Sequence[Block]) -> Block:
  """One Block whose params are those of `blocks` stacked on a new leading "layers" axis."""
  graphdef, first = nnx.split(blocks[0])
  states = [first] + [nnx.split(b)[1] for b in blocks[1:]]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  return nnx.merge(graphdef, _with_axes(stacked, lambda axes: ("layers", *axes)))


def unstack_blocks(stacked: Block) -> list[Block]:
  """The per-layer Blocks of a stacked Block (inverse of `stack_blocks`)."""
  graphdef, state = nnx.split(stacked)
  count = jax.tree.leaves(state)[0].shape[0]
  return [nnx.merge(graphdef, _with_axes(jax.tree.map(lambda a: a[i], state), lambda axes: axes[1:]))
          for i in range(count)]


def stack_layers(model: Decoder, place=None) -> Decoder:
  """The same model with its blocks stacked for `scan_layers` (a no-op if they already are).

  `place(path, logical_axes, shape=...)` (as for `load_params`) puts each stacked tensor on its sharding.
  """
  if model.config.scan_layers:
    return model
  graphdef, state = nnx.split(model)
  out = nnx.merge(graphdef, state)
  out.layers = stack_blocks(list(out.layers))
  out.config = model.config.replace(scan_layers=True)
  if place is not None:
    state = nnx.state(out.layers)
    for path, var in nnx.to_flat_state(state):
      target = place(("layers", *path), var.get_metadata().get("logical_axes"), shape=var.shape)
      var.set_value(jax.device_put(var.get_value(), target))
    nnx.update(out.layers, state)
  return out


def unstack_layers(model: Decoder) -> Decoder:
  """The same model with one Block per layer (a no-op unless `scan_layers`)."""
  if not model.config.scan_layers:
    return model
  graphdef, state = nnx.split(model)
  out = nnx.merge(graphdef, state)
  out.layers = nnx.List(unstack_blocks(out.layers))
  out.config = model.config.replace(scan_layers=False)
  return out
