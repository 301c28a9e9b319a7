"""What a run directory records besides its checkpoints: the model and the vocabulary.

`train`, `import_hf` and `adapt` write them; `export` reads them, so an exported folder needs
no gin file and carries the tokenizer the run was trained with. Local or remote (gs://) paths.
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
