"""How a training run reports progress on the console.

On a terminal, a tqdm bar that redraws in place. Anywhere else (CI logs, `tee`, a TPU worker's
log file) carriage-return redraws would pile up in the file, so the run prints one plain line
per log period instead.
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO


class BarProgress:
  """A tqdm bar: advanced every step, its postfix the latest loss (and throughput)."""

  def __init__(self, total: int, first: int):
    from tqdm import tqdm
    self._bar = tqdm(total=total, initial=first, desc="train", unit="step", dynamic_ncols=True)

  def step(self, step: int, loss: float) -> None:
    self._bar.update(step - self._bar.n)
    self._bar.set_postfix(loss=f"{loss:.3f}")

  def record(self, step: int, record: dict) -> None:
    self._bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")

  def close(self) -> None:
    self._bar.close()


class LineProgress:
  """One line per metrics record: `train step 40/400 loss 5.123 tok/s 1234 step 0.21 s`."""

  def __init__(self, total: int, stream: Optional[TextIO] = None):
    self._total, self._stream = total, stream

  def step(self, step: int, loss: float) -> None:
    del step, loss  # only records are printed

  def record(self, step: int, record: dict) -> None:
    stream = self._stream or sys.stderr
    stream.write(f"train step {step}/{self._total} loss {record['loss']:.4f} "
                 f"tok/s {record['tokens_per_s']:.0f} step {record['step_seconds']:.3g} s\n")
    stream.flush()

  def close(self) -> None:
    pass


def make(total: int, first: int, stream: Optional[TextIO] = None):
  """A `BarProgress` when `stream` (default stderr, where tqdm draws) is a terminal, else a
  `LineProgress`."""
  stream = stream or sys.stderr
  if stream.isatty():
    return BarProgress(total, first)
  return LineProgress(total, stream)
