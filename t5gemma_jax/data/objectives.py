"""Pretraining objectives as seqio preprocessors: T5 span corruption, PrefixLM and UL2 mixtures.

Each `make_*` factory binds the special token ids (the caller reads them from its vocabulary) and
returns a preprocessor with seqio's signature `(dataset, sequence_length, output_features)`: a
Task lists it after tokenization and seqio fills those two arguments by name. The dataset holds
1-D int "targets" of real text without EOS; the result holds int32 "inputs" and "targets" that fit
the sequence length once EOS is appended to both (features with add_eos=True, and
seqio.preprocessors.append_eos_after_trim listed after this preprocessor).

The token stream is concatenated across documents and cut into raw chunks (T5's
reduce_concat_tokens + split_tokens). Each denoiser has its own chunk length, the largest whose
example fits: a full chunk's inputs (mode token, EOS included) fill the input length exactly
unless its targets would overflow the target length first. The stream's last chunk may be
shorter (a 1-token remainder is dropped: it cannot be split). Randomness is stateless, drawn from
seqio.map_over_dataset seeds, so seqio's seed (or `seed=` here) reproduces the data exactly.

UL2 (arXiv 2205.05131) follows the published recipe: the documents are sharded, one shard per
denoiser, and the denoised shards are mixed at the given rates. Mode tokens: "[NLU]" for
regular denoising (R), "[NLG]" for extreme denoising (X: long spans or high density), "[S2S]"
for sequential denoising (S: PrefixLM, and t5gemma2's single final span, which is a PrefixLM
with sentinel).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Mapping, Optional, Sequence

from absl import logging
import seqio
import tensorflow as tf

from t5gemma_jax.data import noise

Preprocessor = Callable[..., tf.data.Dataset]
AUTOTUNE = tf.data.AUTOTUNE
# Bound on raw chunk lengths: far beyond any sequence length, it only stops runaway searches.
_MAX_RAW_LENGTH = 1 << 24


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One denoising task (plain data, so gin can build and override mixtures).

  Attributes:
    noise_density: fraction of each chunk moved to the targets (0 < r < 1).
    mean_span_length: mean noise-span length (span corruption; unused when num_spans is set).
    num_spans: a fixed number of noise spans per chunk, or None to derive it from the mean.
    prefix_lm: True for PrefixLM: the targets are a random suffix, and no sentinels are used.
    mode: the mode token prepended to the inputs (a key of `mode_ids`), or None for none.
  """
  noise_density: float
  mean_span_length: Optional[float] = 3.0
  num_spans: Optional[int] = None
  prefix_lm: bool = False
  mode: Optional[str] = None

  def __post_init__(self):
    if not 0.0 < self.noise_density < 1.0:
      raise ValueError(f"{self.name}: noise_density must lie in (0, 1)")
    if self.num_spans is not None and self.num_spans < 1:
      raise ValueError(f"{self.name}: num_spans must be >= 1")
    if (not self.prefix_lm and self.num_spans is None
        and not (self.mean_span_length and self.mean_span_length > 0)):
      raise ValueError(f"{self.name}: needs mean_span_length > 0 or num_spans")

  @property
  def name(self) -> str:
    mode = f"{self.mode} " if self.mode else ""
    if self.prefix_lm:
      return f"{mode}PrefixLM (r={self.noise_density:g})"
    spans = (f"n={self.num_spans}" if self.num_spans is not None
             else f"mu={self.mean_span_length:g}" if self.mean_span_length
             else f"mu={self.mean_span_length}")
    return f"{mode}span corruption ({spans}, r={self.noise_density:g})"


