"""Looks at a task's data: decoded examples and statistics (lengths, noise, packing).

Backs `t5gemma show_task`. Sentinels and mode tokens stay visible in decoded text because
they are pieces of the vocabulary (`<extra_id_0>`, `[NLU]`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np
import seqio

from t5gemma_jax.data import pipeline


@dataclasses.dataclass
class TaskStats:
  """Statistics over the first `examples` examples of a split."""

  examples: int
  inputs_length: tuple[float, int]  # (mean, max) tokens, EOS included
  targets_length: tuple[float, int]
  sentinels_per_example: float
  noise_density: Optional[float]  # corrupted / original tokens, over examples with sentinels
  packing_efficiency: Mapping[str, float]  # non-padding fraction of packed rows
  rows_per_example: float


def _is_sentinel(ids: np.ndarray, vocab: seqio.Vocabulary) -> np.ndarray:
  extra = vocab.extra_ids
  return ids >= vocab.vocab_size - extra if extra else np.zeros(ids.shape, bool)


def examples(task_name: str, split: str, lengths: Mapping[str, int], n: int,
             seed: int = 0) -> list[dict]:
  """The first `n` preprocessed examples (numpy), in a fixed shuffled order."""
  task = pipeline.get_mixture_or_task(task_name)
  ds = task.get_dataset(dict(lengths), split=split, shuffle=True, seed=seed, num_epochs=1)
  return [{k: v for k, v in ex.items()} for ex in ds.take(n).as_numpy_iterator()]


def decode(example: Mapping, vocab: seqio.Vocabulary) -> dict[str, str]:
  """Token features -> text (EOS and padding removed, special pieces kept)."""
  out = {}
  for key in ("inputs", "targets"):
    if key in example:
      ids = [int(i) for i in example[key] if i not in (0, 1)]
      out[key] = vocab.decode(ids)
  return out


def stats(task_name: str, split: str, lengths: Mapping[str, int], n: int = 200,
          seed: int = 0) -> TaskStats:
  """Computes `TaskStats` over `n` examples, packing them into rows of `lengths`."""
  task = pipeline.get_mixture_or_task(task_name)
  vocab = task.output_features["targets"].vocabulary
  exs = examples(task_name, split, lengths, n, seed)
  if not exs:
    raise ValueError(f"task {task_name!r} split {split!r} yielded no examples")
  inp = np.array([len(e.get("inputs", ())) for e in exs])
  tgt = np.array([len(e["targets"]) for e in exs])
  sentinels = np.array([_is_sentinel(np.asarray(e.get("inputs", [])), vocab).sum() for e in exs])
  noise = None
  if sentinels.sum():
    # Targets hold one sentinel per span, the span's tokens and EOS; inputs hold the kept
    # tokens, one sentinel per span, EOS and possibly a mode token (not counted as text).
    corrupted = kept = 0
    for e, count in zip(exs, sentinels):
      if not count:  # supervised examples of a mixture have no noise to measure
        continue
      t = np.asarray(e["targets"])
      i = np.asarray(e["inputs"])
      corrupted += int((~_is_sentinel(t, vocab) & (t > 1)).sum())
      kept += int((~_is_sentinel(i, vocab) & (i > 1)).sum())
    noise = corrupted / max(corrupted + kept, 1)

  packed = seqio.get_dataset(task_name, dict(lengths), pipeline.feature_converter(pack=True),
                             dataset_split=split, shuffle=True, seed=seed, num_epochs=1,
                             verbose=False)
  rows, fill, segments = 0, {"encoder": 0.0, "decoder": 0.0}, []
  for row in packed.take(max(1, n // 4)).as_numpy_iterator():
    rows += 1
    fill["encoder"] += float((row["encoder_segment_ids"] > 0).mean())
    fill["decoder"] += float((row["decoder_segment_ids"] > 0).mean())
    segments.append(int(row["decoder_segment_ids"].max()))
  return TaskStats(
      examples=len(exs), inputs_length=(float(inp.mean()), int(inp.max())),
      targets_length=(float(tgt.mean()), int(tgt.max())),
      sentinels_per_example=float(sentinels.mean()), noise_density=noise,
      packing_efficiency={k: v / max(rows, 1) for k, v in fill.items()},
      rows_per_example=1.0 / max(float(np.mean(segments)), 1e-9))


def render(task_name: str, split: str, lengths: Mapping[str, int], n: int,
           seed: int = 0, stats_examples: int = 200) -> str:
  """The text `t5gemma show_task` prints."""
  task = pipeline.get_mixture_or_task(task_name)
  vocab = task.output_features["targets"].vocabulary
  lines = [f"task {task_name} ({split}), lengths {dict(lengths)}", ""]
  for k, ex in enumerate(examples(task_name, split, lengths, n, seed)):
    text = decode(ex, vocab)
    lines.append(f"--- example {k}")
    for key, value in text.items():
      lines.append(f"{key} ({len(ex[key])} tokens): {value}")
  s = stats(task_name, split, lengths, stats_examples, seed)
  lines += ["", f"statistics over {s.examples} examples:",
            f"  inputs length  mean {s.inputs_length[0]:.1f}  max {s.inputs_length[1]}",
            f"  targets length mean {s.targets_length[0]:.1f}  max {s.targets_length[1]}",
            f"  sentinels per example {s.sentinels_per_example:.2f}"]
  if s.noise_density is not None:
    lines.append(f"  noise density {s.noise_density:.3f}")
  lines.append("  packing: " + ", ".join(f"{k} {v:.1%} non-padding"
                                         for k, v in s.packing_efficiency.items())
               + f", {1 / s.rows_per_example:.2f} examples per row")
  return "\n".join(lines)


def list_tasks() -> Sequence[str]:
  return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
