"""config.gin read back without gin (`config_gin.parse_gin`) agrees with gin itself."""

import gin

from t5gemma_jax import config_gin
from t5gemma_jax.cli import gin_setup


def test_every_literal_of_the_demo_runs_config_gin_reads_back_as_gin_holds_it(clean_gin):
  gin_setup.load("train", ["runs/demo.gin"], ["BATCH_SIZE = 4",
                                               'RunOptions.dtype = "bfloat16"'])
  text = gin.config_str()
  settings = config_gin.parse_gin(text)
  assert settings.value("TrainConfig.batch_size") == 4  # through the %BATCH_SIZE macro
  assert settings.value("RunOptions.dtype") == "bfloat16"
  checked = 0
  for key, value in settings.values().items():
    if "." not in key or "/" in key or isinstance(value, str) and value.startswith(("@", "%")):
      continue  # macros, scoped bindings and references: not a plain gin.query_parameter
    held = gin.query_parameter(key)
    if isinstance(held, gin.config.ConfigurableReference) and held.selector == "gin.macro":
      held = held.scoped_configurable_fn()  # a macro's value (macros of macros followed)
    assert held == value, key
    checked += 1
  assert checked >= 10, settings.bindings
  assert any(line[:1].isspace() for line in text.splitlines())  # a value gin continued


def test_continued_values_macros_of_macros_and_skipped_lines():
  text = ("# Macros:\nA = %B\nB = 3\n\n# Parameters for f:\n"
          "f.x = %A\nf.y = \\\n    {'a': 1,\n     'b': [2, 3]}\nf.z = @g()\n"
          "include 'runs/demo.gin'\nimport t5gemma_jax\nscope/f.x = 'text'\n")
  s = config_gin.parse_gin(text)
  assert s.values() == {"A": 3, "B": 3, "f.x": 3, "f.y": {"a": 1, "b": [2, 3]},
                        "f.z": "@g()", "scope/f.x": "text"}
  assert s.text("f.x") == "3" and s.text("missing") is None
  assert s.parameters_of("f") == {"x": 3, "y": {"a": 1, "b": [2, 3]}, "z": "@g()"}



def test_gin_bindings_become_a_flat_run_config():
  """What the W&B run config gets: every macro and binding, literals as values."""
  text = ("# Macros:\nBATCH_SIZE = 8\nNAME = 'x'\n\n# Parameters for TrainConfig:\n"
          "TrainConfig.batch_size = %BATCH_SIZE\nTrainConfig.model = @preset()\n"
          "data_settings.rates = \\\n    {'a': 1.0,\n     'b': 2.0}\ninclude 'runs/demo.gin'\n")
  assert config_gin.parse_gin(text).values() == {
      "BATCH_SIZE": 8, "NAME": "x", "TrainConfig.batch_size": 8,
      "TrainConfig.model": "@preset()", "data_settings.rates": {"a": 1.0, "b": 2.0}}


def test_a_run_directory_without_config_gin_reads_as_none(tmp_path):
  assert config_gin.read_run(str(tmp_path)) is None
  (tmp_path / "config.gin").write_text("TrainConfig.batch_size = 3\n")
  assert config_gin.read_run(str(tmp_path)).value("TrainConfig.batch_size") == 3
