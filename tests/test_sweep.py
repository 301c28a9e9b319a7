"""Sweeps: run names, sweep.json, the printed commands, and a real two-run local sweep with its
report."""

import json
import os
import random
import re
import shlex
import struct
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from t5gemma_jax.launch import local_runs, report, sweep  # noqa: E402

pytestmark = pytest.mark.slow  # subprocess runs or long trainings: `make test` only

# The demo recipe cut down to seconds: a small task, short sequences, 4 steps, 2 validations.
TINY = ["--gin_file=runs/demo.gin", '--gin.MIXTURE_OR_TASK_NAME="cldr_translate_en_de"',
        '--gin.TASK_FEATURE_LENGTHS={"inputs": 32, "targets": 16}', "--gin.BATCH_SIZE=4",
        "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=4", "--gin.EVAL_PERIOD=2",
        "--gin.TrainConfig.eval_steps=1", "--gin.WARMUP_STEPS=2",
        "--gin.TrainConfig.log_period=1", "--gin.TrainConfig.progress=False",
        "--gin.TrainConfig.eval_tasks=()"]
TPU_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _axes(*specs):
  return [sweep.parse_cli_axis(s) for s in specs]


def test_grid_and_zip_names_are_fixed_and_ordered():
  axes = _axes("objective=span_corruption,ul2", "lr:LEARNING_RATE=1e-3,3e-4")
  runs = sweep.expand(axes, ["--gin_file=runs/pretrain.gin"], "/r")
  assert [r.name for r in runs] == [
      "objective=span_corruption,lr=1e-3", "objective=span_corruption,lr=3e-4",
      "objective=ul2,lr=1e-3", "objective=ul2,lr=3e-4"]
  assert runs == sweep.expand(_axes("objective=span_corruption,ul2", "lr:LEARNING_RATE=1e-3,3e-4"),
                              ["--gin_file=runs/pretrain.gin"], "/r")
  assert runs[2].model_dir == "/r/objective=ul2,lr=1e-3"
  assert runs[2].values == {"objective": "ul2", "lr": "1e-3"}
  # Swept files load after the base files, so their macros win over the recipe's.
  assert runs[2].args == ("--gin_file=runs/pretrain.gin", "--gin_file=objectives/ul2.gin",
                          "--gin.LEARNING_RATE=1e-3")
  assert runs[2].train_args()[-1] == '--gin.MODEL_DIR="/r/objective=ul2,lr=1e-3"'
  zipped = sweep.expand(axes, [], "/r", zip_axes=True)
  assert [r.name for r in zipped] == ["objective=span_corruption,lr=1e-3", "objective=ul2,lr=3e-4"]
  with pytest.raises(ValueError, match="one length"):
    sweep.expand(axes + _axes("SEED=1,2,3"), [], "/r", zip_axes=True)
  assert [r.name for r in sweep.expand([], [], "/r")] == ["base"]


def test_labels_are_safe_and_distinct_for_distinct_values():
  rng = random.Random(0)
  alphabet = "aZ09._-+\"' {}[]:,/=\\%@é"
  texts = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10))) for _ in range(5000)}
  texts |= {"1", '"1"', "'1'", "c4", '"c4"', "True", '"True"', "1e-3", "1E-3", "0.001"}
  for gin in (True, False):
    labels = {sweep.value_label(t, gin) for t in texts}
    assert len(labels) == len(texts)
    assert all(sweep.SAFE.fullmatch(label) for label in labels)
  assert sweep.value_label('"c4_ul2"') == "c4_ul2" and sweep.value_label("3e-4") == "3e-4"
  assert sweep.value_label('{"inputs": 32, "targets": 16}').startswith("inputs_32_targets_16-")
  long_a, long_b = ("x" * 200 + "a", "x" * 200 + "b")
  names = [sweep.run_name([("v", sweep.value_label(t))]) for t in (long_a, long_b)]
  assert names[0] != names[1] and all(len(n) <= sweep.MAX_NAME for n in names)
  runs = sweep.expand(_axes(f"v=1,{long_a},{long_b}", "w=@a(),@b()"), [], "/r")
  assert len({r.name for r in runs}) == 6
  assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._+=,-]*", r.name) for r in runs)


