"""Our params <-> a Hugging Face `T5GemmaForConditionalGeneration` folder, with numpy alone.

T5Gemma 2 folders (model_type "t5gemma2", text weights only) go through the same functions.

`load(path)` reads config.json and model.safetensors (or a sharded set with its index);
`save(params, cfg, path)` writes a folder that transformers loads with no missing or unexpected
keys. Linear weights are (out, in) in HF and (in, ..., out) kernels here; the LM head is tied to
the decoder embedding and is neither stored nor expected.

The pieces, each importing only those below it: `param_schema` (which tensors, their names and
layouts), `hf_config` / `hf_t5gemma2` / `hf_gemma_config` (config.json), `hf_reader` and
`hf_writer` (tensors <-> params). This module joins them into whole-folder calls.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from t5gemma_jax.config import ModelConfig
from t5gemma_jax.convert import (hf_config, hf_reader, hf_t5gemma2, hf_writer, hub_folder,
                                 model_card, safetensors_io)
from t5gemma_jax.model import layout
from t5gemma_jax.run_options import common_dtype_name

Params = dict[str, Any]


# --------------------------------------------------------------------------------- load


def load(path: str, *, param_dtype: Optional[str] = None,
         scan_layers: bool = False) -> tuple[Params, ModelConfig]:
  """Reads an HF T5Gemma folder into our params and config.

  Args:
    path: folder with config.json and model.safetensors (or shards + index), or a
      huggingface_hub cache folder (`models--org--name`, or its `snapshots/<commit>`; see
      `hub_folder.resolve`).
    param_dtype: the dtype name of the returned params (default: the dtype stored in the
      files; float32 when they mix dtypes).
    scan_layers: return the scanned layout (`RunOptions.scan_layers`).

  Returns:
    (params, cfg): a nested dict of numpy arrays and the architecture.
  """
  path = hub_folder.resolve(path).path
  config_path = os.path.join(path, hf_config.CONFIG_NAME)
  with open(config_path) as f:
    hf_json = json.load(f)
  cfg = hf_config.config_from_hf(hf_json, config_path)
  tensors = safetensors_io.read_folder(path)
  if cfg.family == "t5gemma2":
    tensors = hf_t5gemma2.text_tensors(tensors, path)
  if param_dtype is None:
    param_dtype = hf_reader.default_param_dtype(tensors)
  params = hf_reader.read_params(tensors, cfg, param_dtype, folder=path,
                                 config_path=config_path)
  return layout.to_layout(params, cfg, scan_layers), cfg


# --------------------------------------------------------------------------------- save


def save(params: Params, cfg: ModelConfig, path: str, *, dtype: Optional[str] = None,
         overwrite: bool = False, max_shard_bytes: int = 5 * 1024**3,
         vocabulary: Any = None, license: Optional[str] = None) -> None:
  """Writes an HF folder that `T5GemmaForConditionalGeneration.from_pretrained` loads.

  config.json, generation_config.json and safetensors (sharded above `max_shard_bytes`, with
  an index), plus tokenizer files when a SentencePiece `vocabulary` is given, and a README.md
  model card (`model_card`: the architecture; params from memory record no training, which
  `t5gemma export` of a run directory adds). Parameters are written one at a time (a device
  array is fetched only when its turn comes), into a temporary folder renamed into place at
  the end: an interrupted save leaves nothing at `path`.

  Args:
    params: our params, scanned or not, numpy or jax arrays (sharded arrays are gathered one
      leaf at a time).
    cfg: the model config.
    path: destination folder; must be empty or absent unless `overwrite`.
    dtype: stored dtype name; default the params' own (float32 when they mix dtypes).
    overwrite: replace a non-empty `path`.
    max_shard_bytes: largest safetensors file.
    vocabulary: a seqio SentencePieceVocabulary whose tokenizer files to include.
    license: the license identifier the card's front matter states (None: "unknown").
  """

  def fill(writer):
    writer.put_tree(params)
    if vocabulary is not None:
      # Imported only when needed: it pulls in seqio and sentencepiece.
      from t5gemma_jax.convert import tokenizer_files
      tokenizer_files.write_tokenizer_files(vocabulary, writer.tmp)

  if dtype is None:
    dtype = common_dtype_name(leaf.dtype for _, leaf in hf_writer.leaves_of(params))

  def card(folder: str) -> None:
    parameters = sum(int(np.prod(leaf.shape)) for _, leaf in hf_writer.leaves_of(params))
    facts = model_card.gather(cfg, output_dir=path, dtype=dtype, parameters=parameters,
                              run_dir=None, step=None, step_dir=None,
                              tokenizer=vocabulary is not None, license=license)
    model_card.write(folder, model_card.render(facts))

  hf_writer.write_folder(cfg, path, dtype, fill, overwrite=overwrite,
                         max_shard_bytes=max_shard_bytes, check=card)
