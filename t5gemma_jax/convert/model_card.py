"""The README.md model card of an exported Hugging Face folder.

Hugging Face model repositories describe themselves in README.md: YAML front matter the Hub
reads (library, pipeline, license, tags, base model, eval results as `model-index`), then
text. `render` turns what an export knows (the architecture, the run's history from
`run_history.read`, how it was exported) into that text, stating nothing it does not know:
the license stays "unknown" unless given, `base_model` appears only when the run recorded the
Hub repository its weights came from. `write` puts it into a folder being assembled, before the
folder is moved into place with the rest of the export.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import re
from typing import Any, Optional

from t5gemma_jax import config_gin, run_files, run_history
from t5gemma_jax.config import ModelConfig, is_decoder_only
from t5gemma_jax.convert import hf_config

CARD_NAME = "README.md"
UNKNOWN_LICENSE = "unknown"  # the Hub's own value for a license nobody stated
EXPORT_API = "t5gemma_jax.convert.hf_checkpoint.export_checkpoint"
SAVE_API = "t5gemma_jax.convert.hf.save"
# Gin factories whose bindings name a model (a preset), shown as the run's "Preset".
PRESET_FACTORIES = ("preset", "decoder_only", "matched_decoder_only")
_YAML_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


@dataclasses.dataclass(frozen=True)
class ExportFacts:
  """Everything a card says, gathered at export time.

  Attributes:
    name: the model's name (the exported folder's name).
    cfg: the architecture.
    dtype: the stored dtype name.
    parameters: the number of parameters written.
    history: what the run directory records (`run_history.read`); None for params written
      from memory (`hf.save`), which come with no record.
    step_dir: the checkpoint step directory exported (None with no history).
    tokenizer: whether tokenizer files are in the folder.
    command: the command line that exported it (None: called from Python).
    license: a license identifier given by the user (None: unknown).
    date: when it was exported ("2025-01-31 12:00 UTC").
    version: the t5gemma-jax version that exported it.
    verified: (max |logit difference| from transformers on the folder, the tolerance) when
      the export compared them (`--verify`), else None.
  """

  name: str
  cfg: ModelConfig
  dtype: str
  parameters: int
  history: Optional[run_history.RunHistory]
  step_dir: Optional[str]
  tokenizer: bool
  command: Optional[str] = None
  license: Optional[str] = None
  date: str = ""
  version: str = ""
  verified: Optional[tuple[float, float]] = None


def gather(cfg: ModelConfig, *, output_dir: str, dtype: str, parameters: int,
           run_dir: Optional[str], step: Optional[int], step_dir: Optional[str],
           tokenizer: bool, command: Optional[str] = None,
           license: Optional[str] = None,
           verified: Optional[tuple[float, float]] = None) -> ExportFacts:
  """Reads the run's records and stamps the export (version, date).

  Args:
    cfg, dtype, parameters, step_dir, tokenizer, command, license, verified: see
      `ExportFacts`.
    output_dir: the folder being exported (its name names the model).
    run_dir, step: the run directory and the checkpoint step exported; None for params
      written from memory.
  """
  try:
    version = importlib.metadata.version("t5gemma-jax")
  except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
    version = "unknown (not installed)"
  return ExportFacts(
      name=os.path.basename(os.path.normpath(output_dir)), cfg=cfg, dtype=dtype,
      parameters=parameters, history=None if run_dir is None else run_history.read(run_dir, step),
      step_dir=step_dir,
      tokenizer=tokenizer, command=command, license=license, verified=verified,
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      version=version)


def write(folder: str, text: str) -> str:
  """Writes `text` as `folder`/README.md and returns that path (the folder is an export's
  temporary one, moved into place whole afterwards)."""
  path = os.path.join(folder, CARD_NAME)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return path


def render(facts: ExportFacts) -> str:
  """The card's markdown: front matter, then architecture, training, evaluation, usage and
  export sections.

  Args:
    facts: what the export knows.

  Returns:
    The README.md text.
  """
  hf = hf_config.config_to_hf(facts.cfg, facts.dtype)
  sections = [_front_matter(facts, hf), f"# {facts.name}\n\n{_summary(facts, hf)}",
              _architecture(facts, hf), _training(facts), _evaluation(facts), _usage(facts),
              _export(facts)]
  return "\n\n".join(s.rstrip("\n") for s in sections) + "\n"


def pipeline_tag(cfg: ModelConfig) -> str:
  """The Hub task of the exported model."""
  return "text-generation" if is_decoder_only(cfg) else "text2text-generation"


# ------------------------------------------------------------------------------ sections


def _front_matter(facts: ExportFacts, hf: dict) -> str:
  meta: dict[str, Any] = {
      "library_name": "transformers", "pipeline_tag": pipeline_tag(facts.cfg),
      "license": facts.license or UNKNOWN_LICENSE,
      "tags": list(dict.fromkeys(["t5gemma", "t5gemma-jax", "jax", hf["model_type"]]))}
  h = facts.history
  if h is not None and h.base_models:
    meta["base_model"] = h.base_models
  if h is not None and h.evals:
    meta["model-index"] = [{"name": facts.name, "results": [
        {"task": {"type": pipeline_tag(facts.cfg)},
         "dataset": {"name": e.task, "type": e.task, "split": e.split},
         "metrics": [{"type": k, "name": k, "value": round(v, 4)}
                     for k, v in sorted(e.scores.items()) if math.isfinite(v)]}
        for e in h.evals]}]
  return "---\n" + "\n".join(_yaml_lines(meta, "")) + "\n---"


def _summary(facts: ExportFacts, hf: dict) -> str:
  h = facts.history
  kind = ("A decoder-only Gemma model" if is_decoder_only(facts.cfg)
          else "A T5Gemma 2 encoder-decoder model" if facts.cfg.family == "t5gemma2"
          else "A T5Gemma encoder-decoder model")
  text = f"{kind} (`{hf['architectures'][0]}`) exported by t5gemma-jax"
  if h is None:
    return text + f" from params in memory (`{SAVE_API}`), which records no training."
  if h.gin is not None:
    task = h.gin.value("TrainConfig.mixture_or_task")
    text += f", trained for {h.step:,} steps" + (f" on `{task}`" if task else "")
  if h.base_models:
    text += ", starting from " + ", ".join(f"`{m}`" for m in h.base_models)
  return text + f". The weights are step {h.step:,} of the run `{h.run_dir}`."


def _architecture(facts: ExportFacts, hf: dict) -> str:
  cfg, gin = facts.cfg, facts.history.gin if facts.history else None
  rows = [("Model type", f"`{hf['model_type']}` (transformers `{hf['architectures'][0]}`)")]
  preset = _preset(gin)
  if preset:
    rows.append(("Preset", f"`{preset}`"))
  rows += [("Parameters", f"{facts.parameters:,}"), ("Stored dtype", facts.dtype),
           ("Vocabulary", f"{cfg.vocab_size:,} tokens (pad {cfg.pad_id}, eos {cfg.eos_id}, "
                          f"bos {cfg.bos_id})")]
  if is_decoder_only(cfg):
    rows.append(("Attention", "PrefixLM (bidirectional over the input prefix; exported as "
                              "the plain causal LM)" if cfg.prefix_lm else "causal"))
  elif cfg.family == "t5gemma2":
    rows.append(("T5Gemma 2", f"merged attention {cfg.merged_attention}, shared embedding "
                              f"{cfg.shared_embedding}; text weights only"))
  stacks = ["| Stack | Layers | d_model | FFN | Heads | KV heads | Head dim | Dropout |",
            "|---|---|---|---|---|---|---|---|"]
  for name, m in cfg.stacks.items():
    stacks.append(f"| {name} | {m.num_layers} | {m.hidden_size} | {m.intermediate_size} | "
                  f"{m.num_heads} | {m.num_kv_heads} | {m.head_dim} | {m.dropout_rate:g} |")
  return "## Architecture\n\n" + _table(rows) + "\n\n" + "\n".join(stacks)


def _training(facts: ExportFacts) -> str:
  h = facts.history
  lines = ["## Training", ""]
  if h is None:
    return "\n".join(lines + [f"Not recorded: `{SAVE_API}` wrote these params from memory. "
                              "`t5gemma export` of a run directory describes the training."])
  if h.gin is None:
    lines.append(f"No training is recorded in `{h.run_dir}` (it has no "
                 f"{run_files.TRAIN_GIN}): these are the weights its step {h.step:,} holds"
                 + (f", as {_verb(h.source)}." if h.source else "."))
  else:
    lines.append(_table(_training_rows(h)))
    lines += ["", f"From the run's {run_files.TRAIN_GIN}; settings it does not bind were "
                  "t5gemma-jax defaults."]
  origin = _origin(h.source)
  if origin:
    lines += ["", origin]
  return "\n".join(lines)


def _training_rows(h: run_history.RunHistory) -> list[tuple[str, str]]:
  g = h.gin
  planned = g.value("TrainConfig.train_steps")
  steps = f"{h.step:,}" + (f" (of {planned:,} planned)"
                           if isinstance(planned, int) and planned != h.step else "")
  rows = [("Steps trained", steps)]
  task = g.value("TrainConfig.mixture_or_task")
  if task:
    rows.append(("Mixture / task", f"`{task}`"))
  lengths = g.value("TrainConfig.task_feature_lengths")
  if isinstance(lengths, dict):
    rows.append(("Feature lengths", ", ".join(f"{k} {v}" for k, v in lengths.items())))
  batch = g.value("TrainConfig.batch_size")
  if batch is not None:
    micro = g.value("TrainConfig.num_microbatches")
    rows.append(("Batch size", f"{batch} sequences per step"
                 + (f" ({micro} microbatches)" if isinstance(micro, int) and micro > 1 else "")))
  optimizer = _settings(g, "OptimizerConfig", ("name", "weight_decay", "clip_grad_norm",
                                               "b1", "b2"))
  if optimizer:
    rows.append(("Optimizer", optimizer))
  schedule = _settings(g, "ScheduleConfig", ("name", "learning_rate", "warmup_steps",
                                             "total_steps", "end_fraction"))
  if schedule:
    rows.append(("Learning rate", schedule))
  loss = _settings(g, "LossConfig", ("z_loss", "label_smoothing"))
  if loss:
    rows.append(("Loss", loss))
  seed = g.value("TrainConfig.seed")
  if seed is not None:
    rows.append(("Seed", str(seed)))
  if h.init_from:
    rows.append(("Fine-tuned from", " <- ".join(f"`{d}`" for d in h.init_from)))
  if h.train:
    rows.append((f"Last logged (step {h.train['step']:,})",
                 _metrics(h.train, ("loss", "cross_entropy", "accuracy"))))
  if h.validation:
    rows.append((f"Validation (step {h.validation['step']:,})",
                 _metrics(h.validation, ("validation_loss",))))
  return rows


def _evaluation(facts: ExportFacts) -> str:
  h = facts.history
  if h is None or not h.evals:
    later = f" ({_later(h.later_evals)})" if h is not None and h.later_evals else ""
    return f"## Evaluation\n\nNo evaluation of these weights is recorded{later}."
  lines = ["## Evaluation", "",
           "Scores recorded in the run's eval_results.jsonl, the newest per task at or before "
           "the exported step, with the settings that computed them (sacreBLEU signatures, "
           "...):", "", "| Task | Split | Step | Metric | Score | Settings |",
           "|---|---|---|---|---|---|"]
  for e in h.evals:
    for metric, value in sorted(e.scores.items()):
      setting = e.settings.get(metric)
      lines.append(f"| `{e.task}` | {e.split} | {e.step:,} | {metric} | {value:.2f} | "
                   + (f"`{_cell(setting)}`" if setting else "") + " |")
  if h.later_evals:
    lines += ["", _later(h.later_evals)[0].upper() + _later(h.later_evals)[1:] + "."]
  return "\n".join(lines)


def _usage(facts: ExportFacts) -> str:
  auto = "AutoModelForCausalLM" if is_decoder_only(facts.cfg) else "AutoModelForSeq2SeqLM"
  tokenizer = ('tokenizer = AutoTokenizer.from_pretrained(path)' if facts.tokenizer else
               '# No tokenizer files in this folder: load the one the model was trained with.\n'
               'tokenizer = AutoTokenizer.from_pretrained("TOKENIZER_FOLDER_OR_REPO")')
  return (f"## Usage\n\n```python\nfrom transformers import {auto}, AutoTokenizer\n\n"
          f'path = "{facts.name}"  # this folder, or the Hub repository it is uploaded to\n'
          f"{tokenizer}\nmodel = {auto}.from_pretrained(path)\n"
          'inputs = tokenizer("Your input text", return_tensors="pt")\n'
          "outputs = model.generate(**inputs, max_new_tokens=32)\n"
          "print(tokenizer.decode(outputs[0], skip_special_tokens=True))\n```")


def _export(facts: ExportFacts) -> str:
  h = facts.history
  python = EXPORT_API if h is not None else SAVE_API
  rows = [("t5gemma-jax", facts.version),
          ("Command", f"`{_cell(facts.command)}`" if facts.command else f"`{python}` (Python)")]
  if h is not None:
    rows += [("Source run", f"`{h.run_dir}`"), ("Step", f"{h.step:,} (`{facts.step_dir}`)")]
  rows.append(("Date", facts.date))
  if facts.verified:
    rows.append(("Verified", f"transformers' logits on this folder within {facts.verified[0]:.3g}"
                             f" of t5gemma-jax's (tolerance {facts.verified[1]:g})"))
  return "## Export\n\n" + _table(rows)


# ------------------------------------------------------------------------------- helpers


def _preset(gin: Optional[config_gin.GinSettings]) -> Optional[str]:
  """'preset(name='tiny', dropout_rate=0.1)' when the run's model came from a preset."""
  if gin is None:
    return None
  ref = gin.text("model_config.cfg") or ""
  match = re.fullmatch(r"@([A-Za-z_][\w.]*)\(\)", ref)
  if not match or match.group(1) not in PRESET_FACTORIES:
    return None
  args = gin.parameters_of(match.group(1))
  args = {k: args[k] for k in sorted(args, key=lambda k: k not in ("name", "stack"))}
  return f"{match.group(1)}(" + ", ".join(
      f"{k}={v!r}" if not isinstance(v, str) or not v.startswith("@") else f"{k}={v}"
      for k, v in args.items()) + ")"


