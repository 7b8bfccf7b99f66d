"""Flax NNX decoder for the Gemma text families (Llama/Qwen2 by configuration), with LoRA and layer taps."""

from dcr_jax.model.config import VARIANTS, ModelConfig, get_variant, tiny
from dcr_jax.model.decoder import Decoder, DecoderOutput, default_positions, stack_layers, unstack_layers

__all__ = ["VARIANTS", "ModelConfig", "get_variant", "tiny", "Decoder", "DecoderOutput", "default_positions",
           "stack_layers", "unstack_layers"]
