"""Fused attention kernels behind `RunOptions.attention_impl`: cuDNN and Triton (GPU),
splash (TPU).

Both compute what `attention.dot_product_attention` computes, without materialising the
[B, H, T, S] scores in memory, for the real (non-padding) queries; padding queries may see
other keys than in the XLA path (their outputs are never used).

  cudnn:  `jax.nn.dot_product_attention(implementation="cudnn")`; no logit softcap (cuDNN has
          none), so for T5Gemma 2-style configs, not Gemma 2's. GQA natively.
  triton: our Pallas Triton flash attention (`triton_attention`) with Gemma 2's softcap, for
          T5Gemma 1 on GPU: segment ids and the causal / sliding / full window of
          `MaskSpec`; not T5Gemma 2's merged keys (use cudnn there). Off GPU it runs in Pallas
          interpret mode (slow, for tests). Lengths must be multiples of 16.
  splash: the Pallas splash-attention kernel for TPU, with Gemma 2's softcap, segment ids for
          packing, causal and sliding-window masks built from the layer's pattern (T5Gemma 2's
          split encoder window and merged [decoder | encoder] keys included); off TPU it runs
          in Pallas interpret mode (slow, for tests). Sequence lengths must divide into its
          blocks: multiples of 128.

Masks arrive as `masks.MaskSpec` or, for merged attention, `masks.MergedMaskSpec`;
cuDNN takes their dense form, splash their static structure plus segment ids.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from t5gemma_jax.model import triton_attention
from t5gemma_jax.model.masks import MergedMaskSpec, window_offsets
from t5gemma_jax.run_options import ATTENTION_IMPLS

Array = jax.Array


def fused_attention(impl: str, q: Array, k: Array, v: Array, mask: Any, *, scale: float,
                    softcap: Optional[float]) -> Array:
  """q [B, T, H, Dh], k/v [B, S, K, Dh], mask a `MaskSpec` or `MergedMaskSpec` (then S = T +
  encoder length) -> [B, T, H, Dh]."""
  if getattr(mask, "prefix", None) is not None:
    raise ValueError(f"attention_impl={impl!r} has no PrefixLM mask (a decoder-only model with "
                     "prefix_lm=True); use attention_impl='xla'")
  if impl == "cudnn":
    if softcap is not None:
      raise ValueError("attention_impl='cudnn' cannot apply an attention logit softcap; use "
                       "'xla', 'triton' (GPU) or 'splash' (TPU) for Gemma 2 configs")
    return cudnn_attention(q, k, v, mask, scale=scale)
  if impl == "splash":
    return splash_attention(q, k, v, mask, scale=scale, softcap=softcap)
  if impl == "triton":
    return triton_flash_attention(q, k, v, mask, scale=scale, softcap=softcap)
  raise ValueError(f"unknown attention_impl {impl!r}; known: {ATTENTION_IMPLS}")


def cudnn_attention(q: Array, k: Array, v: Array, mask: Any, *, scale: float,
                    implementation: Optional[str] = "cudnn") -> Array:
  """`jax.nn.dot_product_attention` with our mask (`implementation=None` lets XLA run it)."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask.dense()[:, None], scale=scale,
                                      implementation=implementation).astype(q.dtype)


def triton_flash_attention(q: Array, k: Array, v: Array, mask: Any, *, scale: float,
                           softcap: Optional[float]) -> Array:
  """`triton_attention.flash_attention` with our `MaskSpec` (GQA, softcap; per device under a
  mesh). Pallas interpret mode whenever the compile target is not a GPU.

  Raises:
    ValueError: a `MergedMaskSpec` (T5Gemma 2's merged attention: use 'cudnn').
  """
  if isinstance(mask, MergedMaskSpec):
    raise ValueError("attention_impl='triton' has no merged attention (T5Gemma 2); use "
                     "'cudnn', which T5Gemma 2 can take (it has no attention softcap)")
  lo, hi = mask.offsets
  fn = functools.partial(triton_attention.flash_attention, scale=scale, softcap=softcap, lo=lo,
                         hi=hi, interpret=target_platform() != "gpu")
  return _sharded(lambda q, k, v, qs, ks: fn(q, k, v, qs, ks).astype(q.dtype), q, k, v,
                  mask.q_segments, mask.kv_segments)


def _block(n: int) -> int:
  """The largest of 512, 256, 128 that divides n (the kernel's tiles span whole lanes)."""
  for b in (512, 256, 128):
    if n % b == 0:
      return b
  raise ValueError(f"attention_impl='splash' needs sequence lengths that are multiples of 128; "
                   f"got {n} (set TASK_FEATURE_LENGTHS accordingly, or use 'xla')")


def _pattern(masks, shape: tuple[int, int], causal: bool, window: Optional[int],
             split: bool):
  """The splash mask of one `MaskSpec` pattern (segments are applied separately)."""
  lo, hi = window_offsets(window, causal, split)
  if lo is None and hi is None:
    return masks.FullMask(shape)
  if lo is None:  # causal without a window
    return masks.CausalMask(shape)
  return masks.LocalMask(shape, window_size=(-lo, hi), offset=0)


