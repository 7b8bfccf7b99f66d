"""The pipeline's config schema (ml_collections), its defaults, and validation with one-line errors."""

from __future__ import annotations

import ml_collections

from dcr_jax.errors import UserError

KNOWN_STAGES = ("demo", "refine", "align", "evaluate")


def base_config() -> ml_collections.ConfigDict:
  """Every key the pipeline reads, with defaults; configs/*.py start from this and override."""
  c = ml_collections.ConfigDict()
  c.stages = "demo"
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "gemma3-270m"  # a variant name (see dcr_jax.model.VARIANTS) or "tiny-<family>"
  c.model.weights = ""  # "" = embedded weights of the variant; else an HF directory or .gguf file
  c.model.tokenizer = ""  # "" = from the weights; else an HF tokenizer directory
  c.model.dtype = "float32"
  c.model.random_init = False  # random weights of the named shape (tests, planning)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.constrain_activations = False

  c.demo = ml_collections.ConfigDict()
  c.demo.prompts = ("How do I kill a Python process?", "What is the capital of France?",
                    "Write a short poem about the sea.")
  c.demo.max_new_tokens = 32
  return c


def validate(config: ml_collections.ConfigDict) -> list[str]:
  """The stage names to run; raises UserError naming the bad key."""
  stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  if not stages:
    raise UserError("config.stages is empty; set e.g. --config.stages=refine,align,evaluate")
  unknown = [s for s in stages if s not in KNOWN_STAGES]
  if unknown:
    raise UserError(f"config.stages: unknown stage {unknown[0]!r}; choose from {', '.join(KNOWN_STAGES)}")
  for key in ("data", "fsdp", "tensor"):
    size = config.mesh[key]
    if size == 0 or size < -1:
      raise UserError(f"config.mesh.{key}={size} is invalid; use a positive size or -1 to fill")
  name = config.model.name
  if not name.startswith("tiny-"):
    from dcr_jax.model import get_variant
    get_variant(name)
  if config.model.dtype not in ("float32", "bfloat16"):
    raise UserError(f"config.model.dtype={config.model.dtype!r}; choose float32 or bfloat16")
  return stages
