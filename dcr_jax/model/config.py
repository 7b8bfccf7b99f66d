"""Decoder configuration: one dataclass for the Gemma 1/2/3 text families, and their named variants."""

from __future__ import annotations

import dataclasses
from typing import Literal

from dcr_jax.errors import UserError

LayerType = Literal["global", "local"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer; Llama/Qwen2 fit by flags (norm offset, activation, untied head)."""

  family: str
  vocab_size: int
  embed_dim: int
  mlp_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  layer_types: tuple[LayerType, ...]
  sliding_window: int | None = None
  query_pre_attn_scalar: float | None = None  # None: head_dim
  rope_theta_global: float = 10_000.0
  rope_theta_local: float = 10_000.0
  rope_scale_global: float = 1.0  # linear RoPE scaling on global layers (Gemma 3 4b+)
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  use_post_norms: bool = False  # Gemma 2/3: norms after attention and after the MLP
  use_qk_norm: bool = False  # Gemma 3: RMSNorm on queries and keys per head
  norm_eps: float = 1e-6
  norm_scale_offset: float = 1.0  # Gemma: x * (1 + w); Llama: x * w
  activation: Literal["gelu_tanh", "silu"] = "gelu_tanh"
  scale_embeddings: bool = True  # Gemma multiplies embeddings by sqrt(embed_dim)
  tie_embeddings: bool = True
  max_position_embeddings: int = 8192
  remat: str = "none"  # recompute block activations in the backward pass: none | full | dots (save matmul outputs)
  scan_layers: bool = False  # one Block with params stacked on a leading layer axis, run by jax.lax.scan
  dtype: str = "float32"  # activation dtype
  param_dtype: str = "float32"

  def __post_init__(self):
    if len(self.layer_types) != self.num_layers:
      raise UserError(f"model.layer_types has {len(self.layer_types)} entries but num_layers={self.num_layers}")
    if self.num_heads % self.num_kv_heads:
      raise UserError(f"model.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.remat not in ("none", "full", "dots"):
      raise UserError(f"model.remat={self.remat!r}; choose none, full or dots")
    if "local" in self.layer_types and not self.sliding_window:
      raise UserError("model.sliding_window must be set when layer_types has 'local' layers")

  @property
  def attn_scale(self) -> float:
    return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    d = {k: (tuple(v) if k == "layer_types" else v) for k, v in d.items() if k in fields}
    return cls(**d)


def pattern_layer_types(num_layers: int, period: int) -> tuple[LayerType, ...]:
  """Layer types with every `period`-th layer global, the rest local (Gemma 2: period 2; Gemma 3: period 6)."""
  return tuple("global" if (i + 1) % period == 0 else "local" for i in range(num_layers))


def gemma1(vocab_size=256_000, **kw) -> ModelConfig:
  n = kw["num_layers"]
  return ModelConfig(family="gemma", vocab_size=vocab_size, layer_types=("global",) * n, **kw)


def gemma2(vocab_size=256_000, sliding_window=4096, **kw) -> ModelConfig:
  n = kw["num_layers"]
  return ModelConfig(
      family="gemma2", vocab_size=vocab_size, layer_types=pattern_layer_types(n, 2), sliding_window=sliding_window,
      attn_logit_softcap=50.0, final_logit_softcap=30.0, use_post_norms=True, **kw)


def gemma3(vocab_size=262_144, sliding_window=512, **kw) -> ModelConfig:
  n = kw["num_layers"]
  kw.setdefault("rope_theta_global", 1_000_000.0)
  kw.setdefault("query_pre_attn_scalar", 256)
  return ModelConfig(
      family="gemma3", vocab_size=vocab_size, layer_types=pattern_layer_types(n, 6), sliding_window=sliding_window,
      use_post_norms=True, use_qk_norm=True, **kw)


# Real sizes of the published checkpoints (text decoders only).
VARIANTS: dict[str, ModelConfig] = {
    "gemma-2b": gemma1(embed_dim=2048, mlp_dim=16384, num_layers=18, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma-7b": gemma1(embed_dim=3072, mlp_dim=24576, num_layers=28, num_heads=16, num_kv_heads=16, head_dim=256),
    "gemma2-2b": gemma2(embed_dim=2304, mlp_dim=9216, num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256,
                        query_pre_attn_scalar=256),
    "gemma2-9b": gemma2(embed_dim=3584, mlp_dim=14336, num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256,
                        query_pre_attn_scalar=256),
    "gemma2-27b": gemma2(embed_dim=4608, mlp_dim=36864, num_layers=46, num_heads=32, num_kv_heads=16, head_dim=128,
                         query_pre_attn_scalar=144),
    "gemma3-270m": gemma3(embed_dim=640, mlp_dim=2048, num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256,
                          max_position_embeddings=32_768),
    "gemma3-1b": gemma3(embed_dim=1152, mlp_dim=6912, num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256,
                        max_position_embeddings=32_768),
    "gemma3-4b": gemma3(vocab_size=262_208, sliding_window=1024, embed_dim=2560, mlp_dim=10240, num_layers=34,
                        num_heads=8, num_kv_heads=4, head_dim=256, rope_scale_global=8.0,
                        max_position_embeddings=131_072),
    "gemma3-12b": gemma3(vocab_size=262_208, sliding_window=1024, embed_dim=3840, mlp_dim=15360, num_layers=48,
                         num_heads=16, num_kv_heads=8, head_dim=256, rope_scale_global=8.0,
                         max_position_embeddings=131_072),
    "gemma3-27b": gemma3(vocab_size=262_208, sliding_window=1024, embed_dim=5376, mlp_dim=21504, num_layers=62,
                         num_heads=32, num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168,
                         rope_scale_global=8.0, max_position_embeddings=131_072),
}


def tiny(family: str = "gemma3", **overrides) -> ModelConfig:
  """A random-init config of the given family that runs in milliseconds (for tests and the tiny pipeline)."""
  base = dict(vocab_size=512, embed_dim=64, mlp_dim=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
              max_position_embeddings=512)
  if family == "gemma":
    cfg = gemma1(**base)
  elif family == "gemma2":
    cfg = gemma2(sliding_window=8, query_pre_attn_scalar=24, **base)
  elif family == "gemma3":
    cfg = gemma3(sliding_window=8, **{**base, "num_layers": 6}, query_pre_attn_scalar=24)
  else:
    raise UserError(f"unknown model family {family!r}; choose one of gemma, gemma2, gemma3")
  return cfg.replace(**overrides)


def get_variant(name: str) -> ModelConfig:
  """The named variant's config; an unknown name is a one-line error listing the known ones."""
  if name not in VARIANTS:
    raise UserError(f"unknown model variant {name!r}; known variants: {', '.join(sorted(VARIANTS))}")
  return VARIANTS[name]
