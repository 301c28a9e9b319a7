"""`t5gemma infer` / `t5gemma eval` on a briefly trained run, and the metric fns."""

import json

import pytest

from t5gemma_jax import metrics
from t5gemma_jax.cli import app
from tests.helpers.recipes import QUICK_TRAIN as QUICK

pytestmark = pytest.mark.slow  # subprocess runs or long trainings: `make test` only


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  import gin
  d = tmp_path_factory.mktemp("run")
  gin.clear_config()
  assert app.main(["train", *QUICK, f'--gin.MODEL_DIR="{d}"', "--gin.TRAIN_STEPS=4"]) == 0
  return d


def test_infer_writes_predictions_for_a_task_and_a_file(clean_gin, run_dir, tmp_path, capsys):
  out = tmp_path / "pred.jsonl"
  common = ["infer", "--gin_file=runs/infer.gin", "--gin_file=models/tiny.gin",
            f'--gin.MODEL_DIR="{run_dir}"', f'--gin.INFER_OUTPUT="{out}"',
            "--gin.DecodeConfig.max_new_tokens=8"]
  assert app.main([*common, "--gin.InferConfig.max_examples=5"]) == 0
  records = [json.loads(line) for line in open(out)]
  assert len(records) == 5 and all({"input", "prediction", "target"} <= set(r) for r in records)
  assert records[0]["input"].startswith("translate English to German: ")
  inputs = tmp_path / "in.txt"
  inputs.write_text("translate English to German: Germany\nsummarize: a long text here\n")
  assert app.main([*common, "--gin.InferConfig.task=None",
                    f'--gin.InferConfig.input_file="{inputs}"',
                    '--gin.DecodeConfig.strategy="beam"']) == 0
  records = [json.loads(line) for line in open(out)]
  assert [r["input"] for r in records] == inputs.read_text().splitlines()
  assert "target" not in records[0]


def test_eval_appends_metrics(clean_gin, run_dir, capsys):
  argv = ["eval", "--gin_file=runs/eval.gin", "--gin_file=models/tiny.gin",
          f'--gin.MODEL_DIR="{run_dir}"', '--gin.EVAL_TASK="docstring_summarization"',
          "--gin.EvalConfig.num_examples=8", "--gin.DecodeConfig.max_new_tokens=8",
          '--gin.DecodeConfig.strategy="greedy"']
  assert app.main(argv) == 0
  assert "docstring_summarization: rouge1" in capsys.readouterr().out
  rows = [json.loads(line) for line in open(run_dir / "eval_results.jsonl")]
  assert rows[-1]["task"] == "docstring_summarization" and rows[-1]["step"] == 4
  assert rows[-1]["examples"] == 8  # how many were decoded and scored
  assert {"rouge1", "rouge2", "rougeLsum"} <= set(rows[-1])


def test_infer_missing_input_file_is_named(clean_gin, run_dir, tmp_path, capsys):
  argv = ["infer", "--gin_file=runs/infer.gin", "--gin_file=models/tiny.gin",
          f'--gin.MODEL_DIR="{run_dir}"', "--gin.InferConfig.task=None",
          f'--gin.InferConfig.input_file="{tmp_path}/nope.txt"']
  assert app.main(argv) == 2
  assert "nope.txt" in capsys.readouterr().err


def test_metric_fns():
  assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] > 99.9
  assert metrics.bleu(["the cat sat on the mat"], ["a dog ran"])["bleu"] < 1.0
  same = metrics.rouge(["One sentence. Two sentences."], ["One sentence. Two sentences."])
  assert all(v > 99.9 for v in same.values())
  half = metrics.rouge(["a b c d"], ["a b x y"])
  assert 40 < half["rouge1"] < 60
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    metrics.bleu(["a", "b"], ["a"])
  assert metrics.exact_match(["Berlin", "Rom"], [" Berlin", "Roma"]) == {"exact_match": 50.0}
