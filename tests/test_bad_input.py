"""Bad input across the CLI: every case exits non-zero with one line naming the culprit (and
the fix), no traceback unless --verbose, and no half-written output."""

import json
import os

import pytest
from t5gemma_jax.cli import app

QUICK = ["--gin_file=runs/demo.gin", '--gin.MIXTURE_OR_TASK_NAME="cldr_translate_en_de"',
         '--gin.TASK_FEATURE_LENGTHS={"inputs": 32, "targets": 16}', "--gin.BATCH_SIZE=4",
         "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=2", "--gin.EVAL_PERIOD=0",
         "--gin.WARMUP_STEPS=1", "--gin.TrainConfig.progress=False",
         "--gin.TrainConfig.eval_tasks=()"]


def _train(d, *extra):
  return ["train", *QUICK, f"--gin.MODEL_DIR='{d}/run'", *extra]


def _infer(run, *extra):
  return ["infer", "--gin_file=runs/infer.gin", "--gin_file=models/tiny.gin",
          f"--gin.MODEL_DIR='{run}'", "--gin.INFER_OUTPUT='{out}'", *extra]


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return path


def _small_vocab_model(d):
  """A gin file binding a tiny model with a 1024-id embedding (the built-in vocabulary has
  2048 ids)."""
  import dataclasses
  from t5gemma_jax import config, presets
  tiny = presets.preset("tiny")
  small = dataclasses.replace(tiny.encoder, vocab_size=1024)
  return _write(f"{d}/small.gin", config.to_gin(tiny.replace(encoder=small, decoder=small)))


def _spm_model():
  """A SentencePiece model with Gemma's special ids: the built-in one, standing in for
  Gemma's tokenizer (the case fails on the data before the tokenizer matters)."""
  from t5gemma_jax.tasks import named_vocabularies
  return named_vocabularies.BUILTIN.sentencepiece_model_file


