"""The parameter schema: its tables cover exactly the model's parameters (both families, both
layouts), optimizer groups come from it, and convert/ imports one way with no private names."""

import os

import jax
import numpy as np
import pytest

from t5gemma_jax import config, presets
from t5gemma_jax.convert import param_schema
from t5gemma_jax.model import abstract_params, layout
from t5gemma_jax.run_options import RunOptions
from t5gemma_jax.train import optim
from tools import import_graph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = "t5gemma_jax.convert"


def _uneven():
  """T5Gemma 1 with a narrower 3-layer decoder: cross-attention reads a wider encoder, and the
  scanned decoder (period 2) keeps a leftover layer."""
  enc = presets.stack_preset("tiny")
  dec = config.ModuleConfig(hidden_size=48, intermediate_size=96, num_layers=3, num_heads=4,
                            num_kv_heads=1, head_dim=8, query_pre_attn_scalar=8,
                            vocab_size=enc.vocab_size, sliding_window=4)
  return config.T5GemmaConfig(encoder=enc, decoder=dec)


CONFIGS = {
    "t5gemma": lambda: presets.preset("tiny"),
    "t5gemma_uneven": _uneven,
    "t5gemma2": lambda: presets.preset("tiny2"),
    "t5gemma2_shared": lambda: presets.preset("tiny2").replace(share_blocks=True),
}


def _unrolled(tree, cfg):
  """{unrolled path: (shape of one layer, leaf's path in `tree`)} over every leaf of `tree`."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = tuple(str(k.key) for k in path)
    for ours, index in layout.unrolled_slices(keys, cfg):
      out[ours] = (tuple(leaf.shape[1:] if index is not None else leaf.shape), keys)
  return out


@pytest.fixture(scope="module", params=[(name, scan) for name in CONFIGS for scan in (False, True)],
                ids=lambda p: f"{p[0]}-{'scanned' if p[1] else 'unrolled'}")
def model(request):
  """(cfg, abstract params) of a randomly initialised model, traced, never allocated."""
  name, scan = request.param
  cfg = CONFIGS[name]()
  return cfg, abstract_params(cfg, RunOptions(scan_layers=scan), boxed=False)


def test_schema_covers_exactly_the_models_params(model):
  cfg, tree = model
  leaves = _unrolled(tree, cfg)
  table = param_schema.params_of(cfg)
  paths = {p.path for p in table}
  assert paths == set(leaves), (sorted(paths - set(leaves))[:5], sorted(set(leaves) - paths)[:5])
  for p in table:
    assert p.shape == leaves[p.path][0], p
    assert p.kind in param_schema.KINDS
  names = [p.hf_name for p in table]
  assert len(names) == len(set(names))
  if cfg.share_blocks:  # the decoder's layer tensors name the encoder's layers
    assert len(table) > len(paths)
    assert any(p.hf_name.startswith("model.decoder.layers.") and p.path[0] == "encoder"
               for p in table)
  else:
    assert len(table) == len(paths)


def test_family_tables():
  assert param_schema.params_of(presets.preset("tiny")) == param_schema.t5gemma_params(
      presets.preset("tiny"))
  assert param_schema.params_of(presets.preset("tiny2")) == param_schema.t5gemma2_params(
      presets.preset("tiny2"))
  with pytest.raises(ValueError, match="not a T5Gemma 2 config"):
    param_schema.t5gemma2_params(presets.preset("tiny2").replace(
        cross_attention_layers="global"))


def test_optimizer_groups_come_from_the_schema(model):
  cfg, tree = model
  assert optim.GROUPS == param_schema.GROUPS
  labels = optim.param_groups(tree)
  by_path = {}
  for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]:
    keys = tuple(str(k.key) for k in path)
    assert label == param_schema.group_of(keys)
    for ours, _ in layout.unrolled_slices(keys, cfg):
      by_path[ours] = label
  table = param_schema.params_of(cfg)
  for p in table:
    assert p.group in param_schema.GROUPS
    assert by_path[p.path] == p.group, p
  groups = {p.group for p in table}
  expected = set(param_schema.GROUPS) - ({"cross_attention"} if cfg.merged_attention else set())
  assert groups == expected


def test_group_rule():
  g = param_schema.group_of
  assert g(("encoder", "embedder", "embedding")) == "embeddings"
  assert g(("encoder", "embedder", "eoi_embedding")) == "embeddings"
  assert g(("decoder", "layers", "block_1", "cross_attn", "k", "kernel")) == "cross_attention"
  assert g(("decoder", "layers_0", "pre_cross_attn_norm", "scale")) == "cross_attention"
  assert g(("encoder", "layers_0", "self_attn", "q", "kernel")) == "encoder"
  assert g(("decoder", "final_norm", "scale")) == "decoder"
  with pytest.raises(ValueError, match="neither 'encoder' nor 'decoder'"):
    g(("lm_head", "kernel"))


@pytest.mark.parametrize("kind,shape", [("copy", (6,)), ("copy", (5, 6)), ("in", (6, 2, 3)),
                                        ("in", (6, 4)), ("out", (2, 3, 6))])
def test_layout_conversions_are_inverse(kind, shape):
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  w = param_schema.to_hf(kind, x)
  assert w.shape == param_schema.hf_shape(kind, shape)
  back = param_schema.from_hf(kind, w, shape)
  np.testing.assert_array_equal(back, x)
  assert back.flags.c_contiguous and back.flags.writeable


def test_convert_imports_one_way_with_public_names_only():
  edges = import_graph.graph(import_graph.module_files(ROOT))
  inside = lambda m: m == CONVERT or m.startswith(CONVERT + ".")  # noqa: E731
  assert [c for c in import_graph.package_cycles(edges) if any(map(inside, c))] == []
  assert [(v, w, n) for v, w, n in import_graph.private_imports(edges)
          if inside(v) or inside(w)] == []
  # The layering: the schema below the readers / writer, they below hf, adapters on top.
  below = {"param_schema": {"hf_reader", "hf_writer", "hf", "adapt", "adapt_gemma3"},
           "hf_reader": {"hf", "adapt", "adapt_gemma3"}, "hf_writer": {"hf", "hf_checkpoint"}}
  for low, highs in below.items():
    for high in highs:
      assert f"{CONVERT}.{high}" not in edges[f"{CONVERT}.{low}"], (low, high)
