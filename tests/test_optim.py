"""Tests for t5gemma_jax.train.optim: groups, schedules, optimizers, freezing, clipping."""

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5gemma_jax.presets import preset
from t5gemma_jax.run_options import RunOptions
from t5gemma_jax.train import optim
from tests.helpers.random_params import random_params


@pytest.fixture(scope="module")
def params():
  return random_params(preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def scanned_params():
  return random_params(preset("tiny"), seed=0, run=RunOptions(scan_layers=True))


@pytest.fixture(scope="module")
def few_params(params):
  """A handful of the tiny model's parameters, one or two per group: quick to compile."""
  def pick(stack, *paths):
    out = {}
    for path in paths:
      src, dst = params[stack], out
      for key in path[:-1]:
        src, dst = src[key], dst.setdefault(key, {})
      dst[path[-1]] = src[path[-1]]
    return out

  return {"encoder": pick("encoder", ("embedder", "embedding"), ("layers_0", "mlp", "up"),
                          ("final_norm", "scale")),
          "decoder": pick("decoder", ("embedder", "embedding"), ("layers_1", "cross_attn", "q"),
                          ("layers_1", "pre_cross_attn_norm"), ("layers_0", "self_attn", "o"))}


def _paths(tree):
  return {"/".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _random_like(tree, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), tree)


def _constant(lr, warmup=0):
  return optim.ScheduleConfig(name="constant", learning_rate=lr, warmup_steps=warmup)


def _run(opt, params, grads_list):
  """Applies the gradients in turn; returns the params after each step and the last state."""
  state = opt.init(params)
  update = jax.jit(opt.update)
  history = []
  for grads in grads_list:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history, state


# ------------------------------------------------------------------------------- groups


def _group_stats(params):
  labels = _paths(optim.param_groups(params))
  leaves = _paths(params)
  counts, sizes = collections.Counter(), collections.Counter()
  for path, group in labels.items():
    counts[group] += 1
    sizes[group] += leaves[path].size
  return labels, counts, sizes


def test_groups_unscanned(params):
  labels, counts, sizes = _group_stats(params)
  # Per layer: 4 attention kernels + 3 mlp kernels + 4 norms, plus each stack's final norm.
  assert counts == {"embeddings": 2, "cross_attention": 12, "encoder": 23, "decoder": 23}
  assert sizes["embeddings"] == 2 * 2048 * 64
  assert labels["encoder/embedder/embedding"] == labels["decoder/embedder/embedding"] \
      == "embeddings"
  for i in range(2):
    for name in ("pre_cross_attn_norm/scale", "post_cross_attn_norm/scale",
                 "cross_attn/q/kernel", "cross_attn/o/kernel"):
      assert labels[f"decoder/layers_{i}/{name}"] == "cross_attention"
    assert labels[f"decoder/layers_{i}/self_attn/q/kernel"] == "decoder"
    assert labels[f"decoder/layers_{i}/pre_self_attn_norm/scale"] == "decoder"
    assert labels[f"encoder/layers_{i}/self_attn/q/kernel"] == "encoder"
  assert labels["decoder/final_norm/scale"] == "decoder"
  assert labels["encoder/final_norm/scale"] == "encoder"


def test_groups_scanned_match_unscanned(params, scanned_params):
  labels, counts, sizes = _group_stats(scanned_params)
  assert "decoder/layers/block_1/pre_cross_attn_norm/scale" in labels
  assert labels["decoder/layers/block_1/pre_cross_attn_norm/scale"] == "cross_attention"
  assert labels["decoder/layers/block_0/cross_attn/k/kernel"] == "cross_attention"
  assert labels["decoder/layers/block_0/mlp/up/kernel"] == "decoder"
  assert labels["encoder/layers/block_0/mlp/up/kernel"] == "encoder"
  _, counts_u, sizes_u = _group_stats(params)
  assert counts == counts_u and sizes == sizes_u


def test_groups_scanned_with_leftover_layer():
  cfg = preset("tiny")
  cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, num_layers=3,
                                                             layer_types=None))
  labels, counts, _ = _group_stats(random_params(cfg, run=RunOptions(scan_layers=True)))
  assert labels["decoder/layers_2/post_cross_attn_norm/scale"] == "cross_attention"
  assert labels["decoder/layers_2/mlp/down/kernel"] == "decoder"
  assert counts == {"embeddings": 2, "cross_attention": 18, "encoder": 23, "decoder": 34}


