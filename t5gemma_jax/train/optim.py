"""Optimizers, learning-rate schedules and parameter groups, built from plain dataclass configs.

Every parameter belongs to one group (see `param_groups`): "embeddings", "cross_attention",
"encoder" or "decoder". Groups can train at a multiple of the scheduled learning rate or be
frozen. `make_optimizer` applies, in this order:

  1. frozen groups' gradients are zeroed, so they neither move nor count in step 2 (as in
     PyTorch, where frozen parameters have no gradient to clip);
  2. global-norm clipping of the remaining gradient, all groups together;
  3. per group: AdamW or Adafactor preconditioning, decoupled weight decay, then the
     scheduled learning rate times the group's multiplier (`optax.multi_transform`; frozen
     groups get `optax.set_to_zero()` and hold no optimizer state).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from t5gemma_jax.convert import param_schema

Params = Any
# The groups and the rule that assigns them are the parameter schema's, so a checkpoint's
# tensors and the optimizer agree on what, say, "cross_attention" covers.
GROUPS = param_schema.GROUPS
SCHEDULES = ("constant", "rsqrt", "cosine", "linear")
OPTIMIZERS = ("adamw", "adafactor")


# ----------------------------------------------------------------------------------- groups


def _names(path) -> list[str]:
  # Only dict keys name modules; anything else on the path (e.g. a box's attribute) is not one.
  return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def _group_of(path) -> str:
  return param_schema.group_of(_names(path))


def param_groups(params: Params) -> Params:
  """Labels every parameter with its group; the layout (scanned or not) does not matter.

  Args:
    params: a T5Gemma parameter tree `{"encoder": ..., "decoder": ...}`, of arrays or of
      abstract shapes (`jax.ShapeDtypeStruct`).

  Returns:
    A tree of the same structure whose leaves are "embeddings" (both stacks'
    `embedder/embedding`, and T5Gemma 2's `embedder/eoi_embedding`), "cross_attention" (the decoder's `cross_attn` kernels and its
    `pre_cross_attn_norm` / `post_cross_attn_norm` scales), "encoder" or "decoder" (the rest).
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: _group_of(path), params)


