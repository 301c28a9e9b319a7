"""Pretraining objectives: exact lengths, exact reconstruction, published statistics and errors.

The token stream is a run of distinct consecutive ids cut into documents of random lengths, so
every example can be undone: filling the input sentinels with the target spans must give back
the stream. Expected chunk lengths come from a brute-force reading of the spec written here,
independently of the module's own sizing.
"""

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")

from t5gemma_jax.data import objectives  # noqa: E402
from t5gemma_jax.data.objectives import Denoiser  # noqa: E402

FIRST_ID = 100
TOP = 999_999
# T5-style: sentinels count down from the top of the vocabulary, far above the stream's ids.
SENTINELS = list(range(TOP, TOP - 300, -1))
MODES = {"[NLU]": 3, "[NLG]": 4, "[S2S]": 5}


def _stream(num_docs, rng_seed=0, max_doc=150):
  """Documents of random lengths (1..max_doc) over consecutive ids; returns (dataset, tokens)."""
  lengths = np.random.default_rng(rng_seed).integers(1, max_doc + 1, num_docs)
  tokens = np.arange(FIRST_ID, FIRST_ID + lengths.sum(), dtype=np.int32)
  docs = tf.RaggedTensor.from_row_lengths(tokens, lengths)
  dataset = tf.data.Dataset.from_tensor_slices(docs).map(lambda t: {"targets": t})
  return dataset, tokens


def _undo(example, mode=None):
  """Refills the inputs' sentinels with the target spans; returns (chunk, span lengths)."""
  inputs, targets = list(example["inputs"]), list(example["targets"])
  if mode is not None:
    assert inputs[0] == MODES[mode], f"mode token {inputs[0]} is not {mode}'s"
    inputs = inputs[1:]
  is_sentinel = [t in _SENTINEL_SET for t in targets]
  starts = [i for i, s in enumerate(is_sentinel) if s]
  assert starts and starts[0] == 0, f"targets do not open with a sentinel: {targets[:5]}"
  used = [targets[i] for i in starts]
  assert used == SENTINELS[:len(used)], f"sentinels out of order: {used[:6]}"
  spans = [targets[a + 1:b] for a, b in zip(starts, starts[1:] + [len(targets)])]
  assert [t for t in inputs if t in _SENTINEL_SET] == used, "inputs and targets disagree"
  chunk = []
  for t in inputs:
    chunk += spans[SENTINELS.index(t)] if t in _SENTINEL_SET else [t]
  return np.array(chunk), [len(s) for s in spans]


_SENTINEL_SET = set(SENTINELS)


def _spec_counts(length, r, mu, n=None):
  noise = min(max(round(length * r), 1), length - 1)
  return noise, (n if n else max(1, round(noise / mu)))


def _spec_raw_length(inputs_len, targets_len, r, mu, n=None, mode=False):
  """Largest chunk whose inputs (+mode, +EOS) and targets (+EOS) fit, by brute force."""
  best = None
  for length in range(2, 20 * inputs_len):
    noise, spans = _spec_counts(length, r, mu, n)
    if (length - noise + spans + 1 + mode <= inputs_len and noise + spans + 1 <= targets_len):
      best = length
  return best


def _take(preprocessor, dataset, inputs_len, targets_len, seed, count=None):
  ds = preprocessor(dataset, {"inputs": inputs_len, "targets": targets_len}, seed=seed)
  return list((ds.take(count) if count else ds).as_numpy_iterator())


@pytest.mark.parametrize("inputs_len", [64, 128])
def test_span_corruption_fills_inputs_and_rebuilds_the_stream(inputs_len):
  dataset, tokens = _stream(40)
  raw = _spec_raw_length(inputs_len, 128, 0.15, 3.0)
  prep = objectives.make_span_corruption(SENTINELS)
  for seed in range(6):
    examples = _take(prep, dataset, inputs_len, 128, seed)
    chunks = [_undo(x)[0] for x in examples]
    # The stream's remainder is kept, unless it is the single token that cannot be split.
    kept = len(tokens) - (len(tokens) % raw == 1)
    np.testing.assert_array_equal(np.concatenate(chunks), tokens[:kept])
    for x, chunk in zip(examples[:-1], chunks):
      assert len(chunk) == raw
      assert len(x["inputs"]) + 1 == inputs_len
      assert len(x["targets"]) + 1 <= 128
    assert len(examples[-1]["inputs"]) + 1 <= inputs_len


