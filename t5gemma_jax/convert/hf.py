"""Our params <-> a Hugging Face `T5GemmaForConditionalGeneration` folder, with numpy alone.

T5Gemma 2 folders (model_type "t5gemma2", text weights only) go through the same functions;
their names and nested config live in `hf_t5gemma2`.

`load(path)` reads config.json and model.safetensors (or a sharded set with its index);
`save(params, cfg, path)` writes a folder that transformers loads with no missing or unexpected
keys. Linear weights are (out, in) in HF and (in, ..., out) kernels here; the LM head is tied to
the decoder embedding and is neither stored nor expected.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Optional

import numpy as np

from t5gemma_jax.config import DTYPES, ModuleConfig, T5GemmaConfig
from t5gemma_jax.convert import hf_t5gemma2, safetensors_io
from t5gemma_jax.model import layout

Params = dict[str, Any]
CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TIED_KEYS = ("lm_head.out_proj.weight",)
_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_NORMS = {"pre_self_attn_norm": "pre_self_attn_layernorm",
          "post_self_attn_norm": "post_self_attn_layernorm",
          "pre_cross_attn_norm": "pre_cross_attn_layernorm",
          "post_cross_attn_norm": "post_cross_attn_layernorm",
          "pre_ffw_norm": "pre_feedforward_layernorm",
          "post_ffw_norm": "post_feedforward_layernorm"}
_HF_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


# ----------------------------------------------------------------------------------- config


def config_from_hf(hf: dict, source: str = CONFIG_NAME, **options) -> T5GemmaConfig:
  """Builds a `T5GemmaConfig` from an HF T5Gemma config dict.

  Args:
    hf: the parsed config.json.
    source: where it came from, for error messages.
    **options: run-time fields of T5GemmaConfig (dtype, param_dtype, scan_layers, remat_policy).
  """
  model_type = hf.get("model_type")
  if model_type == hf_t5gemma2.MODEL_TYPE:
    return hf_t5gemma2.config_from_hf(hf, source, **options)
  if model_type != "t5gemma":
    hint = (" (a decoder-only Gemma checkpoint: adapt it to an encoder-decoder first)"
            if isinstance(model_type, str) and model_type.startswith("gemma") else "")
    raise ValueError(f"{source}: model_type is {model_type!r}, expected 't5gemma' or "
                     f"'t5gemma2'{hint}")
  stacks = {}
  for side in ("encoder", "decoder"):
    if not isinstance(hf.get(side), dict):
      raise ValueError(f"{source}: missing the '{side}' sub-config")
    stacks[side] = _module_from_hf(hf[side], hf, f"{source}: {side}")
  return T5GemmaConfig(encoder=stacks["encoder"], decoder=stacks["decoder"],
                       pad_id=int(hf.get("pad_token_id", 0)), eos_id=_first(hf.get("eos_token_id", 1)),
                       bos_id=int(hf.get("bos_token_id", 2)), **options)


def _first(v) -> int:
  return int(v[0] if isinstance(v, (list, tuple)) else v)


def check_supported(m: dict, where: str) -> None:
  """Refuses sub-config options our Gemma blocks do not implement (either model type)."""
  act = m.get("hidden_activation", "gelu_pytorch_tanh")
  if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
    raise ValueError(f"{where}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
  if m.get("attention_bias", False):
    raise ValueError(f"{where}: attention_bias=true is not supported")


def _module_from_hf(m: dict, top: dict, where: str) -> ModuleConfig:
  check_supported(m, where)
  rope = m.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    raise ValueError(f"{where}: rope_type {rope.get('rope_type')!r} is not supported")
  theta = rope.get("rope_theta", m.get("rope_theta", 10000.0))
  try:
    return ModuleConfig(
        hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_layers=m["num_hidden_layers"], num_heads=m["num_attention_heads"],
        num_kv_heads=m["num_key_value_heads"], head_dim=m["head_dim"],
        query_pre_attn_scalar=m["query_pre_attn_scalar"], vocab_size=m["vocab_size"],
        attn_logit_softcapping=m.get("attn_logit_softcapping"),
        final_logit_softcapping=m.get("final_logit_softcapping"),
        sliding_window=m.get("sliding_window"), layer_types=m.get("layer_types"),
        rope_theta=float(theta), rms_norm_eps=float(m.get("rms_norm_eps", 1e-6)),
        dropout_rate=float(top.get("dropout_rate", m.get("dropout_rate", 0.0))),
        attention_dropout=float(top.get("attention_dropout", m.get("attention_dropout", 0.0))))
  except KeyError as e:
    raise ValueError(f"{where}: missing field {e.args[0]!r}") from None


def config_to_hf(cfg: T5GemmaConfig) -> dict:
  """The config.json dict that transformers' T5GemmaConfig (or T5Gemma2Config) reads back into
  the same model."""
  if hf_t5gemma2.matches(cfg):
    return hf_t5gemma2.config_to_hf(cfg, _HF_DTYPE[cfg.param_dtype])
  if cfg.is_t5gemma2:
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
      "eos_token_id": cfg.eos_id, "bos_token_id": cfg.bos_id, "dtype": _HF_DTYPE[cfg.param_dtype],
  }


# ------------------------------------------------------------------------------- name map


def _entries(cfg: T5GemmaConfig) -> Iterator[tuple[str, tuple[str, ...], str, tuple[int, ...]]]:
  """Yields (hf name, our unrolled param path, kind, our shape) for every stored tensor."""
  if hf_t5gemma2.matches(cfg):
    yield from hf_t5gemma2.entries(cfg)
    return
  for side, m in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
    d, f = m.hidden_size, m.intermediate_size
    h, k, dh = m.num_heads, m.num_kv_heads, m.head_dim
    yield f"model.{side}.embed_tokens.weight", (side, "embedder", "embedding"), "copy", (
        m.vocab_size, d)
    yield f"model.{side}.norm.weight", (side, "final_norm", "scale"), "copy", (d,)
    attns = [("self_attn", d)] + ([("cross_attn", cfg.encoder.hidden_size)]
                                  if side == "decoder" else [])
    for i in range(m.num_layers):
      pre, ours = f"model.{side}.layers.{i}", (side, f"layers_{i}")
      for attn, d_kv in attns:
        yield f"{pre}.{attn}.q_proj.weight", ours + (attn, "q", "kernel"), "in", (d, h, dh)
        yield f"{pre}.{attn}.k_proj.weight", ours + (attn, "k", "kernel"), "in", (d_kv, k, dh)
        yield f"{pre}.{attn}.v_proj.weight", ours + (attn, "v", "kernel"), "in", (d_kv, k, dh)
        yield f"{pre}.{attn}.o_proj.weight", ours + (attn, "o", "kernel"), "out", (h, dh, d)
      for name, shape in (("gate", (d, f)), ("up", (d, f)), ("down", (f, d))):
        yield f"{pre}.mlp.{name}_proj.weight", ours + ("mlp", name, "kernel"), "in", shape
      for norm, hf_norm in _NORMS.items():
        if "cross" in norm and side == "encoder":
          continue
        yield f"{pre}.{hf_norm}.weight", ours + (norm, "scale"), "copy", (d,)


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if kind == "copy":
    return shape
  if kind == "in":  # kernel (in, *out) -> weight (prod(out), in)
    return (int(np.prod(shape[1:])), shape[0])
  return (shape[-1], int(np.prod(shape[:-1])))  # "out": kernel (*in, out) -> (out, prod(in))


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "copy":
    return x
  if kind == "in":
    return x.reshape(x.shape[0], -1).T
  return x.reshape(-1, x.shape[-1]).T


def _from_hf(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if kind == "copy":
    return np.array(w)
  return np.ascontiguousarray(w.T).reshape(shape)


# --------------------------------------------------------------------------------- load


def _read_tensors(path: str) -> dict[str, tuple[np.ndarray, str]]:
  """{hf name: (memory-mapped array, file it came from)} for a single or sharded checkpoint."""
  index = os.path.join(path, INDEX_FILE)
  single = os.path.join(path, SINGLE_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: no 'weight_map' object")
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(single):
    files = [SINGLE_FILE]
  else:
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
  out = {}
  for name in files:
    file_path = os.path.join(path, name)
    for key, value in safetensors_io.load(file_path).items():
      out[key] = (value, file_path)
  return out


def load(path: str, **options) -> tuple[Params, T5GemmaConfig]:
  """Reads an HF T5Gemma folder into our params and config.

  Args:
    path: folder with config.json and model.safetensors (or shards + index).
    **options: run-time T5GemmaConfig fields; `scan_layers=True` returns scanned params and
      `param_dtype` casts them (default: the dtype stored in the files).

  Returns:
    (params, cfg): a nested dict of numpy arrays and the config.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint folder not found: {path}")
  config_path = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
  with open(config_path) as f:
    hf_config = json.load(f)
  cfg = config_from_hf(hf_config, config_path)
  tensors = _read_tensors(path)
  tied = set(TIED_KEYS)
  if hf_t5gemma2.matches(cfg):
    tensors = hf_t5gemma2.text_tensors(tensors, path)
    tied |= set(hf_t5gemma2.TIED_KEYS)

  stored = {str(v.dtype) for v, _ in tensors.values()}
  param_dtype = options.pop("param_dtype", None)
  if param_dtype is None:
    param_dtype = stored.pop() if len(stored) == 1 and stored <= set(DTYPES) else "float32"
  cfg = cfg.replace(param_dtype=param_dtype, **options)
  target = DTYPES[param_dtype]

  params: Params = {}
  expected = set()
  for name, ours, kind, shape in _entries(cfg):
    expected.add(name)
    if name not in tensors:
      continue
    w, file_path = tensors[name]
    if tuple(w.shape) != _hf_shape(kind, shape):
      raise ValueError(f"parameter {name} in {file_path}: shape {tuple(w.shape)} does not match "
                       f"{_hf_shape(kind, shape)} implied by {config_path}")
    node = params
    for key in ours[:-1]:
      node = node.setdefault(key, {})
    node[ours[-1]] = _from_hf(kind, w, shape).astype(target, copy=False)
  missing = sorted(expected - set(tensors))
  if missing:
    raise ValueError(f"{path}: {len(missing)} parameters missing from the checkpoint, e.g. "
                     f"{missing[:5]}")
  unexpected = sorted(set(tensors) - expected - tied)
  if unexpected:
    raise ValueError(f"{path}: {len(unexpected)} unexpected tensors (not T5Gemma?), e.g. "
                     f"{unexpected[:5]}")
  return layout.to_layout(params, cfg), cfg


