"""Flash attention with Gemma 2's logit softcap for NVIDIA GPUs: a Pallas Triton kernel.

cuDNN's fused attention has no logit softcap, so T5Gemma 1 (softcap 50) falls back to the XLA
path on GPU, which writes every [T, S] score to memory. This kernel computes what
`attention.dot_product_attention` computes, softcap included, one block of scores at a time
(FlashAttention-2: an online softmax in the forward pass, the scores recomputed in a custom
VJP), for the masks `masks.MaskSpec` describes: segment ids (0 = padding; padding queries see
every real key, as in `masks._segment_mask`) and the window offsets lo <= j - i <= hi of
causal, sliding (symmetric or split) and full layers. Key blocks wholly outside the window are
skipped.

Layout: q [B, T, H, Dh], k/v [B, S, K, Dh]; query head h reads kv head h // (H / K) (HF's
`repeat_kv`). The forward and dq kernels run one program per (query block, row, query head),
the dk/dv kernel one per (key block, row, query head); dk/dv are summed over each kv head's
query heads outside the kernel. Off GPU the same kernels run in Pallas interpret mode (slow,
exact; for tests on CPU).

Rows whose queries see no key at all (padding queries of an all-padding window) average the
values of the key blocks they visit; the XLA path averages all keys. Their outputs are never
used (as `attention_kernels` says of padding queries).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array
# A large finite negative score for masked keys: finite so that a row with every key masked
# still has a finite max (exp(0) = 1 for each key, as the XLA path's finfo.min gives).
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
_BLOCKS = (128, 64, 32, 16)  # Triton tiles are powers of two, at least 16 wide for tl.dot


@dataclasses.dataclass(frozen=True)
class Options:
  """The static part of one attention call (hashable: a `custom_vjp` non-differentiable arg).

  Attributes:
    scale: multiplies q.k before the softcap.
    softcap: c in `c * tanh(s / c)`, or None.
    lo, hi: keys j seen by query i satisfy lo <= j - i <= hi (None: unbounded that way).
    block_q, block_k: forward tiles; block_q_bwd, block_k_bwd: backward tiles.
    num_warps: Triton warps per program.
    interpret: run in Pallas interpret mode (any backend).
  """

  scale: float
  softcap: Optional[float]
  lo: Optional[int]
  hi: Optional[int]
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  num_warps: int
  interpret: bool


def block_size(length: int, largest: int) -> int:
  """The largest power-of-two tile (<= `largest`, >= 16) that divides `length`.

  Raises:
    ValueError: no tile of 16 or more divides `length`.
  """
  for b in _BLOCKS:
    if b <= largest and length % b == 0:
      return b
  raise ValueError(f"attention_impl='triton' needs sequence lengths that are multiples of 16; "
                   f"got {length} (pad TASK_FEATURE_LENGTHS accordingly, or use 'xla')")


def make_options(t: int, s: int, head_dim: int, *, scale: float, softcap: Optional[float],
                 lo: Optional[int], hi: Optional[int], interpret: bool,
                 max_block: int = 128) -> Options:
  """Tiles for queries of length t, keys of length s and heads of `head_dim`.

  Head dim 256 (Gemma 2B/9B) gets smaller tiles: q, k and v tiles of 128 x 256 bf16 would
  not fit a multiprocessor's shared memory together with the accumulator. `max_block` caps
  every tile (tests use small tiles to make short sequences span several blocks).
  """
  if head_dim & (head_dim - 1) or head_dim < 16:
    raise ValueError(f"attention_impl='triton' needs a power-of-two head_dim >= 16, got "
                     f"{head_dim}")
  wide = head_dim > 128
  fwd, bwd = min(max_block, 64 if wide else 128), min(max_block, 32 if wide else 64)
  return Options(scale=float(scale), softcap=None if softcap is None else float(softcap),
                 lo=lo, hi=hi, block_q=block_size(t, fwd), block_k=block_size(s, fwd),
                 block_q_bwd=block_size(t, bwd), block_k_bwd=block_size(s, bwd),
                 num_warps=8 if head_dim > 64 else 4, interpret=interpret)


# --------------------------------------------------------------------------- kernel pieces


def _scores(q: Array, k: Array, opts: Options) -> Array:
  """Softcapped scores [bq, bk] in float32 of a q tile [bq, Dh] and a k tile [bk, Dh]."""
  s = plgpu.dot(q, k, trans_b=True) * opts.scale
  if opts.softcap is not None:
    s = opts.softcap * jnp.tanh(s / opts.softcap)
  return s


def _visible(q_seg: Array, k_seg: Array, q_start, k_start, bq: int, bk: int,
             opts: Options) -> Array:
  """bool [bq, bk]: which keys of the tile each query sees (segments, then the window)."""
  qs, ks = q_seg[:, None], k_seg[None, :]
  mask = (ks > 0) & ((qs == ks) | (qs == 0))
  if opts.lo is not None or opts.hi is not None:
    offset = (k_start + jnp.arange(bk))[None, :] - (q_start + jnp.arange(bq))[:, None]
    if opts.lo is not None:
      mask &= offset >= opts.lo
    if opts.hi is not None:
      mask &= offset <= opts.hi
  return mask


def _key_blocks(q_start, bq: int, bk: int, s: int, opts: Options):
  """[first, end) key blocks that hold any key the queries [q_start, q_start + bq) may see."""
  first = 0 if opts.lo is None else lax.div(jnp.maximum(q_start + opts.lo, 0), bk)
  end = s // bk if opts.hi is None else jnp.minimum(
      lax.div(q_start + bq - 1 + opts.hi, bk) + 1, s // bk)
  return first, end


def _query_blocks(k_start, bk: int, bq: int, t: int, opts: Options):
  """[first, end) query blocks that may see any of the keys [k_start, k_start + bk)."""
  first = 0 if opts.hi is None else lax.div(jnp.maximum(k_start - opts.hi, 0), bq)
  end = t // bq if opts.lo is None else jnp.minimum(
      lax.div(k_start + bk - 1 - opts.lo, bq) + 1, t // bq)
  return first, end


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, o_ref, lse_ref, *,
                    opts: Options):
  bq, bk, s = opts.block_q, opts.block_k, k_ref.shape[0]
  q_start = pl.program_id(0) * bq
  q, q_seg = q_ref[...], q_seg_ref[...]

  def body(j, carry):
    acc, m, l = carry
    keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
    scores = _scores(q, k_ref[keys, :], opts)
    scores = jnp.where(_visible(q_seg, k_seg_ref[keys], q_start, j * bk, bq, bk, opts),
                       scores, _MASKED)
    m_new = jnp.maximum(m, jnp.max(scores, axis=1))
    p = jnp.exp(scores - m_new[:, None])
    correction = jnp.exp(m - m_new)
    v = v_ref[keys, :]
    acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_new, l * correction + jnp.sum(p, axis=1)

  first, end = _key_blocks(q_start, bq, bk, s, opts)
  init = (jnp.zeros((bq, q_ref.shape[-1]), jnp.float32),
          jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(first, end, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dscores(q, k, v, do, lse, delta, visible, opts: Options) -> tuple[Array, Array]:
  """(p [bq, bk], d loss / d raw scores, scale applied) of one tile, softcap derivative in."""
  capped = _scores(q, k, opts)
  p = jnp.exp(jnp.where(visible, capped, _MASKED) - lse[:, None])
  ds = p * (plgpu.dot(do, v, trans_b=True) - delta[:, None])
  if opts.softcap is not None:
    ds = ds * (1.0 - jnp.square(capped / opts.softcap))
  return p, ds * opts.scale


def _dkv_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, opts: Options):
  bq, bk, t = opts.block_q_bwd, opts.block_k_bwd, q_ref.shape[0]
  k_start = pl.program_id(0) * bk
  k, v, k_seg = k_ref[...], v_ref[...], k_seg_ref[...]

  def body(i, carry):
    dk, dv = carry
    rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    visible = _visible(q_seg_ref[rows], k_seg, i * bq, k_start, bq, bk, opts)
    p, ds = _dscores(q, k, v, do, lse_ref[rows], delta_ref[rows], visible, opts)
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
    return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

  first, end = _query_blocks(k_start, bk, bq, t, opts)
  zeros = jnp.zeros((bk, k_ref.shape[-1]), jnp.float32)
  dk, dv = lax.fori_loop(first, end, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *, opts: Options):
  bq, bk, s = opts.block_q_bwd, opts.block_k_bwd, k_ref.shape[0]
  q_start = pl.program_id(0) * bq
  q, do, q_seg = q_ref[...], do_ref[...], q_seg_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(j, dq):
    keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
    k = k_ref[keys, :]
    visible = _visible(q_seg, k_seg_ref[keys], q_start, j * bk, bq, bk, opts)
    _, ds = _dscores(q, k, v_ref[keys, :], do, lse, delta, visible, opts)
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  first, end = _key_blocks(q_start, bq, bk, s, opts)
  dq = lax.fori_loop(first, end, body, jnp.zeros((bq, q_ref.shape[-1]), jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


# ----------------------------------------------------------------------- pallas_call wrappers


def _specs(t: int, s: int, dh: int, group: int, tiled: str, block: int) -> dict:
  """BlockSpecs over the grid (block index, row, query head); `tiled` ("q" or "k") is the side
  cut into tiles of `block`, the other side is whole."""
  q_len, k_len = (block, s) if tiled == "q" else (t, block)
  q_at = (lambda i: i) if tiled == "q" else (lambda i: 0)
  k_at = (lambda i: 0) if tiled == "q" else (lambda i: i)
  return {"q": pl.BlockSpec((None, q_len, None, dh), lambda i, r, h: (r, q_at(i), h, 0)),
          "k": pl.BlockSpec((None, k_len, None, dh),
                            lambda i, r, h: (r, k_at(i), lax.div(h, group), 0)),
          "q_seg": pl.BlockSpec((None, q_len), lambda i, r, h: (r, q_at(i))),
          "k_seg": pl.BlockSpec((None, k_len), lambda i, r, h: (r, k_at(i))),
          "stat": pl.BlockSpec((None, None, q_len), lambda i, r, h: (r, h, q_at(i))),
          # dk / dv per query head, [B, S, H, Dh]: tiled like k, indexed by the query head.
          "k_per_q_head": pl.BlockSpec((None, k_len, None, dh),
                                       lambda i, r, h: (r, k_at(i), h, 0))}


def _forward(opts: Options, q, k, v, q_seg, k_seg):
  b, t, h, dh = q.shape
  s = k.shape[1]
  sp = _specs(t, s, dh, h // k.shape[2], "q", opts.block_q)
  return pl.pallas_call(
      functools.partial(_forward_kernel, opts=opts),
      grid=(t // opts.block_q, b, h),
      in_specs=[sp["q"], sp["k"], sp["k"], sp["q_seg"], sp["k_seg"]],
      out_specs=[sp["q"], sp["stat"]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=opts.num_warps, num_stages=2),
      interpret=opts.interpret, name="t5gemma_flash_forward",
  )(q, k, v, q_seg, k_seg)


def _backward(opts: Options, residuals, do):
  q, k, v, q_seg, k_seg, o, lse = residuals
  b, t, h, dh = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  group = h // kv_heads
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  params = plgpu.CompilerParams(num_warps=opts.num_warps, num_stages=2)
  by_k = _specs(t, s, dh, group, "k", opts.block_k_bwd)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, opts=opts),
      grid=(s // opts.block_k_bwd, b, h),
      in_specs=[by_k["q"], by_k["k"], by_k["k"], by_k["q_seg"], by_k["k_seg"], by_k["q"],
                by_k["stat"], by_k["stat"]],
      out_specs=[by_k["k_per_q_head"], by_k["k_per_q_head"]],
      out_shape=[jax.ShapeDtypeStruct((b, s, h, dh), jnp.float32)] * 2,
      compiler_params=params, interpret=opts.interpret, name="t5gemma_flash_dkv",
  )(q, k, v, q_seg, k_seg, do, lse, delta)
  by_q = _specs(t, s, dh, group, "q", opts.block_q_bwd)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, opts=opts),
      grid=(t // opts.block_q_bwd, b, h),
      in_specs=[by_q["q"], by_q["k"], by_q["k"], by_q["q_seg"], by_q["k_seg"], by_q["q"],
                by_q["stat"], by_q["stat"]],
      out_specs=by_q["q"],
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=opts.interpret, name="t5gemma_flash_dq",
  )(q, k, v, q_seg, k_seg, do, lse, delta)
  # Query heads h = kv * group + g share kv head kv: their dk/dv add up.
  dk = dk.reshape(b, s, kv_heads, group, dh).sum(axis=3).astype(k.dtype)
  dv = dv.reshape(b, s, kv_heads, group, dh).sum(axis=3).astype(v.dtype)
  return dq, dk, dv, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(opts: Options, q, k, v, q_seg, k_seg):
  return _forward(opts, q, k, v, q_seg, k_seg)[0]


def _flash_fwd(opts: Options, q, k, v, q_seg, k_seg):
  o, lse = _forward(opts, q, k, v, q_seg, k_seg)
  return o, (q, k, v, q_seg, k_seg, o, lse)


_flash.defvjp(_flash_fwd, _backward)


def flash_attention(q: Array, k: Array, v: Array, q_segments: Array, kv_segments: Array, *,
                    scale: float, softcap: Optional[float], lo: Optional[int],
                    hi: Optional[int], interpret: bool, max_block: int = 128) -> Array:
  """Softcapped, masked grouped-query attention without the [T, S] scores in memory.

  Args:
    q: [B, T, H, Dh]; k, v: [B, S, K, Dh] with H a multiple of K.
    q_segments: int [B, T]; kv_segments: int [B, S] (0 = padding; see `masks.MaskSpec`).
    scale: multiplies q.k; softcap: `c * tanh(s / c)` after scaling, or None.
    lo, hi: the window offsets of `masks.window_offsets` (None = unbounded).
    interpret: Pallas interpret mode (for CPU); False compiles Triton kernels for the GPU.
    max_block: the largest tile (see `make_options`).

  Returns:
    [B, T, H, Dh] in q.dtype; differentiable in q, k and v.
  """
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{q.shape[2]} query heads do not group over {k.shape[2]} kv heads")
  if (lo is not None and lo > 0) or (hi is not None and hi < 0):
    raise ValueError(f"window offsets must bracket the diagonal, got lo={lo}, hi={hi}")
  opts = make_options(q.shape[1], k.shape[1], q.shape[3], scale=scale, softcap=softcap,
                      lo=lo, hi=hi, interpret=interpret, max_block=max_block)
  return _flash(opts, q, k, v, q_segments.astype(jnp.int32), kv_segments.astype(jnp.int32))
