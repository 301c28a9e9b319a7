"""The README.md model card of an export, and checkpoints read from a huggingface_hub cache
folder (refs/main, snapshots/<commit>/ symlinks into blobs/)."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import yaml

from t5gemma_jax import config_gin, metrics, presets, run_files, run_history
from t5gemma_jax.convert import (hf, hf_checkpoint, hf_writer, hub_folder, model_card,
                                 params_checkpoint)
from tests.helpers.random_params import random_params

REPO = "models--acme--tiny-t5gemma"
COMMIT = "abc123"
# What `gin.config_str()` writes for a run (the slow test in test_export reads a real one):
# macros, scoped and unscoped bindings, references and a value continued on the next line.
CONFIG_GIN = """\
# Macros:
# ==============================================================================
BATCH_SIZE = 8
LEARNING_RATE = 0.01
MIXTURE_OR_TASK_NAME = 'cldr_translate_en_de'
TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 16}
TRAIN_STEPS = 20

# Parameters for data_settings:
# ==============================================================================
data_settings.builtin_mixture_rates = \\
    {'cldr_translate_en_de': 1.0, 'cldr_translate_en_ru': 1.0}

# Parameters for model_config:
# ==============================================================================
model_config.cfg = @preset()

# Parameters for OptimizerConfig:
# ==============================================================================
OptimizerConfig.name = 'adamw'
OptimizerConfig.weight_decay = 0.01

# Parameters for preset:
# ==============================================================================
preset.dropout_rate = 0.0
preset.name = 'tiny'

# Parameters for ScheduleConfig:
# ==============================================================================
ScheduleConfig.learning_rate = %LEARNING_RATE
ScheduleConfig.name = 'cosine'

