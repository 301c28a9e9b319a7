"""Training: accumulation, frozen groups, NaN stop, kill-and-resume, SIGTERM, two processes,
and the demo's falling loss."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5gemma_jax import checkpoint, inference, presets
from t5gemma_jax.cli import app
from t5gemma_jax.train import optim, step as step_lib
from t5gemma_jax.train.losses import LossConfig
from tests.helpers.recipes import QUICK_TRAIN as QUICK
from tests.helpers.random_params import random_params

pytestmark = pytest.mark.slow  # subprocess runs or long trainings: `make test` only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(seed, rows=8, s=20, t=10):
  rng = np.random.default_rng(seed)
  enc = rng.integers(3, 2048, (rows, s)).astype(np.int32)
  tgt = rng.integers(3, 2048, (rows, t)).astype(np.int32)
  enc[::2, -6:] = 0
  tgt[1::2, -4:] = 0
  dec = np.concatenate([np.full((rows, 1), 2, np.int32), tgt[:, :-1]], axis=1) * (tgt > 0)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec.astype(np.int32),
          "decoder_target_tokens": tgt, "decoder_loss_weights": (tgt > 0).astype(np.int32)}


def _optimizer(cfg, **kw):
  opt = optim.OptimizerConfig(name="adamw", schedule=optim.ScheduleConfig(
      name="constant", learning_rate=1e-3, warmup_steps=0), **kw)
  return optim.make_optimizer(opt, random_params(cfg))


def _one_step(cfg, optimizer, microbatches, batch, params):
  from t5gemma_jax.train.state import TrainState
  state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  step = jax.jit(step_lib.make_train_step(cfg, optimizer, LossConfig(), microbatches))
  return step(state, batch, jax.random.PRNGKey(0))


def test_microbatch_accumulation_equals_the_full_batch():
  cfg = presets.preset("tiny")
  params = random_params(cfg, seed=1)
  # Plain SGD with rate 1: the parameter change is the gradient itself, so this compares the
  # accumulated gradients (Adam's first step, ~lr * sign(g), would amplify rounding noise).
  optimizer = optax.sgd(1.0)
  batch = _batch(0)
  full, m_full = _one_step(cfg, optimizer, 1, batch, params)
  micro, m_micro = _one_step(cfg, optimizer, 4, batch, params)
  np.testing.assert_allclose(m_micro["loss"], m_full["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_micro["grad_norm"], m_full["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(micro.params), jax.tree_util.tree_leaves(full.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_groups_do_not_change():
  cfg = presets.preset("tiny")
  params = random_params(cfg, seed=2)
  optimizer = _optimizer(cfg, frozen_groups=("encoder", "decoder", "embeddings"))
  state, _ = _one_step(cfg, optimizer, 1, _batch(1), params)
  groups = optim.param_groups(params)
  changed = {g: False for g in optim.GROUPS}
  for g, a, b in zip(jax.tree_util.tree_leaves(groups), jax.tree_util.tree_leaves(state.params),
                     jax.tree_util.tree_leaves(params)):
    changed[g] |= not np.array_equal(np.asarray(a), np.asarray(b))
  assert changed == {"cross_attention": True, "encoder": False, "decoder": False,
                     "embeddings": False}


def test_nan_loss_stops_the_run_without_saving_it(clean_gin, tmp_path, capsys):
  argv = ["train", *QUICK, f'--gin.MODEL_DIR="{tmp_path}"', "--gin.LEARNING_RATE=1e30",
          "--gin.TRAIN_STEPS=6"]
  assert app.main(argv) == 2  # one line on stderr, no traceback
  assert re.search(r"error: loss is .* at step \d+", capsys.readouterr().err)
  steps = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_every=2).all_steps()
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  finite = [r["step"] for r in records if isinstance(r.get("loss"), float)]
  assert all(s <= max(finite, default=0) for s in steps), (steps, finite)


def test_demo_recipe_loss_falls(clean_gin, tmp_path, capsys):
  argv = ["train", "--gin_file=runs/demo.gin", f'--gin.MODEL_DIR="{tmp_path}"',
          "--gin.TRAIN_STEPS=40", "--gin.WARMUP_STEPS=5", "--gin.EVAL_PERIOD=40",
          "--gin.CHECKPOINT_PERIOD=40", "--gin.TrainConfig.progress=False",
          "--gin.TrainConfig.log_period=1", "--gin.TrainConfig.eval_examples=32"]
  assert app.main(argv) == 0
  out = capsys.readouterr().out
  assert "validation loss" in out and str(tmp_path) in out
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  losses = [r["loss"] for r in records if "loss" in r]
  assert losses[-1] < losses[0] - 1.0, losses  # from ~7.6 (uniform over 2048) downwards
  assert {"step", "loss", "tokens_per_s", "mfu", "grad_norm", "learning_rate"} <= set(records[0])
  assert os.path.isfile(tmp_path / "config.gin") and os.listdir(tmp_path / "tensorboard")


def _cli(model_dir, *extra):
  return [sys.executable, "-m", "t5gemma_jax.cli", "train", *QUICK,
          f'--gin.MODEL_DIR="{model_dir}"', *extra]


def _final_params(model_dir):
  return inference.load_params(presets.preset("tiny"), str(model_dir))


def _wait_for_checkpoint(model_dir, step, proc, timeout=300):
  marker = os.path.join(model_dir, "checkpoints", str(step), "commit_success.txt")
  deadline = time.time() + timeout
  while not os.path.exists(marker):
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.02)


def test_kill_and_resume_is_bitwise_identical(tmp_path):
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  subprocess.run(_cli(whole), cwd=REPO, check=True, capture_output=True, timeout=600)
  proc = subprocess.Popen(_cli(killed), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  _wait_for_checkpoint(killed, 4, proc)
  proc.kill()  # SIGKILL: no chance to save anything more
  proc.communicate()
  resumed = subprocess.run(_cli(killed), cwd=REPO, capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "run resumed: steps" in resumed.stdout and "-> 12" in resumed.stdout
  first = int(resumed.stdout.split("run resumed: steps ")[1].split()[0])
  assert 4 <= first < 12, resumed.stdout
  a, b = _final_params(whole), _final_params(killed)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = subprocess.Popen(_cli(tmp_path, "--gin.TRAIN_STEPS=100000"), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _wait_for_checkpoint(tmp_path, 2, proc)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "stopped by SIGTERM" in out
  last = int(out.split("run initialised: steps 0 -> ")[1].split()[0])
  steps = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_every=2).all_steps()
  assert max(steps) == last >= 2


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_give_the_losses_of_one(tmp_path):
  """t5gemma launch local: two real processes joined by jax.distributed train like one."""
  # No dropout: the two processes read the same examples, but rows land in another order
  # within the global batch, so each would draw another row's dropout mask.
  common = ["--gin.TRAIN_STEPS=3", "--gin.TrainConfig.pack=False",
            "--gin.TrainConfig.shuffle=False", "--gin.BATCH_SIZE=8", "--gin.preset.dropout_rate=0.0"]
  base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  one = dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  single = subprocess.run(_cli(tmp_path / "one", *common), cwd=REPO, env=one,
                          capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  two = subprocess.run([sys.executable, "-m", "t5gemma_jax.launch.local", "--num_processes=2",
                        "--devices_per_process=2", "--", *_cli(tmp_path / "two", *common)[3:]],
                       cwd=REPO, env=base, capture_output=True, text=True, timeout=600)
  assert two.returncode == 0, two.stdout[-3000:]
  # Both processes print the run summary; their final losses agree.
  finals = sorted(line for line in two.stdout.splitlines() if "final train loss" in line)
  assert [f[:5] for f in finals] == ["[p0] ", "[p1] "], finals
  assert finals[0][5:].split(",")[0] == finals[1][5:].split(",")[0]

  def losses(d):
    return [r["loss"] for r in map(json.loads, open(d / "metrics.jsonl")) if "loss" in r]
  assert len(losses(tmp_path / "one")) == 3
  np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)


def test_fine_tuning_starts_from_another_runs_params(clean_gin, tmp_path, capsys):
  pre, ft = tmp_path / "pre", tmp_path / "ft"
  assert app.main(["train", *QUICK, f'--gin.MODEL_DIR="{pre}"', "--gin.TRAIN_STEPS=4"]) == 0
  assert app.main(["train", *QUICK, f'--gin.MODEL_DIR="{ft}"', "--gin.TRAIN_STEPS=3",
                    f'--gin.TrainConfig.init_from="{pre}"', "--gin.LEARNING_RATE=0.0"]) == 0
  out = capsys.readouterr().out
  assert f"run fine-tuning from {pre}: steps 0 -> 3" in out
  # With a zero learning rate the fine-tuned params are exactly the pretrained ones.
  for a, b in zip(jax.tree_util.tree_leaves(_final_params(pre)),
                  jax.tree_util.tree_leaves(_final_params(ft))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_misspelt_macro_fails_before_compiling(clean_gin, tmp_path, capsys):
  rc = app.main(["train", "--gin_file=runs/demo.gin", "--gin.TRAIN_STEP=5",
                  f'--gin.MODEL_DIR="{tmp_path}"'])
  err = capsys.readouterr().err
  assert rc == 2 and "TRAIN_STEP" in err and "did you mean TRAIN_STEPS" in err
  assert not os.path.exists(tmp_path / "checkpoints")
  rc = app.main(["train", "--gin_file=runs/demo.gin", "--gin.TrainConfig.batchsize=5"])
  assert rc == 2 and "batchsize" in capsys.readouterr().err


@pytest.mark.slow
def test_splash_attention_trains_from_the_cli(clean_gin, tmp_path, capsys):
  """attention_impl='splash' end to end on CPU (Pallas interpret mode): initialisation never
  traces the kernel with one-token inputs and the kernel runs under the training mesh."""
  argv = ["train", *QUICK, f'--gin.MODEL_DIR="{tmp_path}"',
          "--gin.RunOptions.attention_impl='splash'",
          '--gin.TASK_FEATURE_LENGTHS={"inputs": 128, "targets": 128}', "--gin.TRAIN_STEPS=2",
          "--gin.WARMUP_STEPS=1", "--gin.TrainConfig.eval_tasks=()"]
  assert app.main(argv) == 0, capsys.readouterr().err
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
