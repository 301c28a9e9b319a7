"""Checkpoints in and out: export of a mesh-trained scanned run to transformers, import ->
export bitwise, layouts on restore, memory bound, and bad input."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
import transformers
import yaml

from t5gemma_jax import config, inference, model, params_reader, presets, run_files
from t5gemma_jax.cli import app, gin_setup
from t5gemma_jax.convert import hf, hf_checkpoint, params_checkpoint, safetensors_io
from t5gemma_jax.model import layout
from t5gemma_jax.run_options import RunOptions
from tests.helpers import hf_reference as ref
from tests.helpers.random_params import random_params

pytestmark = pytest.mark.slow  # subprocess runs or long trainings: `make test` only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EIGHT = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())


SCANNED = RunOptions(scan_layers=True)


def _cfg():
  enc = presets.stack_preset("tiny")
  dec = dataclasses.replace(enc, hidden_size=48, intermediate_size=96, num_layers=3,
                            num_kv_heads=1, head_dim=8, query_pre_attn_scalar=8,
                            layer_types=None)
  return config.T5GemmaConfig(encoder=enc, decoder=dec)


def _tensors(folder):
  out = {}
  for name in sorted(os.listdir(folder)):
    if name.endswith(".safetensors"):
      out.update(safetensors_io.load(os.path.join(folder, name)))
  return out


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
  """A tiny scanned model trained 3 steps on a (2, 2, 2) mesh of 8 CPU devices by the CLI."""
  run = tmp_path_factory.mktemp("mesh_run") / "run"
  cmd = [sys.executable, "-m", "t5gemma_jax.cli", "train", "--gin_file=runs/demo.gin",
         f"--gin.MODEL_DIR='{run}'", '--gin.MIXTURE_OR_TASK_NAME="cldr_translate_en_de"',
         '--gin.TASK_FEATURE_LENGTHS={"inputs": 32, "targets": 16}', "--gin.BATCH_SIZE=8",
         "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_PERIOD=3", "--gin.EVAL_PERIOD=0",
         "--gin.WARMUP_STEPS=1",
         "--gin.TrainConfig.eval_tasks=()", "--gin.TrainConfig.progress=False",
         "--gin.RunOptions.scan_layers=True", "--gin.MeshConfig.ici=(2, 2, 2)"]
  proc = subprocess.run(cmd, cwd=REPO, env=EIGHT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "steps 0 -> 3" in proc.stdout, proc.stdout
  return str(run)


def test_mesh_trained_scanned_run_exports_to_transformers(mesh_run, tmp_path, clean_gin):
  out = str(tmp_path / "hf")
  assert app.main(["export", f"--checkpoint_dir={mesh_run}/checkpoints/3",
                    f"--output_dir={out}", "--verify"]) == 0
  files = set(os.listdir(out))
  assert {"config.json", "generation_config.json", "model.safetensors", "README.md"} <= files
  # The model card, from what the CLI's training wrote (config.gin, metrics.jsonl).
  card = open(os.path.join(out, "README.md")).read()
  meta = yaml.safe_load(card.split("---\n")[1])
  assert meta["pipeline_tag"] == "text2text-generation" and meta["license"] == "unknown"
  for text in ("| Steps trained | 3 |", "| Mixture / task | `cldr_translate_en_de` |",
               "| Feature lengths | inputs 32, targets 16 |",
               "| Batch size | 8 sequences per step |", "| Optimizer | adamw",
               "| Preset | `preset(name='tiny'", "| Last logged (step 3) | loss ",
               f"`t5gemma export --checkpoint_dir={mesh_run}/checkpoints/3 ",
               "| Verified | transformers' logits on this folder within "):
    assert text in card, text
  hf_model, info = transformers.T5GemmaForConditionalGeneration.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))

  cfg = run_files.read_model_config(mesh_run)
  assert params_reader.ParamsReader(mesh_run).scanned  # --gin.RunOptions.scan_layers reached it
  params = inference.load_params(cfg, mesh_run, run=SCANNED)  # gathered from the shards
  enc, dec = ref.padded_batch(np.random.default_rng(0), cfg.vocab_size, 3, 20, 12)
  ours = np.asarray(jax.jit(model.T5Gemma(cfg, SCANNED).apply)({"params": params}, enc, dec))
  theirs = ref.logits(hf_model.eval(), enc, dec)
  real = dec != 0
  assert np.max(np.abs(ours - theirs)[real]) < 1e-4

  # The run kept its vocabulary, so the folder carries a tokenizer that encodes as we do.
  assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= files
  vocab = run_files.read_vocabulary(mesh_run)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  text = "translate English to German: Monday <extra_id_0>"
  assert tok(text)["input_ids"] == vocab.encode(text) + [1]


def test_bfloat16_export_and_restore_in_the_other_layout(mesh_run, tmp_path):
  out = str(tmp_path / "bf16")
  report = hf_checkpoint.export_checkpoint(mesh_run, out, dtype="bfloat16", verify=True,
                                           vocabulary=None)
  assert report["scanned"] and report["dtype"] == "bfloat16"
  assert {str(t.dtype) for t in _tensors(out).values()} == {"bfloat16"}
  # The scanned checkpoint restores into the unrolled layout, converted on the device.
  cfg = run_files.read_model_config(mesh_run)
  scanned = inference.load_params(cfg, mesh_run, run=SCANNED)
  assert "layers" in scanned["encoder"]
  unrolled = inference.load_params(cfg, mesh_run)
  expect = layout.unscan_params(jax.device_get(scanned), cfg)
  for a, b in zip(jax.tree_util.tree_leaves(unrolled), jax.tree_util.tree_leaves(expect)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("scan,param_dtype", [(False, "float32"), (True, "bfloat16")])
def test_import_then_export_is_bitwise(tmp_path, scan, param_dtype, clean_gin):
  cfg = _cfg()
  src = str(tmp_path / "src")
  hf.save(random_params(cfg, seed=5, run=RunOptions(param_dtype=param_dtype)), cfg, src)
  run = str(tmp_path / "run")
  flags = ["--scan_layers"] if scan else []
  assert app.main(["import_hf", f"--hf_dir={src}", f"--output_dir={run}", *flags]) == 0
  assert set(os.listdir(run)) >= {"checkpoints", "model.gin", "model_config.json"}
  assert run_files.read_model_config(run) == cfg
  assert params_reader.ParamsReader(run).scanned == scan
  out = str(tmp_path / "out")
  assert app.main(["export", f"--checkpoint_dir={run}", f"--output_dir={out}",
                    "--vocabulary=none"]) == 0
  for name in ("model.safetensors", "config.json"):
    with open(os.path.join(src, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
      assert a.read() == b.read(), name


def test_import_of_a_transformers_folder_decodes_and_its_model_gin_binds(tmp_path, clean_gin):
  hf_model = ref.random_model(dict(num_hidden_layers=2), dict(num_hidden_layers=3), seed=3)
  hf_model.save_pretrained(tmp_path / "hf")
  run = str(tmp_path / "run")
  cfg, dtype = hf_checkpoint.import_hf(str(tmp_path / "hf"), run)
  assert dtype == "float32"
  invocation = app.parse(["show_config", f"--gin_file={run}/model.gin"])
  gin_setup.load("show_config", invocation.args.gin_file, [])
  assert gin_setup.model_config() == cfg
  params = inference.load_params(cfg, run, run=SCANNED)
  enc, dec = ref.padded_batch(np.random.default_rng(1), 512, 2, 16, 8)
  ours = np.asarray(jax.jit(model.T5Gemma(cfg, SCANNED).apply)(
      {"params": params}, enc, dec))
  np.testing.assert_allclose(ours[dec != 0], ref.logits(hf_model, enc, dec)[dec != 0],
                             atol=1e-4)


def test_export_refuses_a_non_empty_folder_and_leaves_nothing_on_failure(mesh_run, tmp_path,
                                                                         clean_gin, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  code = app.main(["export", f"--checkpoint_dir={mesh_run}", f"--output_dir={out}"])
  assert code == 2 and "not empty" in capsys.readouterr().err
  assert os.listdir(out) == ["keep.txt"]
  # A verification that cannot pass: the folder is never moved into place.
  with pytest.raises(ValueError, match="verification failed"):
    hf_checkpoint.export_checkpoint(mesh_run, str(tmp_path / "new"), verify=True,
                                    tolerance=-1.0)
  assert sorted(os.listdir(tmp_path)) == ["out"]
  # --overwrite replaces it.
  assert app.main(["export", f"--checkpoint_dir={mesh_run}", f"--output_dir={out}",
                    "--overwrite", "--vocabulary=none"]) == 0
  assert "keep.txt" not in os.listdir(out)


def test_missing_truncated_and_foreign_inputs_are_named(mesh_run, tmp_path, clean_gin, capsys):
  code = app.main(["export", f"--checkpoint_dir={tmp_path}/nope", f"--output_dir={tmp_path}/o"])
  assert code == 2 and f"{tmp_path}/nope" in capsys.readouterr().err
  # Truncate the data files of a copy of the checkpoint (which file holds the params and which
  # the optimizer state is orbax's business).
  broken = tmp_path / "broken"
  subprocess.run(["cp", "-r", mesh_run, str(broken)], check=True)
  step = broken / "checkpoints" / "3"
  for d, _, names in os.walk(step / "state"):
    for name in names:
      if os.path.basename(d) == "d":
        with open(os.path.join(d, name), "r+b") as f:
          f.truncate(os.path.getsize(os.path.join(d, name)) // 2)
  code = app.main(["export", f"--checkpoint_dir={step}", f"--output_dir={tmp_path}/o"])
  err = capsys.readouterr().err
  assert code == 2 and str(step) in err and "damaged" in err, err
  assert not os.path.exists(tmp_path / "o")
  # A step whose save never completed is not used.
  os.remove(step / "commit_success.txt")
  with pytest.raises(FileNotFoundError, match="never completed"):
    params_reader.ParamsReader(str(step))
  # A decoder-only Gemma folder is read as one: a broken config names the file and the field.
  (tmp_path / "g2").mkdir()
  (tmp_path / "g2" / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
  code = app.main(["import_hf", f"--hf_dir={tmp_path}/g2", f"--output_dir={tmp_path}/r"])
  err = capsys.readouterr().err
  assert code == 2 and "g2/config.json" in err and "missing field 'hidden_size'" in err, err
  assert not os.path.exists(tmp_path / "r")
  # A model config that does not match the checkpoint names the parameters.
  with pytest.raises(ValueError, match="does not match the given model config"):
    hf_checkpoint.export_checkpoint(mesh_run, str(tmp_path / "x"), cfg=presets.preset("s-s"))


_MEMORY = textwrap.dedent("""
    import json, sys
    import numpy as np
    from t5gemma_jax import params_reader
    from t5gemma_jax.convert import hf_checkpoint

    def status(key):
      for line in open("/proc/self/status"):
        if line.startswith(key):
          return int(line.split()[1]) * 1024

    reader = params_reader.ParamsReader(sys.argv[1])
    step = str(reader.step_dir)
    sizes = [int(np.prod(s)) * d.itemsize for s, d in reader.metadata.values()]
    next(reader.iter_params(paths=list(reader.metadata)[:1]))  # warm the reader's code paths
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # the peak (VmHWM) restarts from here
    hf_checkpoint.export_checkpoint(step, sys.argv[2], read_bytes=int(sys.argv[3]))
    print(json.dumps({"model": sum(sizes), "largest": max(sizes),
                      "growth": status("VmHWM") - base}))
""")


def test_export_streams_under_a_memory_bound(tmp_path):
  stack = dataclasses.replace(presets.stack_preset("tiny"), vocab_size=8192, hidden_size=512,
                              num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=1536,
                              num_layers=8, layer_types=None)
  cfg = config.T5GemmaConfig(encoder=stack, decoder=stack)
  params_checkpoint.save_params(random_params(cfg, seed=0, run=SCANNED), cfg,
                                str(tmp_path / "run"))
  proc = subprocess.run([sys.executable, "-c", _MEMORY, str(tmp_path / "run"),
                         str(tmp_path / "out"), str(32 << 20)], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  m = json.loads(proc.stdout.strip().splitlines()[-1])
  print("export memory:", m)
  # 260 MB of parameters: the peak growth stays below the largest tensor plus the model once
  # (reading it whole and converting it would need about twice the model).
  assert m["growth"] <= m["largest"] + m["model"], m
  exported = _tensors(str(tmp_path / "out"))
  assert sum(t.nbytes for t in exported.values()) == m["model"]
