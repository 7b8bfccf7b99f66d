"""DCR on Gemma checkpoints. Select a variant with --config=configs/gemma.py:VARIANT (default gemma3-270m).

gemma3-270m runs on the embedded weights with CPU-sized steps. The other variants read `config.model.weights`
(an HF directory or a GGUF file) and default to TPU-sized meshes and batches: FSDP over every device, batches
that split over 8-256 chips. Size them for your slice with `python -m dcr_jax.plan` first.
"""

from dcr_jax.config import base_config, cpu_defaults, tpu_defaults

# variant -> (stage-1 batch, stage-2 batch, stage-2 max_len, LoRA rank; 0 = full fine-tuning)
TPU_SIZES = {
    "gemma3-1b": (64, 64, 512, 0),
    "gemma-2b": (64, 64, 512, 16),
    "gemma2-2b": (64, 64, 512, 16),
    "gemma3-4b": (128, 128, 512, 16),
    "gemma-7b": (128, 128, 512, 16),
    "gemma2-9b": (128, 128, 512, 16),
    "gemma3-12b": (256, 256, 512, 16),
    "gemma2-27b": (256, 256, 512, 16),
    "gemma3-27b": (256, 256, 512, 16),
}


# The embedded default run's settings are the ones the reproduction study chose on its validation split for
# gemma-3-270m (docs/reproduction.md, docs/results/study/gemma3-270m/): stage 2's safety weight 0.5 beside a general
# weight of 1.0 (a third of the mix), chosen as STL from {0.1, 0.25, 0.5}; 30 stage-1 steps, chosen as DCR from
# {10, 30} at each weight; both by the largest validation margin (refusal probability of toxic minus seemingly toxic
# prompts). Stage 2 is 20 steps so that DCR and its STL baseline fit in 15 minutes on 2 CPU cores.
CHOSEN_ON_VALIDATION = {"align.steps": 20, "align.general_weight": 1.0, "align.safety_weight": 0.5,
                        "refine.steps": 30}


def get_config(variant: str = "gemma3-270m"):
  config = base_config()  # the variant name is checked with the rest of the config, at start
  config.model.name = variant
  if variant in TPU_SIZES:
    tpu_defaults(config, *TPU_SIZES[variant])
  elif variant == "gemma3-270m":
    cpu_defaults(config)
    config.update_from_flattened_dict(CHOSEN_ON_VALIDATION)
  return config
