"""Input pipeline throughput beside the tokens/s the tiny model's train step consumes.

  .venv/bin/python benchmarks/pipeline_vs_step.py [--task builtin_mixture] [--batch 16]

Both are measured in this run on this machine, one after the other, in token positions
(batch x (inputs + targets length)) per second. The pipeline must deliver at least 10x what
the step consumes, or it would become the bottleneck once host and device overlap.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from t5gemma_jax import tasks  # noqa: E402,F401  (registers the tasks)
from t5gemma_jax import presets, sharding  # noqa: E402
from t5gemma_jax.data import pipeline  # noqa: E402
from t5gemma_jax.model import abstract_params  # noqa: E402
from t5gemma_jax.train import optim, step as step_lib  # noqa: E402
from t5gemma_jax.train.losses import LossConfig  # noqa: E402


def pipeline_rate(task: str, lengths: dict, batch: int, steps: int) -> tuple[float, float]:
  cfg = pipeline.DataConfig(task, lengths, global_batch_size=batch, seed=0)
  it = pipeline.GlobalBatches(pipeline.host_dataset(cfg))
  for _ in range(5):  # warm up: vocabulary, tf.data graph, prefetch buffer
    next(it)
  real = 0
  start = time.perf_counter()
  for _ in range(steps):
    b = next(it)
    real += int((b["encoder_segment_ids"] > 0).sum() + (b["decoder_segment_ids"] > 0).sum())
  seconds = time.perf_counter() - start
  positions = steps * batch * (lengths["inputs"] + lengths["targets"])
  return positions / seconds, real / positions


def step_rate(lengths: dict, batch: int, steps: int) -> float:
  """The project's own train step (AdamW, z-loss) on the tiny model, one device."""
  cfg = presets.preset("tiny")
  opt_cfg = optim.OptimizerConfig(name="adamw", schedule=optim.ScheduleConfig(
      name="constant", learning_rate=1e-3, warmup_steps=0))
  optimizer = optim.make_optimizer(opt_cfg, abstract_params(cfg, boxed=False))
  mesh = sharding.make_mesh(sharding.MeshConfig(ici=(1, 1, 1)), jax.devices()[:1])
  state, shardings = step_lib.init_state(cfg, optimizer, mesh, seed=0)
  train, _ = step_lib.jit_steps(step_lib.make_train_step(cfg, optimizer, LossConfig()),
                                step_lib.make_eval_step(cfg, LossConfig()), shardings, mesh)
  enc = jnp.full((batch, lengths["inputs"]), 5, jnp.int32)
  dec = jnp.full((batch, lengths["targets"]), 5, jnp.int32)
  example = {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
             "decoder_target_tokens": dec, "decoder_loss_weights": jnp.ones_like(dec),
             "encoder_segment_ids": jnp.ones_like(enc), "decoder_segment_ids": jnp.ones_like(dec)}
  rng = jax.random.PRNGKey(0)
  state, metrics = train(state, example, rng)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = train(state, example, rng)
  jax.block_until_ready(metrics)
  return steps * batch * (lengths["inputs"] + lengths["targets"]) / (time.perf_counter() - start)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--task", default="builtin_mixture")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--inputs_length", type=int, default=256)
  parser.add_argument("--targets_length", type=int, default=128)
  parser.add_argument("--steps", type=int, default=30)
  args = parser.parse_args()
  lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
  data, fill = pipeline_rate(args.task, lengths, args.batch, args.steps * 3)
  train = step_rate(lengths, args.batch, args.steps)
  ratio = data / train
  print(f"task {args.task}, batch {args.batch}, lengths {lengths}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s)")
  print(f"pipeline   {data:12,.0f} token positions/s ({fill:.0%} non-padding)")
  print(f"train step {train:12,.0f} token positions/s (tiny model, t5gemma_jax.train.step)")
  print(f"ratio      {ratio:12.1f}x  (target >= 10x) {'OK' if ratio >= 10 else 'TOO SLOW'}")
  return 0 if ratio >= 10 else 1


if __name__ == "__main__":
  sys.exit(main())
