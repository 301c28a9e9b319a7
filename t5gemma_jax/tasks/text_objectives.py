"""Pretraining objectives by name, as the preprocessor list a text task needs.

A task whose examples hold one "text" string gets: rename to "targets" -> tokenize -> the
objective -> append EOS. Special token ids are read from the task's vocabulary when the dataset
is built (not at registration, which would force training the built-in vocabulary on import).
"""

from __future__ import annotations

import functools
from typing import Callable

import seqio
import tensorflow as tf

from t5gemma_jax.data import objectives as objectives_lib
from t5gemma_jax.data import supervised
from t5gemma_jax.data.vocab import special_tokens


def _span_corruption(special):
  return objectives_lib.make_span_corruption(special.sentinel_ids)


def _prefix_lm(special):
  del special
  return objectives_lib.make_prefix_lm()


def _ul2(preset: str, special):
  denoisers, rates = objectives_lib.ul2_preset(preset)
  return objectives_lib.make_ul2(denoisers, rates, special.sentinel_ids, special.mode_ids)


OBJECTIVES: dict[str, Callable] = {
    "span_corruption": _span_corruption,
    "prefix_lm": _prefix_lm,
    "ul2": functools.partial(_ul2, "ul2"),
    "ul2r": functools.partial(_ul2, "ul2r"),
    "t5gemma2": functools.partial(_ul2, "t5gemma2"),
}


def _deferred(objective: str, vocab: seqio.Vocabulary):
  """A preprocessor that builds the objective from the vocabulary's tokens on first use."""
  built = {}

  def apply(dataset: tf.data.Dataset, sequence_length, output_features) -> tf.data.Dataset:
    if "fn" not in built:
      built["fn"] = OBJECTIVES[objective](special_tokens(vocab))
    return built["fn"](dataset, sequence_length=sequence_length,
                       output_features=output_features)

  apply.__name__ = f"{objective}_objective"
  return apply


def preprocessors(objective: str, vocab: seqio.Vocabulary) -> list:
  """The preprocessors turning {"text": str} examples into objective examples.

  Args:
    objective: a key of OBJECTIVES.
    vocab: the task's vocabulary (sentinels and mode tokens come from it).
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown objective {objective!r}; known: {sorted(OBJECTIVES)} "
                     "(or 'supervised' for file tasks)")
  return [supervised.text_as_targets, seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(), _deferred(objective, vocab),
          seqio.preprocessors.append_eos_after_trim]
