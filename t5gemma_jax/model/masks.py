"""Which keys each query sees: segment ids, the window rule of each layer kind, `MaskSpec`.

The one statement of the attention pattern. The XLA path (`MaskSpec.dense`), the splash
kernel's static pattern (`window_offsets`), the decode cache's validity (a `MaskSpec` over the
ring's slots, `MaskSpec.over_keys`) and the FLOP count (`train/flops.py`) all read it.

Segment ids: 0 marks padding, equal positive ids mark tokens of the same packed example. A row
without packing simply has segment id 1 on every real token.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from t5gemma_jax.config import SLIDING, ModuleConfig

Array = jax.Array


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


def window_offsets(window: Optional[int], causal: bool,
                   split: bool = False) -> tuple[Optional[int], Optional[int]]:
  """The keys a query i sees as offsets: lo <= j - i <= hi (None = unbounded that way).

  transformers 5.x semantics:
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


def layer_window(cfg: ModuleConfig, layer_type: str) -> Optional[int]:
  """The sliding window of a layer of `layer_type` in this stack (None = full attention)."""
  return cfg.sliding_window if layer_type == SLIDING else None


def layer_offsets(cfg: ModuleConfig, layer_type: str,
                  causal: bool) -> tuple[Optional[int], Optional[int]]:
  """`window_offsets` of one layer kind: the stack's window on sliding layers, its
  `encoder_window` rule for bidirectional ones."""
  return window_offsets(layer_window(cfg, layer_type), causal, cfg.encoder_window == "split")


def _segment_mask(q_segments: Array, k_segments: Array) -> Array:
  """[B, Q, K]: keys must be real and, for real queries, of the query's own segment.

  Padding queries (segment 0) see every real key. Their outputs are never used, but this keeps
  them finite and identical to the reference, whose padding masks only keys.
  """
  q = q_segments[:, :, None]
  k = k_segments[:, None, :]
  return (k > 0) & ((q == k) | (q == 0))


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
    window: sliding window W, or None (see `window_offsets`).
    split_window: use T5Gemma 2's bidirectional window (ignored when causal).
    q_positions, kv_positions: int [B, T] / [B, S] indices the window compares (j - i). None
      = the row's own order, arange; a decode step sets them (its query sits at position t,
      its keys in ring slots: `over_keys`; such steps take the XLA path).
    prefix: PrefixLM (self-attention only): int [B, T], 1 on the tokens of the input prefix
      (seqio's `decoder_causal_attention`). Two prefix tokens of one segment see each other
      both ways (within |j - i| < W on sliding layers); everything else follows `causal`.
  """

  q_segments: Array
  kv_segments: Array
  causal: bool = struct.field(pytree_node=False, default=False)
  window: Optional[int] = struct.field(pytree_node=False, default=None)
  split_window: bool = struct.field(pytree_node=False, default=False)
  q_positions: Optional[Array] = None
  kv_positions: Optional[Array] = None
  prefix: Optional[Array] = None

  @classmethod
  def for_layer(cls, cfg: ModuleConfig, layer_type: str, segment_ids: Array, causal: bool,
                positions: Optional[Array] = None,
                prefix: Optional[Array] = None) -> "MaskSpec":
    """The self-attention pattern of one layer kind of stack `cfg` over `segment_ids`."""
    return cls(segment_ids, segment_ids, causal, layer_window(cfg, layer_type),
               cfg.encoder_window == "split", positions, positions, prefix)

  def over_keys(self, kv_segments: Array, kv_positions: Array) -> "MaskSpec":
    """This pattern with other keys: e.g. a decode cache's slots (segment 0 = empty slot).
    A decode step's query is a target token, so the PrefixLM part does not apply."""
    return self.replace(kv_segments=kv_segments, kv_positions=kv_positions, prefix=None)

  def dense(self) -> Array:
    """The boolean [B, T, S] mask (True = may attend)."""
    segments = _segment_mask(self.q_segments, self.kv_segments)
    lo, hi = self.offsets
    if lo is None and hi is None and self.prefix is None:
      return segments
    i = (jnp.arange(self.q_segments.shape[-1])[None] if self.q_positions is None
         else self.q_positions)[:, :, None]
    j = (jnp.arange(self.kv_segments.shape[-1])[None] if self.kv_positions is None
         else self.kv_positions)[:, None, :]
    mask = segments
    if lo is not None:
      mask &= j - i >= lo
    if hi is not None:
      mask &= j - i <= hi
    if self.prefix is not None:
      both = segments & (self.prefix[:, :, None] > 0) & (self.prefix[:, None, :] > 0)
      if self.window is not None:
        both &= jnp.abs(j - i) < self.window
      mask |= both
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
