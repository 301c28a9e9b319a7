"""One process of tests/test_multiprocess_infer.py: `t5gemma` commands through `app.main`.

  python tests/multiprocess_infer_worker.py PORT INDEX COUNT REPORT COMMANDS_JSON

Joins `jax.distributed` on 127.0.0.1:PORT as process INDEX of COUNT (not when COUNT is 1), runs
each argv list of the JSON list in turn, and writes REPORT (JSON): each command's exit status,
how many `decoding.generate` calls it made here and the tokens `inference.predictions` gave. Exits with the first non-zero status.
"""

import json
import os
import sys

# The same flags in every run, one process or two: their outputs are compared byte for byte.
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                           "--xla_backend_optimization_level=0")  # as tests/conftest.py
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# This checkout's package, whichever one the virtual environment has installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
port, index, count, report = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
commands = json.loads(sys.argv[5])
if count > 1:
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=count, process_id=index,
                             initialization_timeout=120)
jax.config.update("jax_default_matmul_precision", "highest")

from t5gemma_jax import decoding, inference  # noqa: E402
from t5gemma_jax.cli import app  # noqa: E402

calls, decoded = [0], []
generate, predictions = decoding.generate, inference.predictions


def counted_generate(*args, **kwargs):
  """`decoding.generate`, counted: each process should make only its share of the calls."""
  calls[0] += 1
  return generate(*args, **kwargs)


def recorded_predictions(*args, **kwargs):
  """`inference.predictions`, its tokens kept: every process should get all of them."""
  tokens = predictions(*args, **kwargs)
  decoded.append(tokens.tolist())
  return tokens


decoding.generate, inference.predictions = counted_generate, recorded_predictions
results = []
for argv in commands:
  calls[0], decoded[:] = 0, []
  status = app.main(argv)
  results.append({"command": argv[0], "status": status, "generate_calls": calls[0],
                  "tokens": list(decoded)})
  if status:
    break
with open(report, "w") as f:
  json.dump(results, f)
sys.stdout.flush()
status = next((r["status"] for r in results if r["status"]), 0)
if status:
  # Out at once: shutdown's barrier would wait for the other process, which may itself be
  # waiting in a collective for this one.
  os._exit(status)
if count > 1:
  jax.distributed.shutdown()
