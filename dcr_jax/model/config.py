"""Decoder configuration: one dataclass for the Gemma 1/2/3, Llama, Mistral and Qwen2/3 text families (flags where
they differ), and their named variants at the published sizes."""

from __future__ import annotations

import dataclasses
from typing import Literal

from dcr_jax.errors import UserError

LayerType = Literal["global", "local"]
FAMILIES = ("gemma", "gemma2", "gemma3", "llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer; every family is this one decoder with its flags set."""

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
  rope_scale_global: float = 1.0  # RoPE scaling factor on global layers (Gemma 3 4b+: linear; Llama 3.1+: llama3)
  rope_type: Literal["linear", "llama3"] = "linear"  # how rope_scale_global applies
  rope_low_freq_factor: float = 1.0  # llama3 scaling: wavelengths above original/low are divided by the factor,
  rope_high_freq_factor: float = 4.0  # those below original/high kept, the band between interpolated
  rope_original_max_positions: int = 8192
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  use_post_norms: bool = False  # Gemma 2/3: norms after attention and after the MLP
  use_qk_norm: bool = False  # Gemma 3, Qwen3: RMSNorm on queries and keys per head
  qkv_bias: bool = False  # Qwen2 (and Llama's attention_bias): biases on the q, k and v projections
  o_bias: bool = False  # Llama's attention_bias: a bias on the output projection too
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
    if self.family not in FAMILIES:
      raise UserError(f"model.family={self.family!r} is unknown; choose one of {', '.join(FAMILIES)}")
    if self.rope_type not in ("linear", "llama3"):
      raise UserError(f"model.rope_type={self.rope_type!r}; choose linear or llama3")

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


SILU_FAMILIES = dict(norm_scale_offset=0.0, activation="silu", scale_embeddings=False)  # Llama, Mistral, Qwen
LLAMA3_ROPE = dict(rope_type="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                   rope_original_max_positions=8192)  # Llama 3.1 and 3.2 (with the factor per size)


def llama(vocab_size=128_256, rope_theta=500_000.0, **kw) -> ModelConfig:
  """Llama 2/3 (and SmolLM2, TinyLlama): SwiGLU, plain RMSNorm, no biases, global attention everywhere."""
  kw.setdefault("norm_eps", 1e-5)
  return ModelConfig(family="llama", vocab_size=vocab_size, layer_types=("global",) * kw["num_layers"],
                     rope_theta_global=rope_theta, rope_theta_local=rope_theta, **SILU_FAMILIES, **kw)


def mistral(vocab_size=32_000, sliding_window=4096, rope_theta=10_000.0, **kw) -> ModelConfig:
  """Mistral: Llama with a sliding window on every layer (v0.1; None for v0.2+)."""
  kw.setdefault("norm_eps", 1e-5)
  kind = "local" if sliding_window else "global"
  return ModelConfig(family="mistral", vocab_size=vocab_size, layer_types=(kind,) * kw["num_layers"],
                     sliding_window=sliding_window, rope_theta_global=rope_theta, rope_theta_local=rope_theta,
                     **SILU_FAMILIES, **kw)


def qwen2(vocab_size=151_936, rope_theta=1_000_000.0, **kw) -> ModelConfig:
  """Qwen2 / Qwen2.5: Llama with biases on the q, k and v projections."""
  kw.setdefault("norm_eps", 1e-6)
  return ModelConfig(family="qwen2", vocab_size=vocab_size, layer_types=("global",) * kw["num_layers"],
                     rope_theta_global=rope_theta, rope_theta_local=rope_theta, qkv_bias=True, **SILU_FAMILIES,
                     **kw)


def qwen3(vocab_size=151_936, rope_theta=1_000_000.0, **kw) -> ModelConfig:
  """Qwen3: Llama with a per-head RMSNorm on queries and keys, no biases."""
  kw.setdefault("norm_eps", 1e-6)
  return ModelConfig(family="qwen3", vocab_size=vocab_size, layer_types=("global",) * kw["num_layers"],
                     rope_theta_global=rope_theta, rope_theta_local=rope_theta, use_qk_norm=True, **SILU_FAMILIES,
                     **kw)


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
    "llama3.2-1b": llama(embed_dim=2048, mlp_dim=8192, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                         rope_scale_global=32.0, **LLAMA3_ROPE, max_position_embeddings=131_072,
                         tie_embeddings=True),
    "llama3.2-3b": llama(embed_dim=3072, mlp_dim=8192, num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128,
                         rope_scale_global=32.0, **LLAMA3_ROPE, max_position_embeddings=131_072,
                         tie_embeddings=True),
    "llama3.1-8b": llama(embed_dim=4096, mlp_dim=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                         rope_scale_global=8.0, **LLAMA3_ROPE, max_position_embeddings=131_072,
                         tie_embeddings=False),
    "smollm2-135m": llama(vocab_size=49_152, rope_theta=100_000.0, embed_dim=576, mlp_dim=1536, num_layers=30,
                          num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
                          tie_embeddings=True),
    "mistral-7b": mistral(embed_dim=4096, mlp_dim=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                          max_position_embeddings=32_768, tie_embeddings=False),
    "qwen2.5-0.5b": qwen2(embed_dim=896, mlp_dim=4864, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                          max_position_embeddings=32_768, tie_embeddings=True),
    "qwen2.5-1.5b": qwen2(embed_dim=1536, mlp_dim=8960, num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128,
                          max_position_embeddings=32_768, tie_embeddings=True),
    "qwen2.5-7b": qwen2(vocab_size=152_064, embed_dim=3584, mlp_dim=18944, num_layers=28, num_heads=28,
                        num_kv_heads=4, head_dim=128, max_position_embeddings=32_768, tie_embeddings=False),
    "qwen3-0.6b": qwen3(embed_dim=1024, mlp_dim=3072, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                        max_position_embeddings=40_960, tie_embeddings=True),
    "qwen3-8b": qwen3(embed_dim=4096, mlp_dim=12288, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                      max_position_embeddings=40_960, tie_embeddings=False),
}


def tiny(family: str = "gemma3", **overrides) -> ModelConfig:
  """A random-init config of the given family that runs in milliseconds (for tests and the tiny pipeline)."""
  base = dict(vocab_size=512, embed_dim=64, mlp_dim=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
              max_position_embeddings=512)
  builders = {
      "gemma": lambda: gemma1(**base),
      "gemma2": lambda: gemma2(sliding_window=8, query_pre_attn_scalar=24, **base),
      "gemma3": lambda: gemma3(sliding_window=8, **{**base, "num_layers": 6}, query_pre_attn_scalar=24),
      "llama": lambda: llama(rope_theta=10_000.0, tie_embeddings=True, **base),
      "mistral": lambda: mistral(sliding_window=8, tie_embeddings=False, **base),
      "qwen2": lambda: qwen2(rope_theta=10_000.0, tie_embeddings=True, **base),
      "qwen3": lambda: qwen3(rope_theta=10_000.0, tie_embeddings=False, **base),
  }
  if family not in builders:
    raise UserError(f"unknown model family {family!r}; choose one of {', '.join(builders)}")
  return builders[family]().replace(**overrides)


def get_variant(name: str) -> ModelConfig:
  """The named variant's config; an unknown name is a one-line error listing the known ones."""
  if name not in VARIANTS:
    raise UserError(f"unknown model variant {name!r}; known variants: {', '.join(sorted(VARIANTS))}")
  return VARIANTS[name]
