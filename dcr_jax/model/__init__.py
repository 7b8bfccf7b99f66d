"""Flax NNX decoder for the Gemma, Llama, Mistral and Qwen2/3 text families (one decoder, configured by flags), with
LoRA and layer taps."""

from dcr_jax.model.config import VARIANTS, ModelConfig, get_variant, tiny
from dcr_jax.model.decoder import Decoder, DecoderOutput, default_positions, stack_layers, unstack_layers

__all__ = ["VARIANTS", "ModelConfig", "get_variant", "tiny", "Decoder", "DecoderOutput", "default_positions",
           "stack_layers", "unstack_layers"]
