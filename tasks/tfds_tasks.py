"""Tasks over TFDS datasets, read from a prepared TFDS_DATA_DIR with the Gemma tokenizer.

Translation: wmt14_ende, wmt16_enro. Summarisation: cnn_dailymail, xsum. Pretraining on C4:
c4_span_corruption, c4_ul2, c4_prefix_lm (registered in `tasks.pretraining`).
"""

from __future__ import annotations

import functools

import seqio

from t5gemma_jax import metrics
from t5gemma_jax.data import supervised
from tasks import vocabularies
from tasks.sources import PreparedTfdsSource

GEMMA_FEATURES = vocabularies.features(vocabularies.GEMMA)
# Rows are trimmed to the sequence length after EOS is appended, so the EOS survives.
TEXT_TO_TEXT_TAIL = [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos_after_trim]

TRANSLATION = {
    # task: (tfds name, source key, target key, source language, target language)
    "wmt14_ende": ("wmt14_translate/de-en:1.0.0", "en", "de", "English", "German"),
    "wmt16_enro": ("wmt16_translate/ro-en:1.0.0", "en", "ro", "English", "Romanian"),
}
SUMMARIZATION = {
    # task: (tfds name, article key, summary key)
    "cnn_dailymail": ("cnn_dailymail:3.4.0", "article", "highlights"),
    "xsum": ("xsum:1.1.0", "document", "summary"),
}


def register() -> None:
  for task, (tfds_name, src, tgt, src_lang, tgt_lang) in TRANSLATION.items():
    seqio.TaskRegistry.add(
        task, source=PreparedTfdsSource(tfds_name),
        preprocessors=[functools.partial(supervised.translate, source_key=src, target_key=tgt,
                                         source_language=src_lang, target_language=tgt_lang),
                       *TEXT_TO_TEXT_TAIL],
        output_features=GEMMA_FEATURES, metric_fns=[metrics.bleu])
  for task, (tfds_name, article, summary) in SUMMARIZATION.items():
    seqio.TaskRegistry.add(
        task, source=PreparedTfdsSource(tfds_name),
        preprocessors=[functools.partial(supervised.summarize, article_key=article,
                                         summary_key=summary), *TEXT_TO_TEXT_TAIL],
        output_features=GEMMA_FEATURES, metric_fns=[metrics.rouge])
