"""Run-directory files on a non-local file system: TensorFlow's ram:// stands in for gs://."""

import json
import os

import jax

from t5gemma_jax import atomic, config, run_files, storage
from t5gemma_jax.train.metrics_writer import MetricsWriter


def test_atomic_writes_and_append_logs_work_on_a_remote_path():
  root = "ram://t5gemma_storage_test/run"
  assert storage.is_remote(root) and not storage.is_remote("/tmp/run")
  atomic.write_text(f"{root}/a/config.gin", "x = 1\n")
  assert storage.read_text(f"{root}/a/config.gin") == "x = 1\n"
  assert storage.isfile(f"{root}/a/config.gin") and not storage.isfile(f"{root}/a")
  with storage.AppendLog(f"{root}/log.jsonl") as log:
    log.write("1\n")
    log.write("2\n")
  with storage.AppendLog(f"{root}/log.jsonl") as log:  # a resumed run continues the file
    log.write("3\n")
  assert storage.read_text(f"{root}/log.jsonl") == "1\n2\n3\n"


def test_run_files_and_metrics_on_a_remote_model_dir(tmp_path):
  root = "ram://t5gemma_storage_test/model_dir"
  cfg = config.preset("tiny", scan_layers=True)
  run_files.write_model_files(cfg, root)
  assert run_files.read_model_config(root) == cfg
  writer = MetricsWriter(root)
  writer.write(1, {"loss": 2.5})
  writer.write(2, {"loss": 2.0, "mfu": None})
  writer.close()
  if jax.process_index() == 0:
    records = [json.loads(x) for x in storage.read_text(f"{root}/metrics.jsonl").splitlines()]
    assert [r["loss"] for r in records] == [2.5, 2.0]
  # A SentencePiece vocabulary kept in the run directory reads back from there.
  import seqio
  import sentencepiece as spm
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n".join(f"sentence number {i} of a tiny corpus" for i in range(200)))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"),
                                 vocab_size=40, minloglevel=2)
  vocab = seqio.SentencePieceVocabulary(str(tmp_path / "m.model"), extra_ids=3)
  assert run_files.write_vocabulary(vocab, root)
  again = run_files.read_vocabulary(root)
  assert again.extra_ids == 3 and again.encode("sentence number 7") == vocab.encode(
      "sentence number 7")
  assert not os.path.exists("ram:")  # nothing fell through to the local file system
