"""LoRA adapters on the decoder's Dense projections: attach, and merge into plain kernels for export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dcr_jax.errors import UserError
from dcr_jax.model.layers import Dense, LoRAParam

TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
           "down": "down_proj"}


def _targets(model: nnx.Module, targets):
  unknown = set(targets) - set(TARGETS)
  if unknown:
    raise UserError(f"align.lora_targets: unknown {sorted(unknown)}; choose among {', '.join(TARGETS)}")
  wanted = {TARGETS[t] for t in targets}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, Dense) and path and path[-1] in wanted:
      yield path, module


def attach_lora(model: nnx.Module, *, rank: int, alpha: float, targets, rngs: nnx.Rngs) -> int:
  """Adds A [in r] (small random) and B [r out] (zeros) to every targeted projection; returns how many."""
  count = 0
  for _, dense in _targets(model, targets):
    d_in, d_out = dense.kernel.shape
    a_axes = (dense.kernel.logical_axes[0], None)
    b_axes = (None, dense.kernel.logical_axes[1])
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
    dense.lora_a = LoRAParam(init(rngs.params(), (d_in, rank), dense.kernel.dtype), logical_axes=a_axes)
    dense.lora_b = LoRAParam(jnp.zeros((rank, d_out), dense.kernel.dtype), logical_axes=b_axes)
    dense.lora_scale = alpha / rank
    count += 1
  return count


def merged_kernel(dense: Dense) -> jax.Array:
  """The kernel with its adapter folded in: W + A B · alpha/r."""
  kernel = dense.kernel[...]
  if dense.lora_a is None:
    return kernel
  delta = (dense.lora_a[...].astype(jnp.float32) @ dense.lora_b[...].astype(jnp.float32)) * dense.lora_scale
  return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