def test_axis_values_split_outside_quotes_and_brackets():
  assert sweep.split_values('{"inputs": 32, "targets": 16},{"inputs": 64, "targets": 8}') == [
      '{"inputs": 32, "targets": 16}', '{"inputs": 64, "targets": 8}']
  assert sweep.split_values(r'"a,b", (1, 2),"c\"d,e"') == ['"a,b"', "(1, 2)", r'"c\"d,e"']
  for bad in ('A="abc', "A=1,,2", "A=(1,2", "A=", "A", "LR=1,1", "a/b=1,2", "objective=nope",
              "MODEL_DIR=1,2"):
    with pytest.raises(ValueError):
      sweep.parse_cli_axis(bad)


def _sweep_file(tmp_path):
  spec = {
      "name": "Obj Sweep",
      "base": {"gin_file": ["runs/pretrain.gin", "models/tiny.gin"], "BATCH_SIZE": 4,
               "TrainConfig.eval_tasks": ["a b", "c'd\"$x"]},
      "axes": {
          "objective": {"sc": {"objective": "span_corruption"},
                        "ul2": {"gin_file": "objectives/ul2.gin", "TRAIN_STEPS": 7}},
          "lr:LEARNING_RATE": [0.001, "3e-4"]},
  }
  path = tmp_path / "sweep_spec.json"
  path.write_text(json.dumps(spec))
  return str(path)


def test_sweep_file_print_mode_and_sweep_json(tmp_path, capsys):
  root = tmp_path / "root"
  assert sweep.main(["--root", str(root), "--sweep_file", _sweep_file(tmp_path),
                     "--mode=print", "--", "--gin.SEED=3"]) == 0
  lines = capsys.readouterr().out.splitlines()
  described = json.loads((root / "sweep.json").read_text())
  assert [r["name"] for r in described["runs"]] == [
      "objective=sc,lr=0.001", "objective=sc,lr=3e-4", "objective=ul2,lr=0.001",
      "objective=ul2,lr=3e-4"]
  assert [a["label"] for a in described["axes"]] == ["objective", "lr"]
  assert described["name"] == "Obj Sweep" and described["zip"] is False
  assert [n for n in os.listdir(root)] == ["sweep.json"]  # written by rename, nothing left over
  base = ["--gin_file=runs/pretrain.gin", "--gin_file=models/tiny.gin", "--gin.BATCH_SIZE=4",
          '--gin.TrainConfig.eval_tasks=["a b", "c\'d\\"$x"]', "--gin.SEED=3"]
  ul2 = described["runs"][3]
  assert ul2["model_dir"] == str(root / "objective=ul2,lr=3e-4")
  assert ul2["values"] == {"objective": "ul2", "lr": "3e-4"}
  assert ul2["args"] == base + ["--gin_file=objectives/ul2.gin", "--gin.TRAIN_STEPS=7",
                                "--gin.LEARNING_RATE=3e-4",
                                f'--gin.MODEL_DIR="{root}/objective=ul2,lr=3e-4"']
  assert described["runs"][0]["args"][len(base):-1] == [
      "--gin_file=objectives/span_corruption.gin", "--gin.LEARNING_RATE=0.001"]
  # What the shell would hand to `t5gemma train`, byte for byte.
  assert [shlex.split(line) for line in lines] == [
      [sys.executable, "-m", "t5gemma_jax.cli", "train", *r["args"]] for r in described["runs"]]


def test_tpu_mode_commands(tmp_path, capsys):
  root = tmp_path / "tpu_root"
  args = ["--root", str(root), "--mode=tpu", "--dry_run", "--tpu_arg=--zone=us-east5-a",
          "--axis", "TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16},{'inputs': 64}",
          "--axis", 'task:MIXTURE_OR_TASK_NAME="c4_ul2","it\'s \\"x\\""', "--",
          "--gin_file=runs/pretrain.gin"]
  assert sweep.main(args) == 0
  out = capsys.readouterr().out
  assert sweep.main(args) == 0 and capsys.readouterr().out == out  # reproducible
  runs = json.loads((root / "sweep.json").read_text())["runs"]
  commands = [shlex.split(line) for line in out.splitlines()]
  assert len(commands) == len(runs) == 4
  names = set()
  for command, run in zip(commands, runs):
    cut = command.index("--")
    assert command[:4] == [sys.executable, "-m", "t5gemma_jax.launch.tpu", "run"]
    assert command[5:cut] == [f"--model_dir={run['model_dir']}", "--zone=us-east5-a", "--dry_run"]
    assert command[cut + 1:] == run["args"][:-1]  # MODEL_DIR comes from --model_dir
    names.add(command[4])
    assert TPU_NAME.fullmatch(command[4]) and len(command[4]) <= 63
    assert command[4].startswith("tpu-root-task-feature-lengths-")
  assert len(names) == 4
  assert "--gin.MIXTURE_OR_TASK_NAME=\"it's \\\"x\\\"\"" in commands[1]


