"""Vocabulary, file tasks, TFDS tasks on mock data, sharding, determinism, resumable iterators."""

import os

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from t5gemma_jax import tasks  # noqa: F401  (registers the built-in tasks)
from t5gemma_jax.data import pipeline, vocab
from t5gemma_jax.tasks import files, named_vocabularies

LENGTHS = {"inputs": 48, "targets": 24}


@pytest.fixture(scope="module")
def tsv_task(tmp_path_factory):
  """A supervised TSV task of 40 numbered pairs in two files, with the built-in vocabulary."""
  d = tmp_path_factory.mktemp("tsv")
  for part in range(2):
    rows = [f"source sentence number {i}\ttarget {i}" for i in range(part * 20, part * 20 + 20)]
    (d / f"train-{part}.tsv").write_text("\n".join(rows) + "\n")
  (d / "dev.tsv").write_text("a\tb\n")
  name = "test_tsv_pairs"
  if name not in seqio.TaskRegistry.names():
    files.file_task(name, train=str(d / "train-*.tsv"), validation=str(d / "dev.tsv"),
                    prefix="copy: ", metrics=["bleu"])
  return name


def _targets(ds):
  out = []
  for batch in ds.as_numpy_iterator():
    segments = batch.get("decoder_segment_ids", (batch["decoder_target_tokens"] > 0).astype(int))
    for row, seg in zip(batch["decoder_target_tokens"], segments):
      for s in np.unique(seg[seg > 0]):
        out.append(tuple(row[seg == s]))
  return out


def test_builtin_vocabulary_special_tokens():
  v = named_vocabularies.BUILTIN
  special = vocab.special_tokens(v)
  assert v.vocab_size == 2048 and v.extra_ids == 128
  assert special.sentinel_ids[:3] == (2047, 2046, 2045)
  assert set(special.mode_ids) == {"[NLU]", "[NLG]", "[S2S]"}
  for mode, i in special.mode_ids.items():
    assert v.tokenizer.id_to_piece(i) == mode and i in v.encode(f"x {mode} y")
  assert "<extra_id_0>" in v.decode([special.sentinel_ids[0]])
  assert v.tokenizer.pad_id() == 0 and v.eos_id == 1 and v.tokenizer.bos_id() == 2
  text = "Return the JSON representation of an object."
  assert v.decode(v.encode(text)) == text


def test_trained_vocabulary_is_a_pure_function_of_the_corpus(tmp_path):
  texts = [f"line {i} of a small corpus about parsing JSON and XML" for i in range(300)]
  a = vocab.train_sentencepiece(texts, 300, cache_dir=str(tmp_path / "a"))
  b = vocab.train_sentencepiece(texts, 300, cache_dir=str(tmp_path / "b"))
  assert os.path.basename(a) == os.path.basename(b)
  assert open(a, "rb").read() == open(b, "rb").read()
  c = vocab.train_sentencepiece(texts[:-1], 300, cache_dir=str(tmp_path / "a"))
  assert c != a


