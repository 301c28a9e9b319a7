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

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import tasks  # noqa: E402,F401  (registers the tasks)
from t5gemma_jax import config, model  # noqa: E402
from t5gemma_jax.data import pipeline  # noqa: E402


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
  """A full training step of the tiny model: forward, backward, AdamW update."""
  cfg = config.preset("tiny")
  net = model.T5Gemma(cfg)
  enc = jnp.ones((batch, lengths["inputs"]), jnp.int32)
  dec = jnp.ones((batch, lengths["targets"]), jnp.int32)
  params = nn.meta.unbox(jax.jit(net.init)(jax.random.PRNGKey(0), enc, dec))["params"]
  opt = optax.adamw(1e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, enc, dec):
    def loss_fn(p):
      logits = net.apply({"params": p}, enc, dec, encoder_segment_ids=(enc > 0).astype(jnp.int32),
                         decoder_segment_ids=(dec > 0).astype(jnp.int32))
      return optax.softmax_cross_entropy_with_integer_labels(logits, dec).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  params, state, loss = step(params, state, enc, dec)
  jax.block_until_ready(loss)
  start = time.perf_counter()
  for _ in range(steps):
    params, state, loss = step(params, state, enc, dec)
  jax.block_until_ready(loss)
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
  print(f"train step {train:12,.0f} token positions/s (tiny model, AdamW)")
  print(f"ratio      {ratio:12.1f}x  (target >= 10x) {'OK' if ratio >= 10 else 'TOO SLOW'}")
  return 0 if ratio >= 10 else 1


if __name__ == "__main__":
  sys.exit(main())
