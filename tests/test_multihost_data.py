"""Two processes with jax.distributed on localhost build one sharded global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocess runs or long trainings: `make test` only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_each_process_reads_its_shard_into_one_global_batch(tmp_path):
  tsv = tmp_path / "d.tsv"
  tsv.write_text("".join(f"input {i}\ttarget {i}\n" for i in range(16)))
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "multihost_worker.py"),
                             port, str(i), str(tsv), str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  seen = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(2)]
  for s in seen:
    assert s["shape"] == [8, 8] and s["local_shards"] == 2  # 4 devices, 2 per process
    assert "data" in s["spec"] and "fsdp" in s["spec"]
  assert seen[0]["global"] == seen[1]["global"]  # one array, identical everywhere
  rows = [tuple(r) for r in seen[0]["global"]]
  local = [[tuple(r) for shard in s["local_rows"] for r in shard] for s in seen]
  assert len(set(rows)) == 8, "global batch rows should be 8 different examples"
  assert set(local[0]) | set(local[1]) == set(rows)
  assert not set(local[0]) & set(local[1]), "the two processes read overlapping examples"
