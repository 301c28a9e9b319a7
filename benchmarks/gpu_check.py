"""The prepared GPU check (issue 20): our bf16 training and decoding on one GPU beside
transformers + PyTorch on the same GPU, in one run that fits a 7-minute device lease.

  python3 benchmarks/gpu_check.py --out "$OUT"              # the H200 (benchmarks/gpu_check.sh)
  python3 benchmarks/gpu_check.py --smoke --out /tmp/gc     # tiny models on CPU, < 1 minute
  python3 benchmarks/gpu_check.py --out "$OUT" --parts decode,torch_decode --presets 2b-2b

Parts, in this order (each skipped with a note when the time budget cannot hold it):
  peak          a loop of 8192^3 bf16 matmuls (JAX and torch) and a copy's bandwidth;
  train         our train step per preset with "xla" attention at the largest candidate batch
                that fits (XLA's memory estimate of each compiled program decides, an OOM
                steps down), then the fused attention ("cudnn" for T5Gemma 2, our "triton"
                kernel for T5Gemma 1, which softcaps) at the same batch: compile time, step
                time, non-padding tokens/s, TFLOP/s, MFU (datasheet and measured peak), memory;
  torch_train   transformers + torch AdamW on the same batches;
  decode        greedy decoding at batch 1 and 64 (64 input, 128 new tokens), ours, beside the
                HBM-bandwidth bound (params + decode cache read per step / 4.8 TB/s);
  torch_decode  transformers' `generate` on the same rows.

Every part runs in a worker process (`gpu_check_jax`, `gpu_check_torch`) with a deadline: the
remaining budget is shared by the parts still to run in proportion to `WEIGHTS`, so time a part
leaves unused goes to the later ones. A worker past its deadline is killed, and what it had
recorded is kept. One part failing is recorded and the rest run. Each training run on a GPU
gets its own process, so `peak_bytes_in_use` is that run's alone. Writes gpu_check.json,
gpu_check.txt (the table) and gpu_check_log.txt (the workers' stderr) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from benchmarks import gpu_check_common as common  # noqa: E402
from benchmarks import gpu_check_jax, gpu_check_report, gpu_check_torch  # noqa: E402

PARTS = ("train", "torch_train", "decode", "torch_decode")
# Expected seconds of each kind of task on the H200, process start included; the budget is
# shared in these proportions.
WEIGHTS = {"process": 6, "peak": 4, "train": 85, "fused": 40, "torch_peak": 2,
           "torch_train": 20, "decode": 20, "torch_decode": 10}
GRACE_S = 10  # a worker may overrun its last deadline by this much before it is killed


def plan(sizes: common.Sizes, parts, presets, isolate: bool) -> list[dict]:
  """The workers to run, in order: {"side", "tasks": [task dicts]}.

  Each task has a "key" (where its result goes), a "kind", a "weight" and its sizes; a
  "batch_of" key names the run whose batch it reuses.

  Args:
    sizes: `common.FULL` or `common.SMOKE`.
    parts: which of `PARTS` to run (the peak always runs: MFU needs it).
    presets: which of `sizes`' presets.
    isolate: one process per training run (exact peak memory); else one per side.
  """
  train_presets = [p for p in sizes.train if p in presets]
  decode_presets = [p for p in sizes.decode_presets if p in presets]
  # The peaks run even when their worker starts late: they take a second, and MFU needs them.
  jax_tasks = [{"key": "peak/jax", "kind": "peak", "weight": WEIGHTS["peak"],
                "n": sizes.matmul, "always": True}]
  torch_tasks = [{"key": "peak/torch", "kind": "peak", "weight": WEIGHTS["torch_peak"],
                  "n": sizes.matmul, "always": True}]
  for preset in train_presets if "train" in parts else ():
    inputs, targets, candidates = sizes.train[preset]
    shape = dict(preset=preset, inputs=inputs, targets=targets, candidates=candidates,
                 steps=sizes.steps)
    jax_tasks.append({"key": f"train/{preset}/xla", "kind": "train", "impl": "xla",
                      "weight": WEIGHTS["train"], **shape})
    jax_tasks.append({"key": f"train/{preset}/{sizes.fused[preset]}", "kind": "train",
                      "impl": sizes.fused[preset], "weight": WEIGHTS["fused"],
                      "batch_of": f"train/{preset}/xla", **shape})
  for preset in train_presets if "torch_train" in parts else ():
    inputs, targets, candidates = sizes.train[preset]
    torch_tasks.append({"key": f"train/{preset}/torch", "kind": "train", "preset": preset,
                        "inputs": inputs, "targets": targets, "candidates": candidates,
                        "steps": sizes.steps, "batch_of": f"train/{preset}/xla",
                        "weight": WEIGHTS["torch_train"]})
  decode = dict(batches=sizes.decode_batches, inputs=sizes.decode_inputs,
                new_tokens=sizes.decode_new_tokens, repeats=sizes.repeats)
  jax_decode = [{"key": f"decode/{p}/ours", "kind": "decode", "preset": p,
                 "weight": WEIGHTS["decode"], **decode}
                for p in decode_presets if "decode" in parts]
  torch_decode = [{"key": f"decode/{p}/torch", "kind": "decode", "preset": p,
                   "weight": WEIGHTS["torch_decode"], **decode}
                  for p in decode_presets if "torch_decode" in parts]
  if not isolate:
    return [{"side": "jax", "tasks": jax_tasks + jax_decode},
            {"side": "torch", "tasks": torch_tasks + torch_decode}]
  workers = [{"side": "jax", "tasks": [t]} for t in jax_tasks]
  workers.append({"side": "torch", "tasks": torch_tasks})
  if jax_decode:
    workers.append({"side": "jax", "tasks": jax_decode})
  if torch_decode:
    workers.append({"side": "torch", "tasks": torch_decode})
  return workers


def weight(worker: dict) -> float:
  """A worker's share of the budget: its process start and its tasks."""
  return WEIGHTS["process"] + sum(t["weight"] for t in worker["tasks"])


