"""Writes training metrics to MODEL_DIR/metrics.jsonl and TensorBoard (process 0 only), and to
Weights & Biases when asked (`wandb_writer`)."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Optional

import jax

from t5gemma_jax import run_files, storage


class MetricsWriter:
  """One JSON object per logged step in metrics.jsonl, and scalars under tensorboard/.

  Read metrics.jsonl with `storage.read_records`: in a bucket it is written as numbered parts
  (see `storage.AppendLog`).
  """

  def __init__(self, model_dir: str, wandb_project: Optional[str] = None,
               config_gin: Optional[str] = None):
    """Opens the logs (on process 0; the others write nothing).

    Args:
      model_dir: the run directory, local or remote.
      wandb_project: also log every record to this W&B project (`wandb_writer.WandbWriter`).
      config_gin: the run's config.gin text: a TensorBoard text summary "config.gin" at step 0
        (`write_text`) and the W&B run's config.
    """
    self._enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._wandb = None
    # TensorFlow writes an event file in a bucket by uploading all of it at each flush: there
    # TensorBoard is flushed on TensorFlow's own period (2 minutes) rather than at each write.
    self._flush_tb = not storage.is_remote(model_dir)
    if self._enabled:
      if wandb_project is not None:  # first: without the package, fail before any log opens
        from t5gemma_jax.train import wandb_writer
        self._wandb = wandb_writer.WandbWriter(model_dir, wandb_project, config_gin)
      # Append: a resumed run continues the same log (local or in a bucket).
      self._jsonl = storage.AppendLog(os.path.join(model_dir, run_files.METRICS))
      import tensorflow as tf
      self._tf = tf
      self._tb = tf.summary.create_file_writer(os.path.join(model_dir, "tensorboard"))
      if config_gin is not None:
        # Step 0 as T5X: a resumed run's copy replaces the earlier one in TensorBoard's view.
        self.write_text("config.gin", config_gin, step=0)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Logs `metrics` under `step`; non-finite values are written as strings in the JSON.

    Args:
      step: the training step.
      metrics: name -> value (None: not measured this time, left out of TensorBoard and W&B).
    """
    if not self._enabled:
      return
    clean = {k: (float(v) if v is not None else None) for k, v in metrics.items()}
    record = {"step": int(step), **{k: (v if v is None or math.isfinite(v) else str(v))
                                   for k, v in clean.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    with self._tb.as_default(step=int(step)):
      for k, v in clean.items():
        if v is not None:
          self._tf.summary.scalar(k, v)
    if self._flush_tb:
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(step, clean)

  def write_text(self, name: str, text: str, step: int) -> None:
    """A TensorBoard text summary (its Text tab renders markdown): `text` goes in a fenced
    code block, so that it shows verbatim, line for line.

    Args:
      name: the summary's tag.
      text: any text.
      step: the step to file it under.
    """
    if not self._enabled:
      return
    fence = "````" if "```" in text else "```"
    with self._tb.as_default(step=int(step)):
      self._tf.summary.text(name, f"{fence}\n{text}\n{fence}")
    if self._flush_tb:
      self._tb.flush()

  def close(self) -> None:
    """Uploads or fsyncs what is buffered and closes the logs (and finishes the W&B run)."""
    if self._enabled:
      self._jsonl.close()
      self._tb.close()
      if self._wandb is not None:
        self._wandb.close()
