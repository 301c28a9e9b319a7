"""Damaged checkpoint steps: describing what is wrong, agreeing on it, and setting steps aside.

`Checkpointer.restore` falls back past steps whose files cannot be read. A damaged step is
renamed `<step>.damaged` rather than deleted: orbax lists only directories named by a bare step
number (and removes only its own `*.orbax-checkpoint-tmp*` debris), so the renamed step is
never listed, loaded or deleted again, the run can save that step anew, and the files are kept
for whoever wants to look at them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import re
import sys
import time
from typing import Iterator, Optional

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils


class DamagedCheckpointError(ValueError):
  """A checkpoint step whose files cannot be read (truncated, deleted)."""


def brief(error: BaseException) -> str:
  """'Type: message' of an error, without the specs tensorstore appends to it."""
  lines = str(error).strip().splitlines()
  text = re.split(r"\s*\[(?:tensorstore_spec|source locations)=", lines[0] if lines else "")[0]
  return f"{type(error).__name__}: {text[:600]}" if text else type(error).__name__


class ReadNoise:
  """What a `silence_read_noise` block knows: whether its read failed, when an echo came last."""

  def __init__(self):
    self.dropped = 0
    self._failed_at: Optional[float] = None
    self._last_echo = 0.0

  def failed(self) -> None:
    """Marks the read as failed: the block's exit waits for its leftovers to go quiet."""
    self._failed_at = time.monotonic()

  def _echo(self) -> None:
    self.dropped += 1
    self._last_echo = time.monotonic()

  def _linger(self, quiet_s: float, max_s: float) -> None:
    if self._failed_at is None:
      return
    deadline = self._failed_at + max_s
    while time.monotonic() < deadline:
      wait = max(self._failed_at, self._last_echo) + quiet_s - time.monotonic()
      if wait <= 0:
        return
      time.sleep(min(wait, 0.05))


@contextlib.contextmanager
def silence_read_noise(quiet_s: float = 0.5, max_linger_s: float = 5.0) -> Iterator[ReadNoise]:
  """Within the block, drops the echoes of a failed orbax read that Python would print.

  When one array of a step cannot be read, orbax's event loop closes while tensorstore still
  completes the other reads: their callbacks then raise 'Event loop is closed' (or a coroutine
  dies with the read error), printed as unraisable-error tracebacks after the real, already
  reported, error. A callback that tensorstore runs on its own thread reports the same
  'Event loop is closed' through `PyErr_Print`, i.e. `sys.excepthook`, which gets the same
  filter. The same reads' tasks, garbage-collected with their exception unretrieved, make
  asyncio log "Task exception was never retrieved": asyncio's logger is limited to CRITICAL.
  Other errors still reach the previous hooks.

  The hooks are process-wide, so they are installed only around the read (other threads may
  print while it is still failing), and the previous hooks and log level come back on exit,
  also when the block raises. A failed read's other reads still finish on tensorstore's
  threads for a moment after the failure is known: after `ReadNoise.failed()` the exit first
  waits until no echo has come for `quiet_s` (at most `max_linger_s`), then collects garbage so
  that leftover tasks and coroutines report into the filter rather than at interpreter exit.
  A nested block installs nothing more and shares the outer block's `ReadNoise`.

  Args:
    quiet_s: after a failed read, how long without echoes counts as over.
    max_linger_s: after a failed read, the longest wait for that.

  Yields:
    The block's `ReadNoise`: call `failed()` on it when the read failed.
  """
  outer = getattr(sys.unraisablehook, "_read_noise", None)
  if outer is not None:
    yield outer
    return
  noise = ReadNoise()
  asyncio_log = logging.getLogger("asyncio")
  previous_level = asyncio_log.level
  previous_unraisable, previous_excepthook = sys.unraisablehook, sys.excepthook

  def unraisable_hook(unraisable):
    error, source = unraisable.exc_value, unraisable.object
    code = getattr(source, "cr_code", None)
    if _loop_closed(error) or (code is not None and "orbax" in code.co_filename):
      noise._echo()
      return
    previous_unraisable(unraisable)

  def excepthook(kind, error, tb):
    if _loop_closed(error):
      noise._echo()
    else:
      previous_excepthook(kind, error, tb)

  unraisable_hook._read_noise = noise
  asyncio_log.setLevel(logging.CRITICAL)
  sys.unraisablehook, sys.excepthook = unraisable_hook, excepthook
  try:
    yield noise
  finally:
    try:
      noise._linger(quiet_s, max_linger_s)
      gc.collect()
    finally:
      # Restored only where still ours: a hook someone installed meanwhile is theirs to undo.
      if sys.unraisablehook is unraisable_hook:
        sys.unraisablehook = previous_unraisable
      if sys.excepthook is excepthook:
        sys.excepthook = previous_excepthook
      asyncio_log.setLevel(previous_level)


def _loop_closed(error: BaseException) -> bool:
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def recorded_items(step_dir: epath.Path) -> set[str]:
  """The items orbax recorded for a step (empty when its metadata cannot be read)."""
  try:
    return set(json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())["item_handlers"])
  except Exception:  # missing or damaged: no evidence either way
    return set()


def agree(problem: Optional[str]) -> Optional[str]:
  """Every process's verdict: what fails on one process fails on all, so that all take the
  same path through the collectives that follow."""
  if jax.process_count() == 1:
    return problem
  failed = multihost_utils.process_allgather(np.int32(problem is not None))
  if problem is None and np.any(failed):
    return f"failed on process(es) {np.flatnonzero(failed).tolist()}"
  return problem


def set_aside(directory: epath.Path, steps: list[int]) -> list[str]:
  """Renames each step directory to `<step>.damaged` (`-2`, `-3`, ... when taken).

  Process 0 renames; every process returns once it is done.

  Returns:
    'old path -> new name' for each step (on process 0; empty elsewhere).
  """
  moved, error = [], None
  if jax.process_index() == 0:
    for step in steps:
      source, n = directory / str(step), 1
      target = directory / f"{step}.damaged"
      while target.exists():
        n += 1
        target = directory / f"{step}.damaged-{n}"
      try:
        source.rename(target)
      except OSError as e:
        error = f"{source} could not be renamed ({e})"
        break
      moved.append(f"{source} -> {target.name}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("t5gemma_set_aside_damaged_checkpoints")
  error = agree(error)
  if error is not None:
    raise DamagedCheckpointError(f"damaged checkpoint {error}: move it away, then restart")
  return moved
