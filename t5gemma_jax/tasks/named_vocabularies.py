"""The vocabularies tasks can use, by name: Gemma's tokenizer and the built-in trained one."""

from __future__ import annotations

import zlib
from typing import Iterator

import seqio

from t5gemma_jax.data import corpora
from t5gemma_jax.data.vocab import DeferredGemmaVocabulary, TrainedVocabulary


# Of the Python text (docstrings of the stdlib and the installed packages) the vocabulary reads
# the items in this many hash buckets of 100: enough English and code for 2048 pieces, and the
# SentencePiece trainer's time (one thread) stays near what a smaller corpus cost.
_PYTHON_TEXT_PERCENT = 40


def _builtin_training_text() -> Iterator[str]:
  """Paragraphs of the built-in corpora's train splits (SentencePiece wants short sentences)."""
  for name in ("python_text", "cldr_en_ru", "cldr_en_de", "docstring_summaries"):
    for item in corpora.load(name, "train"):
      if name == "python_text" and zlib.crc32(item.key.encode()) % 100 >= _PYTHON_TEXT_PERCENT:
        continue
      texts = (item.text,) if isinstance(item, corpora.Record) else (item.source, item.target)
      for text in texts:
        for paragraph in text.split("\n\n"):
          if paragraph.strip():
            yield paragraph[:4000]


GEMMA = DeferredGemmaVocabulary()
# Trained on first use; `data_settings` (gin) may resize it before that. 2048 matches "tiny".
BUILTIN = TrainedVocabulary(_builtin_training_text, vocab_size=2048, num_sentinels=128)
VOCABULARIES = {"gemma": GEMMA, "builtin": BUILTIN}


def get(name: str) -> seqio.SentencePieceVocabulary:
  if name not in VOCABULARIES:
    raise ValueError(f"unknown vocabulary {name!r}; known: {sorted(VOCABULARIES)}")
  return VOCABULARIES[name]


def features(vocab: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """Encoder-decoder output features; EOS is appended to both."""
  return {"inputs": seqio.Feature(vocab, add_eos=True, required=False),
          "targets": seqio.Feature(vocab, add_eos=True)}
