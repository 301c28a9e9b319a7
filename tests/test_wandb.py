"""Weights & Biases (offline, on disk) and config.gin in TensorBoard: a short training with
`TrainConfig.wandb_project`, resumed, against metrics.jsonl and eval_results.jsonl; the error
without the package; the config.gin text summary read back from the events file."""

import glob
import json
import os
import sys
import time

import pytest

from t5gemma_jax import storage
from t5gemma_jax.cli import app
from t5gemma_jax.train import metrics_writer, wandb_writer
from tests.helpers import wandb_records
from tests.helpers.recipes import QUICK_TRAIN

TASK = "cldr_translate_en_de"
EXAMPLES = 8


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
  """W&B offline, quiet, and every folder it may write (settings, caches, home) in tmp_path."""
  import wandb
  home = tmp_path / "wandb_home"
  for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                      "WANDB_DIR": home / "dir", "WANDB_CONFIG_DIR": home / "config",
                      "WANDB_CACHE_DIR": home / "cache", "WANDB_DATA_DIR": home / "data",
                      "WANDB_ARTIFACT_DIR": home / "artifacts", "HOME": home}.items():
    monkeypatch.setenv(name, str(value))
  yield
  wandb.teardown()  # the next test's settings are read afresh


def _train(model_dir, steps, eval_tasks=f'("{TASK}",)'):
  argv = ["train", *QUICK_TRAIN, f'--gin.MODEL_DIR="{model_dir}"', f"--gin.TRAIN_STEPS={steps}",
          '--gin.TrainConfig.wandb_project="t5gemma-test"',
          f"--gin.TrainConfig.eval_tasks={eval_tasks}",
          f"--gin.TrainConfig.eval_examples={EXAMPLES}", "--gin.DecodeConfig.max_new_tokens=8"]
  assert app.main(argv) == 0


def _offline_run(model_dir, run_id, index):
  """The `index`-th offline run folder of `run_id` (W&B names them by start time) and its
  records, once complete: W&B's core process may still be writing them after `finish()`
  returns, so this waits (up to a minute) for the run's closing "exit" record."""
  folders = sorted(glob.glob(os.path.join(model_dir, "wandb", f"offline-run-*-{run_id}")))
  folder = folders[index]
  path = os.path.join(folder, f"run-{run_id}.wandb")
  deadline = time.monotonic() + 60
  while True:
    recs = wandb_records.records(path)
    if wandb_records.of_type(recs, "exit") or time.monotonic() > deadline:
      return folder, recs
    time.sleep(0.2)


def _metric_rows(model_dir, first_step):
  """metrics.jsonl's training records after `first_step`, without the unmeasured (None)."""
  rows = [json.loads(line) for line in open(os.path.join(model_dir, "metrics.jsonl"))]
  return [{k: v for k, v in r.items() if v is not None} for r in rows
          if "loss" in r and r["step"] > first_step]


