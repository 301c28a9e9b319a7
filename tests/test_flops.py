"""FLOP counts against hand counts, the model's own matmuls, and the 6 N D rule; peaks and MFU."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5gemma_jax import config, model, presets
from t5gemma_jax.config import FULL, SLIDING
from t5gemma_jax.model import masks as attn_lib
from t5gemma_jax.train import flops


def _stack(**changes):
  base = config.ModuleConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=4, query_pre_attn_scalar=4, vocab_size=10,
                             sliding_window=2, layer_types=(FULL,))
  return dataclasses.replace(base, **changes)


def _tiny(encoder=None, decoder=None):
  return config.T5GemmaConfig(encoder=encoder or _stack(), decoder=decoder or _stack())


def test_hand_count_tiny_config():
  # d=8, f=16, 2 heads of 4, 1 kv head, one full layer per stack, S=6, T=4, vocab 10, batch 2.
  b, s, t = 2, 6, 4
  enc_q = 2 * (b * s) * 8 * (2 * 4)    # 1536
  enc_k = 2 * (b * s) * 8 * (1 * 4)    # 768
  enc_v = 2 * (b * s) * 8 * (1 * 4)    # 768
  enc_o = 2 * (b * s) * (2 * 4) * 8    # 1536
  enc_scores = 2 * b * 2 * (s * s) * 4  # every query sees all 6 keys
  enc_values = 2 * b * 2 * (s * s) * 4
  enc_mlp = 3 * 2 * (b * s) * 8 * 16
  dec_q = 2 * (b * t) * 8 * 8
  dec_k = 2 * (b * t) * 8 * 4
  dec_v = 2 * (b * t) * 8 * 4
  dec_o = 2 * (b * t) * 8 * 8
  dec_pairs = 1 + 2 + 3 + 4
  dec_scores = 2 * b * 2 * dec_pairs * 4
  dec_values = 2 * b * 2 * dec_pairs * 4
  cross_q = 2 * (b * t) * 8 * 8
  cross_k = 2 * (b * s) * 8 * 4
  cross_v = 2 * (b * s) * 8 * 4
  cross_o = 2 * (b * t) * 8 * 8
  cross_scores = 2 * b * 2 * (t * s) * 4
  cross_values = 2 * b * 2 * (t * s) * 4
  dec_mlp = 3 * 2 * (b * t) * 8 * 16
  lm_head = 2 * (b * t) * 8 * 10
  expected = {
      "encoder_projections": enc_q + enc_k + enc_v + enc_o,
      "encoder_attention": enc_scores + enc_values,
      "encoder_mlp": enc_mlp,
      "decoder_projections": dec_q + dec_k + dec_v + dec_o,
      "decoder_self_attention": dec_scores + dec_values,
      "cross_attention_projections": cross_q + cross_k + cross_v + cross_o,
      "cross_attention": cross_scores + cross_values,
      "decoder_mlp": dec_mlp,
      "lm_head": lm_head,
  }
  assert sum(expected.values()) == 32384
  cfg = _tiny()
  assert flops.flops_breakdown(cfg, b, s, t, training=False) == expected
  assert flops.flops_breakdown(cfg, b, s, t) == {k: 3 * v for k, v in expected.items()}
  assert flops.training_flops_per_step(cfg, b, s, t) == 3 * 32384


def _mask_pairs(length, causal, window):
  """Allowed (query, key) pairs according to the model's own mask."""
  segments = jnp.ones((1, length), jnp.int32)
  return int(attn_lib.self_attention_mask(segments, causal=causal, sliding_window=window).sum())


def test_sliding_window_pair_counts():
  # Encoder |i - j| <= 2 over 6 positions: keys per query 3, 4, 5, 5, 4, 3.
  assert flops.bidirectional_pairs(6, 2) == 3 + 4 + 5 + 5 + 4 + 3
  # Decoder i - 2 < j <= i: keys per query 1, 2, 2, 2, 2, 2.
  assert flops.causal_pairs(6, 2) == 1 + 2 + 2 + 2 + 2 + 2
  # A window at least the sequence changes nothing.
  assert flops.bidirectional_pairs(6, 5) == flops.bidirectional_pairs(6) == 36
  assert flops.causal_pairs(6, 6) == flops.causal_pairs(6) == 21
  for length in (1, 5, 9):
    for window in (None, 1, 2, 3, 8):
      assert flops.bidirectional_pairs(length, window) == _mask_pairs(length, False, window)
      assert flops.causal_pairs(length, window) == _mask_pairs(length, True, window)


