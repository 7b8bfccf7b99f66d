"""Multi-process JAX: start the distributed runtime on TPU pods (auto-detected) or from explicit settings."""

from __future__ import annotations

import os

import jax
import numpy as np

from dcr_jax.errors import UserError


def on_tpu_pod() -> bool:
  """True on a Cloud TPU VM or GKE TPU slice, judged by JAX's own cluster detection (metadata server / env)."""
  try:
    from jax._src.clusters.cloud_tpu_cluster import GceTpuCluster, GkeTpuCluster  # lazy: a private JAX module
  except ImportError:  # the private module moved: fall back to the GKE worker list
    return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1
  return GceTpuCluster.is_env_present() or GkeTpuCluster.is_env_present()


def initialize(distributed) -> bool:
  """Calls `jax.distributed.initialize` when running multi-process; must run before any JAX computation.

  `distributed` holds coordinator_address, num_processes, process_id, heartbeat_timeout (config.distributed).
  On a TPU pod everything is auto-detected. On CPU, collectives go through gloo. Returns whether it initialized.
  """
  explicit = distributed.num_processes > 1
  if not explicit and not on_tpu_pod():
    return False
  if jax.distributed.is_initialized():  # a second run in the same processes (a baseline, a sweep point)
    return True
  if explicit:
    if not distributed.coordinator_address:
      raise UserError("config.distributed.coordinator_address is empty; give host:port of process 0")
    if not 0 <= distributed.process_id < distributed.num_processes:
      raise UserError(f"config.distributed.process_id={distributed.process_id} is outside "
                      f"0..{distributed.num_processes - 1}")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator_env():
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=distributed.coordinator_address,
                               num_processes=distributed.num_processes, process_id=distributed.process_id,
                               heartbeat_timeout_seconds=distributed.heartbeat_timeout)
  else:
    jax.distributed.initialize(heartbeat_timeout_seconds=distributed.heartbeat_timeout)
  return True


def _has_accelerator_env() -> bool:
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CUDA_VISIBLE_DEVICES"))


def process_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> slice:
  """The contiguous block of batch rows [B ...] that this process's devices hold under `sharding`."""
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    rows = index[0] if index else slice(None)
    starts.append(rows.start or 0)
    stops.append(global_shape[0] if rows.stop is None else rows.stop)
  start, stop = min(starts), max(stops)
  covered = np.zeros(global_shape[0], bool)
  for a, b in zip(starts, stops):
    covered[a:b] = True
  if not covered[start:stop].all():
    raise UserError("this process's batch rows are not contiguous on the mesh; order devices by process")
  return slice(start, stop)
