"""GGUF out, with the `gguf` package's writer and llama.cpp's conventions: its tensor names (tables.py), Gemma norms
stored as w + 1, Llama q/k rows permuted, a tied head written as no output.weight, Llama 3 RoPE scaling as
rope_freqs, and the tokenizer (vocabulary, merges or scores, special ids, chat template) in the metadata.

The file is streamed: header and tensor infos from the shapes, then one tensor at a time, so process 0 never holds
more than one tensor of the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import gguf
import jax
import numpy as np
from flax import nnx
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

from dcr_jax.errors import UserError
from dcr_jax.model import Decoder
from dcr_jax.model.config import pattern_layer_types
from dcr_jax.model.layers import llama3_inverse_frequencies, rope_inverse_frequencies
from dcr_jax.weights import hf_config
from dcr_jax.weights.loader import abstract_model, hf_layout, merged_params, permute_heads
from dcr_jax.weights.tables import LINEAR, NORM, weight_table
from dcr_jax.weights.tokenizer import encode_chat, special_ids

Q = gguf.GGMLQuantizationType
QUANTS = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}  # --quant -> the type of 2-D weights (vectors stay F32)
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
ARCH_OF_FAMILY = {**{family: arch for arch, family in hf_config.GGUF_ARCHITECTURES.items()}, "mistral": "llama"}
GEMMA_ONLY_FIELDS = ("sliding_window", "attn_logit_softcap", "final_logit_softcap")  # llama.cpp reads them for Gemma
GEMMA_QUERY_SCALAR = 256  # what transformers' GGUF reader and ours assume for Gemma 2/3 (no GGUF key holds it)
GEMMA3_LOCAL_THETA = 10_000.0  # llama.cpp's fixed RoPE base of Gemma 3's sliding layers
PAD_TOKEN = "[PAD{}]"  # llama.cpp's filler for vocabulary rows the tokenizer does not use
DEFAULT_PRE = "gpt-2"  # llama.cpp's name for GPT-2's own split (a plain ByteLevel pre-tokenizer)
T = gguf.TokenType


def gguf_file_name(quant: str) -> str:
  """The file name of an export: model-<quant>.gguf."""
  return f"model-{quant}.gguf"


def check_expressible(cfg) -> None:
  """A one-line UserError when GGUF readers (llama.cpp, transformers, ours) would rebuild a different model."""
  period = hf_config.FAMILY_DEFAULTS[cfg.family]["period"]
  problem = None
  if cfg.family not in ARCH_OF_FAMILY:
    problem = f"family {cfg.family!r} has no GGUF architecture"
  elif period and tuple(cfg.layer_types) != pattern_layer_types(cfg.num_layers, period):
    problem = f"layer types {cfg.layer_types} differ from llama.cpp's fixed pattern (every {period}th global)"
  elif cfg.family in ("gemma2", "gemma3") and cfg.query_pre_attn_scalar != GEMMA_QUERY_SCALAR:
    problem = f"query_pre_attn_scalar={cfg.query_pre_attn_scalar} (GGUF readers assume {GEMMA_QUERY_SCALAR})"
  elif cfg.family == "gemma3" and cfg.rope_theta_local != GEMMA3_LOCAL_THETA:
    problem = f"rope_theta_local={cfg.rope_theta_local} (llama.cpp fixes {GEMMA3_LOCAL_THETA:g})"
  elif cfg.family in ("qwen2", "qwen3") and "local" in cfg.layer_types:
    problem = "sliding-window layers (llama.cpp has no window for this architecture)"
  if problem:
    raise UserError(f"--format=gguf: this {cfg.family} model has {problem}; export it with --format=hf")


def _metadata(writer: gguf.GGUFWriter, cfg, arch: str, name: str, quant: str) -> dict[str, np.ndarray]:
  """Architecture key/values (GGUF_FIELDS read backwards); returns extra tensors (rope_freqs for Llama 3 RoPE)."""
  writer.add_name(name)
  writer.add_file_type(FILE_TYPES[quant])
  gemma = cfg.family in hf_config.GEMMA_FAMILIES
  for field, key in hf_config.GGUF_FIELDS.items():
    value = getattr(cfg, field)
    if value is None or field == "rope_scale_global" or (field in GEMMA_ONLY_FIELDS and not gemma):
      continue
    writer.add_key_value(f"{arch}.{key}", value, gguf.GGUFValueType.FLOAT32 if isinstance(value, float)
                         else gguf.GGUFValueType.UINT32)
  writer.add_value_length(cfg.head_dim)
  writer.add_vocab_size(cfg.vocab_size)
  if not gemma:
    writer.add_rope_dimension_count(cfg.head_dim)
  if cfg.rope_scale_global == 1.0:
    return {}
  if cfg.rope_type == "llama3":
    factors = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta_global, 1.0) / llama3_inverse_frequencies(
        cfg.head_dim, cfg.rope_theta_global, cfg.rope_scale_global, cfg.rope_low_freq_factor,
        cfg.rope_high_freq_factor, cfg.rope_original_max_positions)
    return {hf_config.GGUF_ROPE_FREQS: np.asarray(factors, np.float32)}
  writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
  writer.add_rope_scaling_factor(cfg.rope_scale_global)
  return {}


def _pre_tokenizer(data: dict) -> str:
  """llama.cpp's pre-tokenizer name for a byte-level tokenizer.json: its Split regex looked up in transformers'
  table of llama.cpp names, or gpt-2 for a plain ByteLevel split."""
  pre = data.get("pre_tokenizer") or {}
  if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
    return DEFAULT_PRE
  splits = [p["pattern"].get("Regex") for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
  names = [name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if splits == [regex]]
  if not names:
    raise UserError("--format=gguf: the tokenizer's pre-tokenizer matches none llama.cpp knows; export --format=hf")
  return names[0]


def _vocabulary(tokenizer, vocab_size: int, gemma: bool) -> tuple[dict, list[str], list[int], dict]:
  """(tokenizer.json, tokens by id, token types, the fields the model type needs) of an HF fast tokenizer."""
  data = json.loads(tokenizer.backend_tokenizer.to_str())
  model = data["model"]
  if model["type"] != "BPE":
    raise UserError(f"--format=gguf: a {model['type']} tokenizer has no GGUF writer here; export --format=hf")
  by_id = {i: t for t, i in model["vocab"].items()}
  by_id.update({a["id"]: a["content"] for a in data["added_tokens"]})
  size = max(vocab_size, max(by_id) + 1)
  tokens = [by_id.get(i, PAD_TOKEN.format(i)) for i in range(size)]
  added = {a["id"]: a["special"] for a in data["added_tokens"]}
  types = [T.UNUSED if i not in by_id else T.CONTROL if added.get(i) else T.USER_DEFINED if i in added
           else T.NORMAL for i in range(size)]
  if model.get("byte_fallback"):  # sentencepiece-style: llama.cpp's "llama" model ranks merges by score
    types = [T.BYTE if t.startswith("<0x") and len(t) == 6 and ty == T.NORMAL else ty for t, ty in zip(tokens, types)]
    if gemma:  # Gemma's files spell whitespace-run tokens with real spaces (transformers respells them on load)
      tokens = [" " * len(t) if len(t) > 1 and not t.strip("\u2581") else t for t in tokens]
    fields = {"model": "llama", "scores": [-float(i) for i in range(size)]}
  else:
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    fields = {"model": "gpt2", "pre": _pre_tokenizer(data), "merges": merges}
  if tokenizer.unk_token_id is not None:
    types[tokenizer.unk_token_id] = T.UNKNOWN
  return data, tokens, [int(t) for t in types], fields


def _tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, gemma: bool, source: Path | None) -> None:
  """tokenizer.* key/values: copied from the source GGUF when the model came from one (the exact vocabulary llama.cpp
  had), else built from the HF tokenizer; the chat template and end-of-turn id always from `tokenizer`."""
  if source is not None:
    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
      if key.startswith("tokenizer.") and key != gguf.Keys.Tokenizer.CHAT_TEMPLATE:
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1] if array else None)
  else:
    _, tokens, types, fields = _vocabulary(tokenizer, vocab_size, gemma)
    writer.add_tokenizer_model(fields["model"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if "pre" in fields:
      writer.add_tokenizer_pre(fields["pre"])
      writer.add_token_merges(fields["merges"])
    else:
      writer.add_token_scores(fields["scores"])
      writer.add_add_space_prefix(False)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
      if token_id is not None:
        add(token_id)
    first = tokenizer.encode("a")[:1]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and first == [tokenizer.bos_token_id])
  if tokenizer.chat_template:
    writer.add_chat_template(tokenizer.chat_template)
    end_of_turn = encode_chat(tokenizer, "", "x")[0][-1]
    if end_of_turn != tokenizer.eos_token_id and end_of_turn in special_ids(tokenizer):
      writer.add_eot_token_id(end_of_turn)


def _tensor_type(shape: tuple[int, ...], quant: str) -> gguf.GGMLQuantizationType:
  """llama.cpp's rule: vectors F32; matrices the asked type, Q8_0 falling back to F16 for rows not in blocks of 32."""
  if len(shape) == 1:
    return Q.F32
  block = gguf.GGML_QUANT_SIZES[QUANTS[quant]][0]
  return QUANTS[quant] if shape[-1] % block == 0 else Q.F16


