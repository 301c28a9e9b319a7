"""config.json of a decoder-only Gemma folder (Gemma2ForCausalLM, Gemma3ForCausalLM) <-> our
`DecoderOnlyConfig`.

Tensor names are in `param_schema.decoder_only_params`; stack fields in `hf_gemma_config`.
A PrefixLM model (`prefix_lm=True`) exports as the plain causal LM transformers has: its
parameters are the same, and transformers computes it exactly on tokens without a prefix.
The flag is kept in config.json ("t5gemma_prefix_lm", which transformers ignores) so that an
import gives the same config back.
"""

from __future__ import annotations

import dataclasses

from t5gemma_jax.config import DecoderOnlyConfig
from t5gemma_jax.convert import hf_gemma_config

# model_type -> the transformers class that loads it.
MODEL_TYPES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
PREFIX_LM_KEY = "t5gemma_prefix_lm"


def config_from_hf(hf: dict, source: str) -> DecoderOnlyConfig:
  """Builds a `DecoderOnlyConfig` from a Gemma 2 or Gemma 3 text config dict.

  Args:
    hf: the parsed config.json (model_type "gemma2" or "gemma3_text").
    source: where it came from, for error messages.

  Raises:
    ValueError: another model_type, a missing field or an option we do not implement.
  """
  model_type = hf.get("model_type")
  if model_type == "gemma2":
    m = dict(hf)
    if m.get("hidden_activation") is None:  # older Gemma configs only name it hidden_act
      m["hidden_activation"] = m.get("hidden_act") or "gelu_pytorch_tanh"
    module = hf_gemma_config.module_from_hf(m, m, source)
  elif model_type == "gemma3_text":
    text = hf_gemma_config.fill_layer_types(dict(hf))
    module = dataclasses.replace(hf_gemma_config.text_module_from_hf(text, text, source),
                                 encoder_window="symmetric")
  else:
    raise ValueError(f"{source}: model_type is {model_type!r}, expected one of "
                     f"{sorted(MODEL_TYPES)}")
  ids = {k: hf.get(k) for k in ("pad_token_id", "eos_token_id", "bos_token_id")}
  return DecoderOnlyConfig(
      decoder=module, pad_id=int(0 if ids["pad_token_id"] is None else ids["pad_token_id"]),
      eos_id=hf_gemma_config.first_id(1 if ids["eos_token_id"] is None else ids["eos_token_id"]),
      bos_id=int(2 if ids["bos_token_id"] is None else ids["bos_token_id"]),
      prefix_lm=bool(hf.get(PREFIX_LM_KEY, False)))


def config_to_hf(cfg: DecoderOnlyConfig, dtype: str) -> dict:
  """The config.json dict that transformers' Gemma2Config / Gemma3TextConfig reads back into
  `cfg`.

  Args:
    cfg: the decoder-only config.
    dtype: the stored parameters' dtype name (config.json's "dtype").
  """
  m = cfg.decoder
  if cfg.family == "gemma3":
    if m.attn_logit_softcapping is not None:
      raise ValueError("a Gemma 3 decoder-only config (qk_norm / rope_local_theta) with "
                       "attn_logit_softcapping set has no transformers counterpart")
    fields, model_type = hf_gemma_config.gemma3_stack_to_hf(m), "gemma3_text"
  else:
    if m.rope_scaling_factor != 1.0:
      raise ValueError("Gemma 2 has one RoPE table without scaling; rope_scaling_factor is "
                       f"{m.rope_scaling_factor}")
    fields, model_type = hf_gemma_config.gemma2_stack_to_hf(m), "gemma2"
  return dict(fields, architectures=[MODEL_TYPES[model_type]], model_type=model_type,
              pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id, bos_token_id=cfg.bos_id,
              dtype=dtype, **{PREFIX_LM_KEY: cfg.prefix_lm})
