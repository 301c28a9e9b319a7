"""Reads an offline W&B run's .wandb file back: the records the W&B SDK wrote, as protobufs.

wandb 0.31 has no Python reader any more (its Go core reads these files), so this follows the
format the core writes: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log
blocks of 32 KiB holding chunks with a 7-byte header (CRC-32 of type + data, length, type:
1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a chunk header is zero padding.
Each reassembled record is a `wandb.proto.wandb_internal_pb2.Record`.
"""

import json
import struct
import zlib

_BLOCK = 32768
_HEADER = struct.Struct("<IHB")  # crc32, length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path):
  """Every complete Record in the .wandb file at `path`, in order (CRCs checked)."""
  from wandb.proto import wandb_internal_pb2
  data = open(path, "rb").read()
  ident, magic, version = struct.unpack("<4sHB", data[:7])
  assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
  out, pending, pos = [], b"", 7
  while pos + _HEADER.size <= len(data):
    left = _BLOCK - pos % _BLOCK
    if left < _HEADER.size:
      pos += left
      continue
    crc, length, kind = _HEADER.unpack_from(data, pos)
    if kind == 0:  # zero padding up to the block's end
      pos += left
      continue
    if pos + _HEADER.size + length > len(data):
      break  # a chunk still being written (the file is read while W&B's core writes it)
    chunk = data[pos + _HEADER.size:pos + _HEADER.size + length]
    assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad CRC at byte {pos} of {path}"
    pos += _HEADER.size + length
    pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
    if kind in (_FULL, _LAST):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      out.append(record)
  return out


def of_type(recs, kind):
  """The `kind` ("run", "history", "files", ...) payloads of `recs`."""
  return [getattr(r, kind) for r in recs if r.WhichOneof("record_type") == kind]


def history(recs):
  """The logged rows: [{key: value}], W&B's own keys ("_step", "_runtime", ...) left out; a
  logged object (a table) is the dict of its fields."""
  rows = []
  for h in of_type(recs, "history"):
    row = {}
    for item in h.item:
      *path, last = list(item.nested_key) or [item.key]
      place = row
      for key in path:
        place = place.setdefault(key, {})
      place[last] = json.loads(item.value_json)
    rows.append({k: v for k, v in row.items() if not k.startswith("_")})
  return rows


def config(run_record):
  """A run record's config as {key: value} (W&B's own "_wandb" left out)."""
  return {u.key: json.loads(u.value_json) for u in run_record.config.update
          if u.key != "_wandb"}
