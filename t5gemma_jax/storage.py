"""Paths that may be local or in an object store (gs://, s3://, ...): reading and append logs.

MODEL_DIR and TFDS_DATA_DIR may live in a bucket. Every path goes through `etils.epath`, the
path layer orbax uses for the checkpoints, so a run's files and its checkpoints are reached the
same way. epath serves gs://, s3://, az:// and hf://: through `tf.io.gfile` when TensorFlow is
installed, else through fsspec (`gcsfs` for gs://, `s3fs` for s3://: `etils[epath-gcs]`,
`etils[epath-s3]`). Other schemes are refused rather than taken for local folder names.

Object stores have no append: `AppendLog` writes a log there as numbered part objects, one per
flush (see `AppendLog`), and `read_text`, `read_lines` and `read_records` read a log in either
layout.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import json
import os
import re
import secrets
import time
from typing import Iterator, Optional

from etils import epath

# Local folders treated as object stores (`simulate_object_store`): tests run the remote code
# paths on a temporary folder, without a network.
_SIMULATED_ROOTS: list[str] = []

PART = ".part-"  # `metrics.jsonl` in a bucket: metrics.jsonl.part-000001-<writer>, ...
_PART_NAME = re.compile(r"\.part-(\d+)-([0-9a-z]+)$")


def is_remote(path: str) -> bool:
  """Whether `path` names an object store (or a folder simulating one in tests).

  Args:
    path: a local path or a URI such as gs://bucket/run.

  Returns:
    True for any path with a scheme, and for paths under `simulate_object_store` roots.
  """
  path = os.fspath(path)
  if "://" in path:
    return True
  return any(_under(path, root) for root in _SIMULATED_ROOTS)


def _under(path: str, root: str) -> bool:
  path = os.path.abspath(path)
  return path == root or path.startswith(root + os.sep)


@contextlib.contextmanager
def simulate_object_store(root: str) -> Iterator[None]:
  """Within the block, paths under the local folder `root` take the object-store code paths.

  For tests: the code written for buckets (object-per-flush logs, whole-object writes) runs
  against a temporary folder, and its reads and writes can be inspected there.

  Args:
    root: a local folder.
  """
  root = os.path.abspath(root)
  _SIMULATED_ROOTS.append(root)
  try:
    yield
  finally:
    _SIMULATED_ROOTS.remove(root)


def to_path(p: str) -> epath.Path:
  """`p` as an `epath.Path`.

  Args:
    p: a local path or a URI.

  Returns:
    The path, on the backend epath picks for its scheme.

  Raises:
    ValueError: for a scheme epath has no backend for (pathlib would otherwise collapse
      'ram://x' into the local relative path 'ram:/x').
  """
  try:
    return epath.Path(p)
  except KeyError:
    raise ValueError(f"{p}: unsupported scheme (epath reads gs://, s3://, az://, hf:// "
                     "and local paths)") from None


def exists(p: str) -> bool:
  """Whether a file or directory exists at `p` (an append log's parts do not count)."""
  return to_path(p).exists()


def isfile(p: str) -> bool:
  """Whether `p` exists and is not a directory."""
  return to_path(p).is_file()


def makedirs(p: str) -> None:
  """Creates the directory `p` and its parents (on object stores: a placeholder, if any)."""
  to_path(p).mkdir(parents=True, exist_ok=True)


def replace_object(p: str, data: bytes) -> None:
  """Writes the object `p` whole, replacing any previous one.

  An object store's upload is atomic (readers see the old object or the new one), so the data
  is written under its final name: uploading a temporary object and renaming it would copy it
  a second time, and leave the temporary behind if the writer were killed in between.

  Args:
    p: the object's path.
    data: its new content.
  """
  target = to_path(p)
  if "://" not in os.fspath(p):  # a simulated store: the folder must exist, as on a disk
    target.parent.mkdir(parents=True, exist_ok=True)
  with target.open("wb") as f:
    f.write(data)


def read_bytes(p: str) -> bytes:
  """The content of the file `p` (FileNotFoundError when missing)."""
  return to_path(p).read_bytes()


def read_text(p: str) -> str:
  """The UTF-8 text of the file `p`, followed by the parts an `AppendLog` wrote for it.

  Args:
    p: a file, or an append log in either layout (one file, or numbered parts).

  Returns:
    The text.

  Raises:
    FileNotFoundError: when neither the file nor any part exists.
  """
  text = read_text_if_exists(p)
  if text is None:
    raise FileNotFoundError(p)
  return text


def read_text_if_exists(p: str) -> Optional[str]:
  """`read_text`, or None when neither the file nor any part of it exists."""
  chunks = []
  try:  # one request where an existence check and a read would be two
    chunks.append(to_path(p).read_bytes())
  except FileNotFoundError:
    pass
  parts = log_parts(p)
  if not chunks and not parts:
    return None
  # A log has a part per flush period (a minute): a week-long run has some ten thousand,
  # minutes of round trips one after the other, seconds when many are in flight.
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    chunks.extend(pool.map(lambda part: to_path(part).read_bytes(), parts))
  # A line cut short by a killed writer stays a line of its own, not the next one's start.
  return b"".join(c if c.endswith(b"\n") or i == len(chunks) - 1 else c + b"\n"
                  for i, c in enumerate(chunks)).decode("utf-8")


def read_lines(p: str) -> list[str]:
  """The lines of an append log (either layout; [] when it does not exist), newlines dropped.

  Args:
    p: the log's path, e.g. MODEL_DIR/metrics.jsonl.

  Returns:
    Its lines in the order they were written.
  """
  return (read_text_if_exists(p) or "").splitlines()


def read_records(p: str) -> list[dict]:
  """The JSON objects of a JSON-lines log (metrics.jsonl, eval_results.jsonl, batch logs).

  Args:
    p: the log's path.

  Returns:
    One dict per line, in order; a line that is not JSON (cut short by a killed writer) is
    skipped.
  """
  records = []
  for line in read_lines(p):
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict):
      records.append(record)
  return records


