"""Profiling a training run: a jax.profiler trace TensorBoard's profile plugin reads, the
data / device wait split in metrics.jsonl, and bad TrainConfig.profile_steps."""

import glob
import json
import os
import time

import pytest

from t5gemma_jax import presets
from t5gemma_jax.cli import app
from t5gemma_jax.train import loop, optim, profiling
from t5gemma_jax.train.metrics_writer import MetricsWriter
from t5gemma_jax.train.step_log import StepLog
from tests.helpers.recipes import QUICK_TRAIN


@pytest.mark.slow  # a short training run (compiles the tiny model's steps)
def test_a_profiled_run_writes_a_trace_tensorboard_reads_and_the_wait_split(
    clean_gin, tmp_path, capsys):
  from xprof.convert import raw_to_tool_data  # what TensorBoard's Profile tab runs
  rc = app.main(["train", *QUICK_TRAIN, f'--gin.MODEL_DIR="{tmp_path}"', "--gin.TRAIN_STEPS=5",
                 "--gin.CHECKPOINT_PERIOD=5", "--gin.TrainConfig.eval_tasks=()",
                 "--gin.PROFILE_STEPS=(2, 2)"])
  assert rc == 0, capsys.readouterr().err
  traces = glob.glob(str(tmp_path / "tensorboard" / "plugins" / "profile" / "*" /
                         "*.xplane.pb"))
  assert len(traces) == 1, traces
  data, _ = raw_to_tool_data.xspace_to_tool_data(traces, "trace_viewer", {})
  events = json.loads(data)["traceEvents"]
  steps = sorted(int(e["args"]["step_num"]) for e in events
                 if e.get("args", {}).get("step_name", "").startswith("train "))
  assert steps == [2, 3]  # exactly the window, one marker each
  modules = {e["args"].get("hlo_module") for e in events if "args" in e}
  assert any(m and "train_step" in m for m in modules), sorted(filter(None, modules))

  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
  for r in train:
    assert r["data_wait_seconds"] >= 0 and r["device_wait_seconds"] >= 0, r
    assert r["data_wait_seconds"] + r["device_wait_seconds"] <= r["step_seconds"] + 1e-6, r
  assert any(r["device_wait_seconds"] > 0 for r in train)  # measured, not a constant 0


def test_a_slow_input_pipeline_shows_as_data_wait(tmp_path):
  import jax.numpy as jnp

  def batches():
    while True:
      time.sleep(0.05)
      yield {}

  writer = MetricsWriter(str(tmp_path))
  log = StepLog(writer, None, log_period=2, train_steps=4, step_flops=1.0, peak=None, first=0)
  data = batches()
  for step in range(1, 5):
    log.next_batch(data)
    log.consume(step, {"loss": jnp.float32(2.0) + step, "real_tokens": jnp.float32(3.0)})
  writer.close()
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records] == [2, 4]
  for r in records:
    assert 0.05 <= r["data_wait_seconds"] <= r["step_seconds"], r
    assert 0 <= r["device_wait_seconds"] < 0.05, r


def _config(**kw):
  return loop.TrainConfig(model=presets.preset("tiny"), mixture_or_task="t",
                          task_feature_lengths={"inputs": 8, "targets": 8}, batch_size=2,
                          train_steps=10, model_dir="/tmp/unused",
                          optimizer=optim.OptimizerConfig(), **kw)


@pytest.mark.parametrize("value", [(0, 3), (2, 0), (2,), (1, 2, 3), (2.0, 1), (True, 1), "5,3",
                                   5])
def test_bad_profile_steps_are_a_clear_error(value):
  with pytest.raises(ValueError, match=r"TrainConfig\.profile_steps"):
    _config(profile_steps=value)


def test_profile_steps_off_or_a_window():
  assert _config().profile_steps is None
  assert _config(profile_steps=()).profile_steps is None
  assert _config(profile_steps=[3, 2]).profile_steps == (3, 2)
  with pytest.raises(ValueError, match=r"TrainConfig\.profile_steps .* after the last step"):
    _config(profile_steps=(11, 1))


def test_the_cli_names_a_bad_profile_window(clean_gin, tmp_path, capsys):
  rc = app.main(["train", *QUICK_TRAIN, f'--gin.MODEL_DIR="{tmp_path}"',
                 "--gin.PROFILE_STEPS=(0, 3)"])
  assert rc == 2 and "TrainConfig.profile_steps" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "checkpoints")


def test_the_profiler_traces_only_its_window(tmp_path):
  """Steps outside the window and a disabled profiler leave no trace; a run ending inside the
  window still writes what it traced."""
  import jax.numpy as jnp
  off = profiling.StepProfiler((2, 2), str(tmp_path / "off"), enabled=False)
  cut = profiling.StepProfiler((2, 5), str(tmp_path / "cut"), enabled=True)
  for step in (1, 2, 3):
    for p in (off, cut):
      p.begin(step)
      p.end(step, jnp.ones(()) * step)
  off.close()
  cut.close()
  assert off.trace_dir is None and not os.path.exists(tmp_path / "off")
  assert cut.trace_dir == str(tmp_path / "cut" / "plugins" / "profile")
  assert glob.glob(os.path.join(cut.trace_dir, "*", "*.xplane.pb"))
