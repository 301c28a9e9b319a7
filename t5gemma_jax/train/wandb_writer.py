"""Weights & Biases for a training run (optional: `pip install t5gemma-jax[wandb]`).

`TrainConfig.wandb_project` set: process 0 opens one W&B run per MODEL_DIR and logs to it
  - every metrics record (the values of metrics.jsonl), against the "step" metric;
  - the run's config.gin: one W&B config entry per gin binding, and the file itself;
  - from in-training evaluation (`evaluation.evaluate`): per task, its scores and a table of
    the decoded examples (input, target, prediction).
The run's id is made once and kept in MODEL_DIR/wandb/run_id: a resumed run (the same
MODEL_DIR) continues the same W&B run (resume="allow"), a new MODEL_DIR starts a new one. The
run's name is MODEL_DIR's last folder name, also its W&B group.

`t5gemma eval` of such a run logs its scores and tables to a W&B run of its own in the same
group (job type "eval", id kept in MODEL_DIR/wandb/eval_run_id, name "NAME-eval"): each eval
of the run continues it, and it never writes into the training run, which may still be
logging from another process. W&B writes its files under MODEL_DIR/wandb (local
MODEL_DIR; for a bucket, in W&B's default folder: $WANDB_DIR, else ./wandb). W&B's own
variables apply as usual: WANDB_MODE=offline keeps everything on disk (`wandb sync` uploads it
later), WANDB_MODE=disabled turns it off, WANDB_ENTITY picks the team.

The W&B step ("_step") only counts log calls; charts use "step", the training step, so that a
resumed run re-logging steps after its last checkpoint is not refused as out of order.

`wandb` is imported here alone, and only when a run is opened.
"""

from __future__ import annotations

import numbers
import os
import re
import secrets
import sys
from typing import Any, Mapping, Optional, Sequence

from t5gemma_jax import atomic, storage
from t5gemma_jax.config_gin import parse_gin

INSTALL_HINT = "pip install t5gemma-jax[wandb]"
STEP_METRIC = "step"
TRAIN_JOB = "train"
# The gin binding that asks for W&B, per job: what an error about it names.
PROJECT_SETTING = {TRAIN_JOB: "TrainConfig.wandb_project", "eval": "EvalConfig.wandb_project"}
MAX_TABLE_ROWS = 1000  # decoded examples logged per task and evaluation
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# The open run's writer (process 0, between `WandbWriter()` and `close()`): evaluation finds it
# through `eval_loggers` without being handed it. W&B itself keeps one run per process.
_active: Optional["WandbWriter"] = None


def installed() -> bool:
  """Whether the `wandb` package can be imported here."""
  try:
    import_wandb()
  except ImportError:
    return False
  return True


def import_wandb(setting: str = PROJECT_SETTING[TRAIN_JOB]):
  """The `wandb` module, or an ImportError that names `setting` (the binding that asked for
  W&B) and says how to install it."""
  try:
    import wandb
  except ImportError as e:
    raise ImportError(f"{setting} is set but the wandb package is not "
                      f"installed: {INSTALL_HINT}") from e
  return wandb


def run_id(model_dir: str, job_type: str = TRAIN_JOB) -> str:
  """The W&B run id of `model_dir`'s `job_type` run: read from MODEL_DIR/wandb/run_id (the
  training run; "JOB_run_id" for another job), made and kept there on the first call.

  Args:
    model_dir: the run directory (local or remote).
    job_type: "train", or the job logging beside it ("eval").

  Returns:
    The id (8 random lowercase hex digits when made here).
  """
  name = "run_id" if job_type == TRAIN_JOB else f"{job_type}_run_id"
  path = os.path.join(model_dir, "wandb", name)
  kept = storage.read_text_if_exists(path)
  if kept is not None:
    kept = kept.strip()
    if not _ID.match(kept):
      raise ValueError(f"{path} holds {kept!r}, not a W&B run id (letters, digits, '-', '_'): "
                       "fix or delete it (deleting starts a new W&B run)")
    return kept
  made = secrets.token_hex(4)
  atomic.write_text(path, made + "\n")
  return made


