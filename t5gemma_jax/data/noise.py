"""Noise for the denoising objectives: how many tokens to corrupt, in how many spans, and where.

A chunk's length alone fixes its counts (`span_counts`), so the same formula sizes the chunks in
python at dataset construction and draws the masks inside tf.data (`span_counts_tf`, in float64
so that both round the same products the same way: half to even). Span placement follows T5's
`random_spans_noise_mask`: the noise and non-noise token counts are each cut into `num_spans`
non-empty parts, uniformly at random, and interleaved starting with non-noise.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf


def span_counts(length: int, noise_density: float, mean_span_length: float,
                num_spans: Optional[int] = None) -> tuple[int, int]:
  """Noise tokens and noise spans for a chunk of `length` tokens (length >= 2).

  num_noise = round(length * noise_density) clipped to [1, length - 1]; num_spans =
  max(1, round(num_noise / mean_span_length)), or the fixed `num_spans`, at most num_noise and
  length - num_noise so that every span and every gap holds a token.

  Returns:
    (num_noise, num_spans), python ints.
  """
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  spans = num_spans if num_spans else max(1, int(round(num_noise / mean_span_length)))
  return num_noise, min(spans, num_noise, length - num_noise)


def span_counts_tf(length: tf.Tensor, noise_density: float, mean_span_length: float,
                   num_spans: Optional[int] = None) -> tuple[tf.Tensor, tf.Tensor]:
  """`span_counts` for a length known only in the graph (the last, short chunk of a stream).

  Returns:
    (num_noise, num_spans), int32 scalars.
  """
  n = tf.cast(length, tf.float64)
  num_noise = tf.cast(tf.round(n * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, tf.maximum(length - 1, 1))
  if num_spans:
    spans = tf.constant(num_spans, tf.int32)
  else:
    spans = tf.cast(tf.round(tf.cast(num_noise, tf.float64) / mean_span_length), tf.int32)
    spans = tf.maximum(spans, 1)
  return num_noise, tf.minimum(spans, tf.minimum(num_noise, length - num_noise))


def random_partition(total: tf.Tensor, parts: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Cuts `total` items into `parts` non-empty runs, uniformly over all such cuts.

  Args:
    total: int32 scalar, >= parts.
    parts: int32 scalar, >= 1.
    seed: int32 [2], a stateless seed.

  Returns:
    int32 [parts], positive run lengths summing to `total`.
  """
  # Choosing parts-1 distinct cut points among the total-1 gaps is uniform over compositions.
  gaps = tf.random.experimental.stateless_shuffle(tf.range(1, total, dtype=tf.int32), seed)
  cuts = tf.sort(gaps[:parts - 1])
  bounds = tf.concat([[0], cuts, [total]], axis=0)
  return bounds[1:] - bounds[:-1]


def random_spans_mask(length: tf.Tensor, noise_density: float, mean_span_length: float,
                      num_spans: Optional[int], seeds: Sequence[tf.Tensor]) -> tf.Tensor:
  """A noise mask of `num_spans` noise runs, the first run non-noise, the last noise.

  Args:
    length: int32 scalar, the chunk length (>= 2).
    noise_density: fraction of the tokens to corrupt.
    mean_span_length: mean noise-span length (ignored when num_spans is set).
    num_spans: a fixed number of spans, or None to derive it from the mean.
    seeds: two int32 [2] stateless seeds (noise cuts, non-noise cuts).

  Returns:
    bool [length], True on noise tokens.
  """
  num_noise, spans = span_counts_tf(length, noise_density, mean_span_length, num_spans)
  noise = random_partition(num_noise, spans, seeds[0])
  kept = random_partition(length - num_noise, spans, seeds[1])
  runs = tf.reshape(tf.stack([kept, noise], axis=1), [-1])
  return tf.repeat(tf.tile([False, True], [spans]), runs)


def spans_to_sentinels(tokens: tf.Tensor, mask: tf.Tensor,
                       sentinel_ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Replaces noise span k by sentinel k in the inputs; the targets list S_k then span k.

  Args:
    tokens: int32 [L].
    mask: bool [L] from `random_spans_mask` (starts with non-noise, ends with noise).
    sentinel_ids: int32 [S], S >= the number of noise spans; sentinel k is sentinel_ids[k].

  Returns:
    (inputs, targets): int32 [L - noise + spans] and int32 [noise + spans].
  """
  noise_start = mask & ~tf.pad(mask[:-1], [[1, 0]], constant_values=False)
  kept_start = ~mask & tf.pad(mask[:-1], [[1, 0]], constant_values=True)
  # The mask alternates kept/noise runs starting with kept, so the k-th run of either kind
  # belongs to span k: the k-th kept run's first token is where the targets put sentinel k.
  input_ids = tf.where(noise_start, _nth_sentinel(noise_start, sentinel_ids), tokens)
  target_ids = tf.where(kept_start, _nth_sentinel(kept_start, sentinel_ids), tokens)
  return (tf.boolean_mask(input_ids, ~mask | noise_start),
          tf.boolean_mask(target_ids, mask | kept_start))


def _nth_sentinel(starts: tf.Tensor, sentinel_ids: tf.Tensor) -> tf.Tensor:
  # Positions before the first start get index 0; tf.where drops them, but gather must not fail.
  index = tf.maximum(tf.cumsum(tf.cast(starts, tf.int32)) - 1, 0)
  return tf.gather(sentinel_ids, index)
