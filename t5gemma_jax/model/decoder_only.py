"""A decoder-only Gemma 2 / Gemma 3 built from the encoder-decoder's own blocks.

The stack is `DecoderBlock` with no encoder to read (`cross_attention_layers="none"`): causal
self-attention and the MLP, under the same scan, remat, sharding names and decode cache as the
T5Gemma decoder. Parameter tree (unscanned; scanned as in `model.transformer`):
  decoder/{embedder/embedding, layers_{i}/{self_attn, pre/post_self_attn_norm, pre/post_ffw_norm,
           mlp}, final_norm/scale}
which is transformers' Gemma2ForCausalLM / Gemma3ForCausalLM (`convert.hf_causal_lm`).

PrefixLM (`DecoderOnlyConfig.prefix_lm`): the tokens marked by `decoder_causal_attention`
(seqio's `PrefixLMFeatureConverter`: BOS and the inputs) attend to each other both ways.

Decoding cache: {"index": int32 [B] (the next position of each row), layer entries as in
`model.transformer`}. A prompt may be right-padded: each row continues after its own last
token.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5gemma_jax.config import NO_ENCODER, DecoderOnlyConfig
from t5gemma_jax.model import layout
from t5gemma_jax.model.blocks import DecoderBlock
from t5gemma_jax.model.stack import StackRunner, capped_logits, decode_inputs, next_index
from t5gemma_jax.run_options import RunOptions

Array = jax.Array


class CausalStack(StackRunner):
  """Embedding -> causal blocks -> final norm -> tied output layer."""

  cfg: DecoderOnlyConfig

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Optional[Array] = None,
               positions: Optional[Array] = None, prefix: Optional[Array] = None,
               deterministic: bool = True, cache: Optional[dict] = None,
               cache_length: Optional[int] = None) -> tuple[Array, Optional[dict]]:
    """(float32 logits [B, T, V], the decoding cache or None); see `DecoderOnly`."""
    mc = self.cfg.decoder
    segment_ids, positions, masks = decode_inputs(
        mc, tokens, cache, cache_length, segment_ids, positions, self.cfg.pad_id,
        prefix=prefix if self.cfg.prefix_lm else None)
    embedder = self.embedder(mc)
    block_kwargs = {"cross_attention_layers": NO_ENCODER, "cache_length": cache_length}
    x, layer_caches = self.run(mc, DecoderBlock, block_kwargs, embedder.encode(tokens),
                               deterministic, positions, masks, None, None,
                               cache=None if cache is None else layout.layer_params(cache))
    logits = capped_logits(embedder.decode(x), mc)
    if cache is None and cache_length is None:
      return logits, None
    return logits, {"index": next_index(segment_ids, positions), **layer_caches}


class DecoderOnly(nn.Module):
  """A decoder-only Gemma: `__call__` for training and scoring, `start_decode` and
  `decode_step` for decoding, all through one `CausalStack`."""

  cfg: DecoderOnlyConfig
  run_options: RunOptions = RunOptions()

  def setup(self):
    self.run_options.check(self.cfg)
    self.decoder = CausalStack(self.cfg, self.run_options)

  def __call__(self, decoder_input_tokens: Array, decoder_segment_ids: Optional[Array] = None,
               decoder_positions: Optional[Array] = None,
               decoder_causal_attention: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """Teacher-forced logits.

    Args:
      decoder_input_tokens: int32 [B, T] (0 = padding), BOS first in every segment.
      decoder_segment_ids, decoder_positions: int32 [B, T] for packed rows (0 = padding).
      decoder_causal_attention: int32 [B, T], 1 on the prefix (used when `cfg.prefix_lm`).
      deterministic: False enables dropout (needs a "dropout" rng).

    Returns:
      float32 [B, T, V] logits.
    """
    return self.decoder(decoder_input_tokens, decoder_segment_ids, decoder_positions,
                        decoder_causal_attention, deterministic)[0]

  def start_decode(self, prompt_tokens: Array, cache_length: int) -> tuple[Array, dict]:
    """Runs the prompt and starts the decoding cache.

    Args:
      prompt_tokens: int32 [B, P], BOS first, right-padded with 0; with `prefix_lm` the whole
        prompt is the bidirectional prefix.
      cache_length: positions the cache holds (>= the longest prompt plus the new tokens).

    Returns:
      (float32 logits [B, P, V], the cache); row b's next token follows position
      `cache["index"][b] - 1`.
    """
    segments = (prompt_tokens != self.cfg.pad_id).astype(jnp.int32)
    return self.decoder(prompt_tokens, prefix=segments, cache_length=cache_length)

  def decode_step(self, tokens: Array, cache: dict) -> tuple[Array, dict]:
    """One more token per row: int32 [B, 1] -> (float32 logits [B, 1, V], updated cache)."""
    return self.decoder(tokens, cache=cache)


def init_params(cfg: DecoderOnlyConfig, rng: Array, run: RunOptions = RunOptions()) -> Any:
  """Fresh parameters, boxed with their logical axis names (see `transformer.init_params`)."""
  tokens = jnp.ones((1, 1), jnp.int32)
  return DecoderOnly(cfg, run.replace(attention_impl="xla")).init(rng, tokens)["params"]
