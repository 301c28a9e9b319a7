"""The package's shape: no import cycles, no imports of another module's private names, gin
only in the CLI, and the model, train step, FLOP count, decoding and the prepared GPU check
importable without TensorFlow, seqio or gin (a GPU host has none of them)."""

import os
import subprocess
import sys
import textwrap

from tools import import_graph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _edges():
  return import_graph.graph(import_graph.module_files(ROOT))


def test_no_import_cycles():
  assert import_graph.package_cycles(_edges()) == []


def test_no_module_takes_another_modules_private_names():
  assert import_graph.private_imports(_edges()) == []


def test_the_gpu_check_has_no_import_cycles_or_private_imports():
  """benchmarks/gpu_check*.py and the package together (the GPU machine runs them as a unit)."""
  edges = import_graph.graph(import_graph.module_files(ROOT, ("t5gemma_jax", "benchmarks")))
  assert import_graph.package_cycles(edges) == []
  assert import_graph.private_imports(edges) == []


def test_only_the_cli_imports_gin():
  users = sorted(path for name, path in import_graph.module_files(ROOT).items()
                 if not name.startswith("t5gemma_jax.cli")
                 and any(w.split(".")[0] == "gin" for w in import_graph.third_party_imports(path)))
  assert users == []


def test_no_test_module_imports_another():
  """Shared test code lives in tests/helpers/ (or conftest.py), not in test_*.py files."""
  taken = []
  for name in sorted(os.listdir(os.path.join(ROOT, "tests"))):
    if name.endswith(".py"):
      for module in import_graph.third_party_imports(os.path.join(ROOT, "tests", name)):
        if module.split(".")[-1].startswith("test_"):
          taken.append((name, module))
  assert taken == []


def test_the_checker_finds_a_planted_cycle_and_private_import(tmp_path):
  """The checks above pass because the code is clean, not because the checker is blind."""
  package = tmp_path / "t5gemma_jax"
  (package / "sub").mkdir(parents=True)
  (package / "__init__.py").write_text("from t5gemma_jax import a  # a package's own child\n")
  (package / "a.py").write_text("def f():\n  from t5gemma_jax.sub import b  # hidden\n")
  (package / "sub" / "__init__.py").write_text("")
  (package / "sub" / "b.py").write_text("from t5gemma_jax import a as m\nx = m._hidden\n")
  (package / "c.py").write_text("from t5gemma_jax.a import _f\n")
  edges = import_graph.graph(import_graph.module_files(str(tmp_path)))
  assert import_graph.package_cycles(edges) == [["t5gemma_jax.a", "t5gemma_jax.sub.b"]]
  assert import_graph.private_imports(edges) == [
      ("t5gemma_jax.c", "t5gemma_jax.a", "_f"), ("t5gemma_jax.sub.b", "t5gemma_jax.a", "_hidden")]


_BLOCKED = textwrap.dedent("""
    import importlib, sys

    class Blocked:
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "seqio", "gin", "tensorflow_datasets"):
          raise ImportError("blocked: " + name)

    sys.meta_path.insert(0, Blocked())
    for name in sys.argv[1:]:
      importlib.import_module(name)
    from t5gemma_jax import config, model, presets
    model.abstract_params(presets.preset("tiny"), boxed=False)
""")


def test_model_train_step_flops_and_decoding_import_without_tensorflow_seqio_gin():
  modules = ["t5gemma_jax.model", "t5gemma_jax.train.step", "t5gemma_jax.train.optim",
             "t5gemma_jax.train.losses", "t5gemma_jax.train.flops", "t5gemma_jax.decoding",
             "t5gemma_jax.sharding", "t5gemma_jax.convert.hf",
             # The prepared GPU check, all of it: the GPU machine has no TF, seqio or gin.
             "benchmarks.gpu_check", "benchmarks.gpu_check_jax", "benchmarks.gpu_check_torch",
             "t5gemma_jax.model.triton_attention"]
  proc = subprocess.run([sys.executable, "-c", _BLOCKED, *modules], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]


def _declared_requirements():
  """{extra or "install": [distribution names]} read from setup.py's lists (not executed)."""
  import ast
  import re
  tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
  lists = {}
  for node in tree.body:
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
      names = []
      for item in node.value.elts:
        if isinstance(item, ast.Starred):
          names += lists[item.value.id]
        else:
          names.append(re.split(r"[\[=<>!~ ]", ast.literal_eval(item))[0])
      lists[node.targets[0].id] = names
  return lists


def _normal(name):
  return name.lower().replace("_", "-")


def _top_level_imports(path):
  """Modules a file imports when it is imported (module level, not inside functions)."""
  import ast
  tree = ast.parse(open(path).read(), path)
  names = []
  for node in tree.body:
    for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
      if isinstance(sub, ast.Import):
        names += [a.name for a in sub.names]
      elif isinstance(sub, ast.ImportFrom) and not sub.level and sub.module:
        names.append(sub.module)
  return names


def test_every_third_party_import_is_declared():
  """A wheel install gets each package the code imports: install_requires for what every run
  needs, an extra for what one feature needs (imported only inside that feature's functions,
  so the base install still imports every module)."""
  import importlib.metadata
  owners = importlib.metadata.packages_distributions()
  declared = _declared_requirements()
  base = {_normal(n) for n in declared["INSTALL_REQUIRES"]}
  extras = {_normal(n) for key, names in declared.items() if key != "INSTALL_REQUIRES"
            for n in names}
  undeclared, eager = [], []
  for name, path in sorted(import_graph.module_files(ROOT).items()):
    top_level = {m.split(".")[0] for m in _top_level_imports(path)}
    for module in sorted({m.split(".")[0] for m in import_graph.third_party_imports(path)}):
      if module in sys.stdlib_module_names or module == "t5gemma_jax":
        continue
      dists = {_normal(d) for d in owners.get(module, [module])}
      if not dists & (base | extras):
        undeclared.append((name, module))
      elif not dists & base and module in top_level:
        eager.append((name, module))
  assert undeclared == [] and eager == []
