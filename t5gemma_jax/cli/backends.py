"""A quiet start: the terminal is for our own output.

TensorFlow's C++ banners and absl's advice go; on a machine without accelerators jax starts on
the CPU directly instead of initialising libtpu (installed for `t5gemma compile`), which would
print its own complaints and cost seconds. `t5gemma compile` still loads libtpu for its
topology.
"""

from __future__ import annotations

import glob
import os

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


def quiet_start() -> None:
  """Sets the logging environment and platform before TensorFlow or a jax backend starts."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if "JAX_PLATFORMS" not in os.environ and not host_has_accelerator():
    import jax
    jax.config.update("jax_platforms", "cpu")  # the backends start lazily, after this
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)
