"""What a compiled program does, read from its optimised HLO text: collectives and HBM traffic.

What FSDP promises can be checked here rather than on a pod: gradients should leave each layer
as reduce-scatters (each chip keeps its shard) and parameters should be all-gathered layer by
layer inside the scanned loop, not all at once before it.

    stats = collectives(compiled.as_text())
    stats["reduce-scatter"]["count"], stats["all-gather"]["in_loop"]

Counts are per execution of the step: an op inside a `while` body runs once per trip (the
bound of the loop's condition, or XLA's `known_trip_count`), so it counts that many times.
XLA's own `cost_analysis` counts a loop body once whatever its trip count, which is why the
HBM traffic is also recounted here (`hbm_bytes`).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Optional

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1,
          "f8e5m2fnuz": 1}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_BYTES, key=len, reverse=True)) +
                    r")\[([0-9,]*)\](\{[^}]*\})?")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def shape_bytes(shape: str, hbm_only: bool = False) -> float:
  """Bytes of an HLO shape string, e.g. 'bf16[64,2,16]{2,0,1}' or a tuple of shapes.

  With `hbm_only`, arrays whose layout places them in another memory space (`S(1)`: the
  TPU's on-chip memory, where XLA prefetches operands) count 0.
  """
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(shape):
    if hbm_only and re.search(r"S\([1-9]", layout):
      continue
    total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def group_size(attributes: str, default: int) -> int:
  """Devices per replica group, from `replica_groups=` in any of XLA's spellings."""
  m = re.search(r"replica_groups=\{\{([0-9,]*)\}", attributes)
  if m:
    return len([x for x in m.group(1).split(",") if x])
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
  if m:
    sizes = dict(re.findall(r"'?(\w+)'?=(\d+)", m.group(1)))
    used = re.findall(r"'?(\w+)'?", m.group(2))
    return math.prod(int(sizes[a]) for a in used if a in sizes) or default
  m = re.search(r"source_target_pairs=\{(.*?)\}\}", attributes)
  if m:
    return 2
  return default


def _kind(op: str, computation: str) -> Optional[str]:
  """The collective an instruction is, if any.

  The TPU compiler writes a reduce-scatter as an all-reduce inside a fusion computation named
  `all-reduce-scatter...` (the reduction fused with the slice each device keeps): that is a
  reduce-scatter, not a whole all-reduce.
  """
  base = op[:-len("-start")] if op.endswith("-start") else op
  if base == "all-reduce" and computation.startswith("all-reduce-scatter"):
    return "reduce-scatter"
  return base if base in KINDS else None


def _parse(hlo: str):
  """{computation: [(name, shape, op, rest)]}, the entry's name and every shape by name."""
  computations: dict[str, list] = {}
  shapes: dict[str, str] = {}
  entry, current = None, None
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      m = _COMPUTATION.match(line)  # a computation's header: `[ENTRY] %name (params) -> type {`
      current = m.group(2)
      computations[current] = []
      if m.group(1):
        entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is None:
      continue
    m = _INSTRUCTION.match(line)
    if m:
      name, shape, op, rest = m.groups()
      shapes[name] = shape
      computations[current].append((name, shape, op, rest))
  return computations, entry, shapes


def _call_graph(computations: dict) -> dict[str, list[tuple[str, int, bool]]]:
  """{computation: [(callee, times per call, runs as a whole computation)]}.

  Loop bodies and conditions run once per trip; `call` targets and conditional branches run
  as whole computations (as do loop bodies); fusion bodies and reduction functions are parts
  of the instruction that names them.
  """
  edges: dict[str, list[tuple[str, int, bool]]] = {c: [] for c in computations}
  for comp, instructions in computations.items():
    for _, _, op, rest in instructions:
      trips = _trip_count(rest, computations) if op == "while" else 1
      for key, callee in re.findall(
          r"\b(body|condition|to_apply|calls|true_computation|false_computation)="
          r"%?([\w.\-]+)", rest):
        if callee in edges:
          loop = key in ("body", "condition")
          whole = loop or op in ("call", "conditional")
          edges[comp].append((callee, trips if loop else 1, whole))
      m = re.search(r"branch_computations=\{([^}]*)\}", rest)
      for callee in (_OPERAND.findall(m.group(1)) if m else ()):
        if callee in edges:
          edges[comp].append((callee, 1, True))
  return edges


def _executions(edges: dict, entry: Optional[str]) -> dict[str, int]:
  """How many times each computation runs per call of the entry (loops multiply)."""
  counts = {c: 0 for c in edges}

  def visit(comp: str, times: int, depth: int = 0):
    if depth > 64:  # malformed input; real HLO nests a few levels
      return
    counts[comp] += times
    for callee, trips, _ in edges[comp]:
      visit(callee, times * trips, depth + 1)

  if entry is not None:
    visit(entry, 1)
  return counts


def _reachable(edges: dict, roots, whole_only: bool = False) -> set[str]:
  """Computations reached from `roots` (with `whole_only`, through whole-computation edges)."""
  seen, stack = set(), list(roots)
  while stack:
    comp = stack.pop()
    if comp in seen or comp not in edges:
      continue
    seen.add(comp)
    stack.extend(c for c, _, whole in edges[comp] if whole or not whole_only)
  return seen


@functools.lru_cache(maxsize=2)
def _program(hlo: str):
  """Parsed once per text: (computations, entry, shapes, executions, call graph)."""
  computations, entry, shapes = _parse(hlo)
  edges = _call_graph(computations)
  return computations, entry, shapes, _executions(edges, entry), edges


def _trip_count(attributes: str, computations: dict) -> int:
  """Iterations of a while loop: XLA's `known_trip_count`, else the bound `i < N` of a loop
  counting from 0 in steps of 1 (what `lax.scan` emits), else 1."""
  m = _TRIP_COUNT.search(attributes)
  if m:
    return int(m.group(1))
  m = re.search(r"\bcondition=%?([\w.\-]+)", attributes)
  condition = computations.get(m.group(1), []) if m else []
  constants = {}
  for name, shape, op, rest in condition:
    if op == "constant" and shape.startswith(("s32[]", "s64[]", "u32[]")):
      constants[name] = int(rest.split(")", 1)[0])
  for name, shape, op, rest in condition:
    if op == "compare" and "direction=LT" in rest:
      bounds = [constants[o] for o in _OPERAND.findall(rest.split(")", 1)[0]) if o in constants]
      if bounds:
        return bounds[0]
  return 1


def collectives(hlo: str, num_devices: int = 1) -> dict[str, dict]:
  """Per collective kind: executions per step, bytes and estimated ICI traffic per device.

  Args:
    hlo: `compiled.as_text()` (the partitioned, optimised module of one device).
    num_devices: devices in the program (the group size when HLO does not say).

  Returns:
    {kind: {"count", "in_loop", "bytes", "traffic_bytes"}} for each kind in `KINDS` that
    occurs. `bytes` is the data each op moves as seen by one device: the gathered result of
    an all-gather, the input of a reduce-scatter / all-reduce / all-to-all / permute.
    `traffic_bytes` is what one device sends over the interconnect with ring algorithms:
    (n-1)/n of that for gathers, scatters and all-to-all, 2(n-1)/n for all-reduce (a
    reduce-scatter then an all-gather), all of it for a permute. `in_loop` counts the
    executions that happen inside a while loop (the scanned layers).
  """
  computations, entry, shapes, runs, edges = _program(hlo)
  in_loop = _reachable(edges, _loop_bodies(computations))
  stats: dict[str, dict] = {}
  for comp, instructions in computations.items():
    times = runs.get(comp, 0)
    if not times:
      continue
    for name, shape, op, rest in instructions:
      kind = _kind(op, comp)
      if kind is None:
        continue
      args = rest.split(")", 1)[0]
      operand_bytes = sum(shape_bytes(shapes.get(o, "")) for o in _OPERAND.findall(args))
      n = max(group_size(rest, num_devices), 1)
      if kind == "all-gather":
        moved, traffic = operand_bytes * n, operand_bytes * (n - 1)
      elif kind == "all-reduce":
        moved, traffic = operand_bytes, 2 * operand_bytes * (n - 1) / n
      elif kind == "collective-permute":
        moved = traffic = operand_bytes
      else:
        moved, traffic = operand_bytes, operand_bytes * (n - 1) / n
      s = stats.setdefault(kind, {"count": 0, "in_loop": 0, "bytes": 0.0,
                                  "traffic_bytes": 0.0})
      s["count"] += times
      s["in_loop"] += times if comp in in_loop else 0
      s["bytes"] += moved * times
      s["traffic_bytes"] += traffic * times
  return stats


def _loop_bodies(computations: dict) -> set[str]:
  return {body for instructions in computations.values() for _, _, op, rest in instructions
          if op == "while" for body in re.findall(r"\bbody=%?([\w.\-]+)", rest)}


# Instructions that move no data through HBM themselves.
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all",
               "partition-id", "replica-id", "while", "call", "conditional", "opt-barrier",
               "add-dependency", "iota"}