def _settings(gin: config_gin.GinSettings, configurable: str, keys: tuple) -> str:
  """'adamw, weight_decay 0.01' from the bound `keys` of `configurable` ("name" first, bare)."""
  bound = gin.parameters_of(configurable)
  parts = []
  for k in keys:
    if k in bound:
      v = bound[k]
      text = f"{v:g}" if isinstance(v, float) else str(v)
      parts.append(text if k == "name" else f"{k} {text}")
  return ", ".join(parts)


def _later(n: int) -> str:
  return (f"not shown: {n} evaluation{'s' if n != 1 else ''} of later steps, whose weights "
          "are not these")


def _metrics(record: dict, keys: tuple) -> str:
  return ", ".join(f"{k} {record[k]:.4g}" for k in keys
                   if isinstance(record.get(k), (int, float)))


def _origin(source: Optional[dict]) -> str:
  """'Weights imported from `org/name` (revision abc) by `t5gemma import_hf`.' or ''."""
  if not source:
    return ""
  folders = [f for f in source.get("folders") or [] if isinstance(f, dict)]
  names = [f"`{f['repo_id']}` (revision `{f.get('revision')}`)" if f.get("repo_id")
           else f"`{f.get('path')}`" for f in folders]
  return (f"The starting weights were {_verb(source)} from {' and '.join(names) or 'a checkpoint'} "
          f"by `t5gemma {source.get('command', 'import_hf')}`.")


