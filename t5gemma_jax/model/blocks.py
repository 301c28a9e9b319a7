"""The encoder and decoder blocks (Gemma 2 sub-layers around attention and the MLP), and remat.

Every block maps `(x, *inputs, cache)` to `(x, cache)`: the same code trains, teacher-forces
and decodes. Encoder blocks never cache (their cache is None). A decoder block's cache is
`{"self_attn": ..., "cross_attn": ...}` (one entry per attention module it has; see
`attention.Attention`), None outside decoding.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5gemma_jax.config import SLIDING, ModuleConfig, layer_reads_encoder
from t5gemma_jax.model.attention import Attention
from t5gemma_jax.model.layers import FeedForward, RMSNorm, constrain
from t5gemma_jax.model.masks import MaskSpec

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

  def attention(self, name: str, layer_type: Optional[str], **kw) -> Attention:
    """This stack's attention module; `layer_type` None = cross-attention (no RoPE)."""
    c = self.cfg
    theta, factor = c.rope_for(layer_type) if layer_type is not None else (None, 1.0)
    return Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                     c.query_pre_attn_scalar, c.attn_logit_softcapping, theta,
                     rope_factor=factor, qk_norm=c.qk_norm, norm_eps=c.rms_norm_eps,
                     attention_dropout=c.attention_dropout, impl=self.attention_impl,
                     deterministic=self.deterministic, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=name, **kw)

  def mlp(self, x: Array) -> Array:
    c = self.cfg
    mlp = FeedForward(c.hidden_size, c.intermediate_size, c.dropout_rate,
                      deterministic=self.deterministic, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="mlp")
    return constrain(self.residual(x, mlp, "pre_ffw_norm", "post_ffw_norm"))


class EncoderBlock(_SubBlock):
  """Bidirectional self-attention then the MLP."""

  layer_type: str = SLIDING
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, positions: Array, masks: dict,
               cache: None = None) -> tuple[Array, None]:
    """x [B, S, D]; positions int [B, S]; masks {layer_type: MaskSpec} -> ([B, S, D], None)."""
    self_attn = self.attention("self_attn", self.layer_type)
    x = self.residual(x, lambda h: self_attn(h, masks[self.layer_type], positions)[0],
                      "pre_self_attn_norm", "post_self_attn_norm")
    return self.mlp(x), None


class DecoderBlock(_SubBlock):
  """Causal self-attention, cross-attention over the encoder output, then the MLP.

  With `merged` (T5Gemma 2) the two attentions are one: `self_attn` reads
  [decoder keys; encoder keys] and there is no cross-attention sub-layer. With
  `cross_attention_layers="global"` a sliding layer does not read the encoder at all.

  Attributes:
    cache_length: start decoding: this call builds the layer's cache of that many positions.
  """

  layer_type: str = SLIDING
  encoder_hidden_size: int = 0
  merged: bool = False
  cross_attention_layers: str = "all"
  cache_length: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, positions: Array, masks: dict, encoded: Optional[Array],
               cross_mask: MaskSpec,
               cache: Optional[dict] = None) -> tuple[Array, Optional[dict]]:
    """Args: x [B, T, D]; positions int [B, T]; masks {layer_type: MaskSpec}; encoded
    [B, S, D_enc] (None in cached steps: the cache holds the encoder's keys); cross_mask a
    MaskSpec [B, T, S]; cache: this layer's cache in a cached step.

    Returns ([B, T, D], the layer's new cache or None outside decoding)."""
    reads_encoder = layer_reads_encoder(self.cross_attention_layers, self.layer_type)
    caches = cache or {}
    new = {}
    decode = dict(cache_length=self.cache_length)
    self_attn = self.attention("self_attn", self.layer_type)
    if self.merged and reads_encoder:
      decode.update(merged_input=encoded, merged_mask=cross_mask)

    def attend(h):
      out, new["self_attn"] = self_attn(h, masks[self.layer_type], positions,
                                        cache=caches.get("self_attn"), **decode)
      return out

    x = self.residual(x, attend, "pre_self_attn_norm", "post_self_attn_norm")
    if not self.merged and reads_encoder:
      cross_attn = self.attention("cross_attn", None, kv_features=self.encoder_hidden_size)

      def cross(h):
        out, new["cross_attn"] = cross_attn(h, cross_mask, kv_input=encoded,
                                            cache=caches.get("cross_attn"),
                                            cache_length=self.cache_length)
        return out

      x = self.residual(x, cross, "pre_cross_attn_norm", "post_cross_attn_norm")
    decoding = cache is not None or self.cache_length is not None
    return self.mlp(x), (new if decoding else None)
