"""TrainState: one pytree holding the step, the trained params, the frozen params, optimizer state and rng."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from dcr_jax.model import Decoder
from dcr_jax.model.layers import LoRAParam
from dcr_jax.parallel.sharding import key_name


class TrainState(struct.PyTreeNode):
  """Frozen params ride along untouched (bitwise unchanged by construction); the optimizer sees only `params`."""

  step: jax.Array  # int32 []
  params: nnx.State  # trained
  frozen: nnx.State  # not trained
  opt_state: optax.OptState
  rng: jax.Array  # uint32 [2]


def layers_up_to(layer: int) -> Callable:
  """Filter for stage 1: the embedding and the blocks below `layer` (those that compute the residual at ℓ).

  Stacked blocks (`scan_layers`) are one array per weight, so they pass whole; `keep_layers_from` then restores
  their rows ≥ ℓ after each update.
  """

  def keep(path, variable) -> bool:
    if not isinstance(variable, nnx.Param):
      return False
    return path[0] == "embedding" or (path[0] == "layers" and (not str(path[1]).isdigit() or int(path[1]) < layer))

  return keep


def keep_layers_from(layer: int, old, new):
  """`new` params with rows ≥ `layer` of every stacked block weight ("layers" leaf with a leading layer axis, as
  under `scan_layers`) taken bitwise from `old`; per-layer (unstacked) params pass through unchanged."""

  def pick(path, before, after):
    keys = [key_name(k) for k in path]
    if not keys or keys[0] != "layers" or (len(keys) > 1 and str(keys[1]).isdigit()):
      return after
    rows = (jnp.arange(after.shape[0]) < layer).reshape((-1,) + (1,) * (after.ndim - 1))
    return jnp.where(rows, after, before)

  return jax.tree_util.tree_map_with_path(pick, old, new)


def trainable_filter(kind: str, layer: int | None = None):
  """`refine` (layers ≤ ℓ + embedding), `lora` (adapters only) or `full` (every parameter)."""
  if kind == "refine":
    return layers_up_to(layer)
  if kind == "lora":
    return LoRAParam
  return nnx.Param


def create_state(model: Decoder, trainable, optimizer: optax.GradientTransformation,
                 seed: int) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, state) for the model split into trained and frozen parts."""
  graphdef, params, frozen = nnx.split(model, trainable, ...)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                     opt_state=optimizer.init(params), rng=jax.random.key_data(jax.random.key(seed)))
  return graphdef, state


def merge(graphdef: nnx.GraphDef, state: TrainState) -> Decoder:
  """The model the state describes (use inside jit)."""
  return nnx.merge(graphdef, state.params, state.frozen)


def make_optimizer(*, lr: float, steps: int, warmup: int, weight_decay: float, clip: float,
                   schedule: str = "cosine") -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine decay (or constant), and global-norm clipping."""
  warmup = min(warmup, max(steps - 1, 0))
  if schedule == "cosine":
    lr_fn = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1), end_value=lr * 0.1)
  else:
    lr_fn = optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
                                 [max(warmup, 1)])
  return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(lr_fn, weight_decay=weight_decay))


class AnchorState(NamedTuple):
  anchor: Any  # the trained params as the optimizer was initialised with them (θ₀), sharded like them


def with_anchor(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """`optimizer` whose state also keeps a copy of the params it is initialised with (θ₀ for L2-SP; read it with
  `anchor`). The copy is checkpointed with the optimizer state, so a resumed stage keeps its stage-start θ₀."""
  keep = optax.GradientTransformation(lambda params: AnchorState(jax.tree.map(jnp.copy, params)),
                                      lambda updates, state, params=None: (updates, state))
  return optax.chain(keep, optimizer)


def anchor(opt_state) -> Any:
  """θ₀ of an optimizer built by `with_anchor`."""
  return opt_state[0].anchor
