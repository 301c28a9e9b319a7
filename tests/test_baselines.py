"""Trivial baselines: scored exactly as sacreBLEU / rouge_score score them by hand."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from t5gemma_jax import baselines, metrics
from t5gemma_jax.data.corpora import Pair

PAIRS = [Pair("territory:DE", "Germany", "Deutschland"),
         Pair("locale:de_AT", "German (Austria)", "Deutsch (Österreich)"),
         Pair("unit:length-kilometer#long:5", "5 kilometers", "5 Kilometer"),
         Pair("locale:ken_CM", "Kenyang (Cameroon)", "Kenyang (Kamerun)")]


def test_copy_baseline_equals_sacrebleu_by_hand():
  predictions = baselines.copy_source(PAIRS)
  assert predictions == [p.source for p in PAIRS]
  got = baselines.score_pairs(PAIRS, predictions, [metrics.bleu, metrics.chrf])
  references = [[p.target for p in PAIRS]]
  bleu = sacrebleu.BLEU(tokenize="13a", smooth_method="exp")
  chrf = sacrebleu.CHRF()
  assert got["bleu"] == pytest.approx(bleu.corpus_score(predictions, references).score)
  assert got["chrf"] == pytest.approx(chrf.corpus_score(predictions, references).score)
  assert 0 < got["chrf"] < 100
  assert metrics.settings(metrics.bleu)["bleu"] == bleu.get_signature().format()
  assert metrics.settings(metrics.chrf)["chrf"] == chrf.get_signature().format()


def test_first_sentence_baseline_equals_rouge_score_by_hand():
  pairs = [Pair("a", "Reads the file. Then parses it and returns rows. Errors raise.",
                "Reads and parses a file."),
           Pair("b", "No end punctuation here at all", "Nothing to see.")]
  predictions = baselines.lead_sentence(pairs)
  assert predictions == ["Reads the file.", "No end punctuation here at all"]
  got = baselines.score_pairs(pairs, predictions, [metrics.rouge])
  scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
  expected = sum(scorer.score(p.target, q)["rouge1"].fmeasure
                 for p, q in zip(pairs, predictions)) / len(pairs)
  assert got["rouge1"] == pytest.approx(100 * expected)
  assert set(got) == {"rouge1", "rouge2", "rougeLsum"}


def test_score_pairs_errors():
  with pytest.raises(ValueError, match="no pairs"):
    baselines.score_pairs([], [], [metrics.bleu])
  with pytest.raises(ValueError, match="1 predictions"):
    baselines.score_pairs(PAIRS, ["x"], [metrics.bleu])


def test_real_copy_baseline_en_de(capsys):
  got = baselines.score("cldr_translate_en_de")
  assert got["examples"] >= 500
  assert 0 < got["chrf"] < 100 and 0 < got["bleu"] < 100
  assert got["exact_match"] == 0  # untranslated names are not in the corpus
  assert baselines.signatures("cldr_translate_en_de")["bleu"].startswith("nrefs:1|")
  assert baselines.score("cldr_translate_en_de", mode="t5").keys() == got.keys()
  assert baselines.main(["--task=cldr_translate_en_de"]) == 0
  out = capsys.readouterr().out
  assert "| cldr_translate_en_de | copy source |" in out and f"{got['chrf']:.2f}" in out
  assert "chrf: nrefs:1|" in out


def test_supervised_tasks_match_the_registered_ones():
  import seqio
  from t5gemma_jax import tasks  # noqa: F401  (registers the built-in tasks)
  names = baselines.supervised_tasks()
  assert set(names) >= {"cldr_translate_en_ru", "cldr_translate_en_de",
                        "docstring_summarization"}
  for name in names:
    assert seqio.get_mixture_or_task(name).metric_fns
  with pytest.raises(ValueError, match="docstring_summarization"):
    baselines.score("wmt14_ende")


def test_train_summary_prints_the_baseline_and_settings_on_the_same_examples():
  import seqio
  from t5gemma_jax.cli import run_commands
  from tests.helpers import byte_tasks
  summary = {"start": "initialised", "first_step": 0, "last_step": 5, "checkpoints": "c",
             "metrics": "m", "tensorboard": "t", "eval_split": "validation", "eval_examples": 50,
             "metrics_by_task": {"cldr_translate_en_de": {"bleu": 1.0, "chrf": 2.0},
                                 "my_task": {"bleu": 3.0}}}
  byte_tasks.byte_task("my_task")
  try:
    text = run_commands.summary_text(summary)
  finally:
    seqio.TaskRegistry.remove("my_task")
  # Every number says how it was computed: the sacreBLEU signatures, 13a vs T5's intl.
  lines = text.splitlines()
  at = lines.index("cldr_translate_en_de: bleu 1.00, chrf 2.00")
  assert lines[at + 1] == f"  bleu: {metrics.signatures([metrics.bleu])['bleu']}"
  assert lines[at + 2].startswith("  chrf: nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no")
  assert "  bleu: nrefs:1|case:mixed|eff:no|tok:intl" in text  # my_task: T5's BLEU
  want = baselines.score("cldr_translate_en_de", num_examples=50)
  assert want["examples"] == 50
  assert (f"  baseline (copy source, the same 50 examples): bleu {want['bleu']:.2f}, "
          f"chrf {want['chrf']:.2f}") in text
  assert text.count("baseline") == 1  # nothing for a task without a built-in baseline
