"""Paths that may be local or remote (gs://, s3://, ...): reading, listing and append logs.

MODEL_DIR and TFDS_DATA_DIR may live in a bucket. Local paths use the os module; anything
with a scheme goes through `tf.io.gfile` (imported only then). Object stores have no append
and no cheap rename, so `AppendLog` rewrites its whole (small) object on every write, and
whole-file writes upload a temporary object and rename it over the target.
"""

from __future__ import annotations

import os
from typing import Optional


def is_remote(path: str) -> bool:
  """Whether `path` names an object store or other non-local file system."""
  return "://" in str(path)


def _gfile():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # quiets most of TF's C++ start-up logs
  import tensorflow as tf
  return tf.io.gfile


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isfile(path: str) -> bool:
  if is_remote(path):
    g = _gfile()
    return g.exists(path) and not g.isdir(path)
  return os.path.isfile(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def replace_object(path: str, data: bytes) -> None:
  """Writes a remote object whole: uploaded under a temporary name, then renamed over `path`
  (file systems differ on whether opening for writing truncates; a rename replaces)."""
  g = _gfile()
  parent = os.path.dirname(path)
  if parent:
    g.makedirs(parent)
  tmp = f"{path}.tmp-{os.getpid()}"
  with g.GFile(tmp, "wb") as f:
    f.write(data)
  g.rename(tmp, path, overwrite=True)


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    with _gfile().GFile(path, "rb") as f:
      return f.read()
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def read_text_if_exists(path: str) -> Optional[str]:
  """The file's text, or None when it does not exist."""
  return read_text(path) if exists(path) else None


class AppendLog:
  """A text file that grows by whole lines (metrics.jsonl, eval_results.jsonl).

  Local files are opened for appending and flushed after each write. Remote objects cannot be
  appended to: the content (what was there when opened, plus new lines) is kept in memory and
  the object rewritten on each write, which is cheap for logs written every few steps.
  """

  def __init__(self, path: str):
    self.path = path
    self._remote = is_remote(path)
    parent = os.path.dirname(path)
    if parent:
      makedirs(parent)
    self._file = None
    self._lines: Optional[list[str]] = None
    if self._remote:
      self._lines = [read_text(path)] if exists(path) else []
    else:
      self._file = open(path, "a", encoding="utf-8")

  def write(self, text: str) -> None:
    """Appends `text` (whole lines, ending in a newline) and makes it durable."""
    if self._remote:
      self._lines.append(text)
      replace_object(self.path, "".join(self._lines).encode("utf-8"))
    else:
      self._file.write(text)
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self) -> "AppendLog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
