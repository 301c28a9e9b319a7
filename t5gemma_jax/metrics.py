"""Metric functions with seqio's signature `fn(targets, predictions) -> {name: float}`.

Two modes, as separate functions (a task names the ones it uses; `for_mode` picks a set):

- "default": `bleu` (sacreBLEU corpus BLEU, 13a tokenisation), `chrf` (sacreBLEU chrF2),
  `rouge` (rouge_score F-measure x 100 with the Porter stemmer, a plain mean over examples,
  ROUGE-Lsum over sentences split on end punctuation) and `exact_match`.
- "t5": `t5_bleu` and `t5_rouge` reproduce `t5.evaluation.metrics.bleu` / `.rouge` of the
  T5 codebase (google-research/text-to-text-transfer-transformer), so that numbers compare
  with papers that used it; chrF and exact match are as in "default" (T5 has no chrF).

Every metric fn records the exact settings behind its numbers: `settings(fn)` gives
{output name: settings string} (sacreBLEU's signature for BLEU and chrF, an option list in the
same `key:value|...` form for ROUGE), and `signatures(fns)` merges those of a task's fns for
writing beside the scores. The fns themselves return plain floats, as seqio and TensorBoard
want.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer, scoring

MetricFn = Callable[[Sequence[str], Sequence[str]], dict]

# The attribute a metric fn carries its settings under ({output name: settings string}).
SETTINGS_ATTRIBUTE = "metric_settings"

_BLEU_DEFAULT = {"tokenize": "13a", "smooth_method": "exp"}  # sacreBLEU's own defaults
# Exactly the keyword arguments T5's `metrics.bleu` passes to `sacrebleu.corpus_bleu`
# (`use_effective_order` there is `effective_order` in the object API).
_BLEU_T5 = {"tokenize": "intl", "smooth_method": "exp", "smooth_value": 0.0, "force": False,
            "lowercase": False, "effective_order": False}
_CHRF = {}  # sacreBLEU's chrF2: character 6-grams, no word n-grams, beta 2

_ROUGE_TYPES = ("rouge1", "rouge2", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# The bootstrap resamples with numpy's global RNG; seeding it makes an eval repeatable.
T5_BOOTSTRAP_SEED = 0
_T5_BOOTSTRAP_SAMPLES = 1000  # rouge_score's default, which T5 keeps
_ROUGE_VERSION = importlib.metadata.version("rouge_score")


def _records(settings: Mapping[str, str]):
  """Decorator: attaches `settings` to a metric fn (read back by `settings`)."""
  def attach(fn):
    setattr(fn, SETTINGS_ATTRIBUTE, dict(settings))
    return fn
  return attach


def _check_pairs(name: str, targets: Sequence[str], predictions: Sequence[str]) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f"{name}: {len(targets)} targets but {len(predictions)} predictions")


def _sacrebleu_signature(metric_class, options: Mapping) -> str:
  """The sacreBLEU signature of `metric_class(**options)` with one reference per example.

  sacreBLEU reports the reference count only once a corpus has been scored, so a one-line
  corpus is scored first; seqio always gives one target string per example.
  """
  metric = metric_class(**options)
  metric.corpus_score(["x"], [["x"]])
  return metric.get_signature().format()


def _sacrebleu_metric(fn_name: str, name: str, metric_class, options: Mapping,
                      doc: str) -> MetricFn:
  """A corpus-level sacreBLEU metric fn, `fn_name(targets, predictions) -> {name: score on
  0..100}` with one reference per example, recording its sacreBLEU signature.

  The fn raises ValueError for unequal lengths or no examples.
  """
  def score(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    _check_pairs(name, targets, predictions)
    if not targets:
      raise ValueError(f"{name}: no examples to score")
    metric = metric_class(**options)
    return {name: metric.corpus_score(list(predictions), [list(targets)]).score}
  score.__name__ = score.__qualname__ = fn_name  # how seqio and messages name it
  score.__doc__ = doc
  return _records({name: _sacrebleu_signature(metric_class, options)})(score)


bleu = _sacrebleu_metric(
    "bleu", "bleu", sacrebleu.BLEU, _BLEU_DEFAULT,
    "Corpus BLEU with sacreBLEU's defaults (13a tokenisation, exponential smoothing).")
t5_bleu = _sacrebleu_metric(
    "t5_bleu", "bleu", sacrebleu.BLEU, _BLEU_T5,
    "Corpus BLEU as T5 computes it: sacreBLEU with the \"intl\" tokeniser, exponential "
    "smoothing, no lowercasing, no effective order.")
chrf = _sacrebleu_metric(
    "chrf", "chrf", sacrebleu.CHRF, _CHRF,
    "Corpus chrF2 (sacreBLEU's default chrF): kinder than BLEU to short outputs and to "
    "morphologically rich target languages.")


def _rouge_settings(stemmer: bool, aggregate: str, lsum_split: str) -> dict[str, str]:
  text = (f"types:{','.join(_ROUGE_TYPES)}|stemmer:{'porter' if stemmer else 'no'}|"
          f"aggregate:{aggregate}|lsum_split:{lsum_split}|score:fmeasure*100|"
          f"version:rouge_score-{_ROUGE_VERSION}")
  return dict.fromkeys(_ROUGE_TYPES, text)


def _sentences_per_line(text: str) -> str:
  return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


@_records(_rouge_settings(True, "mean", r"regex(?<=[.!?])\s+"))
def rouge(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Mean ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measures, scaled to 0..100 (Porter stemmer).

  ROUGE-Lsum sees sentences split after ".", "!" or "?" (no NLTK data download needed).

  Args:
    targets: one reference per example.
    predictions: one summary per example.

  Returns:
    {"rouge1", "rouge2", "rougeLsum": score on 0..100}; zeros for no examples.
  """
  _check_pairs("rouge", targets, predictions)
  scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)
  totals = dict.fromkeys(_ROUGE_TYPES, 0.0)
  for target, prediction in zip(targets, predictions):
    scores = scorer.score(_sentences_per_line(target), _sentences_per_line(prediction))
    for name in _ROUGE_TYPES:
      totals[name] += scores[name].fmeasure
  return {name: 100.0 * totals[name] / max(len(targets), 1) for name in _ROUGE_TYPES}


