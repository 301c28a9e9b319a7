"""Ahead-of-time compilation for TPU topologies on this CPU host (libtpu, real TPU compiler).

Interpret mode cannot show that a Pallas kernel lowers through Mosaic, nor that FSDP
communicates as promised: these compiles can.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from t5gemma_jax import chips, config, presets
from t5gemma_jax.config import FULL
from t5gemma_jax.run_options import RunOptions
from t5gemma_jax.train import aot, loop, optim

pytest.importorskip("libtpu", reason="TPU compiles need libtpu (the test extra installs it)")
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = RunOptions(scan_layers=True)


@pytest.fixture(autouse=True)
def default_precision():
  """These compiles target a TPU as a run would: the suite's float32 "highest" matmul
  precision (conftest) does not apply to bfloat16 Mosaic kernels ("Bad lhs type")."""
  import jax
  with jax.default_matmul_precision("default"):
    yield


def _run(model, lengths=(256, 128), batch=16, pack=True, **kw):
  return loop.TrainConfig(model=model, mixture_or_task="builtin_mixture",
                          task_feature_lengths={"inputs": lengths[0], "targets": lengths[1]},
                          batch_size=batch, train_steps=1, model_dir="/tmp/unused",
                          optimizer=optim.OptimizerConfig(name="adamw"), pack=pack, **kw)


def _cli(*args):
  """`t5gemma compile ...` in a subprocess: (exit code, stdout, stderr)."""
  p = subprocess.run([sys.executable, "-m", "t5gemma_jax.cli", "compile", *args],
                     capture_output=True, text=True, cwd=REPO, timeout=900)
  return p.returncode, p.stdout, p.stderr


def test_accelerator_types_map_to_slices():
  cases = {"v5p-8": ("v5p:2x2x1", 4, 1), "v5p-64": ("v5p:2x4x4", 32, 8),
           "v5p-256": ("v5p:4x4x8", 128, 32), "v5p-12288": ("v5p:16x16x24", 6144, 1536),
           "v4-8": ("v4:2x2x1", 4, 1), "v4-4096": ("v4:8x16x16", 2048, 512),
           "v5e-256": ("v5e:16x16", 256, 64), "v5litepod-8": ("v5e:2x4", 8, 1),
           "v6e-64": ("v6e:8x8", 64, 16)}
  for name, (topology, n, hosts) in cases.items():
    s = chips.parse(name)
    assert (s.topology_name, s.chips, s.hosts) == (topology, n, hosts), name
  for bad in ("v5p-12", "v5e-12", "v7-8", "tpu", "v5p-72"):
    with pytest.raises(ValueError, match=bad):
      chips.parse(bad)


def test_cli_compiles_the_demo_run_with_splash_and_prints_json():
  code, out, err = _cli("--topology=v5p-8", "--gin_file=runs/demo.gin",
                        '--gin.TASK_FEATURE_LENGTHS={"inputs": 256, "targets": 128}',
                        "--gin.RunOptions.scan_layers=True",
                        "--gin.RunOptions.attention_impl='splash'")
  assert code == 0, err
  report = json.loads(out.strip().splitlines()[-1])
  assert report["topology"] == "v5p-8" and report["chips"] == 4 and report["fits"] is True
  assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  mem = report["hbm_per_chip_gib"]
  assert set(mem) == {"arguments", "outputs", "temporaries", "code", "total", "capacity"}
  assert 0 < mem["total"] < mem["capacity"] == 95.0
  assert report["flops_per_step"]["executed"] > report["flops_per_step"]["model"] > 0
  roof = report["roofline"]
  assert roof["step_s"] == max(roof["compute_s"], roof["hbm_s"], roof["ici_s"])
  assert 0 < roof["mfu_upper_bound"] <= 1 and report["tokens_per_s_upper_bound"] > 0
  assert report["collectives"]["all-gather"]["count"] > 0
  assert report["decode"]["fits"] and report["compile_s"] > 0
  assert "fits in HBM:          yes" in out


@pytest.mark.parametrize("preset", ["tiny", "tiny2"])
def test_splash_lowers_through_mosaic_per_shard(preset):
  """The kernel is a Mosaic custom call inside shard_map: each chip runs it on its own rows."""
  run = RunOptions(scan_layers=True, attention_impl="splash", dtype="bfloat16")
  found, cfg, mesh = aot.target_mesh(_run(presets.preset(preset), run=run), "v5p-8")
  compiled = aot.compile_train_step(cfg, mesh)
  hlo = compiled.executable.as_text()
  calls = [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
  assert calls, "no Mosaic kernel in the TPU program"
  # 16 rows over 4 chips: every kernel call sees a shard of 4 rows' worth, never all 16.
  assert not any(re.search(r"\[16,", line.split("custom-call(")[0]) for line in calls)
  assert compiled.memory()["total"] < found.chip.hbm_bytes
  decode = aot.compile_decode(cfg, mesh)
  assert decode.memory()["total"] > 0


def test_tiny2_compiles_with_xla_attention():
  report = aot.compile_run(_run(presets.preset("tiny2"), run=SCANNED), "v5p-8")
  assert report["fits"] and report["decode"]["fits"]


def test_multislice_puts_the_slices_on_the_data_axis():
  report = aot.compile_run(_run(presets.preset("tiny"), run=SCANNED), "v5p-8",
                           num_slices=2, decode=False)
  assert report["chips"] == 8 and report["num_slices"] == 2 and report["fits"]
  assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}


def test_fsdp_gathers_parameters_and_scatters_gradients_inside_the_layer_loop():
  base = presets.preset("tiny")
  run = RunOptions(scan_layers=True, remat_policy="minimal", dtype="bfloat16",
                   param_dtype="bfloat16")
  deep = {side: dataclasses.replace(getattr(base, side), num_layers=8, layer_types=None)
          for side in ("encoder", "decoder")}
  report = aot.compile_run(_run(base.replace(**deep), lengths=(512, 512), batch=32,
                                pack=False, run=run), "v5p-8", decode=False)
  coll = report["collectives"]
  # 4 repeats of the (sliding, full) pair per stack: parameters are gathered and gradients
  # reduce-scattered once per layer inside the scanned loops, not all before / after them.
  assert coll["all-gather"]["in_loop"] >= 0.9 * coll["all-gather"]["count"]
  assert coll["reduce-scatter"]["in_loop"] >= 8 * 4
  assert coll["reduce-scatter"]["bytes"] > 0


def test_model_flops_equal_xla_flops_when_nothing_is_masked_away():
  """Full bidirectional attention, no windows, no remat: XLA executes what the model needs
  except the causal decoder's upper triangle (dense) and elementwise work (not matmuls)."""
  stack = dataclasses.replace(
      presets.stack_preset("tiny"), hidden_size=512, intermediate_size=2048, num_heads=4,
      num_kv_heads=4, head_dim=128, query_pre_attn_scalar=128, vocab_size=2048,
      layer_types=(FULL, FULL), attn_logit_softcapping=None, final_logit_softcapping=None)
  cfg = _run(config.T5GemmaConfig(encoder=stack, decoder=stack), lengths=(128, 128), batch=8,
             pack=False)
  fl = aot.compile_run(cfg, "v5litepod-1", decode=False)["flops_per_step"]
  assert abs(fl["xla"] / fl["model_dense_attention"] - 1) < 0.02, fl
  assert fl["model"] < fl["model_dense_attention"]  # the causal half XLA computes anyway


