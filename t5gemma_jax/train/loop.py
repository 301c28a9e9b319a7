"""The training loop: sharded state, data, steps, evaluation, metrics and checkpoints.

`run(TrainConfig)` resumes from the latest checkpoint in `model_dir` when there is one (params,
optimizer state, step and data position), so a preempted job is simply started again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from typing import Mapping, Optional

import flax.linen as nn
import jax

from t5gemma_jax import (atomic, checkpoint, compile_cache, evaluation, inference, params_reader,
                         run_files, sharding, storage)
from t5gemma_jax.config import ModelConfig, is_decoder_only
from t5gemma_jax.data import pipeline
from t5gemma_jax.model import abstract_params
from t5gemma_jax.run_options import RunOptions
from t5gemma_jax.train import (flops, optim, profiling, progress as progress_lib,
                               step as step_lib)
from t5gemma_jax.train.losses import LossConfig
from t5gemma_jax.train.metrics_writer import MetricsWriter
from t5gemma_jax.train.step_log import StepLog


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run needs (gin binds it from macros such as TRAIN_STEPS).

  Attributes:
    model: the architecture (what `model_config.json` records).
    run: how this run computes it: dtypes, layer scan, remat, attention kernel.
    mixture_or_task, task_feature_lengths, batch_size: data (global batch in rows).
    train_steps: the step to stop at (a resumed run continues up to it).
    model_dir: checkpoints, metrics.jsonl, tensorboard/ and config.gin go here.
    checkpoint_period, keep_checkpoints: save every N steps, keep the last K.
    keep_best: also keep the checkpoint with the lowest validation loss.
    eval_period, eval_steps, eval_split: validation loss every N steps over M batches.
    seed: parameters, dropout and data order.
    num_microbatches: gradient accumulation steps per batch.
    optimizer, loss, mesh: their configs.
    log_period: steps between metric records (their fields: `step_log`), e.g. loss,
      step_seconds and its data_wait_seconds / device_wait_seconds (is the input the bottleneck).
    profile_steps: (first step, count): a `jax.profiler` trace of those steps under
      MODEL_DIR/tensorboard (TensorBoard's Profile tab; see `profiling`); () or None: off.
    init_from: fine-tune: take params (only) from this run directory's latest checkpoint.
    peak_flops: per-device peak FLOP/s for MFU when the device is not in the table.
    pack: pack examples into rows.
    shuffle: shuffle training examples (seeded).
    progress: show progress: a tqdm bar on a terminal, else one line per log period.
    eval_tasks: tasks to decode and score (BLEU, ROUGE, ...) every `eval_tasks_period` steps
      (0: at the end only) on `eval_examples` validation examples each, with `decode`.
    show_examples: decoded validation examples per eval task to put in the summary.
    log_batches: append {"step", "crc32"} of every training batch (this process's part) to
      MODEL_DIR/batches_p{process}.jsonl, to check exact data resumption.
    compilation_cache: jax's persistent compilation cache folder (local or gs://); None:
      `compile_cache.default_dir()` ($T5GEMMA_CACHE); "": off.
    wandb_project: also log to this Weights & Biases project (process 0; see `wandb_writer`).
  """

  model: ModelConfig
  mixture_or_task: str
  task_feature_lengths: Mapping[str, int]
  batch_size: int
  train_steps: int
  model_dir: str
  optimizer: optim.OptimizerConfig
  run: RunOptions = RunOptions()
  checkpoint_period: int = 1000
  keep_checkpoints: int = 3
  keep_best: bool = False
  eval_period: int = 1000
  eval_steps: int = 20
  eval_split: str = "validation"
  seed: int = 0
  num_microbatches: int = 1
  loss: LossConfig = LossConfig()
  mesh: sharding.MeshConfig = sharding.MeshConfig()
  log_period: int = 10
  profile_steps: Optional[tuple[int, int]] = None
  init_from: Optional[str] = None
  peak_flops: Optional[float] = None
  pack: bool = True
  shuffle: bool = True
  progress: bool = True
  eval_tasks: tuple[str, ...] = ()
  eval_tasks_period: int = 0
  eval_examples: Optional[int] = 64
  show_examples: int = 0
  decode: inference.DecodeConfig = inference.DecodeConfig()
  log_batches: bool = False
  compilation_cache: Optional[str] = None
  wandb_project: Optional[str] = None

  def __post_init__(self):
    for name in ("batch_size", "train_steps", "checkpoint_period", "keep_checkpoints",
                 "num_microbatches", "log_period"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
    for name in ("eval_period", "eval_steps", "eval_tasks_period", "seed"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"TrainConfig.{name} must be a non-negative integer, got {value!r}")
    lengths = self.task_feature_lengths
    if not isinstance(lengths, Mapping) or set(lengths) != {"inputs", "targets"} or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in lengths.values()):
      raise ValueError('TrainConfig.task_feature_lengths must be {"inputs": N, "targets": M} '
                       f"with positive integers, got {lengths!r}")
    if not isinstance(self.model_dir, str) or not self.model_dir:
      raise ValueError(f"TrainConfig.model_dir must be a path, got {self.model_dir!r}")
    window = profiling.check_window(self.profile_steps)
    if window is not None and window[0] > self.train_steps:
      raise ValueError(f"TrainConfig.profile_steps {self.profile_steps!r} starts after the "
                       f"last step (train_steps {self.train_steps})")
    object.__setattr__(self, "profile_steps", window)  # () and lists -> None / a tuple


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (save, then exit cleanly)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _vocabulary(cfg: TrainConfig):
  return pipeline.get_mixture_or_task(cfg.mixture_or_task).output_features["targets"].vocabulary


