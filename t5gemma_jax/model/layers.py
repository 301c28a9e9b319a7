"""Small building blocks: projections, RMSNorm, the scaled embedding, RoPE and the GeGLU MLP.

Every parameter carries logical axis names (see `AXES` below) so that `t5gemma_jax.sharding` can
place it on any mesh without the model knowing about meshes.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
DType = Any

# Logical names for activations at block boundaries; parameters use embed, mlp, heads, kv_heads,
# head_dim, vocab (and layers, added by scan).
ACTIVATION_AXES = ("batch", "length", "embed")


def constrain(x: Array) -> Array:
  """Pins a [batch, length, embed] activation to its logical sharding (a no-op without rules)."""
  return nn.with_logical_constraint(x, ACTIVATION_AXES)


def cast_param(param: Array, dtype: DType, axes: Sequence[str]) -> Array:
  """`param` in the compute dtype, gathered for use the way FSDP means it.

  The cast runs on each device's shard (pinned to the parameter's sharding), so weights travel
  in the compute dtype. Then the weight is all-gathered over the mesh axis of its "embed"
  dimension right here, inside the layer (and inside the scanned loop), and its gradient is
  reduce-scattered straight back to that sharding (`_gathered`'s backward pass).

  Left to itself, the TPU compiler turns an einsum whose contracting dimension is sharded
  over 32 or more devices into a "windowed einsum": a loop over 16-32 slices of the
  contraction that re-reads and re-writes the whole output each step, which made the step
  HBM-bound (b-b on v5p-64: 3x the HBM traffic of gathering first). A no-op without rules.
  """
  x = nn.with_logical_constraint(param.astype(dtype), tuple(axes))
  sharded = nn.logical_to_mesh_axes(tuple(axes))
  gathered = nn.logical_to_mesh_axes(tuple(None if a == "embed" else a for a in axes))
  if jax.sharding.get_abstract_mesh().empty or sharded == gathered:
    return x
  return _gathered(x, sharded, gathered)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gathered(x: Array, sharded, gathered) -> Array:
  """x pinned to `gathered` (PartitionSpecs); its cotangent pinned back to `sharded`."""
  return jax.lax.with_sharding_constraint(x, gathered)


def _gathered_fwd(x, sharded, gathered):
  return _gathered(x, sharded, gathered), None


def _gathered_bwd(sharded, gathered, _, cotangent):
  # Summed over the batch shards and kept only where the parameter lives: a reduce-scatter,
  # not an all-reduce of the whole gradient.
  return (jax.lax.with_sharding_constraint(cotangent, sharded),)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


class Einsum(nn.Module):
  """A bias-free projection whose kernel has an arbitrary shape, applied with an einsum.

  Attributes:
    shape: kernel shape, e.g. (embed, heads, head_dim).
    axes: logical axis name of each kernel dimension.
    in_axis, out_axis: kernel dimensions that count as fan-in / fan-out for the initialiser.
  """

  shape: tuple[int, ...]
  axes: tuple[str, ...]
  in_axis: int | Sequence[int] = 0
  out_axis: int | Sequence[int] = -1
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, eqn: str, x: Array, kernel_shape: Optional[tuple[int, ...]] = None) -> Array:
    """`einsum(eqn, x, kernel)`; `kernel_shape` reshapes the kernel first (a free, row-major
    merge of adjacent dimensions) so that the product is a plain matmul."""
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=self.in_axis, out_axis=self.out_axis)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), self.shape,
                        self.param_dtype)
    kernel = cast_param(kernel, self.dtype, self.axes)
    if kernel_shape is not None:
      kernel = kernel.reshape(kernel_shape)
    return jnp.einsum(eqn, x.astype(self.dtype), kernel)


class RMSNorm(nn.Module):
  """Gemma RMSNorm: `x * rsqrt(mean(x^2) + eps) * (1 + scale)`, computed in float32.

  The stored `scale` is the Hugging Face `weight` (initialised at 0), not `1 + weight`.
  """

  eps: float = 1e-6
  axis_name: str = "embed"
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    return rms_norm(x, scale, self.eps)


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
  """The RMSNorm math on explicit parameters (shared by the module and the decoder cache path)."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Embedder(nn.Module):
  """Token embedding scaled by sqrt(hidden_size), and its transpose as the tied output layer.

  Attributes:
    eoi_id: T5Gemma 2's end-of-image token, embedded by a learned unscaled vector
      `eoi_embedding` [D] instead of its table row; None = no such parameter.
  """

  vocab_size: int
  embed_dim: int
  eoi_id: Optional[int] = None
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def setup(self):
    # Unit-variance embeddings after the sqrt(d) scale, as in Gemma.
    init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0)
    self.embedding = self.param("embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
                                (self.vocab_size, self.embed_dim), self.param_dtype)
    self.eoi_embedding = None
    if self.eoi_id is not None:
      self.eoi_embedding = self.param(
          "eoi_embedding", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
          (self.embed_dim,), self.param_dtype)

  def encode(self, tokens: Array) -> Array:
    """int [B, T] -> [B, T, D] in `dtype`, scaled by sqrt(D) cast to `dtype` first (as HF)."""
    return embed_tokens(self.embedding, tokens, self.dtype, self.eoi_id, self.eoi_embedding)

  def decode(self, x: Array) -> Array:
    """[B, T, D] -> float32 logits [B, T, V] through the (tied) embedding matrix."""
    return embedding_logits(self.embedding, x, self.dtype)


