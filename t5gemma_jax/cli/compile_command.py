"""`t5gemma compile`: the run's train and decode steps through the TPU compiler, on this host.

  t5gemma compile --topology=v5p-64 --gin_file=runs/pretrain.gin --gin_file=models/2b-2b.gin \\
      --gin.RunOptions.scan_layers=True --gin.BATCH_SIZE=256

Takes the same gin files and overrides as `train` (so it checks the run you will launch) and
needs no TPU, data or checkpoint, only libtpu. Prints a table, then one JSON object as the last
line. Exit status: 0 fits in HBM, 3 does not fit, 2 bad input (unknown topology, a mesh that
does not divide the chips, ...), as every `t5gemma` command.
"""

from __future__ import annotations

import argparse
import json

from t5gemma_jax import chips

EXIT_DOES_NOT_FIT = 3


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--topology", required=True,
                 help="accelerator type as gcloud spells it: v4-8 ... v4-4096, v5litepod-N "
                      "(v5e-N), v5p-8 ... v5p-12288, v6e-N")
  p.add_argument("--num_slices", type=int, default=1,
                 help="Multislice: slices joined over DCN (MeshConfig.dcn=(N, 1, 1) unless "
                      "the gin files set dcn)")
  p.add_argument("--find_batch", action="store_true",
                 help="also find the largest global batch that fits (bisection on compiles)")
  p.add_argument("--no_decode", action="store_true", help="skip the decode-step compile")


def _gib(x: float) -> str:
  return f"{x:8.2f} GiB"


def table(report: dict) -> str:
  """The report as aligned lines for a terminal."""
  mem, roof, fl = report["hbm_per_chip_gib"], report["roofline"], report["flops_per_step"]
  lines = [
      f"{report['topology']} x{report['num_slices']} ({report['topology_name']}, "
      f"{report['chips']} chips), mesh {report['mesh']}, global batch "
      f"{report['batch_size']}, lengths {report['lengths']}",
      f"  fits in HBM:          {'yes' if report['fits'] else 'NO'}",
      f"  HBM per chip:         {_gib(mem['total'])} of {mem['capacity']:.2f} GiB "
      f"(arguments {mem['arguments']:.2f}, outputs {mem['outputs']:.2f}, temporaries "
      f"{mem['temporaries']:.2f}, code {mem['code']:.2f})",
      f"  FLOPs per step:       model {fl['model']:.4g}, executed {fl['executed']:.4g} "
      f"(XLA's count, loop bodies once: "
      f"{'n/a' if fl['xla'] is None else format(fl['xla'], '.4g')})",
      f"  roofline per step:    compute {roof['compute_s'] * 1e3:.1f} ms, HBM "
      f"{roof['hbm_s'] * 1e3:.1f} ms, ICI {roof['ici_s'] * 1e3:.1f} ms -> bound by "
      f"{roof['bound_by']}",
      f"  MFU upper bound:      {100 * roof['mfu_upper_bound']:.1f}%   tokens/s upper bound "
      f"{report['tokens_per_s_upper_bound']:,.0f}",
      f"  compile:              {report['compile_s']:.1f} s",
  ]
  if "compile_error" in report:
    lines.append(f"  compiler:             {report['compile_error']}")
  for kind, c in report["collectives"].items():
    lines.append(f"  {kind:21s} {c['count']:6d} per step ({c['in_loop']} inside loops), "
                 f"{c['bytes'] / chips.GIB:.3f} GiB")
  if "decode" in report:
    d = report["decode"]
    lines.append(f"  decode step:          {d['hbm_per_chip_gib']:.2f} GiB per chip, "
                 f"fits {'yes' if d['fits'] else 'NO'}, compile {d['compile_s']:.1f} s")
  if "largest_batch" in report:
    lines.append(f"  largest batch that fits: {report['largest_batch']}")
  return "\n".join(lines)


def run(args: argparse.Namespace, cfg) -> int:
  """Compiles `cfg` (a TrainConfig) for `args.topology`; prints the table and the JSON."""
  from t5gemma_jax.train import aot  # the trainer loads only for the commands that run it
  report = aot.compile_run(cfg, args.topology, args.num_slices, decode=not args.no_decode)
  if args.find_batch:
    largest, _ = aot.find_batch(cfg, args.topology, args.num_slices)
    report["largest_batch"] = largest
  print(table(report))
  print(json.dumps(report, sort_keys=True))
  if args.find_batch:
    return 0 if report["largest_batch"] else EXIT_DOES_NOT_FIT
  return 0 if report["fits"] else EXIT_DOES_NOT_FIT
