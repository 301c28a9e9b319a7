"""The one way to read parameters out of a checkpoint directory, without writing anything there.

A checkpoint step (written by `checkpoint.Checkpointer`, or by `params_checkpoint.save_params`)
is an orbax step directory whose `state` item holds `params` (and, for a training run, the
optimizer state, which is never read here). `ParamsReader` opens one finalized step given
a run directory (its `checkpoints/`), a directory of steps, or a step directory, and reads:

  * `metadata`: every parameter's shape and dtype, from orbax's metadata (no array data);
  * `scanned`: the layout, by the one layout rule (`layout.is_scanned`);
  * `read(abstract_params)`: the params sharded onto an abstract tree (fine-tuning's
    `init_from`, `infer`, `eval`), each process reading only its own shards; with the model
    config, a step saved in the other layout is converted on the devices;
  * `iter_params()`: one numpy array at a time, a bounded amount read at once, on no device
    and whatever mesh it was saved on (the streamed Hugging Face export).

Which steps exist is orbax's answer (`STEP_FORMAT`, which the Checkpointer lists its steps by
too), never our own listing. Reading creates, moves and deletes nothing, so `eval` or `export`
can run beside a training that is still saving: a step whose save is in flight or was
interrupted is not finalized and is never used. Resuming a whole TrainState, and setting
damaged steps aside, stay the Checkpointer's (`checkpoint`, `damaged_checkpoints`); here a
damaged step is a `DamagedCheckpointError` naming it.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any, Iterable, Iterator, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from t5gemma_jax.damaged_checkpoints import DamagedCheckpointError, brief, silence_read_noise
from t5gemma_jax.model import layout

STATE = "state"  # the orbax item holding {"params", ...}
CHECKPOINTS = "checkpoints"  # a run directory's directory of steps
# Orbax's rule for a finalized step: named by a bare step number (an in-flight save on local
# storage is `<step>.orbax-checkpoint-tmp*`) and holding orbax's commit marker (an in-flight
# save on object storage has the bare name already, but no marker yet). Orbax writes the marker
# under both storages, so asking for both also rejects an in-flight step copied across storages.
STEP_FORMAT = ocp.step.standard_name_format(
    temporary_path_cls=ocp.path.atomicity.CommitFileTemporaryPath)
ParamPath = tuple[str, ...]


class CheckpointNotFoundError(FileNotFoundError, ValueError):
  """No such checkpoint directory, no finalized step in it, or not the step asked for.

  Both a FileNotFoundError (what is missing is a file) and a ValueError (bad input)."""


def steps_directory(path: Any) -> epath.Path:
  """The directory of step directories meant by `path`: a run directory's `checkpoints/`,
  else `path` itself (local paths made absolute, so that messages say where)."""
  root = _absolute(path)
  return root / CHECKPOINTS if (root / CHECKPOINTS).is_dir() else root


def finalized_steps(path: Any) -> list[int]:
  """The finalized steps under a run directory or a directory of steps, oldest first.

  Args:
    path: a run directory or a directory of step directories (local or any epath URL).

  Returns:
    Step numbers; in-flight, interrupted and set-aside steps are not among them.

  Raises:
    CheckpointNotFoundError: `path` is not a directory.
  """
  directory = steps_directory(path)
  if not directory.is_dir():
    raise CheckpointNotFoundError(f"no checkpoint directory {directory}")
  return sorted(m.step for m in STEP_FORMAT.find_all(directory))


def latest_step(path: Any) -> Optional[int]:
  """The newest finalized step under `path` (see `finalized_steps`), or None if none."""
  steps = finalized_steps(path)
  return steps[-1] if steps else None


class ParamsReader:
  """The params of one finalized checkpoint step, read-only.

  Args:
    path: a run directory, a directory of steps, or one step directory (local or an epath
      URL such as gs://).
    step: the step to read; None for the newest finalized one (or the step `path` names).

  Raises:
    CheckpointNotFoundError: naming the directory, when it is missing, holds no finalized
      step, or lacks `step` (an in-flight or interrupted one included).

  Attributes:
    directory: the directory of step directories.
    step: the step read.
    step_dir: that step's directory.
  """

  def __init__(self, path: Any, step: Optional[int] = None):
    self.directory, self.step = _locate(_absolute(path), step)
    self.step_dir = self.directory / STEP_FORMAT.build_name(self.step)

  def __repr__(self) -> str:
    return f"ParamsReader({str(self.step_dir)!r})"

  @property
  def run_dir(self) -> epath.Path:
    """The run directory holding the model files (`RUN/checkpoints/STEP` -> `RUN`)."""
    return self.directory.parent

  @functools.cached_property
  def params_metadata(self) -> dict:
    """The saved params as a tree of orbax `ArrayMetadata` (`.shape`, `.dtype`), read from
    orbax's metadata (a few KiB of array headers): no array data is read."""
    # The item's handler, not a Checkpointer: that would also look for step metadata inside
    # the item (and warn that there is none).
    handler = ocp.PyTreeCheckpointHandler()
    with silence_read_noise() as noise:  # arrays' metadata is read by tensorstore too
      try:
        meta = handler.metadata(self.step_dir / STATE)
      except Exception as e:  # orbax, json and OS errors alike: the metadata is unreadable
        noise.failed()
        raise self._damaged(e) from e
      finally:
        handler.close()
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or not isinstance(tree.get("params"), dict):
      raise ValueError(f"checkpoint {self.step_dir} is damaged or is not a T5Gemma checkpoint: "
                       f"its {STATE} metadata lists no 'params'")
    return tree["params"]

  @functools.cached_property
  def metadata(self) -> dict[ParamPath, tuple[tuple[int, ...], np.dtype]]:
    """{param path, e.g. ("encoder", "embedder", "embedding"): (shape, numpy dtype)}."""
    leaves = jax.tree_util.tree_flatten_with_path(self.params_metadata)[0]
    return {tuple(str(k.key) for k in path): (tuple(m.shape), np.dtype(m.dtype))
            for path, m in leaves}

  @property
  def scanned(self) -> bool:
    """Whether the params were saved in the scanned layout (`layout.is_scanned`)."""
    return layout.is_scanned(self.params_metadata)

  def read(self, abstract_params: Any, cfg: Any = None) -> Any:
    """The params, placed as `abstract_params` says (each process reads its own shards).

    Args:
      abstract_params: the params tree of `jax.ShapeDtypeStruct`s, each with a `.sharding`
        (e.g. from `model.abstract_params` and `sharding.logical_to_shardings`); leaves are
        cast to their dtype.
      cfg: the model's config (`config.ModelConfig`); with it, a step saved in the other layout (scanned vs
        unrolled) is read in its own layout and converted on the devices.

    Returns:
      The params tree of `jax.Array`s, with the structure and shardings of `abstract_params`.

    Raises:
      ValueError: a leaf lacks a sharding, or the saved shapes differ (naming the params).
      DamagedCheckpointError: the step's files cannot be read.
    """
    require_shardings(abstract_params)
    converting = cfg is not None and self.scanned != layout.is_scanned(abstract_params)
    target = _in_layout(abstract_params, cfg, self.scanned) if converting else abstract_params
    problems = mismatch({"params": self.params_metadata}, {"params": target})
    if problems:
      raise ValueError(f"checkpoint {self.step_dir} does not match the abstract params: "
                       f"{problems}")
    item = {"params": target}
    # A partial restore reads the params alone out of a whole TrainState.
    params = self._restore(item, ocp.checkpoint_utils.construct_restore_args(item))["params"]
    if not converting:
      return params
    out = jax.tree_util.tree_map(lambda a: a.sharding, abstract_params)
    return jax.jit(lambda p: layout.to_layout(p, cfg, not self.scanned),
                   out_shardings=out)(params)

  def iter_params(self, max_bytes: int = 512 * 1024**2,
                  paths: Optional[Iterable[ParamPath]] = None
                  ) -> Iterator[tuple[ParamPath, np.ndarray]]:
    """Yields (param path, numpy array) for every param (or `paths`), in sorted path order.

    Each read restores at most `max_bytes` of parameters (or one larger parameter) as numpy
    arrays on the host (no devices, any saved mesh), so the caller holds at most that much
    at once if it drops each array after use.

    Args:
      max_bytes: the most bytes one read restores.
      paths: the params to read (keys of `metadata`); None for all.

    Yields:
      (path, array of the saved shape and dtype).

    Raises:
      KeyError: a path of `paths` is not a param of the step.
      DamagedCheckpointError: the step's files cannot be read.
    """
    metadata = self.metadata
    wanted = sorted(metadata) if paths is None else sorted(map(tuple, paths))
    for path in wanted:
      if path not in metadata:
        raise KeyError(f"{'/'.join(path)} is not a parameter of checkpoint {self.step_dir}")
    if not wanted:
      return
    groups, size = [[]], 0
    for path in wanted:
      shape, dtype = metadata[path]
      nbytes = int(np.prod(shape)) * dtype.itemsize
      if groups[-1] and size + nbytes > max_bytes:
        groups.append([])
        size = 0
      groups[-1].append(path)
      size += nbytes
    _large_allocations_from_mmap()
    for group in groups:
      item: dict = {}
      for path in group:
        node = item.setdefault("params", {})
        for key in path[:-1]:
          node = node.setdefault(key, {})
        node[path[-1]] = 0
      as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
      restored = self._restore(item, as_numpy)["params"]
      for path in group:
        node = restored
        for key in path:
          node = node[key]
        yield path, np.asarray(node)
      del restored, node

  def _restore(self, item: Any, restore_args: Any) -> Any:
    """orbax's partial restore of `item` from the step's state, damage named as such."""
    with silence_read_noise() as noise:  # a failing read's echoes come from other threads
      try:
        with ocp.PyTreeCheckpointer() as reader:
          return reader.restore(self.step_dir / STATE, args=ocp.args.PyTreeRestore(
              item=item, restore_args=restore_args, partial_restore=True))
      except Exception as e:  # orbax and tensorstore raise many types for damaged files
        noise.failed()
        raise self._damaged(e) from e

  def _damaged(self, e: Exception) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"checkpoint {self.step_dir} is damaged or incomplete "
                                  f"({brief(e)})")


