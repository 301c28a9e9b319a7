"""Damaged checkpoint steps: describing what is wrong, agreeing on it, and setting steps aside.

`Checkpointer.restore` falls back past steps whose files cannot be read. A damaged step is
renamed `<step>.damaged` rather than deleted: orbax lists only directories named by a bare step
number (and removes only its own `*.orbax-checkpoint-tmp*` debris), so the renamed step is
never listed, loaded or deleted again, the run can save that step anew, and the files are kept
for whoever wants to look at them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Optional

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


def silence_read_noise() -> None:
  """Drops the echoes of a failed orbax read that Python would print as unraisable errors.

  When one array of a step cannot be read, orbax's event loop closes while tensorstore still
  completes the other reads: their callbacks then raise 'Event loop is closed' (or a coroutine
  dies with the read error), often at interpreter exit, printed as tracebacks after the real,
  already reported, error. Other unraisable errors still reach the previous hook. The same
  reads' tasks, garbage-collected with their exception unretrieved, make asyncio log "Task
  exception was never retrieved" with a traceback: asyncio's logger is limited to CRITICAL.
  A callback that tensorstore runs on its own thread reports the same 'Event loop is closed'
  through `PyErr_Print`, i.e. `sys.excepthook`, which gets the same filter. Installed before
  each step is read: those threads may print while the read is still failing.
  """
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  previous = sys.unraisablehook
  if getattr(previous, "_drops_read_noise", False):
    return

  def hook(unraisable):
    error, source = unraisable.exc_value, unraisable.object
    code = getattr(source, "cr_code", None)
    if _loop_closed(error) or (code is not None and "orbax" in code.co_filename):
      return
    previous(unraisable)

  previous_excepthook = sys.excepthook

  def excepthook(kind, error, tb):
    if not _loop_closed(error):
      previous_excepthook(kind, error, tb)

  hook._drops_read_noise = True
  sys.unraisablehook = hook
  sys.excepthook = excepthook


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
