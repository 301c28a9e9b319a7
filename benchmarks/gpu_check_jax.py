"""The JAX side of `gpu_check.py`: the matmul peak, our bf16 train step (largest batch that
fits, compile time, step time, memory) and our greedy decoding, each a task of a worker
process (see `gpu_check_common.run_tasks`).

The train step is the project's own (`benchmarks/train_step.py`'s `jitted_train_step`: AdamW,
one device), compiled with `lower(...).compile()` so compile time is measured apart from
execution and `memory_analysis()` says whether a batch fits before it runs. Decoding is
`decoding.generate_function` (what `decoding.generate` jits), compiled the same way.
"""

from __future__ import annotations

import gc
import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import decode_vs_transformers, gpu_check_common as common, train_step
from t5gemma_jax import decoding, model
from t5gemma_jax.train import flops, step as step_lib

# Ask for a batch only when XLA's estimate of its memory is below this share of the
# allocator's limit (fragmentation and the allocator's own blocks take the rest).
FIT = 0.92


def _device():
  return jax.devices()[0]


def memory_stats() -> dict:
  """The first device's allocator statistics ({} where the backend keeps none, e.g. CPU)."""
  return _device().memory_stats() or {}


def compiled_memory(compiled) -> dict:
  """Bytes a compiled program needs: its arguments, outputs, temporaries, and the total with
  donated (aliased) buffers counted once."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
         "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def next_batch(candidates, probed: int, memory: dict, limit: Optional[int]) -> Optional[int]:
  """The largest candidate below `probed` that XLA's estimate says fits.

  Temporaries (activations) scale with the batch; arguments and outputs (the state) do not.

  Args:
    candidates: batch sizes, largest first.
    probed: the batch whose program was compiled.
    memory: its `compiled_memory`.
    limit: the allocator's byte limit (None: no estimate; the next smaller candidate).

  Returns:
    A smaller candidate, or None when `probed` is already the smallest.
  """
  smaller = [c for c in candidates if c < probed]
  if not smaller:
    return None
  if not limit or not memory:
    return smaller[0]
  fixed = memory["total"] - memory["temp"]
  per_row = memory["temp"] / probed
  fitting = [c for c in smaller if fixed + per_row * c <= FIT * limit]
  return fitting[0] if fitting else smaller[-1]


def peak(task: dict, spec: dict, record) -> dict:
  """Matmul peak (a loop of n^3 bf16 products) and copy bandwidth of the first device."""
  n = task["n"]
  device = _device()
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
  dot = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
  for _ in range(3):
    dot(a, b).block_until_ready()
  reps = 20 if n >= 4096 else 5
  start = time.perf_counter()
  for _ in range(reps):
    c = dot(a, b)
  c.block_until_ready()
  matmul_s = (time.perf_counter() - start) / reps
  x = jnp.ones((2**30 if n >= 4096 else 2**20,), jnp.bfloat16)  # 2 GiB on a GPU
  double = jax.jit(lambda v: v * 2).lower(x).compile()
  double(x).block_until_ready()
  copy_s, _ = common.timed_median(lambda: double(x).block_until_ready(), 5)
  return {"device": device.device_kind, "platform": device.platform,
          "jax_version": jax.__version__, "bytes_limit": memory_stats().get("bytes_limit"),
          "matmul_n": n, "matmul_tflops": 2 * n**3 / matmul_s / 1e12,
          "copy_tb_s": 2 * x.nbytes / copy_s / 1e12}


def _abstract_batch(b: dict) -> dict:
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.items()}


def train(task: dict, spec: dict, record) -> dict:
  """Our bf16 train step on `task["preset"]` with `task["impl"]` attention at the largest
  candidate batch that fits (or at `task["batch"]`, the XLA run's, when given)."""
  preset, impl, deadline = task["preset"], task["impl"], task["deadline"]
  inputs, targets, candidates = task["inputs"], task["targets"], list(task["candidates"])
  if impl == "cudnn" and _device().platform != "gpu":
    return {"status": "n/a", "note": "cuDNN attention needs an NVIDIA GPU"}
  if task.get("batch"):  # side by side with the XLA run: its batch first
    candidates = [c for c in candidates if c <= task["batch"]] or [task["batch"]]
  cfg, run = common.model_config(preset), common.run_options(impl)
  optimizer = train_step.benchmark_optimizer(cfg, run)
  train_fn, abstract, shardings, mesh = train_step.jitted_train_step(cfg, optimizer, run)
  limit = memory_stats().get("bytes_limit")
  rng = jax.random.PRNGKey(0)
  rng_abstract = jax.ShapeDtypeStruct(rng.shape, rng.dtype)
  search, state, batch = [], None, candidates[0]
  record(inputs=inputs, targets=targets, impl=impl, preset=preset, search=search)
  while True:
    host = train_step.make_batch(cfg, batch, inputs, targets)
    start = time.perf_counter()
    compiled = train_fn.lower(abstract, _abstract_batch(host), rng_abstract).compile()
    entry = {"batch": batch, "compile_s": time.perf_counter() - start,
             "memory": compiled_memory(compiled)}
    search.append(entry)
    record(search=search)
    smaller = next_batch(candidates, batch, entry["memory"], limit)
    if limit and entry["memory"] and entry["memory"]["total"] > FIT * limit:
      entry["outcome"] = "estimate over the memory limit"
    else:
      if state is None:
        state, _ = step_lib.init_state(cfg, optimizer, mesh, seed=0, shardings=shardings,
                                       run=run)
      device_batch = jax.device_put(host)
      try:
        start = time.perf_counter()
        state, metrics = compiled(state, device_batch, rng)
        first_loss = float(metrics["loss"])  # waits for the step
        warm_s = time.perf_counter() - start
      except Exception as e:  # noqa: BLE001
        if not common.is_oom(e):
          raise
        entry["outcome"] = "out of memory"
      else:
        entry["outcome"] = "ran"
        break
      # Out of the except block, so its traceback no longer holds the buffers: the donated
      # state may be gone, and is rebuilt for the next try.
      state = device_batch = None
      gc.collect()
    if smaller is None:
      return {"status": "error", "error": f"no candidate batch fits: {candidates}"}
    if time.time() + 1.2 * entry["compile_s"] > deadline:
      # The runs side by side with this one (fused kernel, torch) can still take this batch.
      return {"status": "skipped", "batch_predicted": smaller,
              "note": f"batch {batch} does not fit and there is no time to compile a smaller "
              "one"}
    batch = smaller
  record(batch=batch, compile_s=entry["compile_s"], warm_step_s=warm_s, memory=entry["memory"])
  steps = common.repeats_that_fit(deadline, warm_s, task["steps"])
  times, loss = [warm_s], first_loss
  if steps:
    def one():
      nonlocal state, loss
      state, metrics = compiled(state, device_batch, rng)
      loss = float(metrics["loss"])
    _, times = common.timed_median(one, steps)
  step_s = float(np.median(times))
  tokens = train_step.real_tokens(host)
  model_flops = flops.training_flops_per_step(cfg, batch, inputs, targets)
  tflops = model_flops / step_s / 1e12
  stats = memory_stats()
  if any(e.get("outcome") == "out of memory" for e in search):
    record(peak_note="peak_bytes_in_use includes a larger batch's failed try")
  return {"step_s": step_s, "steps_timed": steps,
          "note": "" if steps else "timed on the warm-up step only (time budget)",
          "non_padding_tokens": tokens, "tokens_per_s": tokens / step_s,
          "model_tflop_per_step": model_flops / 1e12,
          "executed_tflop_per_step": flops.executed_flops_per_step(
              cfg, batch, inputs, targets) / 1e12,
          "tflops": tflops, "mfu_datasheet": tflops / common.DATASHEET_BF16_TFLOPS,
          "mfu_measured": tflops / spec["matmul_tflops"] if spec.get("matmul_tflops") else None,
          "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "bytes_limit": limit,
          "loss_first": first_loss, "loss_last": loss, "device": _device().device_kind}


_PARAMS: dict = {}


def _params(cfg):
  """Random bf16 params of `cfg` made on the device, kept while one preset decodes."""
  key = (cfg.encoder, cfg.decoder)
  if key not in _PARAMS:
    _PARAMS.clear()
    gc.collect()
    init = jax.jit(lambda r: nn.meta.unbox(model.init_params(cfg, r, common.run_options())))
    _PARAMS[key] = jax.block_until_ready(init(jax.random.PRNGKey(0)))
  return _PARAMS[key]


def decode(task: dict, spec: dict, record) -> dict:
  """Our greedy decoding of `task["new_tokens"]` tokens (EOS forbidden until then) after
  `task["inputs"]` input tokens, per batch size, beside the HBM-bandwidth bound."""
  preset, deadline = task["preset"], task["deadline"]
  cfg = common.model_config(preset)
  params = _params(cfg)
  new, length = task["new_tokens"], task["inputs"]
  fn = jax.jit(decoding.generate_function(cfg, "greedy", new, min_new_tokens=new,
                                          run=common.run_options()))
  rng = jax.random.PRNGKey(0)
  rows = {}
  for batch in task["batches"]:
    if time.time() > deadline - 5:
      rows[str(batch)] = {"status": "skipped", "note": "time budget"}
      continue
    enc = jnp.asarray(np.random.default_rng(batch).integers(
        3, cfg.vocab_size - 1, (batch, length)).astype(np.int32))
    start = time.perf_counter()
    compiled = fn.lower(params, enc, rng).compile()
    compile_s = time.perf_counter() - start
    run = lambda: jax.block_until_ready(compiled(params, enc, rng))  # noqa: E731
    warm_s, _ = common.timed_median(run, 1)
    repeats = common.repeats_that_fit(deadline, warm_s, task["repeats"])
    seconds = common.timed_median(run, repeats)[0] if repeats else warm_s
    cost = decode_vs_transformers.step_cost(params, cfg, batch, length, new,
                                            common.run_options())
    hbm_step_s = cost["bytes"] / (common.DATASHEET_HBM_TB_S * 1e12)
    row = {"status": "ok", "compile_s": compile_s, "seconds": seconds, "repeats": repeats,
           "tokens_per_s": batch * new / seconds, "bytes_per_step": cost["bytes"],
           "flops_per_step": cost["flops"], "hbm_bound_tokens_per_s": batch / hbm_step_s,
           "peak_bytes_in_use": memory_stats().get("peak_bytes_in_use")}
    if spec.get("copy_tb_s"):
      row["copy_bound_tokens_per_s"] = batch / (cost["bytes"] / (spec["copy_tb_s"] * 1e12))
    if spec.get("matmul_tflops"):
      row["flop_bound_tokens_per_s"] = batch / (cost["flops"] / (spec["matmul_tflops"] * 1e12))
    rows[str(batch)] = row
    record(batches=rows)
  return {"preset": preset, "inputs": length, "new_tokens": new, "batches": rows,
          **common.rows_status(rows)}


HANDLERS = {"peak": peak, "train": train, "decode": decode}


def main(spec: dict) -> int:
  """Runs a JAX worker's tasks (see `gpu_check_common.run_tasks`)."""
  return common.run_tasks(spec, HANDLERS)