def test_gemma_vocabulary_errors_name_the_cause(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.model"):
    vocab.gemma_vocabulary(str(tmp_path / "nope.model"))
  with pytest.raises(ValueError, match="piece"):
    vocab.special_tokens(named_vocabularies.BUILTIN, sentinel_pieces=["<not a piece>"])


@pytest.mark.slow
def test_packed_batches_have_the_model_features(tsv_task):
  cfg = pipeline.DataConfig(tsv_task, LENGTHS, global_batch_size=4, num_epochs=1, shuffle=False)
  batch = next(pipeline.GlobalBatches(pipeline.host_dataset(cfg)))
  assert set(batch) == set(pipeline.MODEL_FEATURES)
  assert batch["encoder_input_tokens"].shape == (4, 48)
  assert batch["decoder_input_tokens"].shape == (4, 24)
  row, seg = batch["decoder_input_tokens"][0], batch["decoder_segment_ids"][0]
  starts = np.flatnonzero((seg > 0) & (np.diff(np.concatenate([[0], seg])) != 0))
  assert len(starts) > 1, "rows should pack several short examples"
  assert (row[starts] == vocab.BOS_ID).all()  # every packed target starts with BOS
  # decoder inputs are the targets shifted right within each segment
  tgt = batch["decoder_target_tokens"][0]
  for s in starts:
    n = int((seg == seg[s]).sum())
    np.testing.assert_array_equal(row[s + 1:s + n], tgt[s:s + n - 1])


def test_packing_neither_cuts_nor_mixes_examples(tsv_task):
  lengths = LENGTHS
  unpacked = pipeline.DataConfig(tsv_task, lengths, 4, num_epochs=1, shuffle=False, pack=False)
  packed = unpacked.__class__(**{**unpacked.__dict__, "pack": True})
  a = sorted(_targets(pipeline.host_dataset(unpacked)))
  b = sorted(_targets(pipeline.host_dataset(packed)))
  assert len(a) == 40 and a == b
  v = named_vocabularies.BUILTIN
  assert sorted(v.decode([t for t in x if t != 1]) for x in a) == sorted(
      f"target {i}" for i in range(40))


def test_two_shards_are_disjoint_and_cover_the_split(tsv_task):
  cfg = pipeline.DataConfig(tsv_task, LENGTHS, 4, num_epochs=1, shuffle=False, pack=False)
  shards = [set(_targets(pipeline.host_dataset(cfg, i, 2))) for i in range(2)]
  everything = set(_targets(pipeline.host_dataset(cfg, 0, 1)))
  assert shards[0] and shards[1] and not shards[0] & shards[1]
  assert shards[0] | shards[1] == everything


@pytest.mark.slow
def test_same_seed_same_batches(tsv_task):
  def first(seed):
    cfg = pipeline.DataConfig(tsv_task, LENGTHS, 4, seed=seed)
    it = pipeline.GlobalBatches(pipeline.host_dataset(cfg))
    return [next(it)["decoder_target_tokens"] for _ in range(3)]
  a, b, c = first(1), first(1), first(2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, z) for x, z in zip(a, c))


@pytest.mark.slow
def test_iterator_position_survives_save_and_restore(tsv_task, tmp_path):
  cfg = pipeline.DataConfig(tsv_task, LENGTHS, 4, seed=3)
  it = pipeline.GlobalBatches(pipeline.host_dataset(cfg))
  for _ in range(3):
    next(it)
  it.save(str(tmp_path / "data" / "iter"))
  expected = [next(it)["encoder_input_tokens"] for _ in range(4)]
  resumed = pipeline.GlobalBatches(pipeline.host_dataset(cfg))
  resumed.restore(str(tmp_path / "data" / "iter"))
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["encoder_input_tokens"], want)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    resumed.restore(str(tmp_path / "nowhere" / "iter"))


def test_unknown_task_lists_nearest_names():
  with pytest.raises(ValueError, match="did you mean.*wmt14_ende"):
    pipeline.get_mixture_or_task("wmt14_end")


def test_missing_data_files_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing-.*tsv"):
    files.file_task("test_missing_files", train=str(tmp_path / "missing-*.tsv"))


@pytest.mark.slow
def test_tfds_tasks_on_mock_data():
  path = named_vocabularies.BUILTIN.sentencepiece_model_file  # any Gemma-id SentencePiece model
  vocab.set_gemma_tokenizer(path)
  with tfds.testing.mock_data(num_examples=6):
    for name in ("wmt14_ende", "wmt16_enro", "cnn_dailymail", "xsum"):
      cfg = pipeline.DataConfig(name, {"inputs": 64, "targets": 32}, 2, num_epochs=1)
      batch = next(pipeline.GlobalBatches(pipeline.host_dataset(cfg)))
      assert batch["encoder_input_tokens"].shape == (2, 64)
      assert (batch["decoder_loss_weights"].sum(axis=1) > 0).all()
    ex = next(seqio.get_mixture_or_task("wmt14_ende").get_dataset(
        {"inputs": 64, "targets": 32}, shuffle=False).as_numpy_iterator())
    assert ex["inputs_pretokenized"].startswith(b"translate English to German: ")


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path, monkeypatch):
  from t5gemma_jax.tasks.sources import PreparedTfdsSource
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  source = PreparedTfdsSource("wmt14_translate/de-en:1.0.0")
  source.tfds_dataset._data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="not prepared under.*tfds build"):
    source.get_dataset("train")
