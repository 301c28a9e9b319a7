"""Encoder and decoder blocks, the layer stacks (plain or scanned, with remat), and `T5Gemma`.

Parameter tree (unscanned):
  encoder/{embedder/embedding, layers_{i}/..., final_norm/scale}
  decoder/{embedder/embedding, layers_{i}/..., final_norm/scale}
T5Gemma 2 (`shared_embedding`) has no decoder/embedder: the decoder and the output layer read
encoder/embedder (plus encoder/embedder/eoi_embedding when `eoi_id` is set); with
`merged_attention` decoder layers have no cross_attn nor cross norms; with `share_blocks` the
decoder has no layers at all (it runs the encoder's); with `cross_attention_layers="global"`
only full-attention decoder layers have cross-attention.
With `scan_layers=True` the leading `R = num_layers // period` repeats of the layer-type pattern
live under `layers/block_{s}` with a leading [R] axis (logical name "layers"); leftover layers,
if any, keep their `layers_{i}` names. `t5gemma_jax.model.layout` converts between the two.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5gemma_jax.config import SLIDING, ModuleConfig, T5GemmaConfig, layer_reads_encoder
from t5gemma_jax.model import attention as attn_lib
from t5gemma_jax.model import layout
from t5gemma_jax.model.layers import (Embedder, FeedForward, RMSNorm, constrain, embed_tokens,
                                      embedding_logits)

Array = jax.Array

# The matmul outputs that remat_policy="minimal" keeps (see checkpoint_name calls).
SAVED_NAMES = ("query_proj", "key_proj", "value_proj", "attention_out", "mlp_gate", "mlp_up",
               "mlp_out")


def remat_policy(name: str) -> Optional[Callable]:
  """Maps a config remat policy name to a jax.checkpoint policy (None = no remat)."""
  if name == "none":
    return None
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  if name == "minimal":
    return jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES)
  raise ValueError(f"unknown remat_policy {name!r}")


class _SubBlock(nn.Module):
  """`x + dropout(post_norm(f(pre_norm(x))))`: the wrapper Gemma 2 puts around each sub-layer."""

  cfg: ModuleConfig
  deterministic: bool
  param_dtype: Any
  attention_impl: str = "xla"

  def residual(self, x: Array, f: Callable[[Array], Array], pre: str, post: str) -> Array:
    norm = dict(eps=self.cfg.rms_norm_eps, param_dtype=self.param_dtype)
    y = f(RMSNorm(name=pre, **norm)(x))
    y = RMSNorm(name=post, **norm)(y)
    y = nn.Dropout(self.cfg.dropout_rate)(y, deterministic=self.deterministic)
    return x + y

  def attention(self, name: str, layer_type: Optional[str], **kw) -> attn_lib.Attention:
    """This stack's attention module; `layer_type` None = cross-attention (no RoPE)."""
    c = self.cfg
    theta, factor = c.rope_for(layer_type) if layer_type is not None else (None, 1.0)
    return attn_lib.Attention(c.num_heads, c.num_kv_heads, c.head_dim, c.query_pre_attn_scalar,
                              c.attn_logit_softcapping, theta, rope_factor=factor,
                              qk_norm=c.qk_norm, norm_eps=c.rms_norm_eps,
                              attention_dropout=c.attention_dropout, impl=self.attention_impl,
                              deterministic=self.deterministic, dtype=self.dtype,
                              param_dtype=self.param_dtype, name=name, **kw)


class EncoderBlock(_SubBlock):
  """Bidirectional self-attention then the MLP."""

  layer_type: str = SLIDING
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, positions: Array, masks: dict) -> Array:
    """x [B, S, D]; positions int [B, S]; masks {layer_type: MaskSpec} -> [B, S, D]."""
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, deterministic=self.deterministic)
    self_attn = self.attention("self_attn", self.layer_type)
    x = self.residual(x, lambda h: self_attn(h, masks[self.layer_type], positions),
                      "pre_self_attn_norm", "post_self_attn_norm")
    mlp = FeedForward(c.hidden_size, c.intermediate_size, c.dropout_rate, name="mlp", **kw)
    x = self.residual(x, mlp, "pre_ffw_norm", "post_ffw_norm")
    return constrain(x)


