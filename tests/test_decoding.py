"""Cached decoding against the teacher-forced model and transformers' generate."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from t5gemma_jax import config, decoding, model
from t5gemma_jax.convert import hf
from t5gemma_jax.model import layout
from tests import hf_reference as ref
from tests.greedy_checks import assert_greedy_is_teacher_forced
from tests.random_params import random_params


def _cfg(**options):
  # Windows (3 and 4) much shorter than the 24 generated tokens: the ring caches wrap.
  enc = dataclasses.replace(config.stack_preset("tiny"), num_layers=2, sliding_window=3)
  dec = dataclasses.replace(config.stack_preset("tiny"), num_layers=3, sliding_window=4,
                            num_kv_heads=1, layer_types=None)
  return config.T5GemmaConfig(encoder=enc, decoder=dec, **options)


def _inputs(b=3, s=12, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(3, 2048, (b, s)).astype(np.int32)
  for row in range(1, b):
    enc[row, s - 3 * row:] = 0  # rows of different lengths
  return enc


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_equals_teacher_forced_argmax(scan):
  cfg = _cfg(scan_layers=scan)
  params = random_params(cfg, seed=1)
  enc = _inputs()
  # min_new_tokens: no row stops early, so every ring (3 and 4 slots) wraps many times.
  out = np.asarray(decoding.generate(params, cfg, enc, max_new_tokens=24, min_new_tokens=24))
  assert out.shape == (3, 24)
  assert_greedy_is_teacher_forced(cfg, params, enc, out, min_length=24)


@pytest.mark.parametrize("options", [{}, dict(scan_layers=True),
                                     dict(scan_layers=True, remat_policy="full")])
def test_decode_steps_equal_teacher_forced_logits(options):
  """The model's cache path, logit for logit: start_decode with a 5-token prefix, then 15
  single steps through rings of 4 slots (decoder) equal the teacher-forced forward pass."""
  cfg = _cfg(**options)
  params = random_params(cfg, seed=8)
  enc = _inputs()
  dec = np.random.default_rng(1).integers(3, 2048, (3, 20)).astype(np.int32)
  dec[:, 0] = cfg.bos_id
  net = model.T5Gemma(cfg)
  variables = {"params": params}
  expected = np.asarray(net.apply(variables, enc, dec))
  encoded = net.apply(variables, enc, method=net.encode)
  logits, cache = net.apply(variables, encoded, (enc > 0).astype(np.int32), dec[:, :5], 20,
                            method=net.start_decode)
  got = [np.asarray(logits)]
  step = jax.jit(lambda tokens, cache: net.apply(variables, tokens, cache,
                                                 method=net.decode_step))
  for t in range(5, 20):
    logits, cache = step(dec[:, t:t + 1], cache)
    got.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(got, axis=1), expected, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(cache["index"], 20)


def test_scanned_and_unscanned_params_decode_the_same_tokens():
  cfg = _cfg()
  params = random_params(cfg, seed=9)
  enc = _inputs()
  kw = dict(max_new_tokens=16, min_new_tokens=16)
  plain = np.asarray(decoding.generate(params, cfg, enc, **kw))
  scanned_cfg = cfg.replace(scan_layers=True)
  scanned = layout.scan_params(params, scanned_cfg)
  assert "layers" in scanned["decoder"]
  np.testing.assert_array_equal(decoding.generate(scanned, scanned_cfg, enc, **kw), plain)
  beams = dict(strategy="beam", num_beams=3, max_new_tokens=10)
  np.testing.assert_array_equal(decoding.generate(scanned, scanned_cfg, enc, **beams),
                                decoding.generate(params, cfg, enc, **beams))


def test_finished_rows_emit_only_padding():
  cfg = _cfg()
  params = random_params(cfg, seed=2)
  enc = _inputs()
  free = np.asarray(decoding.generate(params, cfg, enc, max_new_tokens=12))
  # Declare the token row 0 produced at step 3 to be EOS: row 0 must stop there and pad, the
  # other rows stop at their own first occurrence of it (or run on unchanged).
  eos = int(free[0, 3])
  stopped = np.asarray(decoding.generate(params, cfg.replace(eos_id=eos), enc,
                                         max_new_tokens=12))
  for row in range(3):
    hits = np.flatnonzero(free[row] == eos)
    if len(hits):
      k = hits[0]
      np.testing.assert_array_equal(stopped[row, :k + 1], free[row, :k + 1])
      assert (stopped[row, k + 1:] == cfg.pad_id).all()
    else:
      np.testing.assert_array_equal(stopped[row], free[row])
  # Row 0 really stopped (at or before step 3) and padded the rest.
  assert (stopped[0] == eos).sum() == 1 and (stopped[0, 4:] == cfg.pad_id).all()
  assert (free[0, 4:] != cfg.pad_id).any()


def test_sampling_is_seeded_and_top_k_one_is_greedy():
  cfg = _cfg()
  params = random_params(cfg, seed=3)
  enc = _inputs()
  kw = dict(max_new_tokens=10, strategy="sample", temperature=1.5)
  a = decoding.generate(params, cfg, enc, seed=1, **kw)
  b = decoding.generate(params, cfg, enc, seed=1, **kw)
  c = decoding.generate(params, cfg, enc, seed=2, **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  greedy = decoding.generate(params, cfg, enc, max_new_tokens=10)
  top1 = decoding.generate(params, cfg, enc, max_new_tokens=10, strategy="sample", top_k=1,
                           seed=5)
  np.testing.assert_array_equal(top1, greedy)
  tiny_p = decoding.generate(params, cfg, enc, max_new_tokens=10, strategy="sample",
                             top_p=1e-6, seed=6)
  np.testing.assert_array_equal(tiny_p, greedy)


def test_bad_arguments_are_named():
  cfg = _cfg()
  with pytest.raises(ValueError, match="strategy 'topk'"):
    decoding.generate({}, cfg, _inputs(), max_new_tokens=4, strategy="topk")
  with pytest.raises(ValueError, match="max_new_tokens"):
    decoding.generate({}, cfg, _inputs(), max_new_tokens=0)


@pytest.mark.parametrize("min_new_tokens", [0, 14])
def test_greedy_matches_transformers_generate(tmp_path, min_new_tokens):
  enc_kw = dict(num_hidden_layers=2, sliding_window=4, num_key_value_heads=2)
  dec_kw = dict(num_hidden_layers=3, sliding_window=3, num_key_value_heads=2)
  hf_model = ref.random_model(enc_kw, dec_kw, seed=11)
  hf_model.save_pretrained(tmp_path)
  params, cfg = hf.load(str(tmp_path))
  enc = _inputs(b=3, s=10, seed=4)
  enc = np.where(enc >= 512, enc % 509 + 3, enc).astype(np.int32) * (enc > 0)
  ours = np.asarray(decoding.generate(params, cfg, enc, max_new_tokens=16,
                                      min_new_tokens=min_new_tokens))
  with torch.no_grad():
    theirs = hf_model.generate(input_ids=torch.from_numpy(enc).long(),
                               attention_mask=torch.from_numpy(enc != 0).long(),
                               do_sample=False, num_beams=1, max_new_tokens=16,
                               min_new_tokens=min_new_tokens, decoder_start_token_id=2,
                               eos_token_id=1,
                               pad_token_id=0).numpy()
  theirs = theirs[:, 1:]  # drop the decoder start token
  theirs = np.pad(theirs, ((0, 0), (0, 16 - theirs.shape[1])))
  np.testing.assert_array_equal(ours, theirs)


def test_beam_search_with_one_beam_is_greedy():
  cfg = _cfg()
  params = random_params(cfg, seed=7)
  enc = _inputs()
  greedy = decoding.generate(params, cfg, enc, max_new_tokens=12)
  beam = decoding.generate(params, cfg, enc, max_new_tokens=12, strategy="beam", num_beams=1)
  np.testing.assert_array_equal(beam, greedy)


@pytest.mark.parametrize("length_penalty", [0.6, 1.0])
def test_beam_search_matches_transformers(tmp_path, length_penalty):
  enc_kw = dict(num_hidden_layers=2, sliding_window=4, num_key_value_heads=2)
  dec_kw = dict(num_hidden_layers=2, sliding_window=3, num_key_value_heads=2)
  hf_model = ref.random_model(enc_kw, dec_kw, seed=12)
  # Flatter output distributions (many beams compete) and a likelier EOS, so hypotheses finish
  # at different lengths and beam search differs from greedy (both checked below).
  with torch.no_grad():
    hf_model.model.decoder.embed_tokens.weight.mul_(0.2)
    hf_model.model.decoder.embed_tokens.weight[1] *= 3.0
  hf_model.save_pretrained(tmp_path)
  params, cfg = hf.load(str(tmp_path))
  enc = _inputs(b=4, s=10, seed=5)
  enc = np.where(enc >= 512, enc % 509 + 3, enc).astype(np.int32) * (enc > 0)
  ours = np.asarray(decoding.generate(params, cfg, enc, max_new_tokens=12, strategy="beam",
                                      num_beams=4, length_penalty=length_penalty))
  with torch.no_grad():
    theirs = hf_model.generate(input_ids=torch.from_numpy(enc).long(),
                               attention_mask=torch.from_numpy(enc != 0).long(),
                               do_sample=False, num_beams=4, length_penalty=length_penalty,
                               max_new_tokens=12, early_stopping=False,
                               decoder_start_token_id=2, eos_token_id=1,
                               pad_token_id=0).numpy()[:, 1:]
  theirs = np.pad(theirs, ((0, 0), (0, 12 - theirs.shape[1])))
  # transformers fills finished beams with `pad_token_id or eos` (EOS when pad is 0): compare
  # up to each row's first EOS and require our padding after it.
  for row_ours, row_theirs in zip(ours, theirs):
    hits = np.flatnonzero(row_theirs == 1)
    end = hits[0] + 1 if len(hits) else len(row_theirs)
    np.testing.assert_array_equal(row_ours[:end], row_theirs[:end])
    assert (row_ours[end:] == 0).all()
  lengths = {int((r != 0).sum()) for r in ours}
  assert len(lengths) > 1, lengths
  greedy = np.asarray(decoding.generate(params, cfg, enc, max_new_tokens=12))
  assert (greedy != ours).any()
