"""Greedy decoding tokens/s against the memory-bandwidth limit and beside transformers'
generate, on the same random weights, in one run.

  .venv/bin/python benchmarks/decode_vs_transformers.py            # s-s at 256k and 32k vocab
  .venv/bin/python benchmarks/decode_vs_transformers.py --models tiny2 270m-270m --batches 1
  .venv/bin/python benchmarks/decode_vs_transformers.py --bf16      # opt-in bf16 weights too
  .venv/bin/python benchmarks/decode_vs_transformers.py --models --compile_depths 2 24

The limit: a decoding step reads every weight it uses (the decoder's layers, its norms and the
output table; T5Gemma 2 the encoder's shared table) and the whole decode cache (every ring
slot and the encoder keys/values: masked slots are read too). Bytes per step over the
bandwidth that a large float32 matvec reaches in this same run gives the fastest a step can
be ("mem"); at larger batches the step's FLOPs (2 per weight per row, plus attention over the
cache) over a large matmul's FLOP/s in this run may bound it instead ("flop"). tokens/s
limit = batch / the slower of the two. "xla lim" is the same limit with the decoder layers'
weights read at the speed XLA's CPU backend reaches on small matrix-vector products (a chain of
2 MB matvecs, measured in this run: it runs them on one thread); the output table and the
cache at the full bandwidth. Ours is the whole `generate` call (encoder, first
step and the loop), each row decoding exactly `--new_tokens` (EOS forbidden until then, on
both sides: `min_new_tokens`). `--compile_depths` compiles decoding for decoders of those
depths (scanned) and prints the compile-time ratio, which should stay near 1.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from t5gemma_jax import config, decoding, model, presets  # noqa: E402
from t5gemma_jax.model import layout  # noqa: E402
from t5gemma_jax.run_options import RunOptions  # noqa: E402


def model_config(name: str) -> config.T5GemmaConfig:
  """A preset, or "PRESET@VOCAB" for the same stacks with a smaller vocabulary."""
  preset, _, vocab = name.partition("@")
  cfg = presets.preset(preset)
  if vocab:
    size = int(vocab.lower().replace("k", "000"))
    cfg = cfg.replace(encoder=dataclasses.replace(cfg.encoder, vocab_size=size),
                      decoder=dataclasses.replace(cfg.decoder, vocab_size=size),
                      eoi_id=None if cfg.eoi_id is None else size - 1)
  return cfg


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


def nbytes(tree) -> int:
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def bandwidth_gbs(repeats: int = 20) -> float:
  """GB/s of a jitted float32 matvec over a 256 MiB matrix (best of `repeats`)."""
  a = jnp.ones((8192, 8192), jnp.float32)
  x = jnp.ones((8192,), jnp.float32)
  f = jax.jit(lambda a, x: a @ x)
  jax.block_until_ready(f(a, x))
  best = min(timed(lambda: jax.block_until_ready(f(a, x)), 1) for _ in range(repeats))
  return a.nbytes / best / 1e9


def chain_gbs(count: int = 128) -> float:
  """GB/s of `count` dependent [1, 512] x [512, 1024] float32 matvecs (2 MB weights each,
  the shape of a decoder layer's): what XLA reaches on small products, which it runs on
  one thread (1.0x on one core vs 1.7x for the large matvec, measured here)."""
  rng = np.random.default_rng(0)
  weights = [jnp.asarray(rng.normal(0, 0.04, (512, 1024)).astype(np.float32))
             for _ in range(count)]

  def chain(weights, x):
    for w in weights:
      x = jnp.tanh(x @ w)[:, :512]
    return x
  f = jax.jit(chain)
  x = jnp.ones((1, 512), jnp.float32)
  jax.block_until_ready(f(weights, x))
  best = min(timed(lambda: jax.block_until_ready(f(weights, x)), 1) for _ in range(5))
  return count * 512 * 1024 * 4 / best / 1e9


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """GFLOP/s of a jitted float32 n x n matmul (best of `repeats`)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  best = min(timed(lambda: jax.block_until_ready(f(a)), 1) for _ in range(repeats))
  return 2 * n ** 3 / best / 1e9


def step_cost(params, cfg, batch: int, input_length: int, new_tokens: int,
              run: RunOptions = RunOptions()) -> dict:
  """Bytes and FLOPs of one decoding step: it reads the weights it uses and the whole decode
  cache; it multiplies each weight once per row and each cached key/value once per query
  head that reads it. {"bytes", "flops", "large_bytes": the output table and the cache}."""
  used = [params["decoder"]]
  if cfg.shared_embedding:
    used.append(params["encoder"]["embedder"])
  if cfg.share_blocks:
    used.append(layout.layer_params(params["encoder"]))
  weights = sum(nbytes(tree) for tree in used)
  elements = sum(x.size for tree in used for x in jax.tree_util.tree_leaves(tree))
  net = model.T5Gemma(cfg, layout.options_for(params, run))

  def start(params):
    tokens = jnp.ones((batch, input_length), jnp.int32)  # every row full: segment ids 1
    encoded = net.apply({"params": params}, tokens, method=net.encode)
    bos = jnp.full((batch, 1), cfg.bos_id, jnp.int32)
    return net.apply({"params": params}, encoded, jnp.ones_like(tokens), bos, new_tokens,
                     method=net.start_decode)[1]
  cache = jax.eval_shape(start, params)
  cached = sum(x.size for x in jax.tree_util.tree_leaves(cache) if x.ndim > 2)
  group = cfg.decoder.num_heads // cfg.decoder.num_kv_heads
  table = (params["encoder"] if cfg.shared_embedding else params["decoder"])["embedder"]
  return {"bytes": weights + nbytes(cache), "large_bytes": nbytes(table) + nbytes(cache),
          "flops": 2.0 * (batch * elements + group * cached)}


def hf_model_for(params, cfg):
  from transformers import T5Gemma2ForConditionalGeneration, T5GemmaForConditionalGeneration
  from t5gemma_jax.convert import hf
  with tempfile.TemporaryDirectory() as d:
    hf.save(params, cfg, d)
    cls = (T5Gemma2ForConditionalGeneration if cfg.merged_attention
           else T5GemmaForConditionalGeneration)
    return cls.from_pretrained(d, attn_implementation="eager").eval()


def hf_generate_function(hf_model, enc, new_tokens, device="cpu"):
  """run() -> None: transformers' greedy `generate` of exactly `new_tokens` per row of `enc`
  (EOS forbidden until then, as ours), the model and inputs on `device`; returns when done."""
  import torch
  ids = torch.from_numpy(enc).long().to(device)

  def run():
    with torch.no_grad():
      hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                        max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        decoder_start_token_id=2, eos_token_id=1, pad_token_id=0)
    if device != "cpu":
      torch.cuda.synchronize()
  return run


