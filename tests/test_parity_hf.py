"""Logit parity with Hugging Face transformers (eager, float32, all weights random)."""

import jax
import numpy as np
import pytest

from t5gemma_jax import model
from t5gemma_jax.convert import hf
from tests.helpers import hf_reference as ref

# name: (encoder overrides, decoder overrides). Sequences are 20 (encoder) and 12 (decoder)
# tokens long, so every sliding window below is shorter than the sequence.
CASES = {
    "balanced_mha": (dict(num_hidden_layers=4), dict(num_hidden_layers=4)),
    "unbalanced_gqa": (
        dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
             num_key_value_heads=2, query_pre_attn_scalar=24, sliding_window=6),
        dict(num_hidden_layers=2, num_key_value_heads=1, sliding_window=3)),
    "softcap_attn2_final5": (
        dict(attn_logit_softcapping=2.0, num_key_value_heads=2),
        dict(attn_logit_softcapping=2.0, final_logit_softcapping=5.0, num_key_value_heads=2)),
    "softcap_attn5_final2": (
        dict(attn_logit_softcapping=5.0, head_dim=32, query_pre_attn_scalar=20),
        dict(attn_logit_softcapping=5.0, final_logit_softcapping=2.0, head_dim=32,
             query_pre_attn_scalar=20)),
    "no_softcap_custom_layers": (
        dict(attn_logit_softcapping=None, num_hidden_layers=3,
             layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
        dict(attn_logit_softcapping=None, final_logit_softcapping=None, rope_theta=500.0)),
}


def _rope(kw):
  # transformers 5 takes rope_theta inside rope_parameters.
  if "rope_theta" in kw:
    kw = dict(kw)
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
  return kw


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
  enc_kw, dec_kw = (_rope(k) for k in CASES[case])
  hf_model = ref.random_model(enc_kw, dec_kw, seed=sorted(CASES).index(case))
  hf_model.save_pretrained(tmp_path / "hf")
  params, cfg = hf.load(str(tmp_path / "hf"))

  enc, dec = ref.padded_batch(np.random.default_rng(1), 512, batch=3, enc_len=20, dec_len=12)
  expected = ref.logits(hf_model, enc, dec)
  got = np.asarray(jax.jit(model.T5Gemma(cfg).apply)({"params": params}, enc, dec))
  diff = float(np.max(np.abs(got - expected)))
  print(f"PARITY {case}: max |logit diff| = {diff:.3e} (logit scale {np.abs(expected).max():.2f})")
  assert expected.std() > 0.3, "reference logits too flat for a meaningful comparison"
  assert diff < 1e-4


def test_saved_folder_loads_in_transformers(tmp_path):
  """Our export loads with no missing or unexpected keys and computes the same logits."""
  from transformers import T5GemmaForConditionalGeneration

  enc_kw, dec_kw = CASES["unbalanced_gqa"]
  hf_model = ref.random_model(enc_kw, dec_kw, seed=7)
  hf_model.save_pretrained(tmp_path / "hf")
  params, cfg = hf.load(str(tmp_path / "hf"))
  hf.save(params, cfg, str(tmp_path / "ours"))

  reloaded, info = T5GemmaForConditionalGeneration.from_pretrained(
      tmp_path / "ours", attn_implementation="eager", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  enc, dec = ref.padded_batch(np.random.default_rng(2), 512, batch=2, enc_len=20, dec_len=12)
  np.testing.assert_array_equal(ref.logits(reloaded.eval(), enc, dec),
                                ref.logits(hf_model, enc, dec))
