"""Tasks over TFDS datasets, read from a prepared TFDS_DATA_DIR with the Gemma tokenizer.

Translation: wmt14_ende, wmt16_enro (BLEU, chrF). Summarisation: cnn_dailymail, xsum (ROUGE).
Pretraining on C4 (c4/en): c4_span_corruption, c4_ul2 (the T5Gemma 2 denoisers), c4_prefix_lm,
and the mixture c4_t5gemma_pretrain (UL2 + PrefixLM, the T5Gemma paper's two objectives).
"""

from __future__ import annotations

import functools

import seqio

from t5gemma_jax import metrics
from t5gemma_jax.data import supervised
from t5gemma_jax.tasks import named_vocabularies, text_objectives
from t5gemma_jax.tasks.sources import PreparedTfdsSource

GEMMA_FEATURES = named_vocabularies.features(named_vocabularies.GEMMA)
# Rows are trimmed to the sequence length after EOS is appended, so the EOS survives.
TEXT_TO_TEXT_TAIL = [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos_after_trim]

TRANSLATION = {
    # task: (tfds name, source key, target key, source language, target language)
    "wmt14_ende": ("wmt14_translate/de-en:1.0.0", "en", "de", "English", "German"),
    "wmt16_enro": ("wmt16_translate/ro-en:1.0.0", "en", "ro", "English", "Romanian"),
}
C4 = "c4/en:3.1.0"
PRETRAINING = {"c4_span_corruption": "span_corruption", "c4_ul2": "t5gemma2",
               "c4_prefix_lm": "prefix_lm"}
SUMMARIZATION = {
    # task: (tfds name, article key, summary key)
    "cnn_dailymail": ("cnn_dailymail:3.4.0", "article", "highlights"),
    "xsum": ("xsum:1.1.0", "document", "summary"),
}


def register_pretraining_mixture(rates=(("c4_ul2", 1.0), ("c4_prefix_lm", 1.0))) -> None:
  """(Re)registers c4_t5gemma_pretrain with the given (task, rate) pairs."""
  if "c4_t5gemma_pretrain" in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove("c4_t5gemma_pretrain")
  seqio.MixtureRegistry.add("c4_t5gemma_pretrain", [(t, float(r)) for t, r in rates])


def register_supervised(suite: metrics.MetricSuite) -> None:
  """(Re)registers the translation and summarisation tasks, scored with `suite`'s fns."""
  for name in (*TRANSLATION, *SUMMARIZATION):
    seqio.TaskRegistry.remove(name)
  for task, (tfds_name, src, tgt, src_lang, tgt_lang) in TRANSLATION.items():
    seqio.TaskRegistry.add(
        task, source=PreparedTfdsSource(tfds_name),
        preprocessors=[functools.partial(supervised.translate, source_key=src, target_key=tgt,
                                         source_language=src_lang, target_language=tgt_lang),
                       *TEXT_TO_TEXT_TAIL],
        output_features=GEMMA_FEATURES, metric_fns=[suite.bleu, suite.chrf])
  for task, (tfds_name, article, summary) in SUMMARIZATION.items():
    seqio.TaskRegistry.add(
        task, source=PreparedTfdsSource(tfds_name),
        preprocessors=[functools.partial(supervised.summarize, article_key=article,
                                         summary_key=summary), *TEXT_TO_TEXT_TAIL],
        output_features=GEMMA_FEATURES, metric_fns=[suite.rouge])


def register() -> None:
  for task, objective in PRETRAINING.items():
    seqio.TaskRegistry.add(task, source=PreparedTfdsSource(C4),
                           preprocessors=text_objectives.preprocessors(
                               objective, named_vocabularies.GEMMA),
                           output_features=GEMMA_FEATURES)
  register_pretraining_mixture()
  register_supervised(metrics.for_mode("default"))
