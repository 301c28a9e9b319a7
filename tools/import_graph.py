"""Module import graph of the package: cycles and imports of another module's private names.

Reads the source with `ast` (nothing is imported), so it sees imports inside functions too:
an import moved into a function body to dodge a cycle is still a cycle here.

  python tools/import_graph.py            # prints cycles and private imports; exit 1 if any
  python tools/import_graph.py --graph    # also prints every edge
"""

import argparse
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("t5gemma_jax", "tasks")


def module_files(root=ROOT, packages=PACKAGES):
  """Maps dotted module names to file paths for every .py file under `packages`."""
  found = {}
  for package in packages:
    base = os.path.join(root, package)
    if not os.path.isdir(base):
      continue
    for folder, _, files in os.walk(base):
      for name in files:
        if not name.endswith(".py"):
          continue
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, root)[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        found[".".join(parts)] = path
  return found


def _resolve(module, level, current, is_package):
  if not level:
    return module or ""
  base = current.split(".") if is_package else current.split(".")[:-1]
  base = base[:len(base) - (level - 1)]
  return ".".join(base + ([module] if module else []))


def imports_of(name, path, modules):
  """(target module, imported names) for each import in one file, targets inside `modules`."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  is_package = path.endswith("__init__.py")
  out = []
  bound = {}   # local name -> module it is bound to, for `module._private` attribute reads
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        target = alias.name
        while target and target not in modules:
          target = target.rpartition(".")[0]
        if target:
          out.append((target, []))
          if alias.asname and target == alias.name:
            bound[alias.asname] = target
    elif isinstance(node, ast.ImportFrom):
      base = _resolve(node.module, node.level, name, is_package)
      for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        if sub in modules:          # `from pkg import module`
          out.append((sub, []))
          bound[alias.asname or alias.name] = sub
        elif base in modules:
          out.append((base, [alias.name]))
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in bound):
      out.append((bound[node.value.id], [node.attr]))
  return out


def third_party_imports(path):
  """Every absolute module name a file imports (`import a.b`, `from a.b import c`)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
      names.append(node.module)
      names += [f"{node.module}.{alias.name}" for alias in node.names]
  return names


def graph(modules):
  """{module: {imported module: [names]}}; a package's own __init__ edges to children kept."""
  edges = {}
  for name, path in modules.items():
    targets = edges.setdefault(name, {})
    for target, names in imports_of(name, path, modules):
      if target != name:
        targets.setdefault(target, []).extend(names)
  return edges


def cycles(edges):
  """Strongly connected components with more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, result = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in edges.get(v, {}):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        result.append(sorted(component))

  sys.setrecursionlimit(10000)
  for v in sorted(edges):
    if v not in index:
      visit(v)
  return sorted(result)


def _is_child(package, module):
  return module.startswith(package + ".")


def package_cycles(edges):
  """Cycles once `__init__` re-exports are ignored: a package importing its own children is
  how packages work, so only edges between siblings or across packages count."""
  trimmed = {v: {w: n for w, n in ws.items() if not _is_child(v, w)} for v, ws in edges.items()}
  return cycles(trimmed)


def private_imports(edges):
  """(importer, imported module, name) for `from m import _name` across modules."""
  found = []
  for v, targets in sorted(edges.items()):
    for w, names in sorted(targets.items()):
      for n in names:
        if n.startswith("_") and not n.startswith("__"):
          found.append((v, w, n))
  return found


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--graph", action="store_true", help="print every edge too")
  args = parser.parse_args(argv)
  edges = graph(module_files())
  if args.graph:
    for v in sorted(edges):
      for w in sorted(edges[v]):
        print(f"{v} -> {w}")
  found_cycles = package_cycles(edges)
  found_private = private_imports(edges)
  for c in found_cycles:
    print("cycle: " + " <-> ".join(c))
  for v, w, n in found_private:
    print(f"private import: {v} takes {w}.{n}")
  print(f"{len(edges)} modules, {sum(len(t) for t in edges.values())} edges, "
        f"{len(found_cycles)} cycles, {len(found_private)} private imports")
  return 1 if found_cycles or found_private else 0


if __name__ == "__main__":
  sys.exit(main())
