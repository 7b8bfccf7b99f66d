"""Logical axis names -> mesh axes (one rules table), and the shardings of params, optimizer states and batches."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dcr_jax.errors import UserError

MeshAxes = str | tuple[str, ...] | None

# Logical axis name -> the mesh axis (or axes, major first) it is split over; None = replicated.
LOGICAL_RULES: Mapping[str | None, MeshAxes] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "layers": None,  # the stacked-layer axis of `model.scan_layers`
    None: None,
}


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None,
                    rules: Mapping[str | None, MeshAxes] = LOGICAL_RULES) -> P:
  """PartitionSpec for logical `axes` that is legal on `mesh`.

  A mesh axis is dropped where it is already used by an earlier dimension, or where (given `shape`) the dimension is
  not divisible by the product of the mesh axes kept so far for it times that axis' size.
  """
  if shape is not None and len(shape) != len(axes):
    raise UserError(f"logical axes {tuple(axes)} do not match the shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for i, name in enumerate(axes):
    if name not in rules:
      raise UserError(f"logical axis {name!r} has no rule; add it to dcr_jax.parallel.LOGICAL_RULES "
                      f"(known: {', '.join(sorted(k for k in rules if k))})")
    target = rules[name]
    kept, split = [], 1
    for axis in (target,) if isinstance(target, str) else (target or ()):
      size = mesh.shape[axis]
      if axis in used or (shape is not None and shape[i] % (split * size)):
        continue
      kept.append(axis)
      used.add(axis)
      split *= size
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def param_sharding(path: tuple, axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                   rules: Mapping[str | None, MeshAxes] = LOGICAL_RULES) -> NamedSharding:
  """NamedSharding of one parameter (path used in errors); no logical axes -> replicated."""
  if axes is None:
    return NamedSharding(mesh, P())
  try:
    return NamedSharding(mesh, logical_to_spec(axes, mesh, shape, rules))
  except UserError as e:
    raise UserError(f"{'/'.join(map(str, path))}: {e}") from None


def _shapes_by_path(shapes) -> dict[tuple, tuple[int, ...]]:
  """{path: shape} from a Module, an nnx State, or a mapping path -> shape / Variable / array."""
  if isinstance(shapes, nnx.Module):
    shapes = nnx.state(shapes)
  if isinstance(shapes, nnx.State):
    shapes = dict(nnx.to_flat_state(shapes))
  return {tuple(path): tuple(getattr(s, "shape", s)) for path, s in shapes.items()}


def placement(mesh: Mesh, shapes=None, rules: Mapping[str | None, MeshAxes] = LOGICAL_RULES
              ) -> Callable[..., NamedSharding]:
  """`place(path, axes, shape=None) -> NamedSharding` for `load_params(..., place=placement(mesh))`.

  The shape decides which mesh axes divide each dimension. `load_params` passes it; for callers that do not,
  `shapes` maps paths to shapes (a Module such as `weights.abstract_model(cfg)`, an nnx State, or path -> shape).
  """
  table = {} if shapes is None else _shapes_by_path(shapes)

  def place(path: tuple, axes: Sequence[str | None] | None, shape: Sequence[int] | None = None) -> NamedSharding:
    path = tuple(path)
    if shape is None:
      if path not in table:
        raise UserError(f"{'/'.join(map(str, path))}: no shape known to placement(); pass "
                        f"placement(mesh, weights.abstract_model(cfg))")
      shape = table[path]
    return param_sharding(path, axes, shape, mesh, rules)

  return place


def key_name(key) -> Any:
  """A jax key-path entry -> the plain dict key / attribute name / index it stands for."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _var_axes(var: nnx.Variable):
  return var.get_metadata().get("logical_axes")


_AMBIGUOUS = object()


def _axes_by_suffix(params) -> dict[tuple, Any]:
  """Every path suffix of every Variable with logical axes -> (axes, shape); suffixes that disagree are ambiguous."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params)
  table: dict[tuple, Any] = {}
  for keypath, var in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]:
    if not _is_variable(var) or _var_axes(var) is None:
      continue
    path = tuple(map(key_name, keypath))
    entry = (tuple(_var_axes(var)), tuple(var.shape))
    for k in range(len(path)):
      table[path[k:]] = entry if table.get(path[k:], entry) == entry else _AMBIGUOUS
  return table


def state_shardings(tree, mesh: Mesh, params=None, rules: Mapping[str | None, MeshAxes] = LOGICAL_RULES):
  """NamedShardings with the structure of `tree` (an nnx State, a train state, an optax state ...).

  A Variable with `logical_axes` is sharded by them (Variables keep their place, holding the sharding, as in
  `nnx.get_named_sharding`). Any other array whose tree path ends with the path of a parameter of `params`
  (default: the Variables found in `tree` itself) and has its shape takes that parameter's sharding: optax states
  over pure dicts mirror the params this way. Everything else (counts, rng keys, scalars) is replicated.
  """
  table = _axes_by_suffix(tree if params is None else params)
  replicated = NamedSharding(mesh, P())

  def by_path(keypath, shape):
    path = tuple(map(key_name, keypath))
    for k in range(len(path)):
      entry = table.get(path[k:])
      if entry is not None and entry is not _AMBIGUOUS and entry[1] == shape:
        return param_sharding(path, entry[0], shape, mesh, rules)
    return replicated

  def leaf(keypath, x):
    if _is_variable(x):
      axes = _var_axes(x)
      shape = tuple(x.shape)
      return x.replace(param_sharding(tuple(map(key_name, keypath)), axes, shape, mesh, rules) if axes is not None
                       else by_path(keypath, shape))
    return by_path(keypath, tuple(np.shape(x)))

  return jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=_is_variable)


def shard_pytree(tree, shardings):
  """`tree` moved onto `shardings` (a matching tree, e.g. from `state_shardings`, or one sharding for all)."""
  return jax.device_put(tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int, shape: Sequence[int] | None = None) -> NamedSharding:
  """[B ...] split over ('data', 'fsdp') on B, the rest replicated (given `shape`, non-divisible axes dropped)."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh, shape))


def activation_constraint(mesh: Mesh) -> Callable[[jax.Array], jax.Array]:
  """x [B T D] -> x constrained to batch over ('data', 'fsdp'), replicated T and D; for `model.constrain_activations`."""

  def constrain(x: jax.Array) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim, x.shape))

  return constrain


def local_batch_to_global(batch, mesh: Mesh):
  """A batch (array or pytree) of this process's rows [B_local ...] -> global arrays split over ('data', 'fsdp') on B.

  JAX infers the global batch from the mesh (B_local times the processes holding distinct rows); with one process
  the rows are simply sharded over the local devices.
  """

  def to_global(x):
    x = np.asarray(x)
    try:
      return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
    except ValueError as e:
      split = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
      raise UserError(f"batch of {x.shape[0]} rows per process does not split over data*fsdp = {split} mesh "
                      f"shards; make the batch size a multiple of {split} ({type(e).__name__})") from None

  return jax.tree.map(to_global, batch)
