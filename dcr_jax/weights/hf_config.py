"""ModelConfig <-> Hugging Face config.json and GGUF metadata, as field tables."""

from __future__ import annotations

import numpy as np

from dcr_jax.errors import UserError
from dcr_jax.model.config import SILU_FAMILIES, ModelConfig, pattern_layer_types
from dcr_jax.model.layers import llama3_inverse_frequencies, rope_inverse_frequencies

HF_MODEL_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text", "llama": "llama",
                  "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
HF_ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM"}
FAMILY_OF_MODEL_TYPE = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3",
                        "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3")

# ModelConfig field <- HF config key
HF_FIELDS = {
    "vocab_size": "vocab_size", "embed_dim": "hidden_size", "mlp_dim": "intermediate_size",
    "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim", "norm_eps": "rms_norm_eps", "sliding_window": "sliding_window",
    "query_pre_attn_scalar": "query_pre_attn_scalar", "attn_logit_softcap": "attn_logit_softcapping",
    "final_logit_softcap": "final_logit_softcapping", "max_position_embeddings": "max_position_embeddings",
}
# ModelConfig field <- key of HF rope parameters (rope_parameters, or the older rope_scaling)
HF_ROPE_FIELDS = {"rope_scale_global": "factor", "rope_low_freq_factor": "low_freq_factor",
                  "rope_high_freq_factor": "high_freq_factor",
                  "rope_original_max_positions": "original_max_position_embeddings"}
HF_ROPE_TYPES = {"default": None, "linear": "linear", "llama3": "llama3"}  # HF rope_type -> ours

# ModelConfig field <- GGUF key (after "<arch>.")
GGUF_FIELDS = {
    "embed_dim": "embedding_length", "mlp_dim": "feed_forward_length", "num_layers": "block_count",
    "num_heads": "attention.head_count", "num_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
    "norm_eps": "attention.layer_norm_rms_epsilon", "sliding_window": "attention.sliding_window",
    "attn_logit_softcap": "attn_logit_softcapping", "final_logit_softcap": "final_logit_softcapping",
    "rope_theta_global": "rope.freq_base", "rope_scale_global": "rope.scaling.factor",
    "max_position_embeddings": "context_length",
}
GGUF_ARCHITECTURES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "llama": "llama", "qwen2": "qwen2",
                      "qwen3": "qwen3"}
GGUF_PERMUTED_QK = {"llama"}  # llama.cpp interleaves the two RoPE halves of each q/k head for these architectures
GGUF_ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's form of Llama 3.1 RoPE scaling: a divisor per frequency

FAMILY_DEFAULTS = {
    "gemma": dict(use_post_norms=False, use_qk_norm=False, period=None, tie_embeddings=True),
    "gemma2": dict(use_post_norms=True, use_qk_norm=False, period=2, attn_logit_softcap=50.0,
                   final_logit_softcap=30.0, sliding_window=4096, query_pre_attn_scalar=256, tie_embeddings=True),
    "gemma3": dict(use_post_norms=True, use_qk_norm=True, period=6, rope_theta_global=1_000_000.0,
                   rope_theta_local=10_000.0, query_pre_attn_scalar=256, sliding_window=4096, tie_embeddings=True),
    "llama": dict(SILU_FAMILIES, period=None, tie_embeddings=False, norm_eps=1e-6),
    "mistral": dict(SILU_FAMILIES, period=None, tie_embeddings=False, norm_eps=1e-6),
    "qwen2": dict(SILU_FAMILIES, period=None, tie_embeddings=False, norm_eps=1e-6, qkv_bias=True),
    "qwen3": dict(SILU_FAMILIES, period=None, tie_embeddings=False, norm_eps=1e-6, use_qk_norm=True),
}


def _assemble(family: str, fields: dict, layer_types=None) -> ModelConfig:
  defaults = dict(FAMILY_DEFAULTS[family])
  period = defaults.pop("period")
  values = {**defaults, **{k: v for k, v in fields.items() if v is not None}}
  n = values["num_layers"]
  if layer_types is None:
    layer_types = ("global",) * n if period is None else pattern_layer_types(n, period)
  if family not in GEMMA_FAMILIES:
    values["rope_theta_local"] = values.get("rope_theta_global", 10_000.0)
    if "local" not in layer_types:
      values["sliding_window"] = None
  return ModelConfig(family=family, layer_types=tuple(layer_types), **values)


