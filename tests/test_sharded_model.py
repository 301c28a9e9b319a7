"""The model runs sharded on an 8-device CPU mesh from its logical axis names alone."""

import os
import pytest
import subprocess
import sys
import textwrap

pytestmark = pytest.mark.slow  # subprocess runs or long trainings: `make test` only

SCRIPT = textwrap.dedent("""
    import math, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from t5gemma_jax import model, presets, sharding
    from t5gemma_jax.run_options import RunOptions
    from t5gemma_jax.sharding import RULES

    assert jax.device_count() == 8
    rule = dict(RULES)  # logical name -> mesh axes, the project's one table
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), sharding.MESH_AXES)

    def mesh_size(axes):
      names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
      return math.prod(mesh.shape[a] for a in names)

    for scan in (False, True):
      cfg = presets.preset("tiny")
      net = model.T5Gemma(cfg, RunOptions(scan_layers=scan, remat_policy="minimal"))
      rng = np.random.default_rng(0)
      enc = rng.integers(3, 2048, (8, 24)).astype(np.int32)
      dec = rng.integers(3, 2048, (8, 12)).astype(np.int32)
      enc[:, -4:] = 0
      init = lambda: net.init(jax.random.PRNGKey(0), enc, dec)
      abstract = jax.eval_shape(init)
      shardings = sharding.logical_to_shardings(abstract, mesh)["params"]
      with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        # Unboxed inside the jit, as training's init_state does: placed by `shardings` alone
        # (unboxing outside a jit here would reshard each array by the rules itself, hiding a
        # wrong `logical_to_shardings`).
        params = jax.jit(lambda: nn.meta.unbox(init())["params"], out_shardings=shardings)()
        batch = NamedSharding(mesh, P(rule["batch"]))
        logits = jax.jit(net.apply)({"params": params}, jax.device_put(enc, batch),
                                    jax.device_put(dec, batch))
      # Every array sits where RULES put its logical dimensions: its sharding, and the shape
      # of the piece each device holds (the tiny preset divides evenly on this mesh).
      boxed = jax.tree_util.tree_leaves_with_path(
          abstract["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
      placed = jax.tree_util.tree_leaves(params)
      assert len(boxed) == len(placed) > 0
      sharded_axes = set()
      for (path, box), array in zip(boxed, placed):
        name = jax.tree_util.keystr(path)
        assert set(box.names) <= set(rule), (name, box.names, "a name RULES do not cover")
        want = P(*(rule[n] for n in box.names))
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, want), array.ndim), (
            name, array.sharding.spec, want)
        piece = tuple(d // mesh_size(rule[n]) for d, n in zip(array.shape, box.names))
        assert array.addressable_shards[0].data.shape == piece, (name, piece)
        sharded_axes |= {rule[n] for n in box.names if rule[n] is not None}
      assert sharded_axes == {"fsdp", "tensor"}, sharded_axes  # both model axes in use
      up = params["decoder"]["layers"]["block_0"] if scan else params["decoder"]["layers_0"]
      up = up["mlp"]["up"]["kernel"]
      want = P(rule["layers"], rule["embed"], rule["mlp"]) if scan else P(rule["embed"],
                                                                          rule["mlp"])
      assert up.sharding.is_equivalent_to(NamedSharding(mesh, want), up.ndim), up.sharding.spec
      assert up.addressable_shards[0].data.shape[-2:] == (32, 64)  # 64x128 split 2 x 2
      emb = params["encoder"]["embedder"]["embedding"]
      assert emb.sharding.spec == P(rule["vocab"], rule["embed"]), emb.sharding.spec
      assert logits.sharding.spec[0] == rule["batch"], logits.sharding.spec
      host = jax.tree_util.tree_map(np.asarray, params)
      ref = jax.jit(net.apply)({"params": host}, enc, dec)
      np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=2e-5, rtol=2e-5)
    print("SHARDED_OK")
""")


def _run(script: str, marker: str) -> None:
  """Runs `script` in a fresh interpreter (it sets its own device count) and checks `marker`."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=600, env=env,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0 and marker in proc.stdout, proc.stderr[-4000:]


def test_sharded_forward_matches_single_device():
  _run(SCRIPT, "SHARDED_OK")


DECODE_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import flax.linen as nn
    import jax, numpy as np
    from t5gemma_jax import decoding, presets, sharding
    from t5gemma_jax.model import abstract_params
    from tests.helpers.random_params import random_params

    cfg = presets.preset("tiny")
    params = random_params(cfg, seed=3)
    rng = np.random.default_rng(0)
    enc = rng.integers(3, 2048, (8, 12)).astype(np.int32)
    enc[::3, -4:] = 0
    mesh = sharding.make_mesh(sharding.MeshConfig(ici=(2, 2, 2)))
    placed = jax.device_put(params, sharding.logical_to_shardings(
        abstract_params(cfg), mesh))
    for kw in (dict(), dict(strategy="beam", num_beams=3)):
      one = np.asarray(decoding.generate(params, cfg, enc, max_new_tokens=10, **kw))
      out = decoding.generate(placed, cfg, enc, max_new_tokens=10, mesh=mesh, **kw)
      np.testing.assert_array_equal(np.asarray(out), one)
      assert len(out.sharding.device_set) == 8, out.sharding
    print("DECODE_OK")
""")


def test_decoding_sharded_over_the_mesh_matches_one_device():
  _run(DECODE_SCRIPT, "DECODE_OK")