def test_groups_reject_foreign_tree():
  with pytest.raises(ValueError, match="lm_head"):
    optim.param_groups({"lm_head": {"kernel": np.zeros((2, 2))}})


# ---------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("cfg,expected", [
    (optim.ScheduleConfig("constant", 0.1, 10),
     {0: 0.0, 5: 0.05, 10: 0.1, 1000: 0.1}),
    # T5X: base / sqrt(max(step, warmup)) with base = 0.01 * sqrt(100) = 0.1.
    (optim.ScheduleConfig("rsqrt", 0.01, 100),
     {0: 0.0, 50: 0.005, 100: 0.01, 400: 0.1 / 20, 10_000: 0.1 / 100}),
    (optim.ScheduleConfig("cosine", 1.0, 10, total_steps=110, end_fraction=0.1),
     {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 60: 0.55,
      110: 0.1, 500: 0.1}),
    (optim.ScheduleConfig("linear", 2.0, 0, total_steps=100, end_fraction=0.25),
     {0: 2.0, 50: 1.25, 100: 0.5, 200: 0.5}),
], ids=lambda x: x.name if isinstance(x, optim.ScheduleConfig) else "")
def test_schedules(cfg, expected):
  schedule = optim.make_schedule(cfg)
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, rel=1e-6, abs=1e-9), step
  steps = jnp.array(list(expected), jnp.int32)
  np.testing.assert_allclose(jax.jit(schedule)(steps), list(expected.values()), rtol=1e-6,
                             atol=1e-9)


def test_schedule_config_errors():
  with pytest.raises(ValueError, match="'exponential'"):
    optim.ScheduleConfig(name="exponential")
  with pytest.raises(ValueError, match="warmup_steps >= 1"):
    optim.ScheduleConfig(name="rsqrt", warmup_steps=0)
  with pytest.raises(ValueError, match="total_steps"):
    optim.ScheduleConfig(name="cosine", warmup_steps=10)
  with pytest.raises(ValueError, match="total_steps"):
    optim.ScheduleConfig(name="linear", warmup_steps=10, total_steps=10)


# --------------------------------------------------------------------------- optimizers


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_reduces_quadratic(name, scanned_params):
  cfg = optim.OptimizerConfig(name=name, schedule=_constant(1e-2, warmup=2), weight_decay=1e-4)
  opt = optim.make_optimizer(cfg, scanned_params)
  target = _random_like(scanned_params, seed=1, scale=0.1)

  def loss(p):
    return sum(jnp.sum(jnp.square(a - b)) for a, b in
               zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(target)))

  @jax.jit
  def step(p, state):
    grads = jax.grad(loss)(p)
    updates, state = opt.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  p, state = scanned_params, opt.init(scanned_params)
  first = float(loss(p))
  for _ in range(20):
    p, state = step(p, state)
  assert float(loss(p)) < 0.5 * first


def _factored_states(state):
  is_factored = lambda x: isinstance(x, optax.FactoredState)  # noqa: E731
  return [s for s in jax.tree_util.tree_leaves(state, is_leaf=is_factored) if is_factored(s)]


