"""Tasks over the user's own files (TSV, JSONL, text lines, TFRecord), declared in gin.

  data_settings.user_tasks = [@my_mt/file_task()]
  my_mt/file_task.name = "my_mt"
  my_mt/file_task.train = "/data/mt/train-*.tsv"
  my_mt/file_task.validation = "/data/mt/dev.tsv"
  my_mt/file_task.prefix = "translate English to German: "
  my_mt/file_task.metrics = ["bleu"]

Supervised files hold (input, target) pairs: TSV columns 1 and 2, JSONL/TFRecord keys
`input_key` / `target_key`. Pretraining objectives read one text field (`text_key`, or the only
TSV column / the whole line).
"""

from __future__ import annotations

import functools
import json
from typing import Optional, Sequence

import seqio
import tensorflow as tf

from t5gemma_jax import metrics as metrics_lib
from t5gemma_jax.tasks import named_vocabularies, text_objectives
from t5gemma_jax.tasks.sources import existing_files

FORMATS = ("tsv", "jsonl", "text", "tfrecord")
# "t5_*": the T5 codebase's settings (see `metrics`); a task takes one BLEU and one ROUGE.
METRICS = {"bleu": metrics_lib.bleu, "chrf": metrics_lib.chrf, "rouge": metrics_lib.rouge,
           "exact_match": metrics_lib.exact_match, "t5_bleu": metrics_lib.t5_bleu,
           "t5_rouge": metrics_lib.t5_rouge}


def _parse_tsv(dataset, keys):
  def fn(line):
    fields = tf.io.decode_csv(line, record_defaults=[""] * len(keys), field_delim="\t",
                              use_quote_delim=False)
    return dict(zip(keys, fields))
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _parse_jsonl(dataset, keys):
  def decode(line):
    record = json.loads(line.numpy().decode("utf-8"))
    return [str(record.get(k, "")) for k in keys]

  def fn(line):
    fields = tf.py_function(decode, [line], [tf.string] * len(keys))
    return {k: tf.ensure_shape(f, []) for k, f in zip(keys, fields)}
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _parse_text(dataset, keys):
  return dataset.map(lambda line: {keys[0]: line}, num_parallel_calls=tf.data.AUTOTUNE)


def _add_prefix(dataset, prefix: str):
  return dataset.map(lambda ex: {**ex, "inputs": tf.strings.join([prefix, ex["inputs"]])},
                     num_parallel_calls=tf.data.AUTOTUNE)


def _rename(dataset, mapping):
  return dataset.map(lambda ex: {new: ex[old] for old, new in mapping.items()},
                     num_parallel_calls=tf.data.AUTOTUNE)


def file_task(name: str, train: str | Sequence[str], validation: Optional[str] = None,
              format: str = "tsv", objective: str = "supervised", input_key: str = "inputs",
              target_key: str = "targets", text_key: str = "text", prefix: str = "",
              vocabulary: str = "builtin", metrics: Sequence[str] = ()) -> str:
  """Registers a seqio task over local files and returns its name.

  Args:
    name: task name (must be new).
    train, validation: file patterns per split.
    format: one of FORMATS.
    objective: "supervised" or a pretraining objective of `tasks.text_objectives.OBJECTIVES`.
    input_key, target_key, text_key: field names in JSONL / TFRecord files.
    prefix: prepended to supervised inputs (e.g. "summarize: ").
    vocabulary: a name of `tasks.named_vocabularies.VOCABULARIES`.
    metrics: names from METRICS.
  """
  if format not in FORMATS:
    raise ValueError(f"file_task {name!r}: format {format!r} is not one of {FORMATS}")
  if name in seqio.TaskRegistry.names():
    raise ValueError(f"file_task {name!r}: a task of that name is already registered")
  unknown = sorted(set(metrics) - set(METRICS))
  if unknown:
    raise ValueError(f"file_task {name!r}: unknown metrics {unknown}; known: {sorted(METRICS)}")
  try:  # e.g. bleu and t5_bleu: both report "bleu", one number would overwrite the other
    metrics_lib.signatures(METRICS[m] for m in metrics)
  except ValueError as e:
    raise ValueError(f"file_task {name!r}: metrics {list(metrics)} clash: {e}") from e
  splits = {"train": train} if validation is None else {"train": train, "validation": validation}
  splits = existing_files(splits, f"file_task {name!r}")
  supervised = objective == "supervised"
  keys = [input_key, target_key] if supervised else [text_key]
  if format == "tfrecord":
    source = seqio.TFExampleDataSource(
        splits, {k: tf.io.FixedLenFeature([], tf.string) for k in keys})
    parse = []
  else:
    source = seqio.TextLineDataSource(splits)
    parser = {"tsv": _parse_tsv, "jsonl": _parse_jsonl, "text": _parse_text}[format]
    if format == "text" and supervised:
      raise ValueError(f"file_task {name!r}: text-line files hold no targets; use tsv, jsonl or "
                       "tfrecord for supervised tasks, or a pretraining objective")
    parse = [functools.partial(parser, keys=keys)]
  vocab = named_vocabularies.get(vocabulary)
  if supervised:
    steps = [*parse, functools.partial(_rename, mapping={input_key: "inputs",
                                                         target_key: "targets"})]
    if prefix:
      steps.append(functools.partial(_add_prefix, prefix=prefix))
    steps += [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
              seqio.preprocessors.append_eos_after_trim]
  else:
    steps = [*parse, functools.partial(_rename, mapping={text_key: "text"}),
             *text_objectives.preprocessors(objective, vocab)]
  seqio.TaskRegistry.add(name, source=source, preprocessors=steps,
                         output_features=named_vocabularies.features(vocab),
                         metric_fns=[METRICS[m] for m in metrics])
  return name
