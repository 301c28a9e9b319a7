"""`gpu_check.py`'s report: the JSON (every task's record under its part, the side-by-side
ratios, compile times, peak memory, what was skipped and why) and the text table."""

from __future__ import annotations

import json
import os
import platform
import time

from benchmarks import gpu_check_common as common

JSON_NAME, TABLE_NAME = "gpu_check.json", "gpu_check.txt"


def _ratio(a, b):
  return a / b if a and b else None


def build(results: dict, args, start: float, sizes: common.Sizes) -> dict:
  """The report of `results` (task key -> record) so far.

  Args:
    results: records filed by `gpu_check.run_worker`.
    args: the parsed command line.
    start: the run's start (seconds since the epoch).
    sizes: the run's `common.Sizes`.

  Returns:
    {"meta", "peak", "train", "decode", "compile_s", "peak_memory_gib", "notes"}.
  """
  peak_jax, peak_torch = results.get("peak/jax", {}), results.get("peak/torch", {})
  report = {
      "meta": {"smoke": args.smoke, "budget_s": args.budget_s, "wall_s": time.time() - start,
               "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
               "host": platform.node(), "device": peak_jax.get("device"),
               "jax": peak_jax.get("jax_version"), "torch": peak_torch.get("torch_version"),
               "run_options": common.RUN_OPTIONS, "parts": args.parts or "all",
               "presets": args.presets or "all"},
      "peak": {"jax": peak_jax, "torch": peak_torch,
               "datasheet_bf16_tflops": common.DATASHEET_BF16_TFLOPS,
               "datasheet_hbm_tb_s": common.DATASHEET_HBM_TB_S},
      "train": {}, "decode": {}, "compile_s": {}, "peak_memory_gib": {},
      "peak_memory_note": "train: each run's own process (JAX peak_bytes_in_use, torch "
                          "max_memory_allocated); decode: the decoding worker's peak so far",
      "notes": [],
      "rerun": rerun_command(results)}
  for key, rec in results.items():
    if rec.get("status") != "ok":
      report["notes"].append(f"{key}: {rec.get('status')}: "
                             f"{rec.get('note') or rec.get('error') or ''}".strip())
    part, _, rest = key.partition("/")
    if part == "train":
      preset, who = rest.split("/")
      inputs, targets, _ = sizes.train[preset]
      entry = report["train"].setdefault(preset, {"inputs": inputs, "targets": targets,
                                                  "runs": {}, "ratios": {}})
      entry["runs"][who] = rec
      if rec.get("compile_s") is not None:
        report["compile_s"][key] = rec["compile_s"]
      memory = rec.get("peak_bytes_in_use", rec.get("peak_bytes"))
      if memory is not None:
        report["peak_memory_gib"][key] = common.gib(memory)
    elif part == "decode":
      preset, who = rest.split("/")
      entry = report["decode"].setdefault(preset, {"ours": {}, "torch": {}, "ratios": {}})
      entry[who] = rec
      for batch, row in (rec.get("batches") or {}).items():
        if row.get("compile_s") is not None:
          report["compile_s"][f"{key}/{batch}"] = row["compile_s"]
        memory = row.get("peak_bytes_in_use", row.get("peak_bytes"))
        if memory is not None:
          report["peak_memory_gib"][f"{key}/{batch}"] = common.gib(memory)
  for entry in report["train"].values():
    runs = entry["runs"]
    speed = {who: r.get("tokens_per_s") for who, r in runs.items()}
    for who in runs:
      if who != "torch":
        entry["ratios"][f"{who}_vs_torch"] = _ratio(speed[who], speed.get("torch"))
      if who not in ("xla", "torch"):
        entry["ratios"][f"{who}_vs_xla"] = _ratio(speed[who], speed.get("xla"))
  for entry in report["decode"].values():
    ours, theirs = entry["ours"].get("batches") or {}, entry["torch"].get("batches") or {}
    for batch, row in ours.items():
      entry["ratios"][f"batch_{batch}_ours_vs_torch"] = _ratio(
          row.get("tokens_per_s"), theirs.get(batch, {}).get("tokens_per_s"))
      entry["ratios"][f"batch_{batch}_ours_of_hbm_bound"] = _ratio(
          row.get("tokens_per_s"), row.get("hbm_bound_tokens_per_s"))
  return report


def write(report: dict, out: str) -> None:
  """Writes the JSON and the table into `out` (each atomically)."""
  for name, text in ((JSON_NAME, json.dumps(report, indent=1, default=float)),
                     (TABLE_NAME, table(report) + "\n")):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(out, name))


def _f(value, fmt: str, width: int) -> str:
  return f"{'-':>{width}}" if value is None else f"{value:{fmt}}".rjust(width)


def _x(ratio, width: int) -> str:
  return _f(ratio, ".2f", width - 1) + ("x" if ratio is not None else " ")


