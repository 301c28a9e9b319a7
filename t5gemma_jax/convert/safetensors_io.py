"""Reads safetensors files through the `safetensors` library, lazily; writes them streaming.

Reading: `load` (one file) and `read_folder` (a Hugging Face checkpoint, one file or a sharded
set) list each tensor as a `StoredTensor` whose name, dtype and shape come from the header and
whose bytes are read only when the tensor is asked for, so a conversion holds only the
tensors it is working on. `safetensors.safe_open(framework="np")` gives bfloat16 as
`ml_dtypes.bfloat16` (checked with safetensors 0.8.0, `get_tensor` and `get_slice`).

Writing stays our own (`PlannedWriter`, `save`): the library's `save_file` wants every tensor in
memory at once, while an export streams parameters one by one, in whatever order its source
yields them, into a file renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Mapping

import ml_dtypes
import numpy as np
import safetensors

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


class _OpenFile:
  """The library's handle on one file, shared by that file's `StoredTensor`s: the header is
  parsed once and the file stays mapped while any of its tensors is referenced."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"safetensors file not found: {path}")
    self.path = path
    try:
      # The library checks the whole header against the file size on opening, so a truncated
      # or corrupt file fails here rather than at the first tensor read.
      self._handle = safetensors.safe_open(path, framework="np")
    except safetensors.SafetensorError as e:
      raise ValueError(f"{path}: damaged or truncated safetensors file (safetensors: {e})") from e

  def tensors(self) -> dict[str, StoredTensor]:
    """{name: StoredTensor} of every tensor, from the header alone (no data is read)."""
    out = {}
    for name in self._handle.keys():
      info = self._handle.get_slice(name)
      dtype = info.get_dtype()
      if dtype not in _DTYPES:
        raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype!r}; "
                         f"known: {sorted(_DTYPES)}")
      out[name] = StoredTensor(self, name, _DTYPES[dtype], tuple(info.get_shape()))
    return out

  def read(self, name: str) -> np.ndarray:
    try:
      return self._handle.get_tensor(name)
    except safetensors.SafetensorError as e:
      raise ValueError(f"{self.path}: cannot read tensor {name!r} (safetensors: {e})") from e


class StoredTensor:
  """One tensor of a safetensors file: dtype and shape known, bytes read when asked for.

  `read()` (or `np.asarray(t)`) returns a new array in memory of its own; every call reads
  the file again, so keep the array rather than the `StoredTensor` when it is used twice.

  Attributes:
    path: the file it is in.
    name: its name there.
    dtype: its numpy dtype (bfloat16 as `ml_dtypes.bfloat16`).
    shape: its shape.
  """

  def __init__(self, file: _OpenFile, name: str, dtype: np.dtype, shape: tuple[int, ...]):
    self._file = file
    self.path, self.name, self.dtype, self.shape = file.path, name, dtype, shape

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

  def read(self) -> np.ndarray:
    """The tensor's data, read from the file now.

    Returns:
      A writable numpy array of `shape` and `dtype`.
    """
    return self._file.read(self.name)

  def __array__(self, dtype=None, copy=None):
    del copy  # every read is a new array already
    array = self.read()
    return array if dtype is None else array.astype(dtype, copy=False)

  def __repr__(self) -> str:
    return f"StoredTensor({self.name!r}, {self.dtype}, {self.shape}, in {self.path})"


def load(path: str) -> dict[str, StoredTensor]:
  """Every tensor of one safetensors file, listed from its header (data read on demand).

  Args:
    path: the file.

  Returns:
    {name: StoredTensor}; `np.asarray(value)` reads one.

  Raises:
    FileNotFoundError: no such file.
    ValueError: a damaged file, or a dtype outside the table above (the file named).
  """
  return _OpenFile(path).tensors()


def read_folder(path: str) -> dict[str, tuple[StoredTensor, str]]:
  """Every tensor of a checkpoint folder's `SINGLE_FILE`, or of the shards its `INDEX_FILE`
  lists, read on demand.

  Args:
    path: the folder.

  Returns:
    {tensor name: (StoredTensor, path of the file it is in)}.

  Raises:
    FileNotFoundError: neither file is there, or a listed shard is missing.
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
    a = np.asarray(array).astype(dtype, copy=False)
    if a.shape != shape:
      raise ValueError(f"{self.path}: tensor {name!r} has shape {a.shape}, planned {shape}")
    # Shape checked first: ascontiguousarray makes a 0-d array 1-d (the bytes are the same).
    view = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
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
