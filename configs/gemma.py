"""DCR on Gemma checkpoints. Select a variant with --config=configs/gemma.py:VARIANT (default gemma3-270m)."""

from dcr_jax.config import base_config


def get_config(variant: str = "gemma3-270m"):
  config = base_config()  # the variant name is checked with the rest of the config, at start
  config.model.name = variant
  return config