def ul2_preset(name: str) -> tuple[tuple[Denoiser, ...], tuple[float, ...]]:
  """A published mixture of denoisers and its sampling rates.

  Args:
    name: "ul2" (the paper's seven, equal rates), "ul2r" (arXiv 2210.11399: 50% S, 25% R,
      25% X, each share split equally among the family's UL2 denoisers) or "t5gemma2" (five
      denoisers (mu, r, n): (3, .15), (12, .5), (32, .15), (32, .5) and one span of 75% of the
      chunk, n=1, which always falls at the end; rates 1:1:1:1:4).

  Returns:
    (denoisers, rates): equal-length tuples; rates are relative weights.
  """
  r_family = (Denoiser(0.15, 3.0, mode="[NLU]"), Denoiser(0.15, 8.0, mode="[NLU]"))
  x_family = (Denoiser(0.5, 3.0, mode="[NLG]"), Denoiser(0.5, 8.0, mode="[NLG]"),
              Denoiser(0.15, 64.0, mode="[NLG]"), Denoiser(0.5, 64.0, mode="[NLG]"))
  s_family = (Denoiser(0.25, None, prefix_lm=True, mode="[S2S]"),)
  if name == "ul2":
    denoisers = r_family + x_family + s_family
    return denoisers, (1.0,) * len(denoisers)
  if name == "ul2r":
    shares = ((r_family, 0.25), (x_family, 0.25), (s_family, 0.5))
    return (sum((f for f, _ in shares), ()),
            sum(((share / len(f),) * len(f) for f, share in shares), ()))
  if name == "t5gemma2":
    return ((Denoiser(0.15, 3.0, mode="[NLU]"), Denoiser(0.5, 12.0, mode="[NLG]"),
             Denoiser(0.15, 32.0, mode="[NLG]"), Denoiser(0.5, 32.0, mode="[NLG]"),
             Denoiser(0.75, None, num_spans=1, mode="[S2S]")),
            (1.0, 1.0, 1.0, 1.0, 4.0))
  raise ValueError(f"unknown UL2 preset {name!r} (known: 'ul2', 'ul2r', 't5gemma2')")


# -------------------------------------------------------------------------------- sizing


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
  """How a denoiser cuts the stream at a given sequence length.

  Attributes:
    raw_length: tokens per full chunk.
    inputs_length: the longest inputs, mode token and EOS included (a full span-corruption
      chunk's inputs have exactly this length).
    targets_length: the longest targets, EOS included.
    max_spans: noise spans (sentinels) of a full chunk; 0 for PrefixLM.
  """
  raw_length: int
  inputs_length: int
  targets_length: int
  max_spans: int


def _prefix_max_target(length: int, noise_density: float) -> int:
  return min(max(int(round(2 * noise_density * length)) - 1, 1), length - 1)


def _core_lengths(d: Denoiser, length: int) -> tuple[int, int]:
  """Longest inputs and targets of a `length`-token chunk, without mode token or EOS."""
  if d.prefix_lm:
    return length - 1, _prefix_max_target(length, d.noise_density)
  num_noise, spans = noise.span_counts(length, d.noise_density, d.mean_span_length,
                                       d.num_spans)
  return length - num_noise + spans, num_noise + spans


def _smallest_chunk(d: Denoiser) -> int:
  """The shortest chunk that shows the denoiser's density without clipping."""
  for length in range(2, _MAX_RAW_LENGTH):
    if d.prefix_lm:
      if round(2 * d.noise_density * length) - 1 >= 1:
        return length
    elif 1 <= round(length * d.noise_density) <= length - 1:
      return length
  raise ValueError(f"{d.name}: no chunk length suits noise_density {d.noise_density}")


def chunk_plan(d: Denoiser, inputs_length: int, targets_length: int,
               inputs_extra: int = 1, targets_extra: int = 1) -> ChunkPlan:
  """The largest raw chunk length whose examples fit (T5's random_spans_helper, generalized).

  Args:
    d: the denoiser.
    inputs_length: the input sequence length.
    targets_length: the target sequence length.
    inputs_extra: input positions taken besides the chunk's tokens (EOS, mode token).
    targets_extra: target positions taken besides them (EOS).

  Returns:
    The `ChunkPlan`.

  Raises:
    ValueError: naming the objective and the shortfall, when not even the smallest chunk fits.
  """
  def overflow(length):
    ins, tgt = _core_lengths(d, length)
    return ins + inputs_extra - inputs_length, tgt + targets_extra - targets_length

  low = _smallest_chunk(d)
  if max(overflow(low)) > 0:
    over_in, over_tgt = overflow(low)
    short = [f"{side} length {have} is short by {over}" for side, have, over in
             (("input", inputs_length, over_in), ("target", targets_length, over_tgt)) if over > 0]
    raise ValueError(f"{d.name} cannot fit one example: its smallest chunk ({low} tokens) needs "
                     f"{over_in + inputs_length} input and {over_tgt + targets_length} target "
                     f"positions; {' and '.join(short)}")
  # Both lengths grow monotonically with the chunk, so the chunks that fit form a prefix.
  high = low + 1
  while max(overflow(high)) <= 0 and high < _MAX_RAW_LENGTH:
    low, high = high, min(2 * high, _MAX_RAW_LENGTH)
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (mid, high) if max(overflow(mid)) <= 0 else (low, mid)
  ins, tgt = _core_lengths(d, low)
  spans = 0 if d.prefix_lm else noise.span_counts(low, d.noise_density, d.mean_span_length,
                                                   d.num_spans)[1]
  return ChunkPlan(low, ins + inputs_extra, tgt + targets_extra, spans)


