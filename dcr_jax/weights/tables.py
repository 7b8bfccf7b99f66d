"""Declarative weight-name tables: our parameter paths <-> Hugging Face names <-> GGUF names."""

from __future__ import annotations

import dataclasses

from dcr_jax.model.config import ModelConfig

EMBED = "embed"  # [V D] everywhere
LINEAR = "linear"  # HF and GGUF store [out in]; ours is [in out]
NORM = "norm"  # vector; llama.cpp stores Gemma norms as w + 1
BIAS = "bias"  # vector, stored as is


@dataclasses.dataclass(frozen=True)
class Entry:
  path: tuple  # our nnx state path, e.g. ("layers", 3, "attn", "q_proj", "kernel")
  hf: str
  gguf: str
  kind: str
  heads: str | None = None  # q/k rows: the config field counting their heads (llama.cpp permutes these rows)


# (our path under a block, HF name under model.layers.{i}, GGUF name under blk.{i}, kind, needs)
# `needs` names a config feature the row applies to; None applies always.
LAYER_ROWS = [
    ("pre_attn_norm.scale", "input_layernorm.weight", "attn_norm.weight", NORM, None),
    ("attn.q_proj.kernel", "self_attn.q_proj.weight", "attn_q.weight", LINEAR, None),
    ("attn.k_proj.kernel", "self_attn.k_proj.weight", "attn_k.weight", LINEAR, None),
    ("attn.v_proj.kernel", "self_attn.v_proj.weight", "attn_v.weight", LINEAR, None),
    ("attn.o_proj.kernel", "self_attn.o_proj.weight", "attn_output.weight", LINEAR, None),
    ("attn.q_proj.bias", "self_attn.q_proj.bias", "attn_q.bias", BIAS, "qkv_bias"),
    ("attn.k_proj.bias", "self_attn.k_proj.bias", "attn_k.bias", BIAS, "qkv_bias"),
    ("attn.v_proj.bias", "self_attn.v_proj.bias", "attn_v.bias", BIAS, "qkv_bias"),
    ("attn.o_proj.bias", "self_attn.o_proj.bias", "attn_output.bias", BIAS, "o_bias"),
    ("attn.q_norm.scale", "self_attn.q_norm.weight", "attn_q_norm.weight", NORM, "qk_norm"),
    ("attn.k_norm.scale", "self_attn.k_norm.weight", "attn_k_norm.weight", NORM, "qk_norm"),
    ("post_attn_norm.scale", "post_attention_layernorm.weight", "post_attention_norm.weight", NORM, "post_norms"),
    ("pre_ffw_norm.scale", "pre_feedforward_layernorm.weight", "ffn_norm.weight", NORM, "post_norms"),
    ("pre_ffw_norm.scale", "post_attention_layernorm.weight", "ffn_norm.weight", NORM, "no_post_norms"),
    ("post_ffw_norm.scale", "post_feedforward_layernorm.weight", "post_ffw_norm.weight", NORM, "post_norms"),
    ("mlp.gate_proj.kernel", "mlp.gate_proj.weight", "ffn_gate.weight", LINEAR, None),
    ("mlp.up_proj.kernel", "mlp.up_proj.weight", "ffn_up.weight", LINEAR, None),
    ("mlp.down_proj.kernel", "mlp.down_proj.weight", "ffn_down.weight", LINEAR, None),
]

# our path under a block -> the config field counting the heads of its rows (q: num_heads, k: num_kv_heads)
HEAD_ROWS = {"attn.q_proj.kernel": "num_heads", "attn.q_proj.bias": "num_heads",
             "attn.k_proj.kernel": "num_kv_heads", "attn.k_proj.bias": "num_kv_heads"}

TOP_ROWS = [
    ("embedding", "model.embed_tokens.weight", "token_embd.weight", EMBED, None),
    ("final_norm.scale", "model.norm.weight", "output_norm.weight", NORM, None),
    ("head", "lm_head.weight", "output.weight", LINEAR, "untied"),
]


def _features(cfg: ModelConfig) -> set[str]:
  features = {"post_norms" if cfg.use_post_norms else "no_post_norms"}
  if cfg.use_qk_norm:
    features.add("qk_norm")
  if not cfg.tie_embeddings:
    features.add("untied")
  if cfg.qkv_bias:
    features.add("qkv_bias")
  if cfg.o_bias:
    features.add("o_bias")
  return features


def _path(dotted: str) -> tuple:
  return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def weight_table(cfg: ModelConfig) -> list[Entry]:
  """Every parameter of `cfg`'s decoder with its HF and GGUF names."""
  features = _features(cfg)
  entries = [Entry(_path(p), hf, gg, kind) for p, hf, gg, kind, needs in TOP_ROWS if needs in (None, *features)]
  for i in range(cfg.num_layers):
    entries += [Entry(("layers", i, *_path(p)), f"model.layers.{i}.{hf}", f"blk.{i}.{gg}", kind, HEAD_ROWS.get(p))
                for p, hf, gg, kind, needs in LAYER_ROWS if needs in (None, *features)]
  return entries
