"""Built-in offline tasks, file tasks with every format, and `t5gemma show_task`."""

import json
import re

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5gemma_jax import tasks  # noqa: F401  (registers the built-in tasks)
from t5gemma_jax.cli import app
from t5gemma_jax.data import pipeline, vocab
from t5gemma_jax.tasks import files, named_vocabularies

LENGTHS = {"inputs": 128, "targets": 64}


def _first(task, n=4, split="train"):
  ds = seqio.get_mixture_or_task(task).get_dataset(LENGTHS, split=split, shuffle=True, seed=0)
  v = named_vocabularies.BUILTIN
  return [(v.decode([int(i) for i in ex["inputs"]]), v.decode([int(i) for i in ex["targets"]]))
          for ex in ds.take(n).as_numpy_iterator()]


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "validation"])
def test_builtin_supervised_tasks_hold_real_text(split):
  for inp, tgt in _first("cldr_translate_en_ru", split=split):
    assert inp.startswith("translate English to Russian: ") and re.search("[а-яА-Я]", tgt)
  for inp, tgt in _first("cldr_translate_en_de", split=split):
    assert inp.startswith("translate English to German: ") and len(tgt) > 1
  for inp, tgt in _first("docstring_summarization", split=split):
    assert inp.startswith("summarize: ") and len(inp.split()) > 10
    assert "\n" not in tgt and len(tgt.split()) >= 3


@pytest.mark.slow
def test_builtin_pretraining_tasks_use_sentinels_and_mode_tokens():
  special = vocab.special_tokens(named_vocabularies.BUILTIN)
  ds = seqio.get_mixture_or_task("python_text_ul2").get_dataset(LENGTHS, shuffle=True, seed=0)
  modes = set()
  for ex in ds.take(60).as_numpy_iterator():
    modes.add(int(ex["inputs"][0]))
    assert len(ex["inputs"]) <= 128 and len(ex["targets"]) <= 64
  assert modes == set(special.mode_ids.values())
  for inp, tgt in _first("python_text_span_corruption"):
    assert "<extra_id_0>" in inp and tgt.startswith("<extra_id_0>")
    assert len(re.findall(r"[A-Za-z]{3,}", inp)) > 10  # real words, not random ids


@pytest.mark.slow
def test_builtin_mixture_feeds_packed_batches():
  cfg = pipeline.DataConfig("builtin_mixture", LENGTHS, global_batch_size=4, seed=0)
  it = pipeline.GlobalBatches(pipeline.host_dataset(cfg))
  batches = [next(it) for _ in range(3)]
  for b in batches:
    assert b["encoder_input_tokens"].shape == (4, 128)
    assert (b["decoder_loss_weights"].sum(axis=1) > 0).all()
  fill = np.mean([(b["encoder_segment_ids"] > 0).mean() for b in batches])
  assert fill > 0.5, f"packing fills only {fill:.0%} of the encoder rows"


@pytest.mark.slow
def test_file_tasks_in_every_format(tmp_path):
  rows = [{"src": f"the number {i}", "tgt": f"die Zahl {i}"} for i in range(12)]
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  with tf.io.TFRecordWriter(str(tmp_path / "d.tfrecord")) as w:
    for r in rows:
      feats = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode()]))
               for k, v in r.items()}
      w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
  (tmp_path / "d.txt").write_text("\n".join(
      "Python is a programming language that lets you work quickly. " * 3 for _ in range(30)))
  for fmt in ("jsonl", "tfrecord"):
    name = files.file_task(f"test_files_{fmt}", train=str(tmp_path / f"d.{fmt}"), format=fmt,
                           input_key="src", target_key="tgt", prefix="translate: ")
    got = sorted(_first(name, n=12))
    assert got == sorted((f"translate: the number {i}", f"die Zahl {i}") for i in range(12))
  name = files.file_task("test_files_text", train=str(tmp_path / "d.txt"), format="text",
                         objective="span_corruption")
  inp, tgt = _first(name, n=1)[0]
  assert "<extra_id_0>" in inp and "Python" in inp + tgt


def test_file_task_errors_name_the_cause(tmp_path):
  (tmp_path / "a.tsv").write_text("x\ty\n")
  with pytest.raises(ValueError, match="format 'csv'"):
    files.file_task("test_bad_format", train=str(tmp_path / "a.tsv"), format="csv")
  with pytest.raises(ValueError, match="unknown objective 'mlm'"):
    files.file_task("test_bad_objective", train=str(tmp_path / "a.tsv"), objective="mlm")
  with pytest.raises(ValueError, match="already registered"):
    files.file_task("wmt14_ende", train=str(tmp_path / "a.tsv"))


@pytest.mark.slow
def test_show_task_prints_examples_and_statistics(clean_gin, capsys):
  assert app.main(["show_task", "--task=python_text_ul2", "--n=3", "--inputs_length=128",
                    "--targets_length=64", "--stats_examples=60"]) == 0
  out = capsys.readouterr().out
  assert out.count("--- example") == 3 and "<extra_id_0>" in out
  assert re.search(r"\[(NLU|NLG|S2S)\]", out)
  assert re.search(r"noise density 0\.\d+", out) and "non-padding" in out


def test_show_task_unknown_name_suggests(clean_gin, capsys):
  assert app.main(["show_task", "--task=python_text_ul"]) == 2
  assert "did you mean python_text_ul2" in capsys.readouterr().err


@pytest.mark.slow
def test_user_tasks_from_gin(clean_gin, tmp_path, capsys):
  (tmp_path / "t.tsv").write_text("hello there\tbonjour\n" * 5)
  gin_file = tmp_path / "tasks.gin"
  gin_file.write_text("\n".join([
      "data_settings.user_tasks = [@mine/file_task()]",
      "mine/file_task.name = 'test_gin_file_task'",
      f"mine/file_task.train = '{tmp_path / 't.tsv'}'",
  ]))
  assert app.main(["show_task", f"--gin_file={gin_file}", "--task=test_gin_file_task",
                    "--n=1", "--stats_examples=4"]) == 0
  assert "bonjour" in capsys.readouterr().out
