"""Small train states and checks of checkpoints: bitwise equality, replicated placement."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import tensorflow as tf
from jax.sharding import NamedSharding, PartitionSpec as P

from t5gemma_jax.data import pipeline
from t5gemma_jax.train.state import TrainState


def small_state(seed=0, step=1) -> TrainState:
  """A TrainState with nested float32 + bfloat16 params and a non-zero adamw state."""
  rng = np.random.default_rng(seed)
  params = {"encoder": {"layer_0": {"kernel": rng.normal(size=(4, 8)).astype(np.float32),
                                    "scale": rng.normal(size=(8,)).astype(ml_dtypes.bfloat16)}},
            "decoder": {"embedding": rng.normal(size=(16, 4)).astype(np.float32)}}
  params = jax.tree.map(jnp.asarray, params)
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return TrainState(step=jnp.int32(step), params=optax.apply_updates(params, updates),
                    opt_state=opt_state)


def abstract(tree, sharding):
  """`tree` as ShapeDtypeStructs placed by `sharding` (a restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def replicated() -> NamedSharding:
  return NamedSharding(jax.make_mesh((1,), ("data",)), P())


def assert_bitwise(a, b) -> None:
  """Same tree structure, and every leaf the same dtype, shape and bytes."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def small_batches() -> pipeline.GlobalBatches:
  """A resumable iterator of 50 tiny batches."""
  return pipeline.GlobalBatches(tf.data.Dataset.range(100).batch(2).map(lambda x: {"x": x}))
