"""A built wheel, installed into a fresh virtualenv, runs the CLI from a folder outside the
checkout: the gin files and task registrations travel inside the package."""

import json
import os
import site
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(the fresh venv's python, its t5gemma script, a working folder outside the checkout)."""
  root = tmp_path_factory.mktemp("wheel")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                  "--no-build-isolation", "-w", str(root / "dist"), REPO], check=True,
                 timeout=600, capture_output=True)
  wheel = next((root / "dist").glob("t5gemma_jax-*.whl"))
  venv = root / "venv"
  subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True, timeout=300)
  python = str(venv / "bin" / "python")
  # The dependencies (jax, TensorFlow, ...) come from this environment's site-packages, listed
  # in a .pth file: a directory named there is not a site dir, so this checkout's editable
  # install (itself a .pth inside it) stays invisible and only the wheel provides t5gemma_jax.
  target = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                          check=True, capture_output=True, text=True).stdout.strip()
  with open(os.path.join(target, "t5gemma_deps.pth"), "w") as f:
    f.write(site.getsitepackages()[0] + "\n")
  subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                 check=True, timeout=600, capture_output=True)
  work = root / "elsewhere"
  work.mkdir()
  return python, str(venv / "bin" / "t5gemma"), str(work)


def _env():
  # A clean environment: nothing may point the child at the checkout.
  return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}


def test_the_package_imports_from_the_wheel(installed):
  python, _, work = installed
  out = subprocess.run([python, "-c", "import t5gemma_jax, os; print(t5gemma_jax.__file__)"],
                       cwd=work, env=_env(), capture_output=True, text=True, check=True)
  path = out.stdout.strip()
  assert "site-packages" in path and not path.startswith(REPO), path


def test_show_config_and_a_short_training_run_outside_the_checkout(installed):
  _, t5gemma, work = installed
  show = subprocess.run([t5gemma, "show_config", "--gin_file=models/tiny.gin"], cwd=work,
                        env=_env(), capture_output=True, text=True, timeout=300)
  assert show.returncode == 0, show.stderr[-2000:]
  assert json.loads(show.stdout)["config"]["encoder"]["vocab_size"] == 2048
  model_dir = os.path.join(work, "run")
  train = subprocess.run(
      [t5gemma, "train", "--gin_file=runs/demo.gin", f"--gin.MODEL_DIR='{model_dir}'",
       "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=4", "--gin.WARMUP_STEPS=1",
       '--gin.TASK_FEATURE_LENGTHS={"inputs": 32, "targets": 16}', "--gin.EVAL_PERIOD=0",
       "--gin.TrainConfig.eval_tasks=()", "--gin.TrainConfig.progress=False"],
      cwd=work, env=_env(), capture_output=True, text=True, timeout=900)
  assert train.returncode == 0, train.stderr[-3000:]
  assert "steps 0 -> 3" in train.stdout, train.stdout
  assert {"checkpoints", "model.gin", "config.gin", "metrics.jsonl"} <= set(os.listdir(model_dir))


def test_the_launchers_and_sweep_files_come_with_the_wheel(installed):
  _, t5gemma, work = installed
  sweep = subprocess.run([t5gemma, "launch", "sweep", f"--root={work}/cmp",
                          "--sweep_file=encdec_vs_deconly.json", "--mode=print"], cwd=work,
                         env=_env(), capture_output=True, text=True, timeout=300)
  assert sweep.returncode == 0, sweep.stderr[-2000:]
  assert len(sweep.stdout.splitlines()) == 15  # 5 models x 3 seeds
  # No checkout to pack from a wheel install: the TPU launcher asks for a wheel or a git ref.
  tpu = subprocess.run([t5gemma, "launch", "tpu", "run", "x", "--zone=z", "--model_dir=gs://b/r",
                        "--skip_compile_check", "--dry_run", "--", "--gin_file=runs/demo.gin"],
                       cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
  assert tpu.returncode == 2 and "--wheel=PATH.whl" in tpu.stderr, tpu.stderr
