"""The T5Gemma model in Flax linen."""

from t5gemma_jax.model.blocks import DecoderBlock, EncoderBlock
from t5gemma_jax.model.transformer import (Decoder, Encoder, T5Gemma, abstract_params,
                                           init_params)

__all__ = ["T5Gemma", "Encoder", "Decoder", "EncoderBlock", "DecoderBlock", "abstract_params",
           "init_params"]
