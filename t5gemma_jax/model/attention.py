"""Gemma attention: one module for training and decoding (self- and cross-attention, GQA,
softcap, T5Gemma 2's merged attention), with an optional KV cache.

Masks come from `t5gemma_jax.model.masks`. A decoding cache per attention module, laid out
as the attention products read it (heads first, keys transposed), so that a step copies
nothing (XLA transposed every cached key on every step otherwise):
  self-attention: {"k": [B, K, Dh, slots (+ S)], "v": [B, K, slots (+ S), Dh],
    "pos": int32 [B, slots]}: a ring of `slots` positions (the sliding window on sliding
    layers, every position on full ones); position p lives in slot p % slots, "pos" holds
    which (-1 = empty). With merged attention the encoder's S keys follow the ring in the same
    buffers, projected once.
  cross-attention: {"k": [B, K, Dh, S], "v": [B, K, S, Dh]}: the encoder's, projected once.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from t5gemma_jax.model import attention_kernels
from t5gemma_jax.model.layers import Einsum, RMSNorm, apply_rope
from t5gemma_jax.model.masks import MaskSpec, MergedMaskSpec

Array = jax.Array
DType = Any
Cache = dict[str, Array]


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float,
                          softcap: Optional[float], dropout_rate: float = 0.0,
                          deterministic: bool = True, dropout_rng: Optional[Array] = None,
                          heads_first: bool = False) -> Array:
  """Grouped-query attention with Gemma 2's score softcap.

  Query head j reads kv head j // (H / K), the layout of HF's `repeat_kv`.

  Args:
    q: [B, T, H, Dh]; k, v: [B, S, K, Dh], or with `heads_first` (the decode cache's layout)
      k [B, K, Dh, S] and v [B, K, S, Dh]; mask: bool [B, T, S].
    scale: multiplies q.k (query_pre_attn_scalar ** -0.5).
    softcap: c in `c * tanh(s / c)`, applied before the mask; None disables it.

  Returns:
    [B, T, H, Dh] in q.dtype.
  """
  b, t, h, dh = q.shape
  kv_heads = k.shape[1 if heads_first else 2]
  # Heads before time, explicitly: XLA's CPU dot emitter then multiplies contiguous
  # [T, Dh] x [Dh, S] tiles (3x faster than letting the einsum pick strided operands).
  q = q.reshape(b, t, kv_heads, h // kv_heads, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
  if heads_first:
    scores = jnp.einsum("bkgth,bkhs->bkgts", q, k, preferred_element_type=jnp.float32)
  else:
    k = k.transpose(0, 2, 1, 3)  # [B, K, S, Dh]
    v = v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * scale
  if softcap is not None:
    scores = softcap * jnp.tanh(scores / softcap)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  if dropout_rate > 0.0 and not deterministic:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0).astype(v.dtype)
  out = jnp.einsum("bkgts,bksh->bkgth", probs, v)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


class Attention(nn.Module):
  """Gemma attention: self-attention with RoPE, cross-attention (no RoPE) over `kv_input`, or
  T5Gemma 2's merged attention (self keys with RoPE then `merged_input` keys without).

  Attributes:
    features: width D of the queries' input x (and of the output).
    num_heads, num_kv_heads, head_dim: head layout (GQA when num_kv_heads < num_heads).
    query_pre_attn_scalar: scores are scaled by its inverse square root.
    softcap: attention logit softcap, or None.
    rope_theta: RoPE base for self-attention; None for cross-attention.
    kv_features: width of `kv_input` (the encoder width for cross-attention); None = features.
    impl: "xla" (`dot_product_attention`), "cudnn", "triton" or "splash"
      (`attention_kernels`); decoding steps always take the XLA path (one query, keys in ring
      order).
    rope_factor: linear RoPE scaling factor.
    qk_norm: RMSNorm (eps `norm_eps`) over head_dim of queries and keys, before RoPE.
  """

  features: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  query_pre_attn_scalar: float
  softcap: Optional[float]
  rope_theta: Optional[float]
  kv_features: Optional[int] = None
  attention_dropout: float = 0.0
  impl: str = "xla"
  rope_factor: float = 1.0
  qk_norm: bool = False
  norm_eps: float = 1e-6
  deterministic: bool = True
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def setup(self):
    d, h, kh, dh = self.features, self.num_heads, self.num_kv_heads, self.head_dim
    d_kv = self.kv_features or d
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.q = Einsum((d, h, dh), ("embed", "heads", "head_dim"), out_axis=(1, 2), **kw)
    self.k = Einsum((d_kv, kh, dh), ("embed", "kv_heads", "head_dim"), out_axis=(1, 2), **kw)
    self.v = Einsum((d_kv, kh, dh), ("embed", "kv_heads", "head_dim"), out_axis=(1, 2), **kw)
    self.o = Einsum((h, dh, d), ("heads", "head_dim", "embed"), in_axis=(0, 1), out_axis=2, **kw)
    if self.qk_norm:
      norm = dict(axis_name="head_dim", param_dtype=self.param_dtype)
      self.q_norm = RMSNorm(self.norm_eps, **norm)
      self.k_norm = RMSNorm(self.norm_eps, **norm)

  def keys_values(self, src: Array, positions: Optional[Array] = None) -> tuple[Array, Array]:
    """[B, S, D_kv] -> keys (k_norm'd; rotated when `positions` int [B, S] are given) and
    values, both [B, S, K, Dh]. Merged attention's encoder keys are these without RoPE."""
    k = self.k("bsd,dkh->bskh", src)
    if self.qk_norm:
      k = self.k_norm(k)
    if positions is not None:
      k = apply_rope(k, positions, self.rope_theta, self.rope_factor)
    return k, self.v("bsd,dkh->bskh", src)

  def __call__(self, x: Array, mask: "MaskSpec | Array", positions: Optional[Array] = None,
               kv_input: Optional[Array] = None, merged_input: Optional[Array] = None,
               merged_mask: Optional[MaskSpec] = None, cache: Optional[Cache] = None,
               cache_length: Optional[int] = None) -> tuple[Array, Optional[Cache]]:
    """Attention over this layer's keys.

    Args:
      x: [B, T, D] queries' input.
      mask: a `MaskSpec`, or bool [B, T, S] (XLA path only). In a cached step its key side is
        replaced by the ring's slots.
      positions: int [B, T] (self-attention only).
      kv_input: [B, S, D_kv] for cross-attention (unused in cached steps).
      merged_input: [B, S, D] (the encoder output) for merged attention, whose keys are
        [self (T); merged (S)]; `merged_mask` (a MaskSpec [B, T, S]) masks that part (and is
        given in cached steps too, where the encoder keys come from the cache).
      cache: this module's decoding cache (see the module docstring); None = no cache.
      cache_length: start decoding: make a cache of this many positions (sliding layers keep
        min(window, cache_length) slots) from this call's keys, which attend to each other
        as in training.

    Returns:
      ([B, T, D], the updated cache, or None when neither cache nor cache_length is given).
    """
    decoding = cache is not None or cache_length is not None
    q = self.q("btd,dnh->btnh", x)
    if self.qk_norm:
      q = self.q_norm(q)
    if self.rope_theta is None:
      # Cross-attention: the encoder's keys, projected once per input.
      if cache is not None:
        k, v, new_cache = cache["k"], cache["v"], cache
      else:
        k, v = self.keys_values(kv_input)
        new_cache = {"k": _keys_layout(k), "v": _values_layout(v)} if decoding else None
    else:
      if kv_input is not None:
        raise ValueError("RoPE applies to self-attention only; got kv_input with rope_theta set")
      q = apply_rope(q, positions, self.rope_theta, self.rope_factor)
      k, v = self.keys_values(x, positions)
      k, v, mask, new_cache = self._self_keys(k, v, mask, positions, merged_input, merged_mask,
                                              cache, cache_length)
    q = checkpoint_name(q, "query_proj")
    k = checkpoint_name(k, "key_proj")
    v = checkpoint_name(v, "value_proj")

    dropout_rng = None
    if self.attention_dropout > 0.0 and not self.deterministic:
      dropout_rng = self.make_rng("dropout")
    scale = self.query_pre_attn_scalar ** -0.5
    symbolic = isinstance(mask, (MaskSpec, MergedMaskSpec))
    if self.impl == "xla" or not symbolic or decoding:
      dense = mask.dense() if symbolic else mask
      out = dot_product_attention(q, k, v, dense, scale=scale, softcap=self.softcap,
                                  dropout_rate=self.attention_dropout,
                                  deterministic=self.deterministic, dropout_rng=dropout_rng,
                                  heads_first=cache is not None)
    else:
      out = attention_kernels.fused_attention(self.impl, q, k, v, mask, scale=scale,
                                              softcap=self.softcap)
    out = checkpoint_name(out, "attention_out")
    # Heads and head_dim merged on both sides: contracted as [H, Dh] pairs, XLA may lay the
    # kernel out [Dh, H] and transpose the whole weight on every call (it did on CPU).
    b, t, h, dh = out.shape
    return self.o("btf,fd->btd", out.reshape(b, t, h * dh), (h * dh, self.features)), new_cache

  def _self_keys(self, k, v, mask, positions, merged_input, merged_mask, cache, cache_length):
    """Self-attention's keys, values and mask (merged with the encoder's), and the new cache."""
    if cache is not None:
      # A cached step: this step's keys join the ring, the query reads every slot.
      new_cache = _write_ring(cache, k, v, positions)
      pos = new_cache["pos"]
      mask = mask.over_keys((pos >= 0).astype(jnp.int32), pos)
      if merged_mask is not None:
        mask = MergedMaskSpec(mask, merged_mask)
      return new_cache["k"], new_cache["v"], mask, new_cache
    keys, values, new_cache = k, v, None
    if cache_length is not None:
      b, _, kh, dh = k.shape
      slots = cache_length if mask.window is None else min(mask.window, cache_length)
      empty = {"k": jnp.zeros((b, kh, dh, slots), k.dtype),
               "v": jnp.zeros((b, kh, slots, dh), v.dtype),
               "pos": jnp.full((b, slots), -1, jnp.int32)}
      new_cache = _write_ring(empty, k, v, positions, valid=mask.q_segments > 0)
    if merged_input is not None:
      # The encoder keys reuse this layer's k/v kernels and k_norm, without RoPE (HF
      # T5Gemma2MergedAttention); the concatenation lets one softmax weigh both sources.
      k_enc, v_enc = self.keys_values(merged_input)
      keys = jnp.concatenate([k, k_enc], axis=1)
      values = jnp.concatenate([v, v_enc], axis=1)
      if isinstance(mask, MaskSpec):
        mask = MergedMaskSpec(mask, merged_mask)
      else:
        mask = jnp.concatenate([mask, merged_mask.dense()], axis=-1)
      if new_cache is not None:
        new_cache = dict(new_cache,
                         k=jnp.concatenate([new_cache["k"], _keys_layout(k_enc)], axis=3),
                         v=jnp.concatenate([new_cache["v"], _values_layout(v_enc)], axis=2))
    return keys, values, mask, new_cache


def _keys_layout(k: Array) -> Array:
  """Keys [B, S, K, Dh] -> [B, K, Dh, S], the cache's layout."""
  return k.transpose(0, 2, 3, 1)


def _values_layout(v: Array) -> Array:
  """Values [B, S, K, Dh] -> [B, K, S, Dh], the cache's layout."""
  return v.transpose(0, 2, 1, 3)


def _write_ring(cache: Cache, k: Array, v: Array, positions: Array,
                valid: Optional[Array] = None) -> Cache:
  """The cache with keys/values [B, T, K, Dh] at `positions` int [B, T] written into their
  ring slots (position p in slot p % slots; of more than `slots` new tokens of a row only its
  last `slots` stay). `valid` bool [B, T] (default all): padding (a right-padded prompt) is
  not written. Buffers longer than the ring (merged attention's encoder part) keep the rest."""
  slots = cache["pos"].shape[1]
  if valid is None:
    valid = jnp.ones(positions.shape, bool)
  last = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
  write = valid & (positions > last - slots)
  # Slot index `slots` is out of range: those updates are dropped, so the kept ones never
  # collide (they are fewer than `slots` consecutive positions).
  index = jnp.where(write, positions % slots, slots)  # [B, T]
  rows = jnp.arange(k.shape[0])[:, None]
  rows_, heads, slot = rows[:, :, None], jnp.arange(k.shape[2])[None, :, None], index[:, None, :]
  # Both index [B, K, T] (+ Dh): the advanced indices come first whatever sits between them.
  new_k = _values_layout(k).astype(cache["k"].dtype)
  new_v = _values_layout(v).astype(cache["v"].dtype)
  return dict(cache, k=cache["k"].at[rows_, heads, :, slot].set(new_k, mode="drop"),
              v=cache["v"].at[rows_, heads, slot].set(new_v, mode="drop"),
              pos=cache["pos"].at[rows, index].set(positions.astype(jnp.int32), mode="drop"))
