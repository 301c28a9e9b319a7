"""Decoding for `t5gemma infer`, `eval` and in-training evaluation: a run's checkpoint params
(`load_params`), encoder rows decoded in fixed-size batches and shared over processes
(`predictions`), and `infer`, which writes a task split's or a text file's predictions as JSONL.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from t5gemma_jax import atomic, decoding
from t5gemma_jax.config import ModelConfig
from t5gemma_jax.data import pipeline
from t5gemma_jax.model import abstract_params
from t5gemma_jax.run_options import RunOptions


def strip(tokens: Sequence[int], eos_id: int, pad_id: int = 0) -> list[int]:
  """Generated ids up to (not including) EOS, without padding."""
  out = []
  for t in tokens:
    if t == eos_id:
      break
    if t != pad_id:
      out.append(int(t))
  return out


def predictions(params: Any, cfg: ModelConfig, encoder_batches, max_new_tokens: int,
                batch_size: int, **decode) -> np.ndarray:
  """Decodes encoder rows in fixed-size batches (short ones padded: no recompiles).

  In a multi-process run with params on each process's own device (`load_params`), process p
  decodes only its contiguous block of the batches and the tokens are gathered to every
  process; every process must then pass the same rows (checked). With params sharded over all
  processes (a training state) or a `mesh`, every process runs every batch: that is one
  program spanning the processes.

  Args:
    params, cfg: the model.
    encoder_batches: iterable of int32 [b, S] with b <= batch_size.
    max_new_tokens, batch_size, **decode: decoding options (`decoding.generate`).

  Returns:
    int32 [n, max_new_tokens], n the rows of all batches in order: EOS then padding, as
    `decoding.generate`.
  """
  batches = [np.asarray(b) for b in encoder_batches]
  for i, b in enumerate(batches):
    if b.ndim != 2 or b.shape[0] > batch_size:
      raise ValueError(f"encoder batch {i} has shape {b.shape}; expected [rows <= batch_size="
                       f"{batch_size}, length]")
  sizes = [b.shape[0] for b in batches]
  padded = np.stack([_pad_rows(b, batch_size) for b in batches]) if batches else None

  def run(batch):
    return np.asarray(decoding.generate(params, cfg, batch, max_new_tokens=max_new_tokens,
                                        **decode))

  if _split_over_processes(params, decode):
    tokens = _decode_share(run, padded, batch_size, max_new_tokens)
  else:
    tokens = [run(batch) for batch in padded] if batches else []
  out = [t[:rows] for t, rows in zip(tokens, sizes)]
  return np.concatenate(out) if out else np.zeros((0, max_new_tokens), np.int32)


def _pad_rows(batch: np.ndarray, rows: int) -> np.ndarray:
  """[b, S] -> [rows, S] with all-padding rows appended."""
  missing = rows - batch.shape[0]
  return np.concatenate([batch, np.zeros((missing, batch.shape[1]), batch.dtype)])


def _split_over_processes(params: Any, decode: Mapping[str, Any]) -> bool:
  """Whether each process may decode batches of its own: several processes, no mesh, and
  params that live wholly on this process (every process takes the same decision)."""
  if jax.process_count() == 1 or decode.get("mesh") is not None:
    return False
  return all(getattr(x, "is_fully_addressable", True) for x in jax.tree_util.tree_leaves(params))


def _decode_share(run, padded: Optional[np.ndarray], batch_size: int,
                  max_new_tokens: int) -> np.ndarray:
  """This process's block of batches decoded, then every process's gathered.

  Args:
    run: [batch_size, S] -> int32 [batch_size, max_new_tokens] (one `generate` call).
    padded: int32 [n_batches, batch_size, S] (the same on every process), or None for none.

  Returns:
    int32 [n_batches, batch_size, max_new_tokens], in batch order, on every process.
  """
  from jax.experimental import multihost_utils
  count, index = jax.process_count(), jax.process_index()
  _check_same_rows(padded)
  if padded is None:
    return np.zeros((0, batch_size, max_new_tokens), np.int32)
  per = -(-len(padded) // count)  # batches per process, rounded up
  mine = list(padded[index * per:(index + 1) * per])
  # Every process makes the same number of equal-shaped calls: a process short of batches
  # (the count does not divide) repeats batch 0, real rows that finish like real work, so
  # that nobody waits in the gather below for a call another process never makes.
  mine += [padded[0]] * (per - len(mine))
  local = np.stack([run(batch) for batch in mine]).astype(np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(local))  # [count, per, B, T]
  return gathered.reshape(count * per, *local.shape[1:])[:len(padded)]


def _check_same_rows(padded: Optional[np.ndarray]) -> None:
  """Raises unless every process holds the same batches (else their shares would not add up
  to one result, or their call counts would differ and the gather would hang)."""
  from jax.experimental import multihost_utils
  if padded is None:
    summary = np.zeros(4, np.int32)
  else:
    crc = zlib.crc32(np.ascontiguousarray(padded, np.int32).tobytes()) & 0x7FFFFFFF
    summary = np.array([*padded.shape, crc], np.int32)
  seen = np.asarray(multihost_utils.process_allgather(summary))  # [count, 4]
  if not (seen == seen[0]).all():
    shown = "; ".join(f"process {i}: {r[0]} batches of shape [{r[1]}, {r[2]}], crc {r[3]}"
                      for i, r in enumerate(seen.tolist()))
    raise ValueError("the processes were given different encoder rows to decode (each must "
                     f"read the same inputs): {shown}")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How `infer`, `eval` and in-training evaluation decode (see `decoding.generate`)."""

  max_new_tokens: int = 64
  batch_size: int = 16
  strategy: str = "greedy"
  num_beams: int = 4
  length_penalty: float = 0.6
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def options(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items()
            if k not in ("max_new_tokens", "batch_size")}


