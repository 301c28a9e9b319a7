"""The training loop's per-step metrics: NaN check, progress bar and the metrics.jsonl records.

Every `log_period` steps (and at the last step) one record goes to metrics.jsonl and TensorBoard
with the train step's own metrics (loss, grad_norm, learning_rate, real_tokens, ...) for that
step and, averaged over the steps since the previous record:

  step_seconds: wall-clock seconds per step (everything: data, device, evaluation, checkpoints).
  tokens_per_s, tflops_per_device, mfu: throughput over the same span.
  data_wait_seconds: seconds per step the host waited for the next batch (`next(data)`: the
    input pipeline and the batch's device_put).
  device_wait_seconds: seconds per step the host waited for the device (reading the step's
    metrics, `block_until_ready`).

The loop reads step N's metrics while step N+1 runs, so on a device-bound run
device_wait_seconds is close to step_seconds and data_wait_seconds near 0; a large
data_wait_seconds means the input pipeline is the bottleneck. What remains of step_seconds is
the host's own time: dispatch, logging, evaluation and checkpoints.
"""

from __future__ import annotations

import time
from typing import Iterator, Optional

import jax
import numpy as np

from t5gemma_jax.train import flops
from t5gemma_jax.train.metrics_writer import MetricsWriter


def _check_finite(step: int, loss: float) -> None:
  if not np.isfinite(loss):
    raise FloatingPointError(f"loss is {loss} at step {step}: stopping without saving this "
                             "state (lower the learning rate, check the data, or resume from "
                             "the last checkpoint)")


class StepLog:
  """Per-step metrics -> NaN check, progress bar and, every `log_period` steps, a record.

  `history` holds the latest train_loss, tokens_per_s (and validation_loss, set by the loop) for
  the run's summary.
  """

  def __init__(self, writer: MetricsWriter, bar, log_period: int, train_steps: int,
               step_flops: float, peak: Optional[float], first: int):
    """Starts the clock of the first record.

    Args:
      writer: where records go.
      bar: a `progress` reporter, or None.
      log_period, train_steps: a record every `log_period` steps and at `train_steps`.
      step_flops: model FLOPs per training step (MFU, TFLOP/s).
      peak: per-device peak FLOP/s, or None (no MFU).
      first: the step the run starts from.
    """
    self._writer, self._bar = writer, bar
    self._period, self._last = log_period, train_steps
    self._flops, self._peak = step_flops, peak
    self._since, self._since_step, self._tokens = time.perf_counter(), first, 0.0
    self._data_wait = self._device_wait = 0.0
    self.history: dict = {}

  def next_batch(self, data: Iterator):
    """`next(data)`, its time counted as data wait."""
    start = time.perf_counter()
    try:
      return next(data)
    finally:
      self._data_wait += time.perf_counter() - start

  def block(self, outputs) -> None:
    """`jax.block_until_ready(outputs)`, its time counted as device wait."""
    start = time.perf_counter()
    jax.block_until_ready(outputs)
    self._device_wait += time.perf_counter() - start

  def consume(self, step: int, device_metrics) -> None:
    """Reads step `step`'s metrics from the device (waiting for the step), checks the loss and
    writes a record when one is due.

    Raises:
      FloatingPointError: the loss is NaN or infinite.
    """
    start = time.perf_counter()
    host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    self._device_wait += time.perf_counter() - start
    _check_finite(step, host["loss"])
    self._tokens += host["real_tokens"]
    if self._bar is not None:
      self._bar.step(step, host["loss"])
    if step % self._period and step != self._last:
      return
    now = time.perf_counter()
    elapsed = max(now - self._since, 1e-9)
    steps = max(step - self._since_step, 1)
    seconds = elapsed / steps
    devices = jax.device_count()
    record = dict(host, tokens_per_s=self._tokens / elapsed, step_seconds=seconds,
                  data_wait_seconds=self._data_wait / steps,
                  device_wait_seconds=self._device_wait / steps,
                  tflops_per_device=flops.tflops_per_device(self._flops, seconds, devices),
                  mfu=(flops.model_flops_utilization(self._flops, seconds, devices, self._peak)
                       if self._peak else None))
    self._writer.write(step, record)
    self.history.update(train_loss=record["loss"], tokens_per_s=record["tokens_per_s"])
    self._since, self._since_step, self._tokens = now, step, 0.0
    self._data_wait = self._device_wait = 0.0
    if self._bar is not None:
      self._bar.record(step, record)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