def test_shadowed_objective_is_an_error(tmp_path, capsys):
  common = ["--root", str(tmp_path), "--mode=print", "--axis", "objective=ul2,prefix_lm", "--"]
  both = ['--gin.MIXTURE_OR_TASK_NAME="x"', '--gin.TASK_FEATURE_LENGTHS={"inputs": 8}']
  assert sweep.main(common + both) == 2
  assert "only sets MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS" in capsys.readouterr().err
  assert sweep.main(common + both[1:]) == 0
  assert "override TASK_FEATURE_LENGTHS" in capsys.readouterr().err
  assert sweep.main(common + ['--gin.MODEL_DIR="/x"']) == 2
  assert "MODEL_DIR" in capsys.readouterr().err


def test_local_mode_skips_finished_runs_and_goes_on_after_a_failure(tmp_path, capsys):
  runs = sweep.expand(_axes("X=1,2,3"), [], str(tmp_path))
  calls = tmp_path / "calls"

  def fake(run):  # stands in for `t5gemma train`; X=2 fails
    code = (f"open({str(calls)!r}, 'a').write({run.name!r} + '\\n'); print('training');"
            f"raise SystemExit({int(run.name == 'X=2')})")
    return [sys.executable, "-c", code]

  assert sweep.run_local(runs, command=fake) == 1
  captured = capsys.readouterr()
  assert "FAILED X=2" in captured.err and "2 of 3 runs finished" in captured.out
  status = {r.name: json.loads((tmp_path / r.name / local_runs.STATUS).read_text())["status"]
            for r in runs}
  assert status == {"X=1": "finished", "X=2": "failed", "X=3": "finished"}
  assert (tmp_path / "X=1" / "train.log").read_text() == "training\n"
  assert sweep.run_local(runs, command=fake) == 1
  assert calls.read_text().split() == ["X=1", "X=2", "X=3", "X=2"]
  assert capsys.readouterr().out.count("finished before, skipped") == 2


