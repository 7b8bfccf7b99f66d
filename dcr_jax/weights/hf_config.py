"""ModelConfig <-> Hugging Face config.json and GGUF metadata, as field tables."""

from __future__ import annotations

from dcr_jax.errors import UserError
from dcr_jax.model.config import ModelConfig, pattern_layer_types

HF_MODEL_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
HF_ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
FAMILY_OF_MODEL_TYPE = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}

# ModelConfig field <- HF config key
HF_FIELDS = {
    "vocab_size": "vocab_size", "embed_dim": "hidden_size", "mlp_dim": "intermediate_size",
    "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim", "norm_eps": "rms_norm_eps", "sliding_window": "sliding_window",
    "query_pre_attn_scalar": "query_pre_attn_scalar", "attn_logit_softcap": "attn_logit_softcapping",
    "final_logit_softcap": "final_logit_softcapping", "max_position_embeddings": "max_position_embeddings",
}

# ModelConfig field <- GGUF key (after "<arch>.")
GGUF_FIELDS = {
    "embed_dim": "embedding_length", "mlp_dim": "feed_forward_length", "num_layers": "block_count",
    "num_heads": "attention.head_count", "num_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
    "norm_eps": "attention.layer_norm_rms_epsilon", "sliding_window": "attention.sliding_window",
    "attn_logit_softcap": "attn_logit_softcapping", "final_logit_softcap": "final_logit_softcapping",
    "rope_theta_global": "rope.freq_base", "rope_scale_global": "rope.scaling.factor",
    "max_position_embeddings": "context_length",
}
GGUF_ARCHITECTURES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3"}

FAMILY_DEFAULTS = {
    "gemma": dict(use_post_norms=False, use_qk_norm=False, period=None),
    "gemma2": dict(use_post_norms=True, use_qk_norm=False, period=2, attn_logit_softcap=50.0,
                   final_logit_softcap=30.0, sliding_window=4096, query_pre_attn_scalar=256),
    "gemma3": dict(use_post_norms=True, use_qk_norm=True, period=6, rope_theta_global=1_000_000.0,
                   rope_theta_local=10_000.0, query_pre_attn_scalar=256, sliding_window=4096),
}


def _assemble(family: str, fields: dict, layer_types=None) -> ModelConfig:
  defaults = dict(FAMILY_DEFAULTS[family])
  period = defaults.pop("period")
  values = {**defaults, **{k: v for k, v in fields.items() if v is not None}}
  n = values["num_layers"]
  if layer_types is None:
    layer_types = ("global",) * n if period is None else pattern_layer_types(n, period)
  return ModelConfig(family=family, layer_types=tuple(layer_types), **values)


def from_hf_config(hf: dict, where: str) -> ModelConfig:
  """Our config from a transformers config.json dict (Gemma 1/2/3 text, or the text part of Gemma 3 multimodal)."""
  hf = hf.get("text_config", hf) if hf.get("model_type") == "gemma3" else hf
  model_type = hf.get("model_type")
  if model_type not in FAMILY_OF_MODEL_TYPE:
    raise UserError(f"{where}: model_type {model_type!r} is not supported; expected one of "
                    f"{', '.join(sorted(FAMILY_OF_MODEL_TYPE))}")
  family = FAMILY_OF_MODEL_TYPE[model_type]
  fields = {ours: hf.get(theirs) for ours, theirs in HF_FIELDS.items()}
  fields["tie_embeddings"] = hf.get("tie_word_embeddings", True)
  rope = hf.get("rope_parameters") or {}
  if "full_attention" in rope:  # transformers 5: per-layer-type rope parameters
    fields["rope_theta_global"] = rope["full_attention"].get("rope_theta")
    fields["rope_scale_global"] = rope["full_attention"].get("factor") if rope["full_attention"].get(
        "rope_type") == "linear" else None
    fields["rope_theta_local"] = (rope.get("sliding_attention") or {}).get("rope_theta")
  else:
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    fields["rope_theta_global"] = theta
    fields["rope_theta_local"] = hf.get("rope_local_base_freq", theta if family != "gemma3" else None)
    scaling = hf.get("rope_scaling") or {}
    fields["rope_scale_global"] = scaling.get("factor") if scaling.get("rope_type") == "linear" else None
  layer_types = hf.get("layer_types")
  if layer_types is not None:
    layer_types = tuple("local" if t == "sliding_attention" else "global" for t in layer_types)
  elif family == "gemma3" and hf.get("sliding_window_pattern"):
    layer_types = pattern_layer_types(fields["num_layers"], hf["sliding_window_pattern"])
  if fields["head_dim"] is None:
    fields["head_dim"] = fields["embed_dim"] // fields["num_heads"]
  return _assemble(family, fields, layer_types)


def to_hf_config(cfg: ModelConfig) -> dict:
  """A config.json dict that transformers loads into the matching *ForCausalLM."""
  if cfg.family not in HF_MODEL_TYPES:
    raise UserError(f"export: family {cfg.family!r} has no Hugging Face mapping")
  out = {theirs: getattr(cfg, ours) for ours, theirs in HF_FIELDS.items()}
  out.update(model_type=HF_MODEL_TYPES[cfg.family], architectures=[HF_ARCHITECTURES[cfg.family]],
             tie_word_embeddings=cfg.tie_embeddings, hidden_activation="gelu_pytorch_tanh",
             hidden_act="gelu_pytorch_tanh", torch_dtype=cfg.param_dtype, pad_token_id=0, bos_token_id=2,
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
    out["layer_types"] = ["sliding_attention" if t == "local" else "full_attention" for t in cfg.layer_types]
  return out


def from_gguf_metadata(meta: dict, where: str) -> ModelConfig:
  """Our config from GGUF key/values (architecture gemma, gemma2 or gemma3)."""
  arch = meta.get("general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise UserError(f"{where}: GGUF architecture {arch!r} is not supported; expected one of "
                    f"{', '.join(GGUF_ARCHITECTURES)}")
  family = GGUF_ARCHITECTURES[arch]
  fields = {ours: meta.get(f"{arch}.{key}") for ours, key in GGUF_FIELDS.items()}
  fields["vocab_size"] = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
  if family == "gemma":
    fields["rope_theta_local"] = fields["rope_theta_global"]
  return _assemble(family, fields)