@pytest.mark.parametrize("mu,r", [(3.0, 0.15), (8.0, 0.5)])
def test_span_corruption_statistics(mu, r):
  dataset, _ = _stream(1300)
  examples = _take(objectives.make_span_corruption(SENTINELS, mu, r), dataset, 128, 128, 0)
  full = examples[:-1]
  undone = [_undo(x) for x in full]
  raw = _spec_raw_length(128, 128, r, mu)
  noise = np.array([sum(spans) for _, spans in undone]) / raw
  spans = np.concatenate([spans for _, spans in undone])
  assert len(full) >= 300
  assert abs(noise.mean() - r) < 0.01, noise.mean()
  assert abs(spans.mean() - mu) < 0.1 * mu, spans.mean()
  assert spans.std() > 0.5, "span lengths do not vary: the spans are not random"
  # Where the noise falls: uniformly inside the chunk (its ends are biased by construction: the
  # first run is kept and the last one is noise).
  masks = np.stack([np.isin(chunk, x["targets"]) for (chunk, _), x in zip(undone, full)])
  for quarter in np.array_split(masks.mean(axis=0), 4)[1:3]:
    assert abs(quarter.mean() - r) < 0.03, quarter.mean()


def test_sentinels_count_down_from_the_top():
  dataset, _ = _stream(10)
  x = _take(objectives.make_span_corruption(SENTINELS), dataset, 128, 128, 0, count=1)[0]
  used = [t for t in x["inputs"] if t >= TOP - 300]
  assert used == [TOP - k for k in range(len(used))] and len(used) > 3
  assert x["targets"][0] == TOP