class DecoderBlock(_SubBlock):
  """Causal self-attention, cross-attention over the encoder output, then the MLP.

  With `merged` (T5Gemma 2) the two attentions are one: `self_attn` reads
  [decoder keys; encoder keys] and there is no cross-attention sub-layer. With
  `cross_attention_layers="global"` a sliding layer does not read the encoder at all.
  """

  layer_type: str = SLIDING
  encoder_hidden_size: int = 0
  merged: bool = False
  cross_attention_layers: str = "all"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, positions: Array, masks: dict, encoded: Array,
               cross_mask: attn_lib.MaskSpec) -> Array:
    """x [B, T, D]; encoded [B, S, D_enc]; cross_mask a MaskSpec -> [B, T, D]."""
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, deterministic=self.deterministic)
    reads_encoder = layer_reads_encoder(self.cross_attention_layers, self.layer_type)
    self_attn = self.attention("self_attn", self.layer_type)
    merged = {}
    if self.merged and reads_encoder:
      merged = dict(merged_input=encoded, merged_mask=cross_mask)
    x = self.residual(x, lambda h: self_attn(h, masks[self.layer_type], positions, **merged),
                      "pre_self_attn_norm", "post_self_attn_norm")
    if not self.merged and reads_encoder:
      cross_attn = self.attention("cross_attn", None, kv_features=self.encoder_hidden_size)
      x = self.residual(x, lambda h: cross_attn(h, cross_mask, kv_input=encoded),
                        "pre_cross_attn_norm", "post_cross_attn_norm")
    mlp = FeedForward(c.hidden_size, c.intermediate_size, c.dropout_rate, name="mlp", **kw)
    x = self.residual(x, mlp, "pre_ffw_norm", "post_ffw_norm")
    return constrain(x)


class _Unit(nn.Module):
  """One repeat of the layer-type pattern (e.g. a sliding + full pair): the scanned body."""

  make_block: Callable[..., nn.Module]
  layer_types: tuple[str, ...]

  @nn.compact
  def __call__(self, x: Array, *args) -> tuple[Array, None]:
    for s, layer_type in enumerate(self.layer_types):
      x = self.make_block(layer_type=layer_type, name=f"block_{s}")(x, *args)
    return x, None


def _self_masks(cfg: ModuleConfig, segment_ids: Array, causal: bool) -> dict:
  """One self-attention `MaskSpec` per layer type used by the stack."""
  return {t: attn_lib.MaskSpec(segment_ids, segment_ids, causal,
                               cfg.sliding_window if t == SLIDING else None,
                               split_window=cfg.encoder_window == "split")
          for t in sorted(set(cfg.layer_types))}


def _segments_and_positions(tokens, segment_ids, positions, pad_id):
  if segment_ids is None:
    segment_ids = attn_lib.segment_ids_from_tokens(tokens, pad_id)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  elif positions is None:
    positions = attn_lib.positions_from_segments(segment_ids)
  return segment_ids, positions


