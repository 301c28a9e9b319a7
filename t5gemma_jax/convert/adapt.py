"""T5Gemma params from Hugging Face Gemma 2 decoder-only folders, as the T5Gemma paper adapts them.

`from_gemma2(decoder_only, decoder_from)` reads one or two `Gemma2ForCausalLM` folders
(config.json + model.safetensors, or shards with model.safetensors.index.json):

* encoder: every layer, the embedding and the final norm of `decoder_only` (its attention becomes
  bidirectional simply by running in our encoder);
* decoder: self-attention, MLP, norms, embedding and final norm of the matching layers of
  `decoder_from` (default: the same model);
* cross-attention: copied from the decoder layer's self-attention (projections and the two
  self-attention norms) when the encoder and decoder widths match, otherwise drawn at random
  (fan-in scaled normal, norms at 0, i.e. a multiplier of 1).

Names and (out, in) -> kernel reshapes come from `param_schema.t5gemma_params`: a Gemma 2
tensor name is the T5Gemma one with the `encoder.` / `decoder.` level dropped and two norms
renamed (`gemma2_name`). Everything is
numpy on tensors read one at a time; nothing touches an accelerator. Gemma 3 folders are adapted to
T5Gemma 2 by `adapt_gemma3.from_gemma3`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import numpy as np

from t5gemma_jax.config import ModuleConfig, T5GemmaConfig
from t5gemma_jax.convert import (hf_gemma_config, hf_reader, hub_folder, param_schema,
                                 safetensors_io)
from t5gemma_jax.convert.hf_config import CONFIG_NAME
from t5gemma_jax.model import layout
from t5gemma_jax.run_options import DTYPES

Params = dict[str, Any]
CROSS_ATTENTION_MODES = ("auto", "copy", "random")
LM_HEAD = "lm_head.weight"
# T5Gemma name component -> Gemma 2 name component; cross-attention reads self-attention when
# it is copied.
_RENAME = {"pre_self_attn_layernorm": "input_layernorm",
           "post_self_attn_layernorm": "post_attention_layernorm",
           "pre_cross_attn_layernorm": "input_layernorm",
           "post_cross_attn_layernorm": "post_attention_layernorm",
           "cross_attn": "self_attn"}
# (our config field, the HF config key, its default): the ids one tokenizer fixes for both
# stacks; `adapt_gemma3` reads the same ones.
SPECIAL_IDS = (("pad_id", "pad_token_id", 0), ("eos_id", "eos_token_id", 1),
               ("bos_id", "bos_token_id", 2))


@dataclasses.dataclass
class Source:
  """One decoder-only folder (Gemma 2 here, Gemma 3 in `adapt_gemma3`): its parsed config,
  tensors (read on demand) and the names `take` has read from it.

  Attributes:
    path: the folder.
    config_path: its config.json.
    hf_config: the parsed config.json.
    module: the stack config built from it.
    tensors: {name: (StoredTensor, file)}, once listed (`safetensors_io.read_folder`).
    used: the tensor names asked for so far, to report missing and unexpected ones.
  """

  path: str
  config_path: str
  hf_config: dict
  module: ModuleConfig
  tensors: Optional[dict[str, tuple[np.ndarray, str]]] = None
  used: set = dataclasses.field(default_factory=set)


def from_gemma2(decoder_only: str, decoder_from: Optional[str] = None, *, seed: int = 0,
                param_dtype: Optional[str] = None, cross_attention: str = "auto",
                scan_layers: bool = False) -> tuple[Params, T5GemmaConfig]:
  """Builds encoder-decoder params from one or two Gemma 2 decoder-only checkpoints.

  Args:
    decoder_only: Gemma 2 folder whose layers, embedding and final norm become the encoder.
    decoder_from: Gemma 2 folder for the decoder (default: `decoder_only`). Both must share the
      vocabulary (same vocab_size and special token ids).
    seed: seeds the random cross-attention (when it is not copied).
    param_dtype: dtype name of the returned params; default the dtype stored in the files
      (bfloat16 as `ml_dtypes.bfloat16`), float32 when the files mix dtypes.
    cross_attention: "copy" (from the decoder's self-attention; needs equal encoder and decoder
      widths), "random", or "auto" (copy when the widths match, else random). The cross
      projections always use the decoder's head layout, so the widths are the only constraint.
    scan_layers: return the scanned layout (`RunOptions.scan_layers`).

  Returns:
    (params, cfg): numpy params in the layout asked for, and the architecture.

  Raises:
    FileNotFoundError: a folder, its config.json or its safetensors files are missing.
    ValueError: not a Gemma 2 checkpoint, vocabularies differ, tensors missing, unexpected or
      mis-shaped, or an untied LM head.
  """
  if cross_attention not in CROSS_ATTENTION_MODES:
    raise ValueError(f"from_gemma2: cross_attention must be one of {CROSS_ATTENTION_MODES}, "
                     f"got {cross_attention!r}")

  enc = _open(decoder_only)
  dec = enc if decoder_from is None else _open(decoder_from)
  if os.path.realpath(dec.path) == os.path.realpath(enc.path):  # one folder, however named
    dec = enc
  if enc.module.vocab_size != dec.module.vocab_size:
    raise ValueError(f"vocab_size differs: {enc.module.vocab_size} in {enc.config_path} but "
                     f"{dec.module.vocab_size} in {dec.config_path}; the encoder and decoder "
                     "must share one vocabulary")
  special = _special_ids(enc, dec)

  enc.tensors = safetensors_io.read_folder(enc.path)
  if dec is not enc:
    dec.tensors = safetensors_io.read_folder(dec.path)
  if param_dtype is None:
    param_dtype = hf_reader.default_param_dtype(
        *[s.tensors for s in {id(enc): enc, id(dec): dec}.values()])
  cfg = T5GemmaConfig(encoder=enc.module, decoder=dec.module, **special)

  mode = cross_attention
  if mode == "auto":
    mode = "copy" if cfg.encoder.hidden_size == cfg.decoder.hidden_size else "random"
  if mode == "copy" and cfg.encoder.hidden_size != cfg.decoder.hidden_size:
    raise ValueError(f"cross_attention='copy' needs equal widths, but the encoder "
                     f"({enc.path}) has hidden_size {cfg.encoder.hidden_size} and the decoder "
                     f"({dec.path}) {cfg.decoder.hidden_size}; use 'random' or 'auto'")

  target = DTYPES[param_dtype]
  rng = np.random.default_rng(seed)
  params: Params = {}
  for p in param_schema.t5gemma_params(cfg):
    if mode == "random" and p.group == "cross_attention":
      value = _random(rng, p)
    else:
      value = take(enc if p.path[0] == "encoder" else dec, p)
    if value is None:
      continue  # reported below, with every other missing tensor
    hf_reader.set_leaf(params, p.path, value.astype(target, copy=False))

  _check_complete(enc)
  if dec is not enc:
    _check_complete(dec)
  check_tied_head(dec)
  return layout.to_layout(params, cfg, scan_layers), cfg


def read_config(path: str) -> tuple[str, dict]:
  """(config.json path, parsed config) of a decoder-only folder, with errors naming the file.

  The `t5gemma adapt` CLI reads it to choose between Gemma 2 and Gemma 3 adaptation
  (`adapt_gemma3`). `path` may be a huggingface_hub cache folder (`hub_folder.resolve`): the
  folder the tensors are read from is the config's, `os.path.dirname(config_path)`.
  """
  config_path = os.path.join(
      hub_folder.resolve(path, "decoder-only checkpoint folder").path, CONFIG_NAME)
  with open(config_path) as f:
    try:
      hf_config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_path}: not valid JSON ({e})") from None
  if not isinstance(hf_config, dict):
    raise ValueError(f"{config_path}: expected a JSON object")
  return config_path, hf_config


def _open(path: str) -> Source:
  """Reads and validates a Gemma 2 folder's config.json (tensors are read later)."""
  config_path, hf_config = read_config(path)
  model_type = hf_config.get("model_type")
  if model_type != "gemma2":
    if model_type in ("t5gemma", "t5gemma2"):
      hint = ("it is already an encoder-decoder T5Gemma checkpoint: load it with "
              "t5gemma_jax.convert.hf.load (import_hf) instead of adapting it")
    elif model_type in ("gemma3", "gemma3_text"):
      hint = ("Gemma 3 is not supported by from_gemma2: use "
              "t5gemma_jax.convert.adapt_gemma3.from_gemma3 (`t5gemma adapt` picks it)")
    else:
      hint = ("only Gemma 2 (here) and Gemma 3 (adapt_gemma3.from_gemma3) decoder-only "
              "checkpoints can be adapted")
    raise ValueError(f"{config_path}: model_type is {model_type!r}, expected 'gemma2'; {hint}")
  m = dict(hf_config)
  if m.get("hidden_activation") is None:  # older Gemma configs only name it hidden_act
    m["hidden_activation"] = m.get("hidden_act") or "gelu_pytorch_tanh"
  module = hf_gemma_config.module_from_hf(m, m, config_path)
  return Source(path=os.path.dirname(config_path), config_path=config_path,
                hf_config=hf_config, module=module)


