"""Kill-and-resume torture: SIGKILL a training run again and again, restart it each time, and
check that it ends exactly where an uninterrupted run of the same recipe ends.

  .venv/bin/python benchmarks/kill_resume_torture.py --kills=20 --steps=80 \
      --checkpoint_period=4 --seed=0 --root=/tmp/torture

The recipe is the tests' quick one (demo recipe, tiny model, CLDR task, batch 4) with
TrainConfig.log_batches, so each run logs the crc32 of every batch before its step runs. The
moments of the kills (seeded) are:

  in_flight     an asynchronous checkpoint write is under way (a *.orbax-checkpoint-tmp*
                directory exists under checkpoints/); counted only if the directory is still
                there after the kill
  after_commit  right after a new step directory is committed
  mid_training  a random number of steps (1 to two periods) plus up to 0.2 s into training
  startup       a random time into start-up (imports, restore, compilation)

At least one in_flight and one after_commit kill are made. The verdict compares the full
TrainStates of both final checkpoints (restored with `Checkpointer.restore` onto the abstract
state that `train.step.state_shardings` gives, as the loop does) and the batch logs: every
crc32 logged for a step (a step re-run after a kill logs again) must equal the uninterrupted
run's, and every step 0..N-1 must be logged. Exit status 1 when anything differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

TMP_MARK = ".orbax-checkpoint-tmp"
MOMENTS = ("in_flight", "after_commit", "mid_training", "startup")
_POLL_S = 0.002  # a tiny model's checkpoint write lasts a few hundred milliseconds


def recipe(model_dir: str, steps: int, checkpoint_period: int) -> list[str]:
  """`t5gemma train` arguments of the run (the tests' quick recipe, with batch logging)."""
  return ["--gin_file=runs/demo.gin", '--gin.MIXTURE_OR_TASK_NAME="cldr_translate_en_de"',
          '--gin.TASK_FEATURE_LENGTHS={"inputs": 32, "targets": 16}', "--gin.BATCH_SIZE=4",
          f"--gin.TRAIN_STEPS={steps}", f"--gin.CHECKPOINT_PERIOD={checkpoint_period}",
          "--gin.EVAL_PERIOD=0", "--gin.WARMUP_STEPS=2", "--gin.TrainConfig.log_period=1",
          "--gin.TrainConfig.progress=False", "--gin.TrainConfig.eval_tasks=()",
          "--gin.TrainConfig.log_batches=True", f'--gin.MODEL_DIR="{model_dir}"']


def command(model_dir: str, steps: int, checkpoint_period: int) -> list[str]:
  return [sys.executable, "-m", "t5gemma_jax.cli", "train",
          *recipe(model_dir, steps, checkpoint_period)]


def _env() -> dict:
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))


def batch_log(model_dir: str) -> list[tuple[int, int]]:
  """(step, crc32) of every logged batch, in order; an unparsable line is (-1, -1)."""
  path = os.path.join(model_dir, "batches_p0.jsonl")
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f.read().splitlines():
      try:
        r = json.loads(line)
        records.append((int(r["step"]), int(r["crc32"])))
      except (ValueError, KeyError, TypeError):
        records.append((-1, -1))
  return records


def _listing(model_dir: str) -> tuple[set[int], bool]:
  """(committed steps, whether a checkpoint write is in flight) under checkpoints/."""
  try:
    names = os.listdir(os.path.join(model_dir, "checkpoints"))
  except FileNotFoundError:
    return set(), False
  return {int(n) for n in names if n.isdigit()}, any(TMP_MARK in n for n in names)


