"""Streams parameters into a Hugging Face T5Gemma folder, one tensor at a time.

The folder's layout (which tensor goes to which safetensors shard, at which offset) is planned
from the config alone (its `param_schema` table), so parameters can arrive one by one, in any
order and from any source (an in-memory tree, an orbax checkpoint read piece by piece), and
are written as they come: host memory never holds a second copy of the model. Everything is
assembled in a temporary folder next to the destination and renamed into place only when
complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import numpy as np

from t5gemma_jax.config import ModelConfig, is_decoder_only
from t5gemma_jax.convert import hf_config, param_schema, safetensors_io
from t5gemma_jax.model import layout
from t5gemma_jax.run_options import DTYPES

GENERATION_CONFIG = "generation_config.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3


def check_destination(path: str, overwrite: bool) -> None:
  """Refuses a non-empty destination unless `overwrite` (an empty folder is fine)."""
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise FileExistsError(f"output folder {path} is not empty (pass --overwrite / "
                          "overwrite=True to replace it)")
  if os.path.exists(path) and not os.path.isdir(path):
    raise FileExistsError(f"output path {path} exists and is not a folder")


def generation_config(cfg: ModelConfig) -> dict:
  """generation_config.json: decoding starts from BOS and stops at EOS, as ours does."""
  if is_decoder_only(cfg):
    return {"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id}
  return {"bos_token_id": cfg.bos_id, "decoder_start_token_id": cfg.bos_id,
          "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id}


class FolderWriter:
  """An HF T5Gemma folder being written; `put` each unrolled parameter, then `commit`.

  Args:
    cfg: the model config (shapes, config.json).
    path: the destination folder.
    dtype: the stored dtype name ("float32", "bfloat16", "float16"); inputs are cast.
    overwrite: replace a non-empty `path` (otherwise refused before anything is written).
    max_shard_bytes: a new safetensors shard starts above this size (HF's default 5 GB).
  """

  def __init__(self, cfg: ModelConfig, path: str, dtype: str, *, overwrite: bool = False,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES):
    if dtype not in DTYPES:
      raise ValueError(f"export dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_destination(path, overwrite)
    self.cfg, self.path, self.dtype = cfg, path, dtype
    np_dtype = np.dtype(DTYPES[dtype])
    # our unrolled path -> [Param]: several names when blocks are shared
    self._targets = {}
    plan = []
    for p in param_schema.params_of(cfg):
      self._targets.setdefault(p.path, []).append(p)
      plan.append((p.hf_name, np_dtype, p.hf_shape))
    shards = _shard(plan, max_shard_bytes)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    self.tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
    os.chmod(self.tmp, 0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
    self._writers, self._file_of = [], {}
    try:
      for n, shard in enumerate(shards):
        fname = (safetensors_io.SINGLE_FILE if len(shards) == 1
                 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors")
        self._writers.append(safetensors_io.PlannedWriter(
            os.path.join(self.tmp, fname), shard, {"format": "pt"}))
        self._file_of.update({name: (fname, self._writers[-1]) for name, _, _ in shard})
    except BaseException:
      self.abort()
      raise
    self._total = sum(int(np.prod(s)) * np_dtype.itemsize for _, _, s in plan)

  def put(self, ours: tuple[str, ...], array: Any) -> None:
    """Writes one parameter given by its unrolled path, e.g. ("decoder", "layers_2", "mlp",
    "up", "kernel"), in our (in, ..., out) layout and any dtype."""
    if ours not in self._targets:
      raise ValueError(f"parameter {'/'.join(ours)} is not part of this T5Gemma config")
    x = np.asarray(array)
    for p in self._targets[ours]:
      if tuple(x.shape) != p.shape:
        raise ValueError(f"parameter {'/'.join(ours)}: shape {tuple(x.shape)} does not match "
                         f"{p.shape} implied by the config")
      self._file_of[p.hf_name][1].write(p.hf_name, param_schema.to_hf(p.kind, x))

  def put_tree(self, params: Any) -> None:
    """Writes every parameter of a tree (scanned or unrolled; numpy or jax arrays), one leaf
    at a time: each device array is fetched to the host only when its turn comes."""
    for keys, leaf in leaves_of(params):
      host = np.asarray(jax.device_get(leaf))
      for ours, index in layout.unrolled_slices(keys, self.cfg):
        self.put(ours, host if index is None else host[index])

  def add_json(self, name: str, obj: Mapping) -> None:
    _write_json(obj, os.path.join(self.tmp, name))

  def finish_files(self) -> None:
    """Closes the shards (checking every tensor arrived) and writes the JSON files; the
    folder at `self.tmp` is then complete and can be checked before `commit`."""
    for w in self._writers:
      w.close()
    if len(self._writers) > 1:
      weight_map = {name: fname for name, (fname, _) in sorted(self._file_of.items())}
      self.add_json(safetensors_io.INDEX_FILE, {"metadata": {"total_size": self._total},
                                    "weight_map": weight_map})
    self.add_json(hf_config.CONFIG_NAME, hf_config.config_to_hf(self.cfg, self.dtype))
    self.add_json(GENERATION_CONFIG, generation_config(self.cfg))

  def commit(self) -> None:
    """Moves the finished folder to `path` (replacing what was there, last)."""
    replace_dir(self.tmp, self.path)

  def abort(self) -> None:
    for w in self._writers:
      w.abort()
    shutil.rmtree(self.tmp, ignore_errors=True)


def write_folder(cfg: ModelConfig, path: str, dtype: str,
                 fill: Callable[[FolderWriter], None], *, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 check: Optional[Callable[[str], None]] = None) -> None:
  """Creates the folder with `fill(writer)` putting the parameters (and any extra files).

  Args:
    cfg, path, dtype, overwrite, max_shard_bytes: as for `FolderWriter`.
    fill: called with the writer; puts every parameter, may add files into `writer.tmp`.
    check: called with the finished temporary folder before it is moved into place (e.g. a
      logit comparison in transformers); an exception there leaves nothing behind.
  """
  writer = FolderWriter(cfg, path, dtype, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
  try:
    fill(writer)
    writer.finish_files()
    if check is not None:
      check(writer.tmp)
    writer.commit()
  except BaseException:
    writer.abort()
    raise


def _shard(plan: list, max_bytes: int) -> list[list]:
  shards: list[list] = [[]]
  size = 0
  for name, dtype, shape in sorted(plan, key=lambda p: p[0]):
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, dtype, shape))
    size += nbytes
  return shards


def _write_json(obj: Mapping, path: str) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def replace_dir(src: str, dst: str) -> None:
  """Moves the finished folder `src` to `dst`, replacing an existing `dst` last."""
  old: Optional[str] = None
  if os.path.exists(dst):
    old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(dst)), prefix=".old-")
    os.rename(dst, os.path.join(old, "x"))
  os.rename(src, dst)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def leaves_of(params: Any) -> Iterable[tuple[tuple[str, ...], Any]]:
  """(path of dict keys, leaf) for every leaf of a parameter tree."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    yield tuple(str(k.key) for k in path), leaf
