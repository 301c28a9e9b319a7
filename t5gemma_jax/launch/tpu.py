r"""Cloud TPU VMs for `t5gemma train`: create, run, status, logs, delete (gcloud underneath).

  t5gemma launch tpu create my-tpu --zone=us-east5-a --accelerator_type=v5p-64 \
      --num_slices=2 --spot
  t5gemma launch tpu run my-tpu --zone=us-east5-a --num_slices=2 --accelerator_type=v5p-64 \
      --model_dir=gs://bkt/runs/bb \
      -- --gin_file=runs/pretrain.gin --gin_file=models/b-b.gin --gin.BATCH_SIZE=1024
  t5gemma launch tpu logs my-tpu --zone=us-east5-a --num_slices=2 --follow
  t5gemma launch tpu delete my-tpu --zone=us-east5-a --num_slices=2

`run --accelerator_type=TYPE` first compiles the run for that slice here (`t5gemma compile`, the
TPU compiler through libtpu; no TPU needed) and stops, before anything is shipped, when a step
does not fit in HBM (--skip_compile_check launches anyway).
Every subcommand takes --dry_run: it prints the commands, one per line and shell-quoted, instead
of running them. `run` ships the code (a tarball of this checkout's `git ls-files`, a built
`--wheel`, or a `--git_ref` cloned on the workers; see `shipping`), installs it into a
virtualenv next to it and starts the same `t5gemma train` command in the background on every
worker of every slice. MODEL_DIR (a gs:// path) comes from --model_dir; running `run` again
stops the previous run (SIGTERM: it saves a checkpoint) and resumes from MODEL_DIR. --num_slices=N > 1 is Multislice: one queued resource
whose nodes are NAME-0 ... NAME-(N-1), data parallel across slices (MeshConfig.dcn=(N, 1, 1)).
Pass the same NAME, --zone, --num_slices and --queued to every subcommand.

Accelerator types and the runtime (`--version`) each gets unless --version says otherwise:

  generation  accelerator type    size counts   hosts per slice   default runtime version
  v4          v4-N                TensorCores   N / 8             tpu-ubuntu2204-base
  v5e         v5litepod-N         chips         1 if N <= 8,      v2-alpha-tpuv5-lite
                                                else N / 4
  v5p         v5p-N               TensorCores   N / 8             v2-alpha-tpuv5
  v6e         v6e-N               chips         as v5e            v2-alpha-tpuv6e

The runtime images ship Python 3.10 and our pinned jax needs 3.11 or newer, so the setup step
installs --python (default python3.11) with apt when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

from t5gemma_jax import chips
from t5gemma_jax.launch import shipping, split_train_args

# generation: default runtime version (the slice shapes and chip figures: t5gemma_jax.chips)
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}


def accelerator(accelerator_type: str) -> dict:
  """Generation, canonical type, chips and hosts of one slice, e.g. 'v5p-64' or 'v5e-16'.

  Raises:
    ValueError: an unknown generation or a size that generation does not come in.
  """
  found = chips.parse(accelerator_type)
  return {"generation": found.chip.generation, "type": found.type, "chips": found.chips,
          "hosts": found.hosts, "version": RUNTIME_VERSIONS[found.chip.generation]}


def nodes(args: argparse.Namespace) -> list[str]:
  """TPU VM node names: NAME, or NAME-0 ... NAME-(N-1) for N slices (queued --node-prefix)."""
  if args.num_slices == 1:
    return [args.name]
  return [f"{args.name}-{i}" for i in range(args.num_slices)]


def _queued(args: argparse.Namespace) -> bool:
  return args.queued or args.num_slices > 1


def _gcloud(args: argparse.Namespace, *words: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}"]
  if args.project:
    cmd.append(f"--project={args.project}")
  return cmd


def _on_worker(path: str) -> str:
  """A path as one shell word on a worker; relative paths hang off the login home."""
  return shlex.quote(path) if path.startswith("/") else '"$HOME"/' + shlex.quote(path)


def _ssh(args: argparse.Namespace, node: str, script: str, worker: str = "all") -> list[str]:
  return _gcloud(args, "tpu-vm", "ssh", node) + [f"--worker={worker}", f"--command={script}"]


def create_commands(args: argparse.Namespace) -> list[list[str]]:
  """`gcloud ... tpu-vm create`, or `queued-resources create` for --queued / Multislice."""
  acc = accelerator(args.accelerator_type)
  version = args.version or acc["version"]
  if _queued(args):
    if args.preemptible:
      raise ValueError("queued resources have no --preemptible tier; use --spot")
    cmd = _gcloud(args, "queued-resources", "create", args.name)
    cmd += [f"--accelerator-type={acc['type']}", f"--runtime-version={version}"]
    if args.num_slices > 1:
      cmd += [f"--node-count={args.num_slices}", f"--node-prefix={args.name}"]
    else:
      cmd.append(f"--node-id={args.name}")
  else:
    cmd = _gcloud(args, "tpu-vm", "create", args.name)
    cmd += [f"--accelerator-type={acc['type']}", f"--version={version}"]
  for flag in ("spot", "preemptible", "reserved"):
    if getattr(args, flag):
      cmd.append(f"--{flag}")
  for flag in ("network", "subnetwork"):
    if getattr(args, flag):
      cmd.append(f"--{flag}={getattr(args, flag)}")
  return [cmd]


def _remote_paths(remote_dir: str) -> dict[str, str]:
  """Where the code, its virtualenv, the uploaded tarball, the log and the pid file live."""
  d = remote_dir.rstrip("/")
  if (not d or d in (".", "~") or d.startswith("~") or ".." in d.split("/")
      or (d.startswith("/") and d.count("/") < 2)):
    raise ValueError(f"--remote_dir {remote_dir!r}: give a folder of its own, e.g. t5gemma")
  return {"code": d, "venv": d + "-venv", "tarball": d + ".tar.gz", "log": d + ".log",
          "pid": d + ".pid"}


def train_command(args: argparse.Namespace, train_args: Sequence[str]) -> list[str]:
  """The `t5gemma train` arguments every worker runs: our bindings, then the user's.

  The user's come last so that they win, except MODEL_DIR, which only --model_dir sets.
  """
  if not args.model_dir.startswith("gs://"):
    raise ValueError(f"--model_dir {args.model_dir!r}: every worker writes there, so it must be "
                     "a gs:// path")
  if any(a.startswith("--gin.MODEL_DIR=") for a in train_args):
    raise ValueError("set MODEL_DIR with --model_dir, not --gin.MODEL_DIR after --")
  if not train_args:
    raise ValueError("give `t5gemma train`'s arguments after --, e.g. "
                     "-- --gin_file=runs/pretrain.gin --gin_file=models/b-b.gin")
  if "--dry_run" in train_args:  # it would reach t5gemma, and the launch would go ahead
    raise ValueError("--dry_run belongs before --")
  ours = [f"--gin.MODEL_DIR={json.dumps(args.model_dir)}"]
  if args.num_slices > 1:
    ours.append(f"--gin.MeshConfig.dcn=({args.num_slices}, 1, 1)")
  return ["train", *ours, *train_args]


def _running(pid: str, program: str) -> str:
  # A test for "the run in the pid file is alive": matching the cmdline keeps a stale pid file
  # from hitting an unrelated process, and a reaped-or-zombie process has an empty one.
  return f'grep -qaF {shlex.quote(program)} /proc/"$(cat {pid} 2>/dev/null)"/cmdline 2>/dev/null'


def stop_script(args: argparse.Namespace) -> str:
  """Sends SIGTERM to the previous run, which then saves a checkpoint and exits.

  Two runs cannot share the TPU. Every slice gets its signal in this step, before any slice
  waits for its process to end in the next: a checkpoint needs all slices to take part.
  """
  paths = _remote_paths(args.remote_dir)
  pid = _on_worker(paths["pid"])
  running = _running(pid, paths["venv"] + "/bin/t5gemma")
  return f'if {running}; then kill "$(cat {pid})"; echo "stopping the previous run"; fi'


def _source(args: argparse.Namespace) -> shipping.Source:
  return shipping.Source(args.wheel, args.git_ref, args.repo_url)


def prepare_script(args: argparse.Namespace) -> str:
  """Runs on every worker before the launch: await the old run's end, fetch code, install."""
  paths = _remote_paths(args.remote_dir)
  code, venv = _on_worker(paths["code"]), _on_worker(paths["venv"])
  running = _running(_on_worker(paths["pid"]), paths["venv"] + "/bin/t5gemma")
  steps = ["set -e",  # up to 10 minutes for the previous run's checkpoint, then SIGKILL
           f"for _ in $(seq 120); do {running} || break; sleep 5; done",
           f'if {running}; then kill -9 "$(cat {_on_worker(paths["pid"])})"; fi']
  upload = (shipping.wheel_upload(paths["code"], args.wheel) if args.wheel
            else paths["tarball"])
  steps += shipping.fetch_steps(_source(args), code, _on_worker(upload))
  if not args.skip_setup:
    py = shlex.quote(args.python)
    if re.fullmatch(r"python3\.\d+", args.python):
      apt = "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq"
      steps.append(f"if ! {py} -c 'import ensurepip' 2>/dev/null; then {apt} update && "
                   f"{apt} install -y {py} {py}-venv; fi")
    steps += [f"[ -x {venv}/bin/python ] || {py} -m venv {venv}",
              f"{venv}/bin/pip install -q --upgrade pip",
              f"cd {code}", shipping.install_step(_source(args), venv, args.jax_version)]
  return "; ".join(steps)


