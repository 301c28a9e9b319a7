"""The layer stacks (plain or scanned, with remat), the encoder, the decoder and `T5Gemma`.

Parameter tree (unscanned):
  encoder/{embedder/embedding, layers_{i}/..., final_norm/scale}
  decoder/{embedder/embedding, layers_{i}/..., final_norm/scale}
T5Gemma 2 (`shared_embedding`) has no decoder/embedder: the decoder and the output layer read
encoder/embedder (plus encoder/embedder/eoi_embedding when `eoi_id` is set); with
`merged_attention` decoder layers have no cross_attn nor cross norms; with `share_blocks` the
decoder has no layers at all (it runs the encoder's); with `cross_attention_layers="global"`
only full-attention decoder layers have cross-attention.
With `RunOptions.scan_layers` the leading `R = num_layers // period` repeats of the layer-type
pattern live under `layers/block_{s}` with a leading [R] axis (logical name "layers"); leftover
layers, if any, keep their `layers_{i}` names. `t5gemma_jax.model.layout` converts between the two.

Decoding runs the same stacks (`T5Gemma.start_decode`, `T5Gemma.decode_step`). Its cache:
  {"index": int32 [B] (the next position), "encoder_segment_ids": int32 [B, S],
   layer entries in the parameters' layout: `layers/block_{s}` with a leading [R] axis
   (scanned; batch is then axis 1) and/or `layers_{i}`, each a `DecoderBlock` cache}.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5gemma_jax.config import T5GemmaConfig
from t5gemma_jax.model import layout
from t5gemma_jax.model import masks as masks_lib
from t5gemma_jax.model.blocks import DecoderBlock, EncoderBlock
from t5gemma_jax.model.layers import embed_tokens, embedding_logits
from t5gemma_jax.model.stack import (StackRunner, capped_logits, decode_inputs, next_index,
                                     segments_and_positions, self_masks)
from t5gemma_jax.run_options import RunOptions

Array = jax.Array


class Encoder(StackRunner):
  """Bidirectional encoder with its own embedding table."""

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Optional[Array] = None,
               positions: Optional[Array] = None, deterministic: bool = True) -> Array:
    """tokens int [B, S] (0 = padding) -> encoded [B, S, D_enc] in the activation dtype."""
    mc = self.cfg.encoder
    segment_ids, positions = segments_and_positions(tokens, segment_ids, positions,
                                                     self.cfg.pad_id)
    x = self.embedder(mc, self.cfg.eoi_id).encode(tokens)
    masks = self_masks(mc, segment_ids, causal=False)
    return self.run(mc, EncoderBlock, {}, x, deterministic, positions, masks)[0]


class Decoder(StackRunner):
  """Causal decoder with cross-attention; its embedding is tied to the output layer."""

  @nn.compact
  def __call__(self, encoded: Optional[Array], encoder_segment_ids: Optional[Array],
               tokens: Array, segment_ids: Optional[Array] = None,
               positions: Optional[Array] = None, deterministic: bool = True,
               shared_embedder: Optional[dict] = None, shared_layers: Optional[dict] = None,
               cache: Optional[dict] = None,
               cache_length: Optional[int] = None) -> tuple[Array, Optional[dict]]:
    """Returns (float32 logits [B, T, V] softcapped by final_logit_softcapping, the decoding
    cache or None).

    `shared_embedder` is the encoder's embedder params (with `cfg.shared_embedding`) and
    `shared_layers` its layer params (with `cfg.share_blocks`); this stack then creates no
    table / no layers of its own. `cache_length` starts decoding (the cache is built from
    these tokens, positions from 0); `cache` is a cached step: one new token per row right
    after the cached ones, `encoded` and `encoder_segment_ids` then unused (None).
    """
    c, mc = self.cfg, self.cfg.decoder
    segment_ids, positions, masks = decode_inputs(mc, tokens, cache, cache_length, segment_ids,
                                                  positions, c.pad_id)
    if cache is not None:
      encoder_segment_ids = cache["encoder_segment_ids"]
    if c.shared_embedding:
      table = shared_embedder["embedding"]
      x = embed_tokens(table, tokens, self.run_options.activation_dtype, c.eoi_id,
                       shared_embedder.get("eoi_embedding"))
      to_logits = lambda y: embedding_logits(table, y, self.run_options.activation_dtype)
    else:
      embedder = self.embedder(mc, c.eoi_id)
      x, to_logits = embedder.encode(tokens), embedder.decode
    cross_mask = masks_lib.MaskSpec(segment_ids, encoder_segment_ids)
    block_kwargs = {"encoder_hidden_size": c.encoder.hidden_size, "merged": c.merged_attention,
                    "cross_attention_layers": c.cross_attention_layers,
                    "cache_length": cache_length}
    x, layer_caches = self.run(mc, DecoderBlock, block_kwargs, x, deterministic, positions,
                               masks, encoded, cross_mask, shared_layers=shared_layers,
                               cache=None if cache is None else layout.layer_params(cache))
    logits = capped_logits(to_logits(x), mc)
    if cache is None and cache_length is None:
      return logits, None
    return logits, {"index": next_index(segment_ids, positions),
                    "encoder_segment_ids": encoder_segment_ids,
                    **layer_caches}


class T5Gemma(nn.Module):
  """The T5Gemma encoder-decoder.

  `__call__` runs both stacks; `encode` and `decode` run one each (decode takes the encoder's
  tokens or segment ids to mask cross-attention); `start_decode` and `decode_step` decode with
  a cache through the same modules.
  """

  cfg: T5GemmaConfig
  run_options: RunOptions = RunOptions()

  def setup(self):
    self.run_options.check(self.cfg)
    self.encoder = Encoder(self.cfg, self.run_options)
    self.decoder = Decoder(self.cfg, self.run_options)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
             encoder_positions: Optional[Array] = None, deterministic: bool = True) -> Array:
    """int32 [B, S] -> [B, S, D_enc]."""
    return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                        deterministic)

  def _shared(self) -> tuple[Optional[dict], Optional[dict]]:
    """The encoder's table / blocks the decoder reads, from the variables (the encoder need
    not run here)."""
    if not (self.cfg.shared_embedding or self.cfg.share_blocks):
      return None, None
    encoder_params = nn.meta.unbox(self.encoder.variables["params"])
    return (encoder_params["embedder"] if self.cfg.shared_embedding else None,
            layout.layer_params(encoder_params) if self.cfg.share_blocks else None)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             encoder_segment_ids: Optional[Array] = None,
             decoder_segment_ids: Optional[Array] = None,
             decoder_positions: Optional[Array] = None, deterministic: bool = True) -> Array:
    """encoded [B, S, D_enc], tokens int32 [B, S] and [B, T] -> float32 logits [B, T, V]."""
    _check_segments(encoder_segment_ids, decoder_segment_ids)
    if encoder_segment_ids is None:
      encoder_segment_ids = masks_lib.segment_ids_from_tokens(encoder_input_tokens,
                                                              self.cfg.pad_id)
    return self.decoder(encoded, encoder_segment_ids, decoder_input_tokens, decoder_segment_ids,
                        decoder_positions, deterministic, *self._shared())[0]

  def start_decode(self, encoded: Array, encoder_segment_ids: Array,
                   decoder_input_tokens: Array, cache_length: int) -> tuple[Array, dict]:
    """Teacher-forces the first decoder tokens and starts the decoding cache.

    Args:
      encoded: [B, S, D_enc] encoder output; encoder_segment_ids: int32 [B, S] (0 = padding).
      decoder_input_tokens: int32 [B, T], BOS first, no padding (usually T = 1).
      cache_length: decoder positions the cache holds (>= T plus the steps to come).

    Returns:
      (float32 logits [B, T, V], the cache: see the module docstring).
    """
    shared_embedder, shared_layers = self._shared()
    return self.decoder(encoded, encoder_segment_ids, decoder_input_tokens,
                        shared_embedder=shared_embedder, shared_layers=shared_layers,
                        cache_length=cache_length)

  def decode_step(self, decoder_input_tokens: Array, cache: dict) -> tuple[Array, dict]:
    """One more token per row: int32 [B, 1] -> (float32 logits [B, 1, V], updated cache)."""
    shared_embedder, shared_layers = self._shared()
    return self.decoder(None, None, decoder_input_tokens, shared_embedder=shared_embedder,
                        shared_layers=shared_layers, cache=cache)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               encoder_positions: Optional[Array] = None,
               decoder_positions: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """Teacher-forced logits.

    Args:
      encoder_input_tokens: int32 [B, S], 0 = padding.
      decoder_input_tokens: int32 [B, T], starting with BOS (2), 0 = padding.
      encoder_segment_ids, decoder_segment_ids: int32 [B, S] / [B, T] for packed rows (0 =
        padding); give both or neither.
      encoder_positions, decoder_positions: int32 positions; default: restart per segment.
      deterministic: False enables dropout (needs a "dropout" rng).

    Returns:
      float32 [B, T, V] logits.
    """
    _check_segments(encoder_segment_ids, decoder_segment_ids)
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          deterministic)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids,
                       decoder_segment_ids, decoder_positions, deterministic)


def init_params(cfg: T5GemmaConfig, rng: Array, run: RunOptions = RunOptions()) -> Any:
  """Fresh parameters (boxed with their logical axis names; jit or eval_shape it), in the
  layout and dtype `run` asks for.

  Initialisation traces the model on one-token inputs. Parameters do not depend on the
  attention implementation, and fused kernels (splash) take only whole blocks of tokens, so
  the XLA path is traced here whatever `run.attention_impl` says.
  """
  tokens = jnp.ones((1, 1), jnp.int32)
  net = T5Gemma(cfg, run.replace(attention_impl="xla"))
  return net.init(rng, tokens, tokens)["params"]


def _check_segments(encoder_segment_ids, decoder_segment_ids):
  if (encoder_segment_ids is None) != (decoder_segment_ids is None):
    raise ValueError("packed inputs need both encoder_segment_ids and decoder_segment_ids "
                     "(cross-attention matches segments across the two)")
