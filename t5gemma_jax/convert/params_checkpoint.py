"""Orbax checkpoints seen as parameter stores: find a step, inspect it, stream it, write one.

A run directory (MODEL_DIR) holds `checkpoints/<step>/state` (the TrainState written by
`t5gemma_jax.checkpoint.Checkpointer`) and the model files (`run_files.write_model_files`,
written by `train`, `import_hf` and `adapt`). Export reads the params of one step piece by piece as numpy arrays,
whatever mesh they were saved on; import and adaptation write a params-only step 0 that
`train` (`init_from`) and `infer` start from.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import tempfile
from typing import Any, Iterator, Optional

import numpy as np

from t5gemma_jax import checkpoint, run_files
from t5gemma_jax.config import T5GemmaConfig
from t5gemma_jax.convert import hf_writer

_COMMITTED = "commit_success.txt"
Path = tuple[str, ...]


def find_step(path: str) -> str:
  """The step directory meant by `path`: a step directory itself, a `checkpoints` directory
  or a run directory (their latest complete step). Local or remote (gs://) paths.

  Raises:
    FileNotFoundError: naming `path`, when there is no complete step there.
  """
  from etils import epath
  root = epath.Path(path)
  if not root.is_dir():
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if (root / "state").is_dir():
    if not (root / _COMMITTED).exists():
      raise FileNotFoundError(f"checkpoint {path} was never completed (no {_COMMITTED}): its "
                              "save was interrupted; use an earlier step")
    return str(path)
  base = root / "checkpoints" if (root / "checkpoints").is_dir() else root
  steps = sorted((int(d.name) for d in base.iterdir() if d.name.isdigit()), reverse=True)
  for step in steps:
    step_dir = base / str(step)
    if (step_dir / _COMMITTED).exists():
      return str(step_dir)
    logging.warning("skipping checkpoint %s: never completed", step_dir)
  raise FileNotFoundError(f"no complete checkpoint in {path} (expected a step directory, a "
                          "checkpoints directory or a run directory)")


def run_dir_of(step_dir: str) -> str:
  """The run directory of a step directory (`RUN/checkpoints/STEP` -> `RUN`)."""
  step_dir = str(step_dir).rstrip("/")
  if "://" not in step_dir:
    step_dir = os.path.abspath(step_dir)
  return os.path.dirname(os.path.dirname(step_dir))


def _state_dir(step_dir: str) -> str:
  return os.path.join(step_dir if "://" in str(step_dir) else os.path.abspath(step_dir), "state")


def _damaged(step_dir: str, e: Exception) -> ValueError:
  return ValueError(f"checkpoint {step_dir} is damaged or incomplete ({type(e).__name__}: "
                    f"{str(e)[:300]})")


def param_metadata(step_dir: str) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
  """{param path: (shape, numpy dtype)} of a step, read from its metadata alone."""
  import jax
  import orbax.checkpoint as ocp
  try:
    meta = ocp.PyTreeCheckpointer().metadata(_state_dir(step_dir))
  except Exception as e:  # orbax and tensorstore raise many types for a broken step
    raise _damaged(step_dir, e) from e
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  if not isinstance(tree, dict) or "params" not in tree:
    raise ValueError(f"checkpoint {step_dir} is damaged or is not a T5Gemma checkpoint: its "
                     "metadata lists no 'params'")
  out = {}
  for path, m in jax.tree_util.tree_flatten_with_path(tree["params"])[0]:
    out[tuple(str(k.key) for k in path)] = (tuple(m.shape), np.dtype(m.dtype))
  return out


def is_scanned(metadata: dict[Path, Any]) -> bool:
  """Whether the params were saved in the scanned layout (`layers/block_{s}` stacks)."""
  return any(len(p) > 1 and p[1] == "layers" for p in metadata)


def iter_params(step_dir: str, metadata: Optional[dict] = None,
                max_bytes: int = 512 * 1024**2) -> Iterator[tuple[Path, np.ndarray]]:
  """Yields (path, numpy array) for every param of a step, reading a few at a time.

  Each read restores at most `max_bytes` of parameters (or one larger parameter) with orbax's
  partial restore, as plain numpy arrays on the host (no devices, any saved mesh), so the
  caller holds at most that much at once if it drops each array after use.
  """
  import jax
  import orbax.checkpoint as ocp
  metadata = metadata if metadata is not None else param_metadata(step_dir)
  groups, size = [[]], 0
  for path, (shape, dtype) in sorted(metadata.items()):
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if groups[-1] and size + nbytes > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append(path)
    size += nbytes
  _large_allocations_from_mmap()
  checkpointer = ocp.PyTreeCheckpointer()
  for group in groups:
    item: dict = {}
    for path in group:
      node = item.setdefault("params", {})
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = 0
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          item)
    try:
      restored = checkpointer.restore(_state_dir(step_dir), args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))["params"]
    except Exception as e:
      raise _damaged(step_dir, e) from e
    for path in group:
      node = restored
      for key in path:
        node = node[key]
      yield path, np.asarray(node)
    del restored, node


def _large_allocations_from_mmap() -> None:
  """Makes glibc serve allocations above 1 MiB with mmap, returned to the OS when freed.

  By default glibc raises its mmap threshold each time a large block is freed, so later reads
  of the same size come from the heap, whose freed holes stay resident (also in the reader
  threads' arenas): a streamed export then creeps towards the size of the whole model.
  """
  try:
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
  except (OSError, AttributeError):  # not glibc: nothing to do
    pass


def save_params(params: Any, cfg: T5GemmaConfig, out_dir: str, *,
                overwrite: bool = False) -> str:
  """Writes `params` as step 0 of a run directory that `train` and `infer` start from.

  The directory gets `checkpoints/0` (params and step, no optimizer state: fine-tune with
  `TrainConfig.init_from=out_dir`) and the model files (`model_config.json`, `model.gin`).
  It is assembled under a temporary name and renamed into place.

  Args:
    params: the params tree (numpy or jax arrays), in `cfg`'s layout.
    cfg: the model config.
    out_dir: the run directory to create; must be empty or absent unless `overwrite`.

  Returns:
    The step directory written.
  """
  import jax
  hf_writer.check_destination(out_dir, overwrite)
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.tmp-")
  try:
    os.chmod(tmp, 0o755)
    # Device arrays: orbax restores them onto any mesh later (numpy leaves would come back
    # as numpy, ignoring the shardings asked for).
    state = {"params": jax.tree_util.tree_map(jax.numpy.asarray, params),
             "step": jax.numpy.zeros((), jax.numpy.int32)}
    with checkpoint.Checkpointer(os.path.join(tmp, "checkpoints"), save_every=1,
                                 async_save=False) as ckpt:
      ckpt.save(0, state, force=True)
    run_files.write_model_files(cfg, tmp)
    hf_writer.replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return os.path.join(out_dir, "checkpoints", "0")