# Parameters for TrainConfig:
# ==============================================================================
TrainConfig.batch_size = %BATCH_SIZE
TrainConfig.init_from = '{init_from}'
TrainConfig.mixture_or_task = %MIXTURE_OR_TASK_NAME
TrainConfig.run = @RunOptions()
TrainConfig.task_feature_lengths = %TASK_FEATURE_LENGTHS
TrainConfig.train_steps = %TRAIN_STEPS
"""


def hub_cache(root, folder, repo=REPO, commit=COMMIT, ref=True):
  """`folder`'s files laid out as huggingface_hub keeps them: blobs named by content hash,
  snapshots/<commit>/<file> relative symlinks into them, refs/main naming the commit."""
  repo_dir = root / repo
  (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
  snapshot = repo_dir / "snapshots" / commit
  snapshot.mkdir(parents=True)
  for name in sorted(os.listdir(folder)):
    data = open(os.path.join(folder, name), "rb").read()
    sha = hashlib.sha256(data).hexdigest()
    (repo_dir / "blobs" / sha).write_bytes(data)
    os.symlink(os.path.join("..", "..", "blobs", sha), snapshot / name)
  if ref:
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
  return repo_dir


def front_matter(text):
  assert text.startswith("---\n")
  head, _, body = text[4:].partition("\n---\n")
  return yaml.safe_load(head), body


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  """A tiny T5Gemma saved sharded (an index and several safetensors files)."""
  cfg = presets.preset("tiny")
  out = str(tmp_path_factory.mktemp("plain") / "hf")
  hf.save(random_params(cfg, seed=4), cfg, out, max_shard_bytes=600_000)
  assert "model.safetensors.index.json" in os.listdir(out)
  return out


def test_hf_save_writes_a_card_that_claims_no_training(plain):
  """Params from memory: the architecture and the export, no run, no training invented."""
  meta, body = front_matter(open(os.path.join(plain, "README.md"), encoding="utf-8").read())
  assert meta["license"] == "unknown" and "base_model" not in meta
  assert "model-index" not in meta and meta["pipeline_tag"] == "text2text-generation"
  assert "from params in memory (`t5gemma_jax.convert.hf.save`)" in body
  assert "Not recorded: `t5gemma_jax.convert.hf.save` wrote these params" in body
  assert "No evaluation of these weights is recorded." in body
  assert "| Command | `t5gemma_jax.convert.hf.save` (Python) |" in body
  assert "Source run" not in body and "| Step |" not in body
  cfg = presets.preset("tiny")
  assert f"| Parameters | {sum(x.size for x in _leaves(random_params(cfg, seed=4))):,} |" in body


def _leaves(tree):
  return [leaf for _, leaf in hf_writer.leaves_of(tree)]


def test_a_hub_cache_folder_loads_bitwise_like_the_plain_folder(plain, tmp_path):
  repo_dir = hub_cache(tmp_path, plain)
  snapshot = repo_dir / "snapshots" / COMMIT
  shards = [n for n in os.listdir(snapshot) if n.endswith(".safetensors")]
  assert len(shards) >= 2 and all(os.path.islink(snapshot / n) for n in os.listdir(snapshot))
  expect, cfg = hf.load(plain)
  for path in (repo_dir, snapshot):
    folder = hub_folder.resolve(str(path))
    assert (folder.path, folder.repo_id, folder.revision) == (
        str(snapshot), "acme/tiny-t5gemma", COMMIT)
    params, got_cfg = hf.load(str(path))
    assert got_cfg == cfg
    flat, want = (sorted(hf_writer.leaves_of(p)) for p in (params, expect))
    assert [k for k, _ in flat] == [k for k, _ in want]
    for (k, a), (_, b) in zip(flat, want):
      assert a.dtype == b.dtype and np.array_equal(a, b), k


def test_hub_cache_folders_that_cannot_be_read_are_named(plain, tmp_path):
  repo_dir = hub_cache(tmp_path, plain, ref=False)
  assert hub_folder.resolve(str(repo_dir)).revision == COMMIT  # the only snapshot, no ref
  shutil.copytree(repo_dir / "snapshots" / COMMIT, repo_dir / "snapshots" / "def456",
                  symlinks=True)
  with pytest.raises(ValueError, match=f"2 snapshots \\({COMMIT}, def456\\) and no refs/main"):
    hf.load(str(repo_dir))
  (repo_dir / "refs").mkdir()
  (repo_dir / "refs" / "main").write_text("fff999\n")
  with pytest.raises(FileNotFoundError, match="names snapshot 'fff999'.*abc123"):
    hf.load(str(repo_dir))
  (repo_dir / "refs" / "main").write_text("def456\n")
  assert hub_folder.resolve(str(repo_dir)).revision == "def456"
  # A pruned blob: the snapshot's symlink points nowhere.
  index = repo_dir / "snapshots" / "def456" / "model.safetensors.index.json"
  os.remove(os.path.join(index.parent, os.readlink(index)))
  with pytest.raises(FileNotFoundError, match="model.safetensors.index.json is a symlink to "
                                              "missing files"):
    hf.load(str(repo_dir))
  # The cache's root, and a folder without config.json, are named with what to pass instead.
  with pytest.raises(FileNotFoundError, match=f"no config.json in {tmp_path}.*cache folder.*"
                                              f"{REPO}"):
    hf.load(str(tmp_path))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json in .*empty$"):
    hf.load(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="checkpoint folder not found: .*nowhere"):
    hf.load(str(tmp_path / "nowhere"))


def test_adapt_reads_a_hub_cache_folder_of_gemma2(tmp_path):
  """`adapt` opens its folders through the same resolver (a Gemma 2 written by `hf.save`)."""
  import jax
  from t5gemma_jax import model
  from t5gemma_jax.convert import adapt
  cfg = presets.decoder_only("tiny")
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda a: rng.normal(0, 0.2, a.shape).astype(a.dtype),
                                  model.abstract_params(cfg, boxed=False))
  hf.save(params, cfg, str(tmp_path / "g2"))
  repo_dir = hub_cache(tmp_path, str(tmp_path / "g2"), repo="models--acme--tiny-gemma2")
  want, want_cfg = adapt.from_gemma2(str(tmp_path / "g2"))
  got, got_cfg = adapt.from_gemma2(str(repo_dir))
  assert got_cfg == want_cfg
  for (k, a), (_, b) in zip(sorted(hf_writer.leaves_of(got)), sorted(hf_writer.leaves_of(want))):
    assert np.array_equal(a, b), k


@pytest.fixture(scope="module")
def imported(plain, tmp_path_factory):
  """A run directory imported from a hub cache folder."""
  root = tmp_path_factory.mktemp("imported")
  repo_dir = hub_cache(root, plain)
  run = str(root / "run")
  hf_checkpoint.import_hf(str(repo_dir), run)
  return run


@pytest.mark.slow  # transformers loads the folder (its import and model build: ~9 s)
def test_an_imported_run_exports_with_a_card_naming_its_base_model(imported, tmp_path):
  import torch
  import transformers
  assert run_files.read_source(imported)["folders"][0]["repo_id"] == "acme/tiny-t5gemma"
  out = tmp_path / "tiny-export"
  report = hf_checkpoint.export_checkpoint(imported, str(out), verify=True)
  meta, body = front_matter((out / "README.md").read_text())
  assert meta["library_name"] == "transformers"
  assert meta["pipeline_tag"] == "text2text-generation"
  assert meta["license"] == "unknown" and meta["base_model"] == ["acme/tiny-t5gemma"]
  assert {"t5gemma", "jax"} <= set(meta["tags"]) and "model-index" not in meta
  assert "No training is recorded" in body and f"revision `{COMMIT}`" in body
  assert "No evaluation of these weights is recorded" in body
  assert f"| Step | 0 (`{imported}/checkpoints/0`) |" in body and "(Python)" in body
  assert "AutoModelForSeq2SeqLM" in body
  assert (f"| Verified | transformers' logits on this folder within "
          f"{report['max_abs_logit_diff']:.3g} of t5gemma-jax's (tolerance 0.001) |") in body
  # The card is data transformers ignores: the folder still loads strictly.
  model, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(
      out, dtype=torch.float32, output_loading_info=True)
  assert type(model).__name__ == "T5GemmaForConditionalGeneration"
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_a_trained_run_card_shows_its_training_and_eval_signatures(imported, tmp_path):
  cfg = presets.preset("tiny")
  run = str(tmp_path / "run")
  params_checkpoint.save_params(random_params(cfg, seed=2), cfg, run)
  os.rename(os.path.join(run, "checkpoints", "0"), os.path.join(run, "checkpoints", "12"))
  with open(os.path.join(run, run_files.TRAIN_GIN), "w") as f:
    f.write(CONFIG_GIN.replace("{init_from}", imported))
  with open(os.path.join(run, run_files.METRICS), "w") as f:
    for step, loss in ((10, 4.5), (12, 3.25), (16, 2.0)):
      f.write(json.dumps({"step": step, "loss": loss, "accuracy": 0.5}) + "\n")
    f.write(json.dumps({"step": 12, "validation_loss": 3.5}) + "\n")
  sig = metrics.signatures([metrics.t5_bleu, metrics.chrf])
  rows = [(4, "cldr_translate_en_de", 1.0), (12, "cldr_translate_en_de", 7.5),
          (12, "cldr_translate_en_ru", 2.25), (20, "cldr_translate_en_de", 30.0)]
  with open(os.path.join(run, run_files.EVAL_RESULTS), "w") as f:
    for step, task, bleu in rows:
      f.write(json.dumps({"step": step, "task": task, "split": "validation", "bleu": bleu,
                          "chrf": bleu * 2, "metric_settings": sig}) + "\n")
  out = tmp_path / "tiny-trained"
  hf_checkpoint.export_checkpoint(run, str(out), license="apache-2.0")
  text = (out / "README.md").read_text()
  meta, body = front_matter(text)
  assert meta["license"] == "apache-2.0"
  assert meta["base_model"] == ["acme/tiny-t5gemma"]  # through TrainConfig.init_from
  (entry,) = meta["model-index"]
  scores = {(r["dataset"]["name"], m["type"]): m["value"]
            for r in entry["results"] for m in r["metrics"]}
  assert scores == {("cldr_translate_en_de", "bleu"): 7.5, ("cldr_translate_en_de", "chrf"): 15.0,
                    ("cldr_translate_en_ru", "bleu"): 2.25,
                    ("cldr_translate_en_ru", "chrf"): 4.5}
  escaped = sig["bleu"].replace("|", "\\|")
  assert "|" in sig["bleu"] and "tok:intl" in sig["bleu"]
  assert f"| `cldr_translate_en_de` | validation | 12 | bleu | 7.50 | `{escaped}` |" in body
  assert "Not shown: 1 evaluation of later steps" in body  # step 20 evaluated other weights
  for row in ("| Steps trained | 12 (of 20 planned) |",
              "| Mixture / task | `cldr_translate_en_de` |",
              "| Feature lengths | inputs 32, targets 16 |",
              "| Batch size | 8 sequences per step |",
              "| Optimizer | adamw, weight_decay 0.01 |",
              "| Learning rate | cosine, learning_rate 0.01 |",
              "| Preset | `preset(name='tiny', dropout_rate=0.0)` |",
              "| Last logged (step 12) | loss 3.25, accuracy 0.5 |",
              "| Validation (step 12) | validation_loss 3.5 |",
              f"| Fine-tuned from | `{imported}` |", "| Parameters | 435,584 |",
              "| encoder | 2 | 64 | 128 | 4 | 2 | 16 | 0 |"):
    assert row in body, row
  assert sorted(os.listdir(tmp_path)) == ["run", "tiny-trained"]  # no temporary folder left behind


def test_a_decoder_only_card_and_the_gin_reader():
  cfg = presets.decoder_only("tiny")
  history = run_history.RunHistory(run_dir="/runs/x", step=5)
  facts = model_card.ExportFacts(name="x", cfg=cfg, dtype="bfloat16", parameters=10,
                                 history=history, step_dir="/runs/x/checkpoints/5",
                                 tokenizer=False)
  meta, body = front_matter(model_card.render(facts))
  assert meta["pipeline_tag"] == "text-generation" and "gemma2" in meta["tags"]
  assert "base_model" not in meta and "AutoModelForCausalLM.from_pretrained(path)" in body
  assert "No tokenizer files in this folder" in body and "(Python)" in body
  gin = config_gin.parse_gin(CONFIG_GIN.replace("{init_from}", "/r"))
  assert gin.value("data_settings.builtin_mixture_rates") == {
      "cldr_translate_en_de": 1.0, "cldr_translate_en_ru": 1.0}
  assert gin.value("TrainConfig.batch_size") == 8 and gin.value("TrainConfig.seed") is None
  assert gin.value("TrainConfig.run") == "@RunOptions()"
