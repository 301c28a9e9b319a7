"""T5Gemma 2 ("tiny2": 5:1 layers, scanned) on a (2, 2, 2) mesh of 8 CPU devices: the train
step matches one device and shards as the rules say; the CLI trains, then exports a folder that
transformers' T5Gemma 2 loads with our logits."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from t5gemma_jax import inference, model, run_files
from t5gemma_jax.cli import app
from t5gemma_jax.run_options import RunOptions
from tests.helpers import hf_reference as ref

pytestmark = pytest.mark.slow  # subprocess runs or long trainings: `make test` only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EIGHT = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())

STEP_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from t5gemma_jax import presets
    from t5gemma_jax.run_options import RunOptions
    from tests.helpers.mesh_training import random_batches, train_losses

    assert jax.device_count() == 8
    batches = random_batches(2, 40, 24, enc_pad=7, dec_pad=3)
    options = RunOptions(scan_layers=True, remat_policy="minimal")
    run = lambda cfg, ici, devices: train_losses(cfg, batches, ici, devices, options)[:2]

    for share in (False, True):
      cfg = presets.preset("tiny2").replace(share_blocks=share)
      reference, _ = run(cfg, (1, 1, 1), jax.devices()[:1])
      got, state = run(cfg, (2, 2, 2), jax.devices())
      np.testing.assert_allclose(got, reference, rtol=2e-5)
      print("LOSSES", share, reference, got)
      enc = state.params["encoder"]
      block = enc["layers"]["block_5"]  # the global layer of the scanned 5:1 unit
      assert block["self_attn"]["q"]["kernel"].shape[0] == 1
      expect = {("self_attn", "q", "kernel"): P(None, "fsdp", "tensor", None),
                ("self_attn", "k", "kernel"): P(None, "fsdp", "tensor", None),
                ("self_attn", "o", "kernel"): P(None, "tensor", None, "fsdp"),
                ("mlp", "up", "kernel"): P(None, "fsdp", "tensor"),
                ("mlp", "down", "kernel"): P(None, "tensor", "fsdp")}
      for path, spec in expect.items():
        x = block
        for key in path:
          x = x[key]
        assert x.sharding.spec == spec, (path, x.sharding.spec)
        assert x.addressable_shards[0].data.size * 4 == x.size, path  # split over 2 x 2
      table = enc["embedder"]["embedding"]
      assert table.sharding.spec == P("tensor", "fsdp"), table.sharding.spec
      assert table.addressable_shards[0].data.size * 4 == table.size
      dec = state.params["decoder"]
      assert ("layers" in dec) != share and "embedder" not in dec
    print("T5GEMMA2_MESH_OK")
""")


def test_train_step_on_the_mesh_matches_one_device_and_is_sharded():
  proc = subprocess.run([sys.executable, "-c", STEP_SCRIPT], cwd=REPO, env=EIGHT,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0 and "T5GEMMA2_MESH_OK" in proc.stdout, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
  """tiny2, scanned, trained 3 steps by the CLI on T5Gemma 2's demo recipe over 8 devices."""
  run = tmp_path_factory.mktemp("t5gemma2_mesh") / "run"
  cmd = [sys.executable, "-m", "t5gemma_jax.cli", "train", "--gin_file=runs/demo_t5gemma2.gin",
         f"--gin.MODEL_DIR='{run}'", '--gin.TASK_FEATURE_LENGTHS={"inputs": 96, "targets": 96}',
         "--gin.BATCH_SIZE=8", "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_PERIOD=3",
         "--gin.EVAL_PERIOD=0", "--gin.WARMUP_STEPS=1", "--gin.TrainConfig.eval_tasks=()",
         "--gin.TrainConfig.progress=False", "--gin.RunOptions.scan_layers=True",
         "--gin.MeshConfig.ici=(2, 2, 2)"]
  proc = subprocess.run(cmd, cwd=REPO, env=EIGHT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "steps 0 -> 3" in proc.stdout, proc.stdout
  return str(run)


def test_cli_trains_on_the_mesh_and_exports_to_transformers(mesh_run, tmp_path, clean_gin):
  import jax
  import torch
  import transformers

  cfg = run_files.read_model_config(mesh_run)
  assert cfg.merged_attention and cfg.encoder.layer_period == 6
  losses = [r["loss"] for r in map(__import__("json").loads,
                                   open(os.path.join(mesh_run, "metrics.jsonl")))
            if "loss" in r]
  assert len(losses) >= 1 and all(np.isfinite(losses))
  out = str(tmp_path / "hf")
  assert app.main(["export", f"--checkpoint_dir={mesh_run}", f"--output_dir={out}",
                    "--verify"]) == 0
  hf_model = transformers.T5Gemma2ForConditionalGeneration.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager").eval()
  scanned = RunOptions(scan_layers=True)
  params = inference.load_params(cfg, mesh_run, run=scanned)  # gathered from the shards
  assert params["encoder"]["layers"]["block_5"]["self_attn"]["q"]["kernel"].shape[0] == 1
  enc, dec = ref.padded_batch(np.random.default_rng(0), 2048, 3, 30, 12)
  ours = np.asarray(jax.jit(model.T5Gemma(cfg, scanned).apply)({"params": params}, enc, dec))
  diff = np.max(np.abs(ours - ref.logits(hf_model, enc, dec))[dec != 0])
  print(f"T5GEMMA2 mesh export: max |logit diff| {diff:.2e}")
  assert diff < 1e-4
  tok = transformers.AutoTokenizer.from_pretrained(out)
  vocab = run_files.read_vocabulary(mesh_run)
  text = "translate English to German: Monday"
  assert tok(text)["input_ids"] == vocab.encode(text) + [1]