def _special_ids(enc: Source, dec: Source) -> dict[str, int]:
  """pad/eos/bos ids, which the two sources must agree on (one tokenizer feeds both stacks)."""
  out = {}
  for ours, key, default in SPECIAL_IDS:
    values = []
    for s in (enc, dec):
      v = s.hf_config.get(key)
      values.append(default if v is None else hf_gemma_config.first_id(v))
    if values[0] != values[1]:
      raise ValueError(f"{key} differs: {values[0]} in {enc.config_path} but {values[1]} in "
                       f"{dec.config_path}; the encoder and decoder must share one tokenizer")
    out[ours] = values[0]
  return out


def gemma2_name(t5_name: str) -> str:
  """T5Gemma (or T5Gemma 2) name -> the decoder-only Gemma 2 (or Gemma 3) name it comes from.

  E.g. 'model.decoder.layers.3.pre_cross_attn_layernorm.weight' ->
  'model.layers.3.input_layernorm.weight'.
  """
  parts = t5_name.split(".")
  return ".".join(["model"] + [_RENAME.get(p, p) for p in parts[2:]])


def take(source: Source, param: param_schema.Param) -> Optional[np.ndarray]:
  """The decoder-only tensor behind `param` (by `gemma2_name`) in our layout, noted as used.

  Args:
    source: the folder, tensors read.
    param: the T5Gemma / T5Gemma 2 parameter to fill.

  Returns:
    The array, or None when the checkpoint lacks it (reported by the caller's completeness
    check, with every other missing tensor).

  Raises:
    ValueError: the stored shape does not match `source`'s config.
  """
  name = gemma2_name(param.hf_name)
  source.used.add(name)
  return hf_reader.take(source.tensors, name, param, source.config_path)