def deadlines(tasks: list[dict], later_weight: float, now: float, end: float) -> list[float]:
  """Cumulative deadlines for one worker's tasks: the time left, `end - now`, shared by this
  worker (its process start, then its tasks) and the later workers (`later_weight`) in
  proportion to their weights."""
  total = WEIGHTS["process"] + sum(t["weight"] for t in tasks) + later_weight
  out, used = [], WEIGHTS["process"]
  for t in tasks:
    used += t["weight"]
    out.append(now + (end - now) * used / total)
  return out


def run_worker(worker: dict, later_weight: float, end: float, results: dict, env: dict,
               tmp: str, log, batches: dict) -> None:
  """Runs one worker process to its last deadline (+ grace) and files its tasks' results
  under their keys in `results`; `batches` (preset -> batch, from --batches) fixes the batch
  of training runs."""
  now = time.time()
  tasks = [dict(t) for t in worker["tasks"]]
  for task, deadline in zip(tasks, deadlines(tasks, later_weight, now, end)):
    task["deadline"] = deadline
    source = results.get(task.get("batch_of"), {})
    batch = source.get("batch") or source.get("batch_predicted")
    if task["kind"] == "train" and (batches.get(task["preset"]) or batch):
      task["batch"] = batches.get(task["preset"]) or batch
  index = len(os.listdir(tmp))
  result = os.path.join(tmp, f"worker{index}.json")
  peak = results.get("peak/jax", {})
  spec = {"side": worker["side"], "result": result, "tasks": tasks,
          "matmul_tflops": peak.get("matmul_tflops"), "copy_tb_s": peak.get("copy_tb_s")}
  spec_path = os.path.join(tmp, f"worker{index}_spec.json")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  names = ", ".join(t["key"] for t in tasks)
  print(f"[{time.strftime('%H:%M:%S')}] {names} (until +{tasks[-1]['deadline'] - now:.0f} s)",
        flush=True)
  limit = max(1.0, min(tasks[-1]["deadline"] + GRACE_S, end) - now)
  killed = False
  with open(os.path.join(tmp, f"worker{index}.log"), "w+") as err:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec_path],
                            cwd=REPO, env=env, stdout=err, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
      proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
      killed = True
      os.killpg(proc.pid, 9)  # the worker and anything it started
      proc.wait()
    err.seek(0)
    log.write(f"===== {names} (exit {proc.returncode}{', killed' if killed else ''})\n")
    log.write(err.read()[-20000:] + "\n")
  found = []
  if os.path.exists(result):
    with open(result) as f:
      found = json.load(f)["tasks"]
  for i, task in enumerate(tasks):
    rec = found[i] if i < len(found) else {"status": "not started"}
    if rec["status"] in ("running", "not started"):
      what = "killed at its deadline" if killed else f"worker exited ({proc.returncode})"
      rec = {**rec, "status": "skipped" if rec["status"] == "not started" else "killed",
             "note": f"{what}; time budget" if killed else what}
    results[task["key"]] = {**rec, "deadline_s": task["deadline"] - now}
    print(f"    {task['key']}: {rec['status']} {rec.get('note', '') or rec.get('error', '')}"
          f"".rstrip()[:200], flush=True)


