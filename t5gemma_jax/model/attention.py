"""Attention masks and the Gemma 2 attention layer (self- and cross-attention, GQA, softcap).

Masks are boolean [B, Q, K] arrays (True = may attend) built from segment ids: 0 marks padding,
equal positive ids mark tokens of the same packed example. A row without packing simply has
segment id 1 on every real token.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
from flax import struct
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from t5gemma_jax.model import attention_kernels
from t5gemma_jax.model.layers import Einsum, RMSNorm, apply_rope

Array = jax.Array
DType = Any


def segment_ids_from_tokens(tokens: Array, pad_id: int = 0) -> Array:
  """int [B, T] tokens -> int32 [B, T] segment ids: 1 on real tokens, 0 on padding."""
  return (tokens != pad_id).astype(jnp.int32)


def positions_from_segments(segment_ids: Array) -> Array:
  """Positions that restart at 0 at the start of every segment (packed rows).

  Args:
    segment_ids: int [B, T].

  Returns:
    int32 [B, T]; for an unpacked row this is simply arange(T).
  """
  t = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
  previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  starts = jnp.where(segment_ids != previous, idx, 0)
  return idx - jax.lax.cummax(starts, axis=1)


def _segment_mask(q_segments: Array, k_segments: Array) -> Array:
  """[B, Q, K]: keys must be real and, for real queries, of the query's own segment.

  Padding queries (segment 0) see every real key. Their outputs are never used, but this keeps
  them finite and identical to the reference, whose padding masks only keys.
  """
  q = q_segments[:, :, None]
  k = k_segments[:, None, :]
  return (k > 0) & ((q == k) | (q == 0))


def window_offsets(window: Optional[int], causal: bool,
                   split: bool = False) -> tuple[Optional[int], Optional[int]]:
  """The keys a query i sees as offsets: lo <= j - i <= hi (None = unbounded that way).

  The one statement of the window rule; the XLA mask, the splash pattern and the FLOP count
  all read it (transformers 5.x semantics):
    causal, no window:        j <= i                     (None, 0)
    causal, window W:         i - W < j <= i             (1 - W, 0)
    bidirectional, no window: every key                  (None, None)
    symmetric window W:       |i - j| <= W               (-W, W)       T5Gemma 1
    split window W:           1 - ceil(W/2) <= j - i <= floor(W/2)      T5Gemma 2 (W keys)
  """
  if causal:
    return (None if window is None else 1 - window), 0
  if window is None:
    return None, None
  if split:
    return 1 - (window + 1) // 2, window // 2
  return -window, window


@struct.dataclass
class MaskSpec:
  """Who may attend to whom, as segment ids plus the layer's pattern (no [B, T, S] array).

  Kept symbolic so that the XLA path builds the boolean mask inside the attention fusion (one
  comparison per score, nothing materialised in memory) and fused kernels (cuDNN, splash) get
  the structure they need.

  Attributes:
    q_segments: int [B, T] segment ids of the queries (0 = padding).
    kv_segments: int [B, S] segment ids of the keys.
    causal: keys after the query are hidden (decoder self-attention).
    window: sliding window W, or None. Causal: i - W < j <= i. Bidirectional: |i - j| <= W
      (T5Gemma 1), or with `split_window` 1 - ceil(W/2) <= j - i <= floor(W/2) (T5Gemma 2:
      W keys, one more after the query than before it), all as transformers 5.x.
    split_window: use T5Gemma 2's bidirectional window (ignored when causal).
  """

  q_segments: Array
  kv_segments: Array
  causal: bool = struct.field(pytree_node=False, default=False)
  window: Optional[int] = struct.field(pytree_node=False, default=None)
  split_window: bool = struct.field(pytree_node=False, default=False)

  def dense(self) -> Array:
    """The boolean [B, T, S] mask (True = may attend)."""
    mask = _segment_mask(self.q_segments, self.kv_segments)
    lo, hi = self.offsets
    if lo is None and hi is None:
      return mask
    i = jnp.arange(self.q_segments.shape[-1])[:, None]
    j = jnp.arange(self.kv_segments.shape[-1])[None, :]
    if lo is not None:
      mask &= (j - i >= lo)[None]
    if hi is not None:
      mask &= (j - i <= hi)[None]
    return mask

  @property
  def offsets(self) -> tuple[Optional[int], Optional[int]]:
    """`window_offsets` of this pattern."""
    return window_offsets(self.window, self.causal, self.split_window)


@struct.dataclass
class MergedMaskSpec:
  """T5Gemma 2's merged attention: keys are [decoder (T); encoder (S)], one softmax.

  Attributes:
    self_mask: the decoder part ([B, T, T], causal, maybe windowed).
    cross_mask: the encoder part ([B, T, S], segment-matched only).
  """

  self_mask: MaskSpec
  cross_mask: MaskSpec

  def dense(self) -> Array:
    """The boolean [B, T, T + S] mask (True = may attend)."""
    return jnp.concatenate([self.self_mask.dense(), self.cross_mask.dense()], axis=-1)


def self_attention_mask(segment_ids: Array, *, causal: bool,
                        sliding_window: Optional[int] = None) -> Array:
  """Boolean [B, T, T] mask for self-attention (see `MaskSpec`)."""
  return MaskSpec(segment_ids, segment_ids, causal, sliding_window).dense()


def cross_attention_mask(decoder_segment_ids: Array, encoder_segment_ids: Array) -> Array:
  """Boolean [B, T, S]: decoder tokens see the real encoder tokens of their own segment."""
  return MaskSpec(decoder_segment_ids, encoder_segment_ids).dense()


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float,
                          softcap: Optional[float], dropout_rate: float = 0.0,
                          deterministic: bool = True,
                          dropout_rng: Optional[Array] = None) -> Array:
  """Grouped-query attention with Gemma 2's score softcap.

  Query head j reads kv head j // (H / K), the layout of HF's `repeat_kv`.

  Args:
    q: [B, T, H, Dh]; k, v: [B, S, K, Dh]; mask: bool [B, T, S].
    scale: multiplies q.k (query_pre_attn_scalar ** -0.5).
    softcap: c in `c * tanh(s / c)`, applied before the mask; None disables it.

  Returns:
    [B, T, H, Dh] in q.dtype.
  """
  b, t, h, dh = q.shape
  kv_heads = k.shape[2]
  # Heads before time, explicitly: XLA's CPU dot emitter then multiplies contiguous
  # [T, Dh] x [Dh, S] tiles (3x faster than letting the einsum pick strided operands).
  q = q.reshape(b, t, kv_heads, h // kv_heads, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
  k = k.transpose(0, 2, 1, 3)  # [B, K, S, Dh]
  v = v.transpose(0, 2, 1, 3)
  scores = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
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
    num_heads, num_kv_heads, head_dim: head layout (GQA when num_kv_heads < num_heads).
    query_pre_attn_scalar: scores are scaled by its inverse square root.
    softcap: attention logit softcap, or None.
    rope_theta: RoPE base for self-attention; None for cross-attention.
    kv_features: width of `kv_input` (the encoder width for cross-attention); None = same as x.
    impl: "xla" (`dot_product_attention`), "cudnn" or "splash" (`attention_kernels`).
    rope_factor: linear RoPE scaling factor.
    qk_norm: RMSNorm (eps `norm_eps`) over head_dim of queries and keys, before RoPE.
  """

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

  @nn.compact
  def __call__(self, x: Array, mask: "MaskSpec | Array", positions: Optional[Array] = None,
               kv_input: Optional[Array] = None, merged_input: Optional[Array] = None,
               merged_mask: Optional[MaskSpec] = None) -> Array:
    """Args: x [B, T, D]; mask a `MaskSpec` or bool [B, T, S] (XLA path only); positions
    int [B, T] (self-attention only); kv_input [B, S, D_kv] for cross-attention;
    merged_input [B, S, D] (the encoder output) with merged_mask (a MaskSpec [B, T, S]) for
    merged attention, whose keys are [self (T); merged (S)].
    Returns [B, T, D]."""
    d = x.shape[-1]
    h, kh, dh = self.num_heads, self.num_kv_heads, self.head_dim
    src = x if kv_input is None else kv_input
    d_kv = self.kv_features or src.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = Einsum((d, h, dh), ("embed", "heads", "head_dim"), out_axis=(1, 2), name="q",
               **kw)("btd,dnh->btnh", x)
    kv_proj = {name: Einsum((d_kv, kh, dh), ("embed", "kv_heads", "head_dim"), out_axis=(1, 2),
                            name=name, **kw) for name in ("k", "v")}
    k = kv_proj["k"]("bsd,dkh->bskh", src)
    v = kv_proj["v"]("bsd,dkh->bskh", src)
    if self.qk_norm:
      q_norm = RMSNorm(self.norm_eps, axis_name="head_dim", param_dtype=self.param_dtype,
                       name="q_norm")
      k_norm = RMSNorm(self.norm_eps, axis_name="head_dim", param_dtype=self.param_dtype,
                       name="k_norm")
      q, k = q_norm(q), k_norm(k)
    if self.rope_theta is not None:
      if kv_input is not None:
        raise ValueError("RoPE applies to self-attention only; got kv_input with rope_theta set")
      q = apply_rope(q, positions, self.rope_theta, self.rope_factor)
      k = apply_rope(k, positions, self.rope_theta, self.rope_factor)
    if merged_input is not None:
      # The encoder keys reuse this layer's k/v kernels and k_norm, without RoPE (HF
      # T5Gemma2MergedAttention); the concatenation lets one softmax weigh both sources.
      k_c = kv_proj["k"]("bsd,dkh->bskh", merged_input)
      if self.qk_norm:
        k_c = k_norm(k_c)
      k = jnp.concatenate([k, k_c], axis=1)
      v = jnp.concatenate([v, kv_proj["v"]("bsd,dkh->bskh", merged_input)], axis=1)
      if isinstance(mask, MaskSpec):
        mask = MergedMaskSpec(mask, merged_mask)
      else:
        mask = jnp.concatenate([mask, merged_mask.dense()], axis=-1)
    q = checkpoint_name(q, "query_proj")
    k = checkpoint_name(k, "key_proj")
    v = checkpoint_name(v, "value_proj")

    dropout_rng = None
    if self.attention_dropout > 0.0 and not self.deterministic:
      dropout_rng = self.make_rng("dropout")
    scale = self.query_pre_attn_scalar ** -0.5
    symbolic = isinstance(mask, (MaskSpec, MergedMaskSpec))
    if self.impl == "xla" or not symbolic:
      dense = mask.dense() if symbolic else mask
      out = dot_product_attention(q, k, v, dense, scale=scale, softcap=self.softcap,
                                  dropout_rate=self.attention_dropout,
                                  deterministic=self.deterministic, dropout_rng=dropout_rng)
    else:
      out = attention_kernels.fused_attention(self.impl, q, k, v, mask, scale=scale,
                                              softcap=self.softcap)
    out = checkpoint_name(out, "attention_out")
    return Einsum((h, dh, d), ("heads", "head_dim", "embed"), in_axis=(0, 1), out_axis=2,
                  name="o", **kw)("btnh,nhd->btd", out)