@contextlib.contextmanager
def _numpy_global_seed(seed: int):
  """numpy's global RNG seeded inside the block and restored after it: the metric neither
  depends on nor disturbs whoever else draws from it."""
  state = np.random.get_state()
  np.random.seed(seed)
  try:
    yield
  finally:
    np.random.set_state(state)


def _t5_sentence_lines(summary: str) -> str:
  # T5's `_prepare_summary`: a newline after each space-separated period, so that ROUGE-Lsum
  # (which splits on newlines) sees sentences of tokenised text.
  return summary.replace(" . ", " .\n")


@_records(_rouge_settings(
    False, f"bootstrap-mid(n={_T5_BOOTSTRAP_SAMPLES},seed={T5_BOOTSTRAP_SEED})",
    "' . '->newline"))
def t5_rouge(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """ROUGE as T5 computes it: rouge_score without stemming, per-example scores aggregated by
  rouge_score's `BootstrapAggregator` and its "mid" (median of 1000 resampled means)
  F-measure x 100; for ROUGE-Lsum " . " is followed by a newline.

  T5 leaves the bootstrap unseeded; here numpy's global RNG is seeded with
  `T5_BOOTSTRAP_SEED` for the aggregation only (its state restored afterwards), so the same
  predictions always give the same numbers. Not thread-safe against other users of
  `np.random` running at the same moment.

  Args:
    targets: one reference per example.
    predictions: one summary per example.

  Returns:
    {"rouge1", "rouge2", "rougeLsum": score on 0..100}; zeros for no examples.
  """
  _check_pairs("rouge", targets, predictions)
  if not targets:
    return dict.fromkeys(_ROUGE_TYPES, 0.0)
  scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=False)
  aggregator = scoring.BootstrapAggregator(n_samples=_T5_BOOTSTRAP_SAMPLES)
  for target, prediction in zip(targets, predictions):
    aggregator.add_scores(scorer.score(target=_t5_sentence_lines(target),
                                       prediction=_t5_sentence_lines(prediction)))
  with _numpy_global_seed(T5_BOOTSTRAP_SEED):
    result = aggregator.aggregate()
  return {name: float(100.0 * result[name].mid.fmeasure) for name in _ROUGE_TYPES}


@_records({"exact_match": "strip:outer-whitespace|case:mixed"})
def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of predictions equal to their target after stripping outer whitespace.

  Args:
    targets: one reference per example.
    predictions: one prediction per example.

  Returns:
    {"exact_match": percentage}; 0 for no examples.
  """
  _check_pairs("exact_match", targets, predictions)
  hits = sum(t.strip() == p.strip() for t, p in zip(targets, predictions))
  return {"exact_match": 100.0 * hits / max(len(targets), 1)}


def settings(fn: Callable) -> dict[str, str]:
  """The settings a metric fn of this module computes with.

  Args:
    fn: a metric fn (one from elsewhere records nothing).

  Returns:
    {output metric name: settings string}, e.g. {"bleu": "nrefs:1|case:mixed|eff:no|
    tok:13a|smooth:exp|version:2.6.0"}; {} for a fn that records none.
  """
  return dict(getattr(fn, SETTINGS_ATTRIBUTE, {}))


def signatures(fns: Iterable[Callable]) -> dict[str, str]:
  """The merged `settings` of several metric fns (a task's `metric_fns`).

  Args:
    fns: metric fns.

  Returns:
    {output metric name: settings string} over all of them.

  Raises:
    ValueError: two fns record different settings under one output name (their numbers
      would overwrite each other in seqio's results too).
  """
  merged: dict[str, str] = {}
  for fn in fns:
    for name, text in settings(fn).items():
      if merged.get(name, text) != text:
        raise ValueError(f"metric {name!r} is computed by two fns with different settings: "
                         f"{merged[name]!r} and {text!r}")
      merged[name] = text
  return merged


@dataclasses.dataclass(frozen=True)
class MetricSuite:
  """The metric fns tasks use, in one mode (see the module docstring)."""
  bleu: MetricFn
  chrf: MetricFn
  rouge: MetricFn
  exact_match: MetricFn


MODES = {"default": MetricSuite(bleu, chrf, rouge, exact_match),
         "t5": MetricSuite(t5_bleu, chrf, t5_rouge, exact_match)}


def for_mode(mode: str) -> MetricSuite:
  """The metric fns of `mode`.

  Args:
    mode: a key of MODES ("default" or "t5").

  Returns:
    Its MetricSuite.

  Raises:
    ValueError: an unknown mode.
  """
  if mode not in MODES:
    raise ValueError(f"unknown metric mode {mode!r}; known: {sorted(MODES)}")
  return MODES[mode]