def _encode(values: np.ndarray, kind: gguf.GGMLQuantizationType) -> np.ndarray:
  values = np.ascontiguousarray(values, dtype=np.float32)
  if kind == Q.F32:
    return values
  return values.astype(np.float16) if kind == Q.F16 else gguf.quants.quantize(values, kind)


def _gguf_layout(entry, value: np.ndarray, cfg, permuted: bool) -> np.ndarray:
  value = hf_layout(entry, np.asarray(value, np.float32))
  if permuted and entry.heads:
    value = permute_heads(value, getattr(cfg, entry.heads))
  if entry.kind == NORM and cfg.norm_scale_offset == 1.0:
    value = value + 1.0  # llama.cpp stores Gemma's (1 + w)
  return value


def write_gguf(model: Decoder, tokenizer, path: str | Path, quant: str, *, name: str, source: Path | None = None,
               fetch: Callable[[jax.Array, bool], np.ndarray | None]) -> Path:
  """Writes `model` (LoRA merged) as one GGUF file at `path` (process 0 writes; every process must call it, since
  `fetch(value, keep)` may gather a tensor sharded over processes). `source`: the GGUF the model was loaded from,
  whose tokenizer metadata is copied."""
  if quant not in QUANTS:
    raise UserError(f"--quant={quant} is a type the GGUF writer cannot produce; choose {', '.join(QUANTS)}")
  cfg = model.config.replace(scan_layers=False)
  check_expressible(cfg)
  arch = ARCH_OF_FAMILY[cfg.family]
  permuted = arch in hf_config.GGUF_PERMUTED_QK
  main = jax.process_index() == 0
  writer = gguf.GGUFWriter(path, arch) if main else None
  if main:
    extra = _metadata(writer, cfg, arch, name, quant)
    _tokenizer(writer, tokenizer, cfg.vocab_size, cfg.family in hf_config.GEMMA_FAMILIES, source)
    shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract_model(cfg)))}
    for entry in weight_table(cfg):
      shape = tuple(shapes[entry.path])[::-1] if entry.kind == LINEAR else tuple(shapes[entry.path])
      kind = _tensor_type(shape, quant)
      _add_info(writer, entry.gguf, shape, kind)
    for tensor_name, values in extra.items():
      _add_info(writer, tensor_name, values.shape, Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
  for entry, value in merged_params(model):
    host = fetch(value, main)
    if main:
      host = _gguf_layout(entry, host, cfg, permuted)
      writer.write_tensor_data(_encode(host, _tensor_type(host.shape, quant)))
  if main:
    for values in extra.values():
      writer.write_tensor_data(values)
    writer.close()
  return Path(path)


def _add_info(writer: gguf.GGUFWriter, tensor_name: str, shape: tuple[int, ...], kind) -> None:
  if kind in (Q.F32, Q.F16):
    dtype = np.float32 if kind == Q.F32 else np.float16
    writer.add_tensor_info(tensor_name, shape, np.dtype(dtype), math.prod(shape) * np.dtype(dtype).itemsize)
  else:
    byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
    writer.add_tensor_info(tensor_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=kind)
