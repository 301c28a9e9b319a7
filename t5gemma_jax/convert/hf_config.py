"""config.json of a Hugging Face T5Gemma, T5Gemma 2 or decoder-only Gemma folder <-> our config.

T5Gemma (model_type "t5gemma") is handled here; T5Gemma 2 ("t5gemma2") in `hf_t5gemma2`,
Gemma2ForCausalLM / Gemma3ForCausalLM ("gemma2", "gemma3_text") in `hf_causal_lm`, which these
two functions dispatch to, so a reader or writer needs only this module for any family.
"""

from __future__ import annotations

from t5gemma_jax.config import ModelConfig, ModuleConfig, T5GemmaConfig, is_decoder_only
from t5gemma_jax.convert import hf_causal_lm, hf_gemma_config, hf_t5gemma2

CONFIG_NAME = "config.json"
# Our dtype names (`RunOptions.param_dtype`) -> the "dtype" field transformers reads (the same
# spelling today).
HF_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def config_from_hf(hf: dict, source: str = CONFIG_NAME) -> ModelConfig:
  """Builds our config from an HF T5Gemma, T5Gemma 2, Gemma2ForCausalLM or
  Gemma3ForCausalLM config dict (the last two: a `DecoderOnlyConfig`).

  Args:
    hf: the parsed config.json.
    source: where it came from, for error messages.

  Returns:
    The config.

  Raises:
    ValueError: another model_type (a hint for decoder-only Gemma), a missing sub-config or
      field, or an option we do not implement.
  """
  model_type = hf.get("model_type")
  if model_type == hf_t5gemma2.MODEL_TYPE:
    return hf_t5gemma2.config_from_hf(hf, source)
  if model_type in hf_causal_lm.MODEL_TYPES:
    return hf_causal_lm.config_from_hf(hf, source)
  if model_type != "t5gemma":
    hint = (" (a multimodal Gemma 3: only its text part, saved as Gemma3ForCausalLM, loads as "
            "a decoder-only model; `t5gemma adapt` reads it whole)"
            if model_type == "gemma3" else "")
    raise ValueError(f"{source}: model_type is {model_type!r}, expected 't5gemma', "
                     f"'t5gemma2' or a decoder-only {sorted(hf_causal_lm.MODEL_TYPES)}{hint}")
  stacks = {}
  for side in ("encoder", "decoder"):
    if not isinstance(hf.get(side), dict):
      raise ValueError(f"{source}: missing the '{side}' sub-config")
    stacks[side] = hf_gemma_config.module_from_hf(hf[side], hf, f"{source}: {side}")
  return T5GemmaConfig(encoder=stacks["encoder"], decoder=stacks["decoder"],
                       pad_id=int(hf.get("pad_token_id", 0)),
                       eos_id=hf_gemma_config.first_id(hf.get("eos_token_id", 1)),
                       bos_id=int(hf.get("bos_token_id", 2)))


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
  """The config.json dict that transformers' T5GemmaConfig (or T5Gemma2Config) reads back into
  the same model.

  Args:
    cfg: our config.
    dtype: the stored parameters' dtype name (config.json's "dtype").

  Returns:
    The JSON-ready dict.

  Raises:
    ValueError: `cfg` has no transformers counterpart (T5Gemma 2 features in a T5Gemma 1
      model, cross-attention on some layers only, different dropout per stack).
  """
  if is_decoder_only(cfg):
    return hf_causal_lm.config_to_hf(cfg, HF_DTYPE[dtype])
  if cfg.family == "t5gemma2":
    return hf_t5gemma2.config_to_hf(cfg, HF_DTYPE[dtype])
  if cfg.has_t5gemma2_features:
    raise ValueError("this config mixes T5Gemma 2 features (qk_norm, two RoPE tables, eoi_id) "
                     "into a T5Gemma 1 model; transformers has no such architecture")
  if cfg.cross_attention_layers != "all":
    raise ValueError("cross_attention_layers must be 'all' for transformers (every T5Gemma "
                     "decoder layer has cross-attention)")

  def module(m: ModuleConfig, is_decoder: bool) -> dict:
    d = dict(hf_gemma_config.gemma2_stack_to_hf(m), model_type="t5_gemma_module",
             is_decoder=is_decoder, pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id,
             bos_token_id=cfg.bos_id)
    if is_decoder:
      d["cross_attention_hidden_size"] = cfg.encoder.hidden_size
    return d

  if (cfg.encoder.dropout_rate, cfg.encoder.attention_dropout) != (
      cfg.decoder.dropout_rate, cfg.decoder.attention_dropout):
    raise ValueError("HF T5Gemma has one dropout_rate / attention_dropout for both stacks; the "
                     "encoder and decoder configs differ")
  return {
      "architectures": ["T5GemmaForConditionalGeneration"], "model_type": "t5gemma",
      "is_encoder_decoder": True, "encoder": module(cfg.encoder, False),
      "decoder": module(cfg.decoder, True), "dropout_rate": cfg.decoder.dropout_rate,
      "attention_dropout": cfg.decoder.attention_dropout, "classifier_dropout_rate": 0.0,
      "tie_word_embeddings": True, "vocab_size": cfg.vocab_size, "pad_token_id": cfg.pad_id,
      "eos_token_id": cfg.eos_id, "bos_token_id": cfg.bos_id, "dtype": HF_DTYPE[dtype],
  }
