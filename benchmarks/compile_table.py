"""The pretraining table: each released preset compiled for TPU slices (`t5gemma compile`).

  python benchmarks/compile_table.py --presets=2b-2b,9b-2b --topologies=v5p-64 \\
      --out=benchmarks/compile_table.jsonl

Each row runs `t5gemma compile` in its own process on the pretraining run (runs/pretrain.gin,
scanned, bf16 parameters and activations, Adafactor) with the preset's gin file, the slice's
recommended mesh file (gin/mesh/) and remat policy, and appends the JSON report (plus what was
asked) to --out. Rows already in --out are skipped, so an interrupted table resumes. A row
that does not fit is kept (fits: false); a row that fails records its one-line error.
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


def recommended(preset: str) -> tuple[str, str]:
  """(mesh gin file, remat policy) we recommend for a preset: FSDP over every chip, with the
  9b stacks' activations rematerialised in full (their minimal-remat activations do not fit
  in 16-32 GiB chips at batch 256)."""
  return "mesh/fsdp.gin", ("full" if preset.startswith("9b") else "minimal")


def row_args(preset: str, topology: str, batch: int, lengths: tuple[int, int]) -> list[str]:
  mesh, remat = recommended(preset)
  run = "runs/pretrain_t5gemma2.gin" if preset in T5GEMMA2 else "runs/pretrain.gin"
  return [f"--topology={topology}", f"--gin_file={run}", f"--gin_file=models/{preset}.gin",
          f"--gin_file={mesh}", "--gin.preset.scan_layers=True",
          f"--gin.preset.remat_policy='{remat}'", "--gin.preset.dtype='bfloat16'",
          "--gin.preset.param_dtype='bfloat16'", f"--gin.BATCH_SIZE={batch}",
          f'--gin.TASK_FEATURE_LENGTHS={{"inputs": {lengths[0]}, "targets": {lengths[1]}}}',
          "--gin.MODEL_DIR='/tmp/compile_table'", "--no_decode"]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--presets", default=",".join(PRESETS))
  p.add_argument("--topologies", default=",".join(TOPOLOGIES))
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--lengths", default="512/512", help="inputs/targets; T5Gemma 2 also 1024/1024")
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "compile_table.jsonl"))
  args = p.parse_args(argv)
  lengths = tuple(int(x) for x in args.lengths.split("/"))
  done = set()
  if os.path.exists(args.out):
    with open(args.out) as f:
      done = {(r["preset"], r["topology"], r["batch_size"], tuple(r["lengths"].values()))
              for r in map(json.loads, f)}
  for preset in args.presets.split(","):
    for topology in args.topologies.split(","):
      key = (preset, topology, args.batch_size, lengths)
      if key in done:
        continue
      start = time.perf_counter()
      proc = subprocess.run([sys.executable, "-m", "t5gemma_jax.main", "compile",
                             *row_args(preset, topology, args.batch_size, lengths)],
                            capture_output=True, text=True, cwd=REPO)
      row = {"preset": preset, "topology": topology, "batch_size": args.batch_size,
             "lengths": {"inputs": lengths[0], "targets": lengths[1]},
             "mesh_file": recommended(preset)[0], "remat": recommended(preset)[1],
             "wall_s": time.perf_counter() - start, "exit": proc.returncode}
      if proc.returncode in (0, 3):
        row["report"] = json.loads(proc.stdout.strip().splitlines()[-1])
      else:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
      print(json.dumps({k: row[k] for k in ("preset", "topology", "exit", "wall_s")}),
            flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
