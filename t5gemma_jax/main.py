"""The `t5gemma` command line: one entry point, gin at the edge.

  t5gemma <command> --gin_file=models/tiny.gin --gin.preset.dtype='"bfloat16"'

Gin files are looked up as given, then under the repository's `gin/` folder. Every command
reads its model from the `model_config.cfg` binding; the library below never imports gin.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import glob
import json
import logging
import math
import os
import re
import sys
import traceback
from typing import Callable, Optional, Sequence

import gin

if __name__ == "__main__":
  # `python -m t5gemma_jax.main`: let `from t5gemma_jax import main` (convert_cli) find this
  # module instead of importing a second copy that would register every configurable again.
  sys.modules.setdefault("t5gemma_jax.main", sys.modules[__name__])

from t5gemma_jax import compile_cli, config, convert_cli

_registered: set[str] = set()
GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")

# Configs stay plain dataclasses; gin learns about them here and nowhere else.
gin.external_configurable(config.preset, "preset")
gin.external_configurable(config.stack_preset, "stack_preset")
gin.external_configurable(config.ModuleConfig, "ModuleConfig")
gin.external_configurable(config.T5GemmaConfig, "T5GemmaConfig")


@gin.configurable
def model_config(cfg: config.T5GemmaConfig = gin.REQUIRED) -> config.T5GemmaConfig:
  """The model every command works on; gin files bind `model_config.cfg = @preset()`."""
  if not isinstance(cfg, config.T5GemmaConfig):
    raise ValueError(f"gin binding model_config.cfg must be a T5GemmaConfig, got {type(cfg)}")
  return cfg


def count_params(cfg: config.T5GemmaConfig) -> dict[str, int]:
  """Parameter counts per stack, from shapes alone (nothing is allocated)."""
  import jax
  from t5gemma_jax import model

  shapes = model.abstract_params(cfg, boxed=False)
  return {side: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes[side]))
          for side in ("encoder", "decoder")}


def show_config(args: argparse.Namespace) -> int:
  """Prints the bound model config and its parameter counts as JSON."""
  cfg = model_config()
  counts = count_params(cfg)
  counts["total"] = counts["encoder"] + counts["decoder"]
  print(json.dumps({"config": dataclasses.asdict(cfg), "parameters": counts}, indent=2))
  return 0


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


def _register_train_configurables() -> None:
  """Training configs become gin configurables only when a command needs them."""
  if "train" in _registered:
    return
  from t5gemma_jax import sharding
  from t5gemma_jax.train import loop, losses, optim
  gin.external_configurable(loop.TrainConfig, "TrainConfig")
  gin.external_configurable(optim.OptimizerConfig, "OptimizerConfig")
  gin.external_configurable(optim.ScheduleConfig, "ScheduleConfig")
  gin.external_configurable(losses.LossConfig, "LossConfig")
  gin.external_configurable(sharding.MeshConfig, "MeshConfig")
  from t5gemma_jax import evaluation
  gin.external_configurable(evaluation.DecodeConfig, "DecodeConfig")
  gin.external_configurable(evaluation.InferConfig, "InferConfig")
  gin.external_configurable(evaluation.EvalConfig, "EvalConfig")
  _registered.add("train")


@gin.configurable
def train_config(cfg=gin.REQUIRED):
  """The run `t5gemma train` executes; gin files bind `train_config.cfg = @TrainConfig()`."""
  return cfg


def train(args: argparse.Namespace) -> int:
  """Trains (or resumes) the run described by gin; prints a summary at the end."""
  from t5gemma_jax.train import loop
  cfg = train_config()
  if not isinstance(cfg, loop.TrainConfig):
    raise ValueError("gin binding train_config.cfg must be @TrainConfig()")
  summary = loop.run(cfg, extra_files={"config.gin": gin.config_str()})
  print(_summary_text(summary))
  return 0


def _summary_text(s: dict) -> str:
  def num(key, fmt):
    return format(s[key], fmt) if s.get(key) is not None else "n/a"
  lines = [
      f"run {s['start']}: steps {s['first_step']} -> {s['last_step']}"
      + (" (stopped by SIGTERM, checkpoint saved)" if s.get("preempted") else ""),
      f"final train loss {num('train_loss', '.4f')}, validation loss "
      f"{num('validation_loss', '.4f')}, {num('tokens_per_s', ',.0f')} non-padding tokens/s",
      f"checkpoints: {s['checkpoints']}",
      f"metrics:     {s['metrics']}",
      f"tensorboard: tensorboard --logdir {s['tensorboard']}",
  ]
  for task, values in sorted(s.get("metrics_by_task", {}).items()):
    lines.append(f"{task}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(values.items())))
  for task, records in sorted(s.get("examples", {}).items()):
    lines.append(f"examples from {task} (validation):")
    for r in records:
      lines += [f"  input:      {r['input'][:100]}", f"  prediction: {r['prediction'][:100]}",
                f"  reference:  {r.get('target', '')[:100]}"]
  return "\n".join(lines)


def compile_run(args: argparse.Namespace) -> int:
  """Compiles the run described by gin for a TPU topology (no TPU needed); see compile_cli."""
  from t5gemma_jax.train import loop
  cfg = train_config()
  if not isinstance(cfg, loop.TrainConfig):
    raise ValueError("gin binding train_config.cfg must be @TrainConfig()")
  return compile_cli.run(args, cfg)


@gin.configurable
def infer_config(cfg=gin.REQUIRED):
  """`t5gemma infer` runs this; gin binds `infer_config.cfg = @InferConfig()`."""
  return cfg


@gin.configurable
def eval_config(cfg=gin.REQUIRED):
  """`t5gemma eval` runs this; gin binds `eval_config.cfg = @EvalConfig()`."""
  return cfg


def infer(args: argparse.Namespace) -> int:
  """Decodes a task split or a text file with a run's checkpoint into JSONL."""
  import jax
  from t5gemma_jax import evaluation
  cfg = infer_config()
  n = evaluation.infer(cfg)
  if jax.process_index() == 0:  # it wrote the file; the others only decoded their share
    print(f"wrote {n} predictions to {cfg.output}")
  return 0


