"""The training state: one pytree that is sharded, stepped, checkpointed and restored whole."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """Attributes: step (int32 scalar), params (model params), opt_state (optax state)."""

  step: jax.Array
  params: Any
  opt_state: Any
