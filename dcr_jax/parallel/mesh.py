"""The device mesh: axes ('data', 'fsdp', 'tensor'), sizes from config, one of them -1 to fill the devices."""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

from dcr_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")


def _resolve_sizes(sizes: dict[str, int], n: int) -> tuple[int, ...]:
  """Config sizes (one may be -1) -> concrete sizes whose product is `n`; one-line UserError otherwise."""
  for key, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise UserError(f"mesh.{key}={size!r} must be a positive integer or -1 (fill the remaining devices)")
  fill = [k for k, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise UserError(f"mesh: {' and '.join(f'mesh.{k}=-1' for k in fill)}; only one size may be -1, set the others")
  fixed = {k: s for k, s in sizes.items() if s != -1}
  product = math.prod(fixed.values())
  formula = f"{'*'.join(fixed)} = {'*'.join(map(str, fixed.values()))} = {product}"
  if fill:
    if n % product:
      keys = " and ".join(f"mesh.{k}" for k in fixed)
      raise UserError(f"mesh: {formula} does not divide {n} devices; set {keys} to sizes whose product divides {n}")
    sizes = {**sizes, fill[0]: n // product}
  elif product != n:
    raise UserError(f"mesh: {formula} does not equal {n} devices; set mesh.data=-1 to fill")
  return tuple(sizes[k] for k in MESH_AXES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over `devices` (default: all, every process) with axes ('data', 'fsdp', 'tensor').

  One size may be -1 to take the devices the others leave. Axis types are Auto, so plain `jax.jit` with
  in/out shardings and `with_sharding_constraint` drive the partitioning.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = _resolve_sizes({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_shards(mesh_spec, devices: int | None = None) -> int:
  """data × fsdp of the mesh `mesh_spec` (sizes data/fsdp/tensor, one may be -1) makes over `devices` (default all)."""
  sizes = _resolve_sizes({"data": mesh_spec.data, "fsdp": mesh_spec.fsdp, "tensor": mesh_spec.tensor},
                         jax.device_count() if devices is None else devices)
  return sizes[0] * sizes[1]