def run_whole(model_dir: str, steps: int, checkpoint_period: int) -> float:
  """Runs the recipe without interruption; returns its start-up time (spawn to first batch)."""
  start = time.perf_counter()
  proc = subprocess.Popen(command(model_dir, steps, checkpoint_period), cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  startup = None
  while proc.poll() is None:
    if startup is None and batch_log(model_dir):
      startup = time.perf_counter() - start
    time.sleep(0.05)
  out = proc.communicate()[0]
  if proc.returncode:
    raise RuntimeError(f"uninterrupted run failed (exit {proc.returncode}):\n{out[-3000:]}")
  return startup if startup is not None else time.perf_counter() - start


@dataclasses.dataclass
class Kill:
  moment: str  # what was happening when the kill landed (see the module docstring)
  planned: str  # the moment that was waited for
  resumed_from: int  # newest committed step when this process started
  last_batch: Optional[int]  # newest step this process logged a batch for (None: none)
  committed: Optional[int]  # newest committed step after the kill (None: none)

  def __str__(self):
    reached = "no step" if self.last_batch is None else f"batch of step {self.last_batch}"
    return (f"{self.moment:12} (waited for {self.planned}): started from step "
            f"{self.resumed_from}, reached {reached}; newest checkpoint "
            f"{'none' if self.committed is None else self.committed}")


def _await_moment(proc, model_dir: str, planned: str, rng: random.Random, startup_s: float,
                  steps: int, period: int, timeout: float) -> bool:
  """Waits for the moment `planned` in the process just started; False if it exited first."""
  logged0 = len(batch_log(model_dir))
  committed0, _ = _listing(model_dir)
  start = time.perf_counter()
  if planned == "startup":
    deadline = start + rng.uniform(0.2, max(startup_s, 0.3))
    while time.perf_counter() < deadline:
      if proc.poll() is not None:
        return False
      time.sleep(_POLL_S)
    return True
  target = None
  if planned == "mid_training":
    resume = max(committed0, default=0)
    # Leave at least two steps to run, so that the process is still training at the kill.
    target = min(rng.randint(1, 2 * period), max(steps - 2 - resume, 1))
    extra = rng.uniform(0.0, 0.2)
  while proc.poll() is None:
    if time.perf_counter() - start > timeout:
      raise TimeoutError(f"no {planned} moment within {timeout:.0f} s")
    # Training started in this process: stale debris of a previous one is gone by now.
    new = len(batch_log(model_dir)) - logged0
    if new > 0:
      committed, in_flight = _listing(model_dir)
      if planned == "in_flight" and in_flight:
        return True
      if planned == "after_commit" and committed - committed0:
        return True
      if planned == "mid_training" and new >= target:
        time.sleep(extra)
        return True
    time.sleep(_POLL_S)
  return False


def _plan(kills: int, rng: random.Random) -> list[str]:
  plan = ["in_flight", "after_commit"] + [rng.choice(MOMENTS) for _ in range(kills - 2)]
  rng.shuffle(plan)
  return plan


def torture(root: str, kills: int = 20, steps: int = 80, checkpoint_period: int = 4,
            seed: int = 0, reference: Optional[str] = None, startup_s: float = 10.0,
            log: Callable[[str], None] = print, timeout: float = 600.0) -> dict:
  """SIGKILLs a run `kills` times, restarts it until it finishes, and compares it (`verdict`).

  Args:
    root: working directory (`killed/`, `whole/` and `logs/` go here).
    reference: the model_dir of a finished uninterrupted run of the same recipe; None runs one.
    startup_s: with `reference`, its start-up time (`run_whole`): startup kills land within it.
    log: called with one line per event.
    timeout: seconds any one process may take to reach a moment or finish.

  Returns:
    {"kills": [Kill], "verdict": {check: None (equal) or what differs}, "ok": bool,
     "restarts": processes started after the first, "set_aside": damaged steps set aside,
     "wall_s": seconds}.
  """
  wall = time.perf_counter()
  rng = random.Random(seed)
  os.makedirs(os.path.join(root, "logs"), exist_ok=True)
  if reference is None:
    reference = os.path.join(root, "whole")
    startup_s = run_whole(reference, steps, checkpoint_period)
    log(f"uninterrupted run: {time.perf_counter() - wall:.0f} s (start-up {startup_s:.1f} s)")
  killed = os.path.join(root, "killed")
  plan, done, extra_tries = _plan(kills, rng), [], 3
  finished = False
  while plan and not finished:
    planned = plan.pop(0)
    resumed_from = max(_listing(killed)[0], default=0)
    logged0 = len(batch_log(killed))
    with open(os.path.join(root, "logs", f"run_{len(done):03d}.txt"), "w") as out:
      proc = subprocess.Popen(command(killed, steps, checkpoint_period), cwd=ROOT, env=_env(),
                              stdout=out, stderr=subprocess.STDOUT)
      try:
        landed = _await_moment(proc, killed, planned, rng, startup_s, steps, checkpoint_period,
                               timeout)
      finally:
        proc.kill()  # SIGKILL: nothing more is saved, flushed or cleaned up
        proc.wait()
    if not landed:
      if proc.returncode != 0:
        raise RuntimeError(f"run exited with status {proc.returncode} before a {planned} kill "
                           f"(see {out.name})")
      finished = True
      log(f"the run finished before the {planned} moment: {len(done)} kills made")
      break
    committed, in_flight = _listing(killed)
    new = batch_log(killed)[logged0:]
    # Named by what was happening when the signal landed, which need not be what was awaited
    # (a write that committed just before, a write still in flight well into training).
    if new and in_flight:  # (before training starts, a tmp directory is a previous one's)
      moment = "in_flight"
    elif planned in ("in_flight", "after_commit"):
      moment = "after_commit"
    else:
      moment = "mid_training" if new else "startup"
    if (planned == "in_flight" and moment != "in_flight" and extra_tries
        and "in_flight" not in [k.moment for k in done]):
      extra_tries -= 1
      plan.insert(0, "in_flight")
    kill = Kill(moment, planned, resumed_from, new[-1][0] if new else None,
                max(committed, default=None))
    done.append(kill)
    log(f"kill {len(done):2d}: {kill}")
  restarts = len(done)
  while not finished:  # restart until the run completes
    with open(os.path.join(root, "logs", f"run_{restarts:03d}.txt"), "w") as out:
      proc = subprocess.run(command(killed, steps, checkpoint_period), cwd=ROOT, env=_env(),
                            stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode:
      raise RuntimeError(f"restarted run failed (exit {proc.returncode}; see {out.name})")
    finished = True
  verdict = compare(reference, killed, steps, checkpoint_period)
  set_aside = sorted(n for n in os.listdir(os.path.join(killed, "checkpoints"))
                     if ".damaged" in n)
  result = {"kills": done, "verdict": verdict, "ok": all(v is None for v in verdict.values()),
            "restarts": restarts, "set_aside": set_aside,
            "wall_s": time.perf_counter() - wall}
  for check, problem in verdict.items():
    log(f"{check:15} {'equal' if problem is None else 'DIFFERS: ' + problem}")
  return result


def compare(whole: str, killed: str, steps: int, checkpoint_period: int) -> dict:
  """{check: None when equal, else what differs} for two finished runs of the recipe."""
  verdict = {}
  a, b = (final_state(d, steps, checkpoint_period) for d in (whole, killed))
  verdict["step"] = None if int(a.step) == int(b.step) == steps else (
      f"final steps {int(a.step)} and {int(b.step)}, expected {steps}")
  verdict["params"] = _tree_difference(a.params, b.params)
  verdict["optimizer state"] = _tree_difference(a.opt_state, b.opt_state)
  verdict["batch sequence"] = batch_difference(batch_log(whole), batch_log(killed), steps)
  return verdict


def final_state(model_dir: str, steps: int, checkpoint_period: int):
  """The whole TrainState of checkpoint `steps`, restored as the training loop restores it."""
  import gin
  from t5gemma_jax import checkpoint, sharding
  from t5gemma_jax.cli import app, gin_setup
  from t5gemma_jax.model import abstract_params
  from t5gemma_jax.train import optim, step as step_lib
  invocation = app.parse(["train", *recipe(model_dir, steps, checkpoint_period)])
  try:
    args = invocation.args
    gin_setup.load(args.command, args.gin_file, invocation.bindings, args.gin_search_path)
    cfg = gin_setup.train_config()
  finally:
    gin.clear_config()
  mesh = sharding.make_mesh(cfg.mesh)
  optimizer = optim.make_optimizer(cfg.optimizer, abstract_params(cfg.model, boxed=False))
  abstract, _ = step_lib.state_shardings(cfg.model, optimizer, mesh)
  with checkpoint.Checkpointer(os.path.join(model_dir, "checkpoints"), save_every=1) as ckpt:
    return ckpt.restore(steps, abstract)


def _tree_difference(a, b) -> Optional[str]:
  import jax
  import numpy as np
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  if tree_a != tree_b:
    return "different tree structures"
  differing = []
  for (path, x), (_, y) in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
      differing.append(jax.tree_util.keystr(path))
  if not differing:
    return None
  return f"{len(differing)} of {len(flat_a)} arrays, e.g. {', '.join(differing[:3])}"


def batch_difference(whole: list, killed: list, steps: int) -> Optional[str]:
  """None when every step 0..steps-1 is logged in both and every crc32 logged for a step in
  `killed` equals the one `whole` logged for it."""
  expected = dict(whole)
  if len(whole) != steps or sorted(expected) != list(range(steps)):
    return f"the uninterrupted run logged steps {sorted(s for s, _ in whole)}"
  problems = [f"step {s}: crc32 {c} instead of {expected[s]}" for s, c in killed
              if s in expected and c != expected[s]]
  problems += [f"unparsable or unknown step {s}" for s, _ in killed if s not in expected]
  missing = sorted(set(range(steps)) - {s for s, _ in killed})
  if missing:
    problems.append(f"steps never logged: {missing}")
  return "; ".join(problems[:5]) or None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--kills", type=int, default=20)
  p.add_argument("--steps", type=int, default=80)
  p.add_argument("--checkpoint_period", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--root", default=None, help="working directory (default: a new temporary one)")
  args = p.parse_args(argv)
  if args.kills < 2:
    p.error("--kills must be >= 2 (one in_flight and one after_commit kill at least)")
  root = args.root or tempfile.mkdtemp(prefix="kill_resume_torture_")
  if os.path.exists(os.path.join(root, "killed")) or os.path.exists(os.path.join(root, "whole")):
    p.error(f"{root} holds a previous torture run: give an empty --root")
  result = torture(root, args.kills, args.steps, args.checkpoint_period, args.seed)
  by_moment = {m: sum(k.moment == m for k in result["kills"]) for m in MOMENTS}
  print(json.dumps({"kills": len(result["kills"]), "by_moment": by_moment,
                    "restarts": result["restarts"], "set_aside": result["set_aside"],
                    "wall_s": round(result["wall_s"], 1), "ok": result["ok"],
                    "verdict": result["verdict"], "root": root}))
  print("VERDICT: " + ("params, optimizer state and batch sequence all equal" if result["ok"]
                       else "MISMATCH in " + ", ".join(k for k, v in result["verdict"].items()
                                                       if v is not None)))
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
