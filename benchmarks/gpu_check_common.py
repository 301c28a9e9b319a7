"""What `gpu_check.py` and its JAX and PyTorch workers share: the sizes of a full and a smoke
run, the one function that builds model configs, and the task protocol (deadlines, result
files, errors).

A worker process runs a list of tasks; each task has a deadline (seconds since the epoch) set
by the orchestrator from the run's time budget, and the worker rewrites its whole result file
after every task and milestone, so whatever it finished survives a kill at the deadline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
import traceback
from typing import Any, Callable, Optional

from t5gemma_jax import config, presets
from t5gemma_jax.run_options import RunOptions

DATASHEET_BF16_TFLOPS = 989.0  # H200 SXM, dense bf16 (1979 with 2:4 sparsity)
DATASHEET_HBM_TB_S = 4.8       # H200 SXM HBM3e
# A real bf16 run's options (what benchmarks/compile_table.py compiles): bf16 params and
# activations, scanned stacks, "minimal" remat (keep the projections, recompute attention).
RUN_OPTIONS = dict(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
                   remat_policy="minimal")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """One run's shapes.

  Attributes:
    train: preset -> (inputs length, targets length, batch candidates, largest first).
    fused: preset -> the fused attention_impl compared with "xla" on it.
    decode_presets: presets decoded (ours and transformers').
    decode_batches, decode_inputs, decode_new_tokens: greedy decoding shapes.
    steps: timed train steps (fewer when the budget is short).
    repeats: timed decoding runs.
    matmul: n of the n^3 bf16 matmul that measures the peak.
  """

  train: dict
  fused: dict
  decode_presets: tuple
  decode_batches: tuple
  decode_inputs: int
  decode_new_tokens: int
  steps: int
  repeats: int
  matmul: int


FULL = Sizes(
    # Candidates, largest first, from XLA's CPU memory estimate of each step (per row: 5.2 GiB
    # for 270m-270m, 2.9 for b-b, 5.6 for 2b-2b, whose state and gradients take another 63 GiB):
    # the first holds about as many rows as the CPU estimate fits in 128 GiB, or more (the GPU
    # backend fuses more); XLA's estimate on the GPU then picks among them.
    train={"270m-270m": (1024, 1024, (32, 24, 16, 12, 8)),
           "b-b": (512, 512, (96, 64, 48, 32, 16)),
           "2b-2b": (512, 512, (24, 16, 12, 8, 4))},
    # cuDNN cannot softcap: only T5Gemma 2 takes it; T5Gemma 1 gets our Triton kernel.
    fused={"270m-270m": "cudnn", "b-b": "triton", "2b-2b": "triton"},
    decode_presets=("b-b", "2b-2b", "270m-270m"), decode_batches=(1, 64), decode_inputs=64,
    decode_new_tokens=128, steps=5, repeats=3, matmul=8192)

SMOKE = Sizes(
    train={"tiny": (32, 32, (8, 4)), "tiny2": (64, 64, (4, 2))},
    fused={"tiny": "triton", "tiny2": "cudnn"},
    decode_presets=("tiny", "tiny2"), decode_batches=(2,), decode_inputs=16,
    decode_new_tokens=8, steps=2, repeats=1, matmul=256)


def model_config(preset: str) -> config.T5GemmaConfig:
  """The architecture of every model this check builds (JAX and, through `config_to_hf`,
  PyTorch)."""
  return presets.preset(preset)


def run_options(attention_impl: str = "xla") -> RunOptions:
  """How every JAX model here is computed: `RUN_OPTIONS` with `attention_impl`."""
  return RunOptions(attention_impl=attention_impl, **RUN_OPTIONS)


def is_oom(error: BaseException) -> bool:
  """Whether `error` is an out-of-memory failure (XLA's RESOURCE_EXHAUSTED, torch's OOM)."""
  text = f"{type(error).__name__} {error}"
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                 "OutOfMemoryError"))


def timed_median(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
  """(median seconds, every time) of `repeats` calls of `fn`, which must block until done."""
  times = []
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def repeats_that_fit(deadline: float, seconds_each: float, wanted: int,
                     margin: float = 2.0) -> int:
  """How many more runs of `seconds_each` fit before `deadline` (at most `wanted`, >= 0)."""
  room = deadline - time.time() - margin
  return max(0, min(wanted, int(room / max(seconds_each, 1e-6))))


class Results:
  """A worker's result file: {"tasks": [one dict per task]}, rewritten after every change.

  Args:
    path: the file (written atomically: a kill mid-write leaves the previous version).
    count: tasks in the worker's list.
  """

  def __init__(self, path: str, count: int):
    self.path = path
    self.tasks: list[dict] = [{"status": "not started"} for _ in range(count)]

  def update(self, index: int, **fields) -> dict:
    """Merges `fields` into task `index`'s record and writes the file; returns the record."""
    self.tasks[index].update(fields)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"tasks": self.tasks}, f, default=float)
    os.replace(tmp, self.path)
    return self.tasks[index]


def run_tasks(spec: dict, handlers: dict[str, Callable[..., dict]]) -> int:
  """Runs a worker's tasks in order; one task's exception is recorded and the next one runs.

  A task past its deadline is skipped unless it says "always". A task with "batch_of" takes
  the batch of that earlier task of this worker (the orchestrator
  fills it in from earlier workers); a peak task's matmul rate and bandwidth go into `spec`
  for the tasks after it, unless the orchestrator gave them.

  Args:
    spec: {"result": path, "tasks": [{"key", "kind", "deadline", ...}], ...}.
    handlers: kind -> fn(task, spec, record) returning the task's fields (a "status" among
      them overrides "ok"); `record(**fields)` saves partial fields, which a kill keeps.

  Returns:
    0 (failures are in the result file).
  """
  results = Results(spec["result"], len(spec["tasks"]))
  done: dict[str, dict] = {}
  for index, task in enumerate(spec["tasks"]):
    source = done.get(task.get("batch_of"), {})
    batch = source.get("batch") or source.get("batch_predicted")
    if batch and not task.get("batch"):
      task["batch"] = batch
    if time.time() > task["deadline"] and not task.get("always"):
      results.update(index, status="skipped", note="time budget spent before it started")
      continue
    record = lambda **fields: results.update(index, **fields)  # noqa: E731
    record(status="running", started=time.time())
    try:
      fields = handlers[task["kind"]](task, spec, record)
      done[task["key"]] = results.update(index, **{"status": "ok", **fields})
      if task["kind"] == "peak":
        for name in ("matmul_tflops", "copy_tb_s"):
          if spec.get(name) is None:
            spec[name] = fields.get(name)
    except Exception as e:  # noqa: BLE001 -- one part failing must not stop the others
      results.update(index, status="error", error=f"{type(e).__name__}: {e}"[:2000],
                     traceback=traceback.format_exc()[-3000:])
  return 0


def rows_status(rows: dict) -> dict:
  """A decoding task's status from its per-batch rows: "ok", "partial" (some batches skipped
  for time) or "skipped" (all), with a note naming the skipped batches."""
  skipped = [b for b, r in rows.items() if r.get("status") == "skipped"]
  if not skipped:
    return {"status": "ok"}
  return {"status": "skipped" if len(skipped) == len(rows) else "partial",
          "note": f"batches {', '.join(skipped)} skipped: time budget"}


def gib(n: Optional[float]) -> Optional[float]:
  """Bytes -> GiB (None stays None)."""
  return None if n is None else n / 2**30