class _StackRunner(nn.Module):
  """Shared embed -> blocks -> final norm plumbing of the encoder and the decoder."""

  cfg: T5GemmaConfig

  def run(self, module_cfg: ModuleConfig, block_cls: type, extra_block_kwargs: dict,
          x: Array, deterministic: bool, *args, shared_layers: Optional[dict] = None) -> Array:
    c = self.cfg
    x = nn.Dropout(module_cfg.dropout_rate)(x, deterministic=deterministic)
    x = constrain(x)
    block_kwargs = dict(cfg=module_cfg, deterministic=deterministic, dtype=c.activation_dtype,
                        param_dtype=c.parameter_dtype, attention_impl=c.attention_impl,
                        **extra_block_kwargs)
    if shared_layers is None:
      x = self.run_layers(module_cfg, block_cls, block_kwargs, x, *args)
    else:
      x = self.run_shared_layers(module_cfg, block_cls, block_kwargs, shared_layers, x, *args)
    x = RMSNorm(module_cfg.rms_norm_eps, param_dtype=c.parameter_dtype, name="final_norm")(x)
    return nn.Dropout(module_cfg.dropout_rate)(x, deterministic=deterministic)

  def _block_factory(self, module_cfg: ModuleConfig, block_cls: type, block_kwargs: dict):
    policy = remat_policy(self.cfg.remat_policy)
    if policy is not None:
      block_cls = nn.remat(block_cls, policy=policy, prevent_cse=not self.cfg.scan_layers)

    def make_block(**kw):
      return block_cls(**block_kwargs, **kw)

    types, period = module_cfg.layer_types, module_cfg.layer_period
    repeats = len(types) // period if self.cfg.scan_layers else 0
    return make_block, types, period, repeats

  def run_shared_layers(self, module_cfg: ModuleConfig, block_cls: type, block_kwargs: dict,
                        shared: dict, x: Array, *args) -> Array:
    """Runs every layer with parameters owned by another stack (`share_blocks`).

    `shared` is that stack's params in the same layout (`layers/block_{s}` with a leading [R]
    axis and/or `layers_{i}`). The blocks are applied as pure functions of those arrays, so
    gradients flow to the owner and this stack creates no layer params.
    """
    make_block, types, period, repeats = self._block_factory(module_cfg, block_cls,
                                                             block_kwargs)
    rng = None if block_kwargs["deterministic"] else self.make_rng("dropout")

    def apply(module, params, x, rng):
      rngs = {} if rng is None else {"dropout": rng}
      return module.apply({"params": params}, x, *args, rngs=rngs)

    def next_rng(rng):
      return (None, None) if rng is None else tuple(jax.random.split(rng))

    if repeats:
      unit = _Unit(make_block, types[:period], parent=None)

      def body(carry, unit_params):
        x, rng = carry
        rng, sub = next_rng(rng)
        return (apply(unit, unit_params, x, sub)[0], rng), None

      (x, rng), _ = jax.lax.scan(body, (x, rng), shared["layers"])
    for i in range(repeats * period, len(types)):
      rng, sub = next_rng(rng)
      x = apply(make_block(layer_type=types[i], parent=None), shared[f"layers_{i}"], x, sub)
    return x

  def run_layers(self, module_cfg: ModuleConfig, block_cls: type, block_kwargs: dict, x: Array,
                 *args) -> Array:
    """Runs every layer, unrolled or scanned over the repeating unit of layer types."""
    make_block, types, period, repeats = self._block_factory(module_cfg, block_cls,
                                                             block_kwargs)
    if repeats:
      scanned = nn.scan(_Unit, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast,) * len(args), length=repeats,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(make_block, types[:period], name="layers")(x, *args)
    for i in range(repeats * period, len(types)):
      x = make_block(layer_type=types[i], name=f"layers_{i}")(x, *args)
    return x

  def embedder(self, module_cfg: ModuleConfig) -> Embedder:
    return Embedder(module_cfg.vocab_size, module_cfg.hidden_size, eoi_id=self.cfg.eoi_id,
                    dtype=self.cfg.activation_dtype, param_dtype=self.cfg.parameter_dtype,
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
    return self.run(mc, EncoderBlock, {}, x, deterministic, positions, masks)


class Decoder(_StackRunner):
  """Causal decoder with cross-attention; its embedding is tied to the output layer."""

  @nn.compact
  def __call__(self, encoded: Array, encoder_segment_ids: Array, tokens: Array,
               segment_ids: Optional[Array] = None, positions: Optional[Array] = None,
               deterministic: bool = True, shared_embedder: Optional[dict] = None,
               shared_layers: Optional[dict] = None) -> Array:
    """Returns float32 logits [B, T, V], softcapped by final_logit_softcapping.

    `shared_embedder` is the encoder's embedder params (with `cfg.shared_embedding`) and
    `shared_layers` its layer params (with `cfg.share_blocks`); this stack then creates no
    table / no layers of its own.
    """
    c, mc = self.cfg, self.cfg.decoder
    segment_ids, positions = _segments_and_positions(tokens, segment_ids, positions, c.pad_id)
    if c.shared_embedding:
      table = shared_embedder["embedding"]
      x = embed_tokens(table, tokens, c.activation_dtype, c.eoi_id,
                       shared_embedder.get("eoi_embedding"))
      to_logits = lambda y: embedding_logits(table, y, c.activation_dtype)
    else:
      embedder = self.embedder(mc)
      x, to_logits = embedder.encode(tokens), embedder.decode
    masks = _self_masks(mc, segment_ids, causal=True)
    cross_mask = attn_lib.MaskSpec(segment_ids, encoder_segment_ids)
    block_kwargs = {"encoder_hidden_size": c.encoder.hidden_size, "merged": c.merged_attention,
                    "cross_attention_layers": c.cross_attention_layers}
    x = self.run(mc, DecoderBlock, block_kwargs, x, deterministic, positions, masks, encoded,
                 cross_mask, shared_layers=shared_layers)
    logits = to_logits(x)
    cap = mc.final_logit_softcapping
    if cap is not None:
      logits = cap * jnp.tanh(logits / cap)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class T5Gemma(nn.Module):
  """The T5Gemma encoder-decoder.

  `__call__` runs both stacks; `encode` and `decode` run one each (decode takes the encoder's
  tokens or segment ids to mask cross-attention).
  """

  cfg: T5GemmaConfig

  def setup(self):
    self.encoder = Encoder(self.cfg)
    self.decoder = Decoder(self.cfg)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
             encoder_positions: Optional[Array] = None, deterministic: bool = True) -> Array:
    """int32 [B, S] -> [B, S, D_enc]."""
    return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                        deterministic)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             encoder_segment_ids: Optional[Array] = None,
             decoder_segment_ids: Optional[Array] = None,
             decoder_positions: Optional[Array] = None, deterministic: bool = True) -> Array:
    """encoded [B, S, D_enc], tokens int32 [B, S] and [B, T] -> float32 logits [B, T, V]."""
    _check_segments(encoder_segment_ids, decoder_segment_ids)
    if encoder_segment_ids is None:
      encoder_segment_ids = attn_lib.segment_ids_from_tokens(encoder_input_tokens,
                                                             self.cfg.pad_id)
    # The encoder's table / blocks, read from the variables (the encoder need not run here).
    encoder_params = None
    if self.cfg.shared_embedding or self.cfg.share_blocks:
      encoder_params = nn.meta.unbox(self.encoder.variables["params"])
    shared_embedder = encoder_params["embedder"] if self.cfg.shared_embedding else None
    shared_layers = layout.layer_params(encoder_params) if self.cfg.share_blocks else None
    return self.decoder(encoded, encoder_segment_ids, decoder_input_tokens, decoder_segment_ids,
                        decoder_positions, deterministic, shared_embedder, shared_layers)

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


