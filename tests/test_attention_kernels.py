"""RunOptions.attention_impl: the splash kernel (Pallas interpret mode on CPU) and the cuDNN path's
`jax.nn.dot_product_attention` call (run by XLA here) against our XLA attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5gemma_jax import config, model, presets
from t5gemma_jax.model import attention, attention_kernels, masks
from t5gemma_jax.run_options import RunOptions
from tests.helpers.random_params import random_params


def _batch(length=128):
  rng = np.random.default_rng(0)
  enc = rng.integers(3, 2048, (2, length)).astype(np.int32)
  dec = rng.integers(3, 2048, (2, length)).astype(np.int32)
  dec[:, 0] = 2
  enc[1, length - 31:] = 0
  dec[1, length - 57:] = 0
  return enc, dec


def _assert_matches_xla(cfg, impl: str, position: int) -> float:
  """Logits (max |diff| < 1e-4, returned) and gradients (1e-5 relative) of `cfg` computed with
  `attention_impl=impl` equal those of the XLA reference on a padded batch of length 128."""
  params = random_params(cfg, seed=0)
  enc, dec = _batch()
  real = dec != 0

  def loss(p, run):
    logits = model.T5Gemma(cfg, run).apply({"params": p}, enc, dec)
    return (jnp.sum(jnp.where(real[..., None], jax.nn.log_softmax(logits), 0.0)[..., position]),
            logits)

  grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  g_xla, l_xla = grad(params, RunOptions())
  g_fused, l_fused = grad(params, RunOptions(attention_impl=impl))
  diff = float(np.max(np.abs(np.asarray(l_fused) - np.asarray(l_xla))[real]))
  assert diff < 1e-4
  for a, b in zip(jax.tree_util.tree_leaves(g_xla), jax.tree_util.tree_leaves(g_fused)):
    np.testing.assert_allclose(b, a, atol=1e-5 * float(np.max(np.abs(a))) + 1e-7)
  return diff


@pytest.mark.slow
def test_splash_matches_xla_in_logits_and_gradients():
  stack = dataclasses.replace(presets.stack_preset("tiny"), sliding_window=5)  # GQA 4q / 2kv
  cfg = config.T5GemmaConfig(encoder=stack, decoder=stack)
  _assert_matches_xla(cfg, "splash", position=5)


@pytest.mark.slow
def test_triton_matches_xla_in_logits_and_gradients():
  """T5Gemma 1 (softcap 50, window 5 so the sliding layers bite, GQA, padding) through the whole
  model: the Pallas Triton kernel in interpret mode against the XLA path."""
  stack = dataclasses.replace(presets.stack_preset("tiny"), sliding_window=5)
  cfg = config.T5GemmaConfig(encoder=stack, decoder=stack)
  _assert_matches_xla(cfg, "triton", position=5)


def _t5gemma2_cfg(**changes):
  """tiny2 cut to one sliding and one global layer per stack, window 5 (split in the encoder)."""
  base = presets.preset("tiny2")
  stack = dataclasses.replace(base.encoder, num_layers=2, sliding_window=5,
                              layer_types=(config.SLIDING, config.FULL))
  return base.replace(encoder=stack, decoder=stack, **changes)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_fused_merged_attention_matches_xla(impl):
  """T5Gemma 2: merged [decoder | encoder] keys and the split encoder window in both kernels
  (cuDNN's call run by XLA here: `jax.nn.dot_product_attention`, implementation=None)."""
  cfg = _t5gemma2_cfg()
  if impl == "cudnn":
    original = attention_kernels.cudnn_attention
    attention_kernels.cudnn_attention = lambda *a, **k: original(*a, **k, implementation=None)
  try:
    diff = _assert_matches_xla(cfg, impl, position=7)
  finally:
    if impl == "cudnn":
      attention_kernels.cudnn_attention = original
  print(f"{impl} merged attention: max |logit diff| {diff:.2e}")


@pytest.mark.slow
def test_splash_masks_bite():
  """The kernel really applies the split window and the merged layout: changing either moves
  the logits (so the parity above is not vacuous)."""
  cfg = _t5gemma2_cfg()
  params = random_params(cfg, seed=1)
  enc, dec = _batch()
  real = dec != 0
  splash = RunOptions(attention_impl="splash")
  run = lambda c: np.asarray(jax.jit(model.T5Gemma(c, splash).apply)({"params": params}, enc,
                                                                     dec))
  ours = run(cfg)
  sym = dataclasses.replace(cfg.encoder, encoder_window="symmetric")
  assert np.max(np.abs(run(cfg.replace(encoder=sym)) - ours)[real]) > 1e-3
  no_cross = run(cfg.replace(cross_attention_layers="global"))
  assert np.max(np.abs(no_cross - ours)[real]) > 1e-3


@pytest.mark.parametrize("causal,window", [(False, None), (False, 3), (True, None), (True, 3)])
def test_cudnn_call_matches_xla(causal, window):
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(2, 12, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 12, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 12, 2, 8)), jnp.float32)
  segments = np.ones((2, 12), np.int32)
  segments[1, 8:] = 0
  segments[0, 6:] = 2  # two packed examples in row 0
  spec = masks.MaskSpec(jnp.asarray(segments), jnp.asarray(segments), causal, window)
  ours = attention.dot_product_attention(q, k, v, spec.dense(), scale=0.3, softcap=None)
  theirs = attention_kernels.cudnn_attention(q, k, v, spec, scale=0.3, implementation=None)
  real = segments > 0
  np.testing.assert_allclose(np.asarray(theirs)[real], np.asarray(ours)[real], atol=1e-5)