def hf_seconds(hf_model, enc, new_tokens, repeats, device="cpu"):
  """Median seconds of `hf_generate_function`'s run after one warm-up run."""
  run = hf_generate_function(hf_model, enc, new_tokens, device)
  run()  # warm up
  return timed(run, repeats)


def decode_rows(name, params, cfg, args, speeds, hf_model, label="", run=RunOptions()):
  for batch in args.batches:
    enc = np.random.default_rng(batch).integers(
        3, cfg.vocab_size - 1, (batch, args.input_length)).astype(np.int32)
    run = lambda: jax.block_until_ready(decoding.generate(
        params, cfg, enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
        run=run))
    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
    ours = timed(run, args.repeats)
    tokens = batch * args.new_tokens
    gbs, gflops, small = speeds
    cost = step_cost(params, cfg, batch, args.input_length, args.new_tokens, run)
    mem_s, flop_s = cost["bytes"] / (gbs * 1e9), cost["flops"] / (gflops * 1e9)
    limit, bound = batch / max(mem_s, flop_s), "mem" if mem_s >= flop_s else "flop"
    xla_s = (cost["bytes"] - cost["large_bytes"]) / (small * 1e9) + cost["large_bytes"] / (
        gbs * 1e9)
    xla_limit = batch / max(xla_s, flop_s)
    hf_text, ratio_text = "-", "-"
    if hf_model is not None:
      hf_s = hf_seconds(hf_model, enc, args.new_tokens, args.repeats)
      hf_text, ratio_text = f"{tokens / hf_s:,.0f}", f"{hf_s / ours:.1f}x"
    print(f"{name + label:16} {batch:5d} {tokens / ours:10,.0f} {limit:10,.0f} {bound:>5} "
          f"{100 * tokens / ours / limit:6.0f}% {100 * tokens / ours / xla_limit:7.0f}% "
          f"{hf_text:>9} {ratio_text:>7} {compile_s:8.1f}", flush=True)


