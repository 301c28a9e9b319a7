"""Tabulates and plots training runs: OUT/report.md and OUT/loss_curves.png.

  t5gemma launch report /tmp/sweep                  # the runs of /tmp/sweep/sweep.json
  t5gemma launch report /runs/a /runs/b [--out=DIR]  # any MODEL_DIRs (OUT: their parent)

For each run the table has its swept values (for plain MODEL_DIRs: the gin bindings in which
their config.gin files differ), final step, final train loss, best and final validation loss,
the median tokens/s (the first logged interval, which includes compilation, left out) and the
latest value of every metric in eval_results.jsonl; with a "seed" axis, a second table gives
each setting's mean ± std over the seeds. The plot shows train loss per run (solid)
and validation loss (dashed, same colour). Both files are written atomically.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
from typing import Optional, Sequence

from t5gemma_jax import atomic, config_gin, run_files, storage
from t5gemma_jax.launch.local_runs import STATUS  # what the sweep's local mode writes

NO_VALUE = "–"


read_text = storage.read_text_if_exists
write_bytes = atomic.write_bytes  # local or gs:// (through tf.io.gfile)


def _jsonl(path: str) -> list[dict]:
  records = []
  for line in (read_text(path) or "").splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      pass  # a line cut short by a killed writer
  return records


def _number(value) -> Optional[float]:
  try:
    return float(value)  # non-finite values are logged as strings ("nan")
  except (TypeError, ValueError):
    return None


def series(records: Sequence[dict], key: str) -> list[tuple[int, float]]:
  """(step, value) sorted by step; a resumed run logs some steps again and the later wins."""
  by_step = {}
  for r in records:
    value = _number(r.get(key))
    if value is not None and "step" in r:
      by_step[int(r["step"])] = value
  return sorted(by_step.items())


def summarise(model_dir: str) -> dict:
  """The report's numbers for one run; missing ones are None."""
  records = _jsonl(os.path.join(model_dir, run_files.METRICS))
  train, val = series(records, "loss"), series(records, "validation_loss")
  speed = [v for _, v in series(records, "tokens_per_s")]
  evals, scored_on = {}, None
  results = _jsonl(os.path.join(model_dir, run_files.EVAL_RESULTS))
  for r in sorted(results, key=lambda r: r.get("step", 0)):  # the latest value wins
    for k, v in r.items():
      if k not in ("step", "task", "split", "examples") and _number(v) is not None:
        evals[f"{r.get('task', '?')}/{k}"] = _number(v)
    if r.get("examples") is not None:
      scored_on = (r.get("split", "validation"), int(r["examples"]))
  try:
    status = json.loads(read_text(os.path.join(model_dir, STATUS)) or "{}").get("status")
  except ValueError:
    status = None
  steps = [s for s, _ in train + val]
  finite_val = [v for _, v in val if math.isfinite(v)]
  return {
      "status": status or ("not started" if not records else None),
      "step": max(steps) if steps else None,
      "train_loss": train[-1][1] if train else None,
      "best_validation_loss": min(finite_val) if finite_val else None,
      "final_validation_loss": val[-1][1] if val else None,
      "tokens_per_s": statistics.median(speed[1:] or speed) if speed else None,
      "eval": evals, "eval_setting": scored_on, "train_curve": train,
      "validation_curve": val,
  }


def _bindings(settings: Optional[config_gin.GinSettings]) -> dict[str, str]:
  """{NAME or Configurable.parameter: value text} of a run's config.gin ({} without one)."""
  return {**settings.macros, **settings.bindings} if settings else {}


def load_runs(paths: Sequence[str]) -> tuple[list[dict], list[str], Optional[str]]:
  """Runs as {"name", "model_dir", "values"}, the value columns, and the sweep root if any."""
  sweep_text = read_text(os.path.join(paths[0], "sweep.json")) if len(paths) == 1 else None
  if sweep_text:
    sweep = json.loads(sweep_text)
    columns = [a["label"] for a in sweep.get("axes", [])]
    # MODEL_DIR is ROOT/NAME: this still finds the runs of a sweep folder copied elsewhere.
    return ([{"name": r["name"], "model_dir": os.path.join(paths[0], r["name"]),
              "values": r["values"]} for r in sweep["runs"]], columns, paths[0])
  configs = {p: _bindings(config_gin.read_run(p)) for p in paths}
  known = [c for c in configs.values() if c]  # runs not started yet have no config.gin
  keys = sorted({k for c in known for k in c} - {"MODEL_DIR", "TrainConfig.model_dir"})
  columns = [k for k in keys if len({c.get(k) for c in known}) > 1]
  runs = [{"name": os.path.basename(p.rstrip("/")) or p, "model_dir": p,
           "values": {k: configs[p].get(k, NO_VALUE) for k in columns}} for p in paths]
  return runs, columns, None


