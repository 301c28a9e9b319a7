"""Decoder-only training: PrefixLM batches from seqio, the step on a (2,2,2) mesh of 8 CPU
devices equal to one device, a CLI run resumed bitwise, exported and imported, and the configs
matched to an encoder-decoder by parameters and by FLOPs."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from t5gemma_jax import config, inference, presets, tasks  # noqa: F401  (registers the tasks)
from t5gemma_jax.cli import app
from t5gemma_jax.data import pipeline
from t5gemma_jax.train import flops, matched
from tests.helpers.recipes import QUICK_TRAIN as QUICK

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prefix_lm_batches_hold_bos_inputs_then_targets():
  ds = pipeline.host_dataset(pipeline.DataConfig(
      "cldr_translate_en_de", {"inputs": 24, "targets": 8}, 4, shuffle=False, pack=False,
      num_epochs=1, decoder_only=True), 0, 1)
  batch = {k: v.numpy() for k, v in next(iter(ds)).items()}
  assert set(batch) == set(pipeline.DECODER_ONLY_FEATURES[:4])
  assert batch["decoder_input_tokens"].shape == (4, 32)
  for row in range(4):
    inp, tgt = batch["decoder_input_tokens"][row], batch["decoder_target_tokens"][row]
    prefix, weights = batch["decoder_causal_attention"][row], batch["decoder_loss_weights"][row]
    assert inp[0] == 2 and (inp[1:] == tgt[:-1]).all()  # BOS, then the targets shifted
    n = int(prefix.sum())  # BOS + the inputs (ending in EOS)
    assert prefix[:n].all() and tgt[n - 2] == 1  # the inputs' EOS is the last prefix target
    assert not weights[:n - 1].any() and weights[n - 1] == 1  # loss on the targets only
    assert weights.sum() == int((tgt > 0).sum()) - (n - 1)


@pytest.mark.parametrize("name", ["tiny", "tiny2", "b-b"])
def test_matched_configs_are_within_five_percent(name):
  encdec = presets.preset(name)
  s, t = 256, 128
  target_params = matched.parameter_counts(encdec)["total"]
  by_params = matched.matched_decoder_only(encdec, "params", s, t)
  got = matched.parameter_counts(by_params)["total"]
  assert abs(got / target_params - 1) <= 0.05
  assert by_params.family == ("gemma3" if encdec.decoder.qk_norm else "gemma2")
  assert by_params.decoder.hidden_size == encdec.decoder.hidden_size
  if name == "b-b":  # a 256k-entry LM head over all 384 positions costs more than the T5Gemma
    with pytest.raises(ValueError, match="LM head alone"):
      matched.matched_decoder_only(encdec, "flops", s, t)
    return
  for prefix_lm in (False, True):
    by_flops = matched.matched_decoder_only(encdec, "flops", s, t, prefix_lm=prefix_lm)
    ratio = (flops.training_flops_per_step(by_flops, 1, s, t)
             / flops.training_flops_per_step(encdec, 1, s, t))
    assert abs(ratio - 1) <= 0.05 and by_flops.prefix_lm == prefix_lm


def test_show_config_prints_the_matched_configs(clean_gin, capsys):
  assert app.main(["show_config", "--gin_file=models/tiny.gin", "--inputs_length=256",
                   "--targets_length=128"]) == 0
  out = json.loads(capsys.readouterr().out)
  m = out["matched_decoder_only"]
  assert abs(m["by_params"]["parameters_ratio"] - 1) <= 0.05
  assert abs(m["by_flops"]["train_flops_per_example_ratio"] - 1) <= 0.05
  assert app.main(["show_config", "--gin_file=decoder_only/tiny.gin",
                   "--gin.decoder_only.num_layers=3"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["config"]["architecture"] == "decoder_only"
  assert out["config"]["decoder"]["num_layers"] == 3 and set(out["parameters"]) == {
      "decoder", "total"}


MESH_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import dataclasses
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from t5gemma_jax import config, presets
    from t5gemma_jax.run_options import RunOptions
    from tests.helpers.mesh_training import train_losses

    stack = dataclasses.replace(presets.stack_preset("tiny"), num_heads=8, num_kv_heads=8,
                                head_dim=8, sliding_window=6, num_layers=4,
                                layer_types=None)
    cfg = config.DecoderOnlyConfig(decoder=stack, prefix_lm=True)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
      tgt = rng.integers(3, 2048, (8, 32)).astype(np.int32)
      tgt[:, 28:] = 0
      inp = np.concatenate([np.full((8, 1), 2, np.int32), tgt[:, :-1]], axis=1)
      inp[tgt == 0] = 0
      prefix = (np.arange(32) < 15).astype(np.int32)[None].repeat(8, 0)
      weights = ((np.arange(32) >= 14) & (tgt > 0)).astype(np.int32)
      batches.append({"decoder_input_tokens": inp, "decoder_target_tokens": tgt,
                      "decoder_loss_weights": weights, "decoder_causal_attention": prefix})
    run = RunOptions(scan_layers=True, remat_policy="minimal")
    reference, _, _ = train_losses(cfg, batches, (1, 1, 1), jax.devices()[:1], run)
    got, state, mesh = train_losses(cfg, batches, (2, 2, 2), jax.devices(), run)
    np.testing.assert_allclose(got, reference, rtol=1e-5)
    up = state.params["decoder"]["layers"]["block_0"]["mlp"]["up"]["kernel"]
    assert up.sharding.spec == P("layers", "fsdp", "tensor") or up.sharding.spec == P(
        None, "fsdp", "tensor"), up.sharding.spec
    assert up.addressable_shards[0].data.shape == (2, 32, 64), up.addressable_shards[0].data.shape
    print("MESH_OK", reference, got)
""")


@pytest.mark.slow
def test_three_steps_on_a_2x2x2_mesh_equal_one_device():
  out = subprocess.run([sys.executable, "-c", MESH_SCRIPT], cwd=REPO, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0 and "MESH_OK" in out.stdout, out.stderr[-3000:]


def _train(model_dir, steps, *extra):
  return [sys.executable, "-m", "t5gemma_jax.cli", "train", *QUICK,
          "--gin_file=decoder_only/tiny.gin", "--gin.decoder_only.prefix_lm=True",
          f'--gin.MODEL_DIR="{model_dir}"', f"--gin.TRAIN_STEPS={steps}",
          "--gin.ScheduleConfig.total_steps=6", *extra]  # one schedule for both halves


@pytest.mark.slow
def test_cli_run_resumes_bitwise_and_exports(tmp_path):
  whole, split = tmp_path / "whole", tmp_path / "split"
  for cmd in (_train(whole, 6), _train(split, 4), _train(split, 6)):
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
  assert "run resumed: steps 4 -> 6" in done.stdout, done.stdout
  cfg = presets.decoder_only("tiny", prefix_lm=True)
  with open(whole / "model_config.json") as f:
    assert config.from_dict(json.load(f)) == cfg
  a, b = (inference.load_params(cfg, str(d)) for d in (whole, split))
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  exported = tmp_path / "hf"
  done = subprocess.run([sys.executable, "-m", "t5gemma_jax.cli", "export",
                         f"--checkpoint_dir={whole}", f"--output_dir={exported}", "--verify"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "verified against transformers" in done.stdout
  with open(exported / "config.json") as f:
    assert json.load(f)["architectures"] == ["Gemma2ForCausalLM"]
