"""benchmarks/gpu_check.py: the smoke run end to end (every section, with numbers), and the
pieces it cannot show on a CPU: the batch search, the budget's shares, the plan, the report."""

import argparse
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from benchmarks import gpu_check, gpu_check_common as common, gpu_check_jax, gpu_check_report
from benchmarks import train_step
from t5gemma_jax import presets
from t5gemma_jax.train import step as step_lib
from t5gemma_jax.train.losses import LossConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(record: dict, *names):
  for name in names:
    value = record.get(name)
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, record)


@pytest.mark.slow  # about 2-3 minutes on the 2 shared cores here: compiles dominate
def test_smoke_run_writes_every_section_with_numbers(tmp_path):
  proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out",
                         str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads((tmp_path / "gpu_check.json").read_text())
  table = (tmp_path / "gpu_check.txt").read_text()
  assert "train:" in table and "decode:" in table, table
  _positive(report["peak"]["jax"], "matmul_tflops", "copy_tb_s")
  _positive(report["peak"]["torch"], "matmul_tflops")
  for preset, fused in (("tiny", "triton"), ("tiny2", "cudnn")):
    runs = report["train"][preset]["runs"]
    ours = [runs["xla"]] + ([runs[fused]] if fused == "triton" else [])
    for run in ours:
      assert run["status"] == "ok", run
      _positive(run, "batch", "compile_s", "step_s", "tokens_per_s", "tflops",
                "mfu_datasheet", "mfu_measured", "non_padding_tokens")
      assert math.isfinite(run["loss_first"]) and math.isfinite(run["loss_last"])
      assert run["search"][-1]["memory"]["total"] > 0
    assert runs["torch"]["status"] == "ok", runs["torch"]
    _positive(runs["torch"], "batch", "step_s", "tokens_per_s")
    assert runs["torch"]["batch"] == runs["xla"]["batch"]  # side by side: the same batch
    _positive(report["train"][preset]["ratios"], "xla_vs_torch")
  assert runs["cudnn"]["status"] == "n/a"  # no cuDNN on a CPU
  _positive(report["train"]["tiny"]["ratios"], "triton_vs_xla", "triton_vs_torch")
  for preset in ("tiny", "tiny2"):
    entry = report["decode"][preset]
    for batch in ("2",):
      _positive(entry["ours"]["batches"][batch], "compile_s", "tokens_per_s",
                "hbm_bound_tokens_per_s", "bytes_per_step")
      _positive(entry["torch"]["batches"][batch], "tokens_per_s")
      _positive(entry["ratios"], f"batch_{batch}_ours_vs_torch")
  assert len(report["compile_s"]) == 5 and all(v > 0 for v in report["compile_s"].values())
  assert report["notes"] == ["train/tiny2/cudnn: n/a: cuDNN attention needs an NVIDIA GPU"]
  assert report["rerun"] == ""


def test_next_batch_is_the_largest_candidate_the_estimate_fits():
  candidates = (64, 48, 32, 16, 8)
  gib = 2**30
  probe = {"total": 100 * gib, "temp": 80 * gib}  # 20 GiB of state, 1.25 GiB per row
  assert gpu_check_jax.next_batch(candidates, 64, probe, 60 * gib) == 16
  assert gpu_check_jax.next_batch(candidates, 64, probe, 100 * gib) == 48
  assert gpu_check_jax.next_batch(candidates, 64, probe, 10 * gib) == 8  # try the smallest
  assert gpu_check_jax.next_batch(candidates, 8, probe, 10 * gib) is None
  assert gpu_check_jax.next_batch(candidates, 48, {}, None) == 32  # no estimate: step down


def test_the_budget_is_shared_in_proportion_and_later_workers_keep_theirs():
  tasks = [{"weight": 10}, {"weight": 30}]
  process = gpu_check.WEIGHTS["process"]
  first, second = gpu_check.deadlines(tasks, later_weight=60 - process, now=0.0, end=100.0)
  assert first == pytest.approx(100 * (process + 10) / 100)
  assert second == pytest.approx(40 + process)  # the later workers' 60% stays theirs


