"""Named models: the released T5Gemma and T5Gemma 2 sizes plus two miniatures, in one table.

`PRESETS` is the only list of names: `preset(name)` builds from it, the gin files under
`t5gemma_jax/gin/models/` are generated from it (`python tools/gen_model_gins.py`; a test
checks they are current), and `show_config` and the docs read it. Presets are architectures
only; how a run computes them is `run_options.RunOptions`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from t5gemma_jax.config import (FULL, SLIDING, DecoderOnlyConfig, ModuleConfig, T5GemmaConfig,
                               alternating_layer_types)

# The released T5Gemma (Gemma 2 based) stacks. Every one uses head_dim as its query scale.
_GEMMA2_STACKS = {
    "s": dict(num_layers=8, hidden_size=512, intermediate_size=1024, num_heads=8,
              num_kv_heads=8, head_dim=64),
    "b": dict(num_layers=12, hidden_size=768, intermediate_size=2048, num_heads=12,
              num_kv_heads=12, head_dim=64),
    "l": dict(num_layers=24, hidden_size=1024, intermediate_size=2816, num_heads=16,
              num_kv_heads=16, head_dim=64),
    "ml": dict(num_layers=26, hidden_size=1152, intermediate_size=6912, num_heads=4,
               num_kv_heads=4, head_dim=256),
    "xl": dict(num_layers=24, hidden_size=2048, intermediate_size=5120, num_heads=32,
               num_kv_heads=32, head_dim=64),
    "2b": dict(num_layers=26, hidden_size=2304, intermediate_size=9216, num_heads=8,
               num_kv_heads=4, head_dim=256),
    "9b": dict(num_layers=42, hidden_size=3584, intermediate_size=14336, num_heads=16,
               num_kv_heads=8, head_dim=256),
}

# A model small enough for unit tests and the offline demo, but with every feature switched on:
# GQA, a sliding window shorter than typical test sequences and both layer types.
_TINY = ModuleConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16, vocab_size=2048,
                     sliding_window=16)

# Deep enough that the layers, not the 2048-entry LM head, hold most of a step's FLOPs, so that
# a decoder-only model can be matched to it by FLOPs as well as by parameters.
_MINI = dataclasses.replace(_TINY, num_layers=4, layer_types=None)

# T5Gemma 2 text stacks. "270m" is confirmed from a public print of the released config
# (docs/t5gemma2_reference.md §6). "1b" and "4b" are NOT confirmed: they are the Gemma 3 1B / 4B
# text stacks, which T5Gemma 2 is adapted from; likewise their vocabulary (262144, as 270m;
# Gemma 3 4B itself has 262208) and the RoPE settings copied from 270m.
_GEMMA3_STACKS = {
    "270m": dict(num_layers=18, hidden_size=640, intermediate_size=2048, num_heads=4,
                 num_kv_heads=1, head_dim=256, sliding_window=512),
    "1b": dict(num_layers=26, hidden_size=1152, intermediate_size=6912, num_heads=4,
               num_kv_heads=1, head_dim=256, sliding_window=512),  # unconfirmed
    "4b": dict(num_layers=34, hidden_size=2560, intermediate_size=10240, num_heads=8,
               num_kv_heads=4, head_dim=256, sliding_window=1024),  # unconfirmed
}
T5GEMMA2_EOI_ID = 256000
T5GEMMA2_PERIOD = 6  # every 6th layer is full attention (5 local : 1 global)
# tiny2's vocabulary: the 2048 built-in pieces plus 128 ids it never produces, the first of
# which is eoi (as 256000 is outside the text pieces of Gemma 3's tokenizer).
_TINY2_EOI_ID = 2048


def stack_preset(name: str) -> ModuleConfig:
  """The `ModuleConfig` of one released T5Gemma stack size ("s", "b", ..., "9b") or "tiny"."""
  if name == "tiny":
    return _TINY
  if name not in _GEMMA2_STACKS:
    raise ValueError(f"unknown stack size {name!r}; known: tiny, {', '.join(_GEMMA2_STACKS)}")
  shape = _GEMMA2_STACKS[name]
  return ModuleConfig(**shape, query_pre_attn_scalar=shape["head_dim"])


def t5gemma2_layer_types(num_layers: int) -> tuple[str, ...]:
  """Gemma 3's pattern: five sliding layers, then one full-attention layer, repeated."""
  return tuple(FULL if (i + 1) % T5GEMMA2_PERIOD == 0 else SLIDING for i in range(num_layers))


