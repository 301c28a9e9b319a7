"""What gin may bind, and how a command's gin files and `--gin.NAME=VALUE` flags are read.

Configs stay plain dataclasses; gin learns about them here and nowhere else. Every command reads
its model from the `model_config.cfg` binding, a run from `train_config.cfg` (or
`infer_config.cfg`, `eval_config.cfg`), and data options from `data_settings.*`.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from typing import Iterator, Optional, Sequence

import gin

from t5gemma_jax import config, presets, run_options as run_options_lib
from t5gemma_jax.train import matched

# The gin files ship inside the package (package data), so an installed wheel finds them too.
GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")
# show_config reads the same files as train (a run file plus a model file), so it needs the
# run configurables too.
RUN_COMMANDS = ("train", "compile", "infer", "eval", "show_config")

gin.external_configurable(presets.preset, "preset")
gin.external_configurable(presets.stack_preset, "stack_preset")
gin.external_configurable(config.ModuleConfig, "ModuleConfig")
gin.external_configurable(config.T5GemmaConfig, "T5GemmaConfig")
gin.external_configurable(config.DecoderOnlyConfig, "DecoderOnlyConfig")
gin.external_configurable(presets.decoder_only, "decoder_only")
gin.external_configurable(matched.matched_decoder_only, "matched_decoder_only")
# The wrapper applies `RunOptions.*` bindings when called (`@RunOptions()` in the run files).
_BoundRunOptions = gin.external_configurable(run_options_lib.RunOptions, "RunOptions")
_registered: dict[str, object] = {}


def _register_data_configurables() -> None:
  """`file_task` and `data_settings` (the `tasks.DataSettings` dataclass itself) load seqio
  and TensorFlow: registered when the first gin file is read, after `backends.quiet_start`,
  not when the CLI is imported."""
  if "data" in _registered:
    return
  from t5gemma_jax.tasks import files, settings
  gin.external_configurable(files.file_task, "file_task")
  _registered["data"] = gin.external_configurable(settings.DataSettings, "data_settings")


def _register_run_configurables() -> None:
  """Training and decoding configs become configurables only when a command needs them, so
  that `show_task` and the conversion commands do not import the trainer."""
  if "run" in _registered:
    return
  from t5gemma_jax import evaluation, inference, sharding
  from t5gemma_jax.train import loop, losses, optim
  for cls, name in ((loop.TrainConfig, "TrainConfig"), (optim.OptimizerConfig, "OptimizerConfig"),
                    (optim.ScheduleConfig, "ScheduleConfig"), (losses.LossConfig, "LossConfig"),
                    (sharding.MeshConfig, "MeshConfig"), (inference.DecodeConfig, "DecodeConfig"),
                    (inference.InferConfig, "InferConfig"), (evaluation.EvalConfig, "EvalConfig")):
    gin.external_configurable(cls, name)
  _registered["run"] = True


@gin.configurable
def model_config(cfg: config.ModelConfig = gin.REQUIRED) -> config.ModelConfig:
  """The model every command works on; gin files bind `model_config.cfg = @preset()` (or
  `@decoder_only()`, `@DecoderOnlyConfig()`)."""
  if not isinstance(cfg, (config.T5GemmaConfig, config.DecoderOnlyConfig)):
    raise ValueError("gin binding model_config.cfg must be a T5GemmaConfig or a "
                     f"DecoderOnlyConfig, got {type(cfg)}")
  return cfg


def bound_model() -> Optional[config.ModelConfig]:
  """The gin-bound model config, or None when no gin file binds one."""
  try:
    gin.query_parameter("model_config.cfg")
  except ValueError:
    return None
  return model_config()


def run_options() -> run_options_lib.RunOptions:
  """`RunOptions` with the `RunOptions.*` bindings applied (the defaults when there are none)."""
  return _BoundRunOptions()


def _with_bound_run(cfg, name: str):
  """`cfg` (a Train/Infer/EvalConfig) after checking that the `RunOptions.*` bindings reach
  its `run` field: a run file that builds the config without `NAME.run = @RunOptions()` would
  otherwise drop `--gin.RunOptions.dtype=...` without a word."""
  bound = run_options()
  if cfg.run != bound:
    raise ValueError(f"gin bindings RunOptions.* ({bound}) do not reach {name}.run "
                     f"({cfg.run}): bind {name}.run = @RunOptions() in the run's gin file")
  return cfg


@gin.configurable
def train_config(cfg=gin.REQUIRED):
  """The run `t5gemma train` executes; gin files bind `train_config.cfg = @TrainConfig()`."""
  from t5gemma_jax.train import loop
  if not isinstance(cfg, loop.TrainConfig):
    raise ValueError("gin binding train_config.cfg must be @TrainConfig()")
  return _with_bound_run(cfg, "TrainConfig")


@gin.configurable
def infer_config(cfg=gin.REQUIRED):
  """`t5gemma infer` runs this; gin binds `infer_config.cfg = @InferConfig()`."""
  return _with_bound_run(cfg, "InferConfig")


@gin.configurable
def eval_config(cfg=gin.REQUIRED):
  """`t5gemma eval` runs this; gin binds `eval_config.cfg = @EvalConfig()`."""
  return _with_bound_run(cfg, "EvalConfig")


def parse_bindings(flags: Sequence[str]) -> list[str]:
  """`--gin.NAME=VALUE` flags -> gin statements `NAME = VALUE`.

  Raises:
    ValueError: a flag that is not a binding, or a binding without `=VALUE`.
  """
  bindings = []
  for item in flags:
    if not item.startswith("--gin."):
      raise ValueError(f"unrecognised argument {item!r} (bindings look like --gin.NAME=VALUE)")
    name, sep, value = item[len("--gin."):].partition("=")
    if not sep:
      raise ValueError(f"gin binding {item!r} has no '=VALUE'")
    bindings.append(f"{name} = {value}")
  return bindings


class _SearchMissFilter(logging.Filter):
  """gin logs an ERROR for every search-path miss while resolving includes; they are noise."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Path not found:")


