"""Writes files so that readers see the old content or the new one, never half of it.

Local files are written under a temporary name beside the target, fsynced and renamed over
it, and the folder is fsynced: after a crash the name holds the old content or all of the new.
On an object store an upload is already all-or-nothing (`storage.replace_object`).
"""

from __future__ import annotations

import os
import tempfile

from t5gemma_jax import storage


def write_bytes(path: str, data: bytes) -> None:
  """Replaces `path` with `data` atomically and durably (creating the parent folder).

  Args:
    path: a local path or a URI (gs://...).
    data: the new content.
  """
  if storage.is_remote(path):
    storage.replace_object(path, data)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      # Before the rename: otherwise a crash can leave the new name pointing at a file whose
      # data never reached the disk (an empty or zero-filled file on ext4 and others).
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
  """Makes a rename in `directory` durable: the new entry is on disk once this returns."""
  if os.name != "posix":  # Windows cannot open a folder; NTFS journals the rename itself
    return
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  except OSError:  # some file systems (FUSE mounts, some network ones) refuse it: no worse
    pass
  finally:
    os.close(fd)


def write_text(path: str, text: str) -> None:
  """`write_bytes` for UTF-8 text.

  Args:
    path: a local path or a URI.
    text: the new content.
  """
  write_bytes(path, text.encode("utf-8"))
