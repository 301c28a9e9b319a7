"""A quiet, readable console: TensorFlow's start-up noise filtered, one progress line per log
period when the output is not a terminal."""

import io
import os
import subprocess
import sys

import pytest

from t5gemma_jax.cli import backends
from t5gemma_jax.train import progress


def test_native_noise_is_dropped_and_everything_else_kept(capfd):
  with backends.native_stderr_filtered():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                b"written to STDERR\n")
    os.write(2, b"I0000 00:00:1796237133.663847   29148 cudart_stub.cc:31] Could not find "
                b"cuda drivers on your machine, GPU will not be used.\n")
    os.write(2, b"E0000 00:00:1796237995.638620    2274 cuda_platform.cc:52] failed call to "
                b"cuInit: INTERNAL: CUDA error\n")
    os.write(2, b"a real error from native code\n")
    print("and one from Python", file=sys.stderr)
  err = capfd.readouterr().err
  assert sorted(err.splitlines()) == ["a real error from native code", "and one from Python"]


def test_line_progress_prints_one_line_per_record():
  out = io.StringIO()
  bar = progress.make(40, 0, stream=out)  # a StringIO is not a terminal
  assert isinstance(bar, progress.LineProgress)
  for step in range(1, 41):
    bar.step(step, 3.0)
    if step % 10 == 0:
      bar.record(step, {"loss": 2.5, "tokens_per_s": 1234.4, "step_seconds": 0.21})
  lines = out.getvalue().splitlines()
  assert len(lines) == 4 and "\r" not in out.getvalue()
  assert lines[-1] == "train step 40/40 loss 2.5000 tok/s 1234 step 0.21 s"


@pytest.mark.slow
def test_a_launcher_that_loads_tensorflow_prints_no_start_up_lines(tmp_path):
  """`t5gemma launch report` of an evaluated run scores the copy baseline through the seqio
  task (TensorFlow): its output has the tables and nothing of TensorFlow's."""
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.jsonl").write_text('{"step": 2, "loss": 3.5}\n')
  (run / "eval_results.jsonl").write_text(
      '{"step": 2, "task": "cldr_translate_en_de", "split": "validation", "examples": 4, '
      '"bleu": 1.0, "chrf": 2.0, "exact_match": 0.0}\n')
  proc = subprocess.run([sys.executable, "-m", "t5gemma_jax.cli", "launch", "report", str(run)],
                        capture_output=True, text=True, timeout=300,
                        env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
  assert proc.returncode == 0, proc.stderr
  assert "baseline: copy source / first sentence (validation, 4 examples)" in proc.stdout
  assert proc.stderr == "", proc.stderr


@pytest.mark.slow
def test_cli_start_prints_nothing_on_a_cpu_host():
  proc = subprocess.run([sys.executable, "-m", "t5gemma_jax.cli", "show_config",
                         "--gin_file=models/tiny.gin"], capture_output=True, text=True,
                        timeout=300, env={k: v for k, v in os.environ.items()
                                          if k != "TF_CPP_MIN_LOG_LEVEL"})
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == "", proc.stderr
