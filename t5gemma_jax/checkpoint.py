"""The one checkpoint path: the train state and the data-iterator position, on orbax.

Each checkpoint step is one orbax step directory with two items: `state` (the whole TrainState,
written asynchronously by orbax's StandardCheckpointHandler) and, when given, `data_iterator`
(every process's tf.data position, written by `DataIteratorHandler`). Orbax writes a step to a
temporary directory and finalizes it (rename, plus commit_success.txt) only after every item of
every process is complete, so params and data position always belong to the same step, and a
step cut short by a crash is never listed or loaded (`params_reader.STEP_FORMAT`, the rule the
params-only readers use too): the previous complete step is used. So is it when the newest
step's files turn out damaged (truncated, deleted) on restore.

Reading parameters alone (fine-tuning, eval, export) is `params_reader`'s, which never writes.

Restoring takes an abstract state (`jax.ShapeDtypeStruct`s with shardings): each process reads
only its own shards, so nothing is materialised whole on one host.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from t5gemma_jax import params_reader
from t5gemma_jax.damaged_checkpoints import DamagedCheckpointError, agree, brief, recorded_items
from t5gemma_jax.damaged_checkpoints import set_aside, silence_read_noise

STATE = params_reader.STATE
DATA_ITERATOR = "data_iterator"
_log = logging.getLogger(__name__)


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves an iterator with `save(prefix)` / `restore(prefix)` (e.g. `GlobalBatches`).

  Every process writes its own position under `process_<index>`. The save is synchronous on
  purpose: orbax runs it inside the blocking part of `CheckpointManager.save`, so the position
  is captured before training advances the iterator, while the arrays are still written in the
  background.
  """

  def save(self, directory: epath.Path, args: "DataIteratorArgs") -> None:
    args.iterator.save(_iterator_prefix(directory))

  def restore(self, directory: epath.Path, args: "DataIteratorArgs") -> Any:
    args.iterator.restore(_iterator_prefix(directory))
    return args.iterator


def _iterator_prefix(item_dir: epath.Path) -> str:
  return str(item_dir / f"process_{jax.process_index()}")


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class DataIteratorArgs(ocp.args.CheckpointArgs):
  """The iterator to save, or to move to the saved position on restore."""

  iterator: Any