def _check_vocabulary(cfg: TrainConfig) -> None:
  """Token ids beyond the embedding would be silently clamped by the lookup: refuse them."""
  size = _vocabulary(cfg).vocab_size
  if size > cfg.model.vocab_size:
    raise ValueError(f"task {cfg.mixture_or_task!r} uses a vocabulary of {size} ids but the "
                     f"model's vocab_size is {cfg.model.vocab_size}: use a model with "
                     f"vocab_size >= {size} (or a smaller vocabulary, e.g. "
                     "data_settings.builtin_vocab_size)")


def _data(cfg: TrainConfig, split: str, train: bool) -> pipeline.DataConfig:
  return pipeline.DataConfig(cfg.mixture_or_task, cfg.task_feature_lengths, cfg.batch_size,
                             split=split, shuffle=train and cfg.shuffle, seed=cfg.seed,
                             pack=cfg.pack, num_epochs=None if train else 1,
                             decoder_only=is_decoder_only(cfg.model))


def evaluate(eval_step, params, cfg: TrainConfig, batch_sharding) -> Optional[float]:
  """Mean validation loss per target token over up to `eval_steps` batches (None when the
  task has no such split)."""
  if cfg.eval_split not in pipeline.get_mixture_or_task(cfg.mixture_or_task).splits:
    return None
  batches = pipeline.GlobalBatches(pipeline.host_dataset(_data(cfg, cfg.eval_split, False)),
                                   batch_sharding)
  total = weight = 0.0
  for _, batch in zip(range(cfg.eval_steps), batches):
    sums = jax.device_get(eval_step(params, batch))
    total += float(sums["loss"])
    weight += float(sums["weight"])
  return total / weight if weight else None


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted steps of a run and the state layout they expect.

  Attributes:
    train: `train(state, batch, rng) -> (state, metrics)`, state donated.
    evaluate: `evaluate(params, batch) -> loss sums`.
    abstract: the TrainState as ShapeDtypeStructs with shardings; shardings: its shardings.
    optimizer: the optax transformation.
    batch_sharding: how every [batch, ...] input is placed.
  """

  train: object
  evaluate: object
  abstract: object
  shardings: object
  optimizer: object
  batch_sharding: object


def check_batch(cfg: TrainConfig, mesh, batch_size: Optional[int] = None) -> None:
  """The global batch must split over the data-parallel devices and into microbatches."""
  rows = cfg.batch_size if batch_size is None else batch_size
  parallel = sharding.data_parallel_size(mesh)
  if rows % parallel:
    raise ValueError(f"batch_size {rows} is not divisible by the data-parallel size "
                     f"{parallel} of mesh {dict(mesh.shape)}: change BATCH_SIZE or "
                     "MeshConfig.ici")
  if rows % (parallel * cfg.num_microbatches):
    raise ValueError(f"batch_size {rows} does not split into {cfg.num_microbatches} "
                     f"microbatches of a multiple of the data-parallel size {parallel}")


def build_steps(cfg: TrainConfig, mesh) -> Steps:
  """The exact jitted train and eval steps `run` executes on `mesh` (also what
  `t5gemma compile` lowers for a TPU topology)."""
  schedule = optim.make_schedule(cfg.optimizer.schedule)
  optimizer = optim.make_optimizer(cfg.optimizer,
                                   abstract_params(cfg.model, cfg.run, boxed=False))
  abstract, shardings = step_lib.state_shardings(cfg.model, optimizer, mesh, cfg.run)
  train, evaluate = step_lib.jit_steps(
      step_lib.make_train_step(cfg.model, optimizer, cfg.loss, cfg.num_microbatches, schedule,
                               run=cfg.run),
      step_lib.make_eval_step(cfg.model, cfg.loss, cfg.run), shardings, mesh)
  return Steps(train, evaluate, abstract, shardings, optimizer, sharding.batch_sharding(mesh))


def run(cfg: TrainConfig, extra_files: Optional[Mapping[str, str]] = None) -> dict:
  """Trains until `cfg.train_steps` (or SIGTERM) and returns a summary dict.

  Args:
    cfg: the run.
    extra_files: {file name: text} written into `model_dir` once the run is set up (e.g. the
      CLI's config.gin). Nothing is written before: a run that fails while being set up
      (bad data, mesh, vocabulary, checkpoint) leaves no directory behind that it created.
  """
  started = time.perf_counter()
  cache_dir = compile_cache.enable(cfg.compilation_cache)
  sharding.maybe_initialize_distributed()
  pipeline.hide_gpus_from_tensorflow()
  mesh = sharding.make_mesh(cfg.mesh)
  check_batch(cfg, mesh)
  _check_vocabulary(cfg)
  steps = build_steps(cfg, mesh)
  abstract, shardings, batch_sh = steps.abstract, steps.shardings, steps.batch_sharding
  data = pipeline.GlobalBatches(pipeline.host_dataset(_data(cfg, "train", True)), batch_sh,
                                fingerprint=cfg.log_batches)
  fresh_dir = not storage.exists(cfg.model_dir)
  try:
    ckpt = checkpoint.Checkpointer(os.path.join(cfg.model_dir, "checkpoints"),
                                   save_every=cfg.checkpoint_period, keep=cfg.keep_checkpoints,
                                   keep_best="validation_loss" if cfg.keep_best else None)
    if ckpt.latest_step() is not None:
      state = ckpt.restore(None, abstract, data_iterator=data)
      start = "resumed"
    else:
      state, _ = step_lib.init_state(cfg.model, steps.optimizer, mesh, cfg.seed, shardings,
                                     cfg.run)
      start = "initialised"
      if cfg.init_from:
        params = params_reader.ParamsReader(cfg.init_from).read(abstract.params, cfg=cfg.model)
        state = state.replace(params=params)
        start = f"fine-tuning from {cfg.init_from}"
    try:
      first_batch = next(data) if int(jax.device_get(state.step)) < cfg.train_steps else None
    except StopIteration:
      raise ValueError(f"task {cfg.mixture_or_task!r} yields no training examples (empty "
                       "data, or every example filtered out)") from None
  except BaseException:
    if fresh_dir and jax.process_index() == 0 and not storage.is_remote(cfg.model_dir):
      shutil.rmtree(cfg.model_dir, ignore_errors=True)
    raise
  if jax.process_index() == 0:  # the model files are read by export
    run_files.write_model_files(cfg.model, cfg.model_dir)
    run_files.write_vocabulary(_vocabulary(cfg), cfg.model_dir)
    for name, text in (extra_files or {}).items():
      atomic.write_text(os.path.join(cfg.model_dir, name), text)
  batch_log = (storage.AppendLog(os.path.join(cfg.model_dir,
                                              f"batches_p{jax.process_index()}.jsonl"))
               if cfg.log_batches else None)

  train_step, eval_step = steps.train, steps.evaluate
  lengths = cfg.task_feature_lengths
  step_flops = flops.training_flops_per_step(cfg.model, cfg.batch_size, lengths["inputs"],
                                             lengths["targets"])
  peak = flops.peak_flops(override=cfg.peak_flops)
  writer = MetricsWriter(cfg.model_dir, cfg.wandb_project, (extra_files or {}).get("config.gin"))
  preemption = _Preemption()
  rng = jax.random.PRNGKey(cfg.seed + 1)
  first = int(jax.device_get(state.step))
  log = StepLog(writer, _progress(cfg, first), cfg.log_period, cfg.train_steps, step_flops,
                peak, first)
  profiler = profiling.StepProfiler(cfg.profile_steps, os.path.join(cfg.model_dir,
                                                                    "tensorboard"))
  summary = {"start": start, "first_step": first, "model_dir": cfg.model_dir,
             "compilation_cache": cache_dir}
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
      step, pending = first, None
      while step < cfg.train_steps:
        profiler.begin(step + 1)
        batch = first_batch if first_batch is not None else log.next_batch(data)
        first_batch = None
        if batch_log is not None:
          batch_log.write(json.dumps({"step": step, "crc32": data.last_fingerprint}) + "\n")
        state, metrics = train_step(state, batch, rng)
        step += 1
        profiler.end(step, (state, metrics))
        if step == first + 1:  # set-up, data and compiles: what the compilation cache saves
          log.block(metrics)
          summary["seconds_to_first_step"] = time.perf_counter() - started
        # Read the previous step's metrics while this one runs: the device never waits for the
        # host, except at the points below where the current loss must be known.
        if pending is not None:
          log.consume(*pending)
        pending = (step, metrics)
        evaluating = cfg.eval_period and (step % cfg.eval_period == 0
                                          or step == cfg.train_steps)
        saving = (step % cfg.checkpoint_period == 0 or step == cfg.train_steps
                  or preemption.requested)
        if evaluating or saving:
          log.consume(*pending)  # a NaN raises here, before anything is saved
          pending = None
        val = None
        if evaluating:
          val = evaluate(eval_step, state.params, cfg, batch_sh)
          if val is not None:
            writer.write(step, {"validation_loss": val})
            log.history["validation_loss"] = val
        ckpt.save(step, state, data_iterator=data, force=saving,
                  metrics=None if val is None else {"validation_loss": val})
        period = cfg.eval_tasks_period
        if cfg.eval_tasks and ((period and step % period == 0) or step == cfg.train_steps):
          summary["metrics_by_task"] = _score_tasks(cfg, state.params, step)
        if preemption.requested:
          summary["preempted"] = True
          break
  finally:
    profiler.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    if batch_log is not None:
      batch_log.close()
    preemption.restore()
    log.close()
  if cfg.show_examples and cfg.eval_tasks and not summary.get("preempted"):
    summary["examples"] = {
        task: inference.task_records(state.params, cfg.model, task, cfg.eval_split,
                                      cfg.task_feature_lengths["inputs"], cfg.show_examples,
                                      cfg.decode, cfg.run) for task in cfg.eval_tasks}
  summary.update(log.history, last_step=int(jax.device_get(state.step)),
                 eval_split=cfg.eval_split, eval_examples=cfg.eval_examples,
                 checkpoints=os.path.join(cfg.model_dir, "checkpoints"),
                 metrics=os.path.join(cfg.model_dir, run_files.METRICS),
                 tensorboard=os.path.join(cfg.model_dir, "tensorboard"),
                 profile=profiler.trace_dir)
  return summary


def _score_tasks(cfg: TrainConfig, params, step: int) -> dict:
  """Decodes each eval task's validation examples and computes its metrics."""
  results = {}
  d = cfg.decode
  for task in cfg.eval_tasks:
    results.update(evaluation.evaluate(
        params, cfg.model, task, cfg.eval_split, cfg.task_feature_lengths,
        max_new_tokens=d.max_new_tokens, batch_size=d.batch_size,
        num_examples=cfg.eval_examples, model_dir=cfg.model_dir, step=step, run=cfg.run,
        **d.options()))
  return results


def _progress(cfg: TrainConfig, first: int):
  if not cfg.progress or jax.process_index() != 0:
    return None
  return progress_lib.make(cfg.train_steps, first)
