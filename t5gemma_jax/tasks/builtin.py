"""Built-in tasks on real text that ships with every install, and `builtin_mixture`.

- python_text_{span_corruption,ul2,prefix_lm}: Python's documentation topics and the docstrings
  of the standard library and installed packages.
- docstring_summarization: "summarize: <docstring body>" -> its one-line summary (ROUGE).
- cldr_translate_en_ru / cldr_translate_en_de: CLDR names (territories, languages, currencies,
  scripts, units, ...) from babel (BLEU, chrF, exact match).
All use the vocabulary trained on these corpora (`tasks.named_vocabularies.BUILTIN`); splits are fixed
by a hash of each item's key.
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional

import seqio
import tensorflow as tf

from t5gemma_jax import metrics
from t5gemma_jax.data import corpora, supervised
from t5gemma_jax.tasks import named_vocabularies, text_objectives

FEATURES = named_vocabularies.features(named_vocabularies.BUILTIN)
TEXT_TASKS = {"python_text_span_corruption": "span_corruption", "python_text_ul2": "ul2",
              "python_text_prefix_lm": "prefix_lm", "python_text_t5gemma2": "t5gemma2"}
TRANSLATION = {"cldr_translate_en_ru": ("cldr_en_ru", "Russian"),
               "cldr_translate_en_de": ("cldr_en_de", "German")}
DEFAULT_MIXTURE_RATES = {"python_text_span_corruption": 1.0, "python_text_ul2": 1.0,
                         "docstring_summarization": 1.0, "cldr_translate_en_ru": 0.5,
                         "cldr_translate_en_de": 0.5}


def _records_dataset(corpus: str, split: str, shuffle_files: bool,
                     seed: Optional[int] = None) -> tf.data.Dataset:
  del shuffle_files, seed  # one in-memory "file"; seqio shuffles examples afterwards
  items = corpora.load(corpus, split)
  if not items:
    raise ValueError(f"built-in corpus {corpus!r} has no {split!r} examples")
  if isinstance(items[0], corpora.Record):
    return tf.data.Dataset.from_tensor_slices({"text": [r.text for r in items]})
  return tf.data.Dataset.from_tensor_slices({"source": [p.source for p in items],
                                             "target": [p.target for p in items]})


def _source(corpus: str) -> seqio.FunctionDataSource:
  return seqio.FunctionDataSource(functools.partial(_records_dataset, corpus),
                                  splits=corpora.SPLITS)


def _text_to_text(prefix_fn) -> list:
  return [prefix_fn, seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim]


def register_mixture(rates: Mapping[str, float] = DEFAULT_MIXTURE_RATES) -> None:
  """(Re)registers `builtin_mixture` with the given task rates (gin: data_settings)."""
  unknown = sorted(set(rates) - set(seqio.TaskRegistry.names()))
  if unknown:
    raise ValueError(f"builtin_mixture rates name unregistered tasks {unknown}")
  if "builtin_mixture" in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove("builtin_mixture")
  seqio.MixtureRegistry.add("builtin_mixture", [(t, float(r)) for t, r in rates.items()])


def register_supervised(suite: metrics.MetricSuite) -> None:
  """(Re)registers the tasks that have metrics, scored with `suite`'s metric fns."""
  for name in ("docstring_summarization", *TRANSLATION):
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      "docstring_summarization", source=_source("docstring_summaries"),
      preprocessors=_text_to_text(functools.partial(
          supervised.summarize, article_key="source", summary_key="target")),
      output_features=FEATURES, metric_fns=[suite.rouge])
  for task, (corpus, language) in TRANSLATION.items():
    seqio.TaskRegistry.add(
        task, source=_source(corpus),
        preprocessors=_text_to_text(functools.partial(
            supervised.translate, source_key="source", target_key="target",
            source_language="English", target_language=language)),
        # Names are short: whether the whole name is right says more than n-gram overlap.
        output_features=FEATURES, metric_fns=[suite.bleu, suite.chrf, suite.exact_match])


def register() -> None:
  for task, objective in TEXT_TASKS.items():
    seqio.TaskRegistry.add(task, source=_source("python_text"),
                           preprocessors=text_objectives.preprocessors(objective,
                                                                  named_vocabularies.BUILTIN),
                           output_features=FEATURES)
  register_supervised(metrics.for_mode("default"))
  register_mixture()