def init_params(cfg: T5GemmaConfig, rng: Array) -> Any:
  """Fresh parameters (boxed with their logical axis names; jit or eval_shape it).

  Initialisation traces the model on one-token inputs. Parameters do not depend on the
  attention implementation, and fused kernels (splash) take only whole blocks of tokens, so
  the XLA path is traced here whatever `cfg.attention_impl` says.
  """
  tokens = jnp.ones((1, 1), jnp.int32)
  return T5Gemma(cfg.replace(attention_impl="xla")).init(rng, tokens, tokens)["params"]


def abstract_params(cfg: T5GemmaConfig, boxed: bool = True) -> Any:
  """Parameter shapes (`jax.ShapeDtypeStruct`s) without allocating anything.

  Args:
    cfg: the model config.
    boxed: keep flax's `nn.Partitioned` boxes (logical axis names, for sharding rules).
  """
  shapes = jax.eval_shape(functools.partial(init_params, cfg), jax.random.PRNGKey(0))
  return shapes if boxed else nn.meta.unbox(shapes)


def _check_segments(encoder_segment_ids, decoder_segment_ids):
  if (encoder_segment_ids is None) != (decoder_segment_ids is None):
    raise ValueError("packed inputs need both encoder_segment_ids and decoder_segment_ids "
                     "(cross-attention matches segments across the two)")
