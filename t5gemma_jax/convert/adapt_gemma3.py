"""T5Gemma 2 params from a Hugging Face Gemma 3 checkpoint, as T5Gemma 2 is adapted from Gemma 3.

`from_gemma3(decoder_only)` reads a `Gemma3ForCausalLM` folder (model_type "gemma3_text") or the
text part of a `Gemma3ForConditionalGeneration` folder (model_type "gemma3"; its SigLIP tower and
projector are skipped with one logged warning):

* encoder and decoder: every layer of the Gemma 3 text stack (q/k norms included), twice. The
  encoder's attention becomes bidirectional simply by running in our encoder; the decoder's
  self-attention becomes merged attention, whose encoder keys reuse its own k/v kernels.
* the one shared table is Gemma 3's embedding; both final norms are its final norm;
* `eoi_embedding` is the table row of `eoi_id` times sqrt(hidden_size): T5Gemma 2 embeds that
  token with this unscaled vector instead of its row, so the token embeds exactly as before.

Nothing is drawn at random, so with an all-padding encoder input the decoder reproduces the
Gemma 3 logits. Names and kernel reshapes come from `param_schema.t5gemma2_params` and `adapt`:
a Gemma 3 tensor name is the T5Gemma 2 one with the `encoder.` / `decoder.` level dropped and
the two self-attention norms renamed, as for Gemma 2 (`adapt.gemma2_name`). Everything is numpy
on tensors read one at a time.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional

import numpy as np

from t5gemma_jax.config import T5GemmaConfig
from t5gemma_jax.convert import adapt, hf_gemma_config, hf_reader, param_schema, safetensors_io
from t5gemma_jax.model import layout
from t5gemma_jax.presets import T5GEMMA2_EOI_ID
from t5gemma_jax.run_options import DTYPES

Params = dict[str, Any]
MODEL_TYPES = ("gemma3_text", "gemma3")
# Text tensors of a multimodal folder: `save_pretrained` (transformers 5.23) writes the legacy
# `language_model.model.*` names; its in-memory state_dict (and some conversions) spell them
# `model.language_model.*`. Both map to the Gemma3ForCausalLM names.
_TEXT_RENAMES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                 ("language_model.lm_head.", "lm_head."))
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")
_EOI = "model.encoder.embed_tokens.eoi_embedding"
log = logging.getLogger(__name__)


def from_gemma3(decoder_only: str, *, eoi_id: int = T5GEMMA2_EOI_ID,
                param_dtype: Optional[str] = None, scan_layers: bool = False,
                seed: int = 0) -> tuple[Params, T5GemmaConfig]:
  """Builds T5Gemma 2 params (encoder and decoder both from one Gemma 3 text stack).

  Args:
    decoder_only: folder with config.json and model.safetensors (or shards and their index) of
      a `Gemma3ForCausalLM` or a `Gemma3ForConditionalGeneration`.
    eoi_id: T5Gemma 2's end-of-image token id (256000 in the released models); must lie inside
      the vocabulary.
    param_dtype: dtype name of the returned params; default the dtype stored in the files,
      float32 when they mix dtypes.
    scan_layers: return the scanned layout (`RunOptions.scan_layers`).
    seed: unused, since every T5Gemma 2 weight has a Gemma 3 source; accepted so callers can
      pass `from_gemma2`'s options unchanged.

  Returns:
    (params, cfg): numpy params in the layout asked for, and the architecture.
    Encoder and decoder layers hold the same (read-only by convention) numpy arrays: nothing is
    copied twice, so copy a leaf before changing it in place.

  Raises:
    FileNotFoundError: the folder, its config.json or its safetensors files are missing.
    ValueError: not a Gemma 3 checkpoint, an option T5Gemma 2 cannot express (attention
      softcapping, bidirectional attention, unsupported RoPE or activation), eoi_id outside the
      vocabulary, tensors missing, unexpected or mis-shaped, or an untied LM head.
  """
  del seed  # see Args
  config_path, hf_config = adapt.read_config(decoder_only)
  text, where = _text_config(hf_config, config_path)
  module = hf_gemma_config.text_module_from_hf(text, text, where)
  if not 0 <= eoi_id < module.vocab_size:
    raise ValueError(f"eoi_id {eoi_id} is outside the vocabulary of {where} (vocab_size "
                     f"{module.vocab_size}); pass an eoi_id below it")
  folder = os.path.dirname(config_path)  # for a hub cache folder, its snapshot
  src = adapt.Source(path=folder, config_path=config_path, hf_config=hf_config, module=module)
  src.tensors = _text_tensors(safetensors_io.read_folder(folder), folder,
                              multimodal=hf_config.get("model_type") == "gemma3")
  if param_dtype is None:
    param_dtype = hf_reader.default_param_dtype(src.tensors)
  ids = {ours: hf_gemma_config.first_id(_field(key, text, hf_config, default))
         for ours, key, default in adapt.SPECIAL_IDS}
  cfg = T5GemmaConfig(encoder=module, decoder=module, merged_attention=True,
                      shared_embedding=True,
                      eoi_id=eoi_id, **ids)

  target = DTYPES[param_dtype]
  params: Params = {}
  taken: dict[str, Optional[np.ndarray]] = {}  # Gemma 3 name -> our array, shared by both stacks
  for p in param_schema.t5gemma2_params(cfg):
    if p.hf_name == _EOI:
      continue  # derived from the table below
    name = adapt.gemma2_name(p.hf_name)
    if name not in taken:
      value = adapt.take(src, p)
      taken[name] = None if value is None else value.astype(target, copy=False)
    if taken[name] is None:
      continue  # reported below, with every other missing tensor
    hf_reader.set_leaf(params, p.path, taken[name])
  _check_complete(src)
  adapt.check_tied_head(src)

  embedder = params["encoder"]["embedder"]
  # HF Gemma 3 scales rows by sqrt(d) cast to float32, then to the weight dtype.
  scale = np.float32(math.sqrt(module.hidden_size)).astype(target)
  embedder["eoi_embedding"] = embedder["embedding"][eoi_id] * scale
  return layout.to_layout(params, cfg, scan_layers), cfg


def _text_config(hf_config: dict, config_path: str) -> tuple[dict, str]:
  """The Gemma 3 text config dict (with layer_types filled in) and its name for messages."""
  model_type = hf_config.get("model_type")
  if model_type == "gemma3":
    text, where = hf_config.get("text_config"), f"{config_path}: text_config"
    if not isinstance(text, dict):
      raise ValueError(f"{config_path}: model_type 'gemma3' but no 'text_config' object")
    if text.get("model_type", "gemma3_text") != "gemma3_text":
      raise ValueError(f"{where}: model_type is {text.get('model_type')!r}, expected "
                       "'gemma3_text'")
  elif model_type == "gemma3_text":
    text, where = hf_config, config_path
  else:
    if model_type == "gemma2":
      hint = ("a Gemma 2 checkpoint: adapt it with t5gemma_jax.convert.adapt.from_gemma2 "
              "(`t5gemma adapt` picks it by model_type)")
    elif model_type in ("t5gemma", "t5gemma2"):
      hint = ("already an encoder-decoder checkpoint: load it with "
              "t5gemma_jax.convert.hf.load (import_hf) instead of adapting it")
    else:
      hint = ("only Gemma3ForCausalLM (gemma3_text) and Gemma3ForConditionalGeneration "
              "(gemma3) checkpoints can be adapted to T5Gemma 2")
    raise ValueError(f"{config_path}: model_type is {model_type!r}, expected one of "
                     f"{MODEL_TYPES}; {hint}")
  if text.get("attn_logit_softcapping") is not None:
    # Gemma 3 would apply it, but T5Gemma 2 has none: the adapted model could not match.
    raise ValueError(f"{where}: attn_logit_softcapping={text['attn_logit_softcapping']} is "
                     "set; T5Gemma 2 has no attention softcapping, so it cannot be adapted")
  text = hf_gemma_config.fill_layer_types(dict(text))
  return text, where


def _field(key: str, text: dict, top: dict, default: Any) -> Any:
  """A special token id: the text config's, else the top level's (multimodal), else default."""
  for d in (text, top):
    if d.get(key) is not None:
      return d[key]
  return default


def _text_tensors(tensors: dict[str, tuple[np.ndarray, str]], path: str, *,
                  multimodal: bool) -> dict[str, tuple[np.ndarray, str]]:
  """Gemma3ForCausalLM names for the text tensors; a multimodal folder's vision ones dropped."""
  if not multimodal:
    return tensors
  out, skipped = {}, 0
  for name, value in tensors.items():
    if name.startswith(_VISION_PREFIXES):
      skipped += 1
      continue
    for prefix, short in _TEXT_RENAMES:
      if name.startswith(prefix):
        name = short + name[len(prefix):]
        break
    out[name] = value
  if skipped:
    log.warning("%s: skipped %d vision tower / multimodal projector tensors (T5Gemma 2 is "
                "adapted from the text stack only)", path, skipped)
  return out


def _check_complete(src: adapt.Source) -> None:
  missing = sorted(src.used - set(src.tensors))
  if missing:
    raise ValueError(f"{src.path}: {len(missing)} Gemma 3 tensors missing from the checkpoint "
                     f"(names after dropping any language_model prefix), e.g. {missing[:5]}")
  unexpected = sorted(set(src.tensors) - src.used - {adapt.LM_HEAD})
  if unexpected:
    raise ValueError(f"{src.path}: {len(unexpected)} unexpected tensors for the Gemma 3 config "
                     f"in {src.config_path}, e.g. {unexpected[:5]}")