def t5gemma2_stack(name: str) -> ModuleConfig:
  """One T5Gemma 2 text stack ("270m", "1b", "4b"): q/k norms, 5:1 local:global layers, RoPE
  1e4 on local and 1e6 with linear scaling 8 on global layers, the split encoder window, no
  softcaps."""
  if name not in _GEMMA3_STACKS:
    raise ValueError(f"unknown T5Gemma 2 size {name!r}; known: {', '.join(_GEMMA3_STACKS)}")
  shape = _GEMMA3_STACKS[name]
  return ModuleConfig(**shape, query_pre_attn_scalar=256, vocab_size=262144,
                      attn_logit_softcapping=None, final_logit_softcapping=None,
                      layer_types=t5gemma2_layer_types(shape["num_layers"]),
                      rope_theta=1_000_000.0, qk_norm=True, rope_local_theta=10_000.0,
                      rope_scaling_factor=8.0, encoder_window="split")


def _t5gemma(encoder: str, decoder: str) -> Callable[[], T5GemmaConfig]:
  return lambda: T5GemmaConfig(encoder=stack_preset(encoder), decoder=stack_preset(decoder))


def _t5gemma2(size: str) -> Callable[[], T5GemmaConfig]:
  return lambda: T5GemmaConfig(encoder=t5gemma2_stack(size), decoder=t5gemma2_stack(size),
                               merged_attention=True, shared_embedding=True,
                               eoi_id=T5GEMMA2_EOI_ID)


def _tiny2() -> T5GemmaConfig:
  """T5Gemma 2 in miniature: the tiny stack's widths with 6 layers in the 5:1 pattern."""
  widths = ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
            "query_pre_attn_scalar", "sliding_window")
  stack = dataclasses.replace(t5gemma2_stack("270m"), **{f: getattr(_TINY, f) for f in widths},
                              num_layers=T5GEMMA2_PERIOD, vocab_size=_TINY.vocab_size + 128,
                              layer_types=t5gemma2_layer_types(T5GEMMA2_PERIOD))
  return T5GemmaConfig(encoder=stack, decoder=stack, merged_attention=True,
                       shared_embedding=True, eoi_id=_TINY2_EOI_ID)


def decoder_only(stack: str = "tiny", prefix_lm: bool = False,
                 **overrides) -> DecoderOnlyConfig:
  """A decoder-only Gemma built from one named stack.

  Args:
    stack: a T5Gemma stack ("tiny", "s", "b", ..., "9b": Gemma 2 blocks), a T5Gemma 2 one
      ("270m", "1b", "4b": Gemma 3 blocks) or "tiny2" (tiny widths, Gemma 3 blocks).
    prefix_lm: PrefixLM attention over the input (see `DecoderOnlyConfig`).
    **overrides: `ModuleConfig` fields to change (e.g. num_layers=3, intermediate_size=96);
      a new `num_layers` without `layer_types` repeats the stack's own pattern.

  Returns:
    The config (gin: `model_config.cfg = @decoder_only()`, `decoder_only.stack = "b"`).
  """
  if stack == "tiny2":
    base = _tiny2().decoder
  elif stack in _GEMMA3_STACKS:
    base = t5gemma2_stack(stack)
  else:
    base = stack_preset(stack)
  gemma3 = base.qk_norm
  if "num_layers" in overrides and "layer_types" not in overrides:
    n = int(overrides["num_layers"])
    overrides["layer_types"] = (t5gemma2_layer_types(n) if gemma3
                                else alternating_layer_types(n))
  try:
    module = dataclasses.replace(base, encoder_window="symmetric", **overrides)
  except TypeError as e:
    raise ValueError(f"decoder_only: {e}") from None
  return DecoderOnlyConfig(decoder=module, prefix_lm=prefix_lm)


