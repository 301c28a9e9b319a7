"""Run-directory files on object stores, append logs, atomic writes, and scoped read hooks.

Two stand-ins for a bucket, neither needing a network: `memory://`, served by epath's fsspec
backend (the one used for gs:// without TensorFlow) over fsspec's in-memory file system, and a
local folder under `storage.simulate_object_store`, where the object-store code paths run and
TensorBoard can write too.
"""

import json
import logging
import os
import sys
import threading
import time
import uuid

import fsspec
import jax
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath, register

from t5gemma_jax import atomic, damaged_checkpoints, presets, run_files, storage
from t5gemma_jax.train.metrics_writer import MetricsWriter


class _MemoryBackend(epath_backend._FileSystemSpecBackend):
  def fs(self, path):
    return fsspec.filesystem("memory")


@pytest.fixture
def memory_root(monkeypatch):
  """A fresh memory://... folder: epath learns the scheme for the test's duration."""
  monkeypatch.setattr(gpath, "_URI_PREFIXES", gpath._URI_PREFIXES + ("memory://",))
  monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"memory"})
  monkeypatch.setitem(gpath._URI_MAP_ROOT, "memory://", "/memory/")
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "memory", _MemoryBackend())
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "memory://", gpath.PosixGPath)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # fsspec, not tf.io.gfile
  root = f"memory://t5gemma-{uuid.uuid4().hex[:8]}/run"
  yield root
  fsspec.filesystem("memory").rm(root.replace("memory://", "/"), recursive=True)


@pytest.fixture
def store(tmp_path):
  """A local folder taking the object-store code paths."""
  with storage.simulate_object_store(str(tmp_path)):
    yield tmp_path


def _parts(log_path):
  return [os.path.basename(p) for p in storage.log_parts(log_path)]


# ------------------------------------------------------------------ paths


def test_files_and_append_logs_on_a_uri(memory_root, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # where a URI mistaken for a local path would land
  root = memory_root
  assert storage.is_remote(root) and not storage.is_remote("/tmp/run")
  atomic.write_text(f"{root}/a/config.gin", "x = 1\n")
  assert storage.read_text(f"{root}/a/config.gin") == "x = 1\n"
  assert storage.isfile(f"{root}/a/config.gin") and not storage.isfile(f"{root}/a")
  assert storage.read_text_if_exists(f"{root}/missing") is None
  with pytest.raises(FileNotFoundError):
    storage.read_text(f"{root}/missing")
  log = f"{root}/log.jsonl"
  with storage.AppendLog(log) as f:
    f.write("1\n")
    f.write("2\n")
  with storage.AppendLog(log) as f:  # a resumed run continues the log
    f.write("3\n")
  assert storage.read_text(log) == "1\n2\n3\n" and storage.read_lines(log) == ["1", "2", "3"]
  assert [p.split("-")[1] for p in _parts(log)] == ["000001", "000002", "000003"]
  assert os.listdir(tmp_path) == []  # nothing fell through to the local file system


def test_a_scheme_without_backend_is_refused():
  with pytest.raises(ValueError, match="unsupported scheme"):
    storage.read_text("ram://bucket/x")


def test_run_files_and_metrics_in_a_simulated_bucket(store, tmp_path):
  root = str(store / "model_dir")
  cfg = presets.preset("tiny2")
  run_files.write_model_files(cfg, root)
  assert run_files.read_model_config(root) == cfg
  writer = MetricsWriter(root)
  writer.write(1, {"loss": 2.5})
  writer.write(2, {"loss": 2.0, "mfu": None})
  writer.close()
  if jax.process_index() == 0:
    path = os.path.join(root, "metrics.jsonl")
    assert not os.path.exists(path) and _parts(path)  # written as parts, as in a bucket
    assert [r["loss"] for r in storage.read_records(path)] == [2.5, 2.0]
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


# ------------------------------------------------------------------ append logs


def test_remote_appends_upload_each_line_once(store, monkeypatch):
  # The old log rewrote the whole object at each write: n(n+1)/2 lines uploaded for n writes.
  uploaded = []
  real = storage.replace_object
  monkeypatch.setattr(storage, "replace_object",
                      lambda p, data: (uploaded.append(len(data)), real(p, data)))
  line = json.dumps({"step": 0, "loss": 1.2345678}) + "\n"
  n = 300
  with storage.AppendLog(str(store / "metrics.jsonl"), flush_seconds=0) as log:
    for step in range(n):
      log.write(line)
  assert len(uploaded) == n and sum(uploaded) == n * len(line) == log.bytes_uploaded
  assert storage.read_lines(str(store / "metrics.jsonl")) == [line[:-1]] * n


def test_remote_lines_wait_for_the_flush_period_or_buffer_size(store):
  path = str(store / "log.jsonl")
  log = storage.AppendLog(path, flush_seconds=3600, max_buffer_bytes=10)
  log.write("first\n")  # uploaded at once: a new run shows up right away
  log.write("a\n")
  log.write("b\n")
  assert storage.read_lines(path) == ["first"]
  log.write("0123456789\n")  # over max_buffer_bytes
  assert storage.read_lines(path) == ["first", "a", "b", "0123456789"]
  log.write("c\n")
  log.flush()
  log.write("d\n")
  log.close()
  assert storage.read_lines(path) == ["first", "a", "b", "0123456789", "c", "d"]
  assert len(_parts(path)) == 4
  log.close()  # again: nothing
  with pytest.raises(ValueError, match="closed"):
    log.write("e\n")


def test_two_writers_at_once_keep_all_lines(store):
  path = str(store / "eval_results.jsonl")
  one, two = storage.AppendLog(path, flush_seconds=0), storage.AppendLog(path, flush_seconds=0)
  one.write("1\n")
  two.write("2\n")  # the same part number, another writer tag: no overwrite
  one.close()
  two.close()
  assert sorted(storage.read_lines(path)) == ["1", "2"] and len(_parts(path)) == 2


def test_a_log_with_a_whole_file_and_parts_reads_in_order(store):
  # A run in a bucket logged by an older version (one object), resumed by this one (parts).
  path = str(store / "metrics.jsonl")
  (store / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "cut sh')  # killed writer
  with storage.AppendLog(path) as log:
    log.write('{"step": 3}\n')
  assert [r["step"] for r in storage.read_records(path)] == [1, 3]
  assert storage.read_records(str(store / "none.jsonl")) == []


def test_local_appends_are_flushed_at_each_write_and_fsynced_at_close(tmp_path, monkeypatch):
  synced = []
  real = os.fsync
  monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
  path = str(tmp_path / "sub" / "log.jsonl")
  log = storage.AppendLog(path)
  log.write("1\n")
  assert open(path).read() == "1\n" and not synced  # another process sees it already
  log.flush()
  assert len(synced) == 1
  log.write("2\n")
  log.close()
  assert len(synced) == 2 and storage.read_lines(path) == ["1", "2"] and not _parts(path)
  with pytest.raises(ValueError, match="closed"):
    log.write("3\n")


# ------------------------------------------------------------------ atomic writes


def test_atomic_write_fsyncs_the_file_then_renames_then_fsyncs_the_folder(tmp_path,
                                                                          monkeypatch):
  events = []
  real_fsync, real_replace = os.fsync, os.replace
  monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(
      f"/proc/self/fd/{fd}"))), real_fsync(fd)))
  monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)),
                                                   real_replace(a, b)))
  target = tmp_path / "new" / "config.json"
  atomic.write_text(str(target), "{}\n")
  assert target.read_text() == "{}\n"
  assert events == [("fsync", False), ("replace", None), ("fsync", True)]
  assert os.listdir(target.parent) == ["config.json"]  # no temporary left