# -------------------------------------------------------------------------------- preprocessors


def make_span_corruption(sentinel_ids: Sequence[int], mean_noise_span_length: float = 3.0,
                         noise_density: float = 0.15) -> Preprocessor:
  """T5 span corruption: inputs n0 S0 n1 S1 ..., targets S0 s0 S1 s1 ... (no mode token).

  Args:
    sentinel_ids: sentinel k replaces noise span k (T5 vocabularies: vocab_size - 1 - k).
    mean_noise_span_length: mean noise-span length, mu.
    noise_density: fraction of tokens corrupted, r.

  Returns:
    A seqio preprocessor `(dataset, sequence_length, output_features=None, seed=None)`.
  """
  return _make_mixture((Denoiser(noise_density, mean_noise_span_length),), (1.0,),
                       sentinel_ids, {}, "span_corruption")


def make_prefix_lm(noise_density: float = 0.5) -> Preprocessor:
  """PrefixLM: inputs are a chunk's prefix, targets the rest (no sentinels, no mode token).

  The target length is uniform on [1, round(2 r L) - 1] (clipped to [1, L - 1]) for a chunk of L
  tokens, so the target fraction averages r.

  Args:
    noise_density: mean fraction of each chunk in the targets, r.

  Returns:
    A seqio preprocessor `(dataset, sequence_length, output_features=None, seed=None)`.
  """
  return _make_mixture((Denoiser(noise_density, None, prefix_lm=True),), (1.0,), (), {},
                       "prefix_lm")


def make_ul2(denoisers: Sequence[Denoiser], rates: Sequence[float], sentinel_ids: Sequence[int],
             mode_ids: Mapping[str, int]) -> Preprocessor:
  """A UL2 mixture of denoisers, each example prefixed with its denoiser's mode token.

  Args:
    denoisers: the denoisers, e.g. from `ul2_preset`.
    rates: their relative sampling rates (non-negative, not all zero).
    sentinel_ids: sentinel k replaces noise span k.
    mode_ids: mode token ids, e.g. {"[NLU]": id, "[NLG]": id, "[S2S]": id}.

  Returns:
    A seqio preprocessor `(dataset, sequence_length, output_features=None, seed=None)`.
  """
  return _make_mixture(tuple(denoisers), tuple(rates), sentinel_ids, mode_ids, "ul2")


def _make_mixture(denoisers: tuple[Denoiser, ...], rates: tuple[float, ...],
                  sentinel_ids: Sequence[int], mode_ids: Mapping[str, int],
                  name: str) -> Preprocessor:
  sentinels = [int(s) for s in sentinel_ids]
  if len(set(sentinels)) != len(sentinels):
    raise ValueError(f"{name}: sentinel_ids repeat an id; each span needs its own sentinel")
  if not denoisers or len(rates) != len(denoisers):
    raise ValueError(f"{name}: {len(denoisers)} denoisers but {len(rates)} rates")
  if min(rates) < 0 or sum(rates) <= 0:
    raise ValueError(f"{name}: rates must be non-negative and not all zero, got {rates}")
  for d in denoisers:
    if d.mode is not None and d.mode not in mode_ids:
      raise ValueError(f"{name}: no id for mode token {d.mode!r} of {d.name} in mode_ids "
                       f"(has {sorted(mode_ids)})")
  clash = set(sentinels) & {int(mode_ids[d.mode]) for d in denoisers if d.mode is not None}
  if clash:
    raise ValueError(f"{name}: ids {sorted(clash)} are both mode tokens and sentinels")

  def preprocess(dataset: tf.data.Dataset, sequence_length: Optional[Mapping[str, int]],
                 output_features: Optional[Mapping[str, seqio.Feature]] = None,
                 seed: Optional[int] = None) -> tf.data.Dataset:
    """Denoises a token stream into examples (seqio fills the two length arguments by name).

    Args:
      dataset: examples with "targets": int [n], tokens of real text without EOS.
      sequence_length: {"inputs": I, "targets": T}, the lengths after EOS is appended.
      output_features: seqio features; a feature with add_eos=False frees the EOS position.
      seed: an initial map seed; None keeps the one seqio's map_seed_manager set (Task seed).

    Returns:
      Examples {"inputs": int32 [<= I - 1], "targets": int32 [<= T - 1]} (<= I, <= T for
      features with add_eos=False); full span-corruption chunks make inputs of exactly I - 1
      unless the targets bind first.

    Raises:
      ValueError: a length too short for an objective, or too few sentinels for its spans.
    """
    plans = _plans(name, denoisers, sentinels, sequence_length, output_features)
    with contextlib.nullcontext() if seed is None else seqio.utils.map_seed_manager(seed):
      shards = [dataset.shard(len(denoisers), i) if len(denoisers) > 1 else dataset
                for i in range(len(denoisers))]
      outs = [_denoise(shard, d, plan, sentinels, mode_ids.get(d.mode))
              for shard, d, plan in zip(shards, denoisers, plans)]
      return outs[0] if len(outs) == 1 else _mix(outs, rates)

  preprocess.__name__ = preprocess.__qualname__ = name
  return preprocess


