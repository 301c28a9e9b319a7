"""Compile time of the train step against depth: 2 vs 24 layers per stack, scan on and off.

  .venv/bin/python benchmarks/compile_time.py [--preset=tiny] [--depths=2,24]

`jax.jit(...).lower(abstract state, abstract batch).compile()` of the project's train step
(AdamW, one device), nothing executed. With `scan_layers=True` a stack is one `nn.scan` over
its repeating unit of layers, so its program does not grow with depth; unrolled, it does.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from t5gemma_jax import config, presets, sharding  # noqa: E402
from t5gemma_jax.model import abstract_params  # noqa: E402
from t5gemma_jax.run_options import RunOptions  # noqa: E402
from t5gemma_jax.train import optim, step as step_lib  # noqa: E402
from t5gemma_jax.train.losses import LossConfig  # noqa: E402


def compile_seconds(cfg: config.T5GemmaConfig, run: RunOptions, batch: int, inputs: int,
                    targets: int) -> float:
  """Seconds to lower and compile one train step for `cfg` (fresh, no compilation cache)."""
  optimizer = optim.make_optimizer(optim.OptimizerConfig(name="adamw"),
                                   abstract_params(cfg, run, boxed=False))
  mesh = sharding.make_mesh(sharding.MeshConfig(ici=(1, 1, 1)), jax.devices()[:1])
  abstract, shardings = step_lib.state_shardings(cfg, optimizer, mesh, run)
  train, _ = step_lib.jit_steps(step_lib.make_train_step(cfg, optimizer, LossConfig(), run=run),
                                step_lib.make_eval_step(cfg, LossConfig(), run), shardings,
                                mesh)
  tokens = {"encoder_input_tokens": (batch, inputs), "decoder_input_tokens": (batch, targets),
            "decoder_target_tokens": (batch, targets), "decoder_loss_weights": (batch, targets)}
  example = {k: jax.ShapeDtypeStruct(s, jnp.int32) for k, s in tokens.items()}
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  start = time.perf_counter()
  train.lower(abstract, example, rng).compile()
  return time.perf_counter() - start


def with_depth(cfg: config.T5GemmaConfig, layers: int) -> config.T5GemmaConfig:
  def stack(m):
    return dataclasses.replace(m, num_layers=layers, layer_types=None)
  return cfg.replace(encoder=stack(cfg.encoder), decoder=stack(cfg.decoder))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--depths", default="2,24")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs", type=int, default=256)
  parser.add_argument("--targets", type=int, default=64)
  args = parser.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)
  depths = [int(d) for d in args.depths.split(",")]
  base = presets.preset(args.preset)
  out = {"preset": args.preset, "device": jax.devices()[0].device_kind}
  for scan in (True, False):
    for layers in depths:
      seconds = compile_seconds(with_depth(base, layers), RunOptions(scan_layers=scan),
                                args.batch, args.inputs, args.targets)
      out[f"{'scan' if scan else 'unrolled'}_{layers}"] = seconds
      print(f"{'scan    ' if scan else 'unrolled'} {layers:3d} layers per stack: "
            f"{seconds:6.1f} s compile")
  lo, hi = min(depths), max(depths)
  for mode in ("scan", "unrolled"):
    out[f"{mode}_ratio"] = out[f"{mode}_{hi}"] / out[f"{mode}_{lo}"]
    print(f"{mode}: {hi} layers / {lo} layers = {out[f'{mode}_ratio']:.2f}x"
          + ("  (target <= 1.5x)" if mode == "scan" else ""))
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
