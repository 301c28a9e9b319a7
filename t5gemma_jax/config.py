"""Model configuration: one `ModuleConfig` per stack, a `T5GemmaConfig` for the pair.

Configs are frozen dataclasses so they can be hashed, used as static jit arguments and bound from
gin at the edges (see `t5gemma_jax/cli/`); the model itself never reads gin.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
REMAT_POLICIES = ("none", "full", "minimal")
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "triton")
ENCODER_WINDOWS = ("symmetric", "split")
CROSS_ATTENTION_LAYERS = ("all", "global")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def alternating_layer_types(num_layers: int) -> tuple[str, ...]:
  """Gemma 2 pattern: sliding on even layer indices, full attention on odd ones."""
  return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))


def layer_reads_encoder(cross_attention_layers: str, layer_type: str) -> bool:
  """Whether a decoder layer of `layer_type` reads the encoder ("all" or only "global")."""
  return cross_attention_layers == "all" or layer_type == FULL


@dataclasses.dataclass(frozen=True)
class ModuleConfig:
  """Hyper-parameters of one stack (the encoder or the decoder).

  Field names follow the published T5Gemma configs; `layer_types=None` means the Gemma 2
  alternation (sliding, full, sliding, ...). The defaults of the last four fields are
  T5Gemma 1; T5Gemma 2 sets them as `t5gemma2_stack` does:

  Attributes:
    qk_norm: RMSNorm (`1 + w`, over head_dim) on queries and keys before RoPE.
    rope_local_theta: RoPE base of sliding layers; None = `rope_theta` (T5Gemma 1 uses one).
    rope_scaling_factor: linear RoPE scaling (inv_freq / factor) of full-attention layers only.
    encoder_window: how an encoder sliding layer reads `sliding_window` = W: "symmetric" is
      |j - i| <= W (T5Gemma 1, 2W + 1 keys); "split" is 1 - ceil(W/2) <= j - i <= floor(W/2)
      (T5Gemma 2, W keys). Causal (decoder) windows are i - W < j <= i either way.
  """

  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  query_pre_attn_scalar: float
  vocab_size: int = 256000
  attn_logit_softcapping: Optional[float] = 50.0
  final_logit_softcapping: Optional[float] = 30.0
  sliding_window: Optional[int] = 4096
  layer_types: Optional[tuple[str, ...]] = None
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout: float = 0.0
  qk_norm: bool = False
  rope_local_theta: Optional[float] = None
  rope_scaling_factor: float = 1.0
  encoder_window: str = "symmetric"

  def __post_init__(self):
    if self.layer_types is None:
      object.__setattr__(self, "layer_types", alternating_layer_types(self.num_layers))
    else:
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "vocab_size"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"ModuleConfig.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModuleConfig.num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"ModuleConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if len(self.layer_types) != self.num_layers:
      raise ValueError(f"ModuleConfig.layer_types has {len(self.layer_types)} entries but "
                       f"num_layers is {self.num_layers}")
    bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
    if bad:
      raise ValueError(f"ModuleConfig.layer_types has unknown types {bad}; use {LAYER_TYPES}")
    if SLIDING in self.layer_types and not self.sliding_window:
      raise ValueError("ModuleConfig.sliding_window must be set when layer_types has "
                       f"'{SLIDING}' layers")
    if self.encoder_window not in ENCODER_WINDOWS:
      raise ValueError(f"ModuleConfig.encoder_window must be one of {ENCODER_WINDOWS}, "
                       f"got {self.encoder_window!r}")
    if not self.rope_scaling_factor > 0:
      raise ValueError("ModuleConfig.rope_scaling_factor must be positive, got "
                       f"{self.rope_scaling_factor}")

  def rope_for(self, layer_type: str) -> tuple[float, float]:
    """(theta, linear scaling factor) of the RoPE table a layer of `layer_type` uses."""
    if layer_type == SLIDING:
      theta = self.rope_theta if self.rope_local_theta is None else self.rope_local_theta
      return theta, 1.0
    return self.rope_theta, self.rope_scaling_factor

  @property
  def layer_period(self) -> int:
    """Length of the shortest repeating unit of `layer_types` (the unit that scan repeats)."""
    types = self.layer_types
    for p in range(1, len(types) + 1):
      if all(types[i] == types[i % p] for i in range(len(types))):
        return p
    return len(types)


@dataclasses.dataclass(frozen=True)
class T5GemmaConfig:
  """An encoder and a decoder stack plus the options that only change how the model runs.

  Attributes:
    encoder, decoder: the two stacks; the decoder's cross-attention reads `encoder.hidden_size`.
    pad_id, eos_id, bos_id: special token ids (0, 1, 2 in every released checkpoint).
    dtype: activation dtype name ("float32", "bfloat16"); softmax, norms and logits stay float32.
    param_dtype: dtype name in which parameters are created and stored.
    scan_layers: run each stack with `nn.scan` over its repeating unit of layers.
    remat_policy: "none", "full" (recompute everything) or "minimal" (keep the named matmul
      outputs: projections, attention output, MLP activations).
    attention_impl: "xla" (portable, the reference), "cudnn" (GPU flash attention; needs no
      attention softcap) or "splash" (TPU Pallas kernel) for training, teacher forcing and
      the encoder pass of decoding; decoding's cached steps (one query) use "xla".
    merged_attention: T5Gemma 2 decoder: no cross-attention module; the decoder's `self_attn`
      also projects the encoder output with its own k/v kernels (and k_norm, but no RoPE) and
      one softmax runs over [decoder keys; encoder keys]. Needs equal hidden sizes.
    shared_embedding: one table (the encoder's) embeds both stacks and is the output layer;
      the decoder then has no `embedder` params.
    eoi_id: T5Gemma 2's end-of-image token: its embedding is replaced by a learned, unscaled
      `embedder/eoi_embedding` vector. None (T5Gemma 1): no such parameter.
    share_blocks: beyond the reference: decoder layer i runs with encoder layer i's weights (its
      own final norm only). Needs merged_attention and stacks of equal shape; the decoder then
      has no `layers` params. Exported to transformers as two equal copies.
    cross_attention_layers: beyond the reference: "all" decoder layers read the encoder, or only
      the "global" (full-attention) ones; sliding layers then have no cross-attention module
      (merged attention: their softmax holds decoder keys only). Not expressible in transformers.
  """

  encoder: ModuleConfig
  decoder: ModuleConfig
  pad_id: int = 0
  eos_id: int = 1
  bos_id: int = 2
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"
  attention_impl: str = "xla"
  merged_attention: bool = False
  shared_embedding: bool = False
  eoi_id: Optional[int] = None
  share_blocks: bool = False
  cross_attention_layers: str = "all"

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"T5GemmaConfig.{name} must be one of {sorted(DTYPES)}, "
                         f"got {getattr(self, name)!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"T5GemmaConfig.remat_policy must be one of {REMAT_POLICIES}, "
                       f"got {self.remat_policy!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"T5GemmaConfig.attention_impl must be one of {ATTENTION_IMPLS}, "
                       f"got {self.attention_impl!r}")
    if self.attention_impl != "xla":
      for side in ("encoder", "decoder"):
        m = getattr(self, side)
        if m.attention_dropout:
          raise ValueError(f"attention_impl={self.attention_impl!r} has no attention dropout; "
                           f"{side}.attention_dropout is {m.attention_dropout}")
        if self.attention_impl == "cudnn" and m.attn_logit_softcapping is not None:
          raise ValueError(f"attention_impl='cudnn' cannot softcap attention logits, but "
                           f"{side}.attn_logit_softcapping is {m.attn_logit_softcapping}; use "
                           "'xla', 'triton' (GPU) or 'splash' (TPU), or a config without "
                           "softcapping")
    self._check_t5gemma2_options()
    if self.encoder.vocab_size != self.decoder.vocab_size:
      raise ValueError(f"encoder.vocab_size ({self.encoder.vocab_size}) and decoder.vocab_size "
                       f"({self.decoder.vocab_size}) must match")

  def _check_t5gemma2_options(self):
    if (self.merged_attention or self.shared_embedding) and (
        self.encoder.hidden_size != self.decoder.hidden_size):
      raise ValueError("merged_attention and shared_embedding need equal encoder and decoder "
                       f"hidden sizes, got {self.encoder.hidden_size} and "
                       f"{self.decoder.hidden_size}")
    if self.cross_attention_layers not in CROSS_ATTENTION_LAYERS:
      raise ValueError(f"T5GemmaConfig.cross_attention_layers must be one of "
                       f"{CROSS_ATTENTION_LAYERS}, got {self.cross_attention_layers!r}")
    if self.share_blocks:
      if not self.merged_attention:
        raise ValueError("share_blocks needs merged_attention (a decoder block must have the "
                         "encoder block's parameters: no separate cross-attention)")
      shape = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "layer_types", "qk_norm")
      differ = [f for f in shape if getattr(self.encoder, f) != getattr(self.decoder, f)]
      if differ:
        raise ValueError(f"share_blocks needs encoder and decoder stacks of the same shape; "
                         f"they differ in {differ}")
    if self.eoi_id is not None and not 0 <= self.eoi_id < self.encoder.vocab_size:
      raise ValueError(f"T5GemmaConfig.eoi_id {self.eoi_id} is outside the vocabulary "
                       f"(size {self.encoder.vocab_size})")

  @property
  def is_t5gemma2(self) -> bool:
    """Whether any T5Gemma 2 feature is on (what the T5Gemma 1 checkpoint format cannot hold)."""
    return (self.merged_attention or self.shared_embedding or self.eoi_id is not None
            or any(m.qk_norm or m.rope_local_theta is not None or m.rope_scaling_factor != 1.0
                   for m in (self.encoder, self.decoder)))

  @property
  def activation_dtype(self):
    return DTYPES[self.dtype]

  @property
  def parameter_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def vocab_size(self) -> int:
    return self.decoder.vocab_size

  def reads_encoder(self, layer_type: str) -> bool:
    """Whether a decoder layer of `layer_type` attends to the encoder output."""
    return layer_reads_encoder(self.cross_attention_layers, layer_type)

  def replace(self, **changes) -> "T5GemmaConfig":
    return dataclasses.replace(self, **changes)


# name: (num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim)
_RELEASED_STACKS = {
    "s": (8, 512, 1024, 8, 8, 64),
    "b": (12, 768, 2048, 12, 12, 64),
    "l": (24, 1024, 2816, 16, 16, 64),
    "ml": (26, 1152, 6912, 4, 4, 256),
    "xl": (24, 2048, 5120, 32, 32, 64),
    "2b": (26, 2304, 9216, 8, 4, 256),
    "9b": (42, 3584, 14336, 16, 8, 256),
}

# A model small enough for unit tests and the offline demo, but with every feature switched on:
# GQA, a sliding window shorter than typical test sequences and both layer types.
_TINY = ModuleConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16, vocab_size=2048,
                     sliding_window=16)

# T5Gemma 2 (text), name: (num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads,
# head_dim, sliding_window). "270m" is confirmed from a public print of the released config
# (docs/t5gemma2_reference.md §6). "1b" and "4b" are NOT confirmed: they are the Gemma 3 1B / 4B
# text stacks, which T5Gemma 2 is adapted from; likewise their vocabulary (262144, as 270m;
# Gemma 3 4B itself has 262208) and the RoPE settings copied from 270m.
_T5GEMMA2_STACKS = {
    "270m": (18, 640, 2048, 4, 1, 256, 512),
    "1b": (26, 1152, 6912, 4, 1, 256, 512),   # unconfirmed
    "4b": (34, 2560, 10240, 8, 4, 256, 1024),  # unconfirmed
}
T5GEMMA2_EOI_ID = 256000
T5GEMMA2_PERIOD = 6  # every 6th layer is full attention (5 local : 1 global)

# "tiny2": T5Gemma 2 in miniature for tests and its offline demo: the tiny stack with 6 layers
# in the 5:1 pattern; vocab 2048 of the built-in vocabulary plus 128 ids it never produces, the
# first of which is eoi (as 256000 is outside the text pieces of Gemma 3's tokenizer).
_TINY2_EOI_ID = 2048
PRESETS = ("tiny", "s-s", "b-b", "l-l", "ml-ml", "xl-xl", "2b-2b", "9b-2b", "9b-9b",
           "270m-270m", "1b-1b", "4b-4b", "tiny2")


def stack_preset(name: str) -> ModuleConfig:
  """The `ModuleConfig` of one released stack size ("s", "b", ..., "9b") or "tiny"."""
  if name == "tiny":
    return _TINY
  if name not in _RELEASED_STACKS:
    raise ValueError(f"unknown stack size {name!r}; known: tiny, {', '.join(_RELEASED_STACKS)}")
  layers, hidden, ffn, heads, kv_heads, head_dim = _RELEASED_STACKS[name]
  return ModuleConfig(hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                      query_pre_attn_scalar=head_dim)


def t5gemma2_stack(name: str) -> ModuleConfig:
  """One T5Gemma 2 text stack ("270m", "1b", "4b"): q/k norms, 5:1 local:global layers, RoPE
  1e4 on local and 1e6 with linear scaling 8 on global layers, the split encoder window, no
  softcaps."""
  if name not in _T5GEMMA2_STACKS:
    raise ValueError(f"unknown T5Gemma 2 size {name!r}; known: {', '.join(_T5GEMMA2_STACKS)}")
  layers, hidden, ffn, heads, kv_heads, head_dim, window = _T5GEMMA2_STACKS[name]
  types = tuple(FULL if (i + 1) % T5GEMMA2_PERIOD == 0 else SLIDING for i in range(layers))
  return ModuleConfig(hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                      query_pre_attn_scalar=256, vocab_size=262144, attn_logit_softcapping=None,
                      final_logit_softcapping=None, sliding_window=window, layer_types=types,
                      rope_theta=1_000_000.0, qk_norm=True, rope_local_theta=10_000.0,
                      rope_scaling_factor=8.0, encoder_window="split")


def _t5gemma2_options(eoi_id: int) -> dict:
  return dict(merged_attention=True, shared_embedding=True, eoi_id=eoi_id)


def preset(name: str, **options) -> T5GemmaConfig:
  """A named model: "tiny", a released T5Gemma pair such as "2b-2b" or "9b-2b"
  (encoder-decoder), a T5Gemma 2 pair ("270m-270m", "1b-1b", "4b-4b") or "tiny2".

  Args:
    name: one of `PRESETS`.
    **options: run-time fields of `T5GemmaConfig` (dtype, param_dtype, scan_layers, ...).

  Returns:
    The frozen config.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
  allowed = [f.name for f in dataclasses.fields(T5GemmaConfig) if f.name not in ("encoder",
                                                                                 "decoder")]
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"preset: unknown option(s) {unknown}; options are {allowed}")
  if name == "tiny2":
    stack = dataclasses.replace(
        t5gemma2_stack("270m"), **{f: getattr(_TINY, f) for f in (
            "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
            "query_pre_attn_scalar", "sliding_window")},
        num_layers=T5GEMMA2_PERIOD, vocab_size=_TINY.vocab_size + 128,
        layer_types=(SLIDING,) * (T5GEMMA2_PERIOD - 1) + (FULL,))
    return T5GemmaConfig(encoder=stack, decoder=stack,
                         **{**_t5gemma2_options(_TINY2_EOI_ID), **options})
  enc_name, dec_name = ("tiny", "tiny") if name == "tiny" else name.split("-")
  if enc_name in _T5GEMMA2_STACKS:
    return T5GemmaConfig(encoder=t5gemma2_stack(enc_name), decoder=t5gemma2_stack(dec_name),
                         **{**_t5gemma2_options(T5GEMMA2_EOI_ID), **options})
  return T5GemmaConfig(encoder=stack_preset(enc_name), decoder=stack_preset(dec_name), **options)



