"""`t5gemma train`, `infer`, `eval` and `compile`: the commands that run a gin-described job."""

from __future__ import annotations

import argparse
import os

import gin

from t5gemma_jax import run_files
from t5gemma_jax.cli import compile_command, gin_setup


def train(args: argparse.Namespace) -> int:
  """Trains (or resumes) the run described by gin; prints a summary at the end."""
  del args
  from t5gemma_jax.train import loop
  summary = loop.run(gin_setup.train_config(), extra_files={run_files.TRAIN_GIN: gin.config_str()})
  print(summary_text(summary))
  return 0


def summary_text(s: dict) -> str:
  """The end-of-run summary of `loop.run` as lines for a terminal."""
  def num(key, fmt):
    return format(s[key], fmt) if s.get(key) is not None else "n/a"
  lines = [
      f"run {s['start']}: steps {s['first_step']} -> {s['last_step']}"
      + (" (stopped by SIGTERM, checkpoint saved)" if s.get("preempted") else ""),
      f"final train loss {num('train_loss', '.4f')}, validation loss "
      f"{num('validation_loss', '.4f')}, {num('tokens_per_s', ',.0f')} non-padding tokens/s",
      f"first step after {num('seconds_to_first_step', '.1f')} s (compilation cache: "
      f"{s.get('compilation_cache') or 'off'})",
      f"checkpoints: {s['checkpoints']}",
      f"metrics:     {s['metrics']}",
      f"tensorboard: tensorboard --logdir {s['tensorboard']}",
  ]
  if s.get("profile"):
    lines.append(f"profile:     {s['profile']} (TensorBoard's Profile tab)")
  scored = s.get("metrics_by_task", {})
  baseline = _baselines(scored, s.get("eval_split", "validation"), s.get("eval_examples"))
  for task, values in sorted(scored.items()):
    lines.append(f"{task}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(values.items())))
    lines += _settings_lines(task)
    if task in baseline:
      lines.append(baseline[task])
  for task, records in sorted(s.get("examples", {}).items()):
    lines.append(f"examples from {task} (validation):")
    for r in records:
      lines += [f"  input:      {r['input'][:100]}", f"  prediction: {r['prediction'][:100]}",
                f"  reference:  {r.get('target', '')[:100]}"]
  return "\n".join(lines)


def _settings_lines(task: str) -> list[str]:
  """One line per metric setting of `task` (sacreBLEU signatures, ROUGE options), so a number
  in the summary says how it was computed."""
  from t5gemma_jax import evaluation
  return [f"  {name}: {text}" for name, text in sorted(evaluation.metric_settings(task).items())]


def _baselines(scored: dict, split: str, num_examples) -> dict[str, str]:
  """{task: a line with what no training scores on the same examples} for the built-in tasks
  among `scored`."""
  if not scored:
    return {}
  from t5gemma_jax import baselines
  out = {}
  for task in sorted(set(scored) & set(baselines.supervised_tasks())):
    values = baselines.score(task, split, num_examples=num_examples)
    shown = ", ".join(f"{k} {values[k]:.2f}" for k in sorted(scored[task]) if k in values)
    out[task] = (f"  baseline ({baselines.baseline_name(task)}, the same "
                 f"{int(values['examples'])} examples): {shown}")
  return out


def compile_run(args: argparse.Namespace) -> int:
  """Compiles the run described by gin for a TPU topology (no TPU needed)."""
  return compile_command.run(args, gin_setup.train_config())


def infer(args: argparse.Namespace) -> int:
  """Decodes a task split or a text file with a run's checkpoint into JSONL."""
  del args
  import jax
  from t5gemma_jax import compile_cache, inference
  compile_cache.enable()
  cfg = gin_setup.infer_config()
  n = inference.infer(cfg)
  if jax.process_index() == 0:  # it wrote the file; the others only decoded their share
    print(f"wrote {n} predictions to {cfg.output}")
  return 0


def evaluate(args: argparse.Namespace) -> int:
  """Metrics (BLEU, ROUGE, ...) of a run's checkpoint on a task split."""
  del args
  import jax
  from t5gemma_jax import compile_cache, evaluation
  compile_cache.enable()
  cfg = gin_setup.eval_config()
  results = evaluation.run_eval(cfg)
  if jax.process_index() != 0:  # same results on every process; one report, by the writer
    return 0
  for task, values in results.items():
    print(task + ": " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(values.items())))
  print(f"appended to {os.path.join(cfg.model_dir, 'eval_results.jsonl')}")
  return 0