@dataclasses.dataclass(frozen=True)
class InferConfig:
  """`t5gemma infer`: decode a task split or a text file with a run's latest checkpoint.

  Attributes:
    model: the architecture.
    run: how to compute it (dtypes, attention kernel; the layer layout follows the checkpoint).
    model_dir: the run whose latest checkpoint is used.
    output: JSONL path (written atomically): {"input", "prediction", "target"?} per line.
    task, split: what to decode; or `input_file` (one input per line) with `vocabulary`.
    inputs_length: encoder length (longer inputs are truncated).
    max_examples: stop after this many (None = all).
  """

  model: ModelConfig
  model_dir: str
  output: str
  run: RunOptions = RunOptions()
  task: Optional[str] = None
  split: str = "validation"
  input_file: Optional[str] = None
  vocabulary: str = "builtin"
  inputs_length: int = 256
  max_examples: Optional[int] = None
  decode: DecodeConfig = DecodeConfig()


def load_params(cfg: ModelConfig, model_dir: str, step: Optional[int] = None,
                run: RunOptions = RunOptions()) -> Any:
  """A run's checkpoint params, whole on this process's first local device.

  In a multi-process run each process reads its own copy (the device of `jax.devices()[0]`
  may belong to another process), and all read the step process 0 finds newest.

  Args:
    cfg: the architecture (a step saved in the other layout is converted to `run`'s).
    model_dir: the run directory (its `checkpoints/` are read).
    step: the step; None for the newest finalized one.
    run: the params come in `run.param_dtype` and the layout `run.scan_layers` says.

  Returns:
    The params tree of `jax.Array`s on `jax.local_devices()[0]`.
  """
  from t5gemma_jax import params_reader
  if step is None and jax.process_count() > 1:
    step = latest_step_everywhere(model_dir)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      abstract_params(cfg, run, boxed=False))
  return params_reader.ParamsReader(model_dir, step).read(abstract, cfg=cfg)


def latest_step_everywhere(directory: str) -> int:
  """The newest finalized checkpoint step as process 0 sees it, on every process: a step a
  still-training run commits between two processes' listings must not split them. Read only
  (`params_reader`): a save still in flight there is skipped, and never cleaned up.

  Args:
    directory: a run directory or its `checkpoints/`.

  Raises:
    CheckpointNotFoundError: `directory` is missing or holds no finalized step.
  """
  from t5gemma_jax import params_reader
  step = params_reader.latest_step(directory)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    step = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if step is None else step)))
    step = None if step < 0 else step
  if step is None:
    raise params_reader.CheckpointNotFoundError(
        f"no complete checkpoint in {params_reader.steps_directory(directory)}")
  return step


