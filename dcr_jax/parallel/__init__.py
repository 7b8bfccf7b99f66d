"""Parallelism: the ('data', 'fsdp', 'tensor') mesh, logical-axis rules and the shardings they give."""

from dcr_jax.parallel.distributed import initialize, on_tpu_pod, process_rows
from dcr_jax.parallel.mesh import MESH_AXES, make_mesh
from dcr_jax.parallel.sharding import (
    LOGICAL_RULES,
    activation_constraint,
    batch_sharding,
    local_batch_to_global,
    logical_to_spec,
    param_sharding,
    placement,
    shard_pytree,
    state_shardings,
)

__all__ = ["initialize", "on_tpu_pod", "process_rows", "MESH_AXES", "make_mesh", "LOGICAL_RULES", "logical_to_spec", "param_sharding", "placement",
           "state_shardings", "shard_pytree", "batch_sharding", "activation_constraint", "local_batch_to_global"]
