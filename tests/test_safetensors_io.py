"""safetensors files: our streaming writer against the `safetensors` library's reader (and the
other way round), bitwise for every dtype incl. bfloat16; lazy reads; sharded folders; damaged
files named."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from t5gemma_jax.convert import safetensors_io


def _arrays():
  rng = np.random.default_rng(0)
  return {"bf16": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
          "f32": rng.normal(size=(4,)).astype(np.float32),
          "f16": rng.normal(size=(2, 2)).astype(np.float16),
          "i64": np.arange(-3, 3, dtype=np.int64), "u8": np.arange(7, dtype=np.uint8),
          "bool": np.array([True, False, True]), "scalar": np.array(2.5, np.float64)}


def _same_bits(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_round_trip_is_bitwise_both_ways_with_the_library(tmp_path):
  arrays = _arrays()
  ours = str(tmp_path / "ours.safetensors")
  safetensors_io.save(arrays, ours, {"format": "pt"})
  theirs_reading = safetensors.numpy.load_file(ours)  # the library reads what we write
  assert all(_same_bits(theirs_reading[k], v) for k, v in arrays.items())
  stored = safetensors_io.load(ours)
  assert {k: (t.dtype, t.shape) for k, t in stored.items()} == {
      k: (v.dtype, v.shape) for k, v in arrays.items()}
  assert all(_same_bits(stored[k].read(), v) for k, v in arrays.items())
  assert all(_same_bits(np.asarray(stored[k]), v) for k, v in arrays.items())
  assert stored["bf16"].nbytes == arrays["bf16"].nbytes and stored["bf16"].ndim == 2
  theirs = str(tmp_path / "theirs.safetensors")
  safetensors.numpy.save_file(arrays, theirs)  # and we read what the library writes
  assert all(_same_bits(t.read(), arrays[k]) for k, t in safetensors_io.load(theirs).items())


def _rss() -> int:
  for line in open("/proc/self/status"):
    if line.startswith("VmRSS"):
      return int(line.split()[1]) * 1024
  raise AssertionError("no VmRSS")


def test_listing_reads_no_tensor_data(tmp_path):
  path = str(tmp_path / "big.safetensors")
  big = np.full((64 << 20) // 4, 1.5, np.float32)  # 64 MiB
  safetensors_io.save({"big": big, "small": np.ones(3, np.float32)}, path)
  del big
  before = _rss()
  stored = safetensors_io.load(path)
  assert stored["big"].shape == ((64 << 20) // 4,) and stored["big"].dtype == np.float32
  assert _rss() - before < (16 << 20), "listing the tensors read their data"
  assert _same_bits(stored["small"].read(), np.ones(3, np.float32))
  assert _rss() - before < (16 << 20), "reading one tensor read another"
  got = stored["big"].read()
  assert got.flags.writeable and got[0] == got[-1] == 1.5


def test_read_folder_lists_the_shards_of_an_index(tmp_path):
  arrays = _arrays()
  names = sorted(arrays)
  shards = {"model-00001-of-00002.safetensors": names[:3],
            "model-00002-of-00002.safetensors": names[3:]}
  for file, keys in shards.items():
    safetensors_io.save({k: arrays[k] for k in keys}, str(tmp_path / file))
  (tmp_path / safetensors_io.INDEX_FILE).write_text(json.dumps(
      {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
  folder = safetensors_io.read_folder(str(tmp_path))
  assert set(folder) == set(arrays)
  for file, keys in shards.items():
    for k in keys:
      tensor, where = folder[k]
      assert where == str(tmp_path / file) and _same_bits(tensor.read(), arrays[k])


def _damaged(tmp_path, how):
  path = tmp_path / "model.safetensors"
  safetensors_io.save(_arrays(), str(path))
  data = path.read_bytes()
  n = struct.unpack("<Q", data[:8])[0]
  header = json.loads(data[8:8 + n])
  if how == "empty":
    data = b""
  elif how == "short":
    data = data[:5]
  elif how == "truncated":
    data = data[:-7]
  elif how == "header length":
    data = struct.pack("<Q", len(data)) + data[8:]
  elif how == "header json":
    data = data[:8] + b"{" * n + data[8 + n:]
  elif how == "shape":  # the header disagrees with the byte range it gives
    header["f32"]["shape"] = [5]
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    data = struct.pack("<Q", len(blob)) + blob + data[8 + n:]
  path.write_bytes(data)
  return str(path)


@pytest.mark.parametrize("how", ["empty", "short", "truncated", "header length",
                                 "header json", "shape"])
def test_a_damaged_file_is_a_value_error_naming_it(tmp_path, how):
  path = _damaged(tmp_path, how)
  with pytest.raises(ValueError, match=rf"{path}: damaged or truncated safetensors file"):
    safetensors_io.load(path)
  with pytest.raises(ValueError, match=rf"{path}: damaged"):
    safetensors_io.read_folder(str(tmp_path))


def test_unsupported_dtype_and_missing_file_are_named(tmp_path):
  path = tmp_path / "odd.safetensors"
  safetensors.numpy.save_file({"u16": np.arange(4, dtype=np.uint16)}, str(path))
  with pytest.raises(ValueError, match=rf"{path}: tensor 'u16' has unsupported dtype 'U16'"):
    safetensors_io.load(str(path))
  with pytest.raises(FileNotFoundError, match="safetensors file not found: .*nope"):
    safetensors_io.load(str(tmp_path / "nope.safetensors"))
  with pytest.raises(FileNotFoundError, match="no model.safetensors or"):
    safetensors_io.read_folder(str(tmp_path))
