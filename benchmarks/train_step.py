"""Train-step throughput and MFU, beside transformers' T5Gemma on the same weights and batch.

  .venv/bin/python benchmarks/train_step.py --preset=s-s --vocab_size=32000 --batch=8 \
      --inputs=256 --targets=64 --steps=5 [--against_hf]

Everything is measured in this run, on this machine: on a CPU the peak is a large float32
`jnp.dot` timed here, on a GPU or TPU the device's dense bf16 peak from `flops.peak_flops`
(e.g. `--dtype=bfloat16 --attention_impl=cudnn --vocab_size=256000` on an H100/H200); our step is the project's jitted train step (AdamW, float32, one device) and
theirs is `T5GemmaForConditionalGeneration` (eager attention, float32) with torch's AdamW on
the same converted weights and the same padded batch. Tokens are non-padding encoder plus
decoder tokens. The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from t5gemma_jax import config, presets, sharding  # noqa: E402
from t5gemma_jax.model import abstract_params  # noqa: E402
from t5gemma_jax.run_options import RunOptions  # noqa: E402
from t5gemma_jax.train import flops, optim, profiling, step as step_lib  # noqa: E402
from t5gemma_jax.train.losses import LossConfig  # noqa: E402


def measured_peak(n: int = 3072, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` float32 [n, n] @ [n, n] products on the first device."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  dot = jax.jit(lambda x, y: x @ y)
  dot(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def make_batch(cfg: config.T5GemmaConfig, batch: int, inputs: int, targets: int,
               seed: int = 0) -> dict[str, np.ndarray]:
  """Rows of random tokens, each padded after a random length in [60%, 100%] of the row."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(3, cfg.vocab_size, (batch, inputs)).astype(np.int32)
  tgt = rng.integers(3, cfg.vocab_size, (batch, targets)).astype(np.int32)
  for row in range(batch):
    enc[row, rng.integers(int(0.6 * inputs), inputs + 1):] = 0
    tgt[row, rng.integers(int(0.6 * targets), targets + 1):] = 0
  dec = np.concatenate([np.full((batch, 1), cfg.bos_id, np.int32), tgt[:, :-1]], axis=1)
  dec[tgt == 0] = 0
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
          "decoder_target_tokens": tgt, "decoder_loss_weights": (tgt > 0).astype(np.int32)}


def real_tokens(b: dict) -> int:
  return int((b["encoder_input_tokens"] > 0).sum() + (b["decoder_input_tokens"] > 0).sum())


def benchmark_optimizer(cfg: config.T5GemmaConfig, run: RunOptions = RunOptions()):
  """AdamW at a constant 1e-3 without clipping or weight decay: the update torch's AdamW
  makes in `hf_step_time`."""
  opt_cfg = optim.OptimizerConfig(name="adamw", clip_grad_norm=None, schedule=optim.ScheduleConfig(
      name="constant", learning_rate=1e-3, warmup_steps=0))
  return optim.make_optimizer(opt_cfg, abstract_params(cfg, run, boxed=False))


def jitted_train_step(cfg: config.T5GemmaConfig, optimizer, run: RunOptions = RunOptions()):
  """Our train step on the first device, jitted with its shardings, not yet compiled.

  Returns:
    (train, abstract state with shardings, shardings, mesh); `train(state, batch, rng)`
    donates the state.
  """
  mesh = sharding.make_mesh(sharding.MeshConfig(ici=(1, 1, 1)), jax.devices()[:1])
  abstract, shardings = step_lib.state_shardings(cfg, optimizer, mesh, run)
  loss = LossConfig(z_loss=0.0)  # the same objective as transformers' cross-entropy
  train, _ = step_lib.jit_steps(step_lib.make_train_step(cfg, optimizer, loss, run=run),
                                step_lib.make_eval_step(cfg, loss, run), shardings, mesh)
  return train, abstract, shardings, mesh


def jax_step_time(cfg, b, steps: int, keep_params: bool = True, profile_dir: str = "",
                  run: RunOptions = RunOptions()) -> tuple[float, float, object]:
  """(seconds per step, compile seconds, the initial params on the host or None) of our train
  step on one device; with `profile_dir`, the timed steps (2 .. steps + 1; step 1 compiles) are
  traced there as training does (`profiling.StepProfiler`: `tensorboard --logdir` it)."""
  optimizer = benchmark_optimizer(cfg, run)
  train, _, shardings, mesh = jitted_train_step(cfg, optimizer, run)
  state, _ = step_lib.init_state(cfg, optimizer, mesh, seed=0, shardings=shardings, run=run)
  params0 = jax.device_get(state.params) if keep_params else None
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  rng = jax.random.PRNGKey(0)
  start = time.perf_counter()
  state, metrics = train(state, batch, rng)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  profiler = profiling.StepProfiler((2, steps) if profile_dir else None, profile_dir,
                                    enabled=True)
  try:
    for number in range(2, steps + 2):
      profiler.begin(number)  # starting the trace is not timed, nor is writing it
      start = time.perf_counter()
      state, metrics = train(state, batch, rng)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
      profiler.end(number, (state, metrics))
  finally:
    profiler.close()
  per_step = float(np.median(times))
  return per_step, max(first - per_step, 0.0), params0