def test_fused_attention_configs_are_checked():
  cudnn = RunOptions(attention_impl="cudnn")
  with pytest.raises(ValueError, match="attn_logit_softcapping"):
    cudnn.check(presets.preset("tiny"))  # Gemma 2 softcaps attention logits
  with pytest.raises(ValueError, match="attn_logit_softcapping"):  # the model checks too
    tokens = jnp.ones((1, 4), jnp.int32)
    model.T5Gemma(presets.preset("tiny"), cudnn).init(jax.random.PRNGKey(0), tokens, tokens)
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    RunOptions(attention_impl="flash")
  stack = dataclasses.replace(presets.stack_preset("tiny"), attn_logit_softcapping=None)
  cudnn.check(config.T5GemmaConfig(encoder=stack, decoder=stack))  # fine
  with pytest.raises(ValueError, match="multiples of 128"):
    attention_kernels._block(100)


MESH_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from t5gemma_jax import model, presets, sharding
from t5gemma_jax.run_options import RunOptions
from tests.helpers.random_params import random_params
jax.config.update("jax_default_matmul_precision", "highest")
mesh = sharding.make_mesh(sharding.MeshConfig(ici=(2, 2, 2)))
cfg = presets.preset("tiny2")
params = random_params(cfg, seed=0)
rng = np.random.default_rng(0)
enc = rng.integers(3, 2048, (4, 128)).astype(np.int32)
dec = rng.integers(3, 2048, (4, 128)).astype(np.int32)
enc[1, 90:] = 0
dec[:, 0] = 2
batch = NamedSharding(mesh, P(sharding.BATCH_AXES))
out = {}
with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
  for name in ("xla", "splash"):
    net = model.T5Gemma(cfg, RunOptions(attention_impl=name))
    fn = jax.jit(lambda p, e, d, net=net: net.apply({"params": p}, e, d))
    args = (params, jax.device_put(enc, batch), jax.device_put(dec, batch))
    out[name] = np.asarray(fn(*args))
    if name == "splash":
      assert "shard_map" in str(jax.make_jaxpr(fn)(*args))
print("MAXDIFF", float(np.max(np.abs(out["xla"] - out["splash"]))))
"""


@pytest.mark.slow
def test_splash_under_a_data_fsdp_tensor_mesh_matches_xla():
  """On a (2, 2, 2) mesh each device runs the kernel on its rows and its kv heads (shard_map);
  T5Gemma 2's merged mask included, the logits equal the XLA path's."""
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  p = subprocess.run([sys.executable, "-c", MESH_SCRIPT], capture_output=True, text=True,
                     cwd=repo, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert p.returncode == 0, p.stderr[-3000:]
  diff = float(p.stdout.split("MAXDIFF")[1])
  assert diff < 1e-4, diff