def test_local_mode_runs_jobs_at_once_on_their_own_cpus(tmp_path, capsys):
  runs = sweep.expand(_axes("X=1,2,3"), [], str(tmp_path))

  def fake(run):  # writes its CPUs, then waits (up to 60 s) until another run has started too
    code = (f"import glob, os, time; d = {str(tmp_path)!r};"
            f"open(os.path.join(d, {run.name!r} + '.cpus'), 'w')"
            f".write(repr(sorted(os.sched_getaffinity(0))));"
            "t = time.time();\n"
            "while len(glob.glob(os.path.join(d, '*.cpus'))) < 2 and time.time() - t < 60:"
            " time.sleep(0.05)\n"
            "raise SystemExit(len(glob.glob(os.path.join(d, '*.cpus'))) < 2)")
    return [sys.executable, "-c", code]

  assert sweep.run_local(runs, command=fake, jobs=2) == 0  # one at a time would wait in vain
  assert "3 of 3 runs finished" in capsys.readouterr().out
  cpus = {r.name: eval((tmp_path / f"{r.name}.cpus").read_text()) for r in runs}
  if len(os.sched_getaffinity(0)) >= 2:
    assert not set(cpus["X=1"]) & set(cpus["X=2"])  # the first two ran side by side
    assert sorted(cpus["X=1"] + cpus["X=2"]) == sorted(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def trained_sweep(tmp_path_factory):
  """Two real trainings of the tiny recipe, one per learning rate."""
  root = tmp_path_factory.mktemp("sweep")
  argv = [sys.executable, "-m", "t5gemma_jax.cli", "launch", "sweep", f"--root={root}",
          "--axis", "lr:LEARNING_RATE=3e-3,1e-3", "--", *TINY]
  result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return root, argv


def _table(markdown):
  rows = [[c.strip() for c in line.strip().strip("|").split("|")]
          for line in markdown.splitlines() if line.startswith("|")]
  return [dict(zip(rows[0], row)) for row in rows[2:]]


def test_local_sweep_trains_both_runs_and_reports_them(trained_sweep, capsys):
  root, argv = trained_sweep
  assert report.main([str(root)]) == 0
  rows = _table((root / "report.md").read_text())
  assert [r["run"] for r in rows] == ["lr=3e-3", "lr=1e-3"]
  for row in rows:
    records = [json.loads(line) for line in open(root / row["run"] / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    val = [r["validation_loss"] for r in records if "validation_loss" in r]
    assert row["lr"] == row["run"][3:] and row["status"] == "finished" and row["step"] == "4"
    assert float(row["train loss"]) == round(losses[-1], 4)
    assert float(row["best val loss"]) == round(min(val), 4) and len(val) == 2
    assert float(row["final val loss"]) == round(val[-1], 4)
    assert float(row["tokens/s"].replace(",", "")) > 0
  png = (root / "loss_curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
  width, height = struct.unpack(">II", png[16:24])
  assert width > 100 and height > 100
  # Again: both runs are done, so nothing trains.
  again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert again.returncode == 0 and again.stdout.count("finished before, skipped") == 2


def test_report_of_plain_model_dirs_shows_differing_bindings(trained_sweep, tmp_path):
  root, _ = trained_sweep
  dirs = [str(root / "lr=3e-3"), str(root / "lr=1e-3")]
  md, png = report.report(dirs, out=str(tmp_path))
  rows = _table(open(md).read())
  assert [(r["run"], r["LEARNING_RATE"]) for r in rows] == [("lr=3e-3", "0.003"),
                                                            ("lr=1e-3", "0.001")]
  assert os.path.getsize(png) > 0


def test_seed_summary_gives_mean_and_spread_per_setting():
  def run(model, seed, loss, chrf):
    return {"name": f"seed={seed},model={model}", "values": {"seed": str(seed), "model": model},
            "summary": {"final_validation_loss": loss, "eval": {"t/chrf": chrf}}}
  runs = [run("a", 0, 2.0, 40.0), run("a", 1, 3.0, 44.0), run("b", 0, 5.0, None)]
  text = report.seed_summary(runs, ["seed", "model"])
  rows = _table(text)
  assert rows == [{"model": "a", "runs": "2", "final val loss": "2.50 ± 0.71",
                   "t/chrf": "42.00 ± 2.83"},
                  {"model": "b", "runs": "1", "final val loss": "5.00", "t/chrf": "–"}]
  assert report.seed_summary(runs, ["model"]) == ""


def test_baseline_rows_score_the_examples_the_runs_decoded(tmp_path):
  from t5gemma_jax import baselines
  (tmp_path / "config.gin").write_text("TrainConfig.eval_examples = 50\n")
  runs = [{"name": f"seed={s},model=a", "model_dir": str(tmp_path),
           "values": {"seed": str(s), "model": "a"},
           "summary": {"final_validation_loss": 2.0, "eval": {"cldr_translate_en_de/chrf": 50.0,
                                                              "my_task/chrf": 1.0}}}
          for s in (0, 1)]
  [row] = report.baseline_rows(runs)
  copy = baselines.score("cldr_translate_en_de", "validation", num_examples=50)
  assert row["summary"]["eval"]["cldr_translate_en_de/chrf"] == copy["chrf"]
  assert "my_task/chrf" not in row["summary"]["eval"] and "50 examples" in row["name"]
  rows = _table(report.seed_summary(runs, ["seed", "model"], [row]))
  assert rows[1]["model"] == row["name"]
  assert rows[1]["cldr_translate_en_de/chrf"] == f"{copy['chrf']:.2f}"
  assert rows[1]["my_task/chrf"] == "–"
  # Runs whose eval_results.jsonl records how many examples were scored: that count is used.
  (tmp_path / "eval_results.jsonl").write_text(json.dumps(
      {"step": 3, "task": "cldr_translate_en_de", "split": "validation", "examples": 40,
       "chrf": 50.0, "metric_settings": {}}) + "\n")
  summary = report.summarise(str(tmp_path))
  assert summary["eval_setting"] == ("validation", 40)
  assert summary["eval"] == {"cldr_translate_en_de/chrf": 50.0}  # the count is not a metric
  [row] = report.baseline_rows([{**runs[0], "summary": summary}])
  assert "40 examples" in row["name"]
  assert row["summary"]["eval"]["cldr_translate_en_de/chrf"] == baselines.score(
      "cldr_translate_en_de", "validation", num_examples=40)["chrf"]
