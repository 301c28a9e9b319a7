"""The model runs sharded on an 8-device CPU mesh from its logical axis names alone."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from t5gemma_jax import config, model

    assert jax.device_count() == 8
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
             ("heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor"))
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    for scan in (False, True):
      cfg = config.preset("tiny", scan_layers=scan, remat_policy="minimal")
      net = model.T5Gemma(cfg)
      rng = np.random.default_rng(0)
      enc = rng.integers(3, 2048, (8, 24)).astype(np.int32)
      dec = rng.integers(3, 2048, (8, 12)).astype(np.int32)
      enc[:, -4:] = 0
      init = lambda: net.init(jax.random.PRNGKey(0), enc, dec)
      specs = nn.get_partition_spec(jax.eval_shape(init))
      shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables = jax.jit(init, out_shardings=shardings)()
        params = nn.meta.unbox(variables)["params"]
        batch = NamedSharding(mesh, P(("data", "fsdp")))
        logits = jax.jit(net.apply)({"params": params}, jax.device_put(enc, batch),
                                    jax.device_put(dec, batch))
      up = params["decoder"]["layers"]["block_0"] if scan else params["decoder"]["layers_0"]
      up = up["mlp"]["up"]["kernel"]
      want = P(None, "fsdp", "tensor") if scan else P("fsdp", "tensor")
      assert up.sharding.spec == want, up.sharding.spec
      assert up.addressable_shards[0].data.shape[-2:] == (32, 64)  # 64x128 split 2 x 2
      emb = params["encoder"]["embedder"]["embedding"]
      assert emb.sharding.spec == P("tensor", "fsdp"), emb.sharding.spec
      assert logits.sharding.spec[0] == ("data", "fsdp"), logits.sharding.spec
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
    from t5gemma_jax import config, decoding, sharding
    from t5gemma_jax.model import abstract_params
    from tests.random_params import random_params

    cfg = config.preset("tiny")
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