def _rope_from_hf(hf: dict, family: str, where: str) -> dict:
  """RoPE fields from rope_parameters (transformers 5, per layer type for Gemma 3) or rope_theta + rope_scaling."""
  params = hf.get("rope_parameters") or {}
  if "full_attention" in params:
    full, local = params["full_attention"], params.get("sliding_attention") or {}
  else:
    full = {"rope_theta": hf.get("rope_theta"), **(hf.get("rope_scaling") or {}), **params}
    local = {"rope_theta": hf.get("rope_local_base_freq", full["rope_theta"] if family != "gemma3" else None)}
  kind = full.get("rope_type", full.get("type", "default"))
  if kind not in HF_ROPE_TYPES:
    raise UserError(f"{where}: rope_type {kind!r} is not supported; expected one of {', '.join(HF_ROPE_TYPES)}")
  out = {"rope_theta_global": full.get("rope_theta"), "rope_theta_local": local.get("rope_theta")}
  if HF_ROPE_TYPES[kind]:
    out["rope_type"] = HF_ROPE_TYPES[kind]
    out.update({ours: full.get(theirs) for ours, theirs in HF_ROPE_FIELDS.items()})
  return out


def _layer_types_from_hf(hf: dict, family: str, num_layers: int):
  """Per-layer attention kinds: config.json's layer_types, else each family's rule (None: the family default)."""
  if hf.get("layer_types") is not None:
    return tuple("local" if t == "sliding_attention" else "global" for t in hf["layer_types"])
  if family == "gemma3" and hf.get("sliding_window_pattern"):
    return pattern_layer_types(num_layers, hf["sliding_window_pattern"])
  if family == "mistral":
    return ("local" if hf.get("sliding_window") else "global",) * num_layers
  if family in ("qwen2", "qwen3"):
    first = hf.get("max_window_layers", num_layers) if hf.get("use_sliding_window") else num_layers
    return tuple("local" if i >= first else "global" for i in range(num_layers))
  return None


def from_hf_config(hf: dict, where: str) -> ModelConfig:
  """Our config from a transformers config.json dict: Gemma 1/2/3 (text, or the text part of Gemma 3 multimodal),
  Llama, Mistral, Qwen2/2.5 or Qwen3."""
  hf = hf.get("text_config", hf) if hf.get("model_type") == "gemma3" else hf
  model_type = hf.get("model_type")
  if model_type not in FAMILY_OF_MODEL_TYPE:
    raise UserError(f"{where}: model_type {model_type!r} is not supported; expected one of "
                    f"{', '.join(sorted(FAMILY_OF_MODEL_TYPE))}")
  family = FAMILY_OF_MODEL_TYPE[model_type]
  if hf.get("mlp_bias"):
    raise UserError(f"{where}: mlp_bias=true is not supported (no published {family} checkpoint uses it)")
  fields = {ours: hf.get(theirs) for ours, theirs in HF_FIELDS.items()}
  fields["tie_embeddings"] = hf.get("tie_word_embeddings")
  fields.update(_rope_from_hf(hf, family, where))
  if hf.get("attention_bias"):  # Llama / Qwen3 flag: biases on q, k, v and o
    fields.update(qkv_bias=True, o_bias=True)
  if fields["head_dim"] is None:
    fields["head_dim"] = fields["embed_dim"] // fields["num_heads"]
  if fields["num_kv_heads"] is None:
    fields["num_kv_heads"] = fields["num_heads"]
  layer_types = _layer_types_from_hf(hf, family, fields["num_layers"])
  if (family not in GEMMA_FAMILIES and layer_types and "local" in layer_types
      and fields.get("rope_scale_global") not in (None, 1.0)):
    raise UserError(f"{where}: RoPE scaling together with sliding-window layers is not supported for {family}")
  return _assemble(family, fields, layer_types)


def _rope_to_hf(cfg: ModelConfig) -> dict:
  if cfg.rope_scale_global == 1.0:
    return {"rope_type": "default", "rope_theta": cfg.rope_theta_global}
  out = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta_global}
  fields = HF_ROPE_FIELDS if cfg.rope_type == "llama3" else {"rope_scale_global": "factor"}
  out.update({theirs: getattr(cfg, ours) for ours, theirs in fields.items()})
  return out


