"""A `jax.profiler` trace of a window of training steps, for TensorBoard's Profile tab.

`TrainConfig.profile_steps = (first, count)` (gin: `--gin.PROFILE_STEPS='(5, 3)'`) traces steps
first .. first + count - 1, numbered as in metrics.jsonl (step 1 is the first step, the one that
compiles). The trace starts before step `first` fetches its batch and stops once the last
traced step has finished on the device, so it holds whole steps: the input pipeline, dispatch
and the device's ops. Each step is marked with a `StepTraceAnnotation` ("train N") that the
profile tools (overview page, input pipeline analyser) split the timeline by.

jax writes `LOGDIR/plugins/profile/<date_time>/<host>.xplane.pb`; the loop uses
MODEL_DIR/tensorboard as LOGDIR, so `tensorboard --logdir MODEL_DIR/tensorboard` shows it under
Profile (needs the `tensorboard-plugin-profile` package).

Only process 0 traces (its host and its local devices): every process runs the same SPMD
program, and processes sharing a machine would all write the same `<host>.xplane.pb`.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax


def check_window(value, name: str = "TrainConfig.profile_steps") -> Optional[tuple[int, int]]:
  """The window to trace, or None for none.

  Args:
    value: None or () (off), or (first step >= 1, number of steps >= 1).
    name: the setting, for the error message.

  Returns:
    (first, count), or None.

  Raises:
    ValueError: anything else, naming `name`.
  """
  if value is None or (isinstance(value, Sequence) and not isinstance(value, str)
                       and len(value) == 0):
    return None
  if (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
      and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
    return int(value[0]), int(value[1])
  raise ValueError(f"{name} must be (first step, number of steps) with positive integers, "
                   f"e.g. (5, 3), or () for no profile; got {value!r}")


class StepProfiler:
  """Starts and stops a trace around the steps of a window; the loop calls it every step.

  A run resumed inside the window traces the rest of it; one resumed past it traces nothing.
  A run that ends (or fails) inside the window still writes what it traced (`close`).
  """

  def __init__(self, window: Optional[tuple[int, int]], logdir: str,
               enabled: Optional[bool] = None):
    """Traces nothing until `begin` reaches the window.

    Args:
      window: `check_window`'s (first, count), or None (the profiler does nothing).
      logdir: the TensorBoard log directory the trace goes under.
      enabled: trace on this process (default: only on process 0).
    """
    if enabled is None:
      enabled = jax.process_index() == 0
    self._window = window if enabled else None
    self._logdir = logdir
    self._tracing = False
    self._annotation = None
    self.trace_dir: Optional[str] = None  # LOGDIR/plugins/profile once a trace is written

  def _in_window(self, step: int) -> bool:
    if self._window is None:
      return False
    first, count = self._window
    return first <= step < first + count

  def begin(self, step: int) -> None:
    """Call before step number `step` (1 for the run's first step) fetches its batch."""
    if not self._in_window(step):
      return
    if not self._tracing and self.trace_dir is None:
      jax.profiler.start_trace(self._logdir)
      self._tracing = True
    if self._tracing:
      self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
      self._annotation.__enter__()

  def end(self, step: int, outputs) -> None:
    """Call once step `step` is dispatched; after the window's last step, waits for `outputs`
    (the step's state and metrics) and writes the trace."""
    self._end_annotation()
    if self._tracing and step >= sum(self._window) - 1:
      jax.block_until_ready(outputs)  # the last step's device ops belong in the trace
      self._stop()

  def close(self) -> None:
    """Writes a trace still running (a run that stopped inside the window)."""
    self._end_annotation()
    if self._tracing:
      self._stop()

  def _end_annotation(self) -> None:
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    self._tracing = False
    self.trace_dir = os.path.join(self._logdir, "plugins", "profile")