# --------------------------------------------------------------------------------- save


def save(params: Params, cfg: T5GemmaConfig, path: str, *, dtype: Optional[str] = None,
         overwrite: bool = False, max_shard_bytes: int = 5 * 1024**3,
         vocabulary: Any = None) -> None:
  """Writes an HF folder that `T5GemmaForConditionalGeneration.from_pretrained` loads.

  config.json, generation_config.json and safetensors (sharded above `max_shard_bytes`, with
  an index), plus tokenizer files when a SentencePiece `vocabulary` is given. Parameters are
  written one at a time (a device array is fetched only when its turn comes), into a temporary
  folder renamed into place at the end: an interrupted save leaves nothing at `path`.

  Args:
    params: our params, scanned or not, numpy or jax arrays (sharded arrays are gathered one
      leaf at a time).
    cfg: the model config.
    path: destination folder; must be empty or absent unless `overwrite`.
    dtype: stored dtype name (default `cfg.param_dtype`).
    overwrite: replace a non-empty `path`.
    max_shard_bytes: largest safetensors file.
    vocabulary: a seqio SentencePieceVocabulary whose tokenizer files to include.
  """
  from t5gemma_jax.convert import hf_writer  # it builds on this module

  def fill(writer):
    writer.put_tree(params)
    if vocabulary is not None:
      from t5gemma_jax.convert import tokenizer_files
      tokenizer_files.write_tokenizer_files(vocabulary, writer.tmp)

  hf_writer.write_folder(cfg, path, dtype or cfg.param_dtype, fill, overwrite=overwrite,
                         max_shard_bytes=max_shard_bytes)
