r"""An sbatch script that runs `t5gemma train` on GPU nodes under Slurm; submits it too.

  t5gemma launch slurm --nodes=2 --gpus_per_node=8 --partition=a100 --time=24:00:00 \
      --venv=/shared/t5gemma/.venv --model_dir=/shared/runs/bb --dry_run \
      -- --gin_file=runs/pretrain.gin --gin_file=models/b-b.gin --gin.BATCH_SIZE=256

`srun` starts the processes: one per GPU (--per=gpu, the default: --ntasks-per-node=GPUS,
--gpus-per-task=1) or one per node (--per=node: --ntasks-per-node=1, every GPU of the node).
Each calls `jax.distributed.initialize()`, which reads Slurm's environment (our
maybe_initialize_distributed sees SLURM_JOB_ID). Submitting the same --model_dir again resumes
from its latest checkpoint, so --requeue (or resubmitting) continues a preempted run.

Without --dry_run the script goes to `sbatch` (written to --write first when given); with it,
the script is printed (and still written to --write).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Optional, Sequence

from t5gemma_jax.launch import split_train_args



def _sbatch_lines(args: argparse.Namespace) -> list[str]:
  opts = [("job-name", args.job_name), ("nodes", str(args.nodes))]
  if args.per == "gpu":
    opts += [("ntasks-per-node", str(args.gpus_per_node)), ("gpus-per-task", "1")]
  else:
    opts += [("ntasks-per-node", "1"), ("gpus-per-node", str(args.gpus_per_node))]
  for name in ("cpus_per_task", "partition", "time", "account"):
    if getattr(args, name) is not None:
      opts.append((name.replace("_", "-"), str(getattr(args, name))))
  opts.append(("output", args.output))
  if args.requeue:
    opts += [("requeue", None), ("open-mode", "append")]  # one log across requeues
  for item in args.sbatch:
    name, sep, value = item.lstrip("-").partition("=")
    opts.append((name, value if sep else None))
  lines = []
  for name, value in opts:
    # sbatch reads these lines itself, without a shell: there is no quoting to fall back on.
    if re.search(r"\s", name + (value or "")) or not name:
      raise ValueError(f"sbatch option {name}={value!r}: no whitespace allowed")
    lines.append(f"#SBATCH --{name}" + ("" if value is None else f"={value}"))
  return lines


def train_command(args: argparse.Namespace, train_args: Sequence[str]) -> list[str]:
  """`t5gemma train` with MODEL_DIR from --model_dir first; the user's arguments follow."""
  if any(a.startswith("--gin.MODEL_DIR=") for a in train_args):
    raise ValueError("set MODEL_DIR with --model_dir, not --gin.MODEL_DIR after --")
  if not train_args:
    raise ValueError("give `t5gemma train`'s arguments after --, e.g. "
                     "-- --gin_file=runs/pretrain.gin --gin_file=models/b-b.gin")
  if "--dry_run" in train_args:  # it would reach t5gemma, and the job would be submitted
    raise ValueError("--dry_run belongs before --")
  model_dir = args.model_dir if "://" in args.model_dir else os.path.abspath(args.model_dir)
  return ["t5gemma", "train", f"--gin.MODEL_DIR={json.dumps(model_dir)}", *train_args]


def srun_command(args: argparse.Namespace, train_args: Sequence[str]) -> list[str]:
  cmd = ["srun", "--kill-on-bad-exit=1"]
  if args.cpus_per_task is not None:
    cmd.append(f"--cpus-per-task={args.cpus_per_task}")  # srun no longer inherits it (22.05+)
  if args.container_image:
    cmd += [f"--container-image={args.container_image}", f"--container-workdir={args.workdir}"]
    if args.container_mounts:
      cmd.append(f"--container-mounts={args.container_mounts}")
  return cmd + train_command(args, train_args)


