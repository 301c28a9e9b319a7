"""A few train steps of a config on a mesh, for the multi-device test scripts (which run in a
subprocess with 8 forced CPU devices and import this module)."""

import flax.linen as nn
import jax
import numpy as np

from t5gemma_jax import sharding
from t5gemma_jax.model import abstract_params
from t5gemma_jax.run_options import RunOptions
from t5gemma_jax.train import optim, step as step_lib
from t5gemma_jax.train.losses import LossConfig

OPTIMIZER = optim.OptimizerConfig(name="adamw", schedule=optim.ScheduleConfig(
    name="constant", learning_rate=3e-3, warmup_steps=0), clip_grad_norm=1.0)


def random_batches(n: int, enc_len: int, dec_len: int, enc_pad: int, dec_pad: int,
                   rows: int = 8, vocab: int = 2048, seed: int = 0) -> list[dict]:
  """`n` batches of `rows` random rows, each ending in `enc_pad` / `dec_pad` padding."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    enc = rng.integers(3, vocab, (rows, enc_len)).astype(np.int32)
    tgt = rng.integers(3, vocab, (rows, dec_len)).astype(np.int32)
    enc[:, enc_len - enc_pad:] = 0
    tgt[:, dec_len - dec_pad:] = 0
    dec = np.concatenate([np.full((rows, 1), 2, np.int32), tgt[:, :-1]], axis=1)
    dec[tgt == 0] = 0
    out.append({"encoder_input_tokens": enc, "decoder_input_tokens": dec,
                "decoder_target_tokens": tgt,
                "decoder_loss_weights": (tgt > 0).astype(np.int32)})
  return out


def train_losses(cfg, batches: list[dict], ici: tuple, devices,
                 run: RunOptions = RunOptions()) -> tuple[list, object, object]:
  """(losses, final train state, mesh) of AdamW steps on `batches` over a mesh of `devices`."""
  mesh = sharding.make_mesh(sharding.MeshConfig(ici=ici), devices)
  optimizer = optim.make_optimizer(OPTIMIZER, abstract_params(cfg, run, boxed=False))
  state, shardings = step_lib.init_state(cfg, optimizer, mesh, seed=0, run=run)
  train, _ = step_lib.jit_steps(step_lib.make_train_step(cfg, optimizer, LossConfig(), run=run),
                                step_lib.make_eval_step(cfg, LossConfig(), run), shardings,
                                mesh)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    for b in batches:
      b = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in b.items()}
      state, m = train(state, b, jax.random.PRNGKey(1))
      losses.append(float(m["loss"]))
  return losses, state, mesh
