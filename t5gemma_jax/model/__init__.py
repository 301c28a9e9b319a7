"""The T5Gemma model in Flax linen."""

from t5gemma_jax.model.transformer import (Decoder, DecoderBlock, Encoder, EncoderBlock, T5Gemma,
                                           abstract_params, init_params)

__all__ = ["T5Gemma", "Encoder", "Decoder", "EncoderBlock", "DecoderBlock", "abstract_params",
           "init_params"]
