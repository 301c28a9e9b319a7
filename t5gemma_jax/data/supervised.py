"""Text-to-text formatting for supervised tasks: "translate X to Y: ..." and "summarize: ...".

Each function is a seqio preprocessor over string features; tokenisation comes after.
"""

from __future__ import annotations

import seqio
import tensorflow as tf


def translate(dataset: tf.data.Dataset, source_key: str, target_key: str,
              source_language: str, target_language: str) -> tf.data.Dataset:
  """{source_key: str, target_key: str} -> {"inputs": "translate A to B: src", "targets": tgt}."""
  prefix = f"translate {source_language} to {target_language}: "

  @seqio.map_over_dataset
  def fn(ex):
    return {"inputs": tf.strings.join([prefix, ex[source_key]]), "targets": ex[target_key]}

  return fn(dataset)


def summarize(dataset: tf.data.Dataset, article_key: str, summary_key: str) -> tf.data.Dataset:
  """{article_key: str, summary_key: str} -> {"inputs": "summarize: article", "targets": summary}."""

  @seqio.map_over_dataset
  def fn(ex):
    return {"inputs": tf.strings.join(["summarize: ", ex[article_key]]),
            "targets": ex[summary_key]}

  return fn(dataset)


def text_as_targets(dataset: tf.data.Dataset, text_key: str = "text") -> tf.data.Dataset:
  """{text_key: str} -> {"targets": str}: raw text for the unsupervised objectives."""
  return dataset.map(lambda ex: {"targets": ex[text_key]},
                     num_parallel_calls=tf.data.AUTOTUNE)
