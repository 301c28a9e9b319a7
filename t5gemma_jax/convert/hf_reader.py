"""Hugging Face tensors, read on demand -> our params, one `param_schema.Param` at a time.

`read_params` fills a whole tree from a T5Gemma / T5Gemma 2 folder's tensors; `take` and
`set_leaf` are the steps it is made of, which the adapters (`adapt`, `adapt_gemma3`) reuse for
decoder-only checkpoints whose names differ. All numpy; nothing touches an accelerator.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import numpy as np

from t5gemma_jax.config import ModelConfig
from t5gemma_jax.convert import param_schema
from t5gemma_jax.run_options import DTYPES, common_dtype_name

Params = dict[str, Any]
# name -> (array, or safetensors_io.StoredTensor: read when taken; file it is in)
Tensors = Mapping[str, tuple[Any, str]]


def default_param_dtype(*tensor_sets: Tensors) -> str:
  """The dtype name to load as when none is asked for: the one dtype the files store, or
  float32 when they mix dtypes (or store one we do not train in).

  Args:
    *tensor_sets: the tensors of one or more folders.
  """
  return common_dtype_name(v.dtype for tensors in tensor_sets for v, _ in tensors.values())


def set_leaf(params: Params, path: Iterable[str], value: Any) -> None:
  """Puts `value` at `path` in a nested dict, creating the levels above it."""
  *parents, leaf = path
  node = params
  for key in parents:
    node = node.setdefault(key, {})
  node[leaf] = value


def take(tensors: Tensors, name: str, param: param_schema.Param,
         config_path: str) -> Optional[np.ndarray]:
  """The tensor `name` as `param`'s array in our layout; None when `tensors` lacks it.

  Args:
    tensors: the checkpoint's tensors.
    name: the name to read (`param.hf_name`, or a decoder-only model's name for it).
    param: what it becomes.
    config_path: the config.json the shape was derived from, for the error message.

  Raises:
    ValueError: the stored shape is not `param.hf_shape`.
  """
  if name not in tensors:
    return None
  w, file_path = tensors[name]
  if tuple(w.shape) != param.hf_shape:
    raise ValueError(f"parameter {name} in {file_path}: shape {tuple(w.shape)} does not match "
                     f"{param.hf_shape} implied by {config_path}")
  return param_schema.from_hf(param.kind, np.asarray(w), param.shape)


def read_params(tensors: Tensors, cfg: ModelConfig, param_dtype: str, *, folder: str,
                config_path: str) -> Params:
  """Every parameter of `cfg`'s schema, read from a T5Gemma or T5Gemma 2 folder's tensors.

  Args:
    tensors: the folder's tensors (T5Gemma 2's already reduced to text, short names).
    cfg: the architecture.
    param_dtype: the dtype name of the result.
    folder, config_path: the folder and its config.json, for error messages.

  Returns:
    Unrolled params: a nested dict of numpy arrays.

  Raises:
    ValueError: a tensor missing, unexpected (tied names excepted) or mis-shaped.
  """
  target = DTYPES[param_dtype]
  params: Params = {}
  expected = set()
  for p in param_schema.params_of(cfg):
    expected.add(p.hf_name)
    value = take(tensors, p.hf_name, p, config_path)
    if value is not None:  # a missing one is reported below, with all the others
      set_leaf(params, p.path, value.astype(target, copy=False))
  missing = sorted(expected - set(tensors))
  if missing:
    raise ValueError(f"{folder}: {len(missing)} parameters missing from the checkpoint, e.g. "
                     f"{missing[:5]}")
  unexpected = sorted(set(tensors) - expected - param_schema.tied_names(cfg))
  if unexpected:
    raise ValueError(f"{folder}: {len(unexpected)} unexpected tensors (not T5Gemma?), e.g. "
                     f"{unexpected[:5]}")
  return params
