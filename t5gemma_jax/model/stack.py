"""What every stack shares: embed -> blocks (plain or scanned, with remat) -> final norm.

`StackRunner` is the base of the encoder, the decoder and the decoder-only model
(`model.transformer`, `model.decoder_only`); scanned parameters live under `layers/block_{s}`
with a leading [R] axis, leftovers under `layers_{i}` (see `model.layout`).
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5gemma_jax.config import ModelConfig, ModuleConfig
from t5gemma_jax.model import masks as masks_lib
from t5gemma_jax.model.blocks import remat_policy
from t5gemma_jax.model.layers import Embedder, RMSNorm, constrain
from t5gemma_jax.run_options import RunOptions

Array = jax.Array


class _Unit(nn.Module):
  """One repeat of the layer-type pattern (e.g. a sliding + full pair): the scanned body."""

  make_block: Callable[..., nn.Module]
  layer_types: tuple[str, ...]

  @nn.compact
  def __call__(self, x: Array, *args) -> tuple[Array, dict]:
    """x, the blocks' inputs, then the unit's cache ({"block_s": ...} or None) -> (x, cache)."""
    *args, cache = args
    new = {}
    for s, layer_type in enumerate(self.layer_types):
      name = f"block_{s}"
      x, new[name] = self.make_block(layer_type=layer_type, name=name)(
          x, *args, None if cache is None else cache[name])
    return x, new


def self_masks(cfg: ModuleConfig, segment_ids: Array, causal: bool,
               positions: Optional[Array] = None, prefix: Optional[Array] = None) -> dict:
  """One self-attention `MaskSpec` per layer type used by the stack (`prefix`: PrefixLM's
  bidirectional part, see `MaskSpec`)."""
  return {t: masks_lib.MaskSpec.for_layer(cfg, t, segment_ids, causal, positions, prefix)
          for t in sorted(set(cfg.layer_types))}


def capped_logits(logits: Array, cfg: ModuleConfig) -> Array:
  """Output logits [B, T, V] softcapped by the stack's `final_logit_softcapping`."""
  cap = cfg.final_logit_softcapping
  if cap is not None:
    logits = cap * jnp.tanh(logits / cap)
  return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def segments_and_positions(tokens: Array, segment_ids: Optional[Array],
                           positions: Optional[Array], pad_id: int) -> tuple[Array, Array]:
  """(segment ids, positions) int32 [B, T]: given ones kept, else from the tokens (padding =
  `pad_id`) with positions restarting per segment."""
  if segment_ids is None:
    segment_ids = masks_lib.segment_ids_from_tokens(tokens, pad_id)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  elif positions is None:
    positions = masks_lib.positions_from_segments(segment_ids)
  return segment_ids, positions


def decode_inputs(cfg: ModuleConfig, tokens: Array, cache: Optional[dict],
                  cache_length: Optional[int], segment_ids: Optional[Array],
                  positions: Optional[Array], pad_id: int,
                  prefix: Optional[Array] = None) -> tuple[Array, Array, dict]:
  """(segment ids, positions, self-attention masks) of a causal stack's call: a cached step
  (one token per row at its row's next position, `cache["index"]`), or the whole `tokens`
  (when starting to decode, `cache_length` must hold them)."""
  if cache is not None:
    if tokens.shape[1] != 1:
      raise ValueError(f"a cached decoding step takes one token per row, got {tokens.shape}")
    positions = cache["index"][:, None]
    segment_ids = jnp.ones_like(tokens, jnp.int32)
    return segment_ids, positions, self_masks(cfg, segment_ids, True, positions)
  if cache_length is not None and tokens.shape[1] > cache_length:
    raise ValueError(f"cache_length {cache_length} cannot hold the {tokens.shape[1]} tokens "
                     "decoding starts from")
  segment_ids, positions = segments_and_positions(tokens, segment_ids, positions, pad_id)
  return segment_ids, positions, self_masks(cfg, segment_ids, True, prefix=prefix)


def next_index(segment_ids: Array, positions: Array) -> Array:
  """int32 [B]: the position after each row's last real token (the decode cache's "index")."""
  return jnp.max(jnp.where(segment_ids > 0, positions, -1), axis=1) + 1