@contextlib.contextmanager
def _quiet_search_misses() -> Iterator[None]:
  root, quiet = logging.getLogger(), _SearchMissFilter()
  root.addFilter(quiet)
  try:
    yield
  finally:
    root.removeFilter(quiet)


def find_gin_file(name: str, search: Sequence[str]) -> str:
  """The first `folder/name` that exists, for folder in `search`."""
  found = next((os.path.join(d, name) for d in search if os.path.isfile(os.path.join(d, name))),
               None)
  if found is None:
    raise FileNotFoundError(f"gin file {name!r} not found (searched {', '.join(search)})")
  return found


def load(command: str, gin_files: Sequence[str], bindings: Sequence[str],
         search_paths: Sequence[str] = ()) -> None:
  """Clears gin, then reads `gin_files` and `bindings` (gin statements) and finalises.

  Args:
    command: the command that will run (decides which configurables exist).
    gin_files: paths as given, else looked up in ".", `search_paths`, then `GIN_DIR`.
    bindings: `NAME = VALUE` statements, applied after the files.
    search_paths: extra folders for gin files and their include statements.

  Raises:
    FileNotFoundError: a gin file that is nowhere on the search path.
    ValueError: a gin file or binding gin rejects, naming it; a macro binding no file defines.
  """
  gin.clear_config()  # each command starts from its own files (main may run twice in-process)
  _register_data_configurables()
  if command in RUN_COMMANDS:
    _register_run_configurables()
  search = [".", *search_paths, GIN_DIR]
  for path in search[1:]:
    if os.path.isdir(path):
      gin.add_config_file_search_path(path)  # for include statements inside gin files
  with _quiet_search_misses():
    for f in gin_files:
      found = find_gin_file(f, search)
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


def apply_data_settings():
  """Builds `tasks.DataSettings` from the bound `data_settings.*`, configures the tasks with
  it and returns it."""
  from t5gemma_jax import tasks
  _register_data_configurables()
  settings = _registered["data"]()  # the gin wrapper applies the data_settings.* bindings
  tasks.configure(settings)
  return settings
