"""Load decoder params from GGUF or HF safetensors straight into place, and export to HF safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from tqdm.auto import tqdm

from dcr_jax.errors import UserError
from dcr_jax.model import Decoder, ModelConfig
from dcr_jax.model.decoder import unstack_layers
from dcr_jax.model.lora import merged_kernel
from dcr_jax.weights import hf_config
from dcr_jax.weights.sources import GGUFSource, SafetensorsSource, aligned_empty
from dcr_jax.weights.tables import LINEAR, NORM, Entry, weight_table

# place(path, logical_axes, shape=...) -> where the tensor goes; None puts it on the default device
Placement = Callable[..., jax.sharding.Sharding] | None


def abstract_model(cfg: ModelConfig) -> Decoder:
  """The decoder with shapes only: no parameter memory is allocated."""
  return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def unpermute_heads(rows: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation ([out ...], out = heads * H): within each head it stores the rows of the
  two RoPE halves interleaved (pairs), ours keep them as two blocks (rotate-half)."""
  half = rows.shape[0] // heads // 2
  return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _to_ours(raw, entry: Entry, *, from_gguf: bool, permuted: bool, cfg: ModelConfig):
  if permuted and entry.heads:
    raw = unpermute_heads(raw, getattr(cfg, entry.heads))
  if entry.kind == LINEAR:
    raw = raw.T
  if entry.kind == NORM and from_gguf and cfg.norm_scale_offset == 1.0:
    raw = raw - 1.0  # llama.cpp stores Gemma's (1 + w)
  return raw


def load_params(cfg: ModelConfig, source: GGUFSource | SafetensorsSource, *, place: Placement = None,
                progress: bool = True) -> Decoder:
  """A Decoder whose params are read one tensor at a time from `source` and put directly where `place` says.

  With `cfg.scan_layers` each stacked weight [L ...] is filled layer by layer in one aligned host buffer and placed
  once, so the per-layer and stacked copies of the model never coexist; a CPU device adopts such a buffer (and a
  GGUF tensor's) without copying it.
  """
  graphdef, state = nnx.split(abstract_model(cfg))
  variables = dict(nnx.to_flat_state(state))
  flat = {path: var.get_value() for path, var in variables.items()}
  from_gguf = isinstance(source, GGUFSource)
  permuted = from_gguf and source.architecture in hf_config.GGUF_PERMUTED_QK
  per_layer = cfg.replace(scan_layers=False)

  def read(entry: Entry, shape: tuple[int, ...]) -> np.ndarray:
    """One source tensor in our layout, after checking its shape against ours."""
    name = entry.gguf if from_gguf else entry.hf
    raw = source.get(name)
    wanted = shape[::-1] if entry.kind == LINEAR else shape
    if tuple(raw.shape) != wanted:
      heads = f" ({entry.heads}={getattr(cfg, entry.heads)} x head_dim={cfg.head_dim})" if entry.heads else ""
      raise UserError(f"{source.path}: tensor {name!r} has shape {tuple(raw.shape)}, expected {wanted}{heads} "
                      "for this config")
    return _to_ours(raw, entry, from_gguf=from_gguf, permuted=permuted, cfg=per_layer)

  groups: dict[tuple, list[Entry]] = {}  # our path -> its entries (one per layer when stacked)
  for entry in weight_table(per_layer):
    stacked = cfg.scan_layers and entry.path[0] == "layers"
    groups.setdefault(("layers", *entry.path[2:]) if stacked else entry.path, []).append(entry)
  for path, entries in tqdm(groups.items(), desc=f"loading {source.path.name}", disable=not progress, leave=False):
    expected = flat[path]
    if len(entries) == 1 and not (cfg.scan_layers and path[0] == "layers"):
      value = read(entries[0], tuple(expected.shape)).astype(expected.dtype, copy=False)
    else:
      value = aligned_empty(expected.shape, expected.dtype)
      for layer, entry in enumerate(entries):
        value[layer] = read(entry, tuple(expected.shape[1:]))
    target = place(path, variables[path].logical_axes, shape=expected.shape) if place else None
    flat[path] = jax.device_put(value, target)
  missing = [p for p, v in flat.items() if isinstance(v, jax.ShapeDtypeStruct)]
  if missing:
    raise UserError(f"{source.path}: no source tensor for parameters {missing[:3]}")
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  return nnx.merge(graphdef, state)


def _module_at(model: Decoder, path: tuple):
  for key in path:
    model = model[key] if isinstance(key, int) else getattr(model, key)
  return model


def merged_params(model: Decoder, merge: bool = True) -> Iterator[tuple[Entry, jax.Array]]:
  """Every parameter of `model` (layers unstacked) in weight-table order, in our layout, with LoRA folded into its
  kernel when `merge` (else the bare kernel): device arrays, each sharded as the model holds it."""
  model = unstack_layers(model)
  for entry in weight_table(model.config):
    module, leaf = _module_at(model, entry.path[:-1]), entry.path[-1]
    yield entry, merged_kernel(module) if leaf == "kernel" and merge else getattr(module, leaf)[...]


def lora_adapters(model: Decoder) -> Iterator[tuple[Entry, jax.Array, jax.Array, float]]:
  """(entry, A [in r], B [r out], alpha/r) of every projection of `model` (layers unstacked) that carries LoRA."""
  model = unstack_layers(model)
  for entry in weight_table(model.config):
    module = _module_at(model, entry.path[:-1])
    if entry.path[-1] == "kernel" and module.lora_a is not None:
      yield entry, module.lora_a[...], module.lora_b[...], float(module.lora_scale)


def hf_layout(entry: Entry, value: np.ndarray) -> np.ndarray:
  """Our [in out] kernels as HF's [out in]; everything else as is."""
  return np.ascontiguousarray(value.T if entry.kind == LINEAR else value)


def permute_heads(rows: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's q/k row permutation (the inverse of `unpermute_heads`): each head's two RoPE halves interleaved."""
  half = rows.shape[0] // heads // 2
  return rows.reshape(heads, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def export_hf(model: Decoder, directory: str | Path) -> Path:
  """Writes config.json + model.safetensors that transformers' *ForCausalLM loads (LoRA merged in)."""
  from safetensors.numpy import save_file

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = {entry.hf: hf_layout(entry, np.asarray(jax.device_get(value), dtype=np.float32))
             for entry, value in merged_params(model)}
  save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
  (directory / "config.json").write_text(json.dumps(hf_config.to_hf_config(model.config), indent=2))
  return directory