def launch_script(args: argparse.Namespace, train_args: Sequence[str]) -> str:
  """Starts training in the background (it outlives the ssh session) and records its pid."""
  paths = _remote_paths(args.remote_dir)
  log, pid = _on_worker(paths["log"]), _on_worker(paths["pid"])
  env = ["env", "-u", "JAX_PLATFORMS", *args.env]  # the TPU runtime sets up the rest
  train = " ".join([shlex.join(env), _on_worker(paths["venv"] + "/bin/t5gemma"),
                    shlex.join(train_command(args, train_args))])
  return (f"cd {_on_worker(paths['code'])} || exit 1; "
          f'echo "== launch $(date -u +%FT%TZ)" >> {log}; '
          f"setsid nohup {train} >> {log} 2>&1 < /dev/null & echo $! > {pid}")


def compile_check_command(args: argparse.Namespace, train_args: Sequence[str]) -> list[str]:
  """`t5gemma compile` of the exact run for the slice, here, before anything is shipped: it
  exits 3 when the step does not fit in HBM (2 for bad input), which stops the launch."""
  if not args.accelerator_type:
    raise ValueError("run needs --accelerator_type (the slice's type, e.g. v5p-64) to compile "
                     "the run for it first; or pass --skip_compile_check")
  chips.parse(args.accelerator_type)
  check = train_command(args, train_args)[1:]  # the same bindings as the workers get
  return [sys.executable, "-m", "t5gemma_jax.cli", "compile",
          f"--topology={args.accelerator_type}", f"--num_slices={args.num_slices}",
          "--no_decode", *check]


