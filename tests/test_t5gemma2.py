"""T5Gemma 2 (text): logit parity with transformers' T5Gemma2ForConditionalGeneration (eager,
float32, every weight random), checks that the comparison bites, HF round trips and scan."""

import json

import jax
import numpy as np
import pytest

from t5gemma_jax import decoding, model
from t5gemma_jax.convert import hf
from tests.helpers import hf_reference as ref
from tests.helpers.greedy_checks import assert_greedy_is_teacher_forced
from tests.helpers.nets import net_for

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


def _generation_model(tmp_path_factory, eos_boost: float):
  """(HF model, its saved folder) for decoding: the reference's weights with the shared table
  flattened (x0.3; as drawn, rows soon repeat one token, a fixed point that a broken cache
  reproduces too) and the EOS row scaled by `eos_boost`."""
  import torch

  hf_model = ref.random_t5gemma2_model(ENCODER, DECODER, seed=0)
  table = hf_model.get_input_embeddings().weight
  with torch.no_grad():
    table.mul_(0.3)
    table[1] *= eos_boost
  folder = tmp_path_factory.mktemp("t5gemma2_generate") / "hf"
  hf_model.save_pretrained(folder)
  return hf_model, str(folder)


@pytest.fixture(scope="module")
def generation_reference(tmp_path_factory):
  """EOS made likelier (x3): rows vary, end at different steps, and beam search departs from
  greedy."""
  return _generation_model(tmp_path_factory, eos_boost=3.0)


@pytest.fixture(scope="module")
def varied_reference(tmp_path_factory):
  """EOS as drawn: the teacher-forced argmax (which min_new_tokens does not constrain) never
  picks it in 20 steps, while the rows vary."""
  return _generation_model(tmp_path_factory, eos_boost=1.0)


def _ours(cfg, params):
  return np.asarray(jax.jit(net_for(cfg, params).apply)({"params": params}, *_batch()))


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_greedy_equals_teacher_forced_argmax(varied_reference, scan):
  """20 cached steps (ring of 4 on sliding layers wraps) = the merged-attention forward pass."""
  _, folder = varied_reference
  params, cfg = hf.load(folder, scan_layers=scan)
  enc = _generate_inputs()
  out = np.asarray(decoding.generate(params, cfg, enc, max_new_tokens=20, min_new_tokens=20))
  # Every row runs all 20 steps (min_length below), 5 times the ring of 4, so the ring index
  # wraps 4 times; and the rows are no one-token fixed point that a broken ring reproduces.
  window = cfg.decoder.sliding_window
  assert out.shape[1] >= 5 * window
  assert max(len(set(row.tolist())) for row in out) > 2 * window, out
  assert_greedy_is_teacher_forced(cfg, params, enc, out, min_length=20)


@pytest.mark.slow
def test_greedy_matches_transformers_generate(generation_reference):
  import torch

  hf_model, folder = generation_reference
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


@pytest.mark.slow
def test_beam_search_matches_transformers_with_merged_attention(generation_reference):
  """One beam is greedy; four beams (the ring and the encoder part of merged attention's cache
  move with their beams) equal transformers' beam search."""
  import torch

  hf_model, folder = generation_reference
  params, cfg = hf.load(folder)
  enc = _generate_inputs()
  n = 10
  greedy = np.asarray(decoding.generate(params, cfg, enc, max_new_tokens=n))
  one = decoding.generate(params, cfg, enc, max_new_tokens=n, strategy="beam", num_beams=1)
  np.testing.assert_array_equal(np.asarray(one), greedy)
  four = np.asarray(decoding.generate(params, cfg, enc, max_new_tokens=n, strategy="beam",
                                      num_beams=4, length_penalty=0.6))
  with torch.no_grad():
    theirs = hf_model.generate(input_ids=torch.from_numpy(enc).long(),
                               attention_mask=torch.from_numpy(enc != 0).long(),
                               do_sample=False, num_beams=4, length_penalty=0.6,
                               max_new_tokens=n, early_stopping=False,
                               decoder_start_token_id=cfg.bos_id, eos_token_id=cfg.eos_id,
                               pad_token_id=cfg.pad_id).numpy()[:, 1:]
  theirs = np.pad(theirs, ((0, 0), (0, n - theirs.shape[1])))
  print("BEAM t5gemma2 greedy:", greedy.tolist(), "ours:", four.tolist(),
        "theirs:", theirs.tolist())
  # transformers fills finished beams with `pad_token_id or eos` (EOS when pad is 0): compare
  # up to each row's first EOS and require our padding after it.
  lengths = set()
  for row_ours, row_theirs in zip(four, theirs):
    hits = np.flatnonzero(row_theirs == cfg.eos_id)
    end = hits[0] + 1 if len(hits) else len(row_theirs)
    np.testing.assert_array_equal(row_ours[:end], row_theirs[:end])
    assert (row_ours[end:] == cfg.pad_id).all()
    lengths.add(int(end))
  # Not greedy in disguise, and hypotheses that ended on EOS at different steps (one past the
  # ring of 4) next to one that ran the full length.
  assert (four != greedy).any(), (four, greedy)
  assert len(lengths) == 3 and n in lengths and max(lengths - {n}) > cfg.decoder.sliding_window, \
      lengths


def _transformers_text_param_count(cfg) -> int:
  """Parameters of transformers' T5Gemma2ForConditionalGeneration built (on the meta device)
  from `cfg`'s fields, without the vision tower and projector, tied tables counted once."""
  import torch
  from transformers import T5Gemma2Config, T5Gemma2ForConditionalGeneration

  def text(m):
    return dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
                num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                head_dim=m.head_dim, sliding_window=m.sliding_window,
                layer_types=list(m.layer_types))
  vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
  hf_cfg = T5Gemma2Config(
      encoder=dict(text_config=text(cfg.encoder), vision_config=vision,
                   eoi_token_index=cfg.eoi_id, boi_token_index=cfg.eoi_id - 1),
      decoder=text(cfg.decoder), vocab_size=cfg.vocab_size)
  with torch.device("meta"):
    hf_model = T5Gemma2ForConditionalGeneration(hf_cfg)
  return sum(p.numel() for name, p in hf_model.named_parameters()
             if "vision_tower" not in name and "multi_modal_projector" not in name)


@pytest.mark.slow
def test_presets_and_param_counts():
  """270m-270m (confirmed, config.py) matches the released text size (0.37B: one table plus
  two stacks). 1b-1b and 4b-4b are unconfirmed guesses: no published size to pin, so each
  must equal what transformers builds from the same fields and what the fields imply."""
  import flax.linen as nn
  from t5gemma_jax import presets
  from t5gemma_jax.run_options import RunOptions
  from tests.helpers.param_counts import expected_param_count
  counts = {}
  for name in ("270m-270m", "1b-1b", "4b-4b"):
    cfg = presets.preset(name)
    assert cfg.encoder.layer_types[5] == L and cfg.encoder.layer_period == 6
    counts[name] = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        nn.meta.unbox(model.abstract_params(cfg, RunOptions(scan_layers=True)))))
    hf_count = _transformers_text_param_count(cfg)
    assert counts[name] == hf_count == expected_param_count(cfg), (name, counts[name], hf_count)
  assert abs(counts["270m-270m"] / 1e9 - 0.37) < 0.01, counts