# ------------------------------------------------------------------------ serialisation


def to_dict(cfg: T5GemmaConfig) -> dict:
  """A JSON-ready dict of every field (`from_dict` reads it back into an equal config)."""
  return dataclasses.asdict(cfg)


def from_dict(d: dict, source: str = "config") -> T5GemmaConfig:
  """The inverse of `to_dict`; unknown or missing fields are errors naming `source`."""
  try:
    stacks = {side: ModuleConfig(**d[side]) for side in ("encoder", "decoder")}
    rest = {k: v for k, v in d.items() if k not in ("encoder", "decoder")}
    return T5GemmaConfig(**stacks, **rest)
  except (KeyError, TypeError) as e:
    raise ValueError(f"{source}: not a T5GemmaConfig ({e})") from None


def to_gin(cfg: T5GemmaConfig) -> str:
  """Gin bindings that make `model_config.cfg` exactly `cfg` (for `--gin_file=`)."""
  lines = ["# The model of this checkpoint: pass it as --gin_file=.../model.gin",
           "model_config.cfg = @T5GemmaConfig()"]
  for field in dataclasses.fields(T5GemmaConfig):
    value = getattr(cfg, field.name)
    if field.name in ("encoder", "decoder"):
      lines.append(f"T5GemmaConfig.{field.name} = @{field.name}/ModuleConfig()")
      for sub in dataclasses.fields(ModuleConfig):
        lines.append(f"{field.name}/ModuleConfig.{sub.name} = "
                     f"{_gin_value(getattr(value, sub.name))}")
    else:
      lines.append(f"T5GemmaConfig.{field.name} = {_gin_value(value)}")
  return "\n".join(lines) + "\n"


def _gin_value(v) -> str:
  if isinstance(v, tuple):
    return "(" + "".join(f"{_gin_value(x)}, " for x in v) + ")"
  return repr(v)  # numbers, strings, None and booleans read back the same in gin
