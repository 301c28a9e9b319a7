"""Gemma 3 -> T5Gemma 2 adaptation: the decoder reproduces Gemma3ForCausalLM, the result loads
in transformers' T5Gemma 2 with equal logits, a multimodal folder gives its text part's params,
and bad input is named (through the CLI too)."""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from transformers import (Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration,
                          Gemma3TextConfig)

from t5gemma_jax import model
from t5gemma_jax.convert import adapt_gemma3, hf, safetensors_io
from t5gemma_jax.model import layout
from tests.helpers import hf_reference as ref

S, L = "sliding_attention", "full_attention"
TEXT = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12,
            sliding_window=4, max_position_embeddings=64, layer_types=[S] * 5 + [L],
            rope_parameters={S: {"rope_type": "default", "rope_theta": 10000.0},
                             L: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})
VISION = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
              num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
EOI = ref.T5GEMMA2_EOI  # 250: inside the tiny vocabulary, so the eoi row is exercised
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
  """(eager float32 Gemma3ForCausalLM with every weight random, its saved folder)."""
  torch.manual_seed(0)
  hf_model = ref.randomize_(Gemma3ForCausalLM(
      Gemma3TextConfig(**TEXT, attn_implementation="eager")).eval())
  folder = tmp_path_factory.mktemp("gemma3") / "text"
  hf_model.save_pretrained(folder)
  return hf_model, str(folder)


def _apply(cfg, params, enc, dec):
  return np.asarray(jax.jit(model.T5Gemma(cfg).apply)({"params": params}, enc, dec))


@pytest.mark.slow
def test_adapted_decoder_reproduces_gemma3(gemma3):
  hf_model, folder = gemma3
  params, cfg = adapt_gemma3.from_gemma3(folder, eoi_id=EOI)
  assert cfg.merged_attention and cfg.shared_embedding and cfg.eoi_id == EOI
  assert cfg.encoder == cfg.decoder and cfg.decoder.qk_norm
  assert cfg.decoder.layer_types == tuple(TEXT["layer_types"])
  assert (cfg.decoder.rope_for(S), cfg.decoder.rope_for(L)) == ((1e4, 1.0), (1e6, 8.0))
  assert (cfg.decoder.query_pre_attn_scalar, cfg.decoder.sliding_window) == (12, 4)
  assert (cfg.pad_id, cfg.eos_id, cfg.bos_id) == (0, 1, 2)
  dtypes = {np.dtype(leaf.dtype) for leaf in jax.tree_util.tree_leaves(params)}
  assert dtypes == {np.dtype("float32")}
  assert "embedder" not in params["decoder"]

  state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  for side in ("encoder", "decoder"):
    layer = params[side]["layers_5"]
    np.testing.assert_array_equal(layer["self_attn"]["k"]["kernel"],
                                  state["model.layers.5.self_attn.k_proj.weight"].T.reshape(
                                      32, 2, 16))
    np.testing.assert_array_equal(layer["self_attn"]["q_norm"]["scale"],
                                  state["model.layers.5.self_attn.q_norm.weight"])
    np.testing.assert_array_equal(params[side]["final_norm"]["scale"],
                                  state["model.norm.weight"])
  table = state["model.embed_tokens.weight"]
  np.testing.assert_array_equal(params["encoder"]["embedder"]["embedding"], table)
  np.testing.assert_array_equal(params["encoder"]["embedder"]["eoi_embedding"],
                                table[EOI] * np.float32(np.sqrt(32)))

  # Decoder rows without padding, 12 tokens > window 4, eoi inside; an all-padding encoder
  # input leaves the merged attention no encoder key, so the decoder is Gemma 3 alone.
  rng = np.random.default_rng(0)
  dec = rng.integers(3, 256, size=(2, 12)).astype(np.int32)
  dec[:, 0] = 2
  dec[0, 5] = dec[1, 2] = EOI
  with torch.no_grad():
    expected = hf_model(input_ids=torch.from_numpy(dec).long(),
                        attention_mask=torch.ones(dec.shape, dtype=torch.long)).logits.numpy()
  got = _apply(cfg, params, np.zeros((2, 7), np.int32), dec)
  diff = float(np.max(np.abs(got - expected)))
  print(f"ADAPT gemma3: max |logit diff| vs Gemma3ForCausalLM = {diff:.3e} "
        f"(logit scale {np.abs(expected).max():.2f})")
  assert expected.std() > 0.3, "reference logits too flat for a meaningful comparison"
  assert diff <= 1e-4

  # The check bites: real encoder tokens reach the decoder through the merged attention.
  enc = rng.integers(3, 256, size=(2, 7)).astype(np.int32)
  bite = float(np.max(np.abs(_apply(cfg, params, enc, dec) - expected)))
  print(f"ADAPT gemma3: with a non-padding encoder input, max |logit diff| = {bite:.3e}")
  assert bite > 1e-1


