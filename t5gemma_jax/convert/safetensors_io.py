"""Reads and writes safetensors files with numpy alone (bfloat16 through ml_dtypes).

The `safetensors` package's numpy API has no bfloat16, and released T5Gemma checkpoints are
bfloat16, so we read the format directly: an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the raw tensor bytes.
Reads are memory-mapped; writes go to a temporary file that is renamed into place.
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


def save(tensors: Mapping[str, np.ndarray], path: str,
         metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` to `path` atomically (temp file + rename).

  Args:
    tensors: name -> numpy array (any dtype in the table above, bfloat16 from ml_dtypes).
    path: destination file.
    metadata: string map stored under "__metadata__" ({"format": "pt"} for PyTorch readers).
  """
  header: dict = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  arrays = []
  for name in sorted(tensors):
    a = np.ascontiguousarray(np.asarray(tensors[name]))
    if a.dtype not in _NAMES:
      raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # data must start 8-byte aligned
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for a in arrays:
        f.write(a.reshape(-1).view(np.uint8))  # no second copy of large tensors
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
