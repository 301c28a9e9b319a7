"""Gemma 2 -> T5Gemma adaptation: decoder parity with the source model, the unbalanced pair
trains, scanned layout, and errors on bad folders."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from t5gemma_jax import model
from t5gemma_jax.convert import adapt, safetensors_io
from t5gemma_jax.model import layout
from tests.helpers import hf_reference as ref

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
             sliding_window=5, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
WIDE = dict(SMALL, hidden_size=96, intermediate_size=160, num_hidden_layers=6,
            num_attention_heads=6, query_pre_attn_scalar=24, sliding_window=6)


def _gemma2(path, seed=0, max_shard_size=None, **overrides):
  """Saves a float32 eager Gemma2ForCausalLM with every weight random, norms included."""
  torch.manual_seed(seed)
  hf_model = ref.randomize_(Gemma2ForCausalLM(Gemma2Config(**dict(SMALL, **overrides),
                                                         attn_implementation="eager")).eval())
  kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  hf_model.save_pretrained(path, **kw)
  return hf_model


def _zero_cross_output(params):
  """Cross-attention contributes exactly 0: post_cross_attn_norm(0) = 0 whatever its scale."""
  out = jax.tree_util.tree_map(lambda x: x, params)
  for name, layer in out["decoder"].items():
    if name.startswith("layers_"):
      layer["cross_attn"]["o"]["kernel"] = np.zeros_like(layer["cross_attn"]["o"]["kernel"])
  return out


def _assert_trees_equal(a, b):
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for (path, x), y in zip(la, lb):
    assert x.dtype == y.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_adapted_decoder_reproduces_gemma2(tmp_path):
  hf_model = _gemma2(tmp_path / "g2", seed=0)
  params, cfg = adapt.from_gemma2(str(tmp_path / "g2"))
  assert cfg.encoder == cfg.decoder and cfg.encoder.layer_types == (
      "sliding_attention", "full_attention") * 2
  assert (cfg.pad_id, cfg.eos_id, cfg.bos_id) == (0, 1, 2)
  dtypes = {np.dtype(leaf.dtype) for leaf in jax.tree_util.tree_leaves(params)}
  assert dtypes == {np.dtype("float32")}

  # Encoder and decoder both hold the source weights; balanced cross-attention is a copy.
  state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  q = state["model.layers.1.self_attn.q_proj.weight"]  # (heads * head_dim, hidden)
  for side in ("encoder", "decoder"):
    np.testing.assert_array_equal(params[side]["layers_1"]["self_attn"]["q"]["kernel"],
                                  q.T.reshape(64, 4, 16))
    np.testing.assert_array_equal(params[side]["layers_2"]["pre_self_attn_norm"]["scale"],
                                  state["model.layers.2.input_layernorm.weight"])
  dec3 = params["decoder"]["layers_3"]
  np.testing.assert_array_equal(dec3["cross_attn"]["v"]["kernel"], dec3["self_attn"]["v"]["kernel"])
  np.testing.assert_array_equal(dec3["post_cross_attn_norm"]["scale"],
                                state["model.layers.3.post_attention_layernorm.weight"])
  np.testing.assert_array_equal(dec3["pre_ffw_norm"]["scale"],
                                state["model.layers.3.pre_feedforward_layernorm.weight"])

  # Decoder rows without padding, 12 tokens > sliding window 5; an arbitrary padded encoder input.
  rng = np.random.default_rng(0)
  dec = rng.integers(3, 512, size=(3, 12)).astype(np.int32)
  dec[:, 0] = 2
  enc = rng.integers(3, 512, size=(3, 20)).astype(np.int32)
  enc[1, 14:] = 0
  with torch.no_grad():
    expected = hf_model(input_ids=torch.from_numpy(dec).long(),
                        attention_mask=torch.ones(dec.shape, dtype=torch.long)).logits.numpy()
  apply = jax.jit(model.T5Gemma(cfg).apply)
  got = np.asarray(apply({"params": _zero_cross_output(params)}, enc, dec))
  diff = float(np.max(np.abs(got - expected)))
  print(f"ADAPT balanced: max |logit diff| vs Gemma2ForCausalLM = {diff:.3e} "
        f"(logit scale {np.abs(expected).max():.2f})")
  assert expected.std() > 0.3, "reference logits too flat for a meaningful comparison"
  assert diff <= 1e-4

  # The check bites: the copied cross-attention does change the logits.
  with_cross = np.asarray(apply({"params": params}, enc, dec))
  bite = float(np.max(np.abs(with_cross - expected)))
  print(f"ADAPT balanced: with cross-attention kept, max |logit diff| = {bite:.3e}")
  assert bite > 1e-1


@pytest.mark.slow
def test_unbalanced_pair_has_model_shapes_and_trains(tmp_path):
  _gemma2(tmp_path / "wide", seed=1, max_shard_size="40KB", **WIDE)
  _gemma2(tmp_path / "narrow", seed=2)
  assert os.path.isfile(tmp_path / "wide" / "model.safetensors.index.json")  # sharded source
  params, cfg = adapt.from_gemma2(str(tmp_path / "wide"), str(tmp_path / "narrow"), seed=3)
  assert (cfg.encoder.hidden_size, cfg.encoder.num_layers) == (96, 6)
  assert (cfg.decoder.hidden_size, cfg.decoder.num_layers) == (64, 4)

  shapes = model.abstract_params(cfg, boxed=False)
  got = jax.tree_util.tree_map(lambda x: (x.shape, jnp.dtype(x.dtype)), params)
  assert got == jax.tree_util.tree_map(lambda x: (x.shape, jnp.dtype(x.dtype)), shapes)
  cross = params["decoder"]["layers_0"]["cross_attn"]
  assert cross["q"]["kernel"].shape == (64, 4, 16)
  assert cross["k"]["kernel"].shape == cross["v"]["kernel"].shape == (96, 2, 16)
  assert abs(cross["k"]["kernel"].std() * np.sqrt(96) - 1.0) < 0.1  # fan-in scaled
  assert not params["decoder"]["layers_0"]["pre_cross_attn_norm"]["scale"].any()
  again, _ = adapt.from_gemma2(str(tmp_path / "wide"), str(tmp_path / "narrow"), seed=3)
  _assert_trees_equal(again, params)  # random cross-attention is a function of the seed

  rng = np.random.default_rng(4)
  enc = rng.integers(3, 512, size=(4, 16)).astype(np.int32)
  targets = rng.integers(3, 512, size=(4, 10)).astype(np.int32)
  dec = np.concatenate([np.full((4, 1), cfg.bos_id, np.int32), targets[:, :-1]], axis=1)
  net = model.T5Gemma(cfg)

  def loss_fn(p):
    logits = net.apply({"params": p}, enc, dec)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

  opt = optax.adamw(1e-3, weight_decay=0.0)

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  p = jax.tree_util.tree_map(jnp.asarray, params)
  s = opt.init(p)
  losses = []
  for _ in range(5):
    p, s, loss = step(p, s)
    losses.append(float(loss))
  print(f"ADAPT unbalanced: losses {[round(x, 3) for x in losses]}")
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1


def test_scan_layers_gives_the_scanned_layout(tmp_path):
  _gemma2(tmp_path / "g2", seed=5, num_hidden_layers=3)  # one scanned pair + one layer left over
  flat, cfg = adapt.from_gemma2(str(tmp_path / "g2"), param_dtype="bfloat16")
  scanned, scfg = adapt.from_gemma2(str(tmp_path / "g2"), param_dtype="bfloat16",
                                    scan_layers=True)
  assert scfg == cfg
  assert "layers" in scanned["encoder"] and "layers_2" in scanned["decoder"]
  _assert_trees_equal(scanned, layout.scan_params(flat, cfg))
  assert str(flat["encoder"]["embedder"]["embedding"].dtype) == "bfloat16"


def _write_config(path, **fields):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(fields, f)


def test_bad_folders_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    adapt.from_gemma2(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no config.json in .*empty"):
    adapt.from_gemma2(str(tmp_path / "empty"))

  t5 = ref.random_model(dict(num_hidden_layers=1), dict(num_hidden_layers=1))
  t5.save_pretrained(tmp_path / "t5")
  with pytest.raises(ValueError, match=r"t5[/\\]config.json: model_type is 't5gemma'.*hf.load"):
    adapt.from_gemma2(str(tmp_path / "t5"))
  _write_config(tmp_path / "g3", model_type="gemma3_text")
  with pytest.raises(ValueError, match="'gemma3_text'.*Gemma 3 is not supported"):
    adapt.from_gemma2(str(tmp_path / "g3"))

  _gemma2(tmp_path / "a", seed=6, num_hidden_layers=2)
  _gemma2(tmp_path / "b", seed=7, num_hidden_layers=2, vocab_size=256)
  with pytest.raises(ValueError, match=r"vocab_size differs: 512 in .*a.* 256 in .*b"):
    adapt.from_gemma2(str(tmp_path / "a"), str(tmp_path / "b"))
  _gemma2(tmp_path / "c", seed=8, **dict(WIDE, num_hidden_layers=2))
  with pytest.raises(ValueError, match="cross_attention='copy' needs equal widths.* 96 .* 64"):
    adapt.from_gemma2(str(tmp_path / "c"), str(tmp_path / "a"), cross_attention="copy")
  with pytest.raises(TypeError, match="bogus"):
    adapt.from_gemma2(str(tmp_path / "a"), bogus=1)


def _rewrite(folder, change):
  path = os.path.join(folder, "model.safetensors")
  tensors = {k: np.array(v) for k, v in safetensors_io.load(path).items()}
  change(tensors)
  safetensors_io.save(tensors, path, {"format": "pt"})


def test_bad_tensors_are_named(tmp_path):
  folder = str(tmp_path / "g2")
  _gemma2(folder, seed=8, num_hidden_layers=2)

  _rewrite(folder, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"]))
  params, _ = adapt.from_gemma2(folder)  # a stored copy of the tied head is fine
  _rewrite(folder, lambda t: t.__setitem__("lm_head.weight", t["lm_head.weight"] + 1))
  with pytest.raises(ValueError, match="lm_head.weight differs .*untied"):
    adapt.from_gemma2(folder)
  _rewrite(folder, lambda t: t.pop("lm_head.weight"))

  _rewrite(folder, lambda t: t.__setitem__("model.layers.9.extra.weight", np.zeros(3, np.float32)))
  with pytest.raises(ValueError, match="1 unexpected tensors .*model.layers.9.extra.weight"):
    adapt.from_gemma2(folder)
  _rewrite(folder, lambda t: t.pop("model.layers.9.extra.weight"))

  _rewrite(folder, lambda t: t.pop("model.layers.1.post_feedforward_layernorm.weight"))
  with pytest.raises(ValueError, match="missing .*model.layers.1.post_feedforward_layernorm"):
    adapt.from_gemma2(folder)
  _rewrite(folder, lambda t: t.__setitem__("model.layers.1.post_feedforward_layernorm.weight",
                                           np.zeros(65, np.float32)))
  with pytest.raises(ValueError, match=r"post_feedforward_layernorm.weight in .*\(65,\).*\(64,\)"):
    adapt.from_gemma2(folder)


@pytest.mark.slow
def test_cli_adapt_then_warmup_trains_cross_attention_alone(tmp_path, clean_gin):
  from t5gemma_jax import inference, run_files
  from t5gemma_jax.cli import app
  # An unbalanced pair with the built-in vocabulary's size, so it trains on built-in data.
  _gemma2(tmp_path / "wide", seed=6, vocab_size=2048, **{k: v for k, v in WIDE.items()
                                                         if k != "vocab_size"})
  _gemma2(tmp_path / "narrow", seed=7, vocab_size=2048)
  ckpt = str(tmp_path / "adapted")
  assert app.main(["adapt", f"--decoder_only={tmp_path}/wide",
                    f"--decoder_from={tmp_path}/narrow", f"--output_dir={ckpt}"]) == 0
  cfg = run_files.read_model_config(ckpt)
  before = jax.device_get(inference.load_params(cfg, ckpt))
  run = str(tmp_path / "warmup")
  assert app.main([
      "train", "--gin_file=runs/adapt_warmup.gin", f"--gin_file={ckpt}/model.gin",
      f"--gin.INIT_FROM='{ckpt}'", f"--gin.MODEL_DIR='{run}'",
      '--gin.MIXTURE_OR_TASK_NAME="cldr_translate_en_de"',
      '--gin.TASK_FEATURE_LENGTHS={"inputs": 32, "targets": 16}', "--gin.BATCH_SIZE=4",
      "--gin.TRAIN_STEPS=3", "--gin.EVAL_PERIOD=0", "--gin.WARMUP_STEPS=0",
      "--gin.TrainConfig.progress=False"]) == 0
  after = jax.device_get(inference.load_params(cfg, run))
  moved = set()
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0],
                          jax.tree_util.tree_leaves(after)):
    name = jax.tree_util.keystr(path)
    if "cross" not in name:
      assert np.array_equal(a, b), f"{name} changed during the warmup"
    elif not np.array_equal(a, b):
      moved.add(name)
  assert any("cross_attn']['k'" in n for n in moved), sorted(moved)[:5]
