"""Trivial baselines on the built-in supervised tasks, scored like a model's predictions.

A trained model means something only beside what no training at all achieves:

- translation (`cldr_translate_*`): copy the English source as the "translation". CLDR names
  share much with their translations (numbers, "Kenyang (Cameroon)" -> "Kenyang (Kamerun)",
  "km"), so copying scores well above zero on chrF, and a model that does not beat it has not
  learnt to translate.
- summarisation (`docstring_summarization`): the body's first sentence as the summary (the
  "lead" baseline of news summarisation).

Predictions are built from the raw corpus pairs (`corpora.load`), not from tokenized text, and
scored with the metric fns the task itself is evaluated with (`metrics.for_mode(mode)`: the same
sacreBLEU / rouge_score settings), so the numbers stand in one table with eval results.
Run `python -m t5gemma_jax.baselines` for the table of every built-in supervised task.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, Iterable, Optional, Sequence

from t5gemma_jax import metrics
from t5gemma_jax.data import corpora

SUMMARIZATION_TASKS = {"docstring_summarization": "docstring_summaries"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")  # the split metrics.rouge uses for ROUGE-Lsum


def translation_tasks() -> dict[str, str]:
  """{task name: corpus name} of the built-in translation tasks, read from `tasks.builtin`.

  Imported on demand: `tasks.builtin` brings seqio and TensorFlow, which scoring a list of
  pairs does not need.
  """
  from t5gemma_jax.tasks import builtin  # pylint: disable=import-outside-toplevel
  return {task: corpus for task, (corpus, _) in builtin.TRANSLATION.items()}


def supervised_tasks() -> dict[str, str]:
  """{task name: corpus name} of every built-in task that has metrics."""
  return {**translation_tasks(), **SUMMARIZATION_TASKS}


# ----------------------------------------------------------------------------- predictions


def copy_source(pairs: Iterable[corpora.Pair]) -> list[str]:
  """The "copy the input" predictions: each pair's English source, unchanged."""
  return [p.source for p in pairs]


def first_sentence(text: str) -> str:
  """`text` up to the first ".", "!" or "?" followed by whitespace (all of it if none)."""
  return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def lead_sentence(pairs: Iterable[corpora.Pair]) -> list[str]:
  """The "first sentence of the body" predictions for summary pairs."""
  return [first_sentence(p.source) for p in pairs]


# --------------------------------------------------------------------------------- scoring


def _fns(suite: metrics.MetricSuite, summarization: bool) -> list[Callable]:
  # The fns tasks.builtin.register_supervised gives each kind of task.
  return [suite.rouge] if summarization else [suite.bleu, suite.chrf, suite.exact_match]


def score_pairs(pairs: Sequence[corpora.Pair], predictions: Sequence[str],
                fns: Iterable[Callable]) -> dict[str, float]:
  """Scores `predictions` against the pairs' targets with seqio-style metric fns.

  Args:
    pairs: N corpus pairs; their `target`s are the references (one per example).
    predictions: N strings, one per pair.
    fns: metric fns `fn(targets, predictions) -> {name: float}` (e.g. `metrics.bleu`).

  Returns:
    The fns' outputs merged, {metric name: score} (0..100 for this project's metrics).

  Raises:
    ValueError: no pairs, or `predictions` of another length.
  """
  if not pairs:
    raise ValueError("no pairs to score")
  targets = [p.target for p in pairs]
  out: dict[str, float] = {}
  for fn in fns:
    out.update(fn(targets, list(predictions)))
  return out


def _resolve(task_name: str) -> tuple[str, bool]:
  """(corpus, is summarisation) of a built-in supervised task."""
  if task_name in SUMMARIZATION_TASKS:
    return SUMMARIZATION_TASKS[task_name], True
  translation = translation_tasks()
  if task_name not in translation:
    raise ValueError(f"no baseline for task {task_name!r}; built-in supervised tasks: "
                     f"{', '.join(sorted({**translation, **SUMMARIZATION_TASKS}))}")
  return translation[task_name], False


