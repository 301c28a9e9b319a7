"""Faults: damaged checkpoints fall back to the previous step (or fail with a clear error), and a
run SIGKILLed at random moments ends bitwise where an uninterrupted run ends."""

import glob
import logging
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import pytest

from benchmarks import kill_resume_torture as torture
from t5gemma_jax import checkpoint
from tests.helpers.states import (abstract, assert_bitwise, replicated, small_batches,
                                  small_state)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS, PERIOD = 12, 2  # checkpoints 8, 10 and 12 are kept
# A failed tensorstore read leaves orbax's asyncio callbacks to a closed event loop: noise.
pytestmark = [pytest.mark.slow,  # subprocess runs: `make test` only
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _truncate_state_data(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert files
  for path in files:
    _truncate(path)


# ------------------------------------------------------------------ Checkpointer, in process


def _three_steps(directory):
  """Steps 1-3 of distinct states, each with the position after that many batches."""
  batches = small_batches()
  with checkpoint.Checkpointer(str(directory), save_every=1) as ckpt:
    for step in (1, 2, 3):
      next(batches)
      ckpt.save(step, small_state(seed=step), data_iterator=batches)


DAMAGE = {
    "truncated state data": lambda d: _truncate_state_data(d),
    "deleted state metadata": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "truncated iterator index": lambda d: _truncate(
        os.path.join(d, "data_iterator", "process_0.index")),
    "deleted iterator data": lambda d: os.remove(
        os.path.join(d, "data_iterator", "process_0.data-00000-of-00001")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_step_is_set_aside_and_the_previous_one_loads(tmp_path, caplog, damage):
  _three_steps(tmp_path)
  DAMAGE[damage](str(tmp_path / "3"))
  target = abstract(small_state(), replicated())
  batches = small_batches()
  with caplog.at_level(logging.WARNING), \
       checkpoint.Checkpointer(str(tmp_path), save_every=1) as ckpt:
    restored = ckpt.restore(None, target, data_iterator=batches)
    assert ckpt.restored_step == 2 and ckpt.all_steps() == [1, 2]
    assert int(next(batches)["x"][0]) == 4  # the batch after two (the third)
    assert_bitwise(restored, small_state(seed=2))
    warned = caplog.text
    assert f"checkpoint {tmp_path / '3'} could not be loaded" in warned
    assert ("state" if "state" in damage else "data_iterator") + ": " in warned
    assert f"{tmp_path / '3'} -> 3.damaged; resuming from step 2" in warned
    # Step 3 can be saved again; the damaged copy stays out of the way (and out of retention).
    assert ckpt.save(3, small_state(seed=7), data_iterator=batches)
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "3", "3.damaged"]
  DAMAGE[damage](str(tmp_path / "3"))  # damaged again: set aside under the next free name
  with checkpoint.Checkpointer(str(tmp_path), save_every=1) as ckpt:
    restored = ckpt.restore(None, target, data_iterator=small_batches())
  assert_bitwise(restored, small_state(seed=2))
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.damaged", "3.damaged-2"]


def test_explicit_step_mismatch_and_all_damaged_raise_and_move_nothing(tmp_path):
  _three_steps(tmp_path)
  _truncate_state_data(str(tmp_path / "3"))
  target = abstract(small_state(), replicated())
  with checkpoint.Checkpointer(str(tmp_path), save_every=1) as ckpt:
    # A given step is never replaced by another.
    with pytest.raises(checkpoint.DamagedCheckpointError,
                       match=f"checkpoint {tmp_path / '3'} could not be loaded: state: "):
      ckpt.restore(3, target)
    # Another model's abstract state is not damage: it raises, on the first readable step.
    wrong = target.replace(params={**target.params, "decoder": {
        "embedding": jax.ShapeDtypeStruct((16, 5), jnp.float32, sharding=replicated())}})
    with pytest.raises(ValueError, match="step 2 does not match the abstract state"):
      ckpt.restore(None, wrong)
  for step in ("1", "2"):
    os.remove(tmp_path / step / "data_iterator" / "process_0.index")
  with checkpoint.Checkpointer(str(tmp_path), save_every=1) as ckpt:
    with pytest.raises(checkpoint.DamagedCheckpointError,
                       match=r"no checkpoint in .* could be loaded: step 3: state: .*; step 2: "
                             r"data_iterator: .*; step 1: data_iterator: .*Nothing was moved"):
      ckpt.restore(None, target, data_iterator=small_batches())
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]


# ------------------------------------------------------------------------ the CLI, end to end


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
  """An uninterrupted run of the recipe: (model_dir, start-up seconds)."""
  model_dir = str(tmp_path_factory.mktemp("whole") / "run")
  return model_dir, torture.run_whole(model_dir, STEPS, PERIOD)


def _resume(model_dir):
  return subprocess.run(torture.command(model_dir, STEPS, PERIOD), cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def _assert_same_as(whole_dir, model_dir):
  verdict = torture.compare(whole_dir, model_dir, STEPS, PERIOD)
  assert verdict == {"step": None, "params": None, "optimizer state": None,
                     "batch sequence": None}, verdict


@pytest.mark.parametrize("damage", ["truncated state data", "deleted iterator data"])
def test_run_falls_back_past_a_damaged_latest_checkpoint_and_finishes(whole, tmp_path, damage):
  # The finished run's last checkpoint damaged: the run goes back two steps and ends as before.
  model_dir = str(tmp_path / "run")
  shutil.copytree(whole[0], model_dir)
  latest = os.path.join(model_dir, "checkpoints", str(STEPS))
  DAMAGE[damage](latest)
  proc = _resume(model_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  item = "state" if "state" in damage else "data_iterator"
  assert f"checkpoint {latest} could not be loaded ({item}: " in proc.stderr
  assert f"set aside damaged checkpoint(s) {latest} -> {STEPS}.damaged" in proc.stderr
  assert f"run resumed: steps {STEPS - PERIOD} -> {STEPS}" in proc.stdout
  _assert_same_as(whole[0], model_dir)  # the steps run again logged the same batches


def test_every_checkpoint_damaged_is_a_clear_error(whole, tmp_path):
  model_dir = str(tmp_path / "run")
  shutil.copytree(whole[0], model_dir)
  steps = sorted(int(s) for s in os.listdir(os.path.join(model_dir, "checkpoints")))
  for step in steps:
    _truncate_state_data(os.path.join(model_dir, "checkpoints", str(step)))
  proc = _resume(model_dir)
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"t5gemma train: error: no checkpoint in {model_dir}/checkpoints could "
                         "be loaded: "), last
  for step in steps:
    assert f"step {step}: state: " in last
  assert "Nothing was moved" in last and "Traceback" not in proc.stderr
  assert sorted(int(s) for s in os.listdir(os.path.join(model_dir, "checkpoints"))) == steps


def test_sigkills_at_random_moments_change_nothing(whole, tmp_path):
  lines = []
  result = torture.torture(str(tmp_path), kills=5, steps=STEPS, checkpoint_period=PERIOD,
                           seed=3, reference=whole[0], startup_s=whole[1], log=lines.append)
  report = "\n".join(lines)
  moments = [k.moment for k in result["kills"]]
  assert len(moments) >= 5, report
  assert "in_flight" in moments and "after_commit" in moments, report
  assert result["ok"], report
  assert result["set_aside"] == [], report  # a kill never damages a committed step
