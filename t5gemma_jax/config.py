"""Model architecture: one `ModuleConfig` per stack, a `T5GemmaConfig` for the pair, a
`DecoderOnlyConfig` for a decoder-only Gemma (the baseline T5Gemma is compared against).

Configs are frozen dataclasses so they can be hashed, used as static jit arguments and bound from
gin at the edges (see `t5gemma_jax/cli/`); the model itself never reads gin.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
ENCODER_WINDOWS = ("symmetric", "split")
CROSS_ATTENTION_LAYERS = ("all", "global")
NO_ENCODER = "none"  # a decoder-only model's blocks: no layer reads an encoder


def alternating_layer_types(num_layers: int) -> tuple[str, ...]:
  """Gemma 2 pattern: sliding on even layer indices, full attention on odd ones."""
  return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))


def layer_reads_encoder(cross_attention_layers: str, layer_type: str) -> bool:
  """Whether a decoder layer of `layer_type` reads the encoder ("all", only "global", or
  "none": decoder-only)."""
  if cross_attention_layers == NO_ENCODER:
    return False
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
  """The architecture of an encoder-decoder: what a checkpoint *is*.

  How a run computes it (dtypes, scan, remat, attention kernel) is `run_options.RunOptions`,
  kept apart so that the same checkpoint runs under any options.

  Attributes:
    encoder, decoder: the two stacks; the decoder's cross-attention reads `encoder.hidden_size`.
    pad_id, eos_id, bos_id: special token ids (0, 1, 2 in every released checkpoint).
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
  merged_attention: bool = False
  shared_embedding: bool = False
  eoi_id: Optional[int] = None
  share_blocks: bool = False
  cross_attention_layers: str = "all"

  def __post_init__(self):
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
  def family(self) -> str:
    """The parameter layout family: "t5gemma2" (merged attention or one shared table, stored in
    transformers' T5Gemma 2 format) or "t5gemma"."""
    return "t5gemma2" if self.merged_attention or self.shared_embedding else "t5gemma"

  @property
  def has_t5gemma2_features(self) -> bool:
    """Whether any T5Gemma 2 feature is on (what the T5Gemma 1 format cannot hold), in either
    family."""
    return (self.family == "t5gemma2" or self.eoi_id is not None
            or any(m.qk_norm or m.rope_local_theta is not None or m.rope_scaling_factor != 1.0
                   for m in (self.encoder, self.decoder)))

  @property
  def vocab_size(self) -> int:
    return self.decoder.vocab_size

  @property
  def stacks(self) -> dict[str, ModuleConfig]:
    """The stacks by parameter-tree name."""
    return {"encoder": self.encoder, "decoder": self.decoder}

  @property
  def layer_stacks(self) -> dict[str, ModuleConfig]:
    """The stacks that own layer parameters (with `share_blocks` the decoder owns none)."""
    return {"encoder": self.encoder} if self.share_blocks else self.stacks

  def reads_encoder(self, layer_type: str) -> bool:
    """Whether a decoder layer of `layer_type` attends to the encoder output."""
    return layer_reads_encoder(self.cross_attention_layers, layer_type)

  def replace(self, **changes) -> "T5GemmaConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class DecoderOnlyConfig:
  """A decoder-only Gemma 2 or Gemma 3: one causal stack of the same blocks, the embedding tied
  to the output layer (transformers' Gemma2ForCausalLM / Gemma3ForCausalLM).

  Attributes:
    decoder: the stack (Gemma 3 sets `qk_norm`, `rope_local_theta`, ... as `t5gemma2_stack`).
    pad_id, eos_id, bos_id: special token ids.
    prefix_lm: PrefixLM: tokens of the input prefix (the `decoder_causal_attention` feature)
      attend to each other both ways, targets causally (the T5Gemma paper's decoder-only
      baseline). False: a plain causal LM. Parameters are the same either way.
  """

  decoder: ModuleConfig
  pad_id: int = 0
  eos_id: int = 1
  bos_id: int = 2
  prefix_lm: bool = False

  def __post_init__(self):
    if self.decoder.encoder_window != "symmetric":
      raise ValueError("DecoderOnlyConfig.decoder.encoder_window has no meaning without an "
                       "encoder; leave it 'symmetric'")

  @property
  def family(self) -> str:
    """"gemma3" (QK-norm or a local RoPE base: transformers' Gemma 3 layout) or "gemma2"."""
    d = self.decoder
    return "gemma3" if d.qk_norm or d.rope_local_theta is not None else "gemma2"

  @property
  def vocab_size(self) -> int:
    return self.decoder.vocab_size

  @property
  def stacks(self) -> dict[str, ModuleConfig]:
    """The stacks by parameter-tree name: the one stack."""
    return {"decoder": self.decoder}

  @property
  def layer_stacks(self) -> dict[str, ModuleConfig]:
    """The stacks that own layer parameters (as T5GemmaConfig's): the one stack."""
    return self.stacks

  def replace(self, **changes) -> "DecoderOnlyConfig":
    return dataclasses.replace(self, **changes)


