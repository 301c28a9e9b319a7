"""attention_impl="triton": our Pallas Triton flash attention (Pallas interpret mode on CPU)
against the XLA attention, forward and gradients, with the softcap, windows, GQA, packing and
padding that `masks.MaskSpec` describes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5gemma_jax import config, presets
from t5gemma_jax.model import attention, attention_kernels, masks, triton_attention
from t5gemma_jax.run_options import RunOptions

# (queries, keys, heads, kv heads, head_dim, causal, window, split, softcap, cross-attention)
CASES = {
    "encoder symmetric window": (64, 64, 4, 2, 16, False, 5, False, 50.0, False),
    "decoder causal window": (64, 64, 4, 2, 16, True, 5, False, 50.0, False),
    "decoder causal full, low cap": (64, 64, 4, 4, 16, True, None, False, 5.0, False),
    "encoder split window, MQA": (64, 64, 4, 1, 32, False, 7, True, None, False),
    "encoder full": (48, 48, 2, 2, 16, False, None, False, 50.0, False),
    "cross-attention": (64, 32, 4, 2, 16, False, None, False, 50.0, True),
}


def _inputs(t, s, h, kh, dh, cross, seed=0):
  """q, k, v drawn large enough that the softcap bites; row 0 packs two examples and ends in
  padding, row 1 ends in padding; the cross case has its own key padding."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(2, t, h, dh)) * 2, jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, s, kh, dh)) * 2, jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, s, kh, dh)), jnp.float32)
  q_seg = np.ones((2, t), np.int32)
  q_seg[0, t // 2:] = 2
  q_seg[0, t - 3:] = 0
  q_seg[1, t - 9:] = 0
  if cross:
    k_seg = np.ones((2, s), np.int32)
    k_seg[1, s - 7:] = 0
    q_seg[0, t // 2:t - 3] = 1  # the encoder row holds one example
  else:
    k_seg = q_seg
  return q, k, v, jnp.asarray(q_seg), jnp.asarray(k_seg)


# Each case takes 3-9 s in interpret mode here: the two T5Gemma 1 self-attention patterns stay
# in the quick tier, the rest run with the slow tests.
QUICK = ("encoder symmetric window", "decoder causal window")


@pytest.mark.parametrize("case", [c if c in QUICK else pytest.param(c, marks=pytest.mark.slow)
                                  for c in sorted(CASES)])
def test_kernel_matches_xla_attention_forward_and_gradients(case):
  t, s, h, kh, dh, causal, window, split, softcap, cross = CASES[case]
  q, k, v, q_seg, k_seg = _inputs(t, s, h, kh, dh, cross)
  spec = masks.MaskSpec(q_seg, k_seg, causal, window, split)
  lo, hi = spec.offsets
  real = (q_seg > 0)[..., None, None]
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

  def xla(q, k, v):
    return attention.dot_product_attention(q, k, v, spec.dense(), scale=0.25, softcap=softcap)

  def kernel(q, k, v):  # 16-wide tiles: several blocks per sequence, so blocks are skipped
    return triton_attention.flash_attention(q, k, v, q_seg, k_seg, scale=0.25,
                                            softcap=softcap, lo=lo, hi=hi, interpret=True,
                                            max_block=16)

  def loss(fn):  # padding queries' outputs are never used (their loss weight is 0)
    return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v) * weights, 0.0))

  ours, theirs = jax.jit(kernel)(q, k, v), xla(q, k, v)
  np.testing.assert_allclose(np.where(real, ours, 0), np.where(real, theirs, 0), atol=1e-5)
  g_kernel = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
  g_xla = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_xla, g_kernel):
    np.testing.assert_allclose(b, a, atol=1e-5 * float(np.max(np.abs(a))))


def test_the_softcap_and_the_window_bite():
  """Dropping the softcap or widening the window moves the kernel's output: the parity above
  is not vacuous."""
  q, k, v, q_seg, k_seg = _inputs(64, 64, 4, 2, 16, False)
  run = lambda softcap, lo, hi: np.asarray(triton_attention.flash_attention(
      q, k, v, q_seg, k_seg, scale=0.25, softcap=softcap, lo=lo, hi=hi, interpret=True,
      max_block=16))
  base = run(5.0, -5, 5)
  assert np.max(np.abs(run(None, -5, 5) - base)) > 1e-2
  assert np.max(np.abs(run(5.0, -9, 9) - base)) > 1e-2


def test_tiles_and_configs_are_checked():
  assert triton_attention.block_size(512, 128) == 128
  assert triton_attention.block_size(48, 128) == 16
  with pytest.raises(ValueError, match="multiples of 16"):
    triton_attention.block_size(100, 128)
  with pytest.raises(ValueError, match="power-of-two head_dim"):
    triton_attention.make_options(64, 64, 24, scale=1.0, softcap=None, lo=None, hi=None,
                                  interpret=True)
  with pytest.raises(ValueError, match="'triton'"):
    RunOptions(attention_impl="cudnn").check(presets.preset("tiny"))  # names softcap-able ones
  RunOptions(attention_impl="triton").check(presets.preset("tiny"))  # Gemma 2's softcap is fine
  cross = masks.MaskSpec(jnp.ones((1, 16), jnp.int32), jnp.ones((1, 16), jnp.int32))
  merged = masks.MergedMaskSpec(cross, cross)
  x = jnp.ones((1, 16, 2, 16))
  with pytest.raises(ValueError, match="merged attention"):
    attention_kernels.fused_attention("triton", x, jnp.ones((1, 32, 2, 16)),
                                      jnp.ones((1, 32, 2, 16)), merged, scale=1.0, softcap=None)
  stack = dataclasses.replace(presets.stack_preset("tiny"), attention_dropout=0.1)
  with pytest.raises(ValueError, match="attention dropout"):
    RunOptions(attention_impl="triton").check(config.T5GemmaConfig(encoder=stack, decoder=stack))
