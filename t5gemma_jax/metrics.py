"""Metric functions with seqio's signature `fn(targets, predictions) -> {name: value}`.

BLEU is sacrebleu's corpus BLEU; ROUGE is rouge_score's F-measure x 100, with ROUGE-Lsum over
sentences split on end punctuation (no NLTK data download needed).
"""

from __future__ import annotations

import re
from typing import Sequence

import sacrebleu
from rouge_score import rouge_scorer

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing)."""
  if len(targets) != len(predictions):
    raise ValueError(f"bleu: {len(targets)} targets but {len(predictions)} predictions")
  score = sacrebleu.corpus_bleu(list(predictions), [list(targets)])
  return {"bleu": score.score}


def _sentences_per_line(text: str) -> str:
  return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Mean ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measures, scaled to 0..100."""
  if len(targets) != len(predictions):
    raise ValueError(f"rouge: {len(targets)} targets but {len(predictions)} predictions")
  names = ("rouge1", "rouge2", "rougeLsum")
  scorer = rouge_scorer.RougeScorer(names, use_stemmer=True)
  totals = dict.fromkeys(names, 0.0)
  for target, prediction in zip(targets, predictions):
    scores = scorer.score(_sentences_per_line(target), _sentences_per_line(prediction))
    for name in names:
      totals[name] += scores[name].fmeasure
  # A plain mean: rouge_score's bootstrap aggregator is random and would make evals unrepeatable.
  return {name: 100.0 * totals[name] / max(len(targets), 1) for name in names}


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of predictions equal to their target after stripping outer whitespace."""
  if len(targets) != len(predictions):
    raise ValueError(f"exact_match: {len(targets)} targets but {len(predictions)} predictions")
  hits = sum(t.strip() == p.strip() for t, p in zip(targets, predictions))
  return {"exact_match": 100.0 * hits / max(len(targets), 1)}
