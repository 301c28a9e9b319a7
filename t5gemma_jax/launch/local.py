"""Runs one `t5gemma` command as N processes on this machine, joined by `jax.distributed`.

The multi-host rehearsal: each process gets its own slice of forced CPU devices and the
coordinator environment that `t5gemma_jax.sharding.maybe_initialize_distributed` reads, exactly
as it would on N hosts of a pod.

  t5gemma launch local --num_processes=2 --devices_per_process=2 -- \
      train --gin_file=runs/demo.gin --gin.MODEL_DIR='"/tmp/two"' --gin.TRAIN_STEPS=5

Output lines are prefixed with the process index. If any process fails, the others are
stopped and the exit status is the first failure's.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
from typing import Optional, Sequence


def free_port() -> int:
  """A TCP port nothing listens on now (for the coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(index: int, num_processes: int, port: int, devices: int,
                base: Optional[dict] = None) -> dict:
  """The environment of process `index`: coordinator, CPU devices and collectives."""
  env = dict(os.environ if base is None else base)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
             JAX_PROCESS_ID=str(index), JAX_PLATFORMS="cpu",
             # CPU collectives across processes need gloo (the default has none).
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]))
  return env


def _pump(index: int, stream, sink, lines: list[str]) -> None:
  for line in stream:
    lines.append(line)
    sink.write(f"[p{index}] {line}")
    sink.flush()


def run(command: Sequence[str], num_processes: int, devices_per_process: int = 1,
        timeout: Optional[float] = None, sink=None) -> tuple[int, list[list[str]]]:
  """Starts `t5gemma <command>` N times and waits for all of them.

  Args:
    command: the t5gemma arguments, e.g. ["train", "--gin_file=runs/demo.gin", ...].
    num_processes: how many processes.
    devices_per_process: forced CPU devices in each.
    timeout: seconds before every process is killed.
    sink: where prefixed output goes (default stdout).

  Returns:
    (exit status: 0 or the first non-zero one, each process's output lines).
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError("--num_processes and --devices_per_process must be >= 1")
  sink = sink or sys.stdout
  port = free_port()
  procs, outputs, pumps = [], [], []
  for i in range(num_processes):
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "t5gemma_jax.cli", *command],
        env=process_env(i, num_processes, port, devices_per_process),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs.append([])
    pumps.append(threading.Thread(target=_pump, args=(i, procs[-1].stdout, sink, outputs[-1]),
                                  daemon=True))
    pumps[-1].start()
  status = 0
  try:
    pending = list(procs)
    while pending:
      for p in list(pending):
        try:
          code = p.wait(timeout=0.5 if timeout is None else min(0.5, timeout))
        except subprocess.TimeoutExpired:
          continue
        pending.remove(p)
        if code and not status:
          status = code  # one failed: the others would wait for it at the next collective
          for other in pending:
            other.terminate()
      if timeout is not None:
        timeout -= 0.5
        if timeout <= 0:
          raise TimeoutError("t5gemma launch local: processes timed out")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for t in pumps:
      t.join(timeout=5)
  return status, outputs


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="after --: the t5gemma command and its flags")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the t5gemma command after --, e.g. -- train --gin_file=...")
  status, _ = run(command, args.num_processes, args.devices_per_process)
  return status


if __name__ == "__main__":
  sys.exit(main())
