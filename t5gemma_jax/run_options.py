"""How one run computes a model: dtypes, layer scan, rematerialisation, attention kernel.

None of this is part of what a checkpoint *is* (`config.T5GemmaConfig` holds that): the same
parameters train in bfloat16 on a TPU with splash attention and decode in float32 on a CPU. A run
directory records the architecture alone (`model_config.json`, `model.gin`); run options come
from the command's gin files (`RunOptions.*` bindings) each time.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import jax.numpy as jnp
import numpy as np

REMAT_POLICIES = ("none", "full", "minimal")
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "triton")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def common_dtype_name(dtypes: Iterable) -> str:
  """The `DTYPES` name shared by all of `dtypes` (numpy or jax dtypes, e.g. a params tree's),
  or "float32" when they mix, are empty or are none we compute in."""
  names = {str(np.dtype(d)) for d in dtypes}
  return names.pop() if len(names) == 1 and names <= set(DTYPES) else "float32"


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """Run-time choices that leave the parameters' meaning unchanged.

  Attributes:
    dtype: activation dtype name ("float32", "bfloat16"); softmax, norms and logits stay float32.
    param_dtype: dtype name in which parameters are created and stored.
    scan_layers: run each stack with `nn.scan` over its repeating unit of layers (parameters
      then live in the scanned layout, see `model.layout`).
    remat_policy: "none", "full" (recompute everything) or "minimal" (keep the named matmul
      outputs: projections, attention output, MLP activations).
    attention_impl: "xla" (portable, the reference), "cudnn" (GPU flash attention; needs no
      attention softcap), "triton" (a Pallas Triton GPU kernel that softcaps; T5Gemma 1 only) or
      "splash" (TPU Pallas kernel) for training, teacher forcing and
      the encoder pass of decoding; decoding's cached steps (one query) use "xla".
  """

  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"
  attention_impl: str = "xla"

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"RunOptions.{name} must be one of {sorted(DTYPES)}, "
                         f"got {getattr(self, name)!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"RunOptions.remat_policy must be one of {REMAT_POLICIES}, "
                       f"got {self.remat_policy!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"RunOptions.attention_impl must be one of {ATTENTION_IMPLS}, "
                       f"got {self.attention_impl!r}")

  @property
  def activation_dtype(self):
    return DTYPES[self.dtype]

  @property
  def parameter_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **changes) -> "RunOptions":
    return dataclasses.replace(self, **changes)

  def check(self, cfg) -> "RunOptions":
    """Raises ValueError when these options cannot run the architecture `cfg` (a
    `config.T5GemmaConfig` or `config.DecoderOnlyConfig`): the fused kernels have no attention dropout and cuDNN no softcap.

    Returns:
      self, so that callers can write `run = RunOptions(...).check(cfg)`.
    """
    if self.attention_impl == "xla":
      return self
    for side, m in cfg.stacks.items():
      if m.attention_dropout:
        raise ValueError(f"RunOptions.attention_impl={self.attention_impl!r} has no attention "
                         f"dropout; {side}.attention_dropout is {m.attention_dropout}")
      if self.attention_impl == "cudnn" and m.attn_logit_softcapping is not None:
        raise ValueError(f"RunOptions.attention_impl='cudnn' cannot softcap attention logits, "
                         f"but {side}.attn_logit_softcapping is {m.attn_logit_softcapping}; use "
                         "'xla', 'triton' (GPU) or 'splash' (TPU), or a config without "
                         "softcapping")
    return self
