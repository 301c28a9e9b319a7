"""`t5gemma infer` and `t5gemma eval` as two jax.distributed processes on localhost: each decodes
its share of the batches, and the results equal a one-process run's byte for byte."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from t5gemma_jax import presets
from t5gemma_jax.convert import params_checkpoint
from tests.helpers.random_params import random_params

pytestmark = pytest.mark.slow  # subprocess runs or long trainings: `make test` only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multiprocess_infer_worker.py")
EXAMPLES, BATCH = 7, 2  # 4 batches, the last one short: 2 per process of 2
DECODE = ["--gin.DecodeConfig.max_new_tokens=6", f"--gin.DecodeConfig.batch_size={BATCH}",
          '--gin.DecodeConfig.strategy="greedy"']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _commands(run_dir, inputs, output) -> list[list[str]]:
  """`infer` over the input file, then `eval` of as many examples of a task."""
  common = ["--gin_file=models/tiny.gin", f'--gin.MODEL_DIR="{run_dir}"', *DECODE]
  infer = ["infer", "--gin_file=runs/infer.gin", *common, f'--gin.INFER_OUTPUT="{output}"',
           "--gin.InferConfig.task=None", f'--gin.InferConfig.input_file="{inputs}"',
           "--gin.InferConfig.inputs_length=32"]
  evaluate = ["eval", "--gin_file=runs/eval.gin", *common,
              '--gin.EVAL_TASK="docstring_summarization"',
              f"--gin.EvalConfig.num_examples={EXAMPLES}",
              '--gin.EvalConfig.task_feature_lengths={"inputs": 32, "targets": 16}']
  return [infer, evaluate]


def _start(count: int, run_dir, inputs, output, base) -> list[subprocess.Popen]:
  """Starts `count` workers; each one's output goes to base/log_{count}_{i}.txt."""
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the worker sets its own
  commands = json.dumps(_commands(run_dir, inputs, output))
  procs = []
  for i in range(count):
    with open(base / f"log_{count}_{i}.txt", "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, WORKER, port, str(i), str(count),
           str(base / f"report_{count}_{i}.json"), commands],
          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait(procs: list[subprocess.Popen], timeout: float) -> None:
  """Waits for all; once one fails (or time is up) the rest are killed: a process left alone
  in a collective would otherwise wait minutes for the distributed runtime to give up."""
  deadline = time.time() + timeout
  while any(p.poll() is None for p in procs):
    if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
      return
    time.sleep(0.2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One process and two processes over the same random-params checkpoint, run side by side.

  Returns:
    {processes: (run dir, output file, [per-process report], [per-process log])}.
  """
  base = tmp_path_factory.mktemp("multiprocess")
  cfg = presets.preset("tiny")
  params = random_params(cfg, seed=1)
  inputs = base / "inputs.txt"
  inputs.write_text("".join(f"summarize: example number {i} " + "word " * i + "\n"
                            for i in range(EXAMPLES)))
  started = {}
  for count in (1, 2):
    run_dir = base / f"run_{count}"  # eval appends to the run's eval_results.jsonl: one each
    params_checkpoint.save_params(params, cfg, str(run_dir))
    output = base / f"out_{count}" / "predictions.jsonl"
    started[count] = (run_dir, output, _start(count, run_dir, inputs, output, base))
  out = {}
  for count, (run_dir, output, procs) in started.items():
    _wait(procs, timeout=240)
    logs = [(base / f"log_{count}_{i}.txt").read_text() for i in range(count)]
    for i, p in enumerate(procs):
      assert p.returncode == 0, "\n".join(
          [f"{count} process(es): process {i} exited with {p.returncode}"]
          + [f"--- process {j}:\n{log[-3000:]}" for j, log in enumerate(logs)])
    reports = [json.loads((base / f"report_{count}_{i}.json").read_text())
               for i in range(count)]
    out[count] = (run_dir, output, reports, logs)
  return out


def _event_files(folder) -> list[str]:
  return [os.path.join(r, f) for r, _, names in os.walk(folder) for f in names]


def test_two_processes_infer_like_one(runs):
  (_, one, reports_1, _), (_, two, reports_2, logs_2) = runs[1], runs[2]
  assert one.read_bytes() == two.read_bytes()
  records = [json.loads(line) for line in two.read_text().splitlines()]
  inputs = (two.parent.parent / "inputs.txt").read_text().splitlines()
  assert [r["input"] for r in records] == inputs  # every example, in order
  assert len({r["prediction"] for r in records}) > 1, "predictions too alike to show the order"
  # 4 batches: all of them in one process, 2 in each of two (not every process doing all 4),
  # and every process ends up with all the tokens.
  assert reports_1[0][0]["generate_calls"] == 4
  assert [r[0]["generate_calls"] for r in reports_2] == [2, 2]
  assert reports_2[0][0]["tokens"] == reports_2[1][0]["tokens"] == reports_1[0][0]["tokens"]
  # Only process 0 writes (atomically: nothing else is left beside the output) and reports.
  assert os.listdir(two.parent) == ["predictions.jsonl"]
  assert f"wrote {EXAMPLES} predictions" in logs_2[0]
  assert "wrote" not in logs_2[1]


def test_two_processes_eval_like_one(runs):
  (run_1, _, reports_1, _), (run_2, _, reports_2, logs_2) = runs[1], runs[2]
  rows_1 = [json.loads(line) for line in open(run_1 / "eval_results.jsonl")]
  rows_2 = [json.loads(line) for line in open(run_2 / "eval_results.jsonl")]
  assert len(rows_2) == 1, "process 1 appended to eval_results.jsonl too"
  assert rows_1 == rows_2 and {"rouge1", "rougeLsum"} <= set(rows_2[0])
  assert rows_2[0]["step"] == 0
  # Random params score 0: the tokens the metrics were computed from are what is compared.
  tokens = reports_1[0][1]["tokens"]
  assert len(tokens) == 1 and len(tokens[0]) == EXAMPLES
  assert reports_2[0][1]["tokens"] == reports_2[1][1]["tokens"] == tokens
  assert reports_1[0][1]["generate_calls"] == 4
  assert [r[1]["generate_calls"] for r in reports_2] == [2, 2]
  # TensorBoard: process 0 alone logs (one events file per task, as one process).
  assert len(_event_files(run_2 / "eval")) == len(_event_files(run_1 / "eval")) == 1
  assert "docstring_summarization: rouge1" in logs_2[0]
  assert "rouge1" not in logs_2[1]
