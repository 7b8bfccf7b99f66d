"""DCR on Qwen2/2.5 and Qwen3 checkpoints (the paper's Qwen2.5-1.5B and 7B among them). Select a variant with
--config=configs/qwen.py:VARIANT (default qwen2.5-1.5b).

No Qwen weights ship with dcr_jax: set `config.model.weights` to an HF directory or a GGUF file of the variant.
Every variant defaults to a TPU-sized run (`dcr_jax.config.tpu_defaults`); size it with `python -m dcr_jax.plan`.
"""

from dcr_jax.config import base_config, tpu_defaults

# variant -> (stage-1 batch, stage-2 batch, stage-2 max_len, LoRA rank; 0 = full fine-tuning)
TPU_SIZES = {
    "qwen2.5-0.5b": (64, 64, 512, 0),
    "qwen2.5-1.5b": (64, 64, 512, 0),
    "qwen2.5-7b": (128, 128, 512, 16),
    "qwen3-0.6b": (64, 64, 512, 0),
    "qwen3-8b": (128, 128, 512, 16),
}


def get_config(variant: str = "qwen2.5-1.5b"):
  config = base_config()  # the variant name is checked with the rest of the config, at start
  config.model.name = variant
  if variant in TPU_SIZES:
    tpu_defaults(config, *TPU_SIZES[variant])
  return config
