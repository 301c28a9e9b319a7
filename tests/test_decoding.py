"""Cached decoding against the teacher-forced model and transformers' generate."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from t5gemma_jax import config, decoding, model, presets
from t5gemma_jax.convert import hf
from t5gemma_jax.model import layout
from t5gemma_jax.run_options import RunOptions
from tests.helpers import hf_reference as ref
from tests.helpers.greedy_checks import assert_greedy_is_teacher_forced
from tests.helpers.random_params import random_params


def _cfg():
  # Windows (3 and 4) much shorter than the 24 generated tokens: the ring caches wrap.
  enc = dataclasses.replace(presets.stack_preset("tiny"), num_layers=2, sliding_window=3)
  dec = dataclasses.replace(presets.stack_preset("tiny"), num_layers=3, sliding_window=4,
                            num_kv_heads=1, layer_types=None)
  return config.T5GemmaConfig(encoder=enc, decoder=dec)


def _inputs(b=3, s=12, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(3, 2048, (b, s)).astype(np.int32)
  for row in range(1, b):
    enc[row, s - 3 * row:] = 0  # rows of different lengths
  return enc


def _varied_params(cfg, seed, run=RunOptions()):
  """Random params whose greedy rows vary: as drawn (embeddings ~ N(0, 1/d), scaled by
  sqrt(d) on input and tied to the output) a row soon repeats one token forever, a fixed point
  that a cache which forgets or mixes up positions reproduces as well."""
  params = random_params(cfg, seed=seed, run=run)
  table = params["decoder"]["embedder"]["embedding"]
  params["decoder"]["embedder"]["embedding"] = table * 0.1
  return params


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_greedy_equals_teacher_forced_argmax(scan):
  cfg = _cfg()
  params = _varied_params(cfg, seed=1, run=RunOptions(scan_layers=scan))
  enc = _inputs()
  # min_new_tokens: no row stops early, so every ring (3 and 4 slots) wraps many times.
  out = np.asarray(decoding.generate(params, cfg, enc, max_new_tokens=24, min_new_tokens=24))
  assert out.shape == (3, 24)
  # Every row decodes all 24 tokens, 6 times the decoder's ring of 4 (and not a constant
  # fixed point, which a broken ring could reproduce): the ring index wraps 5 times.
  assert out.shape[1] >= 6 * cfg.decoder.sliding_window
  distinct = [len(set(row.tolist())) for row in out]
  assert min(distinct) > cfg.decoder.sliding_window and max(distinct) > 10, out
  assert_greedy_is_teacher_forced(cfg, params, enc, out, min_length=24)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, dict(scan_layers=True),
                                     dict(scan_layers=True, remat_policy="full")])
def test_decode_steps_equal_teacher_forced_logits(options):
  """The model's cache path, logit for logit: start_decode with a 5-token prefix, then 15
  single steps through rings of 4 slots (decoder) equal the teacher-forced forward pass."""
  cfg, run = _cfg(), RunOptions(**options)
  params = random_params(cfg, seed=8, run=run)
  enc = _inputs()
  dec = np.random.default_rng(1).integers(3, 2048, (3, 20)).astype(np.int32)
  dec[:, 0] = cfg.bos_id
  net = model.T5Gemma(cfg, run)
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
  _assert_rings_wrapped(cache, cfg.decoder.sliding_window, length=20)


def _assert_rings_wrapped(cache, window: int, length: int) -> None:
  """After `length` positions every sliding layer's ring (`window` slots) holds the last
  `window` positions, position p in slot p % window (so it has wrapped length // window - 1
  times), and every full layer's holds all of them in order."""
  rings = [(jax.tree_util.keystr(path), np.asarray(pos))
           for path, pos in jax.tree_util.tree_leaves_with_path(cache)
           if "self_attn" in jax.tree_util.keystr(path) and path[-1].key == "pos"]
  assert rings and length > 2 * window
  wrapped = np.arange(length - window, length)
  wrapped = np.roll(wrapped, (length - window) % window)  # slot s holds the p with p % w == s
  kinds = set()
  for name, pos in rings:
    slots = pos.shape[-1]
    kinds.add(slots)
    want = wrapped if slots == window else np.arange(length)
    assert slots in (window, length), (name, pos.shape)
    np.testing.assert_array_equal(pos, np.broadcast_to(want, pos.shape), err_msg=name)
  assert kinds == {window, length}, kinds  # both kinds of layer were checked


