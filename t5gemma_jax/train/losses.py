"""Cross-entropy with z-loss and label smoothing, summed over real target tokens.

Losses are returned as sums with the weight total beside them, so that microbatches and data
shards add up exactly and the division by real tokens happens once, at the end of a step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """z_loss: weight of log(Z)^2 (stabilises the softmax normaliser); label_smoothing: mass
  spread uniformly over the other classes."""

  z_loss: float = 1e-4
  label_smoothing: float = 0.0


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                       cfg: LossConfig) -> dict[str, jax.Array]:
  """Summed losses for one batch.

  Args:
    logits: float32 [B, T, V].
    targets: int [B, T] target ids.
    weights: [B, T] loss weights (0 on padding; packing-aware via seqio's decoder_loss_weights).
    cfg: loss options.

  Returns:
    float32 scalars: "loss" (cross-entropy + z-loss), "z_loss", "cross_entropy", "correct"
    (argmax hits) and "weight" (sum of weights, the number of real target tokens).
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  confidence = 1.0 - cfg.label_smoothing
  low = cfg.label_smoothing / (vocab - 1)
  target_lp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  if cfg.label_smoothing:
    # Subtract the entropy of the smoothed target distribution so a perfect model scores 0.
    normaliser = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
    ce = -(confidence * target_lp + low * (log_probs.sum(-1) - target_lp)) - normaliser
  else:
    ce = -target_lp
  z = cfg.z_loss * jnp.square(log_z)
  w = weights.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {"loss": jnp.sum((ce + z) * w), "z_loss": jnp.sum(z * w),
          "cross_entropy": jnp.sum(ce * w), "correct": jnp.sum(correct * w),
          "weight": jnp.sum(w)}
