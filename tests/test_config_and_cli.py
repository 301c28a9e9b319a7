"""Presets, config validation and the gin-driven command line."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from t5gemma_jax import config, presets
from t5gemma_jax.cli import app
from t5gemma_jax.run_options import RunOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_released_sizes():
  two_b = presets.stack_preset("2b")
  assert (two_b.num_layers, two_b.hidden_size, two_b.intermediate_size, two_b.num_heads,
          two_b.num_kv_heads, two_b.head_dim) == (26, 2304, 9216, 8, 4, 256)
  cfg = presets.preset("9b-2b")
  assert cfg.encoder.hidden_size == 3584 and cfg.decoder.hidden_size == 2304
  assert cfg.encoder.layer_types[:3] == ("sliding_attention", "full_attention",
                                         "sliding_attention")
  assert cfg.encoder.layer_period == 2
  for name in presets.PRESETS:
    c = presets.preset(name)
    assert c.encoder.query_pre_attn_scalar == c.encoder.head_dim


def test_two_b_preset_matches_transformers_defaults():
  from transformers import T5GemmaModuleConfig
  theirs = T5GemmaModuleConfig()  # transformers' defaults are the 2B stack
  ours = presets.stack_preset("2b")
  assert (theirs.hidden_size, theirs.intermediate_size, theirs.num_hidden_layers,
          theirs.num_attention_heads, theirs.num_key_value_heads, theirs.head_dim,
          theirs.query_pre_attn_scalar, theirs.sliding_window, theirs.vocab_size) == (
              ours.hidden_size, ours.intermediate_size, ours.num_layers, ours.num_heads,
              ours.num_kv_heads, ours.head_dim, ours.query_pre_attn_scalar,
              ours.sliding_window, ours.vocab_size)
  assert tuple(theirs.layer_types) == ours.layer_types


@pytest.mark.parametrize("change,match", [
    (dict(num_kv_heads=3), "num_heads"),
    (dict(layer_types=("full_attention",)), "layer_types has 1 entries"),
    (dict(layer_types=("global",) * 2), "unknown types"),
    (dict(head_dim=15), "head_dim must be even"),
    (dict(sliding_window=None), "sliding_window"),
])
def test_bad_module_config_names_the_field(change, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(presets.stack_preset("tiny"), num_layers=2, **change)


def test_bad_run_options_name_the_field():
  with pytest.raises(ValueError, match="RunOptions.dtype"):
    RunOptions(dtype="float64")
  with pytest.raises(ValueError, match="RunOptions.remat_policy"):
    RunOptions(remat_policy="some")
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    presets.preset("huge")


def test_architecture_and_run_options_are_apart(tmp_path):
  """A run directory records the architecture alone; presets take no run options."""
  from t5gemma_jax import run_files
  arch = {f.name for f in dataclasses.fields(config.T5GemmaConfig)}
  run = {f.name for f in dataclasses.fields(RunOptions)}
  assert not arch & run and {"dtype", "scan_layers", "attention_impl"} <= run
  run_files.write_model_files(presets.preset("tiny2"), str(tmp_path))
  saved = json.loads((tmp_path / run_files.MODEL_CONFIG).read_text())
  assert not set(saved) & run
  assert run_files.read_model_config(str(tmp_path)) == presets.preset("tiny2")
  # model_config.json files written before RunOptions existed still read.
  saved.update(dtype="bfloat16", scan_layers=True)
  (tmp_path / run_files.MODEL_CONFIG).write_text(json.dumps(saved))
  assert run_files.read_model_config(str(tmp_path)) == presets.preset("tiny2")
  with pytest.raises(TypeError):
    presets.preset("tiny", scan_layers=True)


def test_run_options_bindings_that_reach_no_config_are_an_error(clean_gin, tmp_path, capsys):
  """A run file building TrainConfig without `TrainConfig.run = @RunOptions()` must not drop
  --gin.RunOptions.* silently."""
  run_file = tmp_path / "no_run.gin"
  run_file.write_text("include 'runs/demo.gin'\nTrainConfig.run = None\n")
  rc = app.main(["train", f"--gin_file={run_file}", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                 "--gin.RunOptions.scan_layers=True"])
  assert rc == 2
  assert "bind TrainConfig.run = @RunOptions()" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


def test_model_gin_files_are_generated_from_the_preset_table(tmp_path):
  from tools import gen_model_gins
  assert gen_model_gins.stale() == []
  for name in presets.PRESETS:
    (tmp_path / f"{name}.gin").write_text(presets.model_gin(name))
  (tmp_path / "tiny.gin").write_text("preset.name = 'tiny'\n")  # edited by hand
  (tmp_path / "old.gin").write_text("")  # no such preset
  assert gen_model_gins.stale(str(tmp_path)) == ["tiny", "old"]


def test_layer_period_of_custom_patterns():
  c = presets.stack_preset("tiny")
  assert dataclasses.replace(c, num_layers=3, layer_types=None).layer_period == 2
  six = ("sliding_attention",) * 5 + ("full_attention",)
  assert dataclasses.replace(c, num_layers=12, layer_types=six * 2).layer_period == 6
  assert dataclasses.replace(c, num_layers=3,
                             layer_types=("full_attention",) * 3).layer_period == 1


def test_show_config_with_gin_overrides(clean_gin, capsys):
  rc = app.main(["show_config", "--gin_file=models/2b-2b.gin", "--gin.RunOptions.scan_layers=True",
                  '--gin.RunOptions.dtype="bfloat16"'])
  assert rc == 0
  out = json.loads(capsys.readouterr().out)
  assert out["run_options"]["scan_layers"] is True and out["run_options"]["dtype"] == "bfloat16"
  assert "scan_layers" not in out["config"]
  assert out["config"]["encoder"]["num_layers"] == 26
  # Gemma 2 2B (2.61e9 with its embedding) plus 26 cross-attention blocks in the decoder.
  assert 2.6e9 < out["parameters"]["encoder"] < 2.62e9
  cross_attention = 2304 * 256 * (8 + 4 + 4 + 8) + 2 * 2304  # q, k, v, o and two norms
  assert out["parameters"]["decoder"] - out["parameters"]["encoder"] == 26 * cross_attention


def test_show_config_reads_the_sweep_files(clean_gin, capsys):
  # The same files the comparison sweep trains with: a run file (TrainConfig, DecodeConfig, ...)
  # plus the matched decoder-only model, lengths taken from the run file's TASK_FEATURE_LENGTHS.
  assert app.main(["show_config", "--gin_file=runs/compare.gin", "--gin_file=models/mini.gin"]) == 0
  out = json.loads(capsys.readouterr().out)
  matched = out["matched_decoder_only"]
  assert (matched["inputs_length"], matched["targets_length"]) == (64, 32)
  assert abs(matched["by_params"]["parameters_ratio"] - 1) <= 0.05
  assert abs(matched["by_flops"]["train_flops_per_example_ratio"] - 1) <= 0.05
  assert app.main(["show_config", "--gin_file=runs/compare.gin",
                   "--gin_file=decoder_only/matched.gin",
                   "--gin.matched_decoder_only.by='flops'"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["config"]["decoder"]["num_layers"] == matched["by_flops"]["decoder_only"]["num_layers"]


def test_preset_options_from_gin(clean_gin, capsys):
  assert app.main(["show_config", "--gin_file=models/tiny2.gin", "--gin.preset.share_blocks=True",
                   "--gin.preset.dropout_rate=0.1"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["config"]["share_blocks"] is True
  assert out["config"]["encoder"]["dropout_rate"] == out["config"]["decoder"]["dropout_rate"] == 0.1
  with pytest.raises(ValueError, match="share_blocks needs merged_attention"):
    presets.preset("tiny", share_blocks=True)


def test_custom_model_from_gin_dataclasses(clean_gin, tmp_path, capsys):
  gin_file = tmp_path / "custom.gin"
  gin_file.write_text("\n".join([
      "encoder/stack_preset.name = 'tiny'",
      "decoder/ModuleConfig.hidden_size = 32",
      "decoder/ModuleConfig.intermediate_size = 64",
      "decoder/ModuleConfig.num_layers = 3",
      "decoder/ModuleConfig.num_heads = 2",
      "decoder/ModuleConfig.num_kv_heads = 1",
      "decoder/ModuleConfig.head_dim = 16",
      "decoder/ModuleConfig.query_pre_attn_scalar = 16",
      "decoder/ModuleConfig.vocab_size = 2048",
      "T5GemmaConfig.encoder = @encoder/stack_preset()",
      "T5GemmaConfig.decoder = @decoder/ModuleConfig()",
      "model_config.cfg = @T5GemmaConfig()",
  ]))
  assert app.main(["show_config", f"--gin_file={gin_file}"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["config"]["decoder"]["num_layers"] == 3
  assert out["config"]["encoder"]["hidden_size"] == 64


@pytest.mark.parametrize("argv,match", [
    (["--gin_file=models/nope.gin"], "gin file 'models/nope.gin' not found"),
    (["--gin_file=models/tiny.gin", "--gin.RunOptions.dtyp=1"],
     "'RunOptions' doesn't have a parameter named 'dtyp'"),
    (["--gin_file=models/tiny.gin", "--gin.preset.scan_layers=True"],
     "'preset' doesn't have a parameter named 'scan_layers'"),
    (["--gin_file=models/tiny.gin", "--gin.nothing.x=1"], "--gin.nothing.x=1"),
    (["--gin_file=models/tiny.gin", "--gin.RunOptions.remat_policy='x'"], "remat_policy"),
])
def test_bad_gin_input_fails_with_a_named_cause(clean_gin, capsys, argv, match):
  assert app.main(["show_config", *argv]) == 2
  assert match in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_is_installed():
  exe = os.path.join(os.path.dirname(sys.executable), "t5gemma")
  proc = subprocess.run([exe, "show_config", "--gin_file=models/tiny.gin"], cwd="/",
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout)["config"]["encoder"]["vocab_size"] == 2048
  bad = subprocess.run([exe, "show_config", "--gin_file=models/tiny.gin", "--gin.preset.x=1"],
                       cwd="/", capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "'preset' doesn't have a parameter named 'x'" in bad.stderr