def evaluate(args: argparse.Namespace) -> int:
  """Metrics (BLEU, ROUGE, ...) of a run's checkpoint on a task split."""
  import jax
  from t5gemma_jax import evaluation
  cfg = eval_config()
  results = evaluation.run_eval(cfg)
  if jax.process_index() != 0:  # same results on every process; one report, by the writer
    return 0
  for task, values in results.items():
    print(task + ": " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(values.items())))
  print(f"appended to {os.path.join(cfg.model_dir, 'eval_results.jsonl')}")
  return 0


def _show_task_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--task", required=True, help="task or mixture name, or 'list'")
  p.add_argument("--split", default="train")
  p.add_argument("--n", type=int, default=3, help="examples to print")
  p.add_argument("--inputs_length", type=int, default=512)
  p.add_argument("--targets_length", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stats_examples", type=int, default=200)


# name: (function, adds the command's own flags)
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int],
                          Callable[[argparse.ArgumentParser], None]]] = {
    "show_config": (show_config, lambda p: None),
    "show_task": (show_task, _show_task_args),
    "train": (train, lambda p: None),
    "compile": (compile_run, compile_cli.add_args),
    "infer": (infer, lambda p: None),
    "eval": (evaluate, lambda p: None),
    "export": (convert_cli.export, convert_cli.export_args),
    "import_hf": (convert_cli.import_hf, convert_cli.import_args),
    "adapt": (convert_cli.adapt, convert_cli.adapt_args),
}


