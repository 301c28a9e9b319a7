"""`t5gemma show_config` and `t5gemma show_task`: look before you train."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

from t5gemma_jax import config
from t5gemma_jax.cli import gin_setup


def count_params(cfg: config.T5GemmaConfig) -> dict[str, int]:
  """Parameter counts per stack, from shapes alone (nothing is allocated)."""
  import jax
  from t5gemma_jax import model

  shapes = model.abstract_params(cfg, boxed=False)
  return {side: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes[side]))
          for side in ("encoder", "decoder")}


def show_config(args: argparse.Namespace) -> int:
  """Prints the bound architecture, the bound run options and the parameter counts as JSON."""
  del args
  cfg = gin_setup.model_config()
  counts = count_params(cfg)
  counts["total"] = counts["encoder"] + counts["decoder"]
  run = gin_setup.run_options().check(cfg)
  print(json.dumps({"config": dataclasses.asdict(cfg), "run_options": dataclasses.asdict(run),
                    "parameters": counts}, indent=2))
  return 0


def show_task_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--task", required=True, help="task or mixture name, or 'list'")
  p.add_argument("--split", default="train")
  p.add_argument("--n", type=int, default=3, help="examples to print")
  p.add_argument("--inputs_length", type=int, default=512)
  p.add_argument("--targets_length", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stats_examples", type=int, default=200)


def show_task(args: argparse.Namespace) -> int:
  """Prints decoded examples of a task and statistics over its first examples."""
  from t5gemma_jax.data import task_report
  if args.task == "list":
    print("\n".join(task_report.list_tasks()))
    return 0
  lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
  print(task_report.render(args.task, args.split, lengths, args.n, seed=args.seed,
                           stats_examples=args.stats_examples))
  return 0
