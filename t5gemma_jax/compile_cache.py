"""jax's persistent compilation cache, on by default for every run.

A run compiles its train step, eval step and decoding loop once per shape; with the cache, a
second run of the same program on the same jax/libtpu (a restart, a resumed preemption, the
next seed of a sweep) loads the executables instead of compiling them.

Where: `TrainConfig.compilation_cache` (gin) for training, else `jax/` under the package's
cache folder (`$T5GEMMA_CACHE`, else `~/.cache/t5gemma_jax`); `t5gemma infer` and `eval` use
the latter. Local folders and gs:// paths both work (jax reads and writes them through
etils.epath). "" turns the cache off.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

from t5gemma_jax import cache_root

ENV = cache_root.ENV
# Compiles shorter than this are not worth a file (jax's own default is 1 s).
MIN_COMPILE_SECONDS = 0.5


def default_dir() -> str:
  """`jax/` under `cache_root.cache_root()`."""
  return os.path.join(cache_root.cache_root(), "jax")


def enable(path: Optional[str] = None) -> Optional[str]:
  """Points jax's persistent compilation cache at `path` (None: `default_dir()`; "": off).

  Call before the first compile of the process; later calls change the folder only if jax
  has not opened its cache yet (it keeps the first one it opened).

  Returns:
    The folder in use, or None when the cache is off.
  """
  if path == "":
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  path = default_dir() if path is None else path
  if "://" not in path:
    os.makedirs(path, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return path