@gin.configurable
def data_settings(gemma_tokenizer: Optional[str] = None, builtin_vocab_size: int = 2048,
                  builtin_sentinels: int = 128, builtin_mixture_rates: Optional[dict] = None,
                  c4_pretrain_rates: Optional[dict] = None, user_tasks: Sequence = ()) -> None:
  """Data options that must be applied before any task is used.

  Args:
    gemma_tokenizer: path of Gemma's tokenizer.model (TFDS tasks); also $T5GEMMA_TOKENIZER.
    builtin_vocab_size, builtin_sentinels: size of the vocabulary trained on the built-in
      corpus (must equal the model's vocab_size) and how many of its ids are sentinels.
    builtin_mixture_rates, c4_pretrain_rates: {task: rate} for builtin_mixture and
      c4_t5gemma_pretrain (None: the defaults).
    user_tasks: `@file_task()` references; evaluating them registers the tasks.
  """
  import tasks  # registers the built-in, TFDS and file-based tasks
  from t5gemma_jax.data import vocab
  if gemma_tokenizer:
    vocab.set_gemma_tokenizer(gemma_tokenizer)
  tasks.vocabularies.BUILTIN.configure(builtin_vocab_size, builtin_sentinels)
  # Always (re)registered, so that a second command in one process (tests, notebooks) does not
  # inherit the previous one's rates.
  tasks.builtin.register_mixture(builtin_mixture_rates or tasks.builtin.DEFAULT_MIXTURE_RATES)
  if c4_pretrain_rates is None:
    tasks.tfds_tasks.register_pretraining_mixture()
  else:
    tasks.tfds_tasks.register_pretraining_mixture(tuple(c4_pretrain_rates.items()))
  del user_tasks  # registered as a side effect of gin evaluating the references


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(prog="t5gemma", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (_, add_args) in sorted(COMMANDS.items()):
    p = sub.add_parser(name)
    p.add_argument("--gin_file", action="append", default=[],
                   help="gin file (repeatable); relative paths also resolve under gin/")
    p.add_argument("--gin_search_path", action="append", default=[],
                   help="extra folder in which to look for gin files")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of errors")
    add_args(p)
  args, rest = parser.parse_known_args(argv)
  bindings = []
  for item in rest:
    if not item.startswith("--gin."):
      parser.error(f"unrecognised argument {item!r} (bindings look like --gin.NAME=VALUE)")
    name, sep, value = item[len("--gin."):].partition("=")
    if not sep:
      parser.error(f"gin binding {item!r} has no '=VALUE'")
    bindings.append(f"{name} = {value}")
  return args, bindings


class _QuietGinSearch(logging.Filter):
  """gin logs an ERROR for every search-path miss while resolving includes; they are noise."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Path not found:")


logging.getLogger().addFilter(_QuietGinSearch())


def _load_gin(args: argparse.Namespace, bindings: list[str]) -> None:
  gin.clear_config()  # each command starts from its own files (main() may run twice in-process)
  import tasks.files  # its file_task is referenced from gin files
  if "file_task" not in _registered:
    gin.external_configurable(tasks.files.file_task, "file_task")
    _registered.add("file_task")
  if args.command in ("train", "compile", "infer", "eval"):
    _register_train_configurables()
  search = [".", *args.gin_search_path, GIN_DIR]
  for path in search[1:]:
    if os.path.isdir(path):
      gin.add_config_file_search_path(path)  # for include statements inside gin files
  for f in args.gin_file:
    found = next((os.path.join(d, f) for d in search if os.path.isfile(os.path.join(d, f))), None)
    if found is None:
      raise FileNotFoundError(f"gin file {f!r} not found (searched {', '.join(search)})")
    try:
      gin.parse_config_file(found)
    except Exception as e:  # syntax errors, unknown configurables, ...
      raise ValueError(f"gin file {found}: {e}") from e
  defined = set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*=", gin.config_str(), re.M))
  for binding in bindings:
    name = binding.split(" = ", 1)[0]
    if re.fullmatch(r"[A-Z][A-Z0-9_]*", name) and name not in defined:
      close = difflib.get_close_matches(name, sorted(defined), n=3)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      raise ValueError(f"gin binding --gin.{name}: no gin file defines the macro {name}{hint}")
    try:
      gin.parse_config(binding)
    except Exception as e:  # gin raises several types; all mean "this binding is wrong"
      raise ValueError(f"gin binding --gin.{binding.replace(' = ', '=', 1)}: {e}") from e
  gin.finalize()


# PCI vendor ids of accelerators jax can run on: Google (TPU), NVIDIA, AMD.
_ACCELERATOR_VENDORS = {"0x1ae0", "0x10de", "0x1002"}


def _host_has_accelerator() -> bool:
  """Whether this machine has a TPU or GPU on its PCI bus (True when that cannot be read)."""
  paths = glob.glob("/sys/bus/pci/devices/*/vendor")
  if not paths:
    return True
  for path in paths:
    try:
      with open(path) as f:
        if f.read().strip() in _ACCELERATOR_VENDORS:
          return True
    except OSError:
      return True
  return False


def _quiet_backends() -> None:
  """Keeps the terminal for our own output: TF's C++ banners and seqio's advice go, and on a
  machine without accelerators jax starts on the CPU directly, without initialising libtpu
  (installed for `t5gemma compile`), which would print its own complaints and cost seconds.
  `t5gemma compile` still loads libtpu for its topology."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if "JAX_PLATFORMS" not in os.environ and not _host_has_accelerator():
    import jax
    jax.config.update("jax_platforms", "cpu")  # the backends start lazily, after this
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)


# Errors that describe bad input (a flag, a binding, a file): their message is the whole story.
_INPUT_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError,
                 NotADirectoryError, IsADirectoryError, PermissionError, ImportError,
                 FloatingPointError)


def _message(e: BaseException) -> str:
  text = str(e) if not isinstance(e, KeyError) else f"missing {e.args[0]!r}" if e.args else ""
  # gin appends an "In call to configurable ..." line naming the Python class: our messages
  # already name the binding, so it goes; the rest stays, on one line.
  lines = [line.strip() for line in text.splitlines()
           if line.strip() and not line.strip().startswith("In call to configurable")]
  return " ".join(lines) or type(e).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs one command; bad input gives one line on stderr and exit status 2 (other failures
  1), with the traceback only under --verbose."""
  _quiet_backends()
  args, bindings = _parse(sys.argv[1:] if argv is None else argv)
  try:
    _load_gin(args, bindings)
    data_settings()
    return COMMANDS[args.command][0](args)
  except Exception as e:  # noqa: BLE001  (every failure becomes one readable line)
    if args.verbose:
      traceback.print_exc()
    bad_input = isinstance(e, _INPUT_ERRORS)
    hint = "" if bad_input or args.verbose else " (--verbose shows the traceback)"
    print(f"t5gemma {args.command}: error: {type(e).__name__ + ': ' if not bad_input else ''}"
          f"{_message(e)}{hint}", file=sys.stderr)
    return 2 if bad_input else 1


if __name__ == "__main__":
  sys.exit(main())