# id: (argv(d, run) -> list, substrings the message must contain, paths that must not exist)
CASES = {
    "misspelt_macro": (lambda d, r: _train(d, "--gin.TRAIN_STEP=5"),
                       ["--gin.TRAIN_STEP", "did you mean TRAIN_STEPS"], ["{d}/run"]),
    "unknown_binding": (lambda d, r: _train(d, "--gin.TrainConfig.bach_size=4"),
                        ["bach_size"], ["{d}/run"]),
    "wrong_type_batch": (lambda d, r: _train(d, "--gin.BATCH_SIZE='\"four\"'"),
                         ["batch_size", "four"], ["{d}/run"]),
    "negative_steps": (lambda d, r: _train(d, "--gin.TRAIN_STEPS=-3"),
                       ["-3"], ["{d}/run"]),
    "bad_binding_syntax": (lambda d, r: _train(d, "--gin.BATCH_SIZE=(4"),
                           ["--gin.BATCH_SIZE=(4"], ["{d}/run"]),
    "not_a_binding": (lambda d, r: ["show_config", "--gin_file=models/tiny.gin",
                                    "--gin.preset.name"], ["has no '=VALUE'"], []),
    "gin_file_missing": (lambda d, r: ["train", "--gin_file=runs/nope.gin"],
                         ["runs/nope.gin", "not found"], []),
    "gin_file_syntax": (lambda d, r: ["show_config", "--gin_file=" + _write(
        f"{d}/bad.gin", "preset.name = \n")], ["bad.gin"], []),
    "unknown_task": (lambda d, r: _train(d, '--gin.MIXTURE_OR_TASK_NAME="nope_task"'),
                     ["nope_task"], ["{d}/run"]),
    "unknown_preset": (lambda d, r: ["show_config", "--gin_file=models/tiny.gin",
                                     "--gin.preset.name='tinyy'"], ["tinyy", "known presets"],
                       []),
    "unknown_preset_option": (lambda d, r: ["show_config", "--gin_file=models/tiny.gin",
                                            "--gin.preset.scan=True"], ["scan"], []),
    "bad_dtype": (lambda d, r: ["show_config", "--gin_file=models/tiny.gin",
                                "--gin.RunOptions.dtype='float8'"], ["dtype", "float8"], []),
    "bad_remat": (lambda d, r: ["show_config", "--gin_file=models/tiny.gin",
                                "--gin.RunOptions.remat_policy='some'"], ["remat_policy", "some"],
                  []),
    "cudnn_with_softcap": (lambda d, r: ["show_config", "--gin_file=models/tiny.gin",
                                         "--gin.RunOptions.attention_impl='cudnn'"],
                           ["attn_logit_softcapping"], []),
    "unknown_optimizer": (lambda d, r: _train(d, "--gin.OptimizerConfig.name='sgd'"),
                          ["sgd", "adamw"], ["{d}/run"]),
    "unknown_schedule": (lambda d, r: _train(d, "--gin.ScheduleConfig.name='step'"),
                         ["step", "cosine"], ["{d}/run"]),
    "unknown_frozen_group": (lambda d, r: _train(
        d, "--gin.OptimizerConfig.frozen_groups=('encoderr',)"), ["encoderr", "embeddings"],
        ["{d}/run"]),
    "zero_checkpoint_period": (lambda d, r: _train(d, "--gin.CHECKPOINT_PERIOD=0"),
                               ["checkpoint_period"], ["{d}/run"]),
    "mesh_does_not_fit": (lambda d, r: _train(d, "--gin.MeshConfig.ici=(2, 1, 1)"),
                          ["[2, 1, 1]", "needs 2 devices"], ["{d}/run"]),
    "vocab_larger_than_model": (lambda d, r: _train(d, "--gin_file=" + _small_vocab_model(d)),
                                ["2048 ids", "vocab_size is 1024"], ["{d}/run"]),
    "sequence_too_short": (lambda d, r: _train(
        d, '--gin.MIXTURE_OR_TASK_NAME="python_text_span_corruption"',
        '--gin.TASK_FEATURE_LENGTHS={"inputs": 4, "targets": 2}'), ["input length 4"],
        ["{d}/run"]),
    "tfds_not_prepared": (lambda d, r: _train(
        d, '--gin.MIXTURE_OR_TASK_NAME="wmt14_ende"',
        f"--gin.data_settings.gemma_tokenizer='{_spm_model()}'",
        "--gin.data_settings.builtin_vocab_size=2048"), ["wmt14", "tfds build"], ["{d}/run"]),
    "empty_data_file": (lambda d, r: _train(
        d, "--gin.data_settings.user_tasks=[@e/file_task()]", "--gin.e/file_task.name='empty'",
        f"--gin.e/file_task.train='{_write(f'{d}/empty.tsv', '')}'",
        "--gin.MIXTURE_OR_TASK_NAME='empty'"), ["empty.tsv", "is empty"], ["{d}/run"]),
    "missing_data_file": (lambda d, r: _train(
        d, "--gin.data_settings.user_tasks=[@m/file_task()]", "--gin.m/file_task.name='missing'",
        f"--gin.m/file_task.train='{d}/nothing-*.tsv'", "--gin.MIXTURE_OR_TASK_NAME='missing'"),
        ["nothing-*.tsv"], ["{d}/run"]),
    "nan_loss": (lambda d, r: _train(d, "--gin.LEARNING_RATE=1e12",
                                     "--gin.OptimizerConfig.clip_grad_norm=None",
                                     "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_PERIOD=100"),
                 ["loss is", "learning rate"], ["{d}/run/checkpoints/6"]),
    "infer_without_checkpoint": (lambda d, r: _infer(f"{d}/empty_run"),
                                 ["empty_run", "checkpoint"], ["{d}/out.jsonl"]),
    "infer_input_file_missing": (lambda d, r: _infer(
        r, "--gin.InferConfig.task=None", f"--gin.InferConfig.input_file='{d}/in.txt'"),
        ["in.txt"], ["{d}/out.jsonl"]),
    "infer_task_and_file": (lambda d, r: _infer(
        r, f"--gin.InferConfig.input_file='{_write(f'{d}/in.txt', 'hello')}'"),
        ["exactly one of task or input_file"], ["{d}/out.jsonl"]),
    "eval_unknown_split": (lambda d, r: ["eval", "--gin_file=runs/eval.gin",
                                         "--gin_file=models/tiny.gin", f"--gin.MODEL_DIR='{r}'",
                                         "--gin.EVAL_TASK='cldr_translate_en_de'",
                                         "--gin.EvalConfig.split='test'"], ["test"], []),
    "export_missing_checkpoint": (lambda d, r: ["export", f"--checkpoint_dir={d}/none",
                                                f"--output_dir={d}/out"], ["none"],
                                  ["{d}/out"]),
    "export_into_non_empty": (lambda d, r: ["export", f"--checkpoint_dir={r}",
                                            "--output_dir=" + os.path.dirname(
                                                _write(f"{d}/full/x.txt", "x"))],
                              ["not empty", "--overwrite"], []),
    "export_wrong_model": (lambda d, r: ["export", "--gin_file=models/s-s.gin",
                                         f"--checkpoint_dir={r}", f"--output_dir={d}/out"],
                           ["does not match"], ["{d}/out"]),
    "import_non_t5gemma": (lambda d, r: ["import_hf", "--hf_dir=" + os.path.dirname(_write(
        f"{d}/ll/config.json", json.dumps({"model_type": "llama"}))), f"--output_dir={d}/o"],
        ["llama", "t5gemma", "gemma2"], ["{d}/o"]),
    "import_broken_gemma2": (lambda d, r: ["import_hf", "--hf_dir=" + os.path.dirname(_write(
        f"{d}/g2/config.json", json.dumps({"model_type": "gemma2"}))), f"--output_dir={d}/o"],
        ["g2/config.json", "missing field 'hidden_size'"], ["{d}/o"]),
    "adapt_missing_folder": (lambda d, r: ["adapt", f"--decoder_only={d}/nothing",
                                           f"--output_dir={d}/o"], ["nothing"], ["{d}/o"]),
    "adapt_t5gemma_folder": (lambda d, r: ["adapt", "--decoder_only=" + os.path.dirname(_write(
        f"{d}/t5/config.json", json.dumps({"model_type": "t5gemma"}))), f"--output_dir={d}/o"],
        ["t5gemma", "import_hf"], ["{d}/o"]),
    "show_task_unknown": (lambda d, r: ["show_task", "--task=nope_task"], ["nope_task"], []),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  d = tmp_path_factory.mktemp("trained")
  assert app.main(_train(str(d))) == 0
  return str(d / "run")


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_named_without_a_traceback(case, trained, tmp_path, capsys, clean_gin):
  argv_fn, expected, absent = CASES[case]
  d = str(tmp_path)
  argv = [a.replace("{out}", f"{d}/out.jsonl") for a in argv_fn(d, trained)]
  try:
    code = app.main(argv)
  except SystemExit as e:  # argparse's own usage errors
    code = e.code
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("t5gemma") and "error:" in line]
  assert code != 0, f"{case}: exit 0\n{err[-2000:]}"
  assert "Traceback" not in err, f"{case}: traceback\n{err[-3000:]}"
  assert len(lines) == 1, f"{case}: {err[-2000:]}"
  for text in expected:
    assert text in lines[0], f"{case}: {text!r} not in {lines[0]!r}"
  for path in absent:
    assert not os.path.exists(path.format(d=d)), f"{case}: left {path.format(d=d)}"
  print(f"{case}: {lines[0]}")


def test_verbose_shows_the_traceback(tmp_path, capsys, clean_gin):
  assert app.main(["show_config", "--verbose", "--gin_file=models/tiny.gin",
                    "--gin.preset.name='tinyy'"]) == 2
  assert "Traceback" in capsys.readouterr().err
