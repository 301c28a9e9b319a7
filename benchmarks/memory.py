"""Peak host memory of a train step, ours beside transformers', each in its own process.

  .venv/bin/python benchmarks/memory.py --preset=s-s --vocab_size=32000 --batch=8

Each side starts a fresh interpreter, imports its framework, records its resident memory,
then builds the model and optimizer and runs three train steps; the figure is the peak
resident memory (VmHWM) above that baseline, beside the bytes of params + gradients + Adam
moments (4 float32 copies of the parameters), which any implementation must hold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

_CHILD = r"""
import json, os, sys
sys.path.insert(0, {here!r}); sys.path.insert(0, os.path.dirname({here!r}))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import argparse, math
import jax, numpy as np, torch, transformers
import train_step as ts
from t5gemma_jax.model import abstract_params

def status(key):
  for line in open("/proc/self/status"):
    if line.startswith(key):
      return int(line.split()[1]) * 1024

args = argparse.Namespace(preset={preset!r}, vocab_size={vocab}, scan=False, remat="none",
                          dtype="float32", attention_impl="xla")
cfg = ts.model_config(args)  # float32, unrolled, XLA attention: the RunOptions defaults
b = ts.make_batch(cfg, {batch}, {inputs}, {targets})
params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_params(cfg, boxed=False)))
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
  f.write("5")
if {side!r} == "jax":
  ts.jax_step_time(cfg, b, 3, keep_params=False)
else:
  import jax.numpy as jnp
  from tests.helpers.random_params import random_params
  ts.hf_step_time(cfg, random_params(cfg), b, 3, 2)
print(json.dumps({{"peak_above_start": status("VmHWM") - base, "params": params}}))
"""


def measure(side: str, args) -> dict:
  code = _CHILD.format(here=HERE, preset=args.preset, vocab=args.vocab_size, batch=args.batch,
                       inputs=args.inputs, targets=args.targets, side=side)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=os.path.dirname(HERE))
  if proc.returncode:
    raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="s-s")
  parser.add_argument("--vocab_size", type=int, default=32000)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs", type=int, default=256)
  parser.add_argument("--targets", type=int, default=64)
  args = parser.parse_args(argv)
  ours, theirs = measure("jax", args), measure("hf", args)
  state = 4 * 4 * ours["params"]
  out = {"preset": args.preset, "params": ours["params"], "state_bytes": state,
         "jax_peak_bytes": ours["peak_above_start"], "hf_peak_bytes": theirs["peak_above_start"]}
  mb = 1024**2
  print(f"{args.preset} (vocab {args.vocab_size}), batch {args.batch}, {args.inputs}/"
        f"{args.targets}: {ours['params']:,} parameters, state (params + grads + 2 Adam "
        f"moments) {state / mb:,.0f} MB")
  print(f"ours:         peak {ours['peak_above_start'] / mb:8,.0f} MB above start "
        f"({ours['peak_above_start'] / state:.2f}x the state)")
  print(f"transformers: peak {theirs['peak_above_start'] / mb:8,.0f} MB above start "
        f"({theirs['peak_above_start'] / state:.2f}x the state)")
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
