"""Model behaviour that needs no reference: packing, scan/remat equivalence, bf16, dropout."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5gemma_jax import config, model, presets
from t5gemma_jax.model import layout
from t5gemma_jax.run_options import RunOptions
from tests.helpers.param_counts import expected_param_count
from tests.helpers.random_params import random_params


def _cfg():
  enc = dataclasses.replace(presets.stack_preset("tiny"), num_layers=3, sliding_window=3,
                            layer_types=None)
  dec = dataclasses.replace(presets.stack_preset("tiny"), num_layers=4, sliding_window=2,
                            num_kv_heads=1, layer_types=None)
  return config.T5GemmaConfig(encoder=enc, decoder=dec)


def _init(cfg, seed=0, run=RunOptions()):
  return random_params(cfg, seed, run=run)


def _apply(cfg, params, *args, run=RunOptions(), **kwargs):
  """Jitted forward pass (op-by-op dispatch is far slower on CPU)."""
  net = model.T5Gemma(cfg, run)
  return jax.jit(lambda p, *a: net.apply({"params": p}, *a, **kwargs))(params, *args)


def _batch(seed=0, b=2, s=16, t=10, vocab=2048):
  rng = np.random.default_rng(seed)
  enc = rng.integers(3, vocab, (b, s)).astype(np.int32)
  dec = rng.integers(3, vocab, (b, t)).astype(np.int32)
  dec[:, 0] = 2
  enc[1, s - 5:] = 0
  dec[1, t - 3:] = 0
  return enc, dec


@pytest.mark.slow
def test_packed_rows_match_examples_run_alone():
  cfg = _cfg()
  params = _init(cfg)
  net = model.T5Gemma(cfg)
  rng = np.random.default_rng(3)
  # Three examples of different lengths, each longer than the sliding windows (3 and 2).
  enc_lens, dec_lens = (5, 7, 4), (4, 3, 5)
  encs = [rng.integers(3, 2048, n).astype(np.int32) for n in enc_lens]
  decs = [np.concatenate([[2], rng.integers(3, 2048, n - 1)]).astype(np.int32) for n in dec_lens]
  s_total, t_total = sum(enc_lens) + 2, sum(dec_lens) + 1  # trailing padding too
  enc_row, dec_row = np.zeros((1, s_total), np.int32), np.zeros((1, t_total), np.int32)
  enc_seg, dec_seg = np.zeros_like(enc_row), np.zeros_like(dec_row)
  s = t = 0
  for n, (e, d) in enumerate(zip(encs, decs), start=1):
    enc_row[0, s:s + len(e)], enc_seg[0, s:s + len(e)] = e, n
    dec_row[0, t:t + len(d)], dec_seg[0, t:t + len(d)] = d, n
    s, t = s + len(e), t + len(d)
  packed = np.asarray(jax.jit(net.apply)({"params": params}, enc_row, dec_row,
                                         encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg))
  t = 0
  for e, d in zip(encs, decs):
    alone = np.asarray(jax.jit(net.apply)({"params": params}, e[None], d[None]))[0]
    np.testing.assert_allclose(packed[0, t:t + len(d)], alone, atol=1e-5, rtol=1e-5)
    t += len(d)


def test_positions_restart_per_segment():
  from t5gemma_jax.model.masks import positions_from_segments
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_packing_needs_both_segment_arrays():
  cfg = _cfg()
  enc, dec = _batch()
  with pytest.raises(ValueError, match="decoder_segment_ids"):
    model.T5Gemma(cfg).apply({"params": _init(cfg)}, enc, dec,
                             encoder_segment_ids=np.ones_like(enc))


def _loss(net, params, enc, dec):
  logits = net.apply({"params": params}, enc, dec)
  return jnp.mean(jax.nn.log_softmax(logits)[..., 5]), logits


@functools.lru_cache(maxsize=1)
def _plain_reference():
  cfg = _cfg()
  params = _init(cfg)
  enc, dec = _batch()
  (_, logits), grads = jax.jit(jax.value_and_grad(
      lambda p: _loss(model.T5Gemma(cfg), p, enc, dec), has_aux=True))(params)
  return cfg, params, enc, dec, logits, grads


@pytest.mark.slow
@pytest.mark.parametrize("scan,remat", [(True, "none"), (False, "full"), (True, "minimal"),
                                        (True, "full")])
def test_scan_and_remat_match_plain_model(scan, remat):
  plain_cfg, params, enc, dec, ref_logits, ref_grads = _plain_reference()

  cfg = plain_cfg
  net = model.T5Gemma(cfg, RunOptions(scan_layers=scan, remat_policy=remat))
  own = jax.eval_shape(lambda: nn.meta.unbox(net.init(jax.random.PRNGKey(0), enc, dec)))["params"]
  converted = layout.to_layout(params, cfg, scan)
  assert jax.tree_util.tree_structure(own) == jax.tree_util.tree_structure(converted)
  (loss, logits), grads = jax.jit(jax.value_and_grad(
      lambda p: _loss(net, p, enc, dec), has_aux=True))(converted)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
  grads = layout.unscan_params(grads, cfg)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree_util.tree_leaves(ref_grads)):
    np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_layout_round_trip_keeps_every_array():
  cfg = _cfg()
  params = _init(cfg)
  scanned = layout.scan_params(params, cfg)
  assert "layers" in scanned["encoder"] and "layers_2" in scanned["encoder"]  # 3 = 1 pair + 1
  assert scanned["decoder"]["layers"]["block_0"]["mlp"]["up"]["kernel"].shape[0] == 2
  back = layout.unscan_params(scanned, cfg)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_bfloat16_activations_stay_close_to_float32():
  cfg = _cfg()
  params = _init(cfg)
  enc, dec = _batch()
  ref = np.asarray(_apply(cfg, params, enc, dec))
  out = _apply(cfg, params, enc, dec, run=RunOptions(dtype="bfloat16"))
  assert out.dtype == jnp.float32
  err = np.abs(np.asarray(out) - ref)
  print(f"bf16 vs f32: max abs {err.max():.3e}, mean abs {err.mean():.3e}, "
        f"logit std {ref.std():.3f}")
  assert err.max() < 0.1 * ref.std() + 0.05
  assert err.mean() < 0.02 * ref.std()


@pytest.mark.slow
def test_dropout_is_active_only_when_not_deterministic():
  base = _cfg()
  enc_cfg = dataclasses.replace(base.encoder, dropout_rate=0.3, attention_dropout=0.2)
  dec_cfg = dataclasses.replace(base.decoder, dropout_rate=0.3, attention_dropout=0.2)
  cfg = base.replace(encoder=enc_cfg, decoder=dec_cfg)
  run = RunOptions(scan_layers=True)
  net = model.T5Gemma(cfg, run)
  enc, dec = _batch()
  params = _init(cfg, run=run)
  eval_a = _apply(cfg, params, enc, dec, run=run)
  eval_b = _apply(cfg, params, enc, dec, run=run)
  np.testing.assert_array_equal(eval_a, eval_b)

  @jax.jit
  def train_fn(key):
    return net.apply({"params": params}, enc, dec, deterministic=False, rngs={"dropout": key})

  def train(seed):
    return train_fn(jax.random.PRNGKey(seed))
  np.testing.assert_array_equal(train(1), train(1))
  assert not np.allclose(train(1), train(2))
  assert not np.allclose(train(1), eval_a)


def test_every_parameter_has_logical_axis_names():
  for scan in (False, True):
    cfg = _cfg()
    boxed = jax.eval_shape(model.T5Gemma(cfg, RunOptions(scan_layers=scan)).init,
                           jax.random.PRNGKey(0), *_batch())["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    known = {"embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers"}
    for leaf in leaves:
      assert isinstance(leaf, nn.Partitioned), leaf
      assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= known, leaf.names
      assert ("layers" in leaf.names) == (scan and leaf.value.ndim > 1 and
                                          leaf.names[0] == "layers")


# The tiny presets in the quick tier; the released sizes (seconds each to trace) in `make test`.
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n.startswith("tiny") else
                                               pytest.mark.slow) for n in presets.PRESETS])
def test_every_preset_builds_abstractly(name):
  cfg = presets.preset(name)
  shapes = jax.eval_shape(lambda: model.T5Gemma(cfg, RunOptions(scan_layers=True)).init(
      jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)))
  count = sum(int(np.prod(x.value.shape)) for x in jax.tree_util.tree_leaves(
      shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  # Exactly the count the config's fields imply (tests/helpers/param_counts.py, no model code).
  assert count == expected_param_count(cfg), (count, expected_param_count(cfg))
