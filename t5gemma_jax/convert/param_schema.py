"""The parameter schema: one declarative table per model family of every stored parameter.

Each `Param` says where a tensor lives in our (unrolled) params tree, its name in a Hugging Face
folder, how the two layouts map (`kind`), its shape (a rule over the config's sizes) and its
optimizer group. Readers (`hf_reader`, `adapt`, `adapt_gemma3`) and the writer (`hf_writer`)
walk these tables; `train.optim` groups parameters by `group_of`, the rule `Param.group` uses.

Families:
  * decoder-only Gemma 2 / Gemma 3 (`decoder_only_params`): `model.layers.{i}.*`, the LM head
    tied to `model.embed_tokens`.
  * T5Gemma (`t5gemma_params`): separate encoder / decoder embeddings, decoder layers with a
    cross-attention block of their own; names `model.{encoder,decoder}.layers.{i}.*`.
  * T5Gemma 2 (`t5gemma2_params`): one shared table (`model.encoder.embed_tokens`, plus the
    `eoi_embedding` row), merged attention (no cross-attention block), q/k norms; with
    `share_blocks` the decoder's layer names point at the encoder's paths.

Kinds (our array -> the HF tensor), which `hf_shape`, `to_hf` and `from_hf` implement:
  COPY: the same array (embeddings, norm scales).
  IN:   a kernel (in, *out) -> a linear weight (prod(out), in)   (q/k/v projections, MLP).
  OUT:  a kernel (*in, out) -> a linear weight (out, prod(in))   (the attention output).

Shapes are written with the sizes of the stack the parameter belongs to: d hidden_size,
f intermediate_size, h num_heads, k num_kv_heads, dh head_dim, vocab vocab_size, and e the
encoder's hidden_size (what cross-attention keys and values are projected from).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from t5gemma_jax.config import (DecoderOnlyConfig, ModelConfig, ModuleConfig, T5GemmaConfig,
                                is_decoder_only)
from t5gemma_jax.convert import hf_t5gemma2

COPY, IN, OUT = "copy", "in", "out"
KINDS = (COPY, IN, OUT)
GROUPS = ("embeddings", "cross_attention", "encoder", "decoder")
# Module names whose parameters, under the decoder, form the "cross_attention" group.
CROSS_ATTENTION_MODULES = ("cross_attn", "pre_cross_attn_norm", "post_cross_attn_norm")
# The T5Gemma LM head is tied to the decoder embedding: transformers neither writes nor needs it.
T5GEMMA_TIED_NAMES = ("lm_head.out_proj.weight",)
CAUSAL_LM_TIED_NAMES = ("lm_head.weight",)


# ------------------------------------------------------------------------------ the rules


def group_of(names: Sequence[str]) -> str:
  """The optimizer group of a parameter, from the dict keys of its path (either layout).

  Args:
    names: e.g. ("decoder", "layers", "block_0", "cross_attn", "q", "kernel").

  Returns:
    "embeddings" (any `embedder/*` leaf: the tables and T5Gemma 2's eoi_embedding),
    "cross_attention" (the decoder's `CROSS_ATTENTION_MODULES`), else the stack's name.

  Raises:
    ValueError: the path is under neither "encoder" nor "decoder".
  """
  names = list(names)
  if names[-2:-1] == ["embedder"]:
    return "embeddings"
  stack = names[0] if names else None
  if stack == "decoder" and any(n in CROSS_ATTENTION_MODULES for n in names):
    return "cross_attention"
  if stack in ("encoder", "decoder"):
    return stack
  raise ValueError(f"parameter {'/'.join(names)} is under neither 'encoder' nor 'decoder'")


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor's shape for our `shape` (see the module docstring for the kinds)."""
  if kind == COPY:
    return shape
  if kind == IN:  # kernel (in, *out) -> weight (prod(out), in)
    return (int(np.prod(shape[1:])), shape[0])
  return (shape[-1], int(np.prod(shape[:-1])))  # OUT: kernel (*in, out) -> (out, prod(in))


def to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  """Our array -> the HF tensor (a transposed view for kernels; nothing is copied)."""
  if kind == COPY:
    return x
  if kind == IN:
    return x.reshape(x.shape[0], -1).T
  return x.reshape(-1, x.shape[-1]).T


def from_hf(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """The HF tensor `w` -> our array of `shape`, in memory of its own (not a view of a mapped
  file, which would keep the file open and be read-only)."""
  if kind == COPY:
    return np.array(w)
  return np.ascontiguousarray(w.T).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Param:
  """One stored parameter.

  Attributes:
    path: its path in our unrolled params, e.g. ("decoder", "layers_3", "mlp", "up", "kernel").
    hf_name: its Hugging Face tensor name, e.g. "model.decoder.layers.3.mlp.up_proj.weight".
    kind: COPY, IN or OUT: how our array maps to the HF tensor.
    shape: our array's shape.
  """

  path: tuple[str, ...]
  hf_name: str
  kind: str
  shape: tuple[int, ...]

  @property
  def hf_shape(self) -> tuple[int, ...]:
    """The HF tensor's shape."""
    return hf_shape(self.kind, self.shape)

  @property
  def group(self) -> str:
    """Its optimizer group (`group_of` its path)."""
    return group_of(self.path)


# ------------------------------------------------------------------------------ the tables

# A row: (our path below its owner, HF name below its prefix, kind, shape in size symbols).
Row = tuple[tuple[str, ...], str, str, tuple[str, ...]]
_HF_NORMS = {"pre_self_attn_norm": "pre_self_attn_layernorm",
             "post_self_attn_norm": "post_self_attn_layernorm",
             "pre_cross_attn_norm": "pre_cross_attn_layernorm",
             "post_cross_attn_norm": "post_cross_attn_layernorm",
             "pre_ffw_norm": "pre_feedforward_layernorm",
             "post_ffw_norm": "post_feedforward_layernorm"}


def _attention(module: str, kv_width: str, qk_norm: bool) -> tuple[Row, ...]:
  rows = (((module, "q", "kernel"), f"{module}.q_proj.weight", IN, ("d", "h", "dh")),
          ((module, "k", "kernel"), f"{module}.k_proj.weight", IN, (kv_width, "k", "dh")),
          ((module, "v", "kernel"), f"{module}.v_proj.weight", IN, (kv_width, "k", "dh")),
          ((module, "o", "kernel"), f"{module}.o_proj.weight", OUT, ("h", "dh", "d")))
  if qk_norm:
    rows += tuple(((module, n, "scale"), f"{module}.{n}.weight", COPY, ("dh",))
                  for n in ("q_norm", "k_norm"))
  return rows


def _norms(*names: str) -> tuple[Row, ...]:
  return tuple(((n, "scale"), f"{_HF_NORMS[n]}.weight", COPY, ("d",)) for n in names)


# Gemma{2,3}ForCausalLM spell the two self-attention norms the Llama way.
_CAUSAL_LM_NORMS = {"pre_self_attn_layernorm.weight": "input_layernorm.weight",
                    "post_self_attn_layernorm.weight": "post_attention_layernorm.weight"}

_MLP: tuple[Row, ...] = ((("mlp", "gate", "kernel"), "mlp.gate_proj.weight", IN, ("d", "f")),
                         (("mlp", "up", "kernel"), "mlp.up_proj.weight", IN, ("d", "f")),
                         (("mlp", "down", "kernel"), "mlp.down_proj.weight", IN, ("f", "d")))
_EMBEDDING: Row = (("embedder", "embedding"), "embed_tokens.weight", COPY, ("vocab", "d"))
_EOI_EMBEDDING: Row = (("embedder", "eoi_embedding"), "embed_tokens.eoi_embedding", COPY, ("d",))
_FINAL_NORM: Row = (("final_norm", "scale"), "norm.weight", COPY, ("d",))

# T5Gemma: per stack, then per layer (rows in this order: adaptation draws random
# cross-attention in it, so reordering would change what a seed gives).
T5GEMMA_STACK = (_EMBEDDING, _FINAL_NORM)
T5GEMMA_ENCODER_LAYER = (_attention("self_attn", "d", False) + _MLP + _norms(
    "pre_self_attn_norm", "post_self_attn_norm", "pre_ffw_norm", "post_ffw_norm"))
T5GEMMA_DECODER_LAYER = (_attention("self_attn", "d", False) + _attention("cross_attn", "e", False)
                         + _MLP + _norms(*_HF_NORMS))
# T5Gemma 2: the shared table once (under the encoder), a final norm per stack, then layers.
T5GEMMA2_SHARED = (_EMBEDDING, _EOI_EMBEDDING)
T5GEMMA2_STACK = (_FINAL_NORM,)
T5GEMMA2_LAYER = (_attention("self_attn", "d", True) + _MLP + _norms(
    "pre_self_attn_norm", "post_self_attn_norm", "pre_ffw_norm", "post_ffw_norm"))


def _sizes(m: ModuleConfig, cfg: T5GemmaConfig) -> dict[str, int]:
  return {"d": m.hidden_size, "f": m.intermediate_size, "h": m.num_heads,
          "k": m.num_kv_heads, "dh": m.head_dim, "vocab": m.vocab_size,
          "e": cfg.encoder.hidden_size}


def _expand(rows: Sequence[Row], sizes: dict[str, int], owner: tuple[str, ...],
            prefix: str) -> list[Param]:
  return [Param(owner + ours, f"{prefix}.{theirs}", kind, tuple(sizes[s] for s in shape))
          for ours, theirs, kind, shape in rows]


def t5gemma_params(cfg: T5GemmaConfig) -> list[Param]:
  """Every parameter of a T5Gemma (v1) encoder-decoder, in storage order.

  Args:
    cfg: a T5Gemma config (neither merged attention nor a shared embedding).

  Returns:
    One `Param` per HF tensor; paths are unique.
  """
  out = []
  for side, m in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
    sizes = _sizes(m, cfg)
    out += _expand(T5GEMMA_STACK, sizes, (side,), f"model.{side}")
    layer = T5GEMMA_DECODER_LAYER if side == "decoder" else T5GEMMA_ENCODER_LAYER
    for i in range(m.num_layers):
      out += _expand(layer, sizes, (side, f"layers_{i}"), f"model.{side}.layers.{i}")
  return out


def t5gemma2_params(cfg: T5GemmaConfig) -> list[Param]:
  """Every parameter of a T5Gemma 2 model (text), names in the short on-disk form that
  `save_pretrained` writes (`model.encoder.layers...`, not `...text_model...`).

  With `share_blocks` the decoder's layer tensors name the encoder's paths: transformers gets
  two equal copies, which compute exactly what the shared model does; such a path then appears
  twice.

  Args:
    cfg: a config that transformers' T5Gemma 2 can express (`hf_t5gemma2.check`).

  Returns:
    One `Param` per HF tensor.

  Raises:
    ValueError: from `hf_t5gemma2.check`.
  """
  hf_t5gemma2.check(cfg)
  out = _expand(T5GEMMA2_SHARED, _sizes(cfg.encoder, cfg), ("encoder",), "model.encoder")
  for side, m in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
    sizes = _sizes(m, cfg)
    out += _expand(T5GEMMA2_STACK, sizes, (side,), f"model.{side}")
    owner = "encoder" if cfg.share_blocks else side
    for i in range(m.num_layers):
      out += _expand(T5GEMMA2_LAYER, sizes, (owner, f"layers_{i}"), f"model.{side}.layers.{i}")
  return out


def decoder_only_params(cfg: DecoderOnlyConfig) -> list[Param]:
  """Every parameter of a decoder-only Gemma 2 / Gemma 3 (`Gemma{2,3}ForCausalLM` names:
  `model.layers.{i}.*`, the two self-attention norms as `input_layernorm` and
  `post_attention_layernorm`)."""
  m = cfg.decoder
  sizes = {"d": m.hidden_size, "f": m.intermediate_size, "h": m.num_heads,
           "k": m.num_kv_heads, "dh": m.head_dim, "vocab": m.vocab_size}
  out = _expand(T5GEMMA_STACK, sizes, ("decoder",), "model")
  layer = tuple((ours, _CAUSAL_LM_NORMS.get(theirs, theirs), kind, shape)
                for ours, theirs, kind, shape in _attention("self_attn", "d", m.qk_norm) + _MLP
                + _norms("pre_self_attn_norm", "post_self_attn_norm", "pre_ffw_norm",
                         "post_ffw_norm"))
  for i in range(m.num_layers):
    out += _expand(layer, sizes, ("decoder", f"layers_{i}"), f"model.layers.{i}")
  return out


def params_of(cfg: ModelConfig) -> list[Param]:
  """The table of `cfg`'s family: `decoder_only_params`, `t5gemma2_params` (family
  "t5gemma2") or `t5gemma_params`."""
  if is_decoder_only(cfg):
    return decoder_only_params(cfg)
  return t5gemma2_params(cfg) if cfg.family == "t5gemma2" else t5gemma_params(cfg)


def tied_names(cfg: ModelConfig) -> frozenset[str]:
  """HF names transformers ties to a stored tensor: a folder may hold them, we never write them."""
  if is_decoder_only(cfg):
    return frozenset(CAUSAL_LM_TIED_NAMES)
  if cfg.family == "t5gemma2":
    return frozenset(T5GEMMA_TIED_NAMES + hf_t5gemma2.TIED_KEYS)
  return frozenset(T5GEMMA_TIED_NAMES)
