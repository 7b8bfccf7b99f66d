"""Pure train steps, `step(state, batch) -> (state, metrics)`, and their compilation with explicit shardings."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from dcr_jax.train.losses import class_similarity_stats, get_loss, masked_cross_entropy
from dcr_jax.train.state import TrainState, anchor, keep_layers_from, merge


def pool(hidden: jax.Array, mask: jax.Array, how: str) -> jax.Array:
  """[B T D] -> L2-normalised [B D]: the last valid token (where the answer starts) or the mean over valid tokens."""
  mask = mask.astype(hidden.dtype)
  if how == "last":
    last = jnp.sum(mask, axis=-1).astype(jnp.int32) - 1
    pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  else:
    pooled = jnp.sum(hidden * mask[..., None], axis=1) / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1)
  pooled = pooled.astype(jnp.float32)
  return pooled * jax.lax.rsqrt(jnp.sum(pooled ** 2, axis=-1, keepdims=True) + 1e-12)


def _apply(optimizer, state: TrainState, grads, loss, metrics):
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  # float32 scalars (clip scale, schedule) promote bfloat16 moments; keep each leaf's dtype so that the state keeps
  # the shapes and dtypes it was compiled (and donated) with
  opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state, state.opt_state)
  params = optax.apply_updates(state.params, updates)
  metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_refine_step(graphdef, optimizer, *, layers: Sequence[int], pooling: str, loss: str,
                     loss_kwargs: dict, lm_weight: float = 0.0, l2sp: float = 0.0) -> Callable:
  """Stage 1. batch: tokens/mask [B T], labels [B]; with lm_weight > 0 also lm_tokens/lm_targets/lm_mask [B' T'].
  With l2sp > 0 the loss adds l2sp·Σ‖θ−θ₀‖² over the trained params, θ₀ from an optimizer built by `with_anchor`.
  Metrics: `contrastive` (the contrastive term alone), `loss` (the total), and `l2sp`, `lm_loss` when on."""
  contrastive = get_loss(loss)
  depth = max(layers)

  def loss_fn(params, state, batch):
    model = merge(graphdef, state.replace(params=params))
    hidden = model(batch["tokens"], mask=batch["mask"], stop_at_layer=depth, return_hidden=layers).hidden
    pooled = {l: pool(hidden[l], batch["mask"], pooling) for l in layers}
    total = sum(contrastive(pooled[l], batch["labels"], **loss_kwargs) for l in layers) / len(layers)
    metrics = {**class_similarity_stats(pooled[layers[0]], batch["labels"]), "contrastive": total}
    if l2sp > 0:
      theta0 = jax.lax.stop_gradient(anchor(state.opt_state))
      drift = sum(jnp.sum(jnp.square(p.astype(jnp.float32) - p0.astype(jnp.float32)))
                  for p, p0 in zip(jax.tree.leaves(params), jax.tree.leaves(theta0)))
      total, metrics = total + l2sp * drift, {**metrics, "l2sp": l2sp * drift}
    if lm_weight > 0:
      logits = model(batch["lm_tokens"], batch["lm_positions"], batch["lm_segments"])
      lm_loss, _ = masked_cross_entropy(logits, batch["lm_targets"], batch["lm_mask"])
      total, metrics = total + lm_weight * lm_loss, {**metrics, "lm_loss": lm_loss}
    return total, metrics

  def step(state: TrainState, batch: dict):
    (loss_value, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state, batch)
    new_state, metrics = _apply(optimizer, state, grads, loss_value, metrics)
    return new_state.replace(params=keep_layers_from(depth, state.params, new_state.params)), metrics

  return step


def make_align_step(graphdef, optimizer, *, grad_accum: int = 1) -> Callable:
  """Stage 2: masked next-token CE on response tokens (f32 logits), token-weighted over `grad_accum` microbatches.

  batch: tokens/targets/loss_mask/segments/positions [B T], B divisible by grad_accum. With `loss_index`
  [grad_accum·G K] (see `train.align.loss_index`) the head runs only at the loss positions it lists.
  """

  def summed_loss(params, state, micro):
    model = merge(graphdef, state.replace(params=params))
    if "loss_index" in micro:
      logits, targets, weights = response_logits(model, micro)
    else:
      logits = model(micro["tokens"], micro["positions"], micro["segments"])
      targets, weights = micro["targets"], micro["loss_mask"]
    mean, count = masked_cross_entropy(logits, targets, weights)
    return mean * count, count

  def step(state: TrainState, batch: dict):
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

    def accumulate(carry, one):
      (total, count), grads = jax.value_and_grad(summed_loss, has_aux=True)(state.params, state, one)
      loss_sum, token_sum, grad_sum = carry
      return (loss_sum + total, token_sum + count, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (loss_sum, tokens, grads), _ = jax.lax.scan(accumulate, (0.0, 0.0, zeros), micro)
    scale = 1.0 / jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g * scale, grads)
    return _apply(optimizer, state, grads, loss_sum * scale, {"tokens": tokens})

  return step


def response_logits(model, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(logits [G K V], targets [G K], weights [G K]) at the positions `loss_index` [G K] lists: indices into each
  group's flattened rows [(B/G)·T], -1 = padding (weight 0). The head and its backward run on G·K rows, not B·T."""
  depth = model.config.num_layers
  hidden = model(batch["tokens"], batch["positions"], batch["segments"], stop_at_layer=depth).hidden[depth]
  index = batch["loss_index"]
  groups = index.shape[0]
  safe = jnp.maximum(index, 0)

  def gathered(x):  # [B T ...] -> the listed positions [G K ...]
    x = x.reshape(groups, -1, *x.shape[2:])
    return jnp.take_along_axis(x, safe.reshape(safe.shape + (1,) * (x.ndim - 2)), axis=1)

  logits = model.logits(model.final_norm(gathered(hidden)))
  weights = jnp.where(index >= 0, gathered(batch["loss_mask"]), 0.0)
  return logits, gathered(batch["targets"]), weights


def compile_step(step: Callable, state_shardings, batch_shardings) -> Callable:
  """jit with explicit in/out shardings and the state donated; metrics come back replicated."""
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, None),
                 donate_argnums=0)
