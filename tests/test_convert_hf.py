"""HF folder round trips (bitwise), sharding, dtypes and errors on bad checkpoints."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from t5gemma_jax import config, presets
from t5gemma_jax.convert import hf, hf_config, safetensors_io
from t5gemma_jax.model import layout
from t5gemma_jax.run_options import RunOptions
from tests.helpers.random_params import random_params


def _cfg():
  enc = presets.stack_preset("tiny")
  dec = config.ModuleConfig(hidden_size=48, intermediate_size=96, num_layers=3, num_heads=4,
                            num_kv_heads=1, head_dim=8, query_pre_attn_scalar=8,
                            vocab_size=enc.vocab_size, sliding_window=4)
  return config.T5GemmaConfig(encoder=enc, decoder=dec)


def _assert_bitwise(a, b):
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for (path, x), y in zip(la, lb):
    assert x.dtype == y.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8),
                                  err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_round_trip_is_bitwise(tmp_path, scan, param_dtype):
  cfg = _cfg()
  params = random_params(cfg, seed=3, run=RunOptions(scan_layers=scan, param_dtype=param_dtype))
  hf.save(params, cfg, str(tmp_path / "out"))
  loaded, loaded_cfg = hf.load(str(tmp_path / "out"), scan_layers=scan)
  assert loaded_cfg == cfg
  _assert_bitwise(loaded, params)
  with open(tmp_path / "out" / "model.safetensors", "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  assert header["__metadata__"] == {"format": "pt"}
  expected = "BF16" if param_dtype == "bfloat16" else "F32"
  assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {expected}


def test_sharded_round_trip_and_device_arrays(tmp_path):
  cfg = _cfg()
  params = jax.device_put(random_params(cfg, seed=4))  # jax arrays, not numpy
  hf.save(params, cfg, str(tmp_path / "out"), max_shard_bytes=200_000)
  files = sorted(os.listdir(tmp_path / "out"))
  shards = [f for f in files if f.startswith("model-")]
  assert len(shards) > 2 and "model.safetensors.index.json" in files
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], "temp folder left behind"
  loaded, _ = hf.load(str(tmp_path / "out"))
  _assert_bitwise(loaded, jax.device_get(params))


def test_load_can_cast_and_scan(tmp_path):
  cfg = _cfg()
  params = random_params(cfg, seed=5)
  hf.save(params, cfg, str(tmp_path / "out"))
  loaded, loaded_cfg = hf.load(str(tmp_path / "out"), param_dtype="bfloat16", scan_layers=True)
  assert loaded_cfg == cfg
  leaf = loaded["decoder"]["layers"]["block_0"]["mlp"]["up"]["kernel"]
  assert leaf.dtype == ml_dtypes.bfloat16 and leaf.shape == (1, 48, 96)
  assert "layers_2" in loaded["decoder"]  # 3 layers = one scanned pair + one left over
  np.testing.assert_array_equal(
      layout.unscan_params(loaded, loaded_cfg)["decoder"]["layers_2"]["mlp"]["up"]["kernel"],
      params["decoder"]["layers_2"]["mlp"]["up"]["kernel"].astype(ml_dtypes.bfloat16))


def test_save_replaces_an_existing_folder(tmp_path):
  cfg = _cfg()
  hf.save(random_params(cfg, seed=1), cfg, str(tmp_path / "out"))
  second = random_params(cfg, seed=2)
  hf.save(second, cfg, str(tmp_path / "out"), overwrite=True)
  _assert_bitwise(hf.load(str(tmp_path / "out"))[0], second)
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_other_model_types_are_refused_by_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
  with pytest.raises(ValueError, match="model_type is 'llama', expected 't5gemma'.*gemma2"):
    hf.load(str(tmp_path))
  # A decoder-only Gemma 2 folder loads as a decoder-only model; a broken one names the field.
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2", "hidden_size": 8}))
  with pytest.raises(ValueError, match="missing field 'intermediate_size'"):
    hf.load(str(tmp_path))


def test_shape_mismatch_names_parameter_and_both_shapes(tmp_path):
  cfg = _cfg()
  hf.save(random_params(cfg), cfg, str(tmp_path / "out"))
  path = str(tmp_path / "out" / "model.safetensors")
  tensors = {k: np.array(v) for k, v in safetensors_io.load(path).items()}
  name = "model.decoder.layers.1.mlp.up_proj.weight"
  tensors[name] = tensors[name][:80]
  safetensors_io.save(tensors, path, {"format": "pt"})
  with pytest.raises(ValueError, match=rf"{name}.*\(80, 48\).*\(96, 48\)"):
    hf.load(str(tmp_path / "out"))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  cfg = _cfg()
  hf.save(random_params(cfg), cfg, str(tmp_path / "out"))
  path = str(tmp_path / "out" / "model.safetensors")
  tensors = {k: np.array(v) for k, v in safetensors_io.load(path).items()}
  tensors.pop("model.encoder.norm.weight")
  safetensors_io.save(tensors, path)
  with pytest.raises(ValueError, match="missing.*model.encoder.norm.weight"):
    hf.load(str(tmp_path / "out"))
  tensors["model.encoder.norm.weight"] = np.zeros(64, np.float32)
  tensors["model.encoder.extra.weight"] = np.zeros(3, np.float32)
  safetensors_io.save(tensors, path)
  with pytest.raises(ValueError, match="unexpected.*model.encoder.extra.weight"):
    hf.load(str(tmp_path / "out"))


def test_missing_files_name_the_path(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    hf.load(missing)
  (tmp_path / "cfg_only").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json.*cfg_only"):
    hf.load(str(tmp_path / "cfg_only"))
  (tmp_path / "cfg_only" / "config.json").write_text(json.dumps(hf_config.config_to_hf(_cfg())))
  with pytest.raises(FileNotFoundError, match="model.safetensors.*cfg_only"):
    hf.load(str(tmp_path / "cfg_only"))


def test_truncated_safetensors_is_reported(tmp_path):
  cfg = _cfg()
  hf.save(random_params(cfg), cfg, str(tmp_path / "out"))
  path = tmp_path / "out" / "model.safetensors"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(ValueError, match="model.safetensors: damaged or truncated"):
    hf.load(str(tmp_path / "out"))


def test_config_matches_transformers_reading_of_it():
  from transformers import T5GemmaConfig
  cfg = presets.preset("9b-2b")
  theirs = T5GemmaConfig(**hf_config.config_to_hf(cfg))
  assert theirs.decoder.cross_attention_hidden_size == 3584
  assert hf_config.config_from_hf(theirs.to_dict()) == cfg
  assert theirs.encoder.num_hidden_layers == 42 and theirs.decoder.num_hidden_layers == 26