def local_tarball(args: argparse.Namespace) -> str:
  return os.path.join(tempfile.gettempdir(), f"t5gemma-{args.name}.tar.gz")


def run_commands(args: argparse.Namespace, train_args: Sequence[str]) -> list[list[str]]:
  """Stop, ship, install, start: each step on every slice before the next step starts."""
  _source(args).check()
  for item in args.env:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item, re.S):
      raise ValueError(f"--env {item!r}: expected NAME=VALUE")
  launch = launch_script(args, train_args)  # validates the train arguments first
  pack_cmd = [sys.executable, "-m", "t5gemma_jax.launch.tpu", "pack",
              f"--output={local_tarball(args)}"]
  cmds = [] if args.skip_compile_check else [compile_check_command(args, train_args)]
  cmds += [] if args.git_ref or args.wheel else [pack_cmd]
  cmds += [_ssh(args, node, stop_script(args)) for node in nodes(args)]
  if not args.git_ref:
    local, remote = ((os.path.abspath(args.wheel),
                      shipping.wheel_upload(args.remote_dir, args.wheel)) if args.wheel
                     else (local_tarball(args), _remote_paths(args.remote_dir)["tarball"]))
    cmds += [_gcloud(args, "tpu-vm", "scp", local, f"{node}:{remote}") + ["--worker=all"]
             for node in nodes(args)]
  cmds += [_ssh(args, node, prepare_script(args)) for node in nodes(args)]
  cmds += [_ssh(args, node, launch) for node in nodes(args)]
  return cmds


def status_commands(args: argparse.Namespace) -> list[list[str]]:
  if _queued(args):
    return [_gcloud(args, "queued-resources", "describe", args.name)]
  return [_gcloud(args, "tpu-vm", "describe", args.name)]


