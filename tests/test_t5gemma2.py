"""T5Gemma 2 (text): logit parity with transformers' T5Gemma2ForConditionalGeneration (eager,
float32, every weight random), checks that the comparison bites, HF round trips and scan."""

import json

import jax
import numpy as np
import pytest

from t5gemma_jax import decoding, model
from t5gemma_jax.convert import hf
from tests import hf_reference as ref
from tests.greedy_checks import assert_greedy_is_teacher_forced

S, L = "sliding_attention", "full_attention"
# Encoder: the released 5:1 pattern; decoder: a custom pattern whose period (2) does not divide
# its 5 layers, so the scanned layout keeps a leftover layer. Window 4 < both lengths (14, 9).
ENCODER = dict(num_hidden_layers=6, layer_types=[S, S, S, S, S, L])
DECODER = dict(num_hidden_layers=5, layer_types=[S, L, S, L, S])


def _batch():
  enc, dec = ref.padded_batch(np.random.default_rng(3), 256, batch=3, enc_len=14, dec_len=9)
  enc[0, 4] = enc[2, 1] = ref.T5GEMMA2_EOI  # the unscaled eoi embedding, in both stacks
  dec[1, 3] = ref.T5GEMMA2_EOI
  return enc, dec


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(HF model, its saved folder, its logits on `_batch()`)."""
  hf_model = ref.random_t5gemma2_model(ENCODER, DECODER, seed=0)
  folder = tmp_path_factory.mktemp("t5gemma2") / "hf"
  hf_model.save_pretrained(folder)
  return hf_model, str(folder), ref.logits(hf_model, *_batch())


def _ours(cfg, params):
  return np.asarray(jax.jit(model.T5Gemma(cfg).apply)({"params": params}, *_batch()))


def test_logits_match_transformers(reference):
  _, folder, expected = reference
  params, cfg = hf.load(folder)
  assert cfg.merged_attention and cfg.shared_embedding and cfg.eoi_id == ref.T5GEMMA2_EOI
  assert "embedder" not in params["decoder"]
  assert "cross_attn" not in params["decoder"]["layers_0"]
  diff = float(np.max(np.abs(_ours(cfg, params) - expected)))
  print(f"PARITY t5gemma2: max |logit diff| = {diff:.3e} (logit scale "
        f"{np.abs(expected).max():.2f})")
  assert expected.std() > 0.3, "reference logits too flat for a meaningful comparison"
  assert diff < 1e-4


@pytest.mark.parametrize("change", ["symmetric_window", "no_rope_scaling", "one_rope_theta"])
def test_parity_check_bites(reference, change):
  """Each T5Gemma 1 habit, put back on its own, moves the logits far beyond the tolerance."""
  _, folder, expected = reference
  params, cfg = hf.load(folder)
  stack = {"symmetric_window": dict(encoder_window="symmetric"),
           "no_rope_scaling": dict(rope_scaling_factor=1.0),
           "one_rope_theta": dict(rope_local_theta=None)}[change]
  cfg = cfg.replace(encoder=cfg.encoder.__class__(**{**cfg.encoder.__dict__, **stack}),
                    decoder=cfg.decoder.__class__(**{**cfg.decoder.__dict__, **stack}))
  diff = float(np.max(np.abs(_ours(cfg, params) - expected)))
  print(f"BITE {change}: max |logit diff| = {diff:.3e}")
  assert diff > 1e-2


def test_save_load_round_trip_and_transformers_reload(reference, tmp_path):
  from transformers import T5Gemma2ForConditionalGeneration

  hf_model, folder, expected = reference
  params, cfg = hf.load(folder)
  hf.save(params, cfg, str(tmp_path / "ours"))
  again, cfg2 = hf.load(str(tmp_path / "ours"))
  assert cfg2 == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)
  with open(tmp_path / "ours" / "config.json") as f:
    assert json.load(f)["model_type"] == "t5gemma2"

  reloaded, info = T5Gemma2ForConditionalGeneration.from_pretrained(
      tmp_path / "ours", attn_implementation="eager", output_loading_info=True)
  text_missing = [k for k in info["missing_keys"]
                  if "vision_tower" not in k and "multi_modal_projector" not in k]
  assert not text_missing and not info["unexpected_keys"] and not info["mismatched_keys"], info
  np.testing.assert_array_equal(ref.logits(reloaded.eval(), *_batch()), expected)


def test_scanned_layout_matches_unscanned(reference):
  _, folder, _ = reference
  params, cfg = hf.load(folder)
  scanned, scfg = hf.load(folder, scan_layers=True)
  assert "layers" in scanned["encoder"] and "layers_4" in scanned["decoder"]
  np.testing.assert_allclose(_ours(scfg, scanned), _ours(cfg, params), atol=1e-5, rtol=0)


def _generate_inputs():
  enc = _batch()[0]
  enc[1, 5] = ref.T5GEMMA2_EOI  # a row whose eoi token sits before its padding
  return enc


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_equals_teacher_forced_argmax(reference, scan):
  """20 cached steps (ring of 4 on sliding layers wraps) = the merged-attention forward pass."""
  _, folder, _ = reference
  params, cfg = hf.load(folder, scan_layers=scan)
  enc = _generate_inputs()
  out = np.asarray(decoding.generate(params, cfg, enc, max_new_tokens=20, min_new_tokens=20))
  assert_greedy_is_teacher_forced(cfg, params, enc, out, min_length=20)  # ring of 4 wrapped


def test_greedy_matches_transformers_generate(reference):
  import torch

  hf_model, folder, _ = reference
  params, cfg = hf.load(folder)
  enc = _generate_inputs()
  n = 16
  ours = np.asarray(decoding.generate(params, cfg, enc, max_new_tokens=n))
  with torch.no_grad():
    theirs = hf_model.generate(input_ids=torch.from_numpy(enc).long(),
                               attention_mask=torch.from_numpy(enc != 0).long(),
                               do_sample=False, num_beams=1, max_new_tokens=n,
                               min_new_tokens=0, decoder_start_token_id=cfg.bos_id,
                               eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id).numpy()
  theirs = theirs[:, 1:]  # drop the decoder start token
  theirs = np.pad(theirs, ((0, 0), (0, n - theirs.shape[1])))
  print("GREEDY t5gemma2 ours:", ours.tolist(), "theirs:", theirs.tolist())
  assert (ours != cfg.pad_id).sum() > 12, "too few tokens for a meaningful comparison"
  np.testing.assert_array_equal(ours, theirs)


def test_beam_search_matches_transformers_with_merged_attention(reference):
  """One beam is greedy; four beams (the ring and the encoder part of merged attention's cache
  move with their beams) equal transformers' beam search."""
  import torch

  hf_model = reference[0]
  _, folder, _ = reference
  params, cfg = hf.load(folder)
  enc = _generate_inputs()
  greedy = decoding.generate(params, cfg, enc, max_new_tokens=10)
  one = decoding.generate(params, cfg, enc, max_new_tokens=10, strategy="beam", num_beams=1)
  np.testing.assert_array_equal(np.asarray(one), np.asarray(greedy))
  four = np.asarray(decoding.generate(params, cfg, enc, max_new_tokens=10, strategy="beam",
                                      num_beams=4))
  with torch.no_grad():
    theirs = hf_model.generate(input_ids=torch.from_numpy(enc).long(),
                               attention_mask=torch.from_numpy(enc != 0).long(),
                               do_sample=False, num_beams=4, length_penalty=0.6,
                               max_new_tokens=10, early_stopping=False,
                               decoder_start_token_id=cfg.bos_id, eos_token_id=cfg.eos_id,
                               pad_token_id=cfg.pad_id).numpy()[:, 1:]
  theirs = np.pad(theirs, ((0, 0), (0, 10 - theirs.shape[1])))
  for row_ours, row_theirs in zip(four, theirs):
    hits = np.flatnonzero(row_theirs == cfg.eos_id)
    end = hits[0] + 1 if len(hits) else len(row_theirs)
    np.testing.assert_array_equal(row_ours[:end], row_theirs[:end])
    assert (row_ours[end:] == cfg.pad_id).all()


def test_presets_and_param_counts():
  """270m-270m matches the released text size (0.37B: one table plus two stacks)."""
  import flax.linen as nn
  from t5gemma_jax import config
  counts = {}
  for name in ("270m-270m", "1b-1b", "4b-4b"):
    cfg = config.preset(name, scan_layers=True)
    assert cfg.encoder.layer_types[5] == L and cfg.encoder.layer_period == 6
    counts[name] = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        nn.meta.unbox(model.abstract_params(cfg))))
  assert abs(counts["270m-270m"] / 1e9 - 0.37) < 0.01, counts
  assert abs(counts["1b-1b"] / 1e9 - 1.70) < 0.02, counts
  assert abs(counts["4b-4b"] / 1e9 - 7.1) < 0.1, counts
