"""A random-init tiny Gemma 3 that runs the whole pipeline in seconds (tests, smoke runs)."""

from dcr_jax.config import base_config


def get_config(family: str = "gemma3"):
  config = base_config()
  config.model.name = f"tiny-{family}"
  config.model.random_init = True
  config.demo.max_new_tokens = 8
  # a random model learns only at larger steps than a pretrained one
  config.refine.lr = 1e-3
  config.align.lr = 1e-2
  config.evaluate.n = 16
  config.evaluate.max_new_tokens = 16
  return config