def _verb(source: dict) -> str:
  return "adapted" if source.get("command") == "adapt" else "imported"


def _table(rows: list[tuple[str, str]]) -> str:
  return "\n".join(["| | |", "|---|---|"] + [f"| {_cell(k)} | {v} |" for k, v in rows])


def _cell(text: str) -> str:
  """Text for a markdown table cell: a pipe would end the cell (GFM reads `\\|` as a pipe,
  inside code spans too)."""
  return text.replace("|", "\\|").replace("\n", " ")


def _yaml_lines(obj: Any, pad: str) -> list[str]:
  """Block-style YAML of nested dicts and lists of scalars (no library needed to write it)."""
  out = []
  if isinstance(obj, dict):
    for k, v in obj.items():
      if isinstance(v, (dict, list)):
        out.append(f"{pad}{k}:")
        out += _yaml_lines(v, pad + "  ")
      else:
        out.append(f"{pad}{k}: {_yaml_scalar(v)}")
    return out
  for item in obj:
    if isinstance(item, (dict, list)):
      sub = _yaml_lines(item, pad + "  ")
      out += [f"{pad}- {sub[0][len(pad) + 2:]}", *sub[1:]]
    else:
      out.append(f"{pad}- {_yaml_scalar(item)}")
  return out


def _yaml_scalar(v: Any) -> str:
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, (int, float)):
    return repr(v)
  s = str(v)
  if _YAML_PLAIN.fullmatch(s) and s.lower() not in _YAML_WORDS:
    return s
  return json.dumps(s)  # a double-quoted YAML string