def score(task_name: str, split: str = "validation", mode: str = "default",
          num_examples: Optional[int] = None) -> dict[str, float]:
  """The trivial baseline of a built-in task, scored with the task's own metric fns.

  Args:
    task_name: a built-in supervised task, e.g. "cldr_translate_en_de" (copy the source) or
      "docstring_summarization" (first sentence of the body).
    split: "train" or "validation".
    mode: metric mode, as in `metrics.for_mode` ("default" or "t5").
    num_examples: score only the split's first n pairs (the ones an evaluation with
      `num_examples=n` decodes: seqio reads the split unshuffled, in corpus order).

  Returns:
    {metric name: score on 0..100} - "bleu", "chrf", "exact_match" for translation,
    "rouge1", "rouge2", "rougeLsum" for summarisation - plus "examples": the number of pairs
    scored.

  Raises:
    ValueError: an unknown task, split or mode.
  """
  corpus, summarization = _resolve(task_name)
  suite = metrics.for_mode(mode)
  pairs = corpora.load(corpus, split)[:num_examples]
  predictions = lead_sentence(pairs) if summarization else copy_source(pairs)
  out = score_pairs(pairs, predictions, _fns(suite, summarization))
  out["examples"] = float(len(pairs))
  return out


def signatures(task_name: str, mode: str = "default") -> dict[str, str]:
  """{metric name: settings string} behind `score`'s numbers (sacreBLEU signatures for BLEU
  and chrF, rouge_score options for ROUGE), to print beside them."""
  _, summarization = _resolve(task_name)
  return metrics.signatures(_fns(metrics.for_mode(mode), summarization))


def baseline_name(task_name: str) -> str:
  """"first sentence" for the summarisation task, "copy source" for translation ones."""
  return "first sentence" if task_name in SUMMARIZATION_TASKS else "copy source"


def table(tasks: Optional[Iterable[str]] = None, split: str = "validation",
          mode: str = "default") -> str:
  """A Markdown table of the baselines of `tasks`, with the metric settings under it.

  Args:
    tasks: task names; default: every built-in supervised task (`supervised_tasks()`).
    split: as in `score`.
    mode: as in `score`.

  Returns:
    One row per task (task, baseline, examples, one column per metric; "-" where a metric
    does not apply), then one "settings" line per metric.
  """
  tasks = list(supervised_tasks() if tasks is None else tasks)
  scores = {task: score(task, split, mode) for task in tasks}
  names = [n for n in ("bleu", "chrf", "exact_match", "rouge1", "rouge2", "rougeLsum")
           if any(n in s for s in scores.values())]
  names += sorted({n for s in scores.values() for n in s} - set(names) - {"examples"})
  header = ["task", "baseline", f"{split} examples", *names]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  for task, values in scores.items():
    cells = [task, baseline_name(task), str(int(values["examples"]))]
    cells += [f"{values[n]:.2f}" if n in values else "-" for n in names]
    lines.append("| " + " | ".join(cells) + " |")
  settings: dict[str, str] = {}
  for task in tasks:
    settings.update(signatures(task, mode))
  lines.append("")
  lines += [f"{name}: {text}" for name, text in sorted(settings.items())]
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m t5gemma_jax.baselines [--split=validation] [--mode=default] [--task=...]`."""
  parser = argparse.ArgumentParser(prog="python -m t5gemma_jax.baselines",
                                   description=__doc__.split("\n", 1)[0])
  parser.add_argument("--split", default="validation", choices=corpora.SPLITS)
  parser.add_argument("--mode", default="default", choices=sorted(metrics.MODES))
  parser.add_argument("--task", action="append", dest="tasks",
                      help="a built-in supervised task (repeatable); default: all of them")
  args = parser.parse_args(argv)
  print(table(args.tasks, args.split, args.mode))
  return 0


if __name__ == "__main__":
  sys.exit(main())
