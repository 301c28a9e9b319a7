"""params_reader: finalized steps found by orbax (in-flight saves skipped, nothing written), errors
naming the directory and step, metadata without the data, damage named, sharded reads equal to
streamed reads, and the layout told by the one layout rule."""

import glob
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5gemma_jax import checkpoint, params_reader, presets
from t5gemma_jax.convert import params_checkpoint
from t5gemma_jax.model import abstract_params, layout
from t5gemma_jax.run_options import RunOptions
from tests.helpers.random_params import random_params
from tests.helpers.states import abstract, assert_bitwise, replicated, small_state


def _tree_listing(root):
  """Every path under `root` with its size and mtime: what a read-only reader must not change."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(folder, name)
      stat = os.stat(path)
      out[os.path.relpath(path, root)] = (stat.st_size if name in files else None,
                                          stat.st_mtime_ns)
  return out


def _save(directory, steps, **options):
  with checkpoint.Checkpointer(str(directory), save_every=1, **options) as ckpt:
    for step in steps:
      ckpt.save(step, small_state(seed=step))


def _in_flight_save(directory, step, monkeypatch):
  """Step `step` written the way orbax leaves a save still in flight on local storage (as
  test_checkpoint's crash does): every file in `<step>.orbax-checkpoint-tmp*`, its items in
  `<item>.orbax-checkpoint-tmp*`, nothing renamed into place, no commit marker."""
  async def not_yet(self, *args, **kwargs):
    del self, args, kwargs

  with monkeypatch.context() as patch:
    patch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", not_yet)
    _save(directory, [step], async_save=False)
  [tmp] = [n for n in os.listdir(directory) if n.startswith(f"{step}.orbax-checkpoint-tmp")]
  return directory / tmp


def test_latest_finalized_step_is_read_and_in_flight_saves_are_skipped(tmp_path, monkeypatch):
  run = tmp_path / "run"
  steps = run / params_reader.CHECKPOINTS
  _save(steps, [1, 2])
  tmp = _in_flight_save(steps, 3, monkeypatch)
  # An in-flight save on object storage: written in place under the final names, all but the
  # commit marker.
  for item in os.listdir(tmp):
    os.rename(tmp / item, tmp / item.split(".orbax-checkpoint-tmp")[0])
  os.rename(tmp, steps / "4")
  assert os.path.isdir(steps / "4" / "state")
  assert not os.path.exists(steps / "4" / "commit_success.txt")
  tmp = _in_flight_save(steps, 5, monkeypatch)
  before = _tree_listing(tmp_path)

  assert params_reader.finalized_steps(run) == [1, 2]
  assert params_reader.latest_step(steps) == 2
  reader = params_reader.ParamsReader(run)
  assert (reader.step, reader.step_dir, reader.run_dir) == (2, steps / "2", run)
  assert_bitwise(reader.read(abstract(small_state().params, replicated())),
                 small_state(seed=2).params)
  for step in (4, 5):
    with pytest.raises(params_reader.CheckpointNotFoundError,
                       match=rf"no checkpoint for step {step} in {steps} \(have \[1, 2\]\) "
                             r"\(not finalized, skipped: 4, 5.orbax-checkpoint-tmp"):
      params_reader.ParamsReader(run, step=step)
  with pytest.raises(FileNotFoundError, match=f"checkpoint {steps / '4'} was never completed"):
    params_reader.ParamsReader(steps / "4")
  with pytest.raises(ValueError, match=f"{tmp} is not a finalized checkpoint step"):
    params_reader.ParamsReader(tmp)
  assert _tree_listing(tmp_path) == before  # nothing created, moved or cleaned up
  with checkpoint.Checkpointer(str(steps), save_every=1) as ckpt:  # training lists the same
    assert ckpt.all_steps() == [1, 2]


def test_missing_directory_step_and_empty_directory_are_named(tmp_path):
  with pytest.raises(params_reader.CheckpointNotFoundError,
                     match=f"no checkpoint directory {tmp_path / 'nope'}"):
    params_reader.ParamsReader(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=f"no complete checkpoint in {tmp_path / 'empty'}$"):
    params_reader.ParamsReader(tmp_path / "empty")
  _save(tmp_path / "run", [1, 2])
  with pytest.raises(ValueError, match=rf"no checkpoint for step 9 in {tmp_path / 'run'} "
                                       r"\(have \[1, 2\]\)$"):
    params_reader.ParamsReader(tmp_path / "run", step=9)
  with pytest.raises(ValueError, match=f"{tmp_path / 'run' / '1'} is step 1, not step 2"):
    params_reader.ParamsReader(tmp_path / "run" / "1", step=2)
  reader = params_reader.ParamsReader(tmp_path / "run" / "1")  # a step directory itself
  assert reader.step == 1 and reader.directory == tmp_path / "run"
  with pytest.raises(ValueError, match="params/decoder/embedding2: not in the checkpoint"):
    reader.read({"decoder": {"embedding2": jax.ShapeDtypeStruct((16, 4), np.float32,
                                                                sharding=replicated())}})


def _bytes_read():
  """Bytes this process has read through read(2)/pread(2), page cache hits included."""
  with open("/proc/self/io") as f:
    return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
def test_metadata_reads_no_array_data(tmp_path):
  big = np.random.default_rng(0).normal(size=(1024, 4096)).astype(np.float32)  # 16 MiB
  with checkpoint.Checkpointer(str(tmp_path), save_every=1) as ckpt:
    ckpt.save(1, {"params": {"big": jax.numpy.asarray(big),
                             "small": jax.numpy.zeros((3,), jax.numpy.bfloat16)}})
  reader = params_reader.ParamsReader(tmp_path)
  start = _bytes_read()
  assert reader.metadata == {("big",): ((1024, 4096), np.dtype(np.float32)),
                             ("small",): ((3,), np.dtype("bfloat16"))}
  assert not reader.scanned
  metadata_bytes = _bytes_read() - start
  start = _bytes_read()
  [(_, array)] = reader.iter_params(paths=[("big",)])
  assert array.tobytes() == big.tobytes()
  # Shapes and dtypes come from orbax's metadata (a few KiB), not from the 16 MiB of data.
  data_bytes = _bytes_read() - start
  assert metadata_bytes < big.nbytes // 64 <= data_bytes, (metadata_bytes, data_bytes)


def test_damaged_step_is_named(tmp_path):
  _save(tmp_path, [1])
  for path in glob.glob(str(tmp_path / "1" / "state" / "**" / "d" / "*"), recursive=True):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  damaged = f"checkpoint {tmp_path / '1'} is damaged or incomplete"
  with pytest.raises(checkpoint.DamagedCheckpointError, match=damaged):
    params_reader.ParamsReader(tmp_path).read(abstract(small_state().params, replicated()))
  with pytest.raises(checkpoint.DamagedCheckpointError, match=damaged):
    next(params_reader.ParamsReader(tmp_path).iter_params())


def test_sharded_read_equals_the_streamed_read(tmp_path):
  _save(tmp_path, [1])
  reader = params_reader.ParamsReader(tmp_path)
  sharded = reader.read(abstract(small_state().params, replicated()))
  # 64 bytes a read: every tensor on its own, the largest over the bound.
  streamed = dict(reader.iter_params(max_bytes=64))
  assert sorted(streamed) == sorted(reader.metadata)
  for path, array in streamed.items():
    node = sharded
    for key in path:
      node = node[key]
    assert isinstance(array, np.ndarray) and (array.shape, array.dtype) == reader.metadata[path]
    assert np.asarray(node).tobytes() == array.tobytes(), path
  assert list(reader.iter_params(paths=[])) == []
  some = [("encoder", "layer_0", "scale")]
  assert [p for p, _ in reader.iter_params(paths=some)] == some
  with pytest.raises(KeyError, match=f"encoder/nope is not a parameter of checkpoint "
                                     f"{tmp_path / '1'}"):
    next(reader.iter_params(paths=[("encoder", "nope")]))


def test_layout_is_told_by_the_layout_rule_and_converted_on_read(tmp_path):
  cfg = presets.preset("tiny")
  params = random_params(cfg, seed=0, run=RunOptions(scan_layers=True))
  params_checkpoint.save_params(params, cfg, str(tmp_path / "run"))
  reader = params_reader.ParamsReader(tmp_path / "run")
  assert reader.scanned and reader.step == 0
  assert reader.scanned == layout.is_scanned(params)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # as inference.load_params
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        abstract_params(cfg, boxed=False))
  with pytest.raises(ValueError, match="does not match the abstract params: params/"):
    reader.read(target)  # without the config, the other layout is a mismatch
  got = reader.read(target, cfg=cfg)
  want = layout.unscan_params(jax.tree.map(np.asarray, params), cfg)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
