"""Orbax run checkpoints <-> Hugging Face T5Gemma folders: `export_checkpoint`, `import_hf`.

Export streams: parameters are read from the checkpoint a few at a time (as numpy, whatever
mesh they were saved on, scanned or not) and written straight to their place in the
safetensors files, so host memory holds one group of parameters at a time, never the model
twice. `verify=True` then loads the finished folder in transformers and compares its logits
with our model's before the folder is moved into place.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import numpy as np

from t5gemma_jax import params_reader, run_files
from t5gemma_jax.config import ModelConfig, is_decoder_only
from t5gemma_jax.convert import (hf, hf_causal_lm, hf_config, hf_t5gemma2, hf_writer,
                                 hub_folder, model_card, params_checkpoint)
from t5gemma_jax.model import abstract_params, layout
from t5gemma_jax.run_options import DTYPES, RunOptions, common_dtype_name

_DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def checkpoint_config(reader: params_reader.ParamsReader,
                      cfg: Optional[ModelConfig] = None) -> ModelConfig:
  """The model config of a checkpoint step, checked against the saved shapes.

  Args:
    reader: the step (`params_reader.ParamsReader`); only its metadata is read.
    cfg: the architecture; None reads the run's `model_config.json`.

  Returns:
    The architecture (the checkpoint's layout is `reader.scanned`).

  Raises:
    ValueError: naming the step and the parameters missing, extra or of another shape.
  """
  source = "the given model config"
  if cfg is None:
    cfg = run_files.read_model_config(str(reader.run_dir))
    source = os.path.join(str(reader.run_dir), run_files.MODEL_CONFIG)
  stored = RunOptions(scan_layers=reader.scanned)
  expected = {p: tuple(a.shape)
              for p, a in hf_writer.leaves_of(abstract_params(cfg, stored, boxed=False))}
  saved = {p: shape for p, (shape, _) in reader.metadata.items()}
  problems = [f"{'/'.join(p)}: not in the checkpoint" for p in sorted(set(expected) - set(saved))]
  problems += [f"{'/'.join(p)}: not in the model" for p in sorted(set(saved) - set(expected))]
  problems += [f"{'/'.join(p)}: checkpoint {saved[p]}, model {expected[p]}"
               for p in sorted(set(saved) & set(expected)) if saved[p] != expected[p]]
  if problems:
    raise ValueError(f"checkpoint {reader.step_dir} does not match {source}: "
                     + "; ".join(problems[:4])
                     + (f"; and {len(problems) - 4} more" if len(problems) > 4 else ""))
  return cfg


def export_checkpoint(checkpoint_path: str, output_dir: str, *,
                      cfg: Optional[ModelConfig] = None, dtype: Optional[str] = None,
                      overwrite: bool = False, vocabulary: Any = None, verify: bool = False,
                      tolerance: float = 1e-3,
                      max_shard_bytes: int = hf_writer.DEFAULT_SHARD_BYTES,
                      read_bytes: int = 512 * 1024**2, command: Optional[str] = None,
                      license: Optional[str] = None) -> dict:
  """Writes a Hugging Face T5Gemma folder from an orbax checkpoint.

  The folder gets a README.md model card (`model_card`) describing the architecture, what the
  run directory records of its training and evaluation, and the export itself.

  Args:
    checkpoint_path: a step directory (`RUN/checkpoints/STEP`), a checkpoints directory or a
      run directory (latest complete step).
    output_dir: the folder to create (empty or absent unless `overwrite`).
    cfg: the model config; None reads the run's `model_config.json`.
    dtype: stored dtype name; None keeps the checkpoint's.
    overwrite: replace a non-empty `output_dir`.
    vocabulary: a seqio SentencePieceVocabulary whose tokenizer files to include.
    verify: compare logits with transformers (must be installed) before committing.
    tolerance: largest max-abs logit difference `verify` accepts.
    max_shard_bytes: largest safetensors file.
    read_bytes: how much of the checkpoint is read at once (the host-memory working set).
    command: the command line, for the model card (None: called from Python).
    license: the license identifier for the model card's metadata (None: "unknown").

  Returns:
    {"step_dir", "output_dir", "dtype", "scanned", "parameters", "max_abs_logit_diff"?}.
  """
  reader = params_reader.ParamsReader(checkpoint_path)
  step_dir = str(reader.step_dir)
  hf_writer.check_destination(output_dir, overwrite)  # before any reading
  metadata = reader.metadata
  cfg = checkpoint_config(reader, cfg)
  if dtype is None:
    stored = {d for _, d in metadata.values()}
    if len(stored) != 1 or next(iter(stored)) not in _DTYPE_NAMES:
      raise ValueError(f"checkpoint {step_dir} mixes dtypes {sorted(map(str, stored))}: choose "
                       "one with --dtype")
    dtype = _DTYPE_NAMES[stored.pop()]
  report = {"step_dir": step_dir, "output_dir": output_dir, "dtype": dtype,
            "scanned": reader.scanned,
            "parameters": int(sum(np.prod(s) for s, _ in metadata.values()))}

  def fill(writer: hf_writer.FolderWriter) -> None:
    for path, array in reader.iter_params(read_bytes):
      for ours, index in layout.unrolled_slices(path, cfg):
        writer.put(ours, array if index is None else array[index])
      del array
    if vocabulary is not None:
      from t5gemma_jax.convert import tokenizer_files
      tokenizer_files.write_tokenizer_files(vocabulary, writer.tmp)

  def verify_logits(folder: str) -> None:
    params = {}
    for path, array in reader.iter_params(read_bytes):
      node = params
      for key in path[:-1]:
        node = node.setdefault(key, {})
      # What the folder holds: the checkpoint's values rounded to the exported dtype.
      node[path[-1]] = array.astype(DTYPES[dtype]).astype(np.float32)
    report["max_abs_logit_diff"] = compare_with_transformers(
        folder, params, cfg, tolerance)

  def finish(folder: str) -> None:
    """Runs in the complete temporary folder, before it is moved into place."""
    if verify:
      verify_logits(folder)
    # Last, so that the card can say what the verification found.
    facts = model_card.gather(
        cfg, output_dir=output_dir, dtype=dtype, parameters=report["parameters"],
        run_dir=str(reader.run_dir), step=reader.step, step_dir=step_dir,
        tokenizer=vocabulary is not None, command=command, license=license,
        verified=(report["max_abs_logit_diff"], tolerance) if verify else None)
    model_card.write(folder, model_card.render(facts))

  hf_writer.write_folder(cfg, output_dir, dtype, fill, overwrite=overwrite,
                         max_shard_bytes=max_shard_bytes, check=finish)
  return report


def compare_with_transformers(folder: str, params: Any, cfg: ModelConfig,
                              tolerance: float, batch: int = 2, seed: int = 0) -> float:
  """Max |logit difference| between transformers on `folder` and our model on `params`.

  Both run in float32 on the same random, partly padded token rows; transformers loads the
  folder strictly (a missing, unexpected or mismatched tensor is an error).

  Raises:
    ImportError: transformers (or torch) is not installed.
    ValueError: a loading problem, or a difference above `tolerance`.
  """
  try:
    import torch
    import transformers
  except ImportError as e:
    raise ImportError(f"--verify needs torch and transformers installed ({e}): pip install "
                      "'t5gemma-jax[hf]'") from None
  import jax
  import jax.numpy as jnp
  from t5gemma_jax.model import from_config

  t5gemma2 = cfg.family == "t5gemma2"
  if is_decoder_only(cfg):
    cls = getattr(transformers, hf_causal_lm.MODEL_TYPES[
        hf_config.config_to_hf(cfg)["model_type"]])
  else:
    cls = (transformers.T5Gemma2ForConditionalGeneration if t5gemma2
           else transformers.T5GemmaForConditionalGeneration)
  # Its load report would list every (expected) missing vision key; we check `info` ourselves.
  verbosity = transformers.logging.get_verbosity()
  transformers.logging.set_verbosity_error()
  try:
    model, info = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                      output_loading_info=True)
  finally:
    transformers.logging.set_verbosity(verbosity)
  if t5gemma2:  # we write no vision tower: transformers initialises its placeholder at random
    info["missing_keys"] = [k for k in info["missing_keys"] if not hf_t5gemma2.is_vision(k)]
  bad = {k: v for k, v in info.items() if v and k != "error_msgs"} | (
      {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
  if bad:
    raise ValueError(f"transformers could not load {folder} strictly: {bad}")
  rng = np.random.default_rng(seed)
  enc = rng.integers(3, cfg.vocab_size, (batch, 24)).astype(np.int32)
  dec = rng.integers(3, cfg.vocab_size, (batch, 12)).astype(np.int32)
  dec[:, 0] = cfg.bos_id
  enc[1:, 17:] = cfg.pad_id
  dec[1:, 9:] = cfg.pad_id
  with torch.no_grad():
    if is_decoder_only(cfg):  # causal over the tokens (PrefixLM too: no prefix is marked)
      theirs = model.eval()(input_ids=torch.from_numpy(dec).long(),
                            attention_mask=torch.from_numpy(dec != cfg.pad_id).long()
                            ).logits.float().numpy()
    else:
      theirs = model.eval()(input_ids=torch.from_numpy(enc).long(),
                            attention_mask=torch.from_numpy(enc != cfg.pad_id).long(),
                            decoder_input_ids=torch.from_numpy(dec).long(),
                            decoder_attention_mask=torch.from_numpy(dec != cfg.pad_id).long()
                            ).logits.float().numpy()
  del model
  with jax.default_matmul_precision("highest"):
    net = from_config(cfg, layout.options_for(params))
    inputs = (dec,) if is_decoder_only(cfg) else (enc, dec)
    ours = np.asarray(jax.jit(net.apply)({"params": params}, *map(jnp.asarray, inputs)))
  real = dec != cfg.pad_id  # padded decoder positions are not compared
  diff = float(np.max(np.abs(ours - theirs)[real]))
  logging.info("verify: max |logit diff| %.3g over %d positions", diff, int(real.sum()))
  if not diff <= tolerance:
    raise ValueError(f"verification failed: transformers' logits on {folder} differ from ours "
                     f"by up to {diff:.3g} (tolerance {tolerance:g})")
  return diff


def import_hf(hf_dir: str, output_dir: str, *, scan_layers: bool = False,
              param_dtype: Optional[str] = None,
              overwrite: bool = False) -> tuple[ModelConfig, str]:
  """A Hugging Face T5Gemma folder -> a run directory with a params-only step 0.

  `train` fine-tunes from it with `TrainConfig.init_from=output_dir`; `infer` and `eval`
  decode it as a MODEL_DIR; `output_dir/model.gin` binds its model for the CLI.

  Args:
    hf_dir: folder with config.json and safetensors, or a huggingface_hub cache folder
      (`hub_folder.resolve`); where it came from is kept in the run's source.json.
    output_dir: the run directory to create.
    scan_layers: store the scanned layout (either layout restores into both).
    param_dtype: stored dtype (default: the folder's).
    overwrite: replace a non-empty `output_dir`.

  Returns:
    (the architecture, the stored dtype name).
  """
  hf_writer.check_destination(output_dir, overwrite)
  folder = hub_folder.resolve(hf_dir)
  params, cfg = hf.load(folder.path, param_dtype=param_dtype, scan_layers=scan_layers)
  params_checkpoint.save_params(params, cfg, output_dir, overwrite=overwrite,
                                source={"command": "import_hf", "folders": [folder.record()]})
  return cfg, common_dtype_name(leaf.dtype for _, leaf in hf_writer.leaves_of(params))