@pytest.mark.slow
def test_adapted_model_loads_in_transformers_t5gemma2(gemma3, tmp_path):
  from transformers import T5Gemma2ForConditionalGeneration

  params, cfg = adapt_gemma3.from_gemma3(gemma3[1], eoi_id=EOI)
  hf.save(params, cfg, str(tmp_path / "t5g2"))
  reloaded, info = T5Gemma2ForConditionalGeneration.from_pretrained(
      tmp_path / "t5g2", attn_implementation="eager", output_loading_info=True)
  text_missing = [k for k in info["missing_keys"]
                  if "vision_tower" not in k and "multi_modal_projector" not in k]
  assert not text_missing and not info["unexpected_keys"] and not info["mismatched_keys"], info

  enc, dec = ref.padded_batch(np.random.default_rng(1), 256, batch=3, enc_len=11, dec_len=9)
  enc[0, 3] = enc[2, 1] = dec[1, 4] = EOI
  expected = ref.logits(reloaded.eval(), enc, dec)
  diff = float(np.max(np.abs(_apply(cfg, params, enc, dec) - expected)))
  print(f"ADAPT gemma3: max |logit diff| vs T5Gemma2ForConditionalGeneration = {diff:.3e} "
        f"(logit scale {np.abs(expected).max():.2f})")
  assert expected.std() > 0.3 and diff <= 1e-4


def _rename(folder, fn):
  path = os.path.join(folder, "model.safetensors")
  tensors = {fn(k): np.array(v) for k, v in safetensors_io.load(path).items()}
  safetensors_io.save(tensors, path, {"format": "pt"})


@pytest.mark.slow
def test_multimodal_folder_adapts_to_its_text_part(gemma3, tmp_path, caplog):
  text_model, folder = gemma3
  torch.manual_seed(1)
  mm = Gemma3ForConditionalGeneration(Gemma3Config(
      text_config=dict(TEXT), vision_config=VISION, mm_tokens_per_image=4,
      attn_implementation="eager")).eval()
  mm.model.language_model.load_state_dict(text_model.model.state_dict())
  mm.save_pretrained(tmp_path / "mm")
  names = safetensors_io.load(str(tmp_path / "mm" / "model.safetensors"))
  assert "language_model.model.norm.weight" in names  # the on-disk spelling of transformers 5.23

  expected, cfg = adapt_gemma3.from_gemma3(folder, eoi_id=EOI)
  with caplog.at_level(logging.WARNING, logger=adapt_gemma3.__name__):
    got, mm_cfg = adapt_gemma3.from_gemma3(str(tmp_path / "mm"), eoi_id=EOI)
  assert mm_cfg == cfg
  assert any("skipped" in r.getMessage() and "vision" in r.getMessage() for r in caplog.records)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)

  # The in-memory spelling (`model.language_model.*`) reads the same.
  _rename(str(tmp_path / "mm"), lambda k: k.replace("language_model.model.",
                                                    "model.language_model."))
  again, _ = adapt_gemma3.from_gemma3(str(tmp_path / "mm"), eoi_id=EOI)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, expected)


def test_scan_layers_and_param_dtype(gemma3):
  flat, cfg = adapt_gemma3.from_gemma3(gemma3[1], eoi_id=EOI, param_dtype="bfloat16")
  scanned, scfg = adapt_gemma3.from_gemma3(gemma3[1], eoi_id=EOI, param_dtype="bfloat16",
                                           scan_layers=True)
  assert scfg == cfg and "layers" in scanned["decoder"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, scanned, layout.scan_params(flat, cfg))
  embedder = flat["encoder"]["embedder"]
  assert str(embedder["eoi_embedding"].dtype) == "bfloat16"
  # As HF embeds in bfloat16: the row times sqrt(32) rounded to bfloat16, product rounded.
  np.testing.assert_array_equal(embedder["eoi_embedding"].astype(np.float32), (
      embedder["embedding"][EOI].astype(np.float32) * np.float32(5.65625)).astype(
          embedder["embedding"].dtype).astype(np.float32))


def _write_config(path, **fields):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(fields, f)
  return str(path)


