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

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5gemma_jax.config import ModuleConfig, T5GemmaConfig
from t5gemma_jax.model import layout
from t5gemma_jax.model import masks as masks_lib
from t5gemma_jax.model.blocks import DecoderBlock, EncoderBlock, remat_policy
from t5gemma_jax.model.layers import Embedder, RMSNorm, constrain, embed_tokens, embedding_logits
from t5gemma_jax.run_options import RunOptions

Array = jax.Array


class _Unit(nn.Module):
  """One repeat of the layer-type pattern (e.g. a sliding + full pair): the scanned body."""

  make_block: Callable[..., nn.Module]
  layer_types: tuple[str, ...]

  @nn.compact
  def __call__(self, x: Array, *args) -> tuple[Array, dict]:
    """x, the blocks' inputs, then the unit's cache ({"block_s": ...} or None) -> (x, cache)."""
    *args, cache = args
    new = {}
    for s, layer_type in enumerate(self.layer_types):
      name = f"block_{s}"
      x, new[name] = self.make_block(layer_type=layer_type, name=name)(
          x, *args, None if cache is None else cache[name])
    return x, new


def _self_masks(cfg: ModuleConfig, segment_ids: Array, causal: bool,
                positions: Optional[Array] = None) -> dict:
  """One self-attention `MaskSpec` per layer type used by the stack."""
  return {t: masks_lib.MaskSpec.for_layer(cfg, t, segment_ids, causal, positions)
          for t in sorted(set(cfg.layer_types))}


def _segments_and_positions(tokens, segment_ids, positions, pad_id):
  if segment_ids is None:
    segment_ids = masks_lib.segment_ids_from_tokens(tokens, pad_id)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  elif positions is None:
    positions = masks_lib.positions_from_segments(segment_ids)
  return segment_ids, positions


class _StackRunner(nn.Module):
  """Shared embed -> blocks -> final norm plumbing of the encoder and the decoder."""

  cfg: T5GemmaConfig
  run_options: RunOptions = RunOptions()

  def run(self, module_cfg: ModuleConfig, block_cls: type, extra_block_kwargs: dict,
          x: Array, deterministic: bool, *args, shared_layers: Optional[dict] = None,
          cache: Optional[dict] = None) -> tuple[Array, dict]:
    """Embedded x [B, T, D] through every layer and the final norm -> (x, the layers' caches
    in the parameter layout, {} entries None outside decoding)."""
    r = self.run_options
    x = nn.Dropout(module_cfg.dropout_rate)(x, deterministic=deterministic)
    x = constrain(x)
    block_kwargs = dict(cfg=module_cfg, deterministic=deterministic, dtype=r.activation_dtype,
                        param_dtype=r.parameter_dtype, attention_impl=r.attention_impl,
                        **extra_block_kwargs)
    if shared_layers is None:
      x, cache = self.run_layers(module_cfg, block_cls, block_kwargs, x, *args, cache=cache)
    else:
      x, cache = self.run_shared_layers(module_cfg, block_cls, block_kwargs, shared_layers, x,
                                        *args, cache=cache)
    x = RMSNorm(module_cfg.rms_norm_eps, param_dtype=r.parameter_dtype, name="final_norm")(x)
    return nn.Dropout(module_cfg.dropout_rate)(x, deterministic=deterministic), cache

  def _block_factory(self, module_cfg: ModuleConfig, block_cls: type, block_kwargs: dict):
    policy = remat_policy(self.run_options.remat_policy)
    if policy is not None:
      block_cls = nn.remat(block_cls, policy=policy,
                           prevent_cse=not self.run_options.scan_layers)

    def make_block(**kw):
      return block_cls(**block_kwargs, **kw)

    types, period = module_cfg.layer_types, module_cfg.layer_period
    repeats = len(types) // period if self.run_options.scan_layers else 0
    return make_block, types, period, repeats

  def run_shared_layers(self, module_cfg: ModuleConfig, block_cls: type, block_kwargs: dict,
                        shared: dict, x: Array, *args,
                        cache: Optional[dict] = None) -> tuple[Array, dict]:
    """Runs every layer with parameters owned by another stack (`share_blocks`).

    `shared` is that stack's params in the same layout (`layers/block_{s}` with a leading [R]
    axis and/or `layers_{i}`). The blocks are applied as pure functions of those arrays, so
    gradients flow to the owner and this stack creates no layer params.
    """
    make_block, types, period, repeats = self._block_factory(module_cfg, block_cls,
                                                             block_kwargs)
    rng = None if block_kwargs["deterministic"] else self.make_rng("dropout")
    cache = cache or {}
    new = {}

    def apply(module, params, x, layer_cache, rng):
      rngs = {} if rng is None else {"dropout": rng}
      return module.apply({"params": params}, x, *args, layer_cache, rngs=rngs)

    def next_rng(rng):
      return (None, None) if rng is None else tuple(jax.random.split(rng))

    if repeats:
      unit = _Unit(make_block, types[:period], parent=None)

      def body(carry, xs):
        x, rng = carry
        rng, sub = next_rng(rng)
        unit_params, unit_cache = xs
        x, unit_cache = apply(unit, unit_params, x, unit_cache, sub)
        return (x, rng), unit_cache

      (x, rng), new["layers"] = jax.lax.scan(body, (x, rng),
                                             (shared["layers"], cache.get("layers")))
    for i in range(repeats * period, len(types)):
      rng, sub = next_rng(rng)
      name = f"layers_{i}"
      x, new[name] = apply(make_block(layer_type=types[i], parent=None), shared[name], x,
                           cache.get(name), sub)
    return x, new

  def run_layers(self, module_cfg: ModuleConfig, block_cls: type, block_kwargs: dict, x: Array,
                 *args, cache: Optional[dict] = None) -> tuple[Array, dict]:
    """Runs every layer, unrolled or scanned over the repeating unit of layer types (the
    scanned cache too: one slice of it per repeat)."""
    make_block, types, period, repeats = self._block_factory(module_cfg, block_cls,
                                                             block_kwargs)
    cache = cache or {}
    new = {}
    if repeats:
      scanned = nn.scan(_Unit, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast,) * len(args) + (0,), length=repeats,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, new["layers"] = scanned(make_block, types[:period], name="layers")(
          x, *args, cache.get("layers"))
    for i in range(repeats * period, len(types)):
      name = f"layers_{i}"
      x, new[name] = make_block(layer_type=types[i], name=name)(x, *args, cache.get(name))
    return x, new

  def embedder(self, module_cfg: ModuleConfig) -> Embedder:
    return Embedder(module_cfg.vocab_size, module_cfg.hidden_size, eoi_id=self.cfg.eoi_id,
                    dtype=self.run_options.activation_dtype,
                    param_dtype=self.run_options.parameter_dtype,
                    name="embedder")


