"""Decode a task's split and score it with the task's metric fns through seqio's Evaluator
(`evaluate`, also `t5gemma eval`).

Results go to `MODEL_DIR/eval_results.jsonl` (one object per task and step, with the metrics'
settings under "metric_settings" and the number of examples scored) and TensorBoard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Mapping, Optional

import jax
import numpy as np
import seqio

from t5gemma_jax import config_gin, inference, run_files, storage
from t5gemma_jax import metrics as metric_lib
from t5gemma_jax.config import ModelConfig
from t5gemma_jax.data import pipeline
from t5gemma_jax.run_options import RunOptions
from t5gemma_jax.train import wandb_writer


def make_predict_fn(params: Any, cfg: ModelConfig, max_new_tokens: int, batch_size: int,
                    **decode):
  """A seqio `predict_fn`: (index, features) dataset -> [(index, token ids)]."""

  def predict_fn(dataset, model_feature_shapes=None):
    del model_feature_shapes
    indices, encoder = [], []
    for index, features in dataset.as_numpy_iterator():
      indices.append(int(index))
      encoder.append(features["encoder_input_tokens"])
    encoder = np.stack(encoder)
    batches = (encoder[i:i + batch_size] for i in range(0, len(encoder), batch_size))
    tokens = inference.predictions(params, cfg, batches, max_new_tokens, batch_size, **decode)
    # Fixed-length rows: seqio stacks them and its vocabulary decode stops at EOS.
    return [(i, list(map(int, row))) for i, row in zip(indices, tokens)]

  return predict_fn


def metric_settings(task: str) -> dict[str, str]:
  """{metric: the settings behind its numbers} of a task's metric fns: sacreBLEU signatures,
  ROUGE options ({} for metrics that record none)."""
  return metric_lib.signatures(seqio.get_mixture_or_task(task).metric_fns)


def evaluate(params: Any, cfg: ModelConfig, task: str, split: str,
             lengths: Mapping[str, int], *, max_new_tokens: int, batch_size: int = 16,
             num_examples: Optional[int] = None, model_dir: Optional[str] = None,
             step: Optional[int] = None, **decode) -> dict[str, dict[str, float]]:
  """Decodes `task`'s `split` and computes its metrics.

  Args:
    params, cfg: the model.
    task: task or mixture name (mixtures evaluate each sub-task that has metrics).
    split: e.g. "validation".
    lengths: {"inputs": S, "targets": T} for the eval dataset.
    max_new_tokens, batch_size, **decode: decoding options (`decoding.generate`).
    num_examples: evaluate only the first n examples of each task.
    model_dir, step: where and under which step to log (eval_results.jsonl, TensorBoard).

  Returns:
    {task name: {metric: value}}.
  """
  pipeline.get_mixture_or_task(task)
  # Every process computes the metrics (all hold every prediction); process 0 alone logs them,
  # also to the W&B run of a training run that has one.
  loggers = ((_TensorBoardWithSettings, *wandb_writer.eval_loggers())
             if model_dir and jax.process_index() == 0 else ())
  evaluator = seqio.Evaluator(
      task, feature_converter=pipeline.feature_converter(pack=False), eval_split=split,
      sequence_length=dict(lengths), num_examples=num_examples, logger_cls=loggers,
      log_dir=os.path.join(model_dir, "eval") if model_dir else None,
      async_compute_metrics=False)
  if not evaluator.eval_tasks:
    raise ValueError(f"task {task!r} has no split {split!r} with metric fns to evaluate")
  predict = make_predict_fn(params, cfg, max_new_tokens, batch_size, **decode)
  counts = {}

  def predict_and_count(ds, **kwargs):  # once per task, on that task's cached examples
    out = predict(ds, **kwargs)
    names = [n for n, d in evaluator.cached_model_datasets.items() if d is ds]
    counts.update({n: len(out) for n in names})
    return out

  metrics, _ = evaluator.evaluate(compute_metrics=True, step=step, predict_fn=predict_and_count)
  results = {name: {k: float(v.value if hasattr(v, "value") else v) for k, v in m.items()}
             for name, m in metrics.result().items()}
  # Beside the numbers, the exact settings that produced them (sacreBLEU signatures, ...) and
  # how many examples were scored.
  settings = {t.name: metric_settings(t.name) for t in evaluator.eval_tasks}
  if model_dir and jax.process_index() == 0:
    with storage.AppendLog(os.path.join(model_dir, run_files.EVAL_RESULTS)) as log:
      log.write("".join(json.dumps({"step": step, "task": name, "split": split,
                                    "examples": counts.get(name), **m,
                                    "metric_settings": settings.get(name, {})}) + "\n"
                        for name, m in results.items()))
  return results


class _TensorBoardWithSettings(seqio.TensorBoardLogger):
  """seqio's TensorBoard logger that also writes each metric's settings as text, in the same
  events file as the numbers (one writer per task, as before)."""

  def __call__(self, task_name, step, metrics, dataset, inferences, targets):
    texts = {f"metric_settings/{k}": seqio.metrics.Text(v)
             for k, v in metric_settings(task_name).items()}
    super().__call__(task_name, step, {**metrics, **texts}, dataset, inferences, targets)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """`t5gemma eval`: metrics of a run's latest checkpoint on a task (or mixture) split.

  Attributes:
    wandb_project: W&B project of the eval's own run beside the training run's (`wandb_writer`);
      None: the training run's `TrainConfig.wandb_project` as its config.gin records it (no
      W&B when it had none); "": no W&B.
  """

  model: ModelConfig
  model_dir: str
  task: str
  run: RunOptions = RunOptions()
  split: str = "validation"
  task_feature_lengths: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: {"inputs": 256, "targets": 128})
  num_examples: Optional[int] = None
  decode: inference.DecodeConfig = inference.DecodeConfig()
  wandb_project: Optional[str] = None


def run_eval(cfg: EvalConfig) -> dict[str, dict[str, float]]:
  """`t5gemma eval`: the newest checkpoint's metrics, logged under its step.

  As one of several processes, each decodes its share; process 0 alone appends the results.
  """
  from t5gemma_jax import sharding
  sharding.maybe_initialize_distributed()
  # The step is fixed first and the params read at it: a step committed meanwhile by a run
  # still training cannot be logged under the previous step's number.
  step = inference.latest_step_everywhere(os.path.join(cfg.model_dir, "checkpoints"))
  params = inference.load_params(cfg.model, cfg.model_dir, step=step, run=cfg.run)
  project = wandb_project_of(cfg) if jax.process_index() == 0 else None
  tracker = None
  if project and cfg.wandb_project is None and not wandb_writer.installed():
    # Inherited from the training run, on a machine without wandb: the scores still go to
    # eval_results.jsonl and TensorBoard. An explicit EvalConfig.wandb_project fails below.
    print(f"t5gemma eval: the run logged to W&B project {project!r} but wandb is not "
          f"installed here ({wandb_writer.INSTALL_HINT}); evaluating without W&B",
          file=sys.stderr)
  elif project:
    tracker = wandb_writer.WandbWriter(cfg.model_dir, project, job_type="eval")
  d = cfg.decode
  try:
    return evaluate(params, cfg.model, cfg.task, cfg.split, cfg.task_feature_lengths,
                    max_new_tokens=d.max_new_tokens, batch_size=d.batch_size,
                    num_examples=cfg.num_examples, model_dir=cfg.model_dir, step=step,
                    run=cfg.run, **d.options())
  finally:
    if tracker is not None:
      tracker.close()


def wandb_project_of(cfg: EvalConfig) -> Optional[str]:
  """The W&B project `t5gemma eval` logs to: `cfg.wandb_project`, else the training run's
  (its config.gin's `TrainConfig.wandb_project`); None for none."""
  if cfg.wandb_project is not None:
    return cfg.wandb_project or None
  trained = config_gin.read_run(cfg.model_dir)
  project = trained.value("TrainConfig.wandb_project") if trained else None
  return project if isinstance(project, str) and project else None
