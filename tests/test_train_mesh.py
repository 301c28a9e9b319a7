"""The train step on 8 forced CPU devices: every mesh gives the single-device losses, and every
parameter (and its optimizer moments) is sharded as the rules say."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # subprocess runs or long trainings: `make test` only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import dataclasses, math
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from t5gemma_jax import config, presets
    from tests.helpers.mesh_training import random_batches, train_losses

    # Every sharded dimension divisible by 8: heads, kv heads, mlp, vocab and embed.
    stack = dataclasses.replace(presets.stack_preset("tiny"), num_heads=8, num_kv_heads=8,
                                head_dim=8, sliding_window=6)
    cfg = config.T5GemmaConfig(encoder=stack, decoder=stack)
    batches = random_batches(3, 24, 12, enc_pad=5, dec_pad=3)
    losses = lambda ici, devices: train_losses(cfg, batches, ici, devices)

    reference, _, _ = losses((1, 1, 1), jax.devices()[:1])
    for ici in ((8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)):
      got, state, mesh = losses(ici, jax.devices())
      np.testing.assert_allclose(got, reference, rtol=1e-5, err_msg=str(ici))
      print("MESH", ici, got)
      layer = state.params["encoder"]["layers_0"]
      expect = {
          ("mlp", "up"): P("fsdp", "tensor"), ("mlp", "down"): P("tensor", "fsdp"),
          ("self_attn", "q"): P("fsdp", "tensor", None),
          ("self_attn", "o"): P("tensor", None, "fsdp"),
      }
      for (a, b), spec in expect.items():
        kernel = layer[a][b]["kernel"]
        assert kernel.sharding.spec == spec, (ici, a, b, kernel.sharding.spec)
        shard = kernel.addressable_shards[0].data.shape
        want = tuple(d // math.prod(mesh.shape[x] for x in ([s] if isinstance(s, str) else s))
                     if s else d for d, s in zip(kernel.shape, tuple(spec) + (None,) * 3))
        assert shard == want, (ici, a, b, shard, want)
      emb = state.params["decoder"]["embedder"]["embedding"]
      assert emb.sharding.spec == P("tensor", "fsdp"), emb.sharding.spec
      mu = state.opt_state  # AdamW first moment mirrors each parameter's sharding
      leaves = [x for x in jax.tree_util.tree_leaves(mu) if getattr(x, "shape", ()) ==
                layer["mlp"]["up"]["kernel"].shape]
      assert leaves and all(x.sharding.spec == P("fsdp", "tensor") for x in leaves)
      if ici != (8, 1, 1):
        assert len({s.device for s in emb.addressable_shards}) == 8
        assert emb.addressable_shards[0].data.size < emb.size  # not silently replicated
    print("MESH_OK")
""")


def test_every_mesh_matches_one_device():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                        timeout=900, env=env, cwd=REPO)
  assert proc.returncode == 0 and "MESH_OK" in proc.stdout, (proc.stdout[-2000:],
                                                             proc.stderr[-4000:])
