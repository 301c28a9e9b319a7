"""T5Gemma 2 beyond the reference: shared encoder/decoder blocks and cross-attention on global
layers only; the "tiny2" preset; decoding, FLOPs and export with these switches."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5gemma_jax import config, decoding, presets
from t5gemma_jax.config import FULL, SLIDING
from t5gemma_jax.convert import hf
from t5gemma_jax.model import layout
from t5gemma_jax.train import flops
from tests.helpers import hf_reference as ref
from t5gemma_jax.run_options import RunOptions
from tests.helpers.greedy_checks import assert_greedy_is_teacher_forced
from tests.helpers.nets import net_for
from tests.helpers.random_params import random_params

SCANNED = RunOptions(scan_layers=True)


def _cfg(**changes):
  return presets.preset("tiny2").replace(**changes)


def _batch(vocab=2048, seed=0):
  return ref.padded_batch(np.random.default_rng(seed), vocab, batch=3, enc_len=20, dec_len=11)


def _logits(cfg, params, enc, dec):
  return np.asarray(jax.jit(net_for(cfg, params).apply)({"params": params}, enc, dec))


def _untied(params, cfg):
  """Unrolled params of the equivalent unshared model: decoder layers = encoder layers."""
  return layout.untie_blocks(layout.unscan_params(jax.device_get(params), cfg), cfg)


def test_tiny2_preset_has_the_t5gemma2_layout():
  cfg = _cfg()
  assert cfg.encoder.layer_types == (SLIDING,) * 5 + (FULL,)
  assert cfg.encoder.layer_period == 6 and cfg.encoder.qk_norm
  assert cfg.eoi_id == 2048 < cfg.vocab_size
  params = random_params(cfg, run=SCANNED)
  assert set(params["decoder"]) == {"layers", "final_norm"}
  assert set(params["decoder"]["layers"]["block_5"]) == {
      "self_attn", "mlp", "pre_self_attn_norm", "post_self_attn_norm", "pre_ffw_norm",
      "post_ffw_norm"}
  assert params["encoder"]["layers"]["block_0"]["self_attn"]["q"]["kernel"].shape[0] == 1


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_shared_blocks_equal_two_equal_copies(scan):
  """Forward = the unshared model whose decoder layers copy the encoder's; the gradient of a
  shared weight = the sum of the copies' gradients."""
  shared_cfg = _cfg(share_blocks=True)
  params = random_params(shared_cfg, seed=1, run=RunOptions(scan_layers=scan))
  assert set(params["decoder"]) == {"final_norm"}
  plain_cfg = _cfg()
  copies = _untied(params, shared_cfg)
  enc, dec = _batch()
  ours = _logits(shared_cfg, params, enc, dec)
  np.testing.assert_allclose(ours, _logits(plain_cfg, copies, enc, dec), atol=2e-5, rtol=0)

  def loss(cfg):
    return lambda p: jnp.mean(net_for(cfg, p).apply({"params": p}, enc, dec) ** 2)

  g_shared = layout.unscan_params(jax.device_get(jax.jit(jax.grad(loss(shared_cfg)))(params)),
                                  shared_cfg)
  g_plain = jax.device_get(jax.jit(jax.grad(loss(plain_cfg)))(copies))
  for i in (0, 5):
    name = f"layers_{i}"
    summed = jax.tree_util.tree_map(np.add, g_plain["encoder"][name], g_plain["decoder"][name])
    for a, b in zip(jax.tree_util.tree_leaves(g_shared["encoder"][name]),
                    jax.tree_util.tree_leaves(summed)):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    assert np.abs(g_plain["decoder"][name]["mlp"]["up"]["kernel"]).max() > 1e-6


@pytest.mark.slow
def test_shared_blocks_train_with_dropout():
  cfg = _cfg(share_blocks=True)
  cfg = cfg.replace(encoder=dataclasses.replace(cfg.encoder, dropout_rate=0.1),
                    decoder=dataclasses.replace(cfg.decoder, dropout_rate=0.1))
  params = random_params(cfg, seed=2, run=SCANNED)
  enc, dec = _batch()
  run = jax.jit(lambda p, r: net_for(cfg, p).apply(
      {"params": p}, enc, dec, deterministic=False, rngs={"dropout": r}))
  a, b = run(params, jax.random.PRNGKey(0)), run(params, jax.random.PRNGKey(1))
  assert np.isfinite(np.asarray(a)).all() and not np.allclose(a, b)
  np.testing.assert_array_equal(a, run(params, jax.random.PRNGKey(0)))


