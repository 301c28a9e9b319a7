"""Random parameters for a config without compiling the model's initialiser (slow on CPU)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5gemma_jax import model
from t5gemma_jax.run_options import RunOptions


def random_params(cfg, seed: int = 0, norm_std: float = 0.3, run: RunOptions = RunOptions()):
  """Params in `run`'s layout and dtype: kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1/d),
  norms random.

  Norm scales are drawn around 0 rather than left at 0 so that a wrong `1 + w` cannot hide.
  """
  shapes = jax.eval_shape(model.T5Gemma(cfg, run).init, jax.random.PRNGKey(0),
                          jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  shapes = nn.meta.unbox(shapes)["params"]
  rng = np.random.default_rng(seed)
  scanned = run.scan_layers

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    shape = leaf.shape
    core = shape[1:] if scanned and "'layers'" in name else shape
    if "scale" in name:
      std = norm_std
    elif "embedding" in name:
      std = core[-1] ** -0.5
    else:
      std = core[0] ** -0.5
    return rng.normal(0.0, std, shape).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)