def _plans(name: str, denoisers: Sequence[Denoiser], sentinels: Sequence[int],
           sequence_length: Optional[Mapping[str, int]],
           output_features: Optional[Mapping[str, seqio.Feature]]) -> list[ChunkPlan]:
  """Sizes each denoiser's chunks; fails here, before any example, on lengths or sentinels."""
  if not sequence_length or any(sequence_length.get(k) is None for k in ("inputs", "targets")):
    raise ValueError(f"{name}: needs a sequence_length with 'inputs' and 'targets' lengths, "
                     f"got {sequence_length}")

  def eos(key):
    feature = (output_features or {}).get(key)
    return 1 if feature is None or feature.add_eos else 0

  plans = [chunk_plan(d, sequence_length["inputs"], sequence_length["targets"],
                      eos("inputs") + (d.mode is not None), eos("targets")) for d in denoisers]
  for d, plan in zip(denoisers, plans):
    logging.info("%s: %s cuts %d-token chunks: inputs <= %d, targets <= %d, %d spans", name,
                 d.name, plan.raw_length, plan.inputs_length, plan.targets_length,
                 plan.max_spans)
  worst = max(range(len(plans)), key=lambda i: plans[i].max_spans)
  if plans[worst].max_spans > len(sentinels):
    raise ValueError(f"{name}: {denoisers[worst].name} makes up to {plans[worst].max_spans} "
                     f"noise spans at input length {sequence_length['inputs']}, but only "
                     f"{len(sentinels)} sentinel ids were given")
  return plans


def _denoise(dataset: tf.data.Dataset, d: Denoiser, plan: ChunkPlan, sentinels: Sequence[int],
             mode_id: Optional[int]) -> tf.data.Dataset:
  """Concatenates the documents, cuts `plan.raw_length`-token chunks and corrupts each."""
  stream = dataset.map(lambda x: tf.cast(tf.reshape(x["targets"], [-1]), tf.int32),
                       num_parallel_calls=AUTOTUNE)
  # rebatch regroups the token stream across document boundaries without per-token elements.
  chunks = stream.rebatch(plan.raw_length).filter(lambda c: tf.size(c) >= 2)
  sentinel_tensor = tf.constant(sentinels or [0], tf.int32)

  @seqio.map_over_dataset(num_seeds=2)
  def corrupt(chunk, seeds):
    if d.prefix_lm:
      inputs, targets = _split_prefix(chunk, d.noise_density, seeds[0])
    else:
      mask = noise.random_spans_mask(tf.size(chunk), d.noise_density, d.mean_span_length,
                                     d.num_spans, seeds)
      inputs, targets = noise.spans_to_sentinels(chunk, mask, sentinel_tensor)
    if mode_id is not None:
      inputs = tf.concat([tf.constant([mode_id], tf.int32), inputs], axis=0)
    return {"inputs": inputs, "targets": targets}

  return corrupt(chunks)


def _split_prefix(chunk: tf.Tensor, noise_density: float,
                  seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Splits int32 [L] into a prefix and a suffix of length uniform on [1, max target]."""
  length = tf.size(chunk)
  most = tf.cast(tf.round(2.0 * noise_density * tf.cast(length, tf.float64)), tf.int32) - 1
  most = tf.clip_by_value(most, 1, length - 1)
  target = tf.random.stateless_uniform([], seed, minval=1, maxval=most + 1, dtype=tf.int32)
  return chunk[:length - target], chunk[length - target:]


def _mix(datasets: list[tf.data.Dataset], rates: Sequence[float]) -> tf.data.Dataset:
  """Samples the denoised shards at `rates`; a shard that runs out drops from the draw."""
  logits = tf.math.log(tf.constant([r / sum(rates) for r in rates], tf.float32))[None]

  # Seeded through map_over_dataset like the corruption itself, so the task seed fixes it too.
  @seqio.map_over_dataset(num_seeds=1)
  def pick(_, seed):
    return tf.random.stateless_categorical(logits, 1, seed, dtype=tf.int64)[0, 0]

  choices = pick(tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).repeat())
  return tf.data.Dataset.choose_from_datasets(datasets, choices, stop_on_empty_dataset=False)
