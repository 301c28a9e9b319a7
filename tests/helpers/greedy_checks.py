"""The check every cached-decoding test shares: greedy tokens = the teacher-forced argmax."""

import jax
import numpy as np

from tests.helpers.nets import net_for


def teacher_forced_argmax(cfg, params, enc: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  """int [B, N]: the model's argmax at each position when fed BOS + tokens[:, :-1]."""
  b = tokens.shape[0]
  dec = np.concatenate([np.full((b, 1), cfg.bos_id, np.int32), tokens[:, :-1]], axis=1)
  logits = jax.jit(net_for(cfg, params).apply)(
      {"params": params}, enc, dec, encoder_segment_ids=(enc > 0).astype(np.int32),
      decoder_segment_ids=np.ones_like(dec))
  return np.asarray(logits.argmax(-1))


def assert_greedy_is_teacher_forced(cfg, params, enc: np.ndarray, out: np.ndarray,
                                    min_length: int = 1) -> None:
  """Each row of `out` (generated tokens) up to its first EOS equals the teacher-forced argmax;
  rows must reach `min_length` tokens (e.g. to be sure a sliding ring has wrapped)."""
  expected = teacher_forced_argmax(cfg, params, enc, out)
  for row in range(out.shape[0]):
    eos = np.flatnonzero(out[row] == cfg.eos_id)
    end = eos[0] + 1 if len(eos) else out.shape[1]
    assert end >= min_length, f"row {row} stopped after {end} tokens"
    np.testing.assert_array_equal(out[row, :end], expected[row, :end])
