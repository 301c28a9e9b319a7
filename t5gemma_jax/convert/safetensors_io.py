"""Reads and writes safetensors files with numpy alone (bfloat16 through ml_dtypes).

The `safetensors` package's numpy API has no bfloat16, and released T5Gemma checkpoints are
bfloat16, so we read the format directly: an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the raw tensor bytes.
Reads are memory-mapped; writes go to a temporary file that is renamed into place.
`read_folder` reads a Hugging Face checkpoint's tensors, one file or a sharded set.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# Hugging Face's file names: one file, or shards listed by an index.
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_header(path: str) -> tuple[dict, int]:
  """Returns (header dict, byte offset where tensor data starts)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"safetensors file not found: {path}")
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", raw)
    size = os.path.getsize(path)
    if n > size - 8:
      raise ValueError(f"{path}: corrupt safetensors header (claims {n} bytes, file has {size})")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
  return header, 8 + n


def load(path: str) -> dict[str, np.ndarray]:
  """Memory-maps every tensor of one safetensors file: {name: read-only numpy array}."""
  header, start = read_header(path)
  header.pop("__metadata__", None)
  size = os.path.getsize(path)
  data = np.memmap(path, dtype=np.uint8, mode="r")
  out = {}
  for name, info in header.items():
    dtype = info.get("dtype")
    if dtype not in _DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    begin, end = (start + o for o in info["data_offsets"])
    shape = tuple(info["shape"])
    expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
    if end - begin != expected or end > size:
      raise ValueError(f"{path}: tensor {name!r} byte range [{begin}, {end}) does not match "
                       f"shape {shape} {dtype} or the file size {size}")
    out[name] = data[begin:end].view(_DTYPES[dtype]).reshape(shape)
  return out


def read_folder(path: str) -> dict[str, tuple[np.ndarray, str]]:
  """Memory-maps every tensor of a checkpoint folder's `SINGLE_FILE`, or of the shards its
  `INDEX_FILE` lists.

  Args:
    path: the folder.

  Returns:
    {tensor name: (read-only array, path of the file it is in)}.

  Raises:
    FileNotFoundError: neither file is there.
    ValueError: an index without a "weight_map", or a damaged file.
  """
  index = os.path.join(path, INDEX_FILE)
  single = os.path.join(path, SINGLE_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: no 'weight_map' object")
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(single):
    files = [SINGLE_FILE]
  else:
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
  out = {}
  for name in files:
    file_path = os.path.join(path, name)
    for key, value in load(file_path).items():
      out[key] = (value, file_path)
  return out


def dtype_name(dtype) -> str:
  """The safetensors name ("F32", "BF16", ...) of a numpy dtype."""
  dtype = np.dtype(dtype)
  if dtype not in _NAMES:
    raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
  return _NAMES[dtype]


class PlannedWriter:
  """Writes one safetensors file whose tensors are known up front but arrive in any order.

  The header is written first from the plan; each tensor is then written at its offset with
  `os.pwrite`, so a producer can stream parameters one by one (never holding them all) in
  whatever order its source yields them. The file lives under a temporary name until
  `close()` has checked that every planned tensor arrived, then it is renamed to `path`.

  Args:
    path: destination file.
    plan: (name, numpy dtype, shape) of every tensor; data is laid out in this order.
    metadata: string map stored under "__metadata__".
  """

  def __init__(self, path: str, plan, metadata: Mapping[str, str] | None = None):
    header: dict = {}
    if metadata:
      header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    self._slots: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
    offset = 0
    for name, dtype, shape in plan:
      dtype, shape = np.dtype(dtype), tuple(int(d) for d in shape)
      nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      header[name] = {"dtype": dtype_name(dtype), "shape": list(shape),
                      "data_offsets": [offset, offset + nbytes]}
      self._slots[name] = (dtype, shape, offset)
      offset += nbytes
    blob = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    blob += b" " * (-len(blob) % 8)  # data must start 8-byte aligned
    self.path = path
    self._start = 8 + len(blob)
    self._written: set[str] = set()
    fd, self._tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                     prefix=".tmp-", suffix=".safetensors")
    self._fd = fd
    try:
      os.fchmod(fd, 0o644)  # mkstemp makes it private; a checkpoint is meant to be shared
      os.ftruncate(fd, self._start + offset)
      os.pwrite(fd, struct.pack("<Q", len(blob)) + blob, 0)
    except BaseException:
      self.abort()
      raise

  def write(self, name: str, array: np.ndarray) -> None:
    """Writes tensor `name` (cast to its planned dtype; the shape must match the plan)."""
    if name not in self._slots:
      raise KeyError(f"{self.path}: tensor {name!r} is not in the plan")
    dtype, shape, offset = self._slots[name]
    a = np.ascontiguousarray(np.asarray(array).astype(dtype, copy=False))
    if a.shape != shape:
      raise ValueError(f"{self.path}: tensor {name!r} has shape {a.shape}, planned {shape}")
    view = memoryview(a.reshape(-1).view(np.uint8))
    position = self._start + offset
    while view:  # pwrite may write less than asked for large buffers
      n = os.pwrite(self._fd, view, position)
      view, position = view[n:], position + n
    self._written.add(name)

  def close(self) -> None:
    """Checks that every planned tensor was written, then moves the file into place."""
    missing = sorted(set(self._slots) - self._written)
    if missing:
      self.abort()
      raise ValueError(f"{self.path}: {len(missing)} planned tensors were never written, e.g. "
                       f"{missing[:3]}")
    os.fsync(self._fd)
    os.close(self._fd)
    self._fd = None
    os.replace(self._tmp, self.path)

  def abort(self) -> None:
    """Removes the temporary file (safe to call twice)."""
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
    if os.path.exists(self._tmp):
      os.unlink(self._tmp)


def save(tensors: Mapping[str, np.ndarray], path: str,
         metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` to `path` atomically (temp file + rename).

  Args:
    tensors: name -> numpy array (any dtype in the table above, bfloat16 from ml_dtypes).
    path: destination file.
    metadata: string map stored under "__metadata__" ({"format": "pt"} for PyTorch readers).
  """
  names = sorted(tensors)
  arrays = {name: np.asarray(tensors[name]) for name in names}
  for name, a in arrays.items():
    if a.dtype not in _NAMES:
      raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
  writer = PlannedWriter(path, [(n, arrays[n].dtype, arrays[n].shape) for n in names], metadata)
  try:
    for name in names:
      writer.write(name, arrays[name])
    writer.close()
  except BaseException:
    writer.abort()
    raise