@dataclasses.dataclass(frozen=True)
class Preset:
  """One named model.

  Attributes:
    build: returns the architecture.
    description: one line for gin files and `show_config`.
    confirmed: whether every size was checked against a released config.
  """

  build: Callable[[], T5GemmaConfig]
  description: str
  confirmed: bool = True


PRESETS: dict[str, Preset] = {
    "tiny": Preset(lambda: T5GemmaConfig(encoder=_TINY, decoder=_TINY),
                   "a small model with every feature switched on, for tests and the offline "
                   "demo"),
    **{f"{e}-{d}": Preset(_t5gemma(e, d), f"released T5Gemma {e}-{d} (Gemma 2 blocks)")
       for e, d in (("s", "s"), ("b", "b"), ("l", "l"), ("ml", "ml"), ("xl", "xl"),
                    ("2b", "2b"), ("9b", "2b"), ("9b", "9b"))},
    "270m-270m": Preset(_t5gemma2("270m"), "released T5Gemma 2 270m-270m (text)"),
    "1b-1b": Preset(_t5gemma2("1b"), "T5Gemma 2 1b-1b (text; Gemma 3 1B sizes)", False),
    "4b-4b": Preset(_t5gemma2("4b"), "T5Gemma 2 4b-4b (text; Gemma 3 4B sizes)", False),
    "tiny2": Preset(_tiny2, "T5Gemma 2 in miniature, for tests and its offline demo"),
    "mini": Preset(lambda: T5GemmaConfig(encoder=_MINI, decoder=_MINI),
                   "tiny's widths with 4 layers per stack: the encoder-decoder of the "
                   "encoder-decoder vs decoder-only comparison (t5gemma_jax/launch/sweeps/"
                   "encdec_vs_deconly.json)"),
}


def preset(name: str, dropout_rate: Optional[float] = None,
           shared_embedding: Optional[bool] = None, share_blocks: Optional[bool] = None,
           cross_attention_layers: Optional[str] = None) -> T5GemmaConfig:
  """The architecture named `name`, one of `PRESETS` ("tiny", "2b-2b", "270m-270m", ...).

  Args:
    name: the preset.
    dropout_rate: residual dropout of both stacks (None: the preset's, 0).
    shared_embedding, share_blocks, cross_attention_layers: these `T5GemmaConfig` fields (None:
      the preset's), e.g. gin `preset.share_blocks = True`.

  Raises:
    ValueError: an unknown name, listing the known ones, or a combination the config refuses.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
  cfg = PRESETS[name].build()
  if dropout_rate is not None:
    cfg = cfg.replace(encoder=dataclasses.replace(cfg.encoder, dropout_rate=dropout_rate),
                      decoder=dataclasses.replace(cfg.decoder, dropout_rate=dropout_rate))
  changes = {k: v for k, v in (("shared_embedding", shared_embedding),
                               ("share_blocks", share_blocks),
                               ("cross_attention_layers", cross_attention_layers))
             if v is not None}
  return cfg.replace(**changes) if changes else cfg


def model_gin(name: str) -> str:
  """The text of `t5gemma_jax/gin/models/<name>.gin` (generated; see the module docstring)."""
  p = PRESETS[name]
  note = "" if p.confirmed else " Sizes not confirmed against a released config."
  return (f"# {name}: {p.description}.{note}\n"
          "# Generated from t5gemma_jax/presets.py by tools/gen_model_gins.py; do not edit.\n"
          "# Run options are separate: e.g. --gin.RunOptions.dtype='\"bfloat16\"'.\n"
          f'preset.name = "{name}"\n'
          "model_config.cfg = @preset()\n")
