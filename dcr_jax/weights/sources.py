"""Tensor sources: a GGUF file (dequantized with `gguf`) or a Hugging Face safetensors directory."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np

from dcr_jax.errors import UserError

ALIGNMENT = 64  # bytes: XLA's CPU client adopts a host buffer this aligned instead of copying it


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
  """An uninitialised host array starting on an ALIGNMENT-byte boundary: `jax.device_put` onto a CPU device adopts
  it without a copy, so a loaded tensor never exists twice in host memory."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.empty(nbytes + ALIGNMENT, np.uint8)
  start = -raw.ctypes.data % ALIGNMENT
  return raw[start:start + nbytes].view(dtype).reshape(shape)


class GGUFSource:
  """Reads tensors of a GGUF file by name, dequantized to float32 in [out in] (torch) layout."""

  def __init__(self, path: str | Path):
    import gguf

    self.path = Path(path)
    if not self.path.is_file():
      raise UserError(f"{self.path}: GGUF file not found; pass an existing .gguf path")
    try:
      self.reader = gguf.GGUFReader(str(self.path))
    except Exception as e:  # the gguf package raises bare ValueErrors on bad magic/version
      raise UserError(f"{self.path}: not a readable GGUF file ({e})") from None
    self.tensors = {t.name: t for t in self.reader.tensors}
    arch = self.reader.fields.get("general.architecture")
    self.architecture = arch.contents() if arch is not None else None

  def metadata(self) -> dict:
    """Scalar and string fields; token arrays included (needed for the vocabulary)."""
    out = {}
    for key, field in self.reader.fields.items():
      if key.startswith("GGUF."):
        continue
      try:
        value = field.contents()
      except Exception:  # fields of an exotic type we never use
        continue
      out[key] = value
    return out

  CHUNK_VALUES = 1 << 22  # values dequantized at a time

  def get(self, name: str) -> np.ndarray:
    import gguf

    if name not in self.tensors:
      raise UserError(f"{self.path}: tensor {name!r} is missing; is this a GGUF of the expected architecture?")
    t = self.tensors[name]
    if t.data.ndim < 2:
      return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    first = np.asarray(gguf.quants.dequantize(t.data[:1], t.tensor_type), dtype=np.float32)
    out = aligned_empty((t.data.shape[0], *first.shape[1:]), np.float32)
    rows = max(1, self.CHUNK_VALUES // max(first.size, 1))
    for start in range(0, len(out), rows):  # in row chunks: dequantizing makes temporaries several times its output
      out[start:start + rows] = gguf.quants.dequantize(t.data[start:start + rows], t.tensor_type)
    self._release(t)
    return out

  def _release(self, tensor) -> None:
    """Drops the file pages of a read tensor from this process's resident memory (the OS page cache keeps them), so
    that loading never holds the mapped file beside the params it became."""
    mapped = getattr(self.reader.data, "_mmap", None)
    if mapped is None or not hasattr(mapped, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
      return
    start = tensor.data_offset - tensor.data_offset % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, start, tensor.data_offset + tensor.n_bytes - start)


class SafetensorsSource:
  """Reads tensors of an HF checkpoint directory (single or sharded safetensors), whatever the stored prefix."""

  PREFIXES = ("", "language_model.", "model.language_model.")  # plain / Gemma 3 multimodal (old and new layouts)

  def __init__(self, directory: str | Path):
    from safetensors import safe_open

    self.path = Path(directory)
    index = self.path / "model.safetensors.index.json"
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(p.name for p in self.path.glob("*.safetensors"))
    if not files:
      raise UserError(f"{self.path}: no *.safetensors files; pass an HF checkpoint directory")
    self.handles = {}
    self.location = {}
    for f in files:
      if not (self.path / f).is_file():
        raise UserError(f"{self.path / f}: shard listed in model.safetensors.index.json is missing")
      handle = safe_open(str(self.path / f), framework="flax")
      self.handles[f] = handle
      for key in handle.keys():
        self.location[key] = f
    self.prefix = next((p for p in self.PREFIXES if f"{p}model.embed_tokens.weight" in self.location or
                        f"{p}embed_tokens.weight" in self.location), "")
    # transformers 5 stores the multimodal text tower as model.language_model.{layers...} without a second "model."
    self.drop_model = f"{self.prefix}embed_tokens.weight" in self.location and self.prefix

  def _key(self, name: str) -> str:
    if self.drop_model and name.startswith("model."):
      name = name[len("model."):]
    if name == "lm_head.weight" and self.prefix:
      return name if name in self.location else self.prefix + name
    return self.prefix + name

  def get(self, name: str) -> np.ndarray:
    key = self._key(name)
    if key not in self.location:
      raise UserError(f"{self.path}: tensor {key!r} is missing from the checkpoint")
    return self.handles[self.location[key]].get_tensor(key)
