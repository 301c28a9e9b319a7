"""What a run directory records besides its checkpoints: the model, the vocabulary, where its
weights came from, and the names of the logs a training writes there.

`train`, `import_hf` and `adapt` write them; `export` reads them, so an exported folder needs
no gin file, carries the tokenizer the run was trained with and a model card saying how the
run was made. Local or remote (gs://) paths.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from t5gemma_jax import atomic, config, storage

MODEL_CONFIG = "model_config.json"
MODEL_GIN = "model.gin"
VOCABULARY = "vocabulary.model"
VOCABULARY_INFO = "vocabulary.json"
SOURCE = "source.json"  # `import_hf` / `adapt`: the folders the weights were read from
# What `train` and `eval` write (read back by `run_history`).
TRAIN_GIN = "config.gin"
METRICS = "metrics.jsonl"
EVAL_RESULTS = "eval_results.jsonl"


def read_model_config(run_dir: str) -> config.ModelConfig:
  """The model config a run recorded in `model_config.json`."""
  path = os.path.join(run_dir, MODEL_CONFIG)
  if not storage.isfile(path):
    raise FileNotFoundError(f"{path} not found: give the model config (e.g. --gin_file of the "
                            "run's model) or export a run made by this version of t5gemma")
  try:
    return config.from_dict(json.loads(storage.read_text(path)), path)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_model_files(cfg: config.ModelConfig, run_dir: str) -> None:
  """model_config.json (for tools) and model.gin (for the CLI) describing `cfg`."""
  atomic.write_text(os.path.join(run_dir, MODEL_CONFIG),
                    json.dumps(config.to_dict(cfg), indent=2, sort_keys=True) + "\n")
  atomic.write_text(os.path.join(run_dir, MODEL_GIN), config.to_gin(cfg))


def write_vocabulary(vocab: Any, run_dir: str) -> bool:
  """Keeps a copy of a SentencePiece vocabulary (and its sentinel count) in the run directory,
  so that an export can include tokenizer files; returns False for other vocabularies."""
  import seqio
  if not isinstance(vocab, seqio.SentencePieceVocabulary):
    return False
  atomic.write_bytes(os.path.join(run_dir, VOCABULARY),
                     storage.read_bytes(vocab.sentencepiece_model_file))
  atomic.write_text(os.path.join(run_dir, VOCABULARY_INFO),
                    json.dumps({"extra_ids": int(vocab.extra_ids)}) + "\n")
  return True


def read_vocabulary(run_dir: str) -> Optional[Any]:
  """The vocabulary `write_vocabulary` kept, or None when the run kept none."""
  import seqio
  model = os.path.join(run_dir, VOCABULARY)
  if not storage.isfile(model):
    return None
  info = json.loads(storage.read_text(os.path.join(run_dir, VOCABULARY_INFO)))
  return seqio.SentencePieceVocabulary(model, extra_ids=int(info["extra_ids"]))


def write_source(record: dict, run_dir: str) -> None:
  """Keeps where a run's step 0 came from: {"command": "import_hf" or "adapt", "folders":
  [{"path", "given", "repo_id", "revision"}, ...]} (`hub_folder.CheckpointFolder.record`)."""
  atomic.write_text(os.path.join(run_dir, SOURCE), json.dumps(record, indent=2,
                                                              sort_keys=True) + "\n")


def read_source(run_dir: str) -> Optional[dict]:
  """The record `write_source` kept, or None (a trained run, or an older import).

  Raises:
    ValueError: the file is not a JSON object (naming it).
  """
  path = os.path.join(run_dir, SOURCE)
  text = storage.read_text_if_exists(path)
  if text is None:
    return None
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(record, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return record
