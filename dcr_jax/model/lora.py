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
  """Adds A [in r] (small random) and B [r out] (zeros) to every targeted projection; returns how many.

  Stacked projections (`scan_layers`, kernel [L in out]) get stacked adapters drawn in the same order as per-layer
  ones, so a scanned and an unscanned model start from the same adapters.
  """
  found = list(_targets(model, targets))
  layers = found[0][1].kernel.shape[0] if found and found[0][1].kernel.ndim == 3 else None
  init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
  draws: dict[int, list] = {id(dense): [] for _, dense in found}
  for _ in range(layers or 1):  # per-layer order: layer 0's projections, then layer 1's, ...
    for _, dense in found:
      d_in = dense.kernel.shape[-2]
      draws[id(dense)].append(init(rngs.params(), (d_in, rank), dense.kernel.dtype))
  for _, dense in found:
    *lead, d_in, d_out = dense.kernel.shape
    *lead_axes, in_axis, out_axis = dense.kernel.logical_axes
    a = jnp.stack(draws[id(dense)]) if lead else draws[id(dense)][0]
    dense.lora_a = LoRAParam(a, logical_axes=(*lead_axes, in_axis, None))
    dense.lora_b = LoRAParam(jnp.zeros((*lead, rank, d_out), dense.kernel.dtype),
                             logical_axes=(*lead_axes, None, out_axis))
    dense.lora_scale = alpha / rank
  return len(found) * (layers or 1)


def merged_kernel(dense: Dense) -> jax.Array:
  """The kernel with its adapter folded in: W + A B · alpha/r."""
  kernel = dense.kernel[...]
  if dense.lora_a is None:
    return kernel
  delta = (dense.lora_a[...].astype(jnp.float32) @ dense.lora_b[...].astype(jnp.float32)) * dense.lora_scale
  return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