def log_parts(p: str) -> list[str]:
  """The part objects an object-store `AppendLog` wrote for `p`, in writing order.

  Args:
    p: the log's path.

  Returns:
    Their paths, sorted by part number (then writer, for writers that ran at the same time).
  """
  target = to_path(p)
  found = []
  # glob rather than listdir: a store lists by prefix, and a missing folder is no error.
  for part in target.parent.glob(glob.escape(target.name) + PART + "*"):
    match = _PART_NAME.search(part.name)
    if match and part.name[:match.start()] == target.name:
      found.append((int(match.group(1)), match.group(2), os.fspath(part)))
  return [name for *_, name in sorted(found)]


class AppendLog:
  """A text log that grows by whole lines (metrics.jsonl, eval_results.jsonl, batch logs).

  On a local file system the file is opened for appending; each `write` is flushed to the OS
  (a killed process loses nothing) and `flush`/`close` fsync it (nor does a crashed machine).

  An object store cannot append, and rewriting the whole object at every write uploads the
  history again each time (quadratic over a long run). There, lines are buffered and each
  flush uploads them as one new object `<path>.part-<n>-<writer>`: n continues after the
  parts already there (a resumed run continues the log), and the writer's random tag keeps
  two processes appending at once from overwriting each other's parts. Each line is uploaded
  once. The first write is uploaded at once (a new run shows up right away), later ones when
  `flush_seconds` have passed since the last upload, when `max_buffer_bytes` are waiting, or at
  `flush`/`close`: a killed writer loses at most the last `flush_seconds` of lines there.
  `read_text`, `read_lines` and `read_records` read the log in either layout, and
  `gsutil cat '<path>.part-*'` prints it in order.
  """

  def __init__(self, p: str, flush_seconds: float = 60.0, max_buffer_bytes: int = 1 << 20):
    """Opens the log, creating its folder.

    Args:
      p: the log's path (local or remote).
      flush_seconds: on an object store, the longest time a line waits for upload.
      max_buffer_bytes: on an object store, upload as soon as this much text waits.
    """
    self.path = os.fspath(p)
    self._remote = is_remote(self.path)
    self._flush_seconds = flush_seconds
    self._max_buffer_bytes = max_buffer_bytes
    self._file = None
    self._buffer: list[str] = []
    self._buffered_bytes = 0
    self._last_upload = -float("inf")  # the first write is uploaded at once
    self.bytes_uploaded = 0  # what this writer sent to the store (tests check it grows O(n))
    if self._remote:
      self._writer = secrets.token_hex(4)
      parts = [_PART_NAME.search(x) for x in log_parts(self.path)]
      self._next = max((int(m.group(1)) for m in parts), default=0) + 1
    else:
      parent = os.path.dirname(self.path)
      if parent:
        os.makedirs(parent, exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")

  def write(self, text: str) -> None:
    """Appends `text` (whole lines, each ending in a newline).

    Args:
      text: the lines.
    """
    if self._file is not None:
      self._file.write(text)
      self._file.flush()  # to the OS: another process (a report) sees it, a kill loses nothing
      return
    if not self._remote or self._buffer is None:
      raise ValueError(f"{self.path}: write to a closed log")
    self._buffer.append(text)
    self._buffered_bytes += len(text)
    if (time.monotonic() - self._last_upload >= self._flush_seconds
        or self._buffered_bytes >= self._max_buffer_bytes):
      self.flush()

  def flush(self) -> None:
    """Makes every written line durable: fsynced locally, uploaded as one part remotely."""
    if self._file is not None:
      self._file.flush()
      os.fsync(self._file.fileno())
      return
    if not self._buffer:
      return
    data = "".join(self._buffer).encode("utf-8")
    name = f"{self.path}{PART}{self._next:06d}-{self._writer}"
    replace_object(name, data)
    # Counted only once uploaded: a failed upload keeps the lines for the next flush.
    self._next += 1
    self.bytes_uploaded += len(data)
    self._buffer, self._buffered_bytes = [], 0
    self._last_upload = time.monotonic()

  def close(self) -> None:
    """Flushes and closes the log (again: nothing happens)."""
    if self._file is not None:
      self.flush()
      self._file.close()
      self._file = None
    elif self._remote and self._buffer is not None:
      self.flush()
      self._buffer = None

  def __enter__(self) -> "AppendLog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