ModelConfig = Union[T5GemmaConfig, DecoderOnlyConfig]


def is_decoder_only(cfg: ModelConfig) -> bool:
  return isinstance(cfg, DecoderOnlyConfig)


# ------------------------------------------------------------------------ serialisation


def to_dict(cfg: ModelConfig) -> dict:
  """A JSON-ready dict of every field (`from_dict` reads it back into an equal config); a
  decoder-only config says so under "architecture"."""
  d = dataclasses.asdict(cfg)
  return {"architecture": "decoder_only", **d} if is_decoder_only(cfg) else d


# Run options that `model_config.json` files written before `RunOptions` existed also hold.
_LEGACY_RUN_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")


def from_dict(d: dict, source: str = "config") -> ModelConfig:
  """The inverse of `to_dict`; unknown or missing fields are errors naming `source` (run
  options that older files recorded beside the architecture are skipped)."""
  if d.get("architecture") == "decoder_only":
    try:
      rest = {k: v for k, v in d.items() if k not in ("architecture", "decoder")}
      return DecoderOnlyConfig(decoder=ModuleConfig(**d["decoder"]), **rest)
    except (KeyError, TypeError) as e:
      raise ValueError(f"{source}: not a DecoderOnlyConfig ({e})") from None
  try:
    stacks = {side: ModuleConfig(**d[side]) for side in ("encoder", "decoder")}
    rest = {k: v for k, v in d.items()
            if k not in ("encoder", "decoder", *_LEGACY_RUN_FIELDS)}
    return T5GemmaConfig(**stacks, **rest)
  except (KeyError, TypeError) as e:
    raise ValueError(f"{source}: not a T5GemmaConfig ({e})") from None


def to_gin(cfg: ModelConfig) -> str:
  """Gin bindings that make `model_config.cfg` exactly `cfg` (for `--gin_file=`)."""
  kind = type(cfg).__name__
  lines = ["# The model of this checkpoint: pass it as --gin_file=.../model.gin",
           f"model_config.cfg = @{kind}()"]
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    if field.name in ("encoder", "decoder"):
      lines.append(f"{kind}.{field.name} = @{field.name}/ModuleConfig()")
      for sub in dataclasses.fields(ModuleConfig):
        lines.append(f"{field.name}/ModuleConfig.{sub.name} = "
                     f"{_gin_value(getattr(value, sub.name))}")
    else:
      lines.append(f"{kind}.{field.name} = {_gin_value(value)}")
  return "\n".join(lines) + "\n"


def _gin_value(v) -> str:
  if isinstance(v, tuple):
    return "(" + "".join(f"{_gin_value(x)}, " for x in v) + ")"
  return repr(v)  # numbers, strings, None and booleans read back the same in gin