def logs_commands(args: argparse.Namespace) -> list[list[str]]:
  """Tail (or cat, --lines=0) the training log; --follow streams one slice's workers."""
  log = _on_worker(_remote_paths(args.remote_dir)["log"])
  if args.follow:
    script = f"tail -n {args.lines} -F {log}"
  else:
    script = f"cat {log}" if args.lines == 0 else f"tail -n {args.lines} {log}"
  targets = nodes(args)
  if args.slice is not None:
    if not 0 <= args.slice < len(targets):
      raise ValueError(f"--slice {args.slice}: there are {len(targets)} slices")
    targets = [targets[args.slice]]
  elif args.follow:
    targets = targets[:1]  # a follow never ends, so the next slice would never be reached
  return [_ssh(args, node, script, args.worker) for node in targets]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
  if _queued(args):
    cmd = _gcloud(args, "queued-resources", "delete", args.name) + ["--force"]
  else:
    cmd = _gcloud(args, "tpu-vm", "delete", args.name)
  return [cmd + (["--quiet"] if args.yes else [])]


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="t5gemma launch tpu",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  sub = parser.add_subparsers(dest="command", required=True)
  subs = {}
  for name, text in [("create", "create a TPU VM or a queued resource"),
                     ("run", "ship the code and start `t5gemma train` on every worker"),
                     ("status", "describe the TPU VM or queued resource"),
                     ("logs", "show the training log of every worker"),
                     ("delete", "delete the TPU VM or queued resource (and its nodes)")]:
    p = subs[name] = sub.add_parser(name, help=text, description=text)
    p.add_argument("name", help="TPU VM name (Multislice: queued resource and node prefix)")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None, help="default: gcloud's configured project")
    p.add_argument("--num_slices", type=int, default=1, help=">1: Multislice (queued)")
    p.add_argument("--queued", action="store_true", help="a queued resource even for 1 slice")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  p = subs["create"]
  p.add_argument("--accelerator_type", required=True, help="e.g. v4-32, v5litepod-16, v5p-64")
  p.add_argument("--version", default=None, help="runtime version (default: per generation)")
  tier = p.add_mutually_exclusive_group()
  tier.add_argument("--spot", action="store_true")
  tier.add_argument("--preemptible", action="store_true", help="single TPU VMs only")
  tier.add_argument("--reserved", action="store_true")
  p.add_argument("--network", default=None)
  p.add_argument("--subnetwork", default=None)
  for name in ("run", "logs"):
    subs[name].add_argument(
        "--remote_dir", default="t5gemma",
        help="code folder on the workers (relative: under home); the virtualenv, log and pid "
             "file sit next to it as DIR-venv, DIR.log, DIR.pid")
  p = subs["run"]
  p.usage = "t5gemma launch tpu run NAME --zone=ZONE --model_dir=gs://... [options] -- TRAIN_ARGS"
  p.epilog = "TRAIN_ARGS (after --) go to `t5gemma train` unchanged: --gin_file=..., --gin.X=..."
  p.add_argument("--model_dir", required=True, help="gs:// folder; its checkpoints resume")
  p.add_argument("--git_ref", default=None, help="clone this branch/tag/commit on the workers")
  p.add_argument("--repo_url", default=None, help="repository to clone (with --git_ref)")
  p.add_argument("--wheel", default=None,
                 help="ship and install this built wheel (`pip wheel --no-deps .`) instead of "
                      "the checkout's files")
  p.add_argument("--python", default="python3.11", help="interpreter for the virtualenv")
  p.add_argument("--jax_version", default=shipping.pinned_jax(), help="jax[tpu] version to install")
  p.add_argument("--skip_setup", action="store_true", help="reuse the installed virtualenv")
  p.add_argument("--accelerator_type", default=None,
                 help="the slice's type (e.g. v5p-64): the run is compiled for it here first "
                      "and refused when it does not fit in HBM")
  p.add_argument("--skip_compile_check", action="store_true",
                 help="launch without compiling for the slice first")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                 help="environment variable for training (repeatable)")
  p = subs["logs"]
  p.add_argument("--lines", type=int, default=100, help="0: the whole log")
  p.add_argument("--follow", action="store_true", help="keep streaming (tail -F)")
  p.add_argument("--worker", default="all", help="'all' or worker indices, e.g. 0")
  p.add_argument("--slice", type=int, default=None, help="only this slice (Multislice)")
  subs["delete"].add_argument("--yes", action="store_true", help="no confirmation prompt")
  pack_p = sub.add_parser("pack", help="(used by run) tar up this checkout's git files")
  pack_p.add_argument("--output", required=True)
  return parser


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """Parses launcher arguments; returns them with the `t5gemma train` arguments after `--`."""
  own, train_args = split_train_args(argv)
  args = _parser().parse_args(own)
  if args.command not in ("run", "pack") and train_args:
    _parser().error(f"{args.command} takes no arguments after --")
  if args.command != "pack" and args.num_slices < 1:
    _parser().error("--num_slices must be >= 1")
  return args, train_args


def plan(argv: Sequence[str]) -> list[list[str]]:
  """The commands a CLI invocation would run, in order, e.g. plan(["status", "x", "--zone=z"]).

  Raises:
    ValueError: inconsistent options (the message says which).
  """
  args, train_args = parse(argv)
  if args.command == "run":
    return run_commands(args, train_args)
  return {"create": create_commands, "status": status_commands, "logs": logs_commands,
          "delete": delete_commands}[args.command](args)


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args, _ = parse(argv)
  if args.command == "pack":
    print(f"packed {len(shipping.pack(args.output))} files into {args.output}", file=sys.stderr)
    return 0
  try:
    cmds = plan(argv)
  except ValueError as e:
    print(f"t5gemma launch tpu {args.command}: error: {e}", file=sys.stderr)
    return 2
  for cmd in cmds:
    if args.dry_run:
      print(shlex.join(cmd))
      continue
    print(f"+ {shlex.join(cmd)}", file=sys.stderr)
    rc = subprocess.call(cmd)
    if rc:
      return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
