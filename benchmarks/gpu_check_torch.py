"""The PyTorch side of `gpu_check.py`: the same models in transformers, bf16 on the same
device, for the side-by-side ratios: a matmul peak, train steps (torch's AdamW, the same
batches) and greedy `generate`, each a task of a worker process.

Models are built at random from the transformers config that `config_to_hf` writes for our
config (T5Gemma 2's placeholder vision tower is tiny and unused). Attention: SDPA where
transformers allows it (T5Gemma 2); T5Gemma 1 declares no SDPA support, since SDPA cannot
softcap, so it runs "eager" (transformers' default for it). torch and transformers are
imported inside the functions: the orchestrator imports this module without them.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time

import numpy as np

from benchmarks import decode_vs_transformers, gpu_check_common as common, train_step
from t5gemma_jax.convert import hf_config


def _device() -> str:
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def _reset_peak(device: str) -> None:
  import torch
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()


def _peak(device: str):
  import torch
  return torch.cuda.max_memory_allocated() if device == "cuda" else None


def _free(device: str) -> None:
  import torch
  gc.collect()
  if device == "cuda":
    torch.cuda.empty_cache()


def hf_model(cfg, device: str):
  """A random bf16 transformers model of our `cfg`, built on `device`.

  Returns:
    (model, attention implementation name).
  """
  import torch
  import transformers
  transformers.logging.set_verbosity_error()
  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, hf_config.CONFIG_NAME), "w") as f:
      json.dump(hf_config.config_to_hf(cfg, "bfloat16"), f)
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp)
  impl = "sdpa" if cfg.merged_attention else "eager"
  with torch.device(device):
    net = transformers.AutoModelForSeq2SeqLM.from_config(hf_cfg, attn_implementation=impl,
                                                         dtype=torch.bfloat16)
  return net, impl


def peak(task: dict, spec: dict, record) -> dict:
  """torch's n^3 bf16 matmul rate on the device (the same loop as the JAX side's)."""
  import torch
  device, n = _device(), task["n"]
  a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
  b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
  for _ in range(3):
    a @ b
  reps = 20 if n >= 4096 else 5
  if device == "cuda":
    torch.cuda.synchronize()
  start = time.perf_counter()
  for _ in range(reps):
    a @ b
  if device == "cuda":
    torch.cuda.synchronize()
  seconds = (time.perf_counter() - start) / reps
  return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
          "torch_version": torch.__version__, "matmul_tflops": 2 * n**3 / seconds / 1e12}


def train(task: dict, spec: dict, record) -> dict:
  """transformers + torch AdamW train steps on our batch (the XLA run's batch, halved on
  out-of-memory), bf16."""
  import transformers
  device, deadline = _device(), task["deadline"]
  cfg = common.model_config(task["preset"])
  start = time.perf_counter()
  net, impl = hf_model(cfg, device)
  net.train()
  record(build_s=time.perf_counter() - start, attn_implementation=impl,
         transformers_version=transformers.__version__)
  candidates = list(task["candidates"])
  if task.get("batch"):
    candidates = [c for c in candidates if c <= task["batch"]] or [task["batch"]]
  tried = []
  for batch in candidates:
    host = train_step.make_batch(cfg, batch, task["inputs"], task["targets"])
    step = train_step.torch_step_function(net, train_step.torch_batch(host, device),
                                          fused=device == "cuda")
    _reset_peak(device)
    try:
      warm_s, _ = common.timed_median(step, 1)
    except Exception as e:  # noqa: BLE001
      if not common.is_oom(e):
        raise
    else:
      break
    # Out of the except block, so its traceback no longer holds the step's tensors.
    tried.append(batch)
    net.zero_grad(set_to_none=True)
    del step
    _free(device)
  else:
    return {"status": "error", "error": f"out of memory at every batch {tried}"}
  steps = common.repeats_that_fit(deadline, warm_s, task["steps"])
  step_s = common.timed_median(step, steps)[0] if steps else warm_s
  tokens = train_step.real_tokens(host)
  out = {"batch": batch, "out_of_memory_at": tried, "warm_step_s": warm_s, "step_s": step_s,
         "steps_timed": steps, "non_padding_tokens": tokens, "tokens_per_s": tokens / step_s,
         "peak_bytes": _peak(device), "params": sum(p.numel() for p in net.parameters()),
         "note": "" if steps else "timed on the warm-up step only (time budget)"}
  del net, step
  _free(device)
  return out


def decode(task: dict, spec: dict, record) -> dict:
  """transformers' greedy `generate` on the same rows as the JAX side's, per batch size."""
  device, deadline = _device(), task["deadline"]
  cfg = common.model_config(task["preset"])
  net, impl = hf_model(cfg, device)
  net.eval()
  new, length = task["new_tokens"], task["inputs"]
  rows = {}
  for batch in task["batches"]:
    if time.time() > deadline - 5:
      rows[str(batch)] = {"status": "skipped", "note": "time budget"}
      continue
    enc = np.random.default_rng(batch).integers(
        3, cfg.vocab_size - 1, (batch, length)).astype(np.int32)
    run = decode_vs_transformers.hf_generate_function(net, enc, new, device)
    _reset_peak(device)
    warm_s, _ = common.timed_median(run, 1)
    repeats = common.repeats_that_fit(deadline, warm_s, task["repeats"])
    seconds = common.timed_median(run, repeats)[0] if repeats else warm_s
    rows[str(batch)] = {"status": "ok", "seconds": seconds, "repeats": repeats,
                        "tokens_per_s": batch * new / seconds, "peak_bytes": _peak(device)}
    record(batches=rows, attn_implementation=impl)
  del net
  _free(device)
  return {"preset": task["preset"], "attn_implementation": impl, "batches": rows,
          **common.rows_status(rows)}


HANDLERS = {"peak": peak, "train": train, "decode": decode}


def main(spec: dict) -> int:
  """Runs a PyTorch worker's tasks (see `gpu_check_common.run_tasks`)."""
  return common.run_tasks(spec, HANDLERS)
