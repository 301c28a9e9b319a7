"""One entry point for every architecture: the Flax module and parameters of a config."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax

from t5gemma_jax.config import ModelConfig, is_decoder_only
from t5gemma_jax.model import decoder_only, transformer
from t5gemma_jax.run_options import RunOptions


def from_config(cfg: ModelConfig, run: RunOptions = RunOptions()) -> nn.Module:
  """The module of `cfg`: `transformer.T5Gemma` for a `T5GemmaConfig`,
  `decoder_only.DecoderOnly` for a `DecoderOnlyConfig` (whose `apply({"params": p}, tokens)`
  maps int32 [B, T] to float32 logits [B, T, V])."""
  if is_decoder_only(cfg):
    return decoder_only.DecoderOnly(cfg, run)
  return transformer.T5Gemma(cfg, run)


def init_params(cfg: ModelConfig, rng: jax.Array, run: RunOptions = RunOptions()) -> Any:
  """Fresh parameters of either architecture, boxed with their logical axis names."""
  module = decoder_only if is_decoder_only(cfg) else transformer
  return module.init_params(cfg, rng, run)


def abstract_params(cfg: ModelConfig, run: RunOptions = RunOptions(), boxed: bool = True) -> Any:
  """Parameter shapes (`jax.ShapeDtypeStruct`s) of either architecture, allocating nothing.

  Args:
    cfg: the architecture.
    run: the run options (the layout and dtype of the parameters follow them).
    boxed: keep flax's `nn.Partitioned` boxes (logical axis names, for sharding rules).
  """
  shapes = jax.eval_shape(functools.partial(init_params, cfg, run=run), jax.random.PRNGKey(0))
  return shapes if boxed else nn.meta.unbox(shapes)
