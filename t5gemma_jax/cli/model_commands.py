"""`t5gemma show_config` and `t5gemma show_task`: look before you train."""

from __future__ import annotations

import argparse
import dataclasses
import json

from t5gemma_jax import config
from t5gemma_jax.cli import gin_setup


def show_config_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--inputs_length", type=int, default=None,
                 help="example shape for the FLOP comparison (default: TASK_FEATURE_LENGTHS "
                      "when a gin file binds it, else 512)")
  p.add_argument("--targets_length", type=int, default=None, help="(default: ... else 128)")


def _lengths(args: argparse.Namespace) -> tuple[int, int]:
  import gin
  try:
    bound = dict(gin.query_parameter("%TASK_FEATURE_LENGTHS"))
  except (ValueError, TypeError):
    bound = {}
  return (args.inputs_length or int(bound.get("inputs", 512)),
          args.targets_length or int(bound.get("targets", 128)))


def show_config(args: argparse.Namespace) -> int:
  """Prints the bound architecture, the bound run options and the parameter counts as JSON;
  for an encoder-decoder also the decoder-only configs matched to it by parameters and by
  training FLOPs per example (`train.matched`), causal and PrefixLM alike in size."""
  from t5gemma_jax.train import matched
  cfg = gin_setup.model_config()
  run = gin_setup.run_options().check(cfg)
  out = {"config": config.to_dict(cfg), "run_options": dataclasses.asdict(run),
         "parameters": matched.parameter_counts(cfg)}
  if not config.is_decoder_only(cfg):
    s, t = _lengths(args)
    out["matched_decoder_only"] = {"inputs_length": s, "targets_length": t}
    for by in matched.BY:
      try:
        other = matched.matched_decoder_only(cfg, by, s, t)
        out["matched_decoder_only"][f"by_{by}"] = matched.compare(cfg, other, s, t)
      except ValueError as e:
        out["matched_decoder_only"][f"by_{by}"] = {"error": str(e)}
  print(json.dumps(out, indent=2))
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