@pytest.mark.slow
@pytest.mark.parametrize("merged", [True, False])
def test_global_only_cross_attention(merged):
  """A decoder of sliding layers only never reads the encoder under "global"; under "all" it
  does. Non-merged: sliding layers have no cross-attention parameters."""
  base = _cfg(merged_attention=merged, shared_embedding=merged)
  stack = dataclasses.replace(base.decoder, layer_types=(SLIDING,) * 5 + (FULL,))
  sliding_only = dataclasses.replace(base.decoder, layer_types=(SLIDING,) * 6)
  enc, dec = _batch()
  other_enc = np.where(enc > 0, (enc * 7) % 2000 + 3, 0).astype(np.int32)
  for layers, decoder in (("global", sliding_only), ("all", sliding_only)):
    cfg = base.replace(decoder=decoder, cross_attention_layers=layers)
    params = random_params(cfg, seed=3)
    a, b = _logits(cfg, params, enc, dec), _logits(cfg, params, other_enc, dec)
    assert np.array_equal(a, b) == (layers == "global"), layers
  cfg = base.replace(decoder=stack, cross_attention_layers="global")
  params = random_params(cfg, seed=3)
  if not merged:
    assert "cross_attn" in params["decoder"]["layers_5"]
    assert "cross_attn" not in params["decoder"]["layers_0"]
  a, b = _logits(cfg, params, enc, dec), _logits(cfg, params, other_enc, dec)
  assert not np.array_equal(a, b)  # the global layer reads it


@pytest.mark.slow
@pytest.mark.parametrize("options,scan", [(dict(share_blocks=True), True),
                                          (dict(cross_attention_layers="global"), False),
                                          (dict(share_blocks=True,
                                                cross_attention_layers="global"), False)])
def test_greedy_equals_teacher_forced_argmax(options, scan):
  cfg = _cfg(**options)
  params = random_params(cfg, seed=4, run=RunOptions(scan_layers=scan))
  enc = _batch()[0]
  out = np.asarray(decoding.generate(params, cfg, enc, max_new_tokens=20, min_new_tokens=20))
  assert_greedy_is_teacher_forced(cfg, params, enc, out, min_length=20)


def test_flops_count_merged_and_global_cross_attention():
  cfg = _cfg()
  full = flops.flops_breakdown(cfg, 8, 256, 128)
  merged_q = flops.qo_projection_flops(cfg.decoder, 8 * 128) * 6 * 3
  unmerged = flops.flops_breakdown(cfg.replace(merged_attention=False, shared_embedding=False),
                                   8, 256, 128)
  assert (unmerged["cross_attention_projections"] - full["cross_attention_projections"]
          == merged_q)
  glob = flops.flops_breakdown(cfg.replace(cross_attention_layers="global"), 8, 256, 128)
  assert glob["cross_attention"] * 6 == full["cross_attention"]
  assert glob["cross_attention_projections"] * 6 == full["cross_attention_projections"]


@pytest.mark.slow
def test_shared_blocks_export_as_two_copies_and_global_is_refused(tmp_path):
  from transformers import T5Gemma2ForConditionalGeneration

  cfg = _cfg(share_blocks=True)
  params = random_params(cfg, seed=5, run=SCANNED)
  hf.save(params, cfg, str(tmp_path / "shared"))
  again, loaded = hf.load(str(tmp_path / "shared"))
  assert not loaded.share_blocks
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, _untied(params, cfg))
  theirs = T5Gemma2ForConditionalGeneration.from_pretrained(
      tmp_path / "shared", attn_implementation="eager").eval()
  enc, dec = _batch(seed=6)
  diff = np.abs(ref.logits(theirs, enc, dec) - _logits(cfg, params, enc, dec))[dec != 0].max()
  assert diff < 1e-4, diff
  with pytest.raises(ValueError, match="cross_attention_layers must be 'all'"):
    hf.save(params, cfg.replace(share_blocks=False, cross_attention_layers="global"),
            str(tmp_path / "global"))
  assert not (tmp_path / "global").exists()


def test_bad_combinations_are_named():
  with pytest.raises(ValueError, match="share_blocks needs merged_attention"):
    _cfg(merged_attention=False, shared_embedding=False, share_blocks=True)
  with pytest.raises(ValueError, match="cross_attention_layers must be one of"):
    _cfg(cross_attention_layers="local")
  enc = presets.t5gemma2_stack("270m")
  with pytest.raises(ValueError, match=r"differ in \['num_layers'"):
    config.T5GemmaConfig(encoder=enc, decoder=dataclasses.replace(enc, num_layers=12, layer_types=enc.layer_types[:12]),
                         merged_attention=True, share_blocks=True)


@pytest.mark.parametrize("run, preset, task, lengths", [
    ("runs/pretrain_t5gemma2.gin", "270m-270m", "c4_ul2", {"inputs": 512, "targets": 512}),
    ("runs/demo_t5gemma2.gin", "tiny2", "builtin_mixture", {"inputs": 256, "targets": 256})])
def test_t5gemma2_run_files_bind_the_family_defaults(clean_gin, run, preset, task, lengths):
  """Each T5Gemma 2 run file trains a T5Gemma 2 preset on the "t5gemma2" denoisers."""
  import seqio
  from t5gemma_jax.cli import app, gin_setup
  app.configure(app.parse(["train", f"--gin_file={run}", "--gin.MODEL_DIR='/tmp/x'"]))
  cfg = gin_setup.train_config()
  assert cfg.model == presets.preset(preset)
  assert cfg.mixture_or_task == task and dict(cfg.task_feature_lengths) == lengths
  found = seqio.get_mixture_or_task(task)
  names = [t.name for t in getattr(found, "tasks", [found])]
  if task == "c4_ul2":
    from t5gemma_jax.tasks import tfds_tasks
    assert tfds_tasks.PRETRAINING[task] == "t5gemma2"
  else:
    assert "python_text_t5gemma2" in names, names
