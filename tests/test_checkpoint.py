"""Checkpointer: bitwise round trips onto shardings, retention, save schedule, data position,
interrupted saves, params-only reads and error messages."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5gemma_jax import checkpoint, params_reader
from t5gemma_jax.train.state import TrainState
from tests.helpers.states import (abstract, assert_bitwise, replicated, small_batches,
                                  small_state)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_round_trip_is_bitwise_and_sharded(tmp_path):
  state = small_state()
  sharding = replicated()
  with checkpoint.Checkpointer(str(tmp_path), save_every=1) as ckpt:
    assert ckpt.save(1, state)
    restored = ckpt.restore(None, abstract(state, sharding))
  assert isinstance(restored, TrainState)
  assert_bitwise(restored, state)
  assert restored.params["encoder"]["layer_0"]["scale"].dtype == jnp.bfloat16
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding == sharding


def test_save_every_and_force(tmp_path):
  state = small_state()
  with checkpoint.Checkpointer(str(tmp_path), save_every=5) as ckpt:
    # Orbax's default policy would save the first step of a fresh run; ours does not.
    assert not ckpt.save(1, state)
    assert not ckpt.save(3, state)
    assert ckpt.save(5, state)
    assert ckpt.save(7, state, force=True)
    assert not ckpt.save(7, state, force=True)  # already saved: no error, no second write
    ckpt.wait()
    assert ckpt.all_steps() == [5, 7] and ckpt.latest_step() == 7


def test_keep_deletes_older_steps(tmp_path):
  state = small_state()
  with checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=2) as ckpt:
    for step in range(1, 5):
      ckpt.save(step, state)
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
  assert sorted(os.listdir(tmp_path)) == ["3", "4"]


@pytest.mark.parametrize("mode, values, best", [("min", [0.5, 2.0, 3.0, 1.0], 1),
                                                ("max", [0.1, 0.9, 0.2, 0.3], 2)])
def test_keep_best_keeps_the_best_and_the_last(tmp_path, mode, values, best):
  state = small_state()
  with checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=2, keep_best="score",
                               best_mode=mode) as ckpt:
    for step, value in enumerate(values, start=1):
      ckpt.save(step, state, metrics={"score": jnp.float32(value), "other": 0.0})
    ckpt.save(10, state, force=True)  # no metrics: only kept as one of the last two
    ckpt.save(11, state, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [best, 10, 11]


def test_data_iterator_position_is_part_of_the_step(tmp_path):
  batches = small_batches()
  for _ in range(5):
    next(batches)
  state = small_state()
  with checkpoint.Checkpointer(str(tmp_path), save_every=5) as ckpt:
    assert ckpt.save(5, state, data_iterator=batches)
    # Training goes on while the arrays are written: the saved position must not move.
    for _ in range(3):
      next(batches)
    fresh = small_batches()
    restored = ckpt.restore(5, abstract(state, replicated()), data_iterator=fresh)
  assert_bitwise(restored, state)
  np.testing.assert_array_equal(next(fresh)["x"], [10, 11])  # batch 6
  assert os.listdir(tmp_path / "5" / checkpoint.DATA_ITERATOR) != []


_CRASH = textwrap.dedent("""
  import os, sys
  import jax.numpy as jnp
  from orbax.checkpoint._src.path import atomicity
  from t5gemma_jax import checkpoint

  ckpt = checkpoint.Checkpointer(sys.argv[1], save_every=1)
  ckpt.save(1, {"params": {"w": jnp.ones(4)}})
  ckpt.wait()

  async def crash(self, *args, **kwargs):  # the arrays are written, nothing is committed yet
    os._exit(3)

  atomicity.AtomicRenameTemporaryPath.finalize = crash
  ckpt.save(2, {"params": {"w": jnp.full(4, 2.0)}})
  ckpt.wait()
