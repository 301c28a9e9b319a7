"""Presets, config validation and the gin-driven command line."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from t5gemma_jax import config
from t5gemma_jax.cli import app

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_released_sizes():
  two_b = config.stack_preset("2b")
  assert (two_b.num_layers, two_b.hidden_size, two_b.intermediate_size, two_b.num_heads,
          two_b.num_kv_heads, two_b.head_dim) == (26, 2304, 9216, 8, 4, 256)
  cfg = config.preset("9b-2b")
  assert cfg.encoder.hidden_size == 3584 and cfg.decoder.hidden_size == 2304
  assert cfg.encoder.layer_types[:3] == ("sliding_attention", "full_attention",
                                         "sliding_attention")
  assert cfg.encoder.layer_period == 2
  for name in config.PRESETS:
    c = config.preset(name)
    assert c.encoder.query_pre_attn_scalar == c.encoder.head_dim


def test_two_b_preset_matches_transformers_defaults():
  from transformers import T5GemmaModuleConfig
  theirs = T5GemmaModuleConfig()  # transformers' defaults are the 2B stack
  ours = config.stack_preset("2b")
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
    dataclasses.replace(config.stack_preset("tiny"), num_layers=2, **change)


def test_bad_run_options_name_the_field():
  with pytest.raises(ValueError, match="T5GemmaConfig.dtype"):
    config.preset("tiny", dtype="float64")
  with pytest.raises(ValueError, match="remat_policy"):
    config.preset("tiny", remat_policy="some")
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    config.preset("huge")


def test_layer_period_of_custom_patterns():
  c = config.stack_preset("tiny")
  assert dataclasses.replace(c, num_layers=3, layer_types=None).layer_period == 2
  six = ("sliding_attention",) * 5 + ("full_attention",)
  assert dataclasses.replace(c, num_layers=12, layer_types=six * 2).layer_period == 6
  assert dataclasses.replace(c, num_layers=3,
                             layer_types=("full_attention",) * 3).layer_period == 1


def test_show_config_with_gin_overrides(clean_gin, capsys):
  rc = app.main(["show_config", "--gin_file=models/2b-2b.gin", "--gin.preset.scan_layers=True",
                  '--gin.preset.dtype="bfloat16"'])
  assert rc == 0
  out = json.loads(capsys.readouterr().out)
  assert out["config"]["scan_layers"] is True and out["config"]["dtype"] == "bfloat16"
  assert out["config"]["encoder"]["num_layers"] == 26
  # Gemma 2 2B (2.61e9 with its embedding) plus 26 cross-attention blocks in the decoder.
  assert 2.6e9 < out["parameters"]["encoder"] < 2.62e9
  cross_attention = 2304 * 256 * (8 + 4 + 4 + 8) + 2 * 2304  # q, k, v, o and two norms
  assert out["parameters"]["decoder"] - out["parameters"]["encoder"] == 26 * cross_attention


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
    (["--gin_file=models/tiny.gin", "--gin.preset.dtyp=1"], "unknown option(s) ['dtyp']"),
    (["--gin_file=models/tiny.gin", "--gin.nothing.x=1"], "--gin.nothing.x=1"),
    (["--gin_file=models/tiny.gin", "--gin.preset.remat_policy='x'"], "remat_policy"),
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
  assert bad.returncode == 2 and "preset: unknown option(s) ['x']" in bad.stderr
