"""From a seqio task or mixture to global batches on the device mesh.

Each process reads its own shard (`ShardInfo(process_index, process_count)`) and builds its
slice of the global batch; `jax.make_array_from_process_local_data` then makes one `jax.Array`
per feature, sharded over the batch axes. The tf.data iterator can be checkpointed, so a resumed
run continues at the exact next example.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Iterator, Mapping, Optional

import jax
import numpy as np
import seqio
import tensorflow as tf

from t5gemma_jax.data.vocab import BOS_ID

# Features produced by EncDecFeatureConverter (packed); unpacked batches lack the last four.
MODEL_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                  "decoder_loss_weights", "encoder_segment_ids", "decoder_segment_ids",
                  "encoder_positions", "decoder_positions")
# Features of PrefixLMFeatureConverter (decoder-only models); unpacked batches lack the last two.
DECODER_ONLY_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                         "decoder_causal_attention", "decoder_segment_ids", "decoder_positions")


def hide_gpus_from_tensorflow() -> None:
  """TF must not grab accelerator memory in a process where JAX owns the devices."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # devices already initialised; nothing was visible to change
    pass


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read and how to batch it.

  Attributes:
    mixture_or_task: a registered seqio task or mixture name.
    task_feature_lengths: {"inputs": S, "targets": T} in tokens.
    global_batch_size: rows per step over all processes.
    split: dataset split.
    shuffle: shuffle examples (seeded).
    seed: seed for shuffling and for the preprocessors' stateless randomness.
    pack: pack several examples into each row (segment ids and positions are then set).
    num_epochs: None repeats forever (training); 1 for a single pass (evaluation).
    use_cached: read a seqio cache prepared offline.
    decoder_only: batches for a decoder-only model: each example's inputs then targets in one
      row of inputs + targets tokens (`feature_converter`).
  """

  mixture_or_task: str
  task_feature_lengths: Mapping[str, int]
  global_batch_size: int
  split: str = "train"
  shuffle: bool = True
  seed: int = 0
  pack: bool = True
  num_epochs: Optional[int] = None
  use_cached: bool = False
  decoder_only: bool = False


def feature_converter(pack: bool, decoder_only: bool = False) -> seqio.FeatureConverter:
  """seqio's converter with Gemma's BOS (2) starting every decoder segment: encoder-decoder, or
  for a decoder-only model `PrefixLMFeatureConverter` (BOS, inputs, targets in one row; loss on
  the targets only; `decoder_causal_attention` marks BOS and the inputs, which a PrefixLM model
  attends to both ways and a causal one ignores)."""
  if decoder_only:
    return seqio.PrefixLMFeatureConverter(pack=pack, bos_id=BOS_ID, loss_on_targets_only=True)
  return seqio.EncDecFeatureConverter(pack=pack, bos_id=BOS_ID)


def get_mixture_or_task(name: str):
  """The registered task or mixture; unknown names list the closest registered ones."""
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    import difflib
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown task or mixture {name!r}{hint} (registered: {len(known)}; "
                     "list them with `t5gemma show_task --task=list`)") from None


def host_dataset(cfg: DataConfig, process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> tf.data.Dataset:
  """This process's batches: dicts of int32 [global_batch / process_count, length].

  Args:
    cfg: the data config.
    process_index, process_count: default to JAX's; tests pass them to emulate several hosts.
  """
  hide_gpus_from_tensorflow()
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if cfg.global_batch_size % count:
    raise ValueError(f"global_batch_size {cfg.global_batch_size} is not divisible by the "
                     f"{count} processes")
  for key in ("inputs", "targets"):
    if key not in cfg.task_feature_lengths:
      raise ValueError(f"task_feature_lengths needs '{key}', got {dict(cfg.task_feature_lengths)}")
  get_mixture_or_task(cfg.mixture_or_task)  # fail early with a helpful message
  ds = seqio.get_dataset(
      cfg.mixture_or_task, task_feature_lengths=dict(cfg.task_feature_lengths),
      feature_converter=feature_converter(cfg.pack, cfg.decoder_only), dataset_split=cfg.split,
      use_cached=cfg.use_cached, shuffle=cfg.shuffle, num_epochs=cfg.num_epochs,
      shard_info=seqio.ShardInfo(index=index, num_shards=count), verbose=False,
      seed=cfg.seed, batch_size=None)
  ds = ds.batch(cfg.global_batch_size // count, drop_remainder=cfg.num_epochs is None)
  return ds.prefetch(tf.data.AUTOTUNE)


class GlobalBatches:
  """Iterates global batches as sharded `jax.Array`s and checkpoints its position.

  Args:
    dataset: this process's batches (`host_dataset`).
    sharding: a `jax.sharding.Sharding` for a [batch, length] array (e.g. NamedSharding with
      PartitionSpec(("data", "fsdp"))); None keeps numpy arrays (single process, no mesh).
    fingerprint: keep `last_fingerprint`, a CRC-32 of this process's part of the latest batch
      (every feature, in name order), to check that a resumed run sees the same examples.
  """

  def __init__(self, dataset: tf.data.Dataset, sharding=None, fingerprint: bool = False):
    self._iterator = iter(dataset)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
    self._sharding = sharding
    self._fingerprint = fingerprint
    self.last_fingerprint: Optional[int] = None

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    local = {k: v.numpy() for k, v in next(self._iterator).items()}
    if self._fingerprint:
      crc = 0
      for k in sorted(local):
        crc = zlib.crc32(np.ascontiguousarray(local[k]).tobytes(), zlib.crc32(k.encode(), crc))
      self.last_fingerprint = crc
    if self._sharding is None:
      return local
    return {k: jax.make_array_from_process_local_data(self._sharding, np.asarray(v))
            for k, v in local.items()}

  def save(self, path: str) -> None:
    """Writes the iterator position to `path` (a prefix); one file set per process."""
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")  # gs:// paths too
    self._checkpoint.write(path)

  def restore(self, path: str) -> None:
    """Moves the iterator to the position saved at `path`."""
    if not tf.io.gfile.glob(path + ".index"):
      raise FileNotFoundError(f"no data-iterator checkpoint at {path}")
    self._checkpoint.read(path).assert_consumed()
