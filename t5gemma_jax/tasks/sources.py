"""Data sources that refuse to download: TFDS from a prepared directory, files that must exist."""

from __future__ import annotations

import os
from typing import Optional

import seqio
import tensorflow as tf

PREPARE_HINT = ("prepare it on a machine with network access (`tfds build {name} "
                "--data_dir=DIR`), copy DIR here and point TFDS_DATA_DIR at it")


def tfds_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"),
                                                      "tensorflow_datasets"))


class PreparedTfdsSource(seqio.TfdsDataSource):
  """A TFDS source read with `as_dataset` only (never `download_and_prepare`).

  A dataset that is not prepared under TFDS_DATA_DIR fails with its name, the directory and how
  to prepare it, instead of an attempted download.
  """

  def __init__(self, tfds_name: str, splits: Optional[dict] = None):
    super().__init__(tfds_name=tfds_name, splits=splits, read_only=True)

  def num_input_examples(self, split: str):
    try:
      return super().num_input_examples(split)
    except KeyError:  # split sizes unknown (mock data, or metadata without split info)
      return None

  def list_shards(self, split: str):
    try:
      return super().list_shards(split)
    except KeyError:  # no file list: seqio then shards the examples instead of the files
      return []

  def get_dataset(self, split=None, shuffle=True, seed=None, shard_info=None, **kwargs):
    try:
      return super().get_dataset(split, shuffle, seed, shard_info, **kwargs)
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
      name = self.tfds_dataset.name
      raise FileNotFoundError(
          f"TFDS dataset {name} is not prepared under {tfds_data_dir()} ({e}); "
          + PREPARE_HINT.format(name=name)) from None


def existing_files(split_to_pattern: dict, what: str) -> dict:
  """Checks that every split's file pattern matches at least one non-empty file; returns the
  mapping. (An empty split would only surface as a StopIteration deep in training.)"""
  for split, pattern in split_to_pattern.items():
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    for p in patterns:
      matches = tf.io.gfile.glob(p)
      if not matches:
        raise FileNotFoundError(f"{what}: no file matches {p!r} for split {split!r}")
      if all(tf.io.gfile.stat(m).length == 0 for m in matches):
        raise ValueError(f"{what}: every file matching {p!r} for split {split!r} is empty")
  return split_to_pattern