""")


@pytest.mark.slow
def test_interrupted_save_is_ignored(tmp_path):
  proc = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert sorted(os.listdir(tmp_path)) == ["1", "2.orbax-checkpoint-tmp"]  # step 2 half-done
  target = {"params": {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=replicated())}}
  # A read-only reader leaves the debris in place and still skips it.
  params = params_reader.ParamsReader(str(tmp_path)).read(target["params"])
  np.testing.assert_array_equal(params["w"], np.ones(4))
  with checkpoint.Checkpointer(str(tmp_path), save_every=1) as ckpt:  # removes the debris
    assert ckpt.latest_step() == 1
    np.testing.assert_array_equal(ckpt.restore(None, target)["params"]["w"], np.ones(4))
    assert ckpt.save(2, {"params": {"w": jnp.full(4, 5.0)}})  # step 2 can be written again
    restored = ckpt.restore(None, target)
  np.testing.assert_array_equal(restored["params"]["w"], np.full(4, 5.0))
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_params_reader_loads_only_params(tmp_path):
  state = small_state(seed=1)
  with checkpoint.Checkpointer(str(tmp_path), save_every=1) as ckpt:
    ckpt.save(1, small_state(seed=2))
    ckpt.save(2, state)
  sharding = replicated()
  params = params_reader.ParamsReader(str(tmp_path)).read(abstract(state.params, sharding))
  assert_bitwise(params, state.params)
  assert all(leaf.sharding == sharding for leaf in jax.tree.leaves(params))
  older = params_reader.ParamsReader(str(tmp_path), step=1).read(abstract(state.params,
                                                                          sharding))
  assert_bitwise(older, small_state(seed=2).params)


def test_errors_name_the_directory_and_the_parameter(tmp_path):
  state = small_state()
  target = abstract(state, replicated())
  empty = tmp_path / "empty"
  with checkpoint.Checkpointer(str(empty), save_every=1) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match=str(empty)):
      ckpt.restore(None, target)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
    params_reader.ParamsReader(str(tmp_path / "missing"))

  run = tmp_path / "run"
  with checkpoint.Checkpointer(str(run), save_every=1) as ckpt:
    ckpt.save(1, state)
    with pytest.raises(FileNotFoundError, match=r"step 9 .*\(have \[1\]\)"):
      ckpt.restore(9, target)
    with pytest.raises(FileNotFoundError, match="data-iterator"):
      ckpt.restore(1, target, data_iterator=small_batches())
    wrong = target.replace(params={**target.params, "decoder": {
        "embedding": jax.ShapeDtypeStruct((16, 5), jnp.float32, sharding=replicated())}})
    with pytest.raises(ValueError, match=r"params/decoder/embedding: checkpoint shape "
                                         r"\(16, 4\), expected \(16, 5\)"):
      ckpt.restore(1, wrong)
    with pytest.raises(ValueError, match="params/decoder/embedding"):
      params_reader.ParamsReader(str(run)).read(wrong.params)
    with pytest.raises(ValueError, match="needs a sharding"):
      ckpt.restore(1, jax.eval_shape(lambda: state))


_EIGHT_DEVICES = textwrap.dedent("""
  import sys
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from t5gemma_jax import checkpoint

  assert jax.device_count() == 8
  fsdp = NamedSharding(jax.make_mesh((8,), ("fsdp",)), P("fsdp", None))
  x = np.random.default_rng(0).normal(size=(16, 8)).astype(jnp.bfloat16)
  state = {"w": jax.device_put(x, fsdp), "b": jax.device_put(np.arange(8.0, dtype=np.float32),
                                                           NamedSharding(fsdp.mesh, P()))}
  with checkpoint.Checkpointer(sys.argv[1], save_every=1) as ckpt:
    ckpt.save(1, state)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    other = {"w": NamedSharding(mesh, P(None, "model")), "b": NamedSharding(mesh, P("model"))}
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=other[k])
                for k, v in state.items()}
    restored = ckpt.restore(1, abstract)
  for k in state:
    assert restored[k].sharding == other[k], restored[k].sharding
    assert np.asarray(restored[k]).tobytes() == np.asarray(state[k]).tobytes(), k
  assert restored["w"].addressable_shards[0].data.shape == (16, 2)
  print("ok")
""")


def test_restore_reshards_across_eight_devices(tmp_path):
  # The device count is fixed when jax starts, so 8 host devices need a fresh process.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
  proc = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