def check(args) -> dict:
  """Runs the plan within the budget; returns the report (also written to --out)."""
  sizes = common.SMOKE if args.smoke else common.FULL
  names = list(sizes.train) + [p for p in sizes.decode_presets if p not in sizes.train]
  presets = args.presets.split(",") if args.presets else names
  parts = args.parts.split(",") if args.parts else PARTS
  batches = {p: int(b) for p, _, b in (x.partition("=") for x in args.batches.split(",") if x)}
  unknown = sorted(set(parts) - set(PARTS)) + sorted(set(presets) - set(names))
  if unknown:
    raise SystemExit(f"unknown parts or presets {unknown}; parts: {PARTS}, presets: {names}")
  start = time.time()
  end = start + args.budget_s
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
  if args.smoke:  # tiny sizes on the CPU, whatever the machine has
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    if "xla_backend_optimization_level" not in env.get("XLA_FLAGS", ""):
      # Compiling dominates a smoke run; LLVM's optimisations cost more than they save.
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                          " --xla_backend_optimization_level=0").strip()
  else:  # the whole GPU for the step (JAX takes 75% by default)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  workers = plan(sizes, parts, presets, isolate=not args.smoke)
  results: dict = {}
  os.makedirs(args.out, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp, open(
      os.path.join(args.out, "gpu_check_log.txt"), "w") as log:
    for i, worker in enumerate(workers):
      later = sum(weight(w) for w in workers[i + 1:])
      if time.time() > end - 5:
        for task in worker["tasks"]:
          results[task["key"]] = {"status": "skipped", "note": "time budget spent"}
        continue
      run_worker(worker, later, end, results, env, tmp, log, batches)
      # After every worker: a kill of the whole run keeps what is done.
      gpu_check_report.write(gpu_check_report.build(results, args, start, sizes), args.out)
  report = gpu_check_report.build(results, args, start, sizes)
  gpu_check_report.write(report, args.out)
  print(gpu_check_report.table(report))
  return report


def main(argv=None) -> int:
  """CLI: the orchestrator, or (`--worker SPEC`) one worker process."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_check",
                      help="folder for gpu_check.json / .txt (default $OUT)")
  parser.add_argument("--smoke", action="store_true", help="tiny presets on CPU")
  parser.add_argument("--budget_s", type=float, default=None,
                      help="total seconds (default 390 on the GPU, 300 for --smoke)")
  parser.add_argument("--parts", default="", help=f"comma-separated subset of {PARTS}")
  parser.add_argument("--presets", default="", help="comma-separated subset of the presets")
  parser.add_argument("--batches", default="",
                      help="fixed training batches, e.g. b-b=64,2b-2b=16 (a rerun's)")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    with open(args.worker) as f:
      spec = json.load(f)
    side = gpu_check_jax if spec["side"] == "jax" else gpu_check_torch
    return side.main(spec)
  if args.budget_s is None:
    args.budget_s = 300.0 if args.smoke else 390.0
  check(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
