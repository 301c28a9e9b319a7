"""Writes training metrics to MODEL_DIR/metrics.jsonl and TensorBoard (process 0 only)."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax

from t5gemma_jax import run_files, storage


class MetricsWriter:
  """One JSON object per logged step in metrics.jsonl, and scalars under tensorboard/.

  Read metrics.jsonl with `storage.read_records`: in a bucket it is written as numbered parts
  (see `storage.AppendLog`).
  """

  def __init__(self, model_dir: str):
    """Opens the logs (on process 0; the others write nothing).

    Args:
      model_dir: the run directory, local or remote.
    """
    self._enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    # TensorFlow writes an event file in a bucket by uploading all of it at each flush: there
    # TensorBoard is flushed on TensorFlow's own period (2 minutes) rather than at each write.
    self._flush_tb = not storage.is_remote(model_dir)
    if self._enabled:
      # Append: a resumed run continues the same log (local or in a bucket).
      self._jsonl = storage.AppendLog(os.path.join(model_dir, run_files.METRICS))
      import tensorflow as tf
      self._tf = tf
      self._tb = tf.summary.create_file_writer(os.path.join(model_dir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Logs `metrics` under `step`; non-finite values are written as strings in the JSON.

    Args:
      step: the training step.
      metrics: name -> value (None: not measured this time, left out of TensorBoard).
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

  def close(self) -> None:
    """Uploads or fsyncs what is buffered and closes both logs."""
    if self._enabled:
      self._jsonl.close()
      self._tb.close()
