"""How a run directory's weights were made, read back from what the run wrote, without gin.

A training run writes config.gin (every gin binding it ran with), metrics.jsonl (losses per
logged step) and, when it evaluates, eval_results.jsonl (scores with their metric settings);
`import_hf` and `adapt` write source.json (the folders the weights came from). `read` gathers
them for one checkpoint step, following `TrainConfig.init_from` back to the run a fine-tune
started from, so that an export can describe itself (`convert.model_card`). Everything here
is optional: a missing or unreadable record is simply unknown. Local or remote (gs://) paths.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional

from t5gemma_jax import config_gin, run_files, storage
from t5gemma_jax.config_gin import GinSettings

MAX_ANCESTORS = 8  # init_from links followed (a chain of fine-tunes; guards against a loop)
_EVAL_KEYS = ("step", "task", "split", "metric_settings")


@dataclasses.dataclass(frozen=True)
class EvalScores:
  """One task's scores at one step (an eval_results.jsonl row).

  Attributes:
    task, split, step: what was decoded, and the checkpoint step.
    scores: metric name -> value.
    settings: metric name -> the settings that produced it (sacreBLEU signatures, ...).
  """

  task: str
  split: str
  step: int
  scores: dict[str, float]
  settings: dict[str, str]


@dataclasses.dataclass(frozen=True)
class RunHistory:
  """What a run directory records about one of its steps (see `read`).

  Attributes:
    run_dir: the run directory.
    step: the checkpoint step described.
    gin: its config.gin, or None when it has none (not a training run).
    train: the last metrics.jsonl record at or before `step` with a training "loss".
    validation: the last record at or before `step` with a "validation_loss".
    evals: per task, the newest eval_results.jsonl row at or before `step`.
    later_evals: how many rows evaluate steps after `step` (other weights; not in `evals`).
    init_from: the runs it was fine-tuned from, nearest first (`TrainConfig.init_from`).
    source: the source.json of the run, or of the nearest run it was fine-tuned from.
  """

  run_dir: str
  step: int
  gin: Optional[GinSettings] = None
  train: Optional[dict] = None
  validation: Optional[dict] = None
  evals: tuple[EvalScores, ...] = ()
  later_evals: int = 0
  init_from: tuple[str, ...] = ()
  source: Optional[dict] = None

  @property
  def base_models(self) -> list[str]:
    """The Hugging Face repositories the weights started from, when the source records them."""
    folders = (self.source or {}).get("folders") or []
    return list(dict.fromkeys(f["repo_id"] for f in folders
                              if isinstance(f, dict) and f.get("repo_id")))


def read(run_dir: str, step: int) -> RunHistory:
  """Gathers what `run_dir` records about its checkpoint `step` (see the module docstring).

  Args:
    run_dir: the run directory (local or remote).
    step: the checkpoint step; records of later steps describe other weights and are left out.

  Returns:
    The history; fields the run does not record are None or empty.
  """
  gin = _safe(config_gin.read_run, run_dir)
  logged = _safe(storage.read_records, os.path.join(run_dir, run_files.METRICS)) or []
  records = [r for r in logged if _int(r.get("step")) is not None and r["step"] <= step]
  evals, later = _evals(run_dir, step)
  chain = _init_chain(run_dir, gin)
  source = None
  for d in (run_dir, *chain):
    source = _safe(run_files.read_source, d)
    if source is not None:
      break
  return RunHistory(run_dir=run_dir, step=step, gin=gin,
                    train=_last_with(records, "loss"),
                    validation=_last_with(records, "validation_loss"), evals=evals,
                    later_evals=later, init_from=chain, source=source)


def _init_chain(run_dir: str, gin: Optional[GinSettings]) -> tuple[str, ...]:
  chain: list[str] = []
  seen = {os.path.normpath(run_dir)}
  while gin is not None and len(chain) < MAX_ANCESTORS:
    parent = gin.value("TrainConfig.init_from")
    if not isinstance(parent, str) or os.path.normpath(parent) in seen:
      break
    chain.append(parent)
    seen.add(os.path.normpath(parent))
    gin = _safe(config_gin.read_run, parent)
  return tuple(chain)


def _evals(run_dir: str, step: int) -> tuple[tuple[EvalScores, ...], int]:
  latest: dict[str, EvalScores] = {}
  later = 0
  rows = _safe(storage.read_records, os.path.join(run_dir, run_files.EVAL_RESULTS)) or []
  for row in rows:
    row_step, task = _int(row.get("step")), row.get("task")
    if row_step is None or not isinstance(task, str):
      continue
    if row_step > step:
      later += 1
      continue
    if task in latest and latest[task].step > row_step:
      continue  # a later row for an earlier step (e.g. `t5gemma eval` of an old checkpoint)
    settings = row.get("metric_settings")
    latest[task] = EvalScores(
        task=task, split=str(row.get("split", "")), step=row_step,
        scores={k: float(v) for k, v in row.items() if k not in _EVAL_KEYS
                and isinstance(v, (int, float)) and not isinstance(v, bool)},
        settings={str(k): str(v) for k, v in settings.items()}
        if isinstance(settings, dict) else {})
  return tuple(latest[t] for t in sorted(latest)), later


def _last_with(records: list[dict], key: str) -> Optional[dict]:
  for record in reversed(records):
    value = record.get(key)
    if isinstance(value, (int, float)) and math.isfinite(value):
      return record
  return None


def _int(value: Any) -> Optional[int]:
  return value if isinstance(value, int) and not isinstance(value, bool) else None


def _safe(fn, *args):
  """`fn(*args)`, or None when the record cannot be read: a model card describes what it can
  and never stops an export."""
  try:
    return fn(*args)
  except (OSError, ValueError, UnicodeDecodeError):
    return None
