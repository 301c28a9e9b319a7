"""Metric fns against sacreBLEU / rouge_score called directly with T5's settings, the recorded
settings (signatures), metric modes, and the settings in eval_results.jsonl."""

import glob
import json

import numpy as np
import pytest
import sacrebleu
import seqio
import tensorflow as tf
from rouge_score import rouge_scorer, scoring

from t5gemma_jax import evaluation, metrics, presets, tasks
from t5gemma_jax.tasks import files
from tests.helpers import byte_tasks
from tests.helpers.random_params import random_params

# Unicode quotes, a dash and a currency sign: "intl" splits them off, "13a" does not.
HYPOTHESES = ["„Das ist gut“, sagte er – 1.000€.", "Er läuft schnell!", "Guten Morgen ."]
REFERENCES = ["„Das ist sehr gut“, sagte er – 1.000 €.", "Er läuft sehr schnell!",
              "Guten Morgen ."]
# Stemming changes "runs"/"running"; " . " separates sentences for ROUGE-Lsum in T5's recipe.
# Sentences in swapped order score fully in ROUGE-Lsum only when split into lines.
SUMMARY_PREDICTIONS = ["the cat runs home . it sleeps", "dogs are running fast",
                       "a b c . x y z", "nothing in common"]
SUMMARY_TARGETS = ["the cat ran home . it is sleeping now", "the dog runs fast",
                   "x y z . a b c", "entirely different words"]


def test_t5_bleu_is_sacrebleu_with_t5s_arguments():
  by_hand = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES], smooth_method="exp",
                                  smooth_value=0.0, force=False, lowercase=False,
                                  tokenize="intl", use_effective_order=False).score
  assert metrics.t5_bleu(REFERENCES, HYPOTHESES) == {"bleu": pytest.approx(by_hand, abs=1e-9)}
  # The inputs are chosen so the tokeniser matters: the default mode's 13a differs.
  default = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score
  assert metrics.bleu(REFERENCES, HYPOTHESES) == {"bleu": pytest.approx(default, abs=1e-9)}
  assert abs(by_hand - default) > 5


def test_chrf_is_sacrebleu_corpus_chrf():
  by_hand = sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES]).score
  assert metrics.chrf(REFERENCES, HYPOTHESES) == {"chrf": pytest.approx(by_hand, abs=1e-9)}


def _t5_rouge_by_hand(targets, predictions, seed):
  """T5's `metrics.rouge` written out: no stemmer, " . " -> " .\\n", bootstrap "mid"."""
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"])
  aggregator = scoring.BootstrapAggregator()
  for t, p in zip(targets, predictions):
    aggregator.add_scores(scorer.score(target=t.replace(" . ", " .\n"),
                                       prediction=p.replace(" . ", " .\n")))
  np.random.seed(seed)
  result = aggregator.aggregate()
  return {k: 100 * result[k].mid.fmeasure for k in ("rouge1", "rouge2", "rougeLsum")}


def test_t5_rouge_is_rouge_score_with_t5s_recipe_and_a_fixed_seed():
  by_hand = _t5_rouge_by_hand(SUMMARY_TARGETS, SUMMARY_PREDICTIONS, metrics.T5_BOOTSTRAP_SEED)
  np.random.seed(123)
  before = np.random.get_state()[1].copy()
  got = metrics.t5_rouge(SUMMARY_TARGETS, SUMMARY_PREDICTIONS)
  assert np.array_equal(np.random.get_state()[1], before), "the global RNG was left changed"
  assert got == {k: pytest.approx(v, abs=1e-9) for k, v in by_hand.items()}
  assert all(type(v) is float for v in got.values())
  assert metrics.t5_rouge(SUMMARY_TARGETS, SUMMARY_PREDICTIONS) == got  # repeatable
  # The recipe matters on these inputs: the default mode (stemmer, mean) differs.
  default = metrics.rouge(SUMMARY_TARGETS, SUMMARY_PREDICTIONS)
  assert abs(default["rouge1"] - got["rouge1"]) > 1