# ----------------------------------------------------------------- abstract trees, checked


def leaf_name(path: Any) -> str:
  """'params/encoder/kernel' for a jax key path (dict keys, attributes, sequence indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def require_shardings(abstract: Any) -> None:
  """Raises ValueError naming the first leaf of `abstract` without a `.sharding`."""
  # Without a sharding orbax would restore a whole numpy array on every host.
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    if getattr(leaf, "sharding", None) is None:
      raise ValueError(f"{leaf_name(path) or 'the value'}: the abstract tree needs a sharding "
                       "(jax.ShapeDtypeStruct(shape, dtype, sharding=...)) on every leaf")


def mismatch(saved: Any, abstract: Any, shown: int = 5) -> Optional[str]:
  """What differs between saved metadata and an abstract tree, before anything is read.

  Args:
    saved: a tree whose leaves have `.shape` (orbax metadata).
    abstract: the tree to restore onto (leaves with `.shape`); saved leaves it lacks are fine.
    shown: how many problems to name.

  Returns:
    'name: not in the checkpoint; name: checkpoint shape (a,), expected (b,); and n more',
    or None when every leaf of `abstract` is saved with its shape.
  """
  leaves = jax.tree_util.tree_flatten_with_path(saved)[0]
  shapes = {leaf_name(p): tuple(m.shape) for p, m in leaves}
  problems = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    name = leaf_name(path)
    if name not in shapes:
      problems.append(f"{name}: not in the checkpoint")
    elif shapes[name] != tuple(leaf.shape):
      problems.append(f"{name}: checkpoint shape {shapes[name]}, expected {tuple(leaf.shape)}")
  if not problems:
    return None
  more = len(problems) - shown
  return "; ".join(problems[:shown]) + (f"; and {more} more" if more > 0 else "")


# ------------------------------------------------------------------------------- helpers


def _absolute(path: Any) -> epath.Path:
  text = os.fspath(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def _locate(root: epath.Path, step: Optional[int]) -> tuple[epath.Path, int]:
  """(directory of steps, finalized step) meant by `root` and `step` (see `ParamsReader`)."""
  if not root.is_dir():
    raise CheckpointNotFoundError(f"no checkpoint directory {root}")
  if _is_step_dir(root):
    return root.parent, _step_of(root, step)
  directory = steps_directory(root)
  steps = finalized_steps(directory)
  if step is None:
    if not steps:
      raise CheckpointNotFoundError(f"no complete checkpoint in {directory}"
                                    + _unfinished(directory, steps))
    return directory, steps[-1]
  if int(step) not in steps:
    raise CheckpointNotFoundError(f"no checkpoint for step {step} in {directory} (have "
                                  f"{steps})" + _unfinished(directory, steps))
  return directory, int(step)


def _is_step_dir(root: epath.Path) -> bool:
  """Whether `root` is one step directory, finalized or not (an in-flight save on local
  storage writes its items under temporary names too)."""
  return (root / STATE).is_dir() or any(root.glob(f"{STATE}{ocp.step.TMP_DIR_SUFFIX}*"))


def _step_of(step_dir: epath.Path, step: Optional[int]) -> int:
  """The step of a step directory that orbax finalized (and that is `step`, if given)."""
  try:  # orbax's parse of a step name, temporary names too
    number = ocp.step.step_from_checkpoint_name(step_dir.name)
  except ValueError:
    number = None
  if number is None or STEP_FORMAT.build_name(number) != step_dir.name:
    raise CheckpointNotFoundError(
        f"{step_dir} is not a finalized checkpoint step: its name is no step number (a save "
        "still in flight or interrupted, or a step set aside as damaged); use a step directory "
        "named by its number")
  if ocp.step.maybe_find_step_metadata(step_dir.parent, STEP_FORMAT, step=number) is None:
    raise CheckpointNotFoundError(
        f"checkpoint {step_dir} was never completed (orbax has not finalized it: its save is "
        "still in flight, or was interrupted); use an earlier step")
  if step is not None and int(step) != number:
    raise CheckpointNotFoundError(f"{step_dir} is step {number}, not step {step}")
  return number


def _unfinished(directory: epath.Path, steps: list[int]) -> str:
  """' (not finalized, skipped: 4.orbax-checkpoint-tmp)' for the step-like entries orbax does
  not list, or '': tells an in-flight save from an empty directory."""
  finalized = {STEP_FORMAT.build_name(s) for s in steps}
  names = sorted(p.name for p in directory.iterdir() if p.name not in finalized
                 and (p.name.isdigit() or ocp.step.TMP_DIR_SUFFIX in p.name))
  return f" (not finalized, skipped: {', '.join(names[:5])})" if names else ""


def _in_layout(abstract_params: Any, cfg: Any, scanned: bool) -> Any:
  """`abstract_params` in the scanned (or unrolled) layout, sharded by the same rules."""
  from t5gemma_jax import model, sharding
  from t5gemma_jax.run_options import RunOptions
  other = RunOptions(scan_layers=scanned)
  first = jax.tree_util.tree_leaves(abstract_params)[0]
  shapes = model.abstract_params(cfg, other, boxed=False)
  if isinstance(first.sharding, jax.sharding.NamedSharding):
    shardings = sharding.logical_to_shardings(model.abstract_params(cfg, other),
                                              first.sharding.mesh)
  else:
    shardings = jax.tree_util.tree_map(lambda _: first.sharding, shapes)
  # Every parameter is stored in one dtype (RunOptions.param_dtype): take the caller's.
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, first.dtype, sharding=s), shapes, shardings)


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