def test_bad_folders_are_named(gemma3, tmp_path):
  with pytest.raises(FileNotFoundError, match="folder not found: .*nowhere"):
    adapt_gemma3.from_gemma3(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no config.json in .*empty"):
    adapt_gemma3.from_gemma3(str(tmp_path / "empty"))
  with pytest.raises(ValueError, match=r"g2[/\\]config.json: model_type is 'gemma2'.*from_gemma2"):
    adapt_gemma3.from_gemma3(_write_config(tmp_path / "g2", model_type="gemma2"))
  with pytest.raises(ValueError, match="'t5gemma2'.*hf.load"):
    adapt_gemma3.from_gemma3(_write_config(tmp_path / "t5", model_type="t5gemma2"))
  with pytest.raises(ValueError, match=r"sc[/\\]config.json: attn_logit_softcapping=50.0"):
    adapt_gemma3.from_gemma3(_write_config(tmp_path / "sc", **dict(
        TEXT, model_type="gemma3_text", attn_logit_softcapping=50.0)))
  with pytest.raises(ValueError, match=r"text_config: attn_logit_softcapping"):
    adapt_gemma3.from_gemma3(_write_config(tmp_path / "mm", model_type="gemma3", text_config=dict(
        TEXT, attn_logit_softcapping=50.0)))
  with pytest.raises(ValueError, match=r"eoi_id 256000 is outside the vocabulary .*vocab_size 256"):
    adapt_gemma3.from_gemma3(gemma3[1])  # the default eoi id needs the full Gemma vocabulary


def test_bad_tensors_are_named(gemma3, tmp_path):
  folder = str(tmp_path / "g3")
  gemma3[0].save_pretrained(folder)
  path = os.path.join(folder, "model.safetensors")
  good = {k: np.array(v) for k, v in safetensors_io.load(path).items()}

  def write(tensors):
    safetensors_io.save(tensors, path, {"format": "pt"})

  write(dict(good, **{"model.layers.7.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match="1 unexpected tensors .*model.layers.7.extra.weight"):
    adapt_gemma3.from_gemma3(folder, eoi_id=EOI)
  write({k: v for k, v in good.items() if k != "model.layers.4.self_attn.k_norm.weight"})
  with pytest.raises(ValueError, match="1 Gemma 3 tensors missing .*layers.4.self_attn.k_norm"):
    adapt_gemma3.from_gemma3(folder, eoi_id=EOI)
  write(dict(good, **{"lm_head.weight": good["model.embed_tokens.weight"] + 1}))
  with pytest.raises(ValueError, match="lm_head.weight differs .*untied"):
    adapt_gemma3.from_gemma3(folder, eoi_id=EOI)


def _cli(*argv):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  return subprocess.Popen([sys.executable, "-m", "t5gemma_jax.cli", "adapt", *argv], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_cli_bad_input_is_one_line(gemma3, tmp_path):
  llama = _write_config(tmp_path / "llama", model_type="llama")
  cases = {  # name: (argv, substrings of the error line); both run at once to save start-up time
      "missing": ([f"--decoder_only={tmp_path}/nothing"], ["nothing", "not found"]),
      "wrong_type": ([f"--decoder_only={llama}"], ["'llama'", "Gemma 3"]),
  }
  procs = {name: _cli(*argv, f"--output_dir={tmp_path}/out_{name}")
           for name, (argv, _) in cases.items()}
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("t5gemma adapt: error:")]
    print(f"{name}: rc {proc.returncode}: {lines}")
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for text in cases[name][1]:
      assert text in lines[0], (text, lines[0])
    assert not os.path.exists(tmp_path / f"out_{name}")


@pytest.mark.slow
def test_cli_adapt_writes_an_exportable_run(gemma3, tmp_path, capsys, clean_gin):
  from t5gemma_jax.cli import app
  from t5gemma_jax.convert import hf_checkpoint
  folder = gemma3[1]
  # Gemma 2 options are refused for a Gemma 3 folder, before anything is written.
  code = app.main(["adapt", f"--decoder_only={folder}", f"--decoder_from={folder}",
                    "--eoi_id=250", f"--output_dir={tmp_path}/refused"])
  err = capsys.readouterr().err
  assert code == 2 and "--decoder_from: Gemma 2 only" in err, err
  assert not os.path.exists(tmp_path / "refused")

  run = str(tmp_path / "run")
  assert app.main(["adapt", f"--decoder_only={folder}", "--eoi_id=250",
                    f"--output_dir={run}"]) == 0
  hf_checkpoint.export_checkpoint(run, str(tmp_path / "exported"))
  exported, cfg = hf.load(str(tmp_path / "exported"))
  expected, expected_cfg = adapt_gemma3.from_gemma3(folder, eoi_id=EOI)
  assert cfg == expected_cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, exported, expected)