def test_settings_name_the_tokeniser_and_the_rouge_recipe():
  assert "tok:intl" in metrics.settings(metrics.t5_bleu)["bleu"]
  assert "tok:13a" in metrics.settings(metrics.bleu)["bleu"]
  assert f"version:{sacrebleu.__version__}" in metrics.settings(metrics.bleu)["bleu"]
  assert metrics.settings(metrics.chrf)["chrf"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0")
  t5, default = metrics.settings(metrics.t5_rouge), metrics.settings(metrics.rouge)
  assert set(t5) == set(default) == {"rouge1", "rouge2", "rougeLsum"}
  assert "stemmer:no" in t5["rouge1"] and "bootstrap-mid" in t5["rouge1"]
  assert "stemmer:porter" in default["rouge1"] and "aggregate:mean" in default["rouge1"]
  assert metrics.settings(lambda targets, predictions: {}) == {}
  merged = metrics.signatures([metrics.t5_bleu, metrics.chrf, metrics.exact_match])
  assert set(merged) == {"bleu", "chrf", "exact_match"}
  with pytest.raises(ValueError, match="'bleu' is computed by two fns"):
    metrics.signatures([metrics.bleu, metrics.t5_bleu])


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="chrf: 2 targets but 1 predictions"):
    metrics.chrf(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="bleu: no examples"):
    metrics.t5_bleu([], [])
  with pytest.raises(ValueError, match="unknown metric mode 'T5'"):
    metrics.for_mode("T5")
  with pytest.raises(ValueError, match="unknown metric mode"):
    tasks.configure(tasks.DataSettings(metric_mode="t5x"))
  with pytest.raises(ValueError, match="file_task 'both'.*clash"):
    files.file_task("both", train="/nonexistent.tsv", metrics=["bleu", "t5_bleu"])


def test_metric_mode_selects_the_tasks_metric_fns():
  def fns(task):
    return list(seqio.get_mixture_or_task(task).metric_fns)

  try:
    tasks.configure(tasks.DataSettings(metric_mode="t5"))
    assert fns("cldr_translate_en_de") == [metrics.t5_bleu, metrics.chrf, metrics.exact_match]
    assert fns("wmt14_ende") == [metrics.t5_bleu, metrics.chrf]
    assert fns("xsum") == [metrics.t5_rouge]
    in_mixture = {t.name: t for t in seqio.get_mixture_or_task("builtin_mixture").tasks}
    assert list(in_mixture["docstring_summarization"].metric_fns) == [metrics.t5_rouge]
  finally:
    tasks.configure(tasks.DataSettings())
  assert fns("cldr_translate_en_de") == [metrics.bleu, metrics.chrf, metrics.exact_match]
  assert fns("cnn_dailymail") == [metrics.rouge]


@pytest.mark.slow  # decodes with a tiny model (a compile)
def test_eval_results_record_the_metric_settings(tmp_path):
  cfg = presets.preset("tiny")
  task = byte_tasks.byte_task("bytes_for_metric_settings")
  try:
    results = evaluation.evaluate(random_params(cfg), cfg, task, "validation",
                                  {"inputs": 8, "targets": 4}, max_new_tokens=4, batch_size=2,
                                  model_dir=str(tmp_path), step=7)
  finally:
    seqio.TaskRegistry.remove(task)
  assert set(results[task]) == {"bleu", "chrf"}
  (record,) = [json.loads(line) for line in open(tmp_path / "eval_results.jsonl")]
  assert record["step"] == 7 and record["task"] == task
  assert record["metric_settings"] == metrics.signatures([metrics.t5_bleu, metrics.chrf])
  assert "tok:intl" in record["metric_settings"]["bleu"]
  texts = {}
  for path in glob.glob(str(tmp_path / "eval" / task / "events.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag.startswith("eval/metric_settings/"):
          texts[value.tag] = tf.make_ndarray(value.tensor).item().decode()
  assert texts == {"eval/metric_settings/bleu": record["metric_settings"]["bleu"],
                   "eval/metric_settings/chrf": record["metric_settings"]["chrf"]}
