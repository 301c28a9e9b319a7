"""The checkpoint commands of the `t5gemma` CLI: export, import_hf and adapt.

  t5gemma export --checkpoint_dir=RUN/checkpoints/STEP --output_dir=OUT [--dtype=bfloat16]
      [--verify] [--overwrite] [--vocabulary=run|builtin|gemma|none|PATH.model] [--license=ID]
  t5gemma import_hf --hf_dir=IN --output_dir=CKPT [--scan_layers] [--param_dtype=...]
  t5gemma adapt --decoder_only=GEMMA2_DIR [--decoder_from=OTHER_GEMMA2_DIR] --output_dir=CKPT
  t5gemma adapt --decoder_only=GEMMA3_DIR [--eoi_id=256000] --output_dir=CKPT   (T5Gemma 2)

The model of an exported checkpoint comes from `--gin_file` when one binds
`model_config.cfg`, otherwise from the run's `model_config.json`. `import_hf` and `adapt`
write a run directory whose `model.gin` the other commands take as `--gin_file`; their input
folders may be huggingface_hub cache folders (`models--org--name`, or a snapshot in one), and
the run keeps where its weights came from in `source.json`. An export writes a README.md
model card from what the run directory records.
"""

from __future__ import annotations

import argparse
import os
import shlex
from typing import Any

from t5gemma_jax.cli import gin_setup


def export_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint_dir", required=True,
                 help="RUN/checkpoints/STEP, RUN/checkpoints or RUN (latest complete step)")
  p.add_argument("--output_dir", required=True, help="the Hugging Face folder to create")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                 help="stored dtype (default: the checkpoint's)")
  p.add_argument("--verify", action="store_true",
                 help="compare logits with transformers before committing the folder")
  p.add_argument("--tolerance", type=float, default=1e-3, help="largest logit difference "
                 "--verify accepts")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
  p.add_argument("--vocabulary", default="run",
                 help="tokenizer files to include: 'run' (the vocabulary the run recorded, "
                      "if any), 'builtin', 'gemma', a SentencePiece .model path, or 'none'")
  p.add_argument("--license", default=None,
                 help="license identifier for the model card's metadata, e.g. 'apache-2.0' or "
                      "'gemma' (default: 'unknown')")


def import_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--hf_dir", required=True,
                 help="Hugging Face T5Gemma (or Gemma) folder, or a huggingface_hub cache "
                      "folder: models--org--name (the snapshot refs/main names) or one of its "
                      "snapshots/<commit>")
  p.add_argument("--output_dir", required=True, help="the run directory to create")
  p.add_argument("--scan_layers", action="store_true", help="store the scanned layout")
  p.add_argument("--param_dtype", choices=("float32", "bfloat16", "float16"), default=None)
  p.add_argument("--overwrite", action="store_true")


def adapt_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--decoder_only", required=True,
                 help="Gemma 2 (Gemma2ForCausalLM) folder: the encoder, and the decoder "
                      "unless --decoder_from; or a Gemma 3 folder (Gemma3ForCausalLM or "
                      "Gemma3ForConditionalGeneration), adapted to T5Gemma 2")
  p.add_argument("--decoder_from", default=None,
                 help="another Gemma 2 folder for the decoder (Gemma 2 only)")
  p.add_argument("--output_dir", required=True, help="the run directory to create")
  p.add_argument("--cross_attention", choices=("auto", "copy", "random"), default="auto",
                 help="auto: copy self-attention when the widths match, else random "
                      "(Gemma 2 only)")
  p.add_argument("--eoi_id", type=int, default=None,
                 help="T5Gemma 2's end-of-image token id (Gemma 3 only; default 256000)")
  p.add_argument("--seed", type=int, default=0, help="seed of randomly initialised weights")
  p.add_argument("--scan_layers", action="store_true")
  p.add_argument("--param_dtype", choices=("float32", "bfloat16", "float16"), default=None)
  p.add_argument("--overwrite", action="store_true")


def _vocabulary(choice: str, run_dir: str) -> Any:
  import seqio
  if choice == "none":
    return None
  if choice == "run":
    from t5gemma_jax import run_files
    return run_files.read_vocabulary(run_dir)
  if choice.endswith(".model"):
    if not os.path.isfile(choice):
      raise FileNotFoundError(f"--vocabulary: SentencePiece model not found: {choice}")
    return seqio.SentencePieceVocabulary(choice)
  from t5gemma_jax.tasks import named_vocabularies
  return named_vocabularies.get(choice)