def _eval_setting(run: dict) -> tuple[str, Optional[int]]:
  """(split, number of examples) a run's latest evaluation decoded: what eval_results.jsonl
  records, or for runs older than that record, its config.gin, else TrainConfig's defaults."""
  if run["summary"].get("eval_setting"):
    return tuple(run["summary"]["eval_setting"])
  import dataclasses
  from t5gemma_jax.train import loop
  defaults = {f.name: f.default for f in dataclasses.fields(loop.TrainConfig)}
  bound = config_gin.read_run(run["model_dir"]) or config_gin.parse_gin("")
  split, n = (defaults[k] if bound.text(f"TrainConfig.{k}") is None
              else bound.value(f"TrainConfig.{k}") for k in ("eval_split", "eval_examples"))
  return split, n


def baseline_rows(runs: Sequence[dict]) -> list[dict]:
  """What no training scores (`t5gemma_jax.baselines`: copy the source, the first sentence) on
  the same examples as the runs' evaluations, as rows for the tables: one per (split, number
  of examples) among the runs; [] when no run evaluated a built-in supervised task."""
  tasks = {k.split("/", 1)[0] for r in runs for k in r["summary"]["eval"]}
  if not tasks:
    return []
  from t5gemma_jax import baselines
  tasks &= set(baselines.supervised_tasks())
  rows = []
  for split, n in sorted({_eval_setting(r) for r in runs if r["summary"]["eval"]},
                         key=str):
    scores = {f"{t}/{k}": v for t in sorted(tasks)
              for k, v in baselines.score(t, split, num_examples=n).items() if k != "examples"}
    if scores:
      label = f"baseline: copy source / first sentence ({split}, {n or 'all'} examples)"
      rows.append({"name": label, "values": {}, "summary": {
          "status": NO_VALUE, "step": None, "train_loss": None, "best_validation_loss": None,
          "final_validation_loss": None, "tokens_per_s": None, "eval": scores,
          "train_curve": [], "validation_curve": []}})
  return rows


def _fmt(value, spec: str) -> str:
  return NO_VALUE if value is None else format(value, spec)