class Checkpointer:
  """Saves and restores (TrainState, data position) steps under one directory.

  Args:
    directory: where the step directories go (local or any path orbax supports).
    save_every: save when `step % save_every == 0` (and on a preemption notice from JAX's
      distributed runtime); other steps only with `force=True`.
    keep: keep the last `keep` steps (None keeps all).
    keep_best: a metric name; also keep the step with the best value of it. Steps saved without
      that metric count as the worst, so they are kept only as one of the last `keep`.
      Orbax's own `best_fn` + `max_to_keep` would keep only the `max_to_keep` best steps, which
      can delete the newest step right after saving it (a resume would then go back in time),
      and with its default `keep_checkpoints_without_metrics=True` forced saves without metrics
      would never be deleted; hence the policy here: last `keep` OR best one.
    best_mode: "min" (a loss) or "max" (an accuracy).
    async_save: write the arrays in a background thread; training continues meanwhile.
  """

  def __init__(self, directory: str, save_every: int, keep: Optional[int] = 3,
               keep_best: Optional[str] = None, best_mode: str = "min", async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be >= 1 or None (keep all), got {keep}")
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    self.directory = epath.Path(directory)
    preserve = [policies.LatestN(n=keep)]
    metric_fn = None
    if keep_best is not None:
      worst = math.inf if best_mode == "min" else -math.inf
      metric_fn = lambda metrics: float(metrics.get(keep_best, worst))  # noqa: E731
      # BestN keeps the tail of the sorted list; reverse puts the smallest last for "min".
      preserve.append(policies.BestN(get_metric_fn=metric_fn, reverse=best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # Orbax writes metrics to the step only when best_fn is set; retention itself is decided
        # by preservation_policy alone.
        best_fn=metric_fn, best_mode=best_mode,
        preservation_policy=policies.AnyPreservationPolicy(preserve),
        # Not orbax's default policy: its InitialSavePolicy would save any first step.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]),
        enable_async_checkpointing=async_save,
        # Temporary directories left by a crash are removed when a run (re)starts.
        cleanup_tmp_directories=True,
        # Which steps are finalized: the rule `params_reader` (eval, export) reads them by.
        step_name_format=params_reader.STEP_FORMAT)
    handlers = {STATE: ocp.StandardCheckpointHandler(), DATA_ITERATOR: DataIteratorHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self.restored_step: Optional[int] = None  # set by `restore`

  def save(self, step: int, state: Any, data_iterator: Any = None,
           metrics: Optional[Mapping[str, Any]] = None, force: bool = False) -> bool:
    """Starts saving `state` (and the iterator position) as checkpoint `step`.

    Args:
      step: the training step.
      state: the TrainState (sharded `jax.Array`s).
      data_iterator: an object with `save(prefix)` / `restore(prefix)`, e.g. `GlobalBatches`.
      metrics: {name: number}; stored with the step (for `keep_best`) only when keep_best is set.
      force: save even if `step` is not a multiple of `save_every` (SIGTERM, end of training).

    Returns:
      Whether a save was started; False also when `step` is already saved (e.g. a forced save
      at the end, on a step the schedule just saved).
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[DATA_ITERATOR] = DataIteratorArgs(data_iterator)
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items()}  # written as JSON
    return self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                              force=force)

  def latest_step(self) -> Optional[int]:
    """The newest step, or None.

    Orbax lists a step of this Checkpointer as soon as its save starts; call `wait()` first to
    count only committed steps. Steps on disk that were never committed are never listed.
    """
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All steps, oldest first (with the same in-flight caveat as `latest_step`)."""
    return sorted(self._manager.all_steps())

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are complete (and re-raises their errors)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources."""
    self._manager.close()

  def restore(self, step: Optional[int], abstract_state: Any, data_iterator: Any = None) -> Any:
    """Loads checkpoint `step` (None: the newest that loads) onto `abstract_state`'s shardings.

    With `step=None`, a step whose files cannot be read is skipped with a warning, and so on
    back; once one loads, the newer ones are set aside (`damaged_checkpoints`). If none loads,
    nothing is moved (a cause common to all, such as storage, must not cost them all). A given
    `step` is not replaced by another; a mismatch with `abstract_state` is not damage and raises.

    Args:
      step: the step, or None for the latest.
      abstract_state: the TrainState of `jax.ShapeDtypeStruct`s, each with a `.sharding`
        (e.g. `jax.eval_shape` of the init function, with the state's shardings).
      data_iterator: if given, moved to the position saved with this step.

    Returns:
      The TrainState, with the structure and shardings of `abstract_state` (its step: in
      `restored_step`).

    Raises:
      CheckpointNotFoundError: no such step (with `step=None`: no step at all).
      DamagedCheckpointError: the step (with `step=None`: every step) could not be read.
    """
    self.wait()  # a save still in flight is not yet listed
    params_reader.require_shardings(abstract_state)
    if step is not None:
      step, steps = int(step), self.all_steps()
      if step not in steps:
        raise params_reader.CheckpointNotFoundError(
            f"no checkpoint for step {step} in {self.directory} (have {steps})")
      state, problem = self._try_step(step, abstract_state, data_iterator)
      if problem is not None:
        raise DamagedCheckpointError(f"checkpoint {self._step_dir(step)} could not be loaded: "
                                     f"{problem}")
      self.restored_step = step
      return state
    failures = []  # (step, what was wrong), newest first
    for step in reversed(self.all_steps()):
      state, problem = self._try_step(step, abstract_state, data_iterator)
      if problem is None:
        moved = set_aside(self.directory, [s for s, _ in failures])
        self._manager.reload()  # forget the steps set aside
        if moved:
          _log.warning("set aside damaged checkpoint(s) %s; resuming from step %d",
                       ", ".join(moved), step)
        self.restored_step = step
        return state
      failures.append((step, problem))
      _log.warning("checkpoint %s could not be loaded (%s); trying the previous step",
                   self._step_dir(step), problem)
    if not failures:
      raise params_reader.CheckpointNotFoundError(f"no complete checkpoint in {self.directory}")
    raise DamagedCheckpointError(
        f"no checkpoint in {self.directory} could be loaded: "
        + "; ".join(f"step {s}: {p}" for s, p in failures) + ". Nothing was moved: move the "
        "damaged step directories away (the run then resumes from an older one, or starts anew)")

  def _try_step(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, Any]:
    """(state, None), or (None, what could not be read), the same on every process."""
    with silence_read_noise() as noise:  # a failing read's echoes come from other threads
      state, problem = self._read_step(step, abstract_state, data_iterator)
      if problem is not None:
        noise.failed()  # its other reads still finish for a moment: the exit waits for quiet
      return state, problem

  def _read_step(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, Any]:
    """`_try_step`'s reads, under `silence_read_noise`."""
    where = self._step_dir(step)
    problem = None
    try:
      saved = _saved_tree(self._manager, step)
      if not jax.tree_util.tree_leaves(saved):
        problem = f"{STATE}: no array metadata ({STATE}/_METADATA is missing)"
    except Exception as e:  # json, tensorstore and OS errors alike: the metadata is unreadable
      problem = f"{STATE}: metadata unreadable: {brief(e)}"
    if problem is None:
      # A mismatch is not damage (every step would fail alike): it raises as it is.
      _check_shapes(self._manager, step, abstract_state, self.directory)
    if problem is None and data_iterator is not None:
      if not (where / DATA_ITERATOR).exists():
        if DATA_ITERATOR not in recorded_items(where):
          raise FileNotFoundError(f"{where} has no data-iterator position (it was saved "
                                  "without data_iterator)")
        problem = f"{DATA_ITERATOR}: the item directory is missing"
      else:
        # Read here rather than through orbax: no barrier, so a process whose own file is
        # damaged cannot leave the others waiting in one.
        try:
          data_iterator.restore(_iterator_prefix(where / DATA_ITERATOR))
        except Exception as e:  # tf raises many types (and IndexError) for damaged files
          problem = f"{DATA_ITERATOR}: {brief(e)}"
    problem = agree(problem)
    if problem is not None:
      return None, problem
    try:
      args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)})
      state = self._manager.restore(step, args=args)[STATE]
    except Exception as e:  # orbax and tensorstore raise many types for damaged files
      problem = f"{STATE}: {brief(e)}"
    problem = agree(problem)
    return (None, problem) if problem is not None else (state, None)

  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ---------------------------------------------------------------------- helpers


def _saved_tree(manager: ocp.CheckpointManager, step: int) -> Any:
  saved = manager.item_metadata(step)[STATE]
  return getattr(saved, "tree", saved)


def _check_shapes(manager: ocp.CheckpointManager, step: int, abstract: Any, directory) -> None:
  """Names the parameters whose shapes differ, or that are missing, before orbax reads any."""
  params_reader.require_shardings(abstract)
  saved = _saved_tree(manager, step)
  # A whole TrainState is asked for, but the step holds params alone.
  if not isinstance(abstract, dict) and isinstance(saved, dict) and "opt_state" not in saved:
    raise ValueError(f"checkpoint {directory} step {step} holds parameters only (written by "
                     "import_hf or adapt): start a new run from it with TrainConfig.init_from "
                     "(--gin.INIT_FROM), or decode it with infer/eval")
  problems = params_reader.mismatch(saved, abstract)
  if problems:
    raise ValueError(f"checkpoint {directory} step {step} does not match the abstract state: "
                     f"{problems}")
