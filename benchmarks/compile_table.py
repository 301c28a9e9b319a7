"""The pretraining table: each released preset compiled for TPU slices (`t5gemma compile`).

  python benchmarks/compile_table.py --presets=2b-2b,9b-2b --topologies=v5p-64 \\
      --out=benchmarks/compile_table.jsonl

Each row runs `t5gemma compile` in its own process on the pretraining run (runs/pretrain.gin,
or runs/pretrain_t5gemma2.gin; scanned, bf16 parameters and activations, Adafactor) with the
preset's gin file and FSDP over every chip (gin/mesh/fsdp.gin), and appends the JSON report
(plus what was asked) to --out. Remat "minimal" (no recomputed matmuls but the attention
scores) is tried first and "full" only when minimal does not fit: the cheapest policy that
fits. Rows already in --out are skipped, so an interrupted table resumes. A row that does not
fit is kept (fits: false); a row that fails records its one-line error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("b-b", "l-l", "xl-xl", "2b-2b", "9b-2b", "9b-9b", "270m-270m", "1b-1b", "4b-4b")
TOPOLOGIES = ("v5p-8", "v5p-64", "v5p-256", "v5e-256", "v6e-64")
T5GEMMA2 = ("270m-270m", "1b-1b", "4b-4b")


MESH = "mesh/fsdp.gin"
REMATS = ("minimal", "full")


def row_args(preset: str, topology: str, batch: int, lengths: tuple[int, int],
             remat: str, mesh: str = MESH) -> list[str]:
  run = "runs/pretrain_t5gemma2.gin" if preset in T5GEMMA2 else "runs/pretrain.gin"
  return [f"--topology={topology}", f"--gin_file={run}", f"--gin_file=models/{preset}.gin",
          f"--gin_file={mesh}", "--gin.RunOptions.scan_layers=True",
          f"--gin.RunOptions.remat_policy='{remat}'", "--gin.RunOptions.dtype='bfloat16'",
          "--gin.RunOptions.param_dtype='bfloat16'", f"--gin.BATCH_SIZE={batch}",
          f'--gin.TASK_FEATURE_LENGTHS={{"inputs": {lengths[0]}, "targets": {lengths[1]}}}',
          "--gin.MODEL_DIR='/tmp/compile_table'", "--no_decode"]


def markdown(path: str) -> str:
  """The rows of `path` as a markdown table (the last row per preset, slice, batch, lengths)."""
  rows = {}
  with open(path) as f:
    for r in map(json.loads, f):
      rows[(r["preset"], r["topology"], r["batch_size"], tuple(r["lengths"].values()),
            r["remat"])] = r
  out = ["| preset | slice | lengths | batch | mesh (data, fsdp, tensor) | remat | fits | HBM GiB "
         "per chip | MFU bound | bound by | tokens/s bound | compile s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for (preset, topology, batch, lengths, _), r in rows.items():
    rep = r.get("report")
    if rep is None:
      out.append(f"| {preset} | {topology} | {lengths[0]}/{lengths[1]} | {batch} | | "
                 f"{r['remat']} | error: {r.get('error', '?')[:60]} | | | | | |")
      continue
    mesh = rep["mesh"]
    roof = rep["roofline"]
    if "compile_error" in rep:  # the compiler refused it: no roofline to speak of
      out.append(f"| {preset} | {topology} | {lengths[0]}/{lengths[1]} | {batch} | "
                 f"{mesh['data']}, {mesh['fsdp']}, {mesh['tensor']} | {r['remat']} | no | "
                 f"{rep['hbm_per_chip_gib']['total']:.1f} | | | | {rep['compile_s']:.0f} |")
      continue
    out.append(
        f"| {preset} | {topology} | {lengths[0]}/{lengths[1]} | {batch} | "
        f"{mesh['data']}, {mesh['fsdp']}, {mesh['tensor']} | {r['remat']} | "
        f"{'yes' if rep['fits'] else 'no'} | {rep['hbm_per_chip_gib']['total']:.1f} | "
        f"{100 * roof['mfu_upper_bound']:.0f}% | {roof['bound_by']} | "
        f"{rep['tokens_per_s_upper_bound']:,.0f} | {rep['compile_s']:.0f} |")
  return "\n".join(out)


def _row(preset: str, topology: str, batch: int, lengths: tuple[int, int], remat: str) -> dict:
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "t5gemma_jax.cli", "compile",
                         *row_args(preset, topology, batch, lengths, remat)],
                        capture_output=True, text=True, cwd=REPO)
  row = {"preset": preset, "topology": topology, "batch_size": batch,
         "lengths": {"inputs": lengths[0], "targets": lengths[1]}, "mesh_file": MESH,
         "remat": remat, "wall_s": time.perf_counter() - start, "exit": proc.returncode}
  if proc.returncode in (0, 3):
    row["report"] = json.loads(proc.stdout.strip().splitlines()[-1])
  else:
    row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
  return row


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--presets", default=",".join(PRESETS))
  p.add_argument("--topologies", default=",".join(TOPOLOGIES))
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--lengths", default="512/512", help="inputs/targets; T5Gemma 2 also 1024/1024")
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "compile_table.jsonl"))
  p.add_argument("--markdown", action="store_true", help="print --out as a table and stop")
  args = p.parse_args(argv)
  if args.markdown:
    print(markdown(args.out))
    return 0
  lengths = tuple(int(x) for x in args.lengths.split("/"))
  done = set()
  if os.path.exists(args.out):
    with open(args.out) as f:
      done = {(r["preset"], r["topology"], r["batch_size"], tuple(r["lengths"].values()),
               r["remat"]) for r in map(json.loads, f)}
  for preset in args.presets.split(","):
    for topology in args.topologies.split(","):
      for remat in REMATS:
        key = (preset, topology, args.batch_size, lengths, remat)
        if key in done:
          continue
        row = _row(preset, topology, args.batch_size, lengths, remat)
        with open(args.out, "a") as f:
          f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("preset", "topology", "remat", "exit", "wall_s")}),
              flush=True)
        if row["exit"] != 3:  # fits (or fails for another reason): no costlier policy
          break
  return 0


if __name__ == "__main__":
  sys.exit(main())