class StackRunner(nn.Module):
  """Shared embed -> blocks -> final norm plumbing of the encoder and the decoder."""

  cfg: ModelConfig
  run_options: RunOptions = RunOptions()

  def run(self, module_cfg: ModuleConfig, block_cls: type, extra_block_kwargs: dict,
          x: Array, deterministic: bool, *args, shared_layers: Optional[dict] = None,
          cache: Optional[dict] = None) -> tuple[Array, dict]:
    """Embedded x [B, T, D] through every layer and the final norm -> (x, the layers' caches
    in the parameter layout, {} entries None outside decoding)."""
    r = self.run_options
    x = nn.Dropout(module_cfg.dropout_rate)(x, deterministic=deterministic)
    x = constrain(x)
    block_kwargs = dict(cfg=module_cfg, deterministic=deterministic, dtype=r.activation_dtype,
                        param_dtype=r.parameter_dtype, attention_impl=r.attention_impl,
                        **extra_block_kwargs)
    if shared_layers is None:
      x, cache = self.run_layers(module_cfg, block_cls, block_kwargs, x, *args, cache=cache)
    else:
      x, cache = self.run_shared_layers(module_cfg, block_cls, block_kwargs, shared_layers, x,
                                        *args, cache=cache)
    x = RMSNorm(module_cfg.rms_norm_eps, param_dtype=r.parameter_dtype, name="final_norm")(x)
    return nn.Dropout(module_cfg.dropout_rate)(x, deterministic=deterministic), cache

  def _block_factory(self, module_cfg: ModuleConfig, block_cls: type, block_kwargs: dict):
    policy = remat_policy(self.run_options.remat_policy)
    if policy is not None:
      block_cls = nn.remat(block_cls, policy=policy,
                           prevent_cse=not self.run_options.scan_layers)

    def make_block(**kw):
      return block_cls(**block_kwargs, **kw)

    types, period = module_cfg.layer_types, module_cfg.layer_period
    repeats = len(types) // period if self.run_options.scan_layers else 0
    return make_block, types, period, repeats

  def run_shared_layers(self, module_cfg: ModuleConfig, block_cls: type, block_kwargs: dict,
                        shared: dict, x: Array, *args,
                        cache: Optional[dict] = None) -> tuple[Array, dict]:
    """Runs every layer with parameters owned by another stack (`share_blocks`).

    `shared` is that stack's params in the same layout (`layers/block_{s}` with a leading [R]
    axis and/or `layers_{i}`). The blocks are applied as pure functions of those arrays, so
    gradients flow to the owner and this stack creates no layer params.
    """
    make_block, types, period, repeats = self._block_factory(module_cfg, block_cls,
                                                             block_kwargs)
    rng = None if block_kwargs["deterministic"] else self.make_rng("dropout")
    cache = cache or {}
    new = {}

    def apply(module, params, x, layer_cache, rng):
      rngs = {} if rng is None else {"dropout": rng}
      return module.apply({"params": params}, x, *args, layer_cache, rngs=rngs)

    def next_rng(rng):
      return (None, None) if rng is None else tuple(jax.random.split(rng))

    if repeats:
      unit = _Unit(make_block, types[:period], parent=None)

      def body(carry, xs):
        x, rng = carry
        rng, sub = next_rng(rng)
        unit_params, unit_cache = xs
        x, unit_cache = apply(unit, unit_params, x, unit_cache, sub)
        return (x, rng), unit_cache

      (x, rng), new["layers"] = jax.lax.scan(body, (x, rng),
                                             (shared["layers"], cache.get("layers")))
    for i in range(repeats * period, len(types)):
      rng, sub = next_rng(rng)
      name = f"layers_{i}"
      x, new[name] = apply(make_block(layer_type=types[i], parent=None), shared[name], x,
                           cache.get(name), sub)
    return x, new

  def run_layers(self, module_cfg: ModuleConfig, block_cls: type, block_kwargs: dict, x: Array,
                 *args, cache: Optional[dict] = None) -> tuple[Array, dict]:
    """Runs every layer, unrolled or scanned over the repeating unit of layer types (the
    scanned cache too: one slice of it per repeat)."""
    make_block, types, period, repeats = self._block_factory(module_cfg, block_cls,
                                                             block_kwargs)
    cache = cache or {}
    new = {}
    if repeats:
      scanned = nn.scan(_Unit, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast,) * len(args) + (0,), length=repeats,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, new["layers"] = scanned(make_block, types[:period], name="layers")(
          x, *args, cache.get("layers"))
    for i in range(repeats * period, len(types)):
      name = f"layers_{i}"
      x, new[name] = make_block(layer_type=types[i], name=name)(x, *args, cache.get(name))
    return x, new

  def embedder(self, module_cfg: ModuleConfig, eoi_id: Optional[int] = None) -> Embedder:
    return Embedder(module_cfg.vocab_size, module_cfg.hidden_size, eoi_id=eoi_id,
                    dtype=self.run_options.activation_dtype,
                    param_dtype=self.run_options.parameter_dtype,
                    name="embedder")