def test_the_plan_isolates_each_training_run_and_pairs_the_side_by_side_runs():
  workers = gpu_check.plan(common.FULL, gpu_check.PARTS, list(common.FULL.train), True)
  keys = [[t["key"] for t in w["tasks"]] for w in workers]
  assert keys[0] == ["peak/jax"]
  assert ["train/2b-2b/xla"] in keys and ["train/2b-2b/triton"] in keys
  assert ["train/270m-270m/cudnn"] in keys  # cuDNN only where there is no softcap
  tasks = {t["key"]: t for w in workers for t in w["tasks"]}
  assert tasks["train/b-b/triton"]["batch_of"] == "train/b-b/xla"
  assert tasks["train/b-b/torch"]["batch_of"] == "train/b-b/xla"
  assert tasks["train/270m-270m/xla"]["inputs"] == 1024
  assert {w["side"] for w in workers[-2:]} == {"jax", "torch"}  # decoding last
  smoke = gpu_check.plan(common.SMOKE, ("decode",), ["tiny"], False)
  assert [[t["key"] for t in w["tasks"]] for w in smoke] == [
      ["peak/jax", "decode/tiny/ours"], ["peak/torch"]]


def test_report_ratios_table_and_rerun_command():
  ok = dict(status="ok", batch=16, step_s=0.5, compile_s=30.0, tflops=400.0,
            mfu_datasheet=0.4, mfu_measured=0.5, peak_bytes_in_use=2**31)
  results = {
      "peak/jax": {"status": "ok", "matmul_tflops": 800.0, "device": "NVIDIA H200"},
      "train/b-b/xla": {**ok, "tokens_per_s": 1000.0},
      "train/b-b/triton": {**ok, "tokens_per_s": 1500.0},
      "train/b-b/torch": {"status": "ok", "batch": 16, "step_s": 1.0, "tokens_per_s": 500.0,
                          "peak_bytes": 2**32},
      "decode/b-b/ours": {"status": "ok", "batches": {"1": {
          "tokens_per_s": 300.0, "hbm_bound_tokens_per_s": 600.0, "compile_s": 9.0}}},
      "decode/b-b/torch": {"status": "skipped", "note": "time budget"},
  }
  args = argparse.Namespace(smoke=False, budget_s=390.0, parts="", presets="")
  report = gpu_check_report.build(results, args, 0.0, common.FULL)
  ratios = report["train"]["b-b"]["ratios"]
  assert ratios["xla_vs_torch"] == 2.0 and ratios["triton_vs_xla"] == 1.5
  assert report["decode"]["b-b"]["ratios"]["batch_1_ours_of_hbm_bound"] == 0.5
  assert report["compile_s"]["train/b-b/xla"] == 30.0
  assert report["peak_memory_gib"]["train/b-b/torch"] == 4.0
  assert report["rerun"] == ('python3 benchmarks/gpu_check.py --out "$OUT" --parts '
                             'torch_decode --presets b-b --batches b-b=16')
  text = gpu_check_report.table(report)
  assert "1.50x" in text and "2.00x" in text and "torch_decode" in text


def test_one_helper_builds_every_config_with_the_run_options():
  run = common.run_options("triton")
  assert (run.dtype, run.param_dtype, run.scan_layers, run.remat_policy, run.attention_impl) == (
      "bfloat16", "bfloat16", True, "minimal", "triton")
  assert common.model_config("b-b") == presets.preset("b-b")


def test_a_bf16_train_step_keeps_its_state_dtypes():
  """The check runs an ahead-of-time compiled step on its own output: bf16 gradients divided
  by the float32 token count must not turn bf16 Adam moments into float32 (they did)."""
  cfg, run = common.model_config("tiny"), common.run_options()
  opt = train_step.benchmark_optimizer(cfg, run)
  _, abstract, _, _ = train_step.jitted_train_step(cfg, opt, run)
  batch = {k: jax.ShapeDtypeStruct((2, 8), "int32") for k in (
      "encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
      "decoder_loss_weights")}
  train = step_lib.make_train_step(cfg, opt, LossConfig(), run=run)
  out, _ = jax.eval_shape(train, abstract, batch, jax.ShapeDtypeStruct((2,), "uint32"))
  before = [x.dtype for x in jax.tree_util.tree_leaves(abstract)]
  assert [x.dtype for x in jax.tree_util.tree_leaves(out)] == before