def to_hf_config(cfg: ModelConfig) -> dict:
  """A config.json dict that transformers loads into the matching *ForCausalLM."""
  if cfg.family not in HF_MODEL_TYPES:
    raise UserError(f"export: family {cfg.family!r} has no Hugging Face mapping")
  out = {theirs: getattr(cfg, ours) for ours, theirs in HF_FIELDS.items()}
  out.update(model_type=HF_MODEL_TYPES[cfg.family], architectures=[HF_ARCHITECTURES[cfg.family]],
             tie_word_embeddings=cfg.tie_embeddings, torch_dtype=cfg.param_dtype)
  layer_types = ["sliding_attention" if t == "local" else "full_attention" for t in cfg.layer_types]
  if cfg.family not in GEMMA_FAMILIES:
    out = {k: v for k, v in out.items() if v is not None}
    out.update(hidden_act="silu", rope_parameters=_rope_to_hf(cfg), rope_theta=cfg.rope_theta_global)
    if cfg.family in ("llama", "qwen3"):
      out["attention_bias"] = cfg.o_bias
    if cfg.family in ("qwen2", "qwen3"):
      out.update(layer_types=layer_types, use_sliding_window="local" in cfg.layer_types,
                 max_window_layers=cfg.layer_types.index("local") if "local" in cfg.layer_types else cfg.num_layers)
    return out
  out.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh", pad_token_id=0, bos_token_id=2,
             eos_token_id=1)
  if cfg.family == "gemma3":
    full = {"rope_type": "default", "rope_theta": cfg.rope_theta_global}
    if cfg.rope_scale_global != 1.0:
      full = {"rope_type": "linear", "factor": cfg.rope_scale_global, "rope_theta": cfg.rope_theta_global}
    out["rope_parameters"] = {"full_attention": full,
                              "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta_local}}
  else:
    out["rope_theta"] = cfg.rope_theta_global
  if cfg.family != "gemma":
    out["layer_types"] = layer_types
  return out


def _llama3_from_freq_factors(factors: np.ndarray, theta: float, head_dim: int, where: str) -> dict:
  """The llama3 RoPE fields whose per-frequency divisors are `factors` (llama.cpp's rope_freqs tensor).

  The file stores only the divisors; the factor is their largest value and the other three are Llama 3.1's
  published ones (low 1, high 4, original 8192), checked against every divisor.
  """
  fields = dict(rope_type="llama3", rope_scale_global=float(factors.max()), rope_low_freq_factor=1.0,
                rope_high_freq_factor=4.0, rope_original_max_positions=8192)
  expected = rope_inverse_frequencies(head_dim, theta, 1.0) / llama3_inverse_frequencies(
      head_dim, theta, fields["rope_scale_global"], 1.0, 4.0, 8192)
  if factors.shape != expected.shape or not np.allclose(factors, np.asarray(expected), rtol=1e-4):
    raise UserError(f"{where}: tensor {GGUF_ROPE_FREQS!r} is not Llama 3.1 RoPE scaling (low 1, high 4, original "
                    "8192); convert the model with llama.cpp's current converter or load its HF directory")
  return fields


def from_gguf_metadata(meta: dict, where: str, tensor_names=("output.weight",), rope_freqs=None) -> ModelConfig:
  """Our config from GGUF key/values (architecture gemma, gemma2, gemma3, llama, qwen2 or qwen3).

  `tensor_names`: the file's tensors (no `output.weight` means a tied head); `rope_freqs`: its rope_freqs tensor.
  """
  arch = meta.get("general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise UserError(f"{where}: GGUF architecture {arch!r} is not supported; expected one of "
                    f"{', '.join(GGUF_ARCHITECTURES)}")
  family = GGUF_ARCHITECTURES[arch]
  fields = {ours: meta.get(f"{arch}.{key}") for ours, key in GGUF_FIELDS.items()}
  fields["vocab_size"] = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
  if family == "gemma":
    fields["rope_theta_local"] = fields["rope_theta_global"]
  if family not in GEMMA_FAMILIES:
    fields["tie_embeddings"] = "output.weight" not in tensor_names
    fields["head_dim"] = fields["head_dim"] or meta.get(f"{arch}.rope.dimension_count") or (
        fields["embed_dim"] // fields["num_heads"])
    fields["sliding_window"] = None  # llama.cpp does not apply a Qwen2 / Mistral window from the metadata
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
      raise UserError(f"{where}: {arch}.rope.scaling.type {scaling!r} is not supported; expected none or linear")
    if scaling == "none":
      fields["rope_scale_global"] = None
    if rope_freqs is not None:
      fields.update(_llama3_from_freq_factors(np.asarray(rope_freqs, np.float32),
                                              fields["rope_theta_global"] or 10_000.0, fields["head_dim"], where))
  return _assemble(family, fields)
