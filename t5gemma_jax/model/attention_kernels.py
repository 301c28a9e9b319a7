"""Fused attention kernels behind `T5GemmaConfig.attention_impl`: cuDNN (GPU) and splash (TPU).

Both compute what `attention.dot_product_attention` computes, without materialising the
[B, H, T, S] scores in memory, for the real (non-padding) queries; padding queries may see
other keys than in the XLA path (their outputs are never used).

  cudnn:  `jax.nn.dot_product_attention(implementation="cudnn")`; no logit softcap (cuDNN has
          none), so for T5Gemma 2-style configs, not Gemma 2's. GQA natively.
  splash: the Pallas splash-attention kernel for TPU, with Gemma 2's softcap, segment ids for
          packing, causal and sliding-window masks built from the layer's pattern; off TPU it
          runs in Pallas interpret mode (slow, for tests). Sequence lengths must divide into
          its blocks: multiples of 128.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
IMPLEMENTATIONS = ("xla", "cudnn", "splash")


def fused_attention(impl: str, q: Array, k: Array, v: Array, mask: Any, *, scale: float,
                    softcap: Optional[float]) -> Array:
  """q [B, T, H, Dh], k/v [B, S, K, Dh], mask an `attention.MaskSpec` -> [B, T, H, Dh]."""
  if impl == "cudnn":
    if softcap is not None:
      raise ValueError("attention_impl='cudnn' cannot apply an attention logit softcap; use "
                       "'xla' (or 'splash' on TPU) for Gemma 2 configs")
    return cudnn_attention(q, k, v, mask, scale=scale)
  if impl == "splash":
    return splash_attention(q, k, v, mask, scale=scale, softcap=softcap)
  raise ValueError(f"unknown attention_impl {impl!r}; known: {IMPLEMENTATIONS}")


def cudnn_attention(q: Array, k: Array, v: Array, mask: Any, *, scale: float,
                    implementation: Optional[str] = "cudnn") -> Array:
  """`jax.nn.dot_product_attention` with our mask (`implementation=None` lets XLA run it)."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask.dense()[:, None], scale=scale,
                                      implementation=implementation).astype(q.dtype)


def _block(n: int) -> int:
  """The largest of 512, 256, 128 that divides n (the kernel's tiles span whole lanes)."""
  for b in (512, 256, 128):
    if n % b == 0:
      return b
  raise ValueError(f"attention_impl='splash' needs sequence lengths that are multiples of 128; "
                   f"got {n} (set TASK_FEATURE_LENGTHS accordingly, or use 'xla')")


@functools.lru_cache(maxsize=None)
def _splash_kernel(t: int, s: int, group: int, causal: bool, window: Optional[int],
                   softcap: Optional[float], interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as kernel, splash_attention_mask as masks)
  shape = (t, s)
  if window is None:
    base = masks.CausalMask(shape) if causal else masks.FullMask(shape)
  elif causal:  # i - window < j <= i
    base = masks.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  else:  # |i - j| <= window
    base = masks.LocalMask(shape, window_size=(window, window), offset=0)
  bq, bkv = _block(t), _block(s)
  sizes = kernel.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                            block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                            block_kv_dq=bkv)
  # One kv head shared by `group` query heads: the MQA kernel, mapped over kv heads. Built
  # eagerly (its mask tables are constants) even when first asked for inside a jit trace, so
  # the cached kernel holds no tracers.
  with jax.ensure_compile_time_eval():
    return kernel.make_splash_mqa_single_device(
        mask=masks.MultiHeadMask([base] * group), block_sizes=sizes,
        attn_logits_soft_cap=softcap, interpret=interpret)


def splash_attention(q: Array, k: Array, v: Array, mask: Any, *, scale: float,
                     softcap: Optional[float]) -> Array:
  """Splash attention with GQA: q [B, T, H, Dh], k/v [B, S, K, Dh] -> [B, T, H, Dh]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
  b, t, h, dh = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  group = h // kv_heads
  fn = _splash_kernel(t, s, group, mask.causal, mask.window, softcap,
                      jax.default_backend() != "tpu")
  # The kernel takes the scale folded into q (the softcap then sees scaled scores, as ours).
  qg = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kv_heads, group, dh)
  qg = qg.transpose(0, 2, 3, 1, 4)                     # [B, K, G, T, Dh]
  kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, Dh]

  def one_row(qr, kr, vr, q_seg, kv_seg):
    segments = splash_attention_kernel.SegmentIds(q=q_seg, kv=kv_seg)
    return jax.vmap(lambda a, b_, c: fn(a, b_, c, segment_ids=segments))(qr, kr, vr)

  out = jax.vmap(one_row)(qg, kg, vg, mask.q_segments.astype(jnp.int32),
                          mask.kv_segments.astype(jnp.int32))  # [B, K, G, T, Dh]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh).astype(q.dtype)
