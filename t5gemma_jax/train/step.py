"""The sharded train state, the jitted train step (with gradient accumulation) and eval step."""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from t5gemma_jax import sharding
from t5gemma_jax.config import ModelConfig, is_decoder_only
from t5gemma_jax.model import abstract_params, from_config, init_params
from t5gemma_jax.run_options import RunOptions
from t5gemma_jax.train import optim
from t5gemma_jax.train.losses import LossConfig, cross_entropy_sums
from t5gemma_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]
_OPTIONAL = ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions",
             "decoder_positions")
_DECODER_ONLY_OPTIONAL = ("decoder_segment_ids", "decoder_positions", "decoder_causal_attention")


def model_inputs(batch: Batch, cfg: Optional[ModelConfig] = None) -> dict:
  """The model's keyword arguments from a pipeline batch (packing features when present);
  `cfg` a decoder-only config: its inputs (`pipeline.DECODER_ONLY_FEATURES`)."""
  if cfg is not None and is_decoder_only(cfg):
    out = {"decoder_input_tokens": batch["decoder_input_tokens"]}
    out.update({k: batch[k] for k in _DECODER_ONLY_OPTIONAL if k in batch})
    return out
  out = {"encoder_input_tokens": batch["encoder_input_tokens"],
         "decoder_input_tokens": batch["decoder_input_tokens"]}
  out.update({k: batch[k] for k in _OPTIONAL if k in batch})
  return out


def real_tokens(batch: Batch, target_weight: jax.Array) -> jax.Array:
  """Non-padding tokens the step processed: the weighted targets plus the encoder's inputs
  (a decoder-only row holds its inputs among the decoder tokens: all its non-padding ones)."""
  if "encoder_input_tokens" in batch:
    return target_weight + jnp.sum(batch["encoder_input_tokens"] > 0)
  return jnp.sum(batch["decoder_target_tokens"] > 0).astype(jnp.float32)


def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh,
                    run: RunOptions = RunOptions()) -> tuple[TrainState, TrainState]:
  """(abstract state with shardings, shardings) for the whole TrainState on `mesh`, params in
  the layout and dtype of `run`."""
  boxed = abstract_params(cfg, run)
  param_sh = sharding.logical_to_shardings(boxed, mesh)
  params = nn.meta.unbox(boxed)
  abstract = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p,
                                                 optimizer.init(p)), params)
  shardings = TrainState(step=sharding.replicated(mesh), params=param_sh,
                         opt_state=sharding.like_params(abstract.opt_state, params, param_sh,
                                                        mesh))
  with_sh = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return with_sh, shardings


def init_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh,
               seed: int, shardings: TrainState | None = None,
               run: RunOptions = RunOptions()) -> tuple[TrainState, TrainState]:
  """A fresh TrainState created directly in its sharded layout (never whole on one host).

  Args:
    shardings: from `state_shardings`, when the caller already has them.
    run: the run options (parameter layout and dtype).

  Returns:
    (state, shardings).
  """
  if shardings is None:
    _, shardings = state_shardings(cfg, optimizer, mesh, run)

  def init(rng):
    params = nn.meta.unbox(init_params(cfg, rng, run))
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))
  return state, shardings


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                    loss_cfg: LossConfig, num_microbatches: int = 1,
                    learning_rate: Callable[[jax.Array], jax.Array] | None = None,
                    run: RunOptions = RunOptions()):
  """Builds `train_step(state, batch, rng) -> (state, metrics)` (not yet jitted) for the model
  `cfg` computed as `run` says.

  The batch is split into `num_microbatches` along rows and gradients are accumulated with
  `lax.scan` as sums; loss and gradients are divided by the real target tokens of the whole
  batch once, so any split gives the same update as the full batch.
  """
  net = from_config(cfg, run)

  def sums_and_grads(params, batch, rng):
    def loss_fn(p):
      logits = net.apply({"params": p}, **model_inputs(batch, cfg), deterministic=False,
                         rngs={"dropout": rng})
      sums = cross_entropy_sums(logits, batch["decoder_target_tokens"],
                                batch["decoder_loss_weights"], loss_cfg)
      return sums["loss"], sums
    (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return sums, grads

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    if num_microbatches == 1:
      sums, grads = sums_and_grads(state.params, batch, step_rng)
    else:
      rows = batch["decoder_input_tokens"].shape[0]
      if rows % num_microbatches:
        raise ValueError(f"batch of {rows} rows does not split into {num_microbatches} "
                         "microbatches")
      micro = jax.tree_util.tree_map(
          lambda x: x.reshape(num_microbatches, rows // num_microbatches, *x.shape[1:]), batch)
      zeros = jax.eval_shape(sums_and_grads, state.params,
                             jax.tree_util.tree_map(lambda x: x[0], micro), step_rng)
      zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), zeros)

      def body(acc, inputs):
        index, mb = inputs
        out = sums_and_grads(state.params, mb, jax.random.fold_in(step_rng, index))
        return jax.tree_util.tree_map(jnp.add, acc, out), None

      (sums, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(num_microbatches), micro))
    tokens = jnp.maximum(sums["weight"], 1.0)
    # Divided in float32, kept in each gradient's own dtype: a float32 quotient of bfloat16
    # gradients would turn the optimizer's bfloat16 moments into float32 after the first step
    # (a state whose dtypes change: a second compilation, and more memory, in bf16 runs).
    grads = jax.tree_util.tree_map(lambda g: (g / tokens).astype(g.dtype), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": sums["loss"] / tokens, "z_loss": sums["z_loss"] / tokens,
               "cross_entropy": sums["cross_entropy"] / tokens,
               "accuracy": sums["correct"] / tokens, "target_tokens": sums["weight"],
               "real_tokens": real_tokens(batch, sums["weight"]),
               **optim.grad_norms(grads)}
    if learning_rate is not None:
      metrics["learning_rate"] = learning_rate(state.step)
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def make_eval_step(cfg: ModelConfig, loss_cfg: LossConfig, run: RunOptions = RunOptions()):
  """Builds `eval_step(params, batch) -> loss sums` (deterministic, no dropout)."""
  net = from_config(cfg, run)

  def eval_step(params, batch):
    logits = net.apply({"params": params}, **model_inputs(batch, cfg))
    return cross_entropy_sums(logits, batch["decoder_target_tokens"],
                              batch["decoder_loss_weights"], loss_cfg)

  return eval_step


def jit_steps(train_step, eval_step, shardings: TrainState, mesh):
  """jit with explicit in/out shardings; the train state is donated (updated in place)."""
  batch = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)
  train = jax.jit(train_step, in_shardings=(shardings, batch, rep),
                  out_shardings=(shardings, rep), donate_argnums=(0,))
  evaluate = jax.jit(eval_step, in_shardings=(shardings.params, batch), out_shardings=rep)
  return train, evaluate