def decay_mask(params: Params) -> Params:
  """True where weight decay applies: every parameter except norm scales.

  Norm scales are the 1-D parameters of the unscanned layout; they are picked by name (leaf
  "scale") so that their stacked 2-D form in the scanned layout is excluded too. Embeddings
  are decayed like the other matrices.

  Args:
    params: a parameter tree (arrays or abstract shapes).

  Returns:
    A tree of bools of the same structure.
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: _names(path)[-1:] != ["scale"], params)


def _check_groups(names, what: str) -> None:
  unknown = [g for g in names if g not in GROUPS]
  if unknown:
    raise ValueError(f"{what}: unknown group(s) {unknown}; known groups: {', '.join(GROUPS)}")


# -------------------------------------------------------------------------------- schedules


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """A learning-rate schedule; the step is the number of updates already applied.

  Every schedule warms up linearly from 0 at step 0 to `learning_rate` at `warmup_steps`
  (no warmup when it is 0), then:
    constant: stays at `learning_rate`.
    rsqrt:    `learning_rate * sqrt(warmup_steps / step)`, i.e. T5X's
              `base / sqrt(max(step, warmup_steps))` with `base = learning_rate *
              sqrt(warmup_steps)`, whose flat first `warmup_steps` are replaced by the linear
              ramp to the same value; needs `warmup_steps >= 1`.
    cosine:   half a cosine from `learning_rate` at `warmup_steps` to `learning_rate *
              end_fraction` at `total_steps`, constant after.
    linear:   a straight line between the same two points, constant after.

  Attributes:
    name: one of `SCHEDULES`.
    learning_rate: the peak learning rate, reached at `warmup_steps`.
    warmup_steps: length of the linear warmup.
    total_steps: where cosine and linear decay end (> warmup_steps); unused otherwise.
    end_fraction: the final learning rate of cosine and linear, as a fraction of the peak.
  """

  name: str = "rsqrt"
  learning_rate: float = 1e-2
  warmup_steps: int = 10_000
  total_steps: Optional[int] = None
  end_fraction: float = 0.0

  def __post_init__(self):
    if self.name not in SCHEDULES:
      raise ValueError(f"unknown schedule {self.name!r}; known schedules: {', '.join(SCHEDULES)}")
    if self.warmup_steps < 0:
      raise ValueError(f"ScheduleConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
    if self.name == "rsqrt" and self.warmup_steps < 1:
      raise ValueError("the rsqrt schedule needs warmup_steps >= 1 (1/sqrt(step) is infinite "
                       "at step 0)")
    if self.name in ("cosine", "linear") and (self.total_steps is None
                                              or self.total_steps <= self.warmup_steps):
      raise ValueError(f"the {self.name} schedule needs total_steps > warmup_steps "
                       f"({self.warmup_steps}), got {self.total_steps}")


def make_schedule(cfg: ScheduleConfig) -> optax.Schedule:
  """Builds the schedule as a pure function of the step.

  Args:
    cfg: the schedule config.

  Returns:
    A function from the step (int or int array) to a float32 learning rate.
  """
  peak, warmup = cfg.learning_rate, cfg.warmup_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    ramp = jnp.minimum(step / warmup, 1.0) if warmup else jnp.ones_like(step)
    if cfg.name == "constant":
      after = jnp.ones_like(step)
    elif cfg.name == "rsqrt":
      after = jnp.sqrt(warmup / jnp.maximum(step, warmup))
    else:
      frac = jnp.clip((step - warmup) / (cfg.total_steps - warmup), 0.0, 1.0)
      shape = 0.5 * (1.0 + jnp.cos(math.pi * frac)) if cfg.name == "cosine" else 1.0 - frac
      after = cfg.end_fraction + (1.0 - cfg.end_fraction) * shape
    return peak * ramp * after

  return schedule


# ------------------------------------------------------------------------------- optimizers


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """An optimizer with its schedule, clipping, weight decay and parameter-group options.

  Attributes:
    name: "adamw" or "adafactor".
    schedule: the learning-rate schedule.
    weight_decay: decoupled weight decay, multiplied by the group's learning rate as in
      `optax.adamw`; never applied to norm scales (see `decay_mask`). 0 disables it.
    b1, b2, eps: AdamW's moment decays and denominator epsilon.
    adafactor_decay_rate: Adafactor's second-moment decay `1 - step ** -decay_rate`.
    adafactor_eps: added to squared gradients before Adafactor's averages.
    adafactor_min_dim_to_factor: a parameter's second moment is factored into row and column
      statistics over its two largest axes when the smaller of these is at least this long
      (optax's and T5X's default 128); smaller parameters keep a full second moment.
    adafactor_clip_threshold: Adafactor's update clipping (RMS of each update capped at this);
      None disables it.
    adafactor_momentum: first-moment decay for Adafactor; None keeps no first moment.
    adafactor_param_scale: scale Adafactor updates by each parameter's RMS, as T5X does.
      Off by default so that `learning_rate` means the same step size for both optimizers.
    clip_grad_norm: global gradient-norm bound; None or 0 disables clipping.
    group_lr_multipliers: group -> factor on the scheduled learning rate (groups not named
      use 1), e.g. {"cross_attention": 10.0}.
    frozen_groups: groups whose parameters never change.
  """

  name: str = "adafactor"
  schedule: ScheduleConfig = ScheduleConfig()
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  adafactor_decay_rate: float = 0.8
  adafactor_eps: float = 1e-30
  adafactor_min_dim_to_factor: int = 128
  adafactor_clip_threshold: Optional[float] = 1.0
  adafactor_momentum: Optional[float] = None
  adafactor_param_scale: bool = False
  clip_grad_norm: Optional[float] = 1.0
  group_lr_multipliers: Mapping[str, float] = dataclasses.field(default_factory=dict)
  frozen_groups: tuple[str, ...] = ()

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"unknown optimizer {self.name!r}; known optimizers: "
                       f"{', '.join(OPTIMIZERS)}")
    # A bare string would be read as a tuple of letters.
    frozen = ((self.frozen_groups,) if isinstance(self.frozen_groups, str)
              else tuple(self.frozen_groups))
    object.__setattr__(self, "frozen_groups", frozen)
    _check_groups(self.group_lr_multipliers, "OptimizerConfig.group_lr_multipliers")
    _check_groups(self.frozen_groups, "OptimizerConfig.frozen_groups")


def _preconditioner(cfg: OptimizerConfig) -> list[optax.GradientTransformation]:
  if cfg.name == "adamw":
    return [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)]
  steps = [optax.scale_by_factored_rms(factored=True, decay_rate=cfg.adafactor_decay_rate,
                                       min_dim_size_to_factor=cfg.adafactor_min_dim_to_factor,
                                       epsilon=cfg.adafactor_eps)]
  if cfg.adafactor_clip_threshold:
    steps.append(optax.clip_by_block_rms(cfg.adafactor_clip_threshold))
  if cfg.adafactor_param_scale:
    steps.append(optax.scale_by_param_block_rms())
  if cfg.adafactor_momentum:
    steps.append(optax.ema(cfg.adafactor_momentum, debias=False))
  return steps


def _group_optimizer(cfg: OptimizerConfig, multiplier: float) -> optax.GradientTransformation:
  steps = _preconditioner(cfg)
  if cfg.weight_decay:
    steps.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
  schedule = make_schedule(cfg.schedule)
  if multiplier != 1.0:
    base = schedule
    schedule = lambda step: multiplier * base(step)  # noqa: E731
  steps.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*steps)


def make_optimizer(cfg: OptimizerConfig, params: Params) -> optax.GradientTransformation:
  """Builds the optimizer for a parameter tree (see the module docstring for the order).

  Args:
    cfg: the optimizer config.
    params: the model's parameters, or their abstract shapes (e.g. from `jax.eval_shape`);
      only the tree's paths are read, to label groups. `init` and `update` must later get
      trees of the same structure.

  Returns:
    The `optax.GradientTransformation`.
  """
  labels = param_groups(params)
  frozen = set(cfg.frozen_groups)
  transforms = {g: optax.set_to_zero() if g in frozen
                else _group_optimizer(cfg, float(cfg.group_lr_multipliers.get(g, 1.0)))
                for g in GROUPS}
  steps = []
  if frozen:
    frozen_mask = jax.tree_util.tree_map(lambda g: g in frozen, labels)
    steps.append(optax.masked(optax.set_to_zero(), frozen_mask))
  if cfg.clip_grad_norm:
    steps.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
  steps.append(optax.multi_transform(transforms, labels))
  return optax.chain(*steps)


# ----------------------------------------------------------------------------------- norms


def _squares(leaf) -> jax.Array:
  # float32 sums: squares of bfloat16 gradients lose most of their bits when added in bf16.
  return jnp.sum(jnp.square(leaf.astype(jnp.float32)))


def grad_norms(grads: Params) -> dict[str, jax.Array]:
  """L2 norms of the gradient, whole and in parts, for logging.

  "grad_norm_encoder" and "grad_norm_decoder" cover whole stacks (the decoder's includes its
  cross-attention and both include their embedding), so their squares add up to the square
  of "grad_norm". "grad_norm_cross_attention" and "grad_norm_embeddings" are the norms of
  those two groups (see `param_groups`). Each leaf is read once: its sum of squares is
  computed one time and added into every total it belongs to.

  Args:
    grads: a gradient tree shaped like the params.

  Returns:
    {"grad_norm", "grad_norm_encoder", "grad_norm_decoder", "grad_norm_cross_attention",
     "grad_norm_embeddings"}: float32 scalars.
  """
  totals = {k: jnp.float32(0) for k in ("encoder", "decoder", "cross_attention", "embeddings")}
  for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
    sq = _squares(leaf)
    totals[_names(path)[0]] += sq
    group = _group_of(path)
    if group in ("cross_attention", "embeddings"):
      totals[group] += sq
  out = {"grad_norm": jnp.sqrt(totals["encoder"] + totals["decoder"])}
  out.update({f"grad_norm_{k}": jnp.sqrt(v) for k, v in totals.items()})
  return out
