"""Writes files so that readers see the old content or the new one, never half of it.

Files are written under a temporary name beside the target and renamed over it; remote paths
(gs://, ...) the same way through `tf.io.gfile` (`storage.replace_object`).
"""

from __future__ import annotations

import os
import tempfile

from t5gemma_jax import storage


def write_bytes(path: str, data: bytes) -> None:
  """Replaces `path` with `data` atomically (creating the parent folder)."""
  if storage.is_remote(path):
    storage.replace_object(path, data)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """`write_bytes` for UTF-8 text."""
  write_bytes(path, text.encode("utf-8"))