def test_sliding_layers_in_breakdown():
  enc = _stack(num_layers=2, layer_types=(SLIDING, FULL))
  dec = _stack(num_layers=2, layer_types=(SLIDING, FULL))
  got = flops.flops_breakdown(_tiny(enc, dec), 2, 6, 6, training=False)
  per_pair = 2 * 2 * 2 * 4  # scores + values, 2 heads of 4
  assert got["encoder_attention"] == 2 * per_pair * (24 + 36)
  assert got["decoder_self_attention"] == 2 * per_pair * (11 + 21)
  # Cross-attention has no window.
  assert got["cross_attention"] == 2 * 2 * per_pair * 36


def test_causal_halving_is_exact():
  for t in (1, 4, 7, 128):
    assert flops.causal_pairs(t) == t * (t + 1) // 2
  cfg = _tiny()
  got = flops.flops_breakdown(cfg, 3, 5, 7, training=False)
  assert got["decoder_self_attention"] == 3 * 2 * 2 * 2 * 4 * (7 * 8 // 2)


def test_gqa_reduces_only_kv_projections():
  b, s, t = 2, 6, 4
  mha = _tiny(_stack(num_kv_heads=2), _stack(num_kv_heads=2))
  gqa = _tiny(_stack(num_kv_heads=1), _stack(num_kv_heads=1))
  full, grouped = (flops.flops_breakdown(c, b, s, t, training=False) for c in (mha, gqa))
  # k and v lose one of two kv heads of width 4.
  assert full["encoder_projections"] - grouped["encoder_projections"] == 2 * 2 * (b * s) * 8 * 4
  assert full["decoder_projections"] - grouped["decoder_projections"] == 2 * 2 * (b * t) * 8 * 4
  assert (full["cross_attention_projections"] - grouped["cross_attention_projections"]
          == 2 * 2 * (b * s) * 8 * 4)
  for name in ("encoder_attention", "decoder_self_attention", "cross_attention", "encoder_mlp",
               "decoder_mlp", "lm_head"):
    assert full[name] == grouped[name]


def test_cross_attention_kv_reads_encoder_width():
  b, s, t = 2, 6, 4
  cfg = _tiny(encoder=_stack(hidden_size=32, intermediate_size=64))
  got = flops.flops_breakdown(cfg, b, s, t, training=False)
  q_and_o = 2 * 2 * (b * t) * 8 * 8
  k_and_v = 2 * 2 * (b * s) * 32 * 4
  assert got["cross_attention_projections"] == q_and_o + k_and_v
  assert got["decoder_projections"] == q_and_o + 2 * 2 * (b * t) * 8 * 4
  assert got["encoder_projections"] == 2 * 2 * (b * s) * 32 * 8 + 2 * 2 * (b * s) * 32 * 4


def test_total_is_sum_of_breakdown():
  cfg = presets.preset("9b-2b")
  parts = flops.flops_breakdown(cfg, 4, 512, 128)
  assert math.isclose(sum(parts.values()), flops.training_flops_per_step(cfg, 4, 512, 128),
                      rel_tol=0, abs_tol=0)
  assert all(v > 0 for v in parts.values())


def _param_shapes(cfg):
  shapes = jax.eval_shape(model.T5Gemma(cfg).init, jax.random.PRNGKey(0),
                          jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  return nn.meta.unbox(shapes)["params"]


def _dot_flops(jaxpr):
  """2 * (output size) * (contracted size) of every dot_general, sub-jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      free = [n for i, n in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
      total += 2 * math.prod(lhs) * math.prod(free)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          total += _dot_flops(sub)
  return total


def test_matches_model_matmuls():
  """The non-attention terms and the 3x rule, checked against the matmuls the model traces.

  Our attention multiplies the dense masked S x S (T x T, T x S) blocks, so the traced count is
  the formula with every mask pair counted.
  """
  enc = _stack(hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
               layer_types=(SLIDING, FULL))
  dec = _stack(num_layers=3, layer_types=(SLIDING, FULL, SLIDING))
  cfg = _tiny(enc, dec)
  b, s, t = 2, 6, 5
  params = _param_shapes(cfg)
  enc_tokens = jax.ShapeDtypeStruct((b, s), jnp.int32)
  dec_tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def forward(p, x, y):
    return model.T5Gemma(cfg).apply({"params": p}, x, y).sum()

  traced_forward = _dot_flops(jax.make_jaxpr(forward)(params, enc_tokens, dec_tokens).jaxpr)
  traced_train = _dot_flops(jax.make_jaxpr(jax.value_and_grad(forward))(
      params, enc_tokens, dec_tokens).jaxpr)

  got = flops.flops_breakdown(cfg, b, s, t, training=False)
  dense = {"encoder_attention": 2 * 2 * b * 2 * (s * s) * 4 * 4,
           "decoder_self_attention": 3 * 2 * 2 * b * (t * t) * 2 * 4,
           "cross_attention": got["cross_attention"]}
  expected_forward = sum(dense.get(k, v) for k, v in got.items())
  assert traced_forward == expected_forward
  assert traced_train == 3 * expected_forward


@pytest.mark.slow
def test_six_n_d_rule_for_2b():
  """2b-2b at S = T = 128: total within 20% of 6 * sum over tokens of the weights they touch.

  N is read from the model's parameter shapes (every `kernel`, plus the tied embedding as the
  LM head). Encoder positions touch the encoder layers and the decoder's cross-attention k/v;
  decoder positions touch the rest of the decoder and the LM head. Norm scales and the encoder
  embedding (a lookup) are left out. Attention scores add a little on top, never take away.
  """
  cfg = presets.preset("2b-2b")
  b, s, t = 8, 128, 128
  shapes = _param_shapes(cfg)
  n_enc = n_dec = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    name = jax.tree_util.keystr(path)
    size = int(np.prod(leaf.shape))
    if name.startswith("['encoder']") and "'kernel'" in name:
      n_enc += size
    elif "'cross_attn'" in name and ("['k']" in name or "['v']" in name):
      n_enc += size
    elif name.startswith("['decoder']") and ("'kernel'" in name or "'embedding'" in name):
      n_dec += size
  rule = 6 * (n_enc * b * s + n_dec * b * t)
  total = flops.training_flops_per_step(cfg, b, s, t)
  assert 1.0 <= total / rule < 1.2
  parts = flops.flops_breakdown(cfg, b, s, t)
  attention = (parts["encoder_attention"] + parts["decoder_self_attention"]
               + parts["cross_attention"])
  assert total - attention == pytest.approx(rule, rel=1e-12)


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("cpu", None), ("TPU v4 lite", None), ("Some Future Chip", None)])
def test_peak_flops_by_kind(kind, peak):
  assert flops.peak_flops(kind) == peak


def test_peak_flops_device_and_override():
  class FakeDevice:
    device_kind = "TPU v6 lite"

  assert flops.peak_flops(FakeDevice()) == 918e12
  assert flops.peak_flops() is None  # tests run on CPU
  assert flops.peak_flops("cpu", override=100e12) == 100e12
  assert flops.peak_flops(FakeDevice(), override=5e12) == 5e12
  with pytest.raises(ValueError):
    flops.peak_flops(override=0.0)


def test_mfu_and_tflops():
  assert flops.tflops_per_device(2e15, 2.0, 4) == pytest.approx(250.0)
  assert flops.model_flops_utilization(2e15, 2.0, 4, 500e12) == pytest.approx(0.5)
  with pytest.raises(ValueError):
    flops.model_flops_utilization(1e15, 0.0, 1, 1e12)
  with pytest.raises(ValueError):
    flops.model_flops_utilization(1e15, 1.0, 1, 0.0)


@pytest.mark.parametrize("causal,window,split", [
    (False, None, False), (False, 5, False), (False, 5, True), (False, 6, True),
    (True, None, False), (True, 5, False)])
def test_pair_counts_are_the_attention_masks_true_entries(causal, window, split):
  """The FLOP count reads the same window rule as the XLA mask (`window_offsets`): T5Gemma 2's
  split encoder window holds W keys, not the 2W + 1 of T5Gemma 1's symmetric one."""
  length = 23
  segments = jnp.ones((1, length), jnp.int32)
  mask = attn_lib.MaskSpec(segments, segments, causal, window, split_window=split).dense()
  lo, hi = attn_lib.window_offsets(window, causal, split)
  assert flops.window_pairs(length, length, lo, hi) == int(mask.sum())
  stack = dataclasses.replace(presets.stack_preset("tiny"), sliding_window=window or 4,
                              encoder_window="split" if split else "symmetric")
  layer_type = SLIDING if window else FULL
  assert flops.layer_pairs(stack, layer_type, length, causal) == int(mask.sum())
  if split and window:
    # W keys per query away from the ends: 1 - ceil(W/2) <= j - i <= floor(W/2).
    assert hi - lo + 1 == window


def test_executed_flops_add_dense_attention_and_recomputation():
  cfg = presets.preset("tiny")
  b, s, t = 4, 32, 24
  dense = flops.training_flops_per_step(cfg, b, s, t, dense_attention=True)
  assert dense > flops.training_flops_per_step(cfg, b, s, t)  # windows and causal masks
  assert flops.executed_flops_per_step(cfg, b, s, t) == dense  # no remat
  forward = flops.flops_breakdown(cfg, b, s, t, training=False, dense_attention=True)
  attention = sum(forward[k] for k in ("encoder_attention", "decoder_self_attention",
                                       "cross_attention"))
  minimal = flops.executed_flops_per_step(cfg, b, s, t, remat_policy="minimal")
  assert minimal == dense + attention
  full = flops.executed_flops_per_step(cfg, b, s, t, remat_policy="full")
  assert full == dense + sum(forward.values()) - forward["lm_head"]
