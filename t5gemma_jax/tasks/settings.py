"""Data options applied before any task is used: one explicit call, `configure(settings)`.

The CLI builds `DataSettings` from gin (`data_settings.*` bindings) and calls `configure`;
Python users call it themselves. Nothing here reads gin.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

from t5gemma_jax import metrics
from t5gemma_jax.data import vocab
from t5gemma_jax.tasks import builtin, named_vocabularies, tfds_tasks


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Options of the task registries and vocabularies.

  Attributes:
    gemma_tokenizer: path of Gemma's tokenizer.model (TFDS tasks); also $T5GEMMA_TOKENIZER.
    builtin_vocab_size, builtin_sentinels: size of the vocabulary trained on the built-in
      corpus (must equal the model's vocab_size) and how many of its ids are sentinels.
    builtin_mixture_rates, c4_pretrain_rates: {task: rate} for builtin_mixture and
      c4_t5gemma_pretrain (None: the defaults).
    user_tasks: names of tasks registered by `file_task` (gin: `[@my_mt/file_task()]`).
    metric_mode: which metric fns the built-in and TFDS tasks score with, a key of
      `metrics.MODES`: "default", or "t5" for numbers comparable with the T5 codebase's
      (its BLEU tokeniser and ROUGE aggregation). File tasks name their metrics themselves.
  """
  gemma_tokenizer: Optional[str] = None
  builtin_vocab_size: int = 2048
  builtin_sentinels: int = 128
  builtin_mixture_rates: Optional[Mapping[str, float]] = None
  c4_pretrain_rates: Optional[Mapping[str, float]] = None
  user_tasks: Sequence[str] = ()
  metric_mode: str = "default"

  def __post_init__(self):
    object.__setattr__(self, "user_tasks", tuple(self.user_tasks))  # gin binds a list


def configure(settings: DataSettings = DataSettings()) -> None:
  """Applies `settings` to the vocabularies and (re)registers the mixtures that depend on them.

  Mixtures and the tasks that have metrics are always re-registered, so that a second
  command in one process (tests, notebooks) inherits neither the previous one's rates nor
  its metric mode.
  """
  suite = metrics.for_mode(settings.metric_mode)  # an unknown mode fails before any change
  if settings.gemma_tokenizer:
    vocab.set_gemma_tokenizer(settings.gemma_tokenizer)
  named_vocabularies.BUILTIN.configure(settings.builtin_vocab_size, settings.builtin_sentinels)
  builtin.register_supervised(suite)
  tfds_tasks.register_supervised(suite)
  builtin.register_mixture(settings.builtin_mixture_rates or builtin.DEFAULT_MIXTURE_RATES)
  if settings.c4_pretrain_rates is None:
    tfds_tasks.register_pretraining_mixture()
  else:
    tfds_tasks.register_pretraining_mixture(tuple(settings.c4_pretrain_rates.items()))
