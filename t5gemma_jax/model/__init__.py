"""The T5Gemma model and the decoder-only Gemma in Flax linen."""

from t5gemma_jax.model.blocks import DecoderBlock, EncoderBlock
from t5gemma_jax.model.decoder_only import DecoderOnly
from t5gemma_jax.model.factory import abstract_params, from_config, init_params
from t5gemma_jax.model.transformer import Decoder, Encoder, T5Gemma

__all__ = ["T5Gemma", "DecoderOnly", "Encoder", "Decoder", "EncoderBlock", "DecoderBlock",
           "abstract_params", "from_config", "init_params"]
