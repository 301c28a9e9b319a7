"""Training a sweep's runs on this machine, in turn or several at a time (t5gemma launch sweep
--mode=local): each run's output goes to MODEL_DIR/train.log and its outcome to
MODEL_DIR/sweep_status.json, which lets the same command skip the runs that finished.

A run is anything with `name`, `model_dir` and `train_args()` (sweep.Run).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

from t5gemma_jax import atomic, storage

STATUS = "sweep_status.json"


def _finished(run) -> bool:
  try:
    status = json.loads(storage.read_text_if_exists(os.path.join(run.model_dir, STATUS)) or "{}")
  except ValueError:
    return False
  return status.get("status") == "finished" and status.get("args") == run.train_args()


def cpu_sets(jobs: int) -> list[Optional[list[int]]]:
  """The CPUs each of `jobs` concurrent runs is pinned to: this process's CPUs dealt out in
  turn (None, no pinning, for one job or fewer CPUs than jobs). Small models scale badly over
  XLA's CPU threads, so two runs on one core each beat two runs one after the other."""
  cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  if jobs == 1 or len(cpus) < jobs:
    return [None] * jobs
  return [cpus[i::jobs] for i in range(jobs)]


def _train(run, command: list[str], procs: set, echo: bool,
           cpus: Optional[list[int]] = None) -> int:
  """Runs `command` (on `cpus`), writing its output to MODEL_DIR/train.log and, if `echo`,
  to stdout; the process sits in `procs` while it runs, for signals to reach it."""
  os.makedirs(run.model_dir, exist_ok=True)
  pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
  with open(os.path.join(run.model_dir, "train.log"), "ab") as log:
    # Unbuffered: train.log is where a run's progress is followed while it runs.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=pin, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    procs.add(proc)
    try:
      while chunk := proc.stdout.read1(1 << 16):  # whatever is there: progress bars too
        if echo:
          sys.stdout.buffer.write(chunk)
          sys.stdout.flush()
        log.write(chunk)
    finally:
      rc = proc.wait()
      procs.discard(proc)
  return rc


def run_local(runs: Sequence, command: Callable[[Any], list[str]], jobs: int = 1) -> int:
  """Trains the runs, `jobs` at a time (each on its own CPUs, its output in its train.log
  only when jobs > 1): 0 when all finished, 1 if any failed, 128+N after signal N. SIGTERM is
  passed on (train saves a checkpoint and exits); Ctrl-C reaches the runs by itself."""
  failed, skipped, stop, procs = [], 0, [], set()
  todo = []
  for i, run in enumerate(runs, 1):
    header = f"sweep [{i}/{len(runs)}] {run.name}"
    if _finished(run):
      print(f"{header}: finished before, skipped", flush=True)
      skipped += 1
    else:
      todo.append((header, run))
  slots = queue.Queue()
  for cpus in cpu_sets(jobs):
    slots.put(cpus)

  def train_one(item) -> None:
    header, run = item
    if stop:
      return
    cpus = slots.get()
    try:
      where = f" on CPUs {','.join(map(str, cpus))}" if cpus else ""
      print(f"{header}: training in {run.model_dir}{where}", flush=True)
      start = time.time()
      rc = _train(run, command(run), procs, echo=jobs == 1, cpus=cpus)
      status = "interrupted" if stop else ("failed" if rc else "finished")
      atomic.write_text(os.path.join(run.model_dir, STATUS), json.dumps(
          {"status": status, "returncode": rc, "seconds": round(time.time() - start, 1),
           "args": run.train_args()}, indent=2) + "\n")
      print(f"{header}: {status} (exit status {rc}, {time.time() - start:.0f} s)", flush=True)
      if rc and not stop:
        failed.append(run)
    finally:
      slots.put(cpus)

  def on_signal(signum, frame):
    stop.append(signum)
    if signum == signal.SIGTERM:
      for proc in list(procs):
        proc.send_signal(signal.SIGTERM)

  previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
      list(pool.map(train_one, todo))
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  if stop:
    print(f"sweep: stopped by signal {stop[0]}; the same command goes on from here",
          file=sys.stderr)
    return 128 + int(stop[0])
  print(f"sweep: {len(runs) - len(failed)} of {len(runs)} runs finished ({skipped} before)",
        flush=True)
  for run in sorted(failed, key=runs.index):
    print(f"sweep: FAILED {run.name}: see {run.model_dir}/train.log", file=sys.stderr)
  return 1 if failed else 0