@pytest.mark.slow
def test_scanned_and_unscanned_params_decode_the_same_tokens():
  cfg = _cfg()
  params = _varied_params(cfg, seed=9)
  enc = _inputs()
  kw = dict(max_new_tokens=16, min_new_tokens=16)
  plain = np.asarray(decoding.generate(params, cfg, enc, **kw))
  scanned = layout.scan_params(params, cfg)
  assert "layers" in scanned["decoder"]
  np.testing.assert_array_equal(decoding.generate(scanned, cfg, enc, **kw), plain)
  beams = dict(strategy="beam", num_beams=3, max_new_tokens=10)
  np.testing.assert_array_equal(decoding.generate(scanned, cfg, enc, **beams),
                                decoding.generate(params, cfg, enc, **beams))


@pytest.mark.slow
def test_finished_rows_emit_only_padding():
  cfg = _cfg()
  params = random_params(cfg, seed=2)
  enc = _inputs()
  free = np.asarray(decoding.generate(params, cfg, enc, max_new_tokens=12))
  assert_greedy_is_teacher_forced(cfg, params, enc, free)
  # Declare the token row 0 produced at step 3 to be EOS: each row must stop exactly where the
  # full forward pass (teacher-forced argmax) first predicts it, and pad everything after.
  eos = int(free[0, 3])
  eos_cfg = cfg.replace(eos_id=eos)
  stopped = np.asarray(decoding.generate(params, eos_cfg, enc, max_new_tokens=12))
  assert_greedy_is_teacher_forced(eos_cfg, params, enc, stopped)
  stops = 0
  for row in range(3):
    hits = np.flatnonzero(free[row] == eos)
    own = np.flatnonzero(stopped[row] == eos)
    if len(hits):
      k = hits[0]
      assert list(own) == [k], (row, own, k)  # one EOS, at the reference's first EOS
      np.testing.assert_array_equal(stopped[row, :k + 1], free[row, :k + 1])
      np.testing.assert_array_equal(stopped[row, k + 1:], cfg.pad_id)
      assert k + 1 < stopped.shape[1]  # something after it to be padding
      stops += 1
    else:
      assert len(own) == 0
      np.testing.assert_array_equal(stopped[row], free[row])
  # Row 0 stopped early although it had more to say, and some row did not stop at all.
  assert (free[0, np.flatnonzero(free[0] == eos)[0] + 1:] != cfg.pad_id).all()
  assert 1 <= stops < 3, (free, eos)


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("min_new_tokens", [0, 14])
def test_greedy_matches_transformers_generate(tmp_path, min_new_tokens):
  enc_kw = dict(num_hidden_layers=2, sliding_window=4, num_key_value_heads=2)
  dec_kw = dict(num_hidden_layers=3, sliding_window=3, num_key_value_heads=2)
  hf_model = ref.random_model(enc_kw, dec_kw, seed=11)
  # As drawn, every row repeats one token forever (a fixed point a broken ring reproduces
  # too): flatter decoder embeddings make the rows vary, a likelier EOS ends them at different
  # steps (checked below).
  with torch.no_grad():
    hf_model.model.decoder.embed_tokens.weight.mul_(0.1)
    hf_model.model.decoder.embed_tokens.weight[1] *= 3.0
  hf_model.save_pretrained(tmp_path)
  params, cfg = hf.load(str(tmp_path))
  enc = _inputs(b=3, s=10, seed=4)
  enc = np.where(enc >= 512, enc % 509 + 3, enc).astype(np.int32) * (enc > 0)
  ours = np.asarray(decoding.generate(params, cfg, enc, max_new_tokens=16,
                                      min_new_tokens=min_new_tokens))
  # Rows' lengths (up to and with their first EOS): the longest is over 4 times the decoder's
  # ring of 3 slots (which therefore wraps), with more distinct tokens than the ring holds.
  window = cfg.decoder.sliding_window
  lengths = [int(np.flatnonzero(r == 1)[0]) + 1 if (r == 1).any() else len(r) for r in ours]
  assert max(lengths) > 4 * window, ours
  assert max(len(set(r.tolist())) for r in ours) > 2 * window, ours
  if min_new_tokens:
    assert min(lengths) > min_new_tokens and (ours == 1).any(), ours  # an EOS it delayed
  else:
    assert len(set(lengths)) == 3 and min(lengths) < 4, ours  # EOS at three different steps
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


@pytest.mark.slow
def test_beam_search_with_one_beam_is_greedy():
  cfg = _cfg()
  params = random_params(cfg, seed=7)
  enc = _inputs()
  greedy = decoding.generate(params, cfg, enc, max_new_tokens=12)
  beam = decoding.generate(params, cfg, enc, max_new_tokens=12, strategy="beam", num_beams=1)
  np.testing.assert_array_equal(beam, greedy)


@pytest.mark.slow
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