def embed_tokens(table: Array, tokens: Array, dtype: DType, eoi_id: Optional[int] = None,
                 eoi_embedding: Optional[Array] = None) -> Array:
  """The `Embedder.encode` math on explicit parameters (a stack can read another's table).

  Args:
    table: [V, D]; tokens: int [B, T]; eoi_embedding: [D], used (unscaled) where
      tokens == eoi_id.

  Returns:
    [B, T, D] in `dtype`.
  """
  d = table.shape[-1]
  x = jnp.take(table, tokens, axis=0).astype(dtype) * jnp.asarray(math.sqrt(d), dtype)
  if eoi_id is not None:
    x = jnp.where((tokens == eoi_id)[..., None], eoi_embedding.astype(dtype), x)
  return x


def embedding_logits(table: Array, x: Array, dtype: DType) -> Array:
  """[B, T, D] -> float32 logits [B, T, V] = x @ table^T (no scale, no bias)."""
  b, t, d = x.shape
  if t == 1:
    # A decoding step: table @ x as a matrix-vector product over the table's rows, which
    # XLA's CPU backend splits over its threads (as x @ table^T it ran on one: 1.2x slower
    # for a whole s-s step); the [V, B] -> [B, V] transpose is small beside the table.
    out = jnp.einsum("vd,bd->vb", table.astype(dtype), x.reshape(b, d).astype(dtype),
                     preferred_element_type=jnp.float32)
    return out.T.reshape(b, 1, -1)
  return jnp.einsum("btd,vd->btv", x.astype(dtype), table.astype(dtype),
                    preferred_element_type=jnp.float32)


def apply_rope(x: Array, positions: Array, theta: float, factor: float = 1.0) -> Array:
  """Rotary embedding in the split-halves layout (HF `rotate_half`).

  Args:
    x: [B, T, N, H] queries or keys.
    positions: int [B, T], counting from 0 in each sequence (segment).
    theta: RoPE base frequency.
    factor: linear scaling: frequencies are divided by it (HF rope_type "linear").

  Returns:
    [B, T, N, H] in x.dtype; angles are computed in float32 and cast to x.dtype as HF does.
  """
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if factor != 1.0:  # skipped at 1 so that T5Gemma 1's graph is unchanged
    inv_freq = inv_freq / factor
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  cos = jnp.cos(angles).astype(x.dtype)[:, :, None, :]
  sin = jnp.sin(angles).astype(x.dtype)[:, :, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class FeedForward(nn.Module):
  """GeGLU MLP: `down(gelu_tanh(gate(x)) * up(x))`, dropout on the hidden activation."""

  hidden_size: int
  intermediate_size: int
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d, f = self.hidden_size, self.intermediate_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = Einsum((d, f), ("embed", "mlp"), name="gate", **kw)("btd,df->btf", x)
    up = Einsum((d, f), ("embed", "mlp"), name="up", **kw)("btd,df->btf", x)
    gate = checkpoint_name(gate, "mlp_gate")
    up = checkpoint_name(up, "mlp_up")
    h = geglu(gate, up)  # [B, T, F]
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)
    out = Einsum((f, d), ("mlp", "embed"), name="down", **kw)("btf,fd->btd", h)
    return checkpoint_name(out, "mlp_out")


def geglu(gate: Array, up: Array) -> Array:
  """GeGLU activation: gelu_tanh(gate) * up."""
  return jax.nn.gelu(gate, approximate=True) * up
