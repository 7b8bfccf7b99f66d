"""dcr_jax: Discernment via Contrastive Refinement (DCR) in JAX/Flax, for reducing LLM over-refusal."""


def load_model(spec: str = "gemma3-270m", **kwargs):
  """(model, tokenizer) for a variant name, GGUF path or HF directory; see `dcr_jax.weights.load_model`."""
  from dcr_jax.weights import load_model as _load_model  # lazy: `import dcr_jax` stays free of JAX and weights

  return _load_model(spec, **kwargs)


__all__ = ["load_model"]