@pytest.mark.parametrize("r,length,count", [(0.25, 64, 1500), (0.5, 32, 3000)])
def test_prefix_lm_target_fraction(r, length, count):
  dataset, tokens = _stream(count * length // 75 + 10)
  examples = _take(objectives.make_prefix_lm(r), dataset, length, length, 0, count)
  assert len(examples) == count
  rebuilt = np.concatenate([np.concatenate([x["inputs"], x["targets"]]) for x in examples])
  np.testing.assert_array_equal(rebuilt, tokens[:len(rebuilt)])
  assert all(len(x["inputs"]) + len(x["targets"]) == length for x in examples)
  assert all(len(x["inputs"]) >= 1 and len(x["targets"]) >= 1 for x in examples)
  fraction = np.mean([len(x["targets"]) / length for x in examples])
  assert abs(fraction - r) < 0.02, fraction


def _signature(d, inputs_len, targets_len):
  """What a full chunk of denoiser d looks like: (mode, noise tokens, spans)."""
  if d.prefix_lm:
    return d.mode, None, 0
  raw = _spec_raw_length(inputs_len, targets_len, d.noise_density, d.mean_span_length,
                         d.num_spans, mode=True)
  return (d.mode,) + _spec_counts(raw, d.noise_density, d.mean_span_length, d.num_spans)


@pytest.mark.slow
@pytest.mark.parametrize("preset,length,count", [("ul2", 256, 2100), ("t5gemma2", 128, 1600)])
def test_ul2_rates_and_mode_tokens(preset, length, count):
  denoisers, rates = objectives.ul2_preset(preset)
  signatures = [_signature(d, length, length) for d in denoisers]
  assert len(set(signatures)) == len(signatures), "denoisers indistinguishable at this length"
  dataset, _ = _stream(300)
  prep = objectives.make_ul2(denoisers, rates, SENTINELS, MODES)
  seen = np.zeros(len(denoisers))
  for x in _take(prep, dataset.repeat(), length, length, 0, count):
    mode = {v: k for k, v in MODES.items()}[x["inputs"][0]]
    if mode == "[S2S]" and not set(x["targets"]) & _SENTINEL_SET:
      signature = (mode, None, 0)
    else:
      chunk, spans = _undo(x, mode)
      signature = (mode, sum(spans), len(spans))
      d = denoisers[signatures.index(signature)]
      assert len(chunk) == _spec_raw_length(length, length, d.noise_density,
                                            d.mean_span_length, d.num_spans, mode=True)
    seen[signatures.index(signature)] += 1
    assert len(x["inputs"]) + 1 <= length and len(x["targets"]) + 1 <= length
  p = np.array(rates) / sum(rates)
  sigma = np.sqrt(p * (1 - p) / count)
  assert np.all(np.abs(seen / count - p) <= 3 * sigma), (seen / count, p)


def test_ul2_full_chunks_fill_the_inputs():
  dataset, _ = _stream(200)
  denoisers = [d for d in objectives.ul2_preset("ul2")[0] if not d.prefix_lm]
  prep = objectives.make_ul2(denoisers, [1.0] * len(denoisers), SENTINELS, MODES)
  examples = _take(prep, dataset.repeat(), 128, 128, 1, count=300)
  assert {len(x["inputs"]) + 1 for x in examples} == {128}


def test_ul2r_preset_rates():
  denoisers, rates = objectives.ul2_preset("ul2r")
  share = {}
  for d, rate in zip(denoisers, rates):
    share[d.mode] = share.get(d.mode, 0.0) + rate
  assert share == pytest.approx({"[S2S]": 0.5, "[NLU]": 0.25, "[NLG]": 0.25})
  assert len(set(rates[:2])) == 1 and len(set(rates[2:6])) == 1


@pytest.mark.slow
def test_seed_fixes_the_examples():
  dataset, _ = _stream(100)
  prep = objectives.make_ul2(*objectives.ul2_preset("ul2"), SENTINELS, MODES)
  lengths = {"inputs": 64, "targets": 64}

  def run(seed):
    return [(x["inputs"].tolist(), x["targets"].tolist())
            for x in prep(dataset.repeat(), lengths, seed=seed).take(60).as_numpy_iterator()]

  with seqio.utils.map_seed_manager(7):  # how a seqio Task passes its seed
    via_seqio = [(x["inputs"].tolist(), x["targets"].tolist())
                 for x in prep(dataset.repeat(), lengths).take(60).as_numpy_iterator()]
  assert run(7) == via_seqio
  assert run(8) != run(7)


def test_seqio_task_fills_sequence_length_and_output_features():
  dataset, _ = _stream(30)
  vocab = seqio.PassThroughVocabulary(TOP + 1, eos_id=1)
  task = seqio.Task(
      "objectives_test_span_corruption",
      source=seqio.FunctionDataSource(lambda split, shuffle_files, seed=None: dataset,
                                      splits=["train"]),
      preprocessors=[objectives.make_span_corruption(SENTINELS),
                     seqio.preprocessors.append_eos_after_trim],
      output_features={k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")})
  examples = list(task.get_dataset({"inputs": 64, "targets": 32}, shuffle=False, seed=3)
                  .as_numpy_iterator())
  assert {len(x["inputs"]) for x in examples[:-1]} == {64}
  assert all(x["inputs"][-1] == 1 and x["targets"][-1] == 1 for x in examples)


def test_sentinel_budget_names_the_denoiser():
  denoisers, rates = objectives.ul2_preset("ul2")
  worst = _signature(Denoiser(0.5, 3.0, mode="[NLG]"), 512, 512)[2]
  assert 120 <= worst <= 130  # about 128 spans at r=.5, mu=3
  dataset, _ = _stream(5)
  lengths = {"inputs": 512, "targets": 512}
  objectives.make_ul2(denoisers, rates, SENTINELS[:worst], MODES)(dataset, lengths)
  prep = objectives.make_ul2(denoisers, rates, SENTINELS[:worst - 1], MODES)
  with pytest.raises(ValueError, match=rf"span corruption \(mu=3, r=0.5\) makes up to {worst} "
                     rf"noise spans.*only {worst - 1} sentinel ids"):
    prep(dataset, lengths)


def test_too_short_lengths_say_which_objective_and_by_how_much():
  dataset, _ = _stream(5)
  with pytest.raises(ValueError, match=r"span corruption \(mu=3, r=0.15\).*input length 4 is "
                     r"short by 1"):
    objectives.make_span_corruption(SENTINELS)(dataset, {"inputs": 4, "targets": 64})
  with pytest.raises(ValueError, match=r"PrefixLM \(r=0.5\).*input length 1 is short by 1"):
    objectives.make_prefix_lm(0.5)(dataset, {"inputs": 1, "targets": 64})
  t5gemma2 = objectives.make_ul2(*objectives.ul2_preset("t5gemma2"), SENTINELS, MODES)
  with pytest.raises(ValueError, match=r"\[S2S\] span corruption \(n=1, r=0.75\).*target "
                     r"length 3 is short by 1"):
    t5gemma2(dataset, {"inputs": 64, "targets": 3})
  with pytest.raises(ValueError, match="sequence_length"):
    objectives.make_prefix_lm()(dataset, None)


def test_bad_configurations_are_named():
  with pytest.raises(ValueError, match=r"no id for mode token '\[NLG\]'"):
    objectives.make_ul2(*objectives.ul2_preset("ul2"), SENTINELS, {"[NLU]": 3, "[S2S]": 5})
  with pytest.raises(ValueError, match="repeat an id"):
    objectives.make_span_corruption([9, 8, 9])
  with pytest.raises(ValueError, match="noise_density"):
    Denoiser(1.5, 3.0)
  with pytest.raises(ValueError, match=r"span corruption \(mu=None, r=0.5\): needs"):
    Denoiser(0.5, None)
  with pytest.raises(ValueError, match="unknown UL2 preset"):
    objectives.ul2_preset("ul3")
