"""Decoder-only Gemma 2 / Gemma 3: logit parity with transformers' Gemma{2,3}ForCausalLM (every
weight random), import and export round trips, the PrefixLM mask, packing, and greedy decoding
equal to transformers' `generate`."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM,
                          Gemma3TextConfig)

from t5gemma_jax import config, decoding, model, presets
from t5gemma_jax.convert import hf
from t5gemma_jax.model import layout
from tests.helpers import hf_reference as ref

S, L = "sliding_attention", "full_attention"
COMMON = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12, sliding_window=4,
              max_position_embeddings=64, attn_implementation="eager")
GEMMA2 = dict(COMMON, num_hidden_layers=3, attn_logit_softcapping=5.0,
              final_logit_softcapping=3.0, layer_types=[S, L, S])
GEMMA3 = dict(COMMON, num_hidden_layers=6, layer_types=[S] * 5 + [L],
              rope_parameters={S: {"rope_type": "default", "rope_theta": 10000.0},
                               L: {"rope_type": "linear", "factor": 8.0,
                                   "rope_theta": 1000000.0}})


def _folder(tmp_path_factory, kind):
  torch.manual_seed(0)
  if kind == "gemma2":
    net = Gemma2ForCausalLM(Gemma2Config(**GEMMA2))
  else:
    net = Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA3))
  net = ref.randomize_(net.eval())
  folder = tmp_path_factory.mktemp(kind) / "hf"
  net.save_pretrained(folder)
  return net, str(folder)


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def causal_lm(request, tmp_path_factory):
  """(kind, eager float32 transformers model with every weight random, its saved folder)."""
  return (request.param, *_folder(tmp_path_factory, request.param))


def _tokens(rng, batch=3, length=11, vocab=256):
  """Random rows, BOS first, right padding of different lengths (row 0 unpadded)."""
  t = rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
  t[:, 0] = 2
  for b in range(1, batch):
    t[b, length - 2 * b:] = 0
  return t


def _hf_logits(net, tokens):
  with torch.no_grad():
    out = net(input_ids=torch.from_numpy(tokens).long(),
              attention_mask=torch.from_numpy(tokens != 0).long())
  return out.logits.float().numpy()


def _ours(cfg, params, tokens, **kw):
  net = model.from_config(cfg, layout.options_for(params))
  return np.asarray(jax.jit(net.apply)({"params": params}, tokens, **kw))


@pytest.mark.parametrize("scan", [False, True])
def test_logits_match_transformers(causal_lm, scan):
  kind, net, folder = causal_lm
  params, cfg = hf.load(folder, scan_layers=scan)
  assert config.is_decoder_only(cfg) and cfg.family == kind and not cfg.prefix_lm
  tokens = _tokens(np.random.default_rng(1))  # 11 tokens: longer than the window of 4
  ours, theirs = _ours(cfg, params, tokens), _hf_logits(net, tokens)
  real = tokens != 0
  assert ours.shape == theirs.shape == (3, 11, 256)
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
  assert np.abs(theirs[real]).max() > 1.0  # the softcaps and norms are exercised


def test_export_round_trip_is_bitwise_and_loads_in_transformers(causal_lm, tmp_path):
  kind, net, folder = causal_lm
  params, cfg = hf.load(folder)
  out = str(tmp_path / "export")
  hf.save(params, cfg, out)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["architectures"] == [type(net).__name__]
  back, cfg2 = hf.load(out)
  assert cfg2 == cfg
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), params, back)
  cls = type(net)
  loaded, info = cls.from_pretrained(out, attn_implementation="eager", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  tokens = _tokens(np.random.default_rng(2))
  real = tokens != 0
  np.testing.assert_array_equal(_hf_logits(loaded.eval(), tokens)[real],
                                _hf_logits(net, tokens)[real])


def _tiny(prefix_lm=False, stack="tiny"):
  cfg = presets.decoder_only(stack, prefix_lm=prefix_lm)
  params = jax.tree_util.tree_map(
      lambda x: x, __import__("flax").linen.meta.unbox(model.init_params(cfg,
                                                                         jax.random.PRNGKey(3))))
  return cfg, params


def test_prefix_lm_mask_is_bidirectional_inside_the_prefix_only():
  cfg, params = _tiny(prefix_lm=True)
  rng = np.random.default_rng(4)
  tokens = rng.integers(3, cfg.vocab_size, size=(1, 12)).astype(np.int32)
  tokens[0, 0] = 2
  prefix = np.zeros_like(tokens)
  prefix[0, :6] = 1  # BOS + 5 input tokens; 6 target positions follow
  base = _ours(cfg, params, tokens, decoder_causal_attention=prefix)
  later_input = tokens.copy()
  later_input[0, 5] += 1  # the last prefix token
  changed = _ours(cfg, params, later_input, decoder_causal_attention=prefix)
  diff = np.abs(changed - base).max(-1)[0]
  assert (diff[:5] > 1e-6).all()  # earlier prefix tokens see it: bidirectional
  assert (diff[6:] > 1e-6).all()  # targets see it causally
  later_target = tokens.copy()
  later_target[0, 9] += 1
  diff = np.abs(_ours(cfg, params, later_target, decoder_causal_attention=prefix)
                - base).max(-1)[0]
  np.testing.assert_array_equal(diff[:9], 0)  # nothing before a target token sees it
  # The same config without prefix_lm is causal everywhere: the prefix feature is ignored.
  causal = cfg.replace(prefix_lm=False)
  diff = np.abs(_ours(causal, params, later_input, decoder_causal_attention=prefix)
                - _ours(causal, params, tokens, decoder_causal_attention=prefix)).max(-1)[0]
  np.testing.assert_array_equal(diff[:5], 0)


@pytest.mark.parametrize("prefix_lm,stack", [(False, "tiny"), (True, "tiny"), (True, "tiny2")])
def test_packed_rows_equal_rows_run_alone(prefix_lm, stack):
  cfg, params = _tiny(prefix_lm, stack)
  rng = np.random.default_rng(5)
  a = rng.integers(3, cfg.vocab_size, size=9).astype(np.int32)
  b = rng.integers(3, cfg.vocab_size, size=13).astype(np.int32)
  a[0] = b[0] = 2
  pa, pb = np.r_[np.ones(4), np.zeros(5)], np.r_[np.ones(7), np.zeros(6)]
  packed = np.r_[a, b, np.zeros(3)].astype(np.int32)[None]
  seg = np.r_[np.ones(9), 2 * np.ones(13), np.zeros(3)].astype(np.int32)[None]
  pos = np.r_[np.arange(9), np.arange(13), np.zeros(3)].astype(np.int32)[None]
  prefix = np.r_[pa, pb, np.zeros(3)].astype(np.int32)[None]
  out = _ours(cfg, params, packed, decoder_segment_ids=seg, decoder_positions=pos,
              decoder_causal_attention=prefix)
  alone_a = _ours(cfg, params, a[None], decoder_causal_attention=pa[None].astype(np.int32))
  alone_b = _ours(cfg, params, b[None], decoder_causal_attention=pb[None].astype(np.int32))
  np.testing.assert_allclose(out[0, :9], alone_a[0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out[0, 9:22], alone_b[0], atol=1e-5, rtol=1e-5)


def test_greedy_decoding_equals_transformers_generate(causal_lm):
  kind, net, folder = causal_lm
  params, cfg = hf.load(folder, scan_layers=True)
  rng = np.random.default_rng(6)
  prompts = rng.integers(3, 256, size=(2, 5)).astype(np.int32)  # BOS is prepended by us
  new = 9  # the prompt plus the new tokens run past the window of 4 (the ring wraps)
  ours = np.asarray(decoding.generate(params, cfg, prompts, max_new_tokens=new))
  with torch.no_grad():
    ids = torch.from_numpy(np.c_[np.full((2, 1), 2), prompts]).long()
    theirs = net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[:, ids.shape[1]:].numpy()
  # EOS (1) may come early in ours; up to it the two agree token for token.
  for row_ours, row_theirs in zip(ours, theirs):
    stop = int(np.argmax(row_ours == 1)) + 1 if (row_ours == 1).any() else new
    np.testing.assert_array_equal(row_ours[:stop], row_theirs[:stop])


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_a_padded_prompt_decodes_as_if_alone(prefix_lm):
  cfg, params = _tiny(prefix_lm)
  rng = np.random.default_rng(7)
  long = rng.integers(3, cfg.vocab_size, size=20).astype(np.int32)  # longer than the window
  short = rng.integers(3, cfg.vocab_size, size=7).astype(np.int32)
  batch = np.zeros((2, 20), np.int32)
  batch[0], batch[1, :7] = long, short
  together = np.asarray(decoding.generate(params, cfg, batch, max_new_tokens=12,
                                          min_new_tokens=12))
  alone = np.asarray(decoding.generate(params, cfg, short[None], max_new_tokens=12,
                                       min_new_tokens=12))
  np.testing.assert_array_equal(together[1], alone[0])
  # Greedy decoding is teacher forcing's argmax, step by step (PrefixLM: prompt = prefix).
  seq = np.r_[2, short, alone[0]].astype(np.int32)[None]
  prefix = np.r_[np.ones(8), np.zeros(12)].astype(np.int32)[None]
  forced = _ours(cfg, params, seq, decoder_causal_attention=prefix).argmax(-1)[0]
  np.testing.assert_array_equal(forced[7:-1], alone[0])