def _operand_names(rest: str) -> list[str]:
  return _OPERAND.findall(rest.split(")", 1)[0])


def _fusion_io(body: list, shapes: dict) -> tuple[dict[int, float], Optional[float]]:
  """What a fusion really touches of its operands and result, where it touches less than all.

  A fused dynamic-slice reads only its slice of an operand (a layer of the stacked weights in
  a scanned loop); a fused dynamic-update-slice writes only its update into a buffer aliased
  in place (the stacked gradients or saved activations) and reads nothing of it. Returns
  ({parameter index: bytes read} for such operands, the bytes written when the root is an
  in-place update or a tuple of outputs, else None).
  """
  params = {name: int(rest.split(")", 1)[0]) for name, _, op, rest in body
            if op == "parameter"}
  users: dict[str, list] = {}
  for name, shape, op, rest in body:
    for position, operand in enumerate(_operand_names(rest)):
      users.setdefault(operand, []).append((name, op, position, shape, rest))

  def uses(name: str, depth: int = 0) -> list:
    """Users of `name`, looking through bitcasts (a free re-view of the same buffer)."""
    found = []
    for user, op, position, shape, rest in users.get(name, []):
      if op == "bitcast" and depth < 8:
        found += uses(user, depth + 1)
      else:
        found.append((op, position, shape, rest))
    return found

  touched = {}
  for pname, index in params.items():
    u = uses(pname)
    if u and all(op == "dynamic-slice" and pos == 0 for op, pos, _, _ in u):
      touched[index] = sum(shape_bytes(shape) for _, _, shape, _ in u)
    elif u and all(op == "dynamic-update-slice" and pos == 0 for op, pos, _, _ in u):
      touched[index] = 0.0  # written in place (counted as the result), never read
  by_name = {name: (shape, op, rest) for name, shape, op, rest in body}

  def written(name: str) -> float:
    shape, op, rest = by_name.get(name, ("", "", ""))
    while op == "bitcast" and _operand_names(rest)[0] in by_name:
      shape, op, rest = by_name[_operand_names(rest)[0]]
    if op == "dynamic-update-slice":
      return shape_bytes(shapes.get(_operand_names(rest)[1], ""))
    return shape_bytes(shape)

  root_bytes = None
  if body:
    root_name, root_shape, root_op, root_rest = body[-1]
    if root_op == "dynamic-update-slice":
      root_bytes = written(root_name)
    elif root_op == "tuple":  # a multi-output fusion: each output as written
      root_bytes = sum(written(o) for o in _operand_names(root_rest))
  return touched, root_bytes


