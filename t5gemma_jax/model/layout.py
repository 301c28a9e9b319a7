"""Converts parameter trees between the unrolled layout and the scanned one.

Unrolled: `{encoder,decoder}/layers_{i}/...`. Scanned (`RunOptions.scan_layers`): the first
`R * period` layers are stacked as `layers/block_{s}/...` with a leading [R] axis, layer
`i = r * period + s` at index r of block s; any leftover layers keep their `layers_{i}` names.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from t5gemma_jax.config import ModelConfig, ModuleConfig
from t5gemma_jax.run_options import RunOptions

Params = dict[str, Any]


def _stack_split(cfg: ModuleConfig) -> tuple[int, int]:
  return cfg.num_layers // cfg.layer_period, cfg.layer_period


def _stack_fn(leaves):
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)  # keeps device arrays on device


def _scan_stack(stack: Params, cfg: ModuleConfig) -> Params:
  repeats, period = _stack_split(cfg)
  if "layers" in stack:
    return dict(stack)
  out = {k: v for k, v in stack.items() if not k.startswith("layers_")}
  if repeats:
    out["layers"] = {
        f"block_{s}": jax.tree_util.tree_map(
            lambda *xs: _stack_fn(xs),
            *[stack[f"layers_{r * period + s}"] for r in range(repeats)])
        for s in range(period)}
  for i in range(repeats * period, cfg.num_layers):
    out[f"layers_{i}"] = stack[f"layers_{i}"]
  return out


def _unscan_stack(stack: Params, cfg: ModuleConfig) -> Params:
  if "layers" not in stack:
    return dict(stack)
  repeats, period = _stack_split(cfg)
  out = {k: v for k, v in stack.items() if k != "layers"}
  for s in range(period):
    block = stack["layers"][f"block_{s}"]
    for r in range(repeats):
      out[f"layers_{r * period + s}"] = jax.tree_util.tree_map(lambda x, r=r: x[r], block)
  return out


def _both(params: Params, cfg: ModelConfig, fn: Callable) -> Params:
  out = dict(params)
  for name, stack in cfg.layer_stacks.items():  # share_blocks: the decoder owns no layers
    out[name] = fn(params[name], stack)
  return out


def layer_params(stack: Params) -> Params:
  """The layer entries of one stack's params (`layers` and/or `layers_{i}`), nothing else."""
  return {k: v for k, v in stack.items() if k == "layers" or k.startswith("layers_")}


def untie_blocks(params: Params, cfg: ModelConfig) -> Params:
  """With `cfg.share_blocks`, params whose decoder holds the encoder's layers (the same arrays,
  in the same layout): what an unshared model computing the same function reads."""
  if "decoder" in cfg.layer_stacks:  # the decoder owns its layers (or has no encoder)
    return params
  return dict(params, decoder={**params["decoder"], **layer_params(params["encoder"])})


def scan_params(params: Params, cfg: ModelConfig) -> Params:
  """Unrolled params -> scanned layout (a no-op on params that are already scanned)."""
  return _both(params, cfg, _scan_stack)


def unscan_params(params: Params, cfg: ModelConfig) -> Params:
  """Scanned params -> unrolled layout (a no-op on params that are already unrolled)."""
  return _both(params, cfg, _unscan_stack)


def to_layout(params: Params, cfg: ModelConfig, scanned: bool) -> Params:
  """Params in the scanned layout when `scanned` (`RunOptions.scan_layers`), else unrolled."""
  return scan_params(params, cfg) if scanned else unscan_params(params, cfg)


def unrolled_slices(path: tuple[str, ...], cfg: ModelConfig) -> list[tuple[tuple[str, ...],
                                                                         Any]]:
  """Where the layers held by one parameter go in the unrolled layout.

  Args:
    path: a parameter path in either layout, e.g. ("encoder", "layers", "block_1", "mlp",
      "up", "kernel") or ("decoder", "layers_3", "self_attn", "q", "kernel").
    cfg: the model config.

  Returns:
    [(unrolled path, index)]: a scanned block's leaf [R, ...] holds R layers, layer
    `r * period + s` at index r; any other leaf maps to itself with index None.
  """
  if len(path) > 2 and path[1] == "layers":
    stack = cfg.stacks[path[0]]
    repeats, period = _stack_split(stack)
    s = int(path[2][len("block_"):])
    return [((path[0], f"layers_{r * period + s}") + tuple(path[3:]), r) for r in range(repeats)]
  return [(tuple(path), None)]


def is_scanned(params: Any) -> bool:
  """Whether a model's params (or a tree of their shapes) are in the scanned layout: the
  encoder always owns its layers (a decoder-only model: the decoder), so its entries tell."""
  if not isinstance(params, Mapping):
    return False
  return "layers" in params.get("encoder", params.get("decoder", {}))


def options_for(params: Any, run: RunOptions = RunOptions()) -> RunOptions:
  """`run` with `scan_layers` set to the layout `params` are in: how to run params as stored
  (decoding, verification against transformers), whatever layout the options asked for."""
  return run.replace(scan_layers=is_scanned(params))


def select_beams(cache: Params, rows: jax.Array) -> Params:
  """A decoding cache (`T5Gemma.start_decode`) with its batch rows gathered by `rows` int [B],
  each row taking the cache of a beam of the same example.

  Batch is axis 0 except under a scanned `layers` entry, whose leading axis is the layer
  repeat. Entries made from the encoder output (the encoder segment ids, cross-attention
  keys) are left alone: beam search moves rows only among a row's own beams, which share
  them; merged attention keeps its encoder keys in the ring's buffers, which do move.
  """
  def pick(path, x):
    names = [getattr(k, "key", None) for k in path]
    if names[0] == "encoder_segment_ids" or "cross_attn" in names:
      return x
    return jnp.take(x, rows, axis=1 if names[0] == "layers" else 0)
  return jax.tree_util.tree_map_with_path(pick, cache)
