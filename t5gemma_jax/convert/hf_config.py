"""config.json of a Hugging Face T5Gemma or T5Gemma 2 folder <-> our `T5GemmaConfig`.

T5Gemma (model_type "t5gemma") is handled here; T5Gemma 2 ("t5gemma2") in `hf_t5gemma2`, which
these two functions dispatch to, so a reader or writer needs only this module for either family.
"""

from __future__ import annotations

from t5gemma_jax.config import ModuleConfig, T5GemmaConfig
from t5gemma_jax.convert import hf_gemma_config, hf_t5gemma2

CONFIG_NAME = "config.json"
# Our dtype names (`RunOptions.param_dtype`) -> the "dtype" field transformers reads (the same
# spelling today).
HF_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def config_from_hf(hf: dict, source: str = CONFIG_NAME) -> T5GemmaConfig:
  """Builds a `T5GemmaConfig` from an HF T5Gemma (or T5Gemma 2) config dict.

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
  if model_type != "t5gemma":
    hint = (" (a decoder-only Gemma checkpoint: adapt it to an encoder-decoder first)"
            if isinstance(model_type, str) and model_type.startswith("gemma") else "")
    raise ValueError(f"{source}: model_type is {model_type!r}, expected 't5gemma' or "
                     f"'t5gemma2'{hint}")
  stacks = {}
  for side in ("encoder", "decoder"):
    if not isinstance(hf.get(side), dict):
      raise ValueError(f"{source}: missing the '{side}' sub-config")
    stacks[side] = hf_gemma_config.module_from_hf(hf[side], hf, f"{source}: {side}")
  return T5GemmaConfig(encoder=stacks["encoder"], decoder=stacks["decoder"],
                       pad_id=int(hf.get("pad_token_id", 0)),
                       eos_id=hf_gemma_config.first_id(hf.get("eos_token_id", 1)),
                       bos_id=int(hf.get("bos_token_id", 2)))


def config_to_hf(cfg: T5GemmaConfig, dtype: str = "float32") -> dict:
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
  if cfg.family == "t5gemma2":
    return hf_t5gemma2.config_to_hf(cfg, HF_DTYPE[dtype])
  if cfg.has_t5gemma2_features:
    raise ValueError("this config mixes T5Gemma 2 features (qk_norm, two RoPE tables, eoi_id) "
                     "into a T5Gemma 1 model; transformers has no such architecture")
  if cfg.cross_attention_layers != "all":
    raise ValueError("cross_attention_layers must be 'all' for transformers (every T5Gemma "
                     "decoder layer has cross-attention)")

  def module(m: ModuleConfig, is_decoder: bool) -> dict:
    d = {
        "model_type": "t5_gemma_module", "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim, "query_pre_attn_scalar": m.query_pre_attn_scalar,
        "vocab_size": m.vocab_size, "attn_logit_softcapping": m.attn_logit_softcapping,
        "final_logit_softcapping": m.final_logit_softcapping,
        "sliding_window": m.sliding_window, "layer_types": list(m.layer_types),
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "rms_norm_eps": m.rms_norm_eps, "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False, "dropout_rate": m.dropout_rate,
        "attention_dropout": m.attention_dropout, "is_decoder": is_decoder,
        "pad_token_id": cfg.pad_id, "eos_token_id": cfg.eos_id, "bos_token_id": cfg.bos_id,
        "tie_word_embeddings": True,
    }
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