@pytest.mark.slow
def test_training_logs_to_wandb_and_a_resumed_run_continues_it(clean_gin, offline_wandb,
                                                               tmp_path, capsys, monkeypatch):
  model_dir = str(tmp_path / "my_run")
  _train(model_dir, 3)
  run_id = open(os.path.join(model_dir, "wandb", "run_id")).read().strip()
  folder, recs = _offline_run(model_dir, run_id, 0)
  [run] = wandb_records.of_type(recs, "run")
  assert (run.run_id, run.project, run.display_name, run.run_group, run.job_type) == (
      run_id, "t5gemma-test", "my_run", "my_run", "train")
  config = wandb_records.config(run)
  assert config["TrainConfig.batch_size"] == 4 and config["TRAIN_STEPS"] == 3
  assert config["TrainConfig.eval_tasks"] == [TASK]
  gin_text = open(os.path.join(model_dir, "config.gin")).read()
  assert open(os.path.join(folder, "files", "config.gin")).read() == gin_text
  saved = {f.path for files in wandb_records.of_type(recs, "files") for f in files.files}
  assert "config.gin" in saved

  history = wandb_records.history(recs)
  assert [r for r in history if "loss" in r] == _metric_rows(model_dir, 0)
  [scored] = [r for r in history if f"eval/{TASK}/examples" in r]
  [result] = [json.loads(line) for line in open(os.path.join(model_dir, "eval_results.jsonl"))]
  assert scored["step"] == result["step"] == 3
  assert scored[f"eval/{TASK}/bleu"] == result["bleu"]
  assert scored[f"eval/{TASK}/chrf"] == result["chrf"]
  table = json.load(open(os.path.join(folder, "files", scored[f"eval/{TASK}/examples"]["path"])))
  assert table["columns"] == ["input", "target", "prediction"]
  assert len(table["data"]) == EXAMPLES and all(row[0] and row[1] for row in table["data"])
  printed = capsys.readouterr().out  # the run's summary shows the first examples too
  for text, target, prediction in table["data"][:3]:
    assert f"input:      {text}\n  prediction: {prediction}\n  reference:  {target}" in printed

  _train(model_dir, 5, eval_tasks="()")  # resumed from step 3's checkpoint
  assert len(glob.glob(os.path.join(model_dir, "wandb", "offline-run-*"))) == 2
  _, recs = _offline_run(model_dir, run_id, 1)
  [run] = wandb_records.of_type(recs, "run")
  assert run.run_id == run_id and run.resume
  history = wandb_records.history(recs)
  assert [r for r in history if "loss" in r] == _metric_rows(model_dir, 3)
  assert [r["step"] for r in history if "loss" in r] == [4, 5]
  assert not glob.glob(str(tmp_path / "wandb_home" / "dir" / "*" / "offline-run-*"))

  # `t5gemma eval` of the run: a W&B run of its own beside the training run, in its group.
  eval_argv = ["eval", "--gin_file=runs/eval.gin", "--gin_file=models/tiny.gin",
               f'--gin.MODEL_DIR="{model_dir}"', f'--gin.EVAL_TASK="{TASK}"',
               f"--gin.EvalConfig.num_examples={EXAMPLES}", "--gin.DecodeConfig.max_new_tokens=8",
               '--gin.DecodeConfig.strategy="greedy"']
  assert app.main(eval_argv) == 0
  eval_id = open(os.path.join(model_dir, "wandb", "eval_run_id")).read().strip()
  assert eval_id != run_id
  assert len(glob.glob(os.path.join(model_dir, "wandb", f"offline-run-*-{run_id}"))) == 2
  _, recs = _offline_run(model_dir, eval_id, 0)
  [run] = wandb_records.of_type(recs, "run")
  assert (run.project, run.display_name, run.run_group, run.job_type) == (
      "t5gemma-test", "my_run-eval", "my_run", "eval")
  [scored] = [r for r in wandb_records.history(recs) if f"eval/{TASK}/examples" in r]
  result = [json.loads(line) for line in open(os.path.join(model_dir, "eval_results.jsonl"))][-1]
  assert scored["step"] == result["step"] == 5 and result["examples"] == EXAMPLES
  assert scored[f"eval/{TASK}/bleu"] == result["bleu"]

  # The same eval where wandb is not installed: scored all the same, W&B left out, and said.
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
  capsys.readouterr()
  assert app.main(eval_argv) == 0
  assert "wandb is not installed here" in capsys.readouterr().err
  assert len(open(os.path.join(model_dir, "eval_results.jsonl")).readlines()) == 3
  assert len(glob.glob(os.path.join(model_dir, "wandb", f"offline-run-*-{eval_id}"))) == 1


def test_without_the_wandb_package_the_error_says_how_to_install_it(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
  with pytest.raises(ImportError, match=r"pip install t5gemma-jax\[wandb\]"):
    metrics_writer.MetricsWriter(str(tmp_path), wandb_project="p")
  assert os.listdir(tmp_path) == []  # it failed before opening any log
  # `t5gemma eval` asked for W&B explicitly: the error names its own binding.
  with pytest.raises(ImportError, match=r"^EvalConfig\.wandb_project is set .*\[wandb\]"):
    wandb_writer.WandbWriter(str(tmp_path), "p", job_type="eval")
  assert os.listdir(tmp_path) == []


def test_config_gin_is_a_tensorboard_text_summary(tmp_path):
  import tensorflow as tf
  text = "TrainConfig.batch_size = 8\nTRAIN_STEPS = 100\n"
  writer = metrics_writer.MetricsWriter(str(tmp_path), config_gin=text)
  writer.write(1, {"loss": 2.5})
  writer.close()
  [events] = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  found = {}
  for event in tf.compat.v1.train.summary_iterator(events):
    for value in event.summary.value:
      found[value.tag] = (event.step, tf.make_ndarray(value.tensor))
  step, tensor = found["config.gin"]
  assert step == 0 and tensor.item().decode() == f"```\n{text}\n```"
  assert found["loss"][0] == 1


def test_the_run_id_is_made_once_per_model_dir_also_in_a_bucket(tmp_path):
  with storage.simulate_object_store(str(tmp_path / "bucket")):
    for model_dir in (str(tmp_path / "local"), str(tmp_path / "bucket" / "run")):
      made = wandb_writer.run_id(model_dir)
      assert wandb_writer.run_id(model_dir) == made  # a resumed run reads it back
      assert open(os.path.join(model_dir, "wandb", "run_id")).read() == made + "\n"
    assert wandb_writer.run_id(str(tmp_path / "other")) != made
  (tmp_path / "local" / "wandb" / "run_id").write_text("no/slashes\n")
  with pytest.raises(ValueError, match="run_id holds 'no/slashes', not a W&B run id"):
    wandb_writer.run_id(str(tmp_path / "local"))