def _splash_kernel(t: int, s: int, group: int, causal: bool, window: Optional[int],
                   softcap: Optional[float], interpret: bool, split: bool = False,
                   merged: int = 0):
  """`merged` > 0: the keys are s decoder keys (the pattern) then `merged` encoder keys that
  every query may see (segments aside)."""
  import numpy as np
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as kernel, splash_attention_mask as masks)
  base = _pattern(masks, (t, s), causal, window, split)
  if merged:
    dense = np.concatenate([base[:, :], np.ones((t, merged), bool)], axis=1)
    base, s = masks.NumpyMask(dense), s + merged
  bq, bkv = _block(t), _block(s)
  sizes = kernel.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                            block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                            block_kv_dq=bkv)
  # One kv head shared by `group` query heads: the MQA kernel, mapped over kv heads. Built
  # afresh inside each trace: its mask tables then enter the program as constants. (Built once
  # eagerly instead, they would be device arrays on the host's backend, which an
  # ahead-of-time compile for TPU devices cannot take.) Splash caches the numpy processing of
  # equal masks (`_process_mask`), so rebuilding costs little.
  return kernel.make_splash_mqa_single_device(
      mask=masks.MultiHeadMask([base] * group), block_sizes=sizes,
      attn_logits_soft_cap=softcap, interpret=interpret)


def target_platform() -> str:
  """The platform the program is being built for: the context mesh's devices (under
  `jax.set_mesh`, abstract TPU devices of an ahead-of-time compile included), else the host's
  default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def _sharded(fn, q: Array, k: Array, v: Array, q_segments: Array, kv_segments: Array) -> Array:
  """Runs `fn` on each device's shard: rows over the batch axes, heads over the tensor axis.

  A Mosaic kernel is an opaque custom call the SPMD partitioner cannot split, so under a mesh
  it must run inside `shard_map`, where every chip sees only its own rows and heads. Mesh
  axes come from the logical names (the model stays mesh-agnostic); without a mesh in
  context `fn` runs as it is. Heads are split only when the kv heads divide over the tensor
  axis (query head j must stay with kv head j // group).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q, k, v, q_segments, kv_segments)
  from flax import linen as nn
  from jax.sharding import PartitionSpec as P
  batch = nn.logical_to_mesh_axes(("batch",))[0]
  heads = nn.logical_to_mesh_axes(("kv_heads",))[0]
  names = () if heads is None else (heads if isinstance(heads, tuple) else (heads,))
  size = 1
  for name in names:
    size *= mesh.shape[name]
  if k.shape[2] % size:
    heads = None
  rows = 1
  for name in (() if batch is None else batch if isinstance(batch, tuple) else (batch,)):
    rows *= mesh.shape[name]
  if q.shape[0] % rows:
    raise ValueError(f"attention_impl='splash': a batch of {q.shape[0]} rows does not split "
                     f"over the {rows} devices of the batch axes {batch}")
  tokens, rows_spec = P(batch, None, heads, None), P(batch, None)
  return jax.shard_map(fn, in_specs=(tokens, tokens, tokens, rows_spec, rows_spec),
                       out_specs=tokens, check_vma=False)(q, k, v, q_segments, kv_segments)


def splash_attention(q: Array, k: Array, v: Array, mask: Any, *, scale: float,
                     softcap: Optional[float]) -> Array:
  """Splash attention with GQA: q [B, T, H, Dh], k/v [B, S, K, Dh] -> [B, T, H, Dh].

  Pallas interpret mode (slow, exact) whenever the compile target is not a TPU.
  """
  t, s = q.shape[1], k.shape[1]
  group = q.shape[2] // k.shape[2]
  interpret = target_platform() != "tpu"
  if isinstance(mask, MergedMaskSpec):
    pattern, encoder = mask.self_mask, mask.cross_mask.kv_segments
    fn = _splash_kernel(t, s - encoder.shape[1], group, pattern.causal, pattern.window,
                        softcap, interpret, pattern.split_window, encoder.shape[1])
    q_segments = pattern.q_segments
    kv_segments = jnp.concatenate([pattern.kv_segments, encoder], axis=1)
  else:
    fn = _splash_kernel(t, s, group, mask.causal, mask.window, softcap, interpret,
                        mask.split_window and not mask.causal)
    q_segments, kv_segments = mask.q_segments, mask.kv_segments
  # The kernel takes the scale folded into q (the softcap then sees scaled scores, as ours).
  q = q * jnp.asarray(scale, q.dtype)
  return _sharded(functools.partial(_local_splash, fn), q, k, v, q_segments.astype(jnp.int32),
                  kv_segments.astype(jnp.int32))


def _local_splash(fn, q: Array, k: Array, v: Array, q_segments: Array,
                  kv_segments: Array) -> Array:
  """The kernel over one device's rows and heads: q [b, T, h, Dh], k/v [b, S, k, Dh]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
  b, t, h, dh = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(b, t, kv_heads, h // kv_heads, dh).transpose(0, 2, 3, 1, 4)  # [b, k, G, T, Dh]
  kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                    # [b, k, S, Dh]

  def one_row(qr, kr, vr, q_seg, kv_seg):
    segments = splash_attention_kernel.SegmentIds(q=q_seg, kv=kv_seg)
    return jax.vmap(lambda a, b_, c: fn(a, b_, c, segment_ids=segments))(qr, kr, vr)

  out = jax.vmap(one_row)(qg, kg, vg, q_segments, kv_segments)  # [b, k, G, T, Dh]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh).astype(q.dtype)