def test_a_run_that_cannot_fit_exits_3_and_find_batch_finds_the_largest(tmp_path):
  # Tiny layers with a 262k vocabulary and 2048 targets: ~2 GiB of logits per row, so a
  # 16 GiB v5e chip holds a handful of rows and the search takes few compiles.
  stack = dataclasses.replace(presets.stack_preset("tiny"), vocab_size=262144)
  model = config.T5GemmaConfig(encoder=stack, decoder=stack)
  model_gin = tmp_path / "big_vocab.gin"
  model_gin.write_text(config.to_gin(model))
  code, out, err = _cli("--topology=v5litepod-1", "--gin_file=runs/demo.gin",
                        f"--gin_file={model_gin}", "--no_decode", "--gin.BATCH_SIZE=16",
                        '--gin.TASK_FEATURE_LENGTHS={"inputs": 128, "targets": 2048}')
  assert code == 3, err
  report = json.loads(out.strip().splitlines()[-1])
  assert report["fits"] is False and report["hbm_per_chip_gib"]["total"] > 16
  assert "fits in HBM:          NO" in out
  cfg = _run(model, lengths=(128, 2048), batch=16, pack=False)
  largest, best = aot.find_batch(cfg, "v5litepod-1")
  assert largest is not None and 0 < largest < 16
  assert best["fits"] and best["batch_size"] == largest  # that batch compiled and fit
  if 2 * largest != 16:  # 16 was shown not to fit above
    assert not aot.compile_run(dataclasses.replace(cfg, batch_size=2 * largest),
                               "v5litepod-1", decode=False)["fits"]


@pytest.mark.parametrize("args,needle", [
    (["--topology=v5p-12"], "v5p-12"),
    (["--topology=v9-8"], "v9-8"),
    (["--topology=v5p-8", "--gin.MeshConfig.ici=(1, 3, 1)"], "MeshConfig.ici"),
])
def test_bad_topology_or_mesh_is_one_line_exit_2(args, needle):
  code, out, err = _cli(*args, "--gin_file=runs/demo.gin")
  assert code == 2
  lines = [line for line in err.splitlines() if line.startswith("t5gemma compile: error")]
  assert len(lines) == 1 and needle in lines[0], err


@pytest.mark.parametrize("prefix_lm,impl", [(True, "xla"), (False, "splash")])
def test_decoder_only_compiles_for_a_tpu(prefix_lm, impl):
  """A decoder-only run (rows of inputs + targets tokens) compiles for a v5p-8, training and
  decoding; a causal one takes the splash kernel (PrefixLM's mask is XLA's only)."""
  run = RunOptions(scan_layers=True, attention_impl=impl, dtype="bfloat16")
  report = aot.compile_run(_run(presets.decoder_only("tiny", prefix_lm=prefix_lm), run=run),
                           "v5p-8")
  assert report["fits"] and report["decode"]["fits"]
  assert report["flops_per_step"]["model"] > 0