def hbm_bytes(hlo: str) -> float:
  """Bytes one device reads and writes in HBM per step: for every top-level instruction
  (fusions, copies, collectives, custom calls; not what runs inside a fusion) its operands
  plus its result, times the executions of its computation; of a sliced or in-place updated
  operand only the slice or the update (`_fusion_io`); nothing of buffers XLA placed in
  on-chip memory. XLA's "bytes accessed" rule, with loop bodies counted once per trip."""
  computations, entry, shapes, runs, edges = _program(hlo)
  total = 0.0
  # The entry and what it runs as whole computations; fusion bodies are counted through the
  # fusion instruction that names them.
  for comp in _reachable(edges, [entry], whole_only=True):
    times = runs.get(comp, 0)
    for name, shape, op, rest in computations[comp]:
      if op in _NO_TRAFFIC or op.endswith("-done"):
        continue
      operands = _operand_names(rest)
      sizes = [shape_bytes(shapes.get(o, ""), hbm_only=True) for o in operands]
      out = shape_bytes(shape, hbm_only=True)
      if op == "fusion":
        m = re.search(r"\bcalls=%?([\w.\-]+)", rest)
        touched, root = _fusion_io(computations.get(m.group(1), []) if m else [], shapes)
        sizes = [min(touched.get(i, size), size) for i, size in enumerate(sizes)]
        out = out if root is None else min(root, out)
      elif op == "dynamic-slice":
        sizes = [out]
      elif op == "dynamic-update-slice" and len(sizes) > 1:
        sizes, out = [sizes[1]], sizes[1]
      elif op.endswith("-start"):  # its result tuple repeats the operands: count the output
        out = max(out - sum(sizes), 0.0)
      total += times * (sum(sizes) + out)
  return total
