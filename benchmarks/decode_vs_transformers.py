"""Greedy decoding tokens/s: ours (cached, one jitted while_loop) beside transformers' generate
on the same random weights, in one run.

  .venv/bin/python benchmarks/decode_vs_transformers.py [--presets tiny s-s] [--new_tokens 32]
  .venv/bin/python benchmarks/decode_vs_transformers.py --presets tiny2 270m-270m  # T5Gemma 2

Both decode exactly `new_tokens` tokens per row (EOS disabled on both sides). Our compile time
is reported separately from the steady-state speed (median of `--repeats` runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (T5Gemma2ForConditionalGeneration,  # noqa: E402
                          T5GemmaForConditionalGeneration)

from t5gemma_jax import config, decoding, model  # noqa: E402
from t5gemma_jax.convert import hf  # noqa: E402


def random_params(cfg, seed=0):
  shapes = nn.meta.unbox(jax.eval_shape(model.T5Gemma(cfg).init, jax.random.PRNGKey(0),
                                        jnp.ones((1, 1), jnp.int32),
                                        jnp.ones((1, 1), jnp.int32)))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    std = 0.3 if "scale" in name else (leaf.shape[-1] if "embedding" in name
                                      else leaf.shape[0]) ** -0.5
    return rng.normal(0.0, std, leaf.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def timed(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--presets", nargs="+", default=["tiny", "s-s"])
  parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
  parser.add_argument("--input_length", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  print(f"{jax.device_count()} {jax.devices()[0].platform} device(s), torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, greedy, "
        f"{args.input_length} input tokens, {args.new_tokens} new tokens")
  print(f"{'preset':8} {'batch':>5} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>7} "
        f"{'compile s':>10}")
  worst = float("inf")
  for name in args.presets:
    cfg = config.preset(name)
    params = random_params(cfg)
    with tempfile.TemporaryDirectory() as d:
      hf.save(params, cfg, d)
      cls = (T5Gemma2ForConditionalGeneration if cfg.merged_attention
             else T5GemmaForConditionalGeneration)
      hf_model = cls.from_pretrained(d, attn_implementation="eager").eval()
    params = jax.device_put(params)  # weights live on the device, as in real use
    no_eos = cfg.replace(eos_id=-1)  # never stop early: both sides decode every token
    for batch in args.batches:
      rng = np.random.default_rng(batch)
      enc = rng.integers(3, cfg.vocab_size, (batch, args.input_length)).astype(np.int32)
      run = lambda: jax.block_until_ready(decoding.generate(
          params, no_eos, enc, max_new_tokens=args.new_tokens))
      start = time.perf_counter()
      run()
      compile_s = time.perf_counter() - start
      ours = timed(run, args.repeats)
      ids = torch.from_numpy(enc).long()

      def theirs():
        with torch.no_grad():
          hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                            do_sample=False, max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, eos_token_id=None,
                            decoder_start_token_id=2, pad_token_id=0)
      theirs()  # warm up
      hf_s = timed(theirs, args.repeats)
      tokens = batch * args.new_tokens
      ratio = hf_s / ours
      worst = min(worst, ratio) if batch == 1 else worst
      print(f"{name:8} {batch:5d} {tokens / ours:11,.0f} {tokens / hf_s:9,.0f} "
            f"{ratio:6.1f}x {compile_s:10.1f}")
    del hf_model
  print(f"batch-1 speed-up over transformers: worst {worst:.1f}x (target >= 5x) "
        f"{'OK' if worst >= 5 else 'BELOW TARGET'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
