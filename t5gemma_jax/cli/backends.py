"""A quiet start: the terminal is for our own output.

TensorFlow's C++ banners and absl's advice go; on a machine without accelerators jax starts on
the CPU directly instead of initialising libtpu (installed for `t5gemma compile`), which would
print its own complaints and cost seconds. `t5gemma compile` still loads libtpu for its
topology.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
import tempfile
from typing import Iterator

# What TensorFlow's native code writes while it loads, before absl's C++ logging is set up (so
# TF_CPP_MIN_LOG_LEVEL does not reach it): on a CPU host a "no CUDA driver" line and oneDNN's
# advice, each preceded by absl's "before InitializeLog" notice, then a failed cuInit when GPUs
# are hidden from it. Only these lines are dropped.
NATIVE_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    r"STDERR|[IWE]\d{4} [\d:.]+ +\d+ (port\.cc|cudart_stub\.cc|cpu_feature_guard\.cc|"
    r"cuda_(dnn|fft|blas|executor|platform)\.cc|gpu_device\.cc):\d+\] .*)$")

# PCI vendor ids of accelerators jax can run on: Google (TPU), NVIDIA, AMD.
ACCELERATOR_VENDORS = frozenset({"0x1ae0", "0x10de", "0x1002"})


def host_has_accelerator() -> bool:
  """Whether this machine has a TPU or GPU on its PCI bus (True when that cannot be read)."""
  paths = glob.glob("/sys/bus/pci/devices/*/vendor")
  if not paths:
    return True
  for path in paths:
    try:
      with open(path) as f:
        if f.read().strip() in ACCELERATOR_VENDORS:
          return True
    except OSError:
      return True
  return False


@contextlib.contextmanager
def native_stderr_filtered(noise: re.Pattern = NATIVE_NOISE) -> Iterator[None]:
  """Captures what native code writes to file descriptor 2 inside the block (Python's
  sys.stderr included) and passes on every line that is not `noise`, once the block ends."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode("utf-8", "replace").splitlines(True)
              if not noise.match(line.rstrip("\n"))]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()


def quiet_start() -> None:
  """Sets the logging environment and platform before TensorFlow or a jax backend starts, then
  loads TensorFlow with its start-up lines filtered and its view of GPUs hidden (jax owns
  them)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if "JAX_PLATFORMS" not in os.environ and not host_has_accelerator():
    import jax
    jax.config.update("jax_platforms", "cpu")  # the backends start lazily, after this
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)
  if "tensorflow" not in sys.modules:
    with native_stderr_filtered():
      from t5gemma_jax.data import pipeline  # imports TensorFlow and seqio
      pipeline.hide_gpus_from_tensorflow()