class WandbWriter:
  """One W&B run for a MODEL_DIR (process 0 alone makes one: see `MetricsWriter`)."""

  def __init__(self, model_dir: str, project: str, config_gin: Optional[str] = None,
               job_type: str = TRAIN_JOB):
    """Opens (or resumes) the W&B run of `model_dir`'s `job_type`.

    Args:
      model_dir: the run directory (its id file and, when local, W&B's files go there).
      project: the W&B project.
      config_gin: the run's config.gin text (the run config and a file of the run), if any.
      job_type: a key of PROJECT_SETTING: "train" (the training run), or "eval"
        (`t5gemma eval`'s run beside it).
    """
    global _active
    setting = PROJECT_SETTING[job_type]
    if not isinstance(project, str) or not project.strip():
      raise ValueError(f"{setting} must be a W&B project name, got {project!r}")
    wandb = import_wandb(setting)
    self._wandb = wandb
    local = not storage.is_remote(model_dir)
    group = os.path.basename(os.path.normpath(model_dir)) or None
    name = group if job_type == TRAIN_JOB or group is None else f"{group}-{job_type}"
    self._run = wandb.init(project=project, id=run_id(model_dir, job_type), name=name,
                           group=group, job_type=job_type, resume="allow",
                           dir=model_dir if local else None,
                           # One entry per macro and binding, literals as values.
                           config=parse_gin(config_gin).values() if config_gin else None)
    self._run.define_metric(STEP_METRIC)
    self._run.define_metric("*", step_metric=STEP_METRIC)
    if config_gin and not self._run.disabled:  # WANDB_MODE=disabled: its dir is a temp one
      path = os.path.join(self._run.dir, "config.gin")
      atomic.write_text(path, config_gin)
      self._run.save(path, base_path=self._run.dir, policy="now")
    _active = self

  @property
  def id(self) -> str:
    """The W&B run id."""
    return self._run.id

  def log(self, step: int, metrics: Mapping[str, Optional[float]]) -> None:
    """Logs one metrics record under `step` (None values: not measured, left out).

    Args:
      step: the training step.
      metrics: name -> value.
    """
    self._run.log({STEP_METRIC: int(step),
                   **{k: float(v) for k, v in metrics.items() if v is not None}})

  def log_eval(self, task: str, step: Optional[int], scores: Mapping[str, float],
               examples: Sequence[Mapping[str, str]]) -> None:
    """Logs a task's evaluation: "eval/TASK/METRIC" scores and an "eval/TASK/examples" table.

    Args:
      task: the task name.
      step: the training step evaluated (None: left out).
      scores: metric -> value.
      examples: {"input", "target", "prediction"} per decoded example (the first
        `MAX_TABLE_ROWS` are logged).
    """
    columns = ["input", "target", "prediction"]
    table = self._wandb.Table(columns=columns, data=[[str(e.get(c, "")) for c in columns]
                                                     for e in examples[:MAX_TABLE_ROWS]])
    record = {f"eval/{task}/{k}": float(v) for k, v in scores.items()}
    record[f"eval/{task}/examples"] = table
    if step is not None:
      record[STEP_METRIC] = int(step)
    self._run.log(record)

  def close(self) -> None:
    """Finishes the run; called while an exception unwinds (a NaN loss, a crash), marks it
    failed (exit code 1)."""
    global _active
    failed = sys.exc_info()[0] is not None
    self._run.finish(exit_code=1 if failed else 0)
    if _active is self:
      _active = None


class EvalTables:
  """A seqio logger (`seqio.Evaluator(logger_cls=...)`) that sends each task's scores and
  decoded examples to the open W&B run. Duck-typed to `seqio.Logger`: this module imports
  neither seqio nor TensorFlow."""

  def __init__(self, output_dir: Optional[str] = None):
    self.output_dir = output_dir

  def __call__(self, task_name: str, step: Optional[int], metrics: Mapping[str, Any], dataset,
               inferences: Optional[Mapping[str, Sequence[Any]]],
               targets: Optional[Sequence[Any]]) -> None:
    """Args as `seqio.Logger.__call__`: metrics are seqio MetricValues (numbers are kept),
    `dataset` the task's examples (with "inputs_pretokenized") aligned with `targets` and
    `inferences["prediction"]`."""
    if _active is None:
      return
    scores = {k: v.value for k, v in metrics.items()
              if isinstance(getattr(v, "value", None), numbers.Real)}
    predictions = list((inferences or {}).get("prediction") or [])[:MAX_TABLE_ROWS]
    targets = list(targets) if targets is not None else [""] * len(predictions)
    examples = []
    if dataset is not None:
      for ex, target, prediction in zip(dataset.as_numpy_iterator(), targets, predictions):
        examples.append({"input": _text(ex.get("inputs_pretokenized", b"")),
                         "target": _text(target), "prediction": _text(prediction)})
    _active.log_eval(task_name, step, scores, examples)


def eval_loggers() -> tuple:
  """The seqio loggers evaluation adds for W&B: (EvalTables,) while a run is open, else ()."""
  return (EvalTables,) if _active is not None else ()


def _text(value: Any) -> str:
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
