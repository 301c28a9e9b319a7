"""The T5Gemma 2 side of `t5gemma_jax.convert.hf`: its nested config.json and vision tensors.

Its tensor names are in `param_schema.t5gemma2_params`; its text stacks' fields in
`hf_gemma_config.text_module_from_hf`.

Text weights only. `T5Gemma2ForConditionalGeneration` always has a SigLIP vision tower and a
multimodal projector; they are skipped on load (with one logged notice) and absent from what we
save. transformers then loads our folder with those tensors reported missing and initialised at
random, which leaves text logits untouched. config.json gets a tiny placeholder
`vision_config` so that this random tower costs nothing (the default SigLIP has 86M
parameters); see docs/t5gemma2_reference.md §1 and §4.
"""

from __future__ import annotations

import logging

import numpy as np

from t5gemma_jax.config import ModuleConfig, T5GemmaConfig
from t5gemma_jax.convert import hf_gemma_config

MODEL_TYPE = "t5gemma2"
# Tied to model.encoder.embed_tokens.*: transformers neither writes nor needs them.
TIED_KEYS = ("model.decoder.embed_tokens.weight", "model.decoder.embed_tokens.eoi_embedding",
             "lm_head.out_proj.weight")
_VISION_PARTS = ("vision_tower.", "multi_modal_projector.")
_LONG_PREFIX, _SHORT_PREFIX = "model.encoder.text_model.", "model.encoder."
_PLACEHOLDER_VISION = dict(model_type="siglip_vision_model", hidden_size=16,
                           intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, vision_use_head=False)
_PLACEHOLDER_MM_TOKENS = 4  # (28 / 14)^2 patches pooled to 2 x 2 tokens
log = logging.getLogger(__name__)


def check(cfg: T5GemmaConfig) -> None:
  """Raises unless transformers' T5Gemma 2 can express `cfg` exactly."""
  problems = []
  if not (cfg.merged_attention and cfg.shared_embedding and cfg.eoi_id is not None):
    problems.append("merged_attention, shared_embedding and eoi_id must all be set")
  for side in ("encoder", "decoder"):
    m = getattr(cfg, side)
    if not m.qk_norm:
      problems.append(f"{side}.qk_norm must be true")
    if m.attn_logit_softcapping is not None:
      problems.append(f"{side}.attn_logit_softcapping must be None (HF never applies it)")
  if cfg.encoder.encoder_window != "split":
    problems.append("encoder.encoder_window must be 'split'")
  if cfg.cross_attention_layers != "all":
    problems.append("cross_attention_layers must be 'all' (every decoder layer reads the "
                    "encoder in transformers)")
  if problems:
    raise ValueError("not a T5Gemma 2 config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------- config


def config_from_hf(hf: dict, source: str) -> T5GemmaConfig:
  """Builds our config from a transformers `T5Gemma2Config` dict (model_type "t5gemma2")."""
  enc = hf.get("encoder")
  if not isinstance(enc, dict) or not isinstance(enc.get("text_config", {}), dict):
    raise ValueError(f"{source}: missing the 'encoder' sub-config")
  if not isinstance(hf.get("decoder"), dict):
    raise ValueError(f"{source}: missing the 'decoder' sub-config")
  stacks = {"encoder": hf_gemma_config.text_module_from_hf(enc.get("text_config") or {}, hf,
                                                           f"{source}: encoder"),
            "decoder": hf_gemma_config.text_module_from_hf(hf["decoder"], hf,
                                                           f"{source}: decoder")}
  eoi = hf.get("eoi_token_index")
  eoi = enc.get("eoi_token_index", 256_000) if eoi is None else eoi
  dec = hf["decoder"]
  ids = {k: hf.get(k, dec.get(k, default)) for k, default in
         (("pad_token_id", 0), ("eos_token_id", 1), ("bos_token_id", 2))}
  return T5GemmaConfig(**stacks, pad_id=int(ids["pad_token_id"]),
                       eos_id=hf_gemma_config.first_id(ids["eos_token_id"]),
                       bos_id=int(ids["bos_token_id"]), merged_attention=True,
                       shared_embedding=True, eoi_id=int(eoi))


def config_to_hf(cfg: T5GemmaConfig, dtype: str) -> dict:
  """The config.json dict that transformers' `T5Gemma2Config` reads back into `cfg`."""
  check(cfg)
  if (cfg.encoder.dropout_rate, cfg.encoder.attention_dropout) != (
      cfg.decoder.dropout_rate, cfg.decoder.attention_dropout):
    raise ValueError("HF T5Gemma 2 has one dropout_rate / attention_dropout for both stacks; "
                     "the encoder and decoder configs differ")
  ids = {"pad_token_id": cfg.pad_id, "eos_token_id": cfg.eos_id, "bos_token_id": cfg.bos_id}

  def text(m: ModuleConfig, model_type: str) -> dict:
    return dict(hf_gemma_config.gemma3_stack_to_hf(m), model_type=model_type, **ids)

  encoder = {"model_type": "t5gemma2_encoder",
             "text_config": text(cfg.encoder, "t5gemma2_text"),
             "vision_config": dict(_PLACEHOLDER_VISION),
             "mm_tokens_per_image": _PLACEHOLDER_MM_TOKENS, "eoi_token_index": cfg.eoi_id,
             "boi_token_index": cfg.eoi_id - 1, "tie_word_embeddings": True}
  return {
      "architectures": ["T5Gemma2ForConditionalGeneration"], "model_type": MODEL_TYPE,
      "is_encoder_decoder": True, "encoder": encoder,
      "decoder": text(cfg.decoder, "t5gemma2_decoder"), "eoi_token_index": cfg.eoi_id,
      "dropout_rate": cfg.decoder.dropout_rate,
      "attention_dropout": cfg.decoder.attention_dropout, "classifier_dropout_rate": 0.0,
      "tie_word_embeddings": True, "vocab_size": cfg.vocab_size, "dtype": dtype, **ids}


# ------------------------------------------------------------------------------ vision


def is_vision(name: str) -> bool:
  """Whether a transformers parameter name belongs to the vision tower or its projector."""
  return any(part in name for part in _VISION_PARTS)


def text_tensors(tensors: dict[str, tuple[np.ndarray, str]], path: str) -> dict:
  """Drops the vision tensors (one notice) and maps `model.encoder.text_model.*` names, which
  transformers also accepts, to the short form `param_schema.t5gemma2_params` uses."""
  out, skipped = {}, 0
  for name, value in tensors.items():
    if is_vision(name):
      skipped += 1
      continue
    if name.startswith(_LONG_PREFIX):
      name = _SHORT_PREFIX + name[len(_LONG_PREFIX):]
    out[name] = value
  if skipped:
    log.warning("%s: skipped %d vision tower / multimodal projector tensors (text weights "
                "only)", path, skipped)
  return out