def _file_rows(path: str, vocabulary: str, inputs_length: int, max_examples: Optional[int]):
  """(encoder rows [n, S], input texts, None, vocabulary) for one input per line of `path`."""
  from t5gemma_jax import tasks  # noqa: F401  (the vocabularies)
  from t5gemma_jax.tasks import named_vocabularies
  if not os.path.isfile(path):
    raise FileNotFoundError(f"input file not found: {path}")
  vocab = named_vocabularies.get(vocabulary)
  with open(path, encoding="utf-8") as f:
    texts = [line.rstrip("\n") for line in f if line.strip()][:max_examples]
  rows = np.zeros((len(texts), inputs_length), np.int32)
  for i, text in enumerate(texts):
    ids = vocab.encode(text)[:inputs_length - 1] + [vocab.eos_id]
    rows[i, :len(ids)] = ids
  return rows, texts, None, vocab


def _task_rows(task_name: str, split: str, inputs_length: int, targets_length: int,
               max_examples: Optional[int]):
  """(encoder rows [n, S], input texts, target texts, vocabulary) of a task split, in order."""
  task = pipeline.get_mixture_or_task(task_name)
  ds = task.get_dataset({"inputs": inputs_length, "targets": targets_length}, split=split,
                        shuffle=False, num_epochs=1)
  if max_examples:
    ds = ds.take(max_examples)
  rows, texts, targets = [], [], []
  for ex in ds.as_numpy_iterator():
    row = np.zeros((inputs_length,), np.int32)
    row[:len(ex["inputs"])] = ex["inputs"]
    rows.append(row)
    texts.append(ex["inputs_pretokenized"].decode("utf-8"))
    targets.append(ex["targets_pretokenized"].decode("utf-8"))
  return np.stack(rows), texts, targets, task.output_features["targets"].vocabulary


def _decode_rows(params: Any, model: ModelConfig, source, decode: DecodeConfig,
                 run: RunOptions) -> list[dict]:
  """[{"input", "prediction", "target"?}] in row order, from `_file_rows` / `_task_rows`'s
  (rows [n, S], texts, targets or None, vocabulary); on every process of a multi-process run."""
  rows, texts, targets, vocab = source
  batches = (rows[i:i + decode.batch_size] for i in range(0, len(rows), decode.batch_size))
  tokens = predictions(params, model, batches, decode.max_new_tokens, decode.batch_size,
                       run=run, **decode.options())
  records = []
  for i, (text, row) in enumerate(zip(texts, tokens)):
    record = {"input": text, "prediction": vocab.decode(strip(row, model.eos_id))}
    if targets is not None:
      record["target"] = targets[i]
    records.append(record)
  return records


def task_records(params: Any, model: ModelConfig, task: str, split: str, inputs_length: int,
                 max_examples: Optional[int], decode: DecodeConfig,
                 run: RunOptions = RunOptions()) -> list[dict]:
  """[{"input", "prediction", "target"}] for the first examples of a task split."""
  return _decode_rows(params, model, _task_rows(task, split, inputs_length,
                                                decode.max_new_tokens, max_examples), decode,
                      run)


def infer(cfg: InferConfig) -> int:
  """Decodes and writes `cfg.output` atomically; returns the number of examples written.

  As one of several processes (`jax.distributed`), each decodes its share of the examples and
  process 0 alone writes the whole file; every process returns the same count.
  """
  from t5gemma_jax import sharding
  if (cfg.task is None) == (cfg.input_file is None):
    raise ValueError("InferConfig needs exactly one of task or input_file")
  sharding.maybe_initialize_distributed()  # launched as N processes: join them first
  if cfg.input_file is not None:
    source = _file_rows(cfg.input_file, cfg.vocabulary, cfg.inputs_length, cfg.max_examples)
  else:
    source = _task_rows(cfg.task, cfg.split, cfg.inputs_length, cfg.decode.max_new_tokens,
                        cfg.max_examples)
  params = load_params(cfg.model, cfg.model_dir, run=cfg.run)
  records = _decode_rows(params, cfg.model, source, cfg.decode, cfg.run)
  if jax.process_index() == 0:  # the others hold the same records
    atomic.write_text(cfg.output, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                          for r in records))
  return len(records)