def test_a_failed_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
  target = tmp_path / "x.txt"
  target.write_text("old")

  def fail(fd):
    raise OSError("disk full")

  monkeypatch.setattr(os, "fsync", fail)
  with pytest.raises(OSError, match="disk full"):
    atomic.write_text(str(target), "new")
  assert target.read_text() == "old" and os.listdir(tmp_path) == ["x.txt"]


# ------------------------------------------------------------------ read noise


def test_read_noise_hooks_are_scoped_to_the_block():
  seen = []
  before_hook, before_except = sys.unraisablehook, sys.excepthook
  before_level = logging.getLogger("asyncio").level

  def outer_hook(unraisable):
    seen.append(str(unraisable.exc_value))

  sys.unraisablehook = outer_hook
  try:
    with damaged_checkpoints.silence_read_noise():
      assert sys.unraisablehook is not outer_hook
      unraisable = type("U", (), {"object": None})
      for message in ("Event loop is closed", "real problem"):
        u = unraisable()
        u.exc_value = RuntimeError(message)
        sys.unraisablehook(u)
      inner = sys.unraisablehook
      with damaged_checkpoints.silence_read_noise():  # nested: nothing more installed
        assert sys.unraisablehook is inner
      assert sys.unraisablehook is inner
    assert seen == ["real problem"]
    assert sys.unraisablehook is outer_hook and sys.excepthook is before_except
    with pytest.raises(KeyError):
      with damaged_checkpoints.silence_read_noise():
        raise KeyError("the read failed")
    assert sys.unraisablehook is outer_hook and sys.excepthook is before_except
    assert logging.getLogger("asyncio").level == before_level
  finally:
    sys.unraisablehook = before_hook


def test_after_a_failed_read_late_echoes_are_still_dropped():
  # Tensorstore finishes a failed read's other reads on its threads just after the failure.
  seen = []
  before = sys.excepthook
  sys.excepthook = lambda kind, error, tb: seen.append(str(error))
  try:
    late = RuntimeError("Event loop is closed")
    echo = threading.Thread(target=lambda: (time.sleep(0.2), sys.excepthook(
        RuntimeError, late, None)))
    # quiet_s well above the echo's delay, so a loaded machine cannot make this flaky.
    with damaged_checkpoints.silence_read_noise(quiet_s=1.5) as noise:
      noise.failed()
      echo.start()
    echo.join()
    assert seen == [] and noise.dropped == 1
    sys.excepthook(RuntimeError, late, None)  # outside any block: the process's own hook
    assert seen == ["Event loop is closed"]
  finally:
    sys.excepthook = before