def torch_batch(b: dict, device="cpu") -> dict:
  """transformers' keyword arguments for one of `make_batch`'s batches on `device` (labels
  -100 on padding, both attention masks passed)."""
  import torch
  enc = torch.from_numpy(b["encoder_input_tokens"]).long().to(device)
  dec = torch.from_numpy(b["decoder_input_tokens"]).long().to(device)
  labels = torch.from_numpy(b["decoder_target_tokens"]).long().to(device)
  labels[labels == 0] = -100
  return dict(input_ids=enc, attention_mask=(enc != 0).long(), decoder_input_ids=dec,
              decoder_attention_mask=(dec != 0).long(), labels=labels)


def torch_step_function(model, kwargs: dict, fused: bool = False):
  """One AdamW train step of a transformers model on fixed inputs, blocking until done.

  Args:
    model: a transformers model in train mode.
    kwargs: its inputs (`torch_batch`).
    fused: torch's fused CUDA AdamW (GPU only).

  Returns:
    step() -> the loss as a float (reading it waits for the step).
  """
  import torch
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0,
                          **({"fused": True} if fused else {}))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(**kwargs).loss
    loss.backward()
    opt.step()
    return float(loss.detach())  # a device sync: the step is done when this returns

  return step


def hf_step_time(cfg, params, b, steps: int, threads: int) -> float:
  """Seconds per step of transformers' T5Gemma + torch AdamW on the same weights and batch."""
  import torch
  import transformers
  from t5gemma_jax.convert import hf
  torch.set_num_threads(threads)
  with tempfile.TemporaryDirectory() as d:
    hf.save(params, cfg, os.path.join(d, "m"))
    model = transformers.T5GemmaForConditionalGeneration.from_pretrained(
        os.path.join(d, "m"), dtype=torch.float32, attn_implementation="eager")
  model.train()
  step = torch_step_function(model, torch_batch(b))
  step()  # warm-up: allocator, lazy init
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def run_options(args) -> RunOptions:
  return RunOptions(scan_layers=args.scan, remat_policy=args.remat, dtype=args.dtype,
                    attention_impl=args.attention_impl)


def model_config(args) -> config.T5GemmaConfig:
  cfg = presets.preset(args.preset)
  if args.attention_impl == "cudnn":  # cuDNN has no logit softcap (T5Gemma 2-style blocks)
    cfg = cfg.replace(encoder=dataclasses.replace(cfg.encoder, attn_logit_softcapping=None),
                      decoder=dataclasses.replace(cfg.decoder, attn_logit_softcapping=None))
  if args.vocab_size:
    cfg = cfg.replace(encoder=dataclasses.replace(cfg.encoder, vocab_size=args.vocab_size),
                      decoder=dataclasses.replace(cfg.decoder, vocab_size=args.vocab_size))
  return cfg


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="s-s")
  parser.add_argument("--vocab_size", type=int, default=32000)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs", type=int, default=256)
  parser.add_argument("--targets", type=int, default=64)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--scan", action="store_true", help="scan_layers=True")
  parser.add_argument("--remat", default="none", help="remat_policy")
  parser.add_argument("--dtype", default="float32", help="activation dtype")
  parser.add_argument("--attention_impl", default="xla", help="xla, cudnn or splash")
  parser.add_argument("--against_hf", action="store_true")
  parser.add_argument("--threads", type=int, default=2, help="torch threads")
  parser.add_argument("--profile", default="", help="write a jax.profiler trace of our steps "
                      "to this folder")
  args = parser.parse_args(argv)

  cfg = model_config(args)
  b = make_batch(cfg, args.batch, args.inputs, args.targets)
  tokens = real_tokens(b)
  table = flops.peak_flops()  # None on CPUs
  peak = table if table is not None else measured_peak()
  per_step, compile_s, params = jax_step_time(cfg, b, args.steps, keep_params=args.against_hf,
                                              profile_dir=args.profile, run=run_options(args))
  step_flops = flops.training_flops_per_step(cfg, args.batch, args.inputs, args.targets)
  out = {"preset": args.preset, "vocab_size": cfg.vocab_size, "batch": args.batch,
         "inputs": args.inputs, "targets": args.targets, "scan": args.scan,
         "dtype": args.dtype, "attention_impl": args.attention_impl,
         "peak_source": "bf16 table" if table is not None else "measured float32 jnp.dot",
         "device": jax.devices()[0].device_kind, "non_padding_tokens": tokens,
         "jax_step_s": per_step, "jax_compile_s": compile_s,
         "jax_tokens_per_s": tokens / per_step, "model_gflop_per_step": step_flops / 1e9,
         "peak_gflops": peak / 1e9, "mfu": step_flops / per_step / peak}
  print(f"{args.preset} (vocab {cfg.vocab_size}), batch {args.batch}, {args.inputs}/"
        f"{args.targets}, {tokens} non-padding tokens, {out['device']}")
  print(f"peak ({out['peak_source']}): {peak / 1e9:8.1f} GFLOP/s")
  print(f"ours:  {per_step * 1e3:8.1f} ms/step  {out['jax_tokens_per_s']:10,.0f} tokens/s  "
        f"MFU {out['mfu']:.1%}  (compile {compile_s:.1f} s)")
  if args.against_hf:
    hf_s = hf_step_time(cfg, params, b, args.steps, args.threads)
    out.update(hf_step_s=hf_s, hf_tokens_per_s=tokens / hf_s, ratio=hf_s / per_step)
    print(f"transformers: {hf_s * 1e3:8.1f} ms/step  {out['hf_tokens_per_s']:10,.0f} tokens/s")
    print(f"ratio: {out['ratio']:.2f}x")
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