def script(args: argparse.Namespace, train_args: Sequence[str]) -> str:
  """The whole sbatch script as text."""
  if args.nodes < 1 or args.gpus_per_node < 1:
    raise ValueError("--nodes and --gpus_per_node must be >= 1")
  for item in args.env:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item, re.S):
      raise ValueError(f"--env {item!r}: expected NAME=VALUE")
  processes = args.nodes * (args.gpus_per_node if args.per == "gpu" else 1)
  lines = ["#!/bin/bash", *_sbatch_lines(args), "",
           f"# {args.nodes} node(s) x {args.gpus_per_node} GPU(s), {processes} JAX process(es).",
           "set -eo pipefail", f"cd {shlex.quote(args.workdir)}"]
  if args.venv:
    lines.append(f"source {shlex.quote(os.path.join(args.venv, 'bin', 'activate'))}")
  lines += list(args.setup)  # the user's own shell lines (module load, conda activate, ...)
  lines.append("unset JAX_PLATFORMS")
  if args.per == "gpu":
    # Slurm hands each task its one GPU as device 0; jax would otherwise pick the GPU numbered
    # by the task's local rank, which this task cannot see.
    lines.append("export JAX_LOCAL_DEVICE_IDS=0")
  else:
    # One process drives every GPU of its node; jax's Slurm detection would give it only one.
    ids = ",".join(str(i) for i in range(args.gpus_per_node))
    lines.append(f"export JAX_LOCAL_DEVICE_IDS={ids}")
  for item in args.env:
    name, _, value = item.partition("=")
    lines.append(f"export {name}={shlex.quote(value)}")
  lines += ["", shlex.join(srun_command(args, train_args)), ""]
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="t5gemma launch slurm", description=__doc__.split("\n\n")[0],
      usage="t5gemma launch slurm --nodes=N --model_dir=DIR [options] -- TRAIN_ARGS",
      epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nodes", type=int, required=True)
  p.add_argument("--gpus_per_node", type=int, default=8)
  p.add_argument("--per", choices=("gpu", "node"), default="gpu",
                 help="one JAX process per GPU or per node")
  p.add_argument("--model_dir", required=True,
                 help="shared folder (or gs://) every node reaches; its checkpoints resume")
  p.add_argument("--job_name", default="t5gemma")
  p.add_argument("--partition", default=None)
  p.add_argument("--time", default=None, help="limit, e.g. 24:00:00")
  p.add_argument("--account", default=None)
  p.add_argument("--cpus_per_task", type=int, default=None)
  p.add_argument("--output", default="slurm-%x-%j.out", help="sbatch --output pattern")
  p.add_argument("--requeue", action="store_true", help="let Slurm requeue a preempted job")
  p.add_argument("--sbatch", action="append", default=[], metavar="NAME[=VALUE]",
                 help="any other #SBATCH option, e.g. --sbatch=qos=high (repeatable)")
  p.add_argument("--workdir", default=os.getcwd(),
                 help="folder the job starts in (default: this one)")
  p.add_argument("--venv", default=None, help="virtualenv to activate (its bin/activate)")
  p.add_argument("--setup", action="append", default=[], metavar="LINE",
                 help="shell line run before srun, e.g. 'module load cuda' (repeatable)")
  p.add_argument("--container_image", default=None, help="pyxis/enroot image for srun")
  p.add_argument("--container_mounts", default=None, help="pyxis --container-mounts")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                 help="environment variable for training (repeatable)")
  p.add_argument("--write", default=None, metavar="PATH", help="also write the script here")
  p.add_argument("--dry_run", action="store_true", help="print the script, submit nothing")
  return p


def build(argv: Sequence[str]) -> tuple[argparse.Namespace, str]:
  """Parses launcher arguments (then `--` and the train arguments); returns them and the script.

  Raises:
    ValueError: inconsistent options (the message says which).
  """
  own, train_args = split_train_args(argv)
  args = _parser().parse_args(own)
  args.workdir = os.path.abspath(args.workdir)
  args.venv = args.venv and os.path.abspath(args.venv)
  return args, script(args, train_args)


def main(argv: Optional[Sequence[str]] = None) -> int:
  try:
    args, text = build(sys.argv[1:] if argv is None else argv)
  except ValueError as e:
    print(f"t5gemma launch slurm: error: {e}", file=sys.stderr)
    return 2
  if args.write:
    with open(args.write, "w") as f:
      f.write(text)
  if args.dry_run:
    print(text, end="")
    return 0
  if args.write:
    return subprocess.call(["sbatch", args.write])
  return subprocess.run(["sbatch"], input=text, text=True).returncode


if __name__ == "__main__":
  sys.exit(main())