class Encoder(_StackRunner):
  """Bidirectional encoder with its own embedding table."""

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Optional[Array] = None,
               positions: Optional[Array] = None, deterministic: bool = True) -> Array:
    """tokens int [B, S] (0 = padding) -> encoded [B, S, D_enc] in the activation dtype."""
    mc = self.cfg.encoder
    segment_ids, positions = _segments_and_positions(tokens, segment_ids, positions,
                                                     self.cfg.pad_id)
    x = self.embedder(mc).encode(tokens)
    masks = _self_masks(mc, segment_ids, causal=False)
    return self.run(mc, EncoderBlock, {}, x, deterministic, positions, masks)[0]


class Decoder(_StackRunner):
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
    if cache_length is not None and tokens.shape[1] > cache_length:
      raise ValueError(f"cache_length {cache_length} cannot hold the {tokens.shape[1]} tokens "
                       "decoding starts from")
    if cache is not None:
      if tokens.shape[1] != 1:
        raise ValueError(f"a cached decoding step takes one token per row, got {tokens.shape}")
      positions = cache["index"][:, None]
      segment_ids = jnp.ones_like(tokens, jnp.int32)
      encoder_segment_ids = cache["encoder_segment_ids"]
      masks = _self_masks(mc, segment_ids, True, positions)
    else:
      segment_ids, positions = _segments_and_positions(tokens, segment_ids, positions, c.pad_id)
      masks = _self_masks(mc, segment_ids, causal=True)
    if c.shared_embedding:
      table = shared_embedder["embedding"]
      x = embed_tokens(table, tokens, self.run_options.activation_dtype, c.eoi_id,
                       shared_embedder.get("eoi_embedding"))
      to_logits = lambda y: embedding_logits(table, y, self.run_options.activation_dtype)
    else:
      embedder = self.embedder(mc)
      x, to_logits = embedder.encode(tokens), embedder.decode
    cross_mask = masks_lib.MaskSpec(segment_ids, encoder_segment_ids)
    block_kwargs = {"encoder_hidden_size": c.encoder.hidden_size, "merged": c.merged_attention,
                    "cross_attention_layers": c.cross_attention_layers,
                    "cache_length": cache_length}
    x, layer_caches = self.run(mc, DecoderBlock, block_kwargs, x, deterministic, positions,
                               masks, encoded, cross_mask, shared_layers=shared_layers,
                               cache=None if cache is None else layout.layer_params(cache))
    logits = to_logits(x)
    cap = mc.final_logit_softcapping
    if cap is not None:
      logits = cap * jnp.tanh(logits / cap)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    if cache is None and cache_length is None:
      return logits, None
    return logits, {"index": positions[:, -1] + 1, "encoder_segment_ids": encoder_segment_ids,
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


def abstract_params(cfg: T5GemmaConfig, run: RunOptions = RunOptions(),
                    boxed: bool = True) -> Any:
  """Parameter shapes (`jax.ShapeDtypeStruct`s) without allocating anything.

  Args:
    cfg: the architecture.
    run: the run options (the layout and dtype of the parameters follow them).
    boxed: keep flax's `nn.Partitioned` boxes (logical axis names, for sharding rules).
  """
  shapes = jax.eval_shape(functools.partial(init_params, cfg, run=run), jax.random.PRNGKey(0))
  return shapes if boxed else nn.meta.unbox(shapes)


def _check_segments(encoder_segment_ids, decoder_segment_ids):
  if (encoder_segment_ids is None) != (decoder_segment_ids is None):
    raise ValueError("packed inputs need both encoder_segment_ids and decoder_segment_ids "
                     "(cross-attention matches segments across the two)")