def compile_seconds(depth: int, new_tokens: int, input_length: int) -> float:
  """Compile time of greedy decoding for a tiny-width decoder of `depth` layers, scanned."""
  base, run = presets.preset("tiny"), RunOptions(scan_layers=True)
  cfg = base.replace(decoder=dataclasses.replace(base.decoder, num_layers=depth,
                                                 layer_types=None))
  params = model.abstract_params(cfg, run, boxed=False)
  fn = jax.jit(decoding.generate_function(cfg, "greedy", new_tokens, run=run))
  tokens = jax.ShapeDtypeStruct((1, input_length), jnp.int32)
  start = time.perf_counter()
  fn.lower(params, tokens, jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
  return time.perf_counter() - start


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="*", default=["s-s", "s-s@32k"],
                      help="presets, or PRESET@VOCAB (e.g. s-s@32k) for a smaller vocabulary")
  parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
  parser.add_argument("--input_length", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no_hf", action="store_true", help="skip transformers")
  parser.add_argument("--bf16", action="store_true",
                      help="also decode with bfloat16 weights and activations (other numerics)")
  parser.add_argument("--compile_depths", nargs="*", type=int, default=[2, 24])
  args = parser.parse_args()
  gbs, gflops, small = bandwidth_gbs(), matmul_gflops(), chain_gbs()
  print(f"{jax.device_count()} {jax.devices()[0].platform} device(s); float32 matvec "
        f"bandwidth {gbs:.1f} GB/s (a chain of 2 MB matvecs: {small:.1f} GB/s), matmul "
        f"{gflops:.0f} GFLOP/s; greedy, {args.input_length} input tokens, {args.new_tokens} "
        "new tokens")
  if args.models:
    print(f"{'model':16} {'batch':>5} {'ours tok/s':>10} {'limit':>10} {'bound':>5} "
          f"{'of lim':>7} {'xla lim':>8} {'hf tok/s':>9} {'hf/ours':>7} {'compile':>8}")
  for name in args.models:
    cfg = model_config(name)
    params = random_params(cfg)
    hf_model = None
    if not args.no_hf:
      import torch
      torch.set_num_threads(os.cpu_count() or 1)
      hf_model = hf_model_for(params, cfg)
    params = jax.device_put(params)  # weights live on the device, as in real use
    decode_rows(name, params, cfg, args, (gbs, gflops, small), hf_model)
    del hf_model
    if args.bf16:
      half = RunOptions(dtype="bfloat16", param_dtype="bfloat16")
      decode_rows(name, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params),
                  cfg, args, (gbs, gflops, small), None, label=" bf16", run=half)
  if args.compile_depths:
    times = {d: compile_seconds(d, args.new_tokens, args.input_length)
             for d in args.compile_depths}
    lo, hi = min(args.compile_depths), max(args.compile_depths)
    print("decode compile time (scanned tiny-width decoder): " +
          ", ".join(f"{d} layers {s:.1f} s" for d, s in times.items()) +
          f"; {hi} vs {lo} layers {times[hi] / times[lo]:.2f}x (target <= 1.5x)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