def _cell(text) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(runs: Sequence[dict], columns: Sequence[str], title: str) -> str:
  eval_columns = sorted({k for r in runs for k in r["summary"]["eval"]})
  header = ["run", *columns, "status", "step", "train loss", "best val loss",
            "final val loss", "tokens/s", *eval_columns]
  lines = [f"# {title}", "", "| " + " | ".join(_cell(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  for r in runs:
    s = r["summary"]
    row = [r["name"], *(r["values"].get(c, NO_VALUE) for c in columns), s["status"] or NO_VALUE,
           _fmt(s["step"], "d"), _fmt(s["train_loss"], ".4f"),
           _fmt(s["best_validation_loss"], ".4f"), _fmt(s["final_validation_loss"], ".4f"),
           _fmt(s["tokens_per_s"], ",.0f"), *(_fmt(s["eval"].get(c), ".2f") for c in eval_columns)]
    lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
  return "\n".join(lines) + "\n"


SEED_AXES = ("seed", "SEED")


def split_seed(columns: Sequence[str]) -> tuple[Optional[str], list[str]]:
  """(the seed axis among `columns` or None, the other columns)."""
  seed = next((c for c in columns if c in SEED_AXES), None)
  return seed, [c for c in columns if c != seed]


def seed_summary(runs: Sequence[dict], columns: Sequence[str],
                 baselines: Sequence[dict] = ()) -> str:
  """Markdown: runs that differ only in their seed axis, as mean ± sample std (n: the runs with
  results so far; one run: its value alone) of the final validation loss and every eval
  metric, then the `baselines` rows (`baseline_rows`); "" when there is no seed axis."""
  seed, rest = split_seed(columns)
  if seed is None:
    return ""
  eval_columns = sorted({k for r in runs for k in r["summary"]["eval"]})
  groups: dict[tuple, list[dict]] = {}
  for r in runs:
    groups.setdefault(tuple(r["values"].get(c, NO_VALUE) for c in rest), []).append(r)
  header = [*rest, "runs", "final val loss", *eval_columns]
  lines = ["", f"## Mean ± std over {seed}", "",
           "| " + " | ".join(_cell(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]

  def stat(values: list) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
      return NO_VALUE
    if len(values) == 1:
      return f"{values[0]:.2f}"  # one run has no spread
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"

  evaluated = any(r["summary"]["eval"] for r in runs)
  for key, members in groups.items():
    # The runs with results: with end-of-training evaluations in the sweep, those that have
    # them (a run still training has only its validation losses so far).
    done = [m["summary"] for m in members
            if (m["summary"]["eval"] if evaluated else
                m["summary"]["final_validation_loss"] is not None)]
    row = [*key, str(len(done)), stat([d["final_validation_loss"] for d in done]),
           *(stat([d["eval"].get(c) for d in done]) for c in eval_columns)]
    lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
  for b in baselines:
    named = [b["name"], *(NO_VALUE for _ in rest[1:])] if rest else []
    row = [*named, "" if rest else b["name"], NO_VALUE,
           *(_fmt(b["summary"]["eval"].get(c), ".2f") for c in eval_columns)]
    lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
  return "\n".join(lines) + "\n"


def plot(runs: Sequence[dict], title: str, columns: Sequence[str] = ()) -> bytes:
  """Loss curves as PNG bytes. With a seed axis among `columns`, the runs of one setting share
  a colour and a legend entry (one line per seed)."""
  import matplotlib
  matplotlib.use("Agg")  # files only, never a display
  from matplotlib import pyplot as plt

  seed, rest = split_seed(columns)

  def setting(r: dict) -> str:
    if seed is None:
      return r["name"]
    return ",".join(f"{c}={r['values'].get(c, NO_VALUE)}" for c in rest) or "all seeds"

  palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  colors: dict[str, str] = {}
  fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
  drawn = False
  for r in runs:
    s, key = r["summary"], setting(r)
    first = key not in colors
    color = colors.setdefault(key, palette[len(colors) % len(palette)])
    train = [(x, y) for x, y in s["train_curve"] if math.isfinite(y)]
    val = [(x, y) for x, y in s["validation_curve"] if math.isfinite(y)]
    if train:
      ax.plot(*zip(*train), color=color, linewidth=1 if seed else 1.5, alpha=0.8,
              label=key if first else None)
    if val:
      ax.plot(*zip(*val), linestyle="--", marker="." if len(val) < 20 else None, color=color,
              label=f"{key} (validation)" if first else None)
    drawn = drawn or bool(train or val)
  if drawn:
    ax.legend(fontsize="small")
  else:
    ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center", transform=ax.transAxes)
  ax.set(xlabel="step", ylabel="loss", title=title)
  ax.grid(alpha=0.3)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", bbox_inches="tight")
  plt.close(fig)
  return buf.getvalue()


def report(paths: Sequence[str], out: Optional[str] = None) -> tuple[str, str]:
  """Writes report.md and loss_curves.png; returns their paths."""
  runs, columns, root = load_runs(paths)
  if out is None:
    if root is None and any(storage.is_remote(p) for p in paths):
      raise ValueError("give --out for runs in object storage")
    out = root or os.path.commonpath([os.path.abspath(p) for p in paths])
  for r in runs:
    r["summary"] = summarise(r["model_dir"])
  title = f"Sweep {os.path.basename(root.rstrip('/'))}" if root else "Runs"
  md, png = os.path.join(out, "report.md"), os.path.join(out, "loss_curves.png")
  base = baseline_rows(runs)
  text = markdown([*runs, *base], columns, title) + seed_summary(runs, columns, base)
  write_bytes(md, text.encode("utf-8"))
  write_bytes(png, plot(runs, title, columns))
  return md, png


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="report", description=__doc__.split("\n\n")[0])
  parser.add_argument("paths", nargs="+", help="a sweep ROOT (with sweep.json) or MODEL_DIRs")
  parser.add_argument("--out", help="folder for report.md and loss_curves.png")
  args = parser.parse_args(argv)
  try:
    md, png = report(args.paths, args.out)
  except (ValueError, OSError) as e:
    print(f"report: error: {e}", file=sys.stderr)
    return 2
  print(read_text(md), end="")
  print(f"wrote {md} and {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