def export(args: argparse.Namespace) -> int:
  """Writes a Hugging Face folder from an orbax checkpoint."""
  from t5gemma_jax import params_reader
  from t5gemma_jax.convert import hf_checkpoint
  reader = params_reader.ParamsReader(args.checkpoint_dir)  # the step, fixed once
  vocabulary = _vocabulary(args.vocabulary, str(reader.run_dir))
  report = hf_checkpoint.export_checkpoint(
      str(reader.step_dir), args.output_dir, cfg=gin_setup.bound_model(), dtype=args.dtype,
      overwrite=args.overwrite, vocabulary=vocabulary, verify=args.verify,
      tolerance=args.tolerance, command=_export_command(args, reader), license=args.license)
  print(f"exported {report['step_dir']} ({report['parameters']:,} parameters, "
        f"{'scanned' if report['scanned'] else 'unrolled'}) to {report['output_dir']} as "
        f"{report['dtype']}" + (" with tokenizer files" if vocabulary is not None else ""))
  if "max_abs_logit_diff" in report:
    print(f"verified against transformers: max |logit diff| "
          f"{report['max_abs_logit_diff']:.3g} (tolerance {args.tolerance:g})")
  return 0


def _export_command(args: argparse.Namespace, reader) -> str:
  """The export's command line for the model card, with the step it resolved to."""
  flags = [f"--checkpoint_dir={reader.step_dir}", f"--output_dir={args.output_dir}"]
  flags += [f"--gin_file={f}" for f in args.gin_file]
  flags += [f"--{name}={getattr(args, name)}" for name, default in
            (("dtype", None), ("vocabulary", "run"), ("license", None))
            if getattr(args, name) != default]
  flags += ["--verify"] if args.verify else []
  return " ".join(["t5gemma", "export", *map(shlex.quote, flags)])


def import_hf(args: argparse.Namespace) -> int:
  """A Hugging Face T5Gemma folder -> a run directory (params-only step 0)."""
  from t5gemma_jax.convert import hf_checkpoint
  cfg, dtype = hf_checkpoint.import_hf(args.hf_dir, args.output_dir,
                                       scan_layers=args.scan_layers,
                                       param_dtype=args.param_dtype, overwrite=args.overwrite)
  _print_run(args.output_dir, cfg, dtype)
  return 0


def adapt(args: argparse.Namespace) -> int:
  """Gemma 2 decoder-only folder(s) -> a T5Gemma run directory, or a Gemma 3 folder -> a
  T5Gemma 2 one (params-only step 0), chosen by config.json's model_type."""
  from t5gemma_jax.convert import (adapt as adapt_lib, adapt_gemma3, hf_writer, hub_folder,
                                   params_checkpoint)
  hf_writer.check_destination(args.output_dir, args.overwrite)
  _, hf_config = adapt_lib.read_config(args.decoder_only)
  if hf_config.get("model_type") in adapt_gemma3.MODEL_TYPES:
    gemma2_only = [flag for flag, given in (("--decoder_from", args.decoder_from is not None),
                                            ("--cross_attention", args.cross_attention != "auto"))
                   if given]
    if gemma2_only:
      raise ValueError(f"{' and '.join(gemma2_only)}: Gemma 2 only; {args.decoder_only} is a "
                       "Gemma 3 checkpoint, adapted alone to T5Gemma 2 (merged attention, no "
                       "cross-attention)")
    eoi = {} if args.eoi_id is None else {"eoi_id": args.eoi_id}
    params, cfg = adapt_gemma3.from_gemma3(args.decoder_only, param_dtype=args.param_dtype,
                                           scan_layers=args.scan_layers, **eoi)
  else:
    if args.eoi_id is not None:
      raise ValueError(f"--eoi_id only applies to Gemma 3; {args.decoder_only} is not Gemma 3")
    params, cfg = adapt_lib.from_gemma2(
        args.decoder_only, args.decoder_from, seed=args.seed, param_dtype=args.param_dtype,
        cross_attention=args.cross_attention, scan_layers=args.scan_layers)
  folders = [hub_folder.resolve(d, "decoder-only checkpoint folder").record()
             for d in (args.decoder_only, args.decoder_from) if d is not None]
  params_checkpoint.save_params(params, cfg, args.output_dir, overwrite=args.overwrite,
                                source={"command": "adapt", "folders": folders})
  import jax
  from t5gemma_jax.run_options import common_dtype_name
  _print_run(args.output_dir, cfg,
             common_dtype_name(x.dtype for x in jax.tree_util.tree_leaves(params)))
  return 0


def _print_run(out: str, cfg, dtype: str) -> None:
  from t5gemma_jax import run_files
  gin_file = os.path.join(out, run_files.MODEL_GIN)
  layers = "+".join(str(m.num_layers) for m in cfg.stacks.values())  # decoder-only: one stack
  print(f"wrote {out} ({layers} layers, {dtype})\n"
        f"  fine-tune: t5gemma train --gin_file=runs/finetune.gin --gin_file={gin_file} "
        f"--gin.INIT_FROM='\"{out}\"' --gin.MODEL_DIR=...\n"
        f"  decode:    t5gemma infer --gin_file=runs/infer.gin --gin_file={gin_file} "
        f"--gin.MODEL_DIR='\"{out}\"' ...")
