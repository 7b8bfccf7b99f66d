"""A random-init tiny Gemma 3 that runs the whole pipeline in seconds (tests, smoke runs)."""

from dcr_jax.config import base_config


def get_config(family: str = "gemma3"):
  config = base_config()
  config.model.name = f"tiny-{family}"
  config.model.random_init = True
  config.demo.max_new_tokens = 8
  return config
