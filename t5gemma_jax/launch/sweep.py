"""Expands a sweep over gin overrides into named runs, then trains, prints or launches them.

  t5gemma launch sweep --root=/tmp/obj --axis 'objective=span_corruption,ul2,prefix_lm' \
      --axis 'lr:LEARNING_RATE=1e-3,3e-4' -- --gin_file=runs/pretrain.gin --gin_file=models/s-s.gin
  t5gemma launch sweep --root=gs://b/obj --sweep_file=obj.json --mode=tpu --tpu_arg=--zone=Z

Arguments after `--` go to every run (`--gin_file=F`, `--gin.NAME=VALUE`, `--gin_search_path=D`).
`--axis [LABEL:]NAME=V1,V2,...`: NAME is `objective` (V picks
t5gemma_jax/gin/objectives/V.gin, loaded after
the base files), `gin_file`, or a gin macro or binding with V as gin text ('"c4"' is a string;
commas in quotes or brackets do not split). LABEL (default NAME) names the axis. Runs are the
grid of the axes (first outermost) or, with --zip, their zip. A run is named LABEL=VALUE,...; a
value with characters outside [A-Za-z0-9._+-] is cleaned and hashed, as are over-long names, so
distinct values get distinct names. MODEL_DIR is ROOT/NAME; ROOT/sweep.json lists the runs.

Sweep file, JSON: {"name": "obj" (the TPU name prefix; default: ROOT's basename),
  "base": {"gin_file": "runs/demo.gin", "BATCH_SIZE": 4}  (or a list of arguments),
  "axes": {"objective": {"sc": {"objective": "span_corruption"},
                         "ul2": {"gin_file": "objectives/ul2.gin", "TRAIN_STEPS": 2000}},
           "lr:LEARNING_RATE": [0.001, "3e-4"]},
  "zip": false}
An axis is a list of values (as with --axis) or {label: value}, a value being an object of
overrides or one value of NAME. Override keys: `gin_file` (path or list), `objective` (name),
else a gin binding. A JSON string is gin text ("'c4'" is a gin string); numbers, true/false/null,
lists and objects become gin literals.

--mode=local trains the runs in turn (--jobs=N: N at a time, each pinned to its share of the
CPUs, output in train.log only), teeing each one's output to MODEL_DIR/train.log; it skips
runs whose MODEL_DIR/sweep_status.json says they finished with the same arguments, carries on
after a failure and exits 1 if any failed. --mode=print prints the commands; --mode=tpu prints
(--launch: runs) `t5gemma launch tpu run PREFIX-RUN --model_dir=ROOT/RUN [TPU_ARGS] [--dry_run] --
GIN_ARGS` for each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from typing import Any, NamedTuple, Optional, Sequence

from t5gemma_jax import atomic, storage
from t5gemma_jax.launch.local_runs import run_local

HERE = os.path.dirname(os.path.abspath(__file__))
GIN_DIR = os.path.join(os.path.dirname(HERE), "gin")
SWEEP_DIR = os.path.join(HERE, "sweeps")  # the sweep files that ship with the package
SAFE = re.compile(r"[A-Za-z0-9._+-]+")
LITERAL = re.compile(r"[0-9.+-].*|True|False|None")  # numbers and constants, as gin text
AXIS_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
MAX_NAME = 120  # far below file name limits
TPU_NAME_BODY = 48  # + 9 for the hash: under GCE's 63 with room for "-N" node suffixes
MACRO_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=", re.M)
QUOTED = r"\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'"
GIN_TOKEN = re.compile(QUOTED + r"|[^\"',()\[\]{}]+|.")


class Axis(NamedTuple):
  label: str
  values: tuple[tuple[str, tuple[str, ...]], ...]  # (value label, train arguments)


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  model_dir: str
  values: dict  # axis label -> value label
  args: tuple[str, ...]  # train arguments, all but MODEL_DIR

  def train_args(self) -> list[str]:
    return [*self.args, f"--gin.MODEL_DIR={json.dumps(self.model_dir, ensure_ascii=False)}"]


write_text = atomic.write_text  # local or gs:// (through tf.io.gfile)


def digest(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def value_label(text: str, gin: bool = True) -> str:
  """A file-name-safe label, injective over texts: whatever had to be cleaned gets a hash.

  For gin text, a quoted safe string loses its quotes while a bare word that is not a literal
  is hashed (gin would reject it anyway), so the two never meet.
  """
  if SAFE.fullmatch(text) and (not gin or LITERAL.fullmatch(text)):
    return text
  quoted = re.fullmatch(r"(['\"])([A-Za-z0-9._+-]+)\1", text)
  if gin and quoted and not LITERAL.fullmatch(quoted.group(2)):
    return quoted.group(2)
  clean = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_.")[:40]
  return f"{clean}-{digest(text)}" if clean else digest(text)


def run_name(pairs: Sequence[tuple[str, str]]) -> str:
  name = ",".join(f"{axis}={label}" for axis, label in pairs) or "base"
  if len(name) > MAX_NAME:
    name = name[:MAX_NAME - 9].rstrip(",=") + "-" + digest(name)
  return name


def gin_text(value: Any, top: bool = True) -> str:
  """JSON value -> gin text; a top-level string already is gin text."""
  if isinstance(value, str):
    return value if top else json.dumps(value, ensure_ascii=False)
  if value is None or isinstance(value, (bool, int, float)):
    return repr(value)
  if isinstance(value, list):
    return "[" + ", ".join(gin_text(v, False) for v in value) + "]"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{json.dumps(k)}: {gin_text(v, False)}" for k, v in value.items()) + "}"
  raise ValueError(f"cannot write {value!r} as a gin value")


def objective_file(name: Any) -> str:
  rel = f"objectives/{name}.gin"
  if not isinstance(name, str) or not os.path.isfile(os.path.join(GIN_DIR, rel)):
    known = sorted(f[:-4] for f in os.listdir(os.path.join(GIN_DIR, "objectives")))
    raise ValueError(f"unknown objective {name!r} (gin/objectives has {', '.join(known)})")
  return rel


def override_args(key: str, value: Any) -> list[str]:
  """One override (`objective`, `gin_file` or a gin binding) as train arguments."""
  if key.lower() == "objective":
    return [f"--gin_file={objective_file(value)}"]
  if key == "gin_file":
    files = value if isinstance(value, list) else [value]
    if not all(isinstance(f, str) for f in files):
      raise ValueError(f"gin_file takes a path or a list of paths, not {value!r}")
    return [f"--gin_file={f}" for f in files]
  if key == "MODEL_DIR":
    raise ValueError("MODEL_DIR is the sweep's (ROOT/RUN): do not set it")
  if not key or re.search(r"[\s=]", key):
    raise ValueError(f"bad gin binding name {key!r}")
  return [f"--gin.{key}={gin_text(value)}"]


def overrides_args(overrides: dict) -> list[str]:
  return [a for k, v in overrides.items() for a in override_args(k, v)]


def check_base_args(args: Sequence[str]) -> list[str]:
  for a in args:
    if not re.match(r"--gin_file=.|--gin_search_path=.|--gin\.[^=\s]+=", a):
      raise ValueError(f"base argument {a!r}: expected --gin_file=F, --gin_search_path=D or "
                       "--gin.NAME=VALUE")
    if a.startswith("--gin.MODEL_DIR="):
      raise ValueError("MODEL_DIR is the sweep's (ROOT/RUN): do not set it")
  return list(args)


def split_values(text: str) -> list[str]:
  """Splits at the commas outside quotes and brackets."""
  parts, current, depth = [], "", 0
  for token in GIN_TOKEN.findall(text):
    if token in "\"'":  # a quote that no complete string token took
      raise ValueError(f"unterminated quote in {text!r}")
    depth += (token in "([{") - (token in ")]}")
    if token == "," and depth == 0:
      parts, current = parts + [current.strip()], ""
    else:
      current += token
  if depth or not all(parts + [current.strip()]):
    raise ValueError(f"unbalanced brackets or an empty value in {text!r}")
  return parts + [current.strip()]


def make_axis(key: str, values: Any) -> Axis:
  """`[LABEL:]NAME` with a list of values, or with an object {label: value or overrides}."""
  label, _, name = key.rpartition(":")
  label = label or name
  if not AXIS_LABEL.fullmatch(label):
    raise ValueError(f"axis label {label!r} must match {AXIS_LABEL.pattern}; give a short one "
                     "as LABEL:NAME")
  if isinstance(values, dict):
    items = [(value_label(str(k), gin=False), overrides_args(v) if isinstance(v, dict)
              else override_args(name, v)) for k, v in values.items()]
  elif isinstance(values, list):
    plain = name.lower() == "objective" or name == "gin_file"  # names and paths, not gin
    items = [(value_label(v, gin=False) if plain and isinstance(v, str)
              else value_label(gin_text(v)), override_args(name, v)) for v in values]
  else:
    raise ValueError(f"axis {key!r}: give a list of values or an object of labelled values")
  if not items:
    raise ValueError(f"axis {key!r} has no values")
  for what, seen in (("label", Counter(v for v, _ in items)),
                     ("overrides", Counter(tuple(a) for _, a in items))):
    twice = [k for k, n in seen.items() if n > 1]
    if twice:
      raise ValueError(f"axis {label!r}: two values with the same {what}: {twice[0]}")
  return Axis(label, tuple((v, tuple(a)) for v, a in items))


def parse_cli_axis(spec: str) -> Axis:
  key, sep, values = spec.partition("=")
  if not sep:
    raise ValueError(f"--axis {spec!r}: expected [LABEL:]NAME=V1,V2,...")
  return make_axis(key.strip(), split_values(values))


def find_sweep_file(path: str) -> str:
  """`path` as given, else the packaged sweep file of that name (e.g. encdec_vs_deconly.json)."""
  if os.path.exists(path):
    return path
  packaged = os.path.join(SWEEP_DIR, path)
  if os.path.basename(path) == path and os.path.exists(packaged):
    return packaged
  shipped = ", ".join(sorted(os.listdir(SWEEP_DIR)))
  raise ValueError(f"sweep file {path}: no such file (the package ships: {shipped})")


def load_sweep_file(path: str) -> dict:
  """{"name", "base" (train arguments), "axes", "zip"} from a JSON sweep file (a path, or the
  name of one the package ships)."""
  path = find_sweep_file(path)
  with open(path, encoding="utf-8") as f:
    try:
      spec = json.load(f)
    except ValueError as e:
      raise ValueError(f"sweep file {path}: {e}") from e
  if not isinstance(spec, dict) or not isinstance(spec.get("axes", {}), dict):
    raise ValueError(f"sweep file {path}: expected an object with an object of axes")
  unknown = set(spec) - {"name", "base", "axes", "zip"}
  if unknown:
    raise ValueError(f"sweep file {path}: unknown keys {sorted(unknown)}")
  base = spec.get("base", [])
  return {"name": spec.get("name"), "zip": bool(spec.get("zip", False)),
          "base": overrides_args(base) if isinstance(base, dict) else check_base_args(base),
          "axes": [make_axis(k, v) for k, v in spec.get("axes", {}).items()]}


def _macros(gin_file: str) -> set[str]:
  for path in (gin_file, os.path.join(GIN_DIR, gin_file)):
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        return set(MACRO_LINE.findall(f.read()))
  return set()  # elsewhere (a --gin_search_path): not checked


def check_shadowing(axes: Sequence[Axis], base: Sequence[str]) -> None:
  """Gin applies --gin. bindings after every file, so a swept file whose macros are all bound
  by base arguments (say --gin.MIXTURE_OR_TASK_NAME=...) would change nothing."""
  bound = {a[6:].split("=", 1)[0] for a in base if a.startswith("--gin.")}
  for axis in axes:
    for label, args in axis.values:
      for f in (a[11:] for a in args if a.startswith("--gin_file=")):
        macros = _macros(f)
        hidden = ", ".join(sorted(macros & bound))
        if hidden and macros <= bound:
          raise ValueError(f"{axis.label}={label}: {f} only sets {hidden}, which --gin. "
                           "bindings override")
        if hidden:
          print(f"sweep: note: {axis.label}={label}: --gin. bindings override {hidden} of {f}",
                file=sys.stderr)


def expand(axes: Sequence[Axis], base: Sequence[str], root: str, zip_axes: bool = False
           ) -> list[Run]:
  """The runs, in a fixed order: the product (first axis outermost) or the zip of the axes."""
  if zip_axes and len({len(a.values) for a in axes}) > 1:
    raise ValueError("--zip needs axes of one length, got "
                     + ", ".join(f"{a.label}: {len(a.values)}" for a in axes))
  values = [a.values for a in axes]
  runs = []
  for combo in (zip(*values) if zip_axes and axes else itertools.product(*values)):
    name = run_name([(a.label, label) for a, (label, _) in zip(axes, combo)])
    runs.append(Run(name, os.path.join(root, name),
                    {a.label: label for a, (label, _) in zip(axes, combo)},
                    (*base, *(x for _, args in combo for x in args))))
  twice = [k for k, n in Counter(r.name for r in runs).items() if n > 1]
  if twice:  # only a hash collision gets here
    raise ValueError(f"two runs would share the name {twice[0]}")
  return runs


def describe(runs: Sequence[Run], axes: Sequence[Axis], base: Sequence[str], root: str,
             name: str, zip_axes: bool) -> dict:
  """The content of ROOT/sweep.json."""
  return {"version": 1, "root": root, "name": name, "zip": zip_axes, "base": list(base),
          "axes": [{"label": a.label, "values": [{"label": v, "args": list(args)}
                                                 for v, args in a.values]} for a in axes],
          "runs": [{"name": r.name, "model_dir": r.model_dir, "values": r.values,
                    "args": r.train_args()} for r in runs]}


def local_command(run: Run) -> list[str]:
  return [sys.executable, "-m", "t5gemma_jax.cli", "train", *run.train_args()]


def tpu_name(prefix: str, run: Run) -> str:
  """GCE-style (lower case, digits, '-'), with a hash of the run name to stay unique."""
  body = re.sub(r"[^a-z0-9]+", "-", f"{prefix}-{run.name}".lower()).strip("-")
  body = body if body[:1].isalpha() else "t-" + body
  return body[:TPU_NAME_BODY].rstrip("-") + "-" + digest(run.name)


def tpu_command(run: Run, prefix: str, tpu_args: Sequence[str], dry_run: bool) -> list[str]:
  # tpu.py sets MODEL_DIR from --model_dir (and refuses it after --).
  return [sys.executable, "-m", "t5gemma_jax.launch.tpu", "run", tpu_name(prefix, run),
          f"--model_dir={run.model_dir}", *tpu_args, *(["--dry_run"] if dry_run else []), "--",
          *run.args]


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  cut = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(prog="t5gemma launch sweep",
                                   description=__doc__.split("\n\n")[0],
                                   epilog="Arguments after -- go to every run.")
  parser.add_argument("--root", required=True, help="runs go to ROOT/NAME")
  parser.add_argument("--sweep_file", help="JSON sweep file (format: see the module docstring)")
  parser.add_argument("--axis", action="append", default=[], help="[LABEL:]NAME=V1,V2,...")
  parser.add_argument("--zip", action="store_true", help="zip the axes instead of a grid")
  parser.add_argument("--mode", choices=("local", "print", "tpu"), default="local")
  parser.add_argument("--jobs", type=int, default=1,
                      help="local mode: runs at a time, each pinned to its share of the CPUs")
  parser.add_argument("--name", help="TPU name prefix (default: ROOT's basename)")
  parser.add_argument("--tpu_arg", action="append", default=[],
                      help="tpu mode: an option of tpu.py run, e.g. --tpu_arg=--zone=Z")
  parser.add_argument("--launch", action="store_true", help="tpu mode: run the commands")
  parser.add_argument("--dry_run", action="store_true", help="tpu mode: pass --dry_run on")
  args = parser.parse_args(argv[:cut])
  if args.jobs < 1 or (args.jobs > 1 and args.mode != "local"):
    parser.error("--jobs is a positive number of runs at a time, for --mode=local")
  if args.mode != "tpu" and (args.launch or args.dry_run or args.tpu_arg):
    parser.error("--launch, --dry_run and --tpu_arg are for --mode=tpu")
  try:
    spec = (load_sweep_file(args.sweep_file) if args.sweep_file
            else {"name": None, "base": [], "axes": [], "zip": False})
    base = spec["base"] + check_base_args(argv[cut + 1:])
    axes = spec["axes"] + [parse_cli_axis(a) for a in args.axis]
    twice = [k for k, n in Counter(a.label for a in axes).items() if n > 1]
    if twice:
      raise ValueError(f"two axes are labelled {twice[0]!r}")
    check_shadowing(axes, base)
    root = args.root if storage.is_remote(args.root) else os.path.abspath(args.root)
    zip_axes = args.zip or spec["zip"]
    runs = expand(axes, base, root, zip_axes)
  except (ValueError, OSError) as e:
    print(f"sweep: error: {e}", file=sys.stderr)
    return 2
  name = args.name or spec["name"] or os.path.basename(root.rstrip("/")) or "sweep"
  try:
    write_text(os.path.join(root, "sweep.json"), json.dumps(
        describe(runs, axes, base, root, name, zip_axes), indent=2, ensure_ascii=False) + "\n")
  except Exception as e:  # e.g. no gs:// credentials on this machine: the commands still hold
    if not storage.is_remote(root):
      raise
    print(f"sweep: warning: could not write {root}/sweep.json ({type(e).__name__}); "
          "t5gemma launch report needs it", file=sys.stderr)
  if args.mode == "local":
    return run_local(runs, local_command, jobs=args.jobs)
  if args.mode == "print":
    print("\n".join(shlex.join(local_command(r)) for r in runs))
    return 0
  commands = [tpu_command(r, name, args.tpu_arg, args.dry_run) for r in runs]
  print("\n".join(shlex.join(c) for c in commands), flush=True)
  failed = [c for c in commands if args.launch and subprocess.run(c).returncode]
  for c in failed:  # each launch went ahead regardless
    print(f"sweep: failed: {shlex.join(c)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