def table(report: dict) -> str:
  """The report as a short text table (ratios measured side by side in this run)."""
  m, peak = report["meta"], report["peak"]
  lines = [f"T5Gemma GPU check: {m['device']} | jax {m['jax']} | torch {m['torch']} | "
           f"wall {m['wall_s']:.0f} s of {m['budget_s']:.0f} s budget"
           + (" | SMOKE (tiny, CPU)" if m["smoke"] else ""),
           f"matmul bf16 n={peak['jax'].get('matmul_n')}: jax "
           f"{_f(peak['jax'].get('matmul_tflops'), '.1f', 1)} TFLOP/s, torch "
           f"{_f(peak['torch'].get('matmul_tflops'), '.1f', 1)} TFLOP/s (datasheet "
           f"{peak['datasheet_bf16_tflops']:.0f}); copy "
           f"{_f(peak['jax'].get('copy_tb_s'), '.2f', 1)} TB/s (datasheet "
           f"{peak['datasheet_hbm_tb_s']})", "",
           "train: bf16, scan, remat minimal, AdamW; tokens = non-padding enc+dec; MFU of the "
           "datasheet peak / of the matmul measured above",
           f"{'preset':10} {'in/tgt':>9} {'run':>6} {'batch':>5} {'step ms':>9} "
           f"{'tokens/s':>11} {'TFLOP/s':>8} {'MFU ds':>7} {'MFU mm':>7} {'compile':>8} "
           f"{'peak GiB':>8} {'vs torch':>8} {'vs xla':>7}"]
  for preset, entry in report["train"].items():
    for who, r in entry["runs"].items():
      ok = r.get("status") == "ok"
      step = r.get("step_s") if ok else None
      lines.append(
          f"{preset:10} {str(entry['inputs']) + '/' + str(entry['targets']):>9} {who:>6} "
          f"{_f(r.get('batch'), 'd', 5)} {_f(step and step * 1e3, '.1f', 9)} "
          f"{_f(r.get('tokens_per_s') if ok else None, ',.0f', 11)} "
          f"{_f(r.get('tflops') if ok else None, '.1f', 8)} "
          f"{_f(r.get('mfu_datasheet') if ok else None, '.1%', 7)} "
          f"{_f(r.get('mfu_measured') if ok else None, '.1%', 7)} "
          f"{_f(r.get('compile_s'), '.1f', 8)} "
          f"{_f(common.gib(r.get('peak_bytes_in_use', r.get('peak_bytes'))), '.1f', 8)} "
          f"{_x(entry['ratios'].get(f'{who}_vs_torch'), 8)} "
          f"{_x(entry['ratios'].get(f'{who}_vs_xla'), 7)}"
          + ("" if ok else f"  [{r.get('status')}]"))
  lines += ["", "decode: greedy, whole generate call, batch x new tokens / s; HBM bound = "
            "batch / (params + cache bytes per step / datasheet bandwidth)",
            f"{'preset':10} {'batch':>5} {'ours tok/s':>11} {'torch tok/s':>11} "
            f"{'ours/torch':>10} {'HBM bound':>10} {'of bound':>8} {'compile':>8}"]
  for preset, entry in report["decode"].items():
    ours, theirs = entry["ours"].get("batches") or {}, entry["torch"].get("batches") or {}
    for batch in sorted(set(ours) | set(theirs), key=int):
      o, t = ours.get(batch, {}), theirs.get(batch, {})
      lines.append(
          f"{preset:10} {int(batch):5d} {_f(o.get('tokens_per_s'), ',.0f', 11)} "
          f"{_f(t.get('tokens_per_s'), ',.0f', 11)} "
          f"{_x(entry['ratios'].get(f'batch_{batch}_ours_vs_torch'), 10)} "
          f"{_f(o.get('hbm_bound_tokens_per_s'), ',.0f', 10)} "
          f"{_f(entry['ratios'].get(f'batch_{batch}_ours_of_hbm_bound'), '.1%', 8)} "
          f"{_f(o.get('compile_s'), '.1f', 8)}")
  if report["notes"]:
    lines += ["", "not measured / failed:"] + [f"  {n[:300]}" for n in report["notes"]]
  if report.get("rerun"):
    lines += ["", "to measure what the budget left out: " + report["rerun"]]
  return "\n".join(lines)


_PART_OF = {("train", "torch"): "torch_train", ("decode", "ours"): "decode",
            ("decode", "torch"): "torch_decode"}


def rerun_command(results: dict) -> str:
  """The command that measures the parts the budget skipped or killed ("" if none), with the
  batches found so far (so torch and the fused kernels stay side by side with XLA)."""
  parts, presets = set(), set()
  for key, rec in results.items():
    part, _, rest = key.partition("/")
    if rec.get("status") in ("skipped", "killed", "partial") and "/" in rest:
      preset, who = rest.split("/")
      parts.add(_PART_OF.get((part, who), part))
      presets.add(preset)
  if not parts:
    return ""
  batches = sorted(f"{k.split('/')[1]}={r['batch']}" for k, r in results.items()
                   if k.endswith("/xla") and r.get("batch") and k.split("/")[1] in presets)
  return ('python3 benchmarks/gpu_check.py --out "$OUT" --parts '
          + ",".join(p for p in ("train", "torch_train", "decode", "torch_decode")
                     if p in parts)
          + " --presets " + ",".join(sorted(presets))
          + (" --batches " + ",".join(batches) if batches else ""))
