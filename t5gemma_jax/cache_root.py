"""The one folder this package caches into on the local machine: `$T5GEMMA_CACHE`, else
`~/.cache/t5gemma_jax`. The built-in corpora, the trained vocabularies and jax's compilation
cache (its `jax/` subfolder) live under it."""

from __future__ import annotations

import os

ENV = "T5GEMMA_CACHE"


def cache_root() -> str:
  """`$T5GEMMA_CACHE` when set and not empty, else `~/.cache/t5gemma_jax`."""
  return os.environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "t5gemma_jax")
