"""The `t5gemma` command table, argument parsing and `main`.

  t5gemma <command> --gin_file=models/tiny.gin --gin.RunOptions.dtype='"bfloat16"'

Gin files are looked up as given, then under `--gin_search_path` folders, then the
package's `t5gemma_jax/gin/` folder. `t5gemma launch NAME ...` runs a launcher
(t5gemma_jax.launch).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NamedTuple, Optional, Sequence

from t5gemma_jax.cli import (backends, compile_command, convert_commands, errors, gin_setup,
                             launch_command, model_commands, run_commands)


class Command(NamedTuple):
  run: Callable[[argparse.Namespace], int]
  add_args: Callable[[argparse.ArgumentParser], None]
  help: str


def _no_args(p: argparse.ArgumentParser) -> None:
  del p


COMMANDS: dict[str, Command] = {
    "show_config": Command(model_commands.show_config, model_commands.show_config_args,
                           "print the bound model config, its parameter counts and the "
                           "decoder-only configs matched to it"),
    "show_task": Command(model_commands.show_task, model_commands.show_task_args,
                         "print examples and statistics of a task"),
    "train": Command(run_commands.train, _no_args, "train or resume a run"),
    "compile": Command(run_commands.compile_run, compile_command.add_args,
                       "compile a run for a TPU topology on this host"),
    "infer": Command(run_commands.infer, _no_args, "decode a task split or a text file"),
    "eval": Command(run_commands.evaluate, _no_args, "metrics of a checkpoint on a task"),
    "export": Command(convert_commands.export, convert_commands.export_args,
                      "checkpoint -> Hugging Face folder"),
    "import_hf": Command(convert_commands.import_hf, convert_commands.import_args,
                         "Hugging Face folder -> run directory"),
    "adapt": Command(convert_commands.adapt, convert_commands.adapt_args,
                     "decoder-only Gemma -> T5Gemma run directory"),
}


class Invocation(NamedTuple):
  """A parsed command line: the argparse namespace and the gin statements of its flags."""
  args: argparse.Namespace
  bindings: list[str]


def parse(argv: Sequence[str]) -> Invocation:
  """Parses `t5gemma COMMAND [flags] [--gin.NAME=VALUE ...]`; bad flags exit 2 (argparse)."""
  parser = argparse.ArgumentParser(prog="t5gemma", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, command in sorted(COMMANDS.items()):
    p = sub.add_parser(name, help=command.help)
    p.add_argument("--gin_file", action="append", default=[],
                   help="gin file (repeatable); relative paths also resolve under gin/")
    p.add_argument("--gin_search_path", action="append", default=[],
                   help="extra folder in which to look for gin files (repeatable)")
    p.add_argument("--gin_search_paths", default="",
                   help="comma-separated folders, as T5X spells it")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of errors")
    command.add_args(p)
  sub.add_parser("launch", help="start jobs: local processes, TPU VMs, Slurm, sweeps, "
                 "reports (t5gemma launch --help)", add_help=False)
  args, rest = parser.parse_known_args(argv)
  try:
    bindings = gin_setup.parse_bindings(rest)
  except ValueError as e:
    parser.error(str(e))
  args.gin_search_path += [p for p in args.gin_search_paths.split(",") if p]
  return Invocation(args, bindings)


def configure(invocation: Invocation):
  """Reads the invocation's gin files and bindings, then applies its data settings.

  Returns:
    The applied `tasks.DataSettings`.
  """
  args = invocation.args
  gin_setup.load(args.command, args.gin_file, invocation.bindings, args.gin_search_path)
  return gin_setup.apply_data_settings()


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs one command; bad input gives one line on stderr and exit status 2 (other failures
  1), with the traceback only under --verbose."""
  argv = sys.argv[1:] if argv is None else list(argv)
  backends.quiet_start()  # also for launchers that load TensorFlow (report's baselines)
  if argv[:1] == ["launch"]:  # the launchers parse their own arguments
    return launch_command.main(argv[1:])
  invocation = parse(argv)
  args = invocation.args
  try:
    configure(invocation)
    return COMMANDS[args.command].run(args)
  except Exception as e:  # noqa: BLE001  (every failure becomes one readable line)
    return errors.report(args.command, e, args.verbose)