@pytest.mark.parametrize("scan", [False, True])
def test_adafactor_state_is_factored(scan, params, scanned_params):
  tree = scanned_params if scan else params
  lead = (1,) if scan else ()
  cfg = optim.OptimizerConfig(name="adafactor", adafactor_min_dim_to_factor=32)
  state = optim.make_optimizer(cfg, tree).init(tree)
  by_path = {}
  for s in _factored_states(state):
    for field in ("v_row", "v_col", "v"):
      for path, leaf in _paths(getattr(s, field)).items():
        by_path.setdefault(path, {})[field] = leaf.shape
  mlp = "decoder/layers/block_0/mlp/up/kernel" if scan else "decoder/layers_0/mlp/up/kernel"

  def factors(shapes):
    assert shapes["v"] == (1,)  # no full second moment
    return {shapes["v_row"], shapes["v_col"]}

  # A [64, 128] kernel keeps a 64-vector and a 128-vector, not a 64 x 128 matrix.
  assert factors(by_path[mlp]) == {lead + (64,), lead + (128,)}
  assert factors(by_path["encoder/embedder/embedding"]) == {(64,), (2048,)}
  # Norm scales are too small to factor: full second moment.
  norm = "encoder/final_norm/scale"
  assert by_path[norm] == {"v_row": (1,), "v_col": (1,), "v": (64,)}
  state_size = sum(x.size for x in jax.tree_util.tree_leaves(state))
  assert state_size < 0.25 * sum(x.size for x in jax.tree_util.tree_leaves(tree))


def test_frozen_groups_unchanged_and_stateless(params):
  frozen = ("encoder", "embeddings")
  cfg = optim.OptimizerConfig(name="adamw", schedule=_constant(1e-2), weight_decay=0.1,
                              frozen_groups=frozen)
  opt = optim.make_optimizer(cfg, params)
  history, state = _run(opt, params, [_random_like(params, seed=s) for s in range(3)])
  labels, before, after = _paths(optim.param_groups(params)), _paths(params), _paths(history[-1])
  for path, group in labels.items():
    if group in frozen:
      assert before[path].tobytes() == np.asarray(after[path]).tobytes(), path
    else:
      assert np.all(before[path] != np.asarray(after[path])), path
  trainable = sum(before[p].size for p, g in labels.items() if g not in frozen)
  state_size = sum(x.size for x in jax.tree_util.tree_leaves(state))
  assert 2 * trainable <= state_size < 2 * trainable + 100  # Adam's mu and nu, plus counters


def test_frozen_gradients_do_not_count_in_clipping(few_params):
  cfg = optim.OptimizerConfig(name="adamw", schedule=_constant(1e-2), clip_grad_norm=1.0,
                              frozen_groups=("encoder",))
  opt = optim.make_optimizer(cfg, few_params)
  labels = optim.param_groups(few_params)
  grads = [_random_like(few_params, seed=s) for s in (1, 2)]
  zeroed = [jax.tree_util.tree_map(lambda g, l: g * 0 if l == "encoder" else g, gs, labels)
            for gs in grads]
  grads[0] = jax.tree_util.tree_map(lambda g, l: g * 1e4 if l == "encoder" else g, grads[0],
                                    labels)
  a, _ = _run(opt, few_params, grads)
  b, _ = _run(opt, few_params, zeroed)
  for x, y in zip(jax.tree_util.tree_leaves(a[-1]), jax.tree_util.tree_leaves(b[-1])):
    np.testing.assert_array_equal(x, y)


