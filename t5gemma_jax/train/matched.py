"""Decoder-only configs matched to an encoder-decoder: by parameter count or by training FLOPs.

The T5Gemma comparison needs both: at equal parameters a decoder-only model has about twice
the layers of one T5Gemma stack and costs about twice the FLOPs per example; at equal FLOPs
(every row is inputs + targets tokens long) it has about as many layers as one stack and half
the parameters. Both keep the decoder stack's widths, head layout and block family (Gemma 2 /
Gemma 3 pattern); the number of layers is chosen first, then `intermediate_size` is adjusted
(in steps of 8) to land within `TOLERANCE` of the target.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax

from t5gemma_jax.config import DecoderOnlyConfig, ModelConfig, T5GemmaConfig
from t5gemma_jax.train import flops

TOLERANCE = 0.05
BY = ("params", "flops")


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
  """Parameters per stack ({"encoder", "decoder"} or {"decoder"}) and "total", from shapes
  alone (nothing is allocated)."""
  from t5gemma_jax import model  # the model is traced (abstractly) only when counting
  shapes = model.abstract_params(cfg, boxed=False)
  counts = {side: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes[side]))
            for side in cfg.stacks if side in shapes}
  counts["total"] = sum(counts.values())
  return counts


def _decoder_only(encdec: T5GemmaConfig, num_layers: int, intermediate_size: int,
                  prefix_lm: bool) -> DecoderOnlyConfig:
  dec = encdec.decoder
  pattern = dec.layer_types[:dec.layer_period]
  layer_types = tuple(pattern[i % len(pattern)] for i in range(num_layers))
  stack = dataclasses.replace(dec, num_layers=num_layers, intermediate_size=intermediate_size,
                              layer_types=layer_types, encoder_window="symmetric")
  return DecoderOnlyConfig(decoder=stack, pad_id=encdec.pad_id, eos_id=encdec.eos_id,
                           bos_id=encdec.bos_id, prefix_lm=prefix_lm)


def _fit(measure: Callable[[int, int], float], target: float, base_f: int,
         max_layers: int) -> tuple[int, int]:
  """(layers, intermediate size) whose `measure` is closest to `target`: layers first, then the
  MLP width, which both counts grow linearly in."""
  layers = min(range(1, max_layers + 1), key=lambda n: abs(measure(n, base_f) - target))
  lo, hi = measure(layers, base_f), measure(layers, base_f + 8)
  f = base_f
  if hi != lo:
    f = max(8, base_f + 8 * round((target - lo) / (hi - lo)))
  return layers, f


def matched_decoder_only(encoder_decoder: T5GemmaConfig, by: str = "params",
                         inputs_length: int = 512, targets_length: int = 128,
                         prefix_lm: bool = False) -> DecoderOnlyConfig:
  """A decoder-only config matched to `encoder_decoder`.

  Args:
    encoder_decoder: the T5Gemma config to match (gin: `@preset()`).
    by: "params" (total parameter count) or "flops" (training FLOPs per example, each row
      inputs_length + targets_length tokens for the decoder-only model).
    inputs_length, targets_length: the example shape the FLOPs are compared at.
    prefix_lm: the decoder-only model's attention (PrefixLM or causal).

  Returns:
    The config; `compare` reports how close it is.

  Raises:
    ValueError: an unknown `by`, or no config within `TOLERANCE` of the target.
  """
  if by not in BY:
    raise ValueError(f"matched_decoder_only.by must be one of {BY}, got {by!r}")
  dec = encoder_decoder.decoder
  max_layers = 4 * (encoder_decoder.encoder.num_layers + dec.num_layers)
  if by == "params":
    target = float(parameter_counts(encoder_decoder)["total"])
    one = parameter_counts(_decoder_only(encoder_decoder, 1, dec.intermediate_size, prefix_lm))
    two = parameter_counts(_decoder_only(encoder_decoder, 2, dec.intermediate_size, prefix_lm))
    per_layer, fixed = two["total"] - one["total"], 2 * one["total"] - two["total"]
    mlp = 3 * dec.hidden_size  # parameters per unit of intermediate_size per layer

    def measure(n, f):
      return fixed + n * (per_layer + mlp * (f - dec.intermediate_size))
  else:
    target = flops.training_flops_per_step(encoder_decoder, 1, inputs_length, targets_length)

    def measure(n, f):
      return flops.training_flops_per_step(_decoder_only(encoder_decoder, n, f, prefix_lm), 1,
                                           inputs_length, targets_length)
  layers, f = _fit(measure, target, dec.intermediate_size, max_layers)
  out = _decoder_only(encoder_decoder, layers, f, prefix_lm)
  ratio = measure(layers, f) / target
  if abs(ratio - 1) > TOLERANCE:
    why = ""
    if by == "flops":
      head = 3 * flops.lm_head_flops(out, inputs_length + targets_length)
      why = (f"; its LM head alone, over all {inputs_length + targets_length} positions of a "
             f"row, costs {head / target:.2f}x the encoder-decoder's training FLOPs")
    raise ValueError(f"no decoder-only config within {TOLERANCE:.0%} of the encoder-decoder's "
                     f"{by} (best: {layers} layers, intermediate_size {f}, ratio {ratio:.3f})"
                     f"{why}")
  return out


def compare(encoder_decoder: T5GemmaConfig, decoder_only: DecoderOnlyConfig,
            inputs_length: int, targets_length: int) -> dict:
  """Parameters and training FLOPs per example of both, and the decoder-only / encoder-decoder
  ratios (what `show_config` prints)."""
  out = {}
  for name, cfg in (("encoder_decoder", encoder_decoder), ("decoder_only", decoder_only)):
    out[name] = {"parameters": parameter_counts(cfg)["total"],
                 "train_flops_per_example": flops.training_flops_per_step(
                     cfg, 1, inputs_length, targets_length)}
  for key in ("parameters", "train_flops_per_example"):
    out[f"{key}_ratio"] = round(out["decoder_only"][key] / out["encoder_decoder"][key], 4)
  out["decoder_only"].update(num_layers=decoder_only.decoder.num_layers,
                             intermediate_size=decoder_only.decoder.intermediate_size)
  return out