def _random(rng: np.random.Generator, param: param_schema.Param) -> np.ndarray:
  """A fresh cross-attention parameter: N(0, 1/fan_in) kernels, zero norm scales."""
  shape = param.shape
  if param.kind == param_schema.COPY:  # norm scales; RMSNorm multiplies by 1 + scale
    return np.zeros(shape, np.float32)
  fan_in = shape[0] if param.kind == param_schema.IN else int(np.prod(shape[:-1]))
  return rng.standard_normal(shape, dtype=np.float32) * np.float32(fan_in ** -0.5)


def _check_complete(source: Source) -> None:
  missing = sorted(source.used - set(source.tensors))
  if missing:
    raise ValueError(f"{source.path}: {len(missing)} Gemma 2 tensors missing from the "
                     f"checkpoint, e.g. {missing[:5]}")
  unexpected = sorted(set(source.tensors) - source.used - {LM_HEAD})
  if unexpected:
    raise ValueError(f"{source.path}: {len(unexpected)} unexpected tensors for the Gemma 2 "
                     f"config in {source.config_path}, e.g. {unexpected[:5]}")


def check_tied_head(dec: Source) -> None:
  """An LM head may be stored only as a copy of the embedding: ours is tied to it.

  Only the decoder's source matters; the encoder has no output layer.

  Args:
    dec: the decoder's source, tensors read (Gemma 2 or Gemma 3 names).

  Raises:
    ValueError: `lm_head.weight` is stored and differs from `model.embed_tokens.weight`.
  """
  if LM_HEAD not in dec.tensors:
    return
  head, file_path = dec.tensors[LM_HEAD]
  embed, _ = dec.tensors["model.embed_tokens.weight"]
  if head.shape != embed.shape or head.dtype != embed.dtype or not np.array_equal(head, embed):
    raise ValueError(f"{file_path}: {LM_HEAD} differs from model.embed_tokens.weight (an untied "
                     "LM head); T5Gemma ties the decoder's output layer to its embedding")