def test_lr_multiplier_scales_group_update(few_params):
  grads = _random_like(few_params, seed=3)

  def one_step(multipliers):
    cfg = optim.OptimizerConfig(name="adamw", schedule=_constant(1e-3), weight_decay=0.0,
                                group_lr_multipliers=multipliers)
    opt = optim.make_optimizer(cfg, few_params)
    updates, _ = jax.jit(lambda p, g: opt.update(g, opt.init(p), p))(few_params, grads)
    return _paths(updates)

  base, boosted = one_step({}), one_step({"cross_attention": 10.0})
  labels = _paths(optim.param_groups(few_params))
  for path, group in labels.items():
    if group == "cross_attention":
      np.testing.assert_allclose(boosted[path], 10.0 * base[path], rtol=1e-5)
    else:
      np.testing.assert_array_equal(boosted[path], base[path])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_global_norm_clipping(name, few_params):
  g1 = _random_like(few_params, seed=4)
  norm1 = float(optax.tree.norm(g1))
  big = jax.tree_util.tree_map(lambda g: g * (100.0 / norm1), g1)  # global norm 100
  unit = jax.tree_util.tree_map(lambda g: g / norm1, g1)  # global norm 1
  small = jax.tree_util.tree_map(lambda g: g * 0.5, unit)  # under the bound: untouched
  def make(clip):
    cfg = optim.OptimizerConfig(name=name, schedule=_constant(1e-2), clip_grad_norm=clip)
    return optim.make_optimizer(cfg, few_params)

  clipped, _ = _run(make(1.0), few_params, [big, small])
  reference, _ = _run(make(None), few_params, [unit, small])
  unclipped, _ = _run(make(None), few_params, [big, small])
  for x, y in zip(jax.tree_util.tree_leaves(clipped[-1]), jax.tree_util.tree_leaves(
      reference[-1])):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  # Without clipping the first gradient dominates the second moments: the test can tell.
  diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
      jax.tree_util.tree_leaves(unclipped[-1]), jax.tree_util.tree_leaves(reference[-1])))
  assert diff > 1e-4


def test_abstract_params(params):
  abstract = jax.eval_shape(lambda: params)
  cfg = optim.OptimizerConfig(name="adamw", weight_decay=0.1, frozen_groups=("encoder",))
  opt = optim.make_optimizer(cfg, abstract)
  shapes = jax.eval_shape(opt.init, abstract)
  real = opt.init(params)
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(real)
  updates, _ = jax.eval_shape(opt.update, abstract, shapes, abstract)
  assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)


def test_decay_mask_skips_norm_scales(scanned_params):
  mask = _paths(optim.decay_mask(scanned_params))
  assert not mask["decoder/layers/block_0/pre_cross_attn_norm/scale"]
  assert not mask["encoder/final_norm/scale"]
  assert mask["decoder/embedder/embedding"] and mask["encoder/layers/block_1/mlp/up/kernel"]


def test_optimizer_config_errors():
  with pytest.raises(ValueError, match="'sgd'.*adamw"):
    optim.OptimizerConfig(name="sgd")
  with pytest.raises(ValueError, match=r"\['crossattn'\].*cross_attention"):
    optim.OptimizerConfig(group_lr_multipliers={"crossattn": 2.0})
  with pytest.raises(ValueError, match=r"\['enc'\].*embeddings, cross_attention, encoder"):
    optim.OptimizerConfig(frozen_groups=("enc",))
  assert optim.OptimizerConfig(frozen_groups="encoder").frozen_groups == ("encoder",)


# -------------------------------------------------------------------------------- norms


def test_grad_norms(params):
  grads = _random_like(params, seed=6)
  norms = optim.grad_norms(grads)
  labels, leaves = _paths(optim.param_groups(params)), _paths(grads)

  def ref(keep):
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(leaves[p], np.float64))))
                         for p in leaves if keep(p)))

  assert float(norms["grad_norm"]) == pytest.approx(ref(lambda p: True), rel=1e-5)
  assert float(norms["grad_norm_encoder"]) == pytest.approx(
      ref(lambda p: p.startswith("encoder/")), rel=1e-5)
  assert float(norms["grad_norm_decoder"]) == pytest.approx(
      ref(lambda p: p.startswith("decoder/")), rel=1e-5)
  for group in ("cross_attention", "embeddings"):
    assert float(norms[f"grad_norm_{group}"]) == pytest.approx(
        ref(lambda p: labels[p] == group), rel=1e-5)
  bf16 = optim.grad_norms(jax.tree_util.tree_map(lambda g: g.astype(jnp.bfloat16), grads))
  assert bf16["grad_norm"].dtype == jnp.float32
  assert float(bf16["grad_norm"]) == pytest.approx(float(norms["grad_norm"]), rel=1e-2)
