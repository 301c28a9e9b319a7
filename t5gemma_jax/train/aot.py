"""Compile a run for a TPU slice on any host: memory per chip, FLOPs, collectives, roofline.

libtpu's topology API gives abstract devices of a TPU slice on a CPU machine; the mesh the run
would build over them, `ShapeDtypeStruct` inputs with the run's shardings and
`jit(...).lower(...).compile()` then run the real TPU compiler. What is compiled is exactly
what `train.loop.run` executes (`loop.build_steps`: the same step function, shardings,
donation and microbatches) plus the greedy decoding loop evaluation runs.

    report = compile_run(train_cfg, "v5p-64")
    report["fits"], report["hbm_per_chip_gib"]["total"], report["roofline"]["mfu_upper_bound"]

The roofline takes the three costs of one step as if they overlapped perfectly, so its step
time is a lower bound and its MFU an upper bound:
  compute_s = executed FLOPs per chip / peak bf16 FLOP/s
  hbm_s     = bytes accessed per chip / HBM bandwidth
  ici_s     = collective traffic per chip (ring algorithms) / bidirectional ICI bandwidth
Multislice collectives that cross the data-centre network are counted at ICI speed too.

XLA's `cost_analysis` counts the body of a while loop once, whatever its trip count, so for
scanned stacks it sees one repeat of the layer pattern. Executed FLOPs therefore come from
`flops.executed_flops_per_step` (dense attention and remat recomputation counted; it agrees
with XLA's own count to 2% on a program without loops, see tests/test_compile_tpu.py), and
bytes accessed from `hlo_stats.hbm_bytes` (XLA's rule over the optimised HLO, each loop body
once per trip, but only buffers in HBM: XLA's own count includes what it placed in on-chip
memory, so on a small program without loops ours is lower, 155 vs 493 MB for tiny on v5p-8).
XLA's raw numbers are in the report too.

A program whose temporaries exceed HBM makes the TPU compiler itself refuse it
(RESOURCE_EXHAUSTED); that is reported as not fitting, with the compiler's figures.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5gemma_jax import chips, decoding, sharding
from t5gemma_jax.config import is_decoder_only
from t5gemma_jax.data import pipeline
from t5gemma_jax.train import flops, hlo_stats, loop

_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
             "decoder_loss_weights")
_PACKING = ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions",
            "decoder_positions")


def topology_devices(accelerator_type: str, num_slices: int = 1) -> tuple[chips.Slice, list]:
  """(the slice, abstract TPU devices of `num_slices` such slices) for compiling.

  Raises:
    ValueError: unknown accelerator type or bad slice count.
    ImportError: libtpu is missing (it is in the `test` and `tpu` extras).
  """
  found = chips.parse(accelerator_type)
  if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
    raise ValueError(f"--num_slices must be a positive integer, got {num_slices!r}")
  # Compiling never touches a chip, so several processes may hold libtpu at once (libtpu
  # otherwise refuses a second process with a lockfile error).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  try:
    topology = topologies.get_topology_desc(platform="tpu", topology_name=found.topology_name,
                                            num_slices=num_slices, **found.topology_options())
  except Exception as e:  # noqa: BLE001  (libtpu raises several types)
    if "libtpu" in str(e).lower() or "unknown backend" in str(e).lower():
      raise ImportError("compiling for a TPU needs libtpu: pip install -e '.[tpu]' (or the "
                        f"test extra): {e}") from e
    raise ValueError(f"accelerator type {accelerator_type!r}: libtpu refused topology "
                     f"{found.topology_name}: {e}") from e
  return found, list(topology.devices)


def abstract_batch(cfg: loop.TrainConfig, batch_size: int, batch_sharding) -> dict:
  """The batch the pipeline would deliver, as ShapeDtypeStructs: int32 [B, length]."""
  lengths = cfg.task_feature_lengths
  if is_decoder_only(cfg.model):  # one row of inputs + targets; packing adds the last two
    names = pipeline.DECODER_ONLY_FEATURES[:len(pipeline.DECODER_ONLY_FEATURES) - 2 * (
        not cfg.pack)]
    return {name: jax.ShapeDtypeStruct((batch_size, lengths["inputs"] + lengths["targets"]),
                                       jnp.int32, sharding=batch_sharding) for name in names}
  names = _FEATURES + (_PACKING if cfg.pack else ())
  return {name: jax.ShapeDtypeStruct(
      (batch_size, lengths["inputs"] if name.startswith("encoder") else lengths["targets"]),
      jnp.int32, sharding=batch_sharding) for name in names}


class OutOfMemory(Exception):
  """The TPU compiler refused the program: its temporaries exceed the chip's HBM."""

  def __init__(self, message: str, required: float, available: float, seconds: float = 0.0):
    super().__init__(message)
    self.required, self.available, self.seconds = required, available, seconds


_OOM = re.compile(r"Ran out of memory in memory space hbm|Ran out of memory on HBM|"
                  r"RESOURCE_EXHAUSTED", re.I)
_SIZE = re.compile(r"\(([0-9.]+)([KMGT])\)")
_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _out_of_memory(e: Exception) -> Optional[OutOfMemory]:
  text = str(e)
  if not _OOM.search(text):
    return None
  sizes = [float(v) * _UNITS[u] for v, u in _SIZE.findall(text)]
  required, available = (sizes + [float("nan"), float("nan")])[:2]
  first = next((line for line in text.splitlines() if "memory" in line.lower()), text)
  return OutOfMemory(first.strip(), required, available)


def sharded_bytes(tree) -> float:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
  total = 0.0
  for leaf in jax.tree_util.tree_leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass
class Compiled:
  """One compiled program and what the compiler says about it (per chip)."""

  executable: object
  seconds: float

  def memory(self) -> dict[str, float]:
    """Bytes per chip: arguments, outputs, temporaries, code and their total (outputs that
    alias donated arguments counted once)."""
    m = self.executable.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "temporaries": m.temp_size_in_bytes, "code": m.generated_code_size_in_bytes,
            "total": total}

  def cost(self) -> dict[str, float]:
    """XLA's own count per chip: {"flops", "bytes_accessed"}."""
    c = self.executable.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return {"flops": float(c.get("flops", 0.0)), "bytes_accessed": float(c.get("bytes accessed",
                                                                               0.0))}

  @functools.cached_property
  def hlo(self) -> str:
    """The optimised HLO of one device (megabytes for a large model: made once)."""
    return self.executable.as_text()

  def collectives(self, num_devices: int) -> dict[str, dict]:
    return hlo_stats.collectives(self.hlo, num_devices)

  def hbm_bytes(self) -> float:
    return hlo_stats.hbm_bytes(self.hlo)


def _compile(fn, *args) -> Compiled:
  """Lowers and compiles; raises `OutOfMemory` when the compiler finds no room in HBM."""
  start = time.perf_counter()
  lowered = fn.lower(*args)
  try:
    executable = lowered.compile()
  except Exception as e:  # noqa: BLE001  (XLA raises its runtime error type)
    oom = _out_of_memory(e)
    if oom is None:
      raise
    oom.seconds = time.perf_counter() - start  # what the attempt cost, for the report
    raise oom from e
  return Compiled(executable, time.perf_counter() - start)


def target_mesh(cfg: loop.TrainConfig, accelerator_type: str, num_slices: int = 1):
  """(slice, run config with the Multislice dcn filled in, mesh over the abstract devices)."""
  found, devices = topology_devices(accelerator_type, num_slices)
  run_cfg = cfg
  if num_slices > 1 and math.prod(cfg.mesh.dcn) == 1:
    run_cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh,
                                                                dcn=(num_slices, 1, 1)))
  return found, run_cfg, sharding.make_mesh(run_cfg.mesh, devices=devices)


def compile_train_step(cfg: loop.TrainConfig, mesh, batch_size: Optional[int] = None,
                       steps: Optional[loop.Steps] = None) -> Compiled:
  """Lowers and compiles the run's jitted train step on `mesh` (no data, no state).

  Args:
    steps: `loop.build_steps(cfg, mesh)`, when the caller has it already.
  """
  rows = cfg.batch_size if batch_size is None else batch_size
  loop.check_batch(cfg, mesh, rows)
  steps = steps or loop.build_steps(cfg, mesh)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    return _compile(steps.train, steps.abstract,
                    abstract_batch(cfg, rows, steps.batch_sharding), rng)


def compile_decode(cfg: loop.TrainConfig, mesh, steps: Optional[loop.Steps] = None
                   ) -> Compiled:
  """Lowers and compiles greedy decoding (encode, then the cached decoder loop) as evaluation
  runs it: the training params as sharded, a batch of `decode.batch_size` rows (rounded up
  to the data-parallel size) of the run's input length, `decode.max_new_tokens` steps."""
  generate = decoding.generate_function(cfg.model, "greedy", cfg.decode.max_new_tokens,
                                        run=cfg.run)
  steps = steps or loop.build_steps(cfg, mesh)
  parallel = sharding.data_parallel_size(mesh)
  rows = -(-cfg.decode.batch_size // parallel) * parallel
  batch = sharding.batch_sharding(mesh)
  fn = jax.jit(generate, in_shardings=(steps.shardings.params, batch,
                                       sharding.replicated(mesh)), out_shardings=batch)
  tokens = jax.ShapeDtypeStruct((rows, cfg.task_feature_lengths["inputs"]), jnp.int32,
                                sharding=batch)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    return _compile(fn, steps.abstract.params, tokens, rng)


def roofline(chip: chips.Chip, cost: dict, traffic_bytes: float, model_flops: float,
             num_chips: int, tokens: int) -> dict:
  """Step-time lower bound from compute, HBM and ICI (see the module docstring).

  Args:
    cost: per-chip {"flops", "bytes_accessed"} of the step.
    traffic_bytes: collective bytes one chip sends per step.
    model_flops: the step's model FLOPs over all chips (`flops.training_flops_per_step`).
    tokens: tokens per step (padding included) for the throughput bound.
  """
  compute_s = cost["flops"] / chip.peak_bf16_flops
  hbm_s = cost["bytes_accessed"] / chip.hbm_bandwidth
  ici_s = traffic_bytes / chip.ici_bandwidth
  step_s = max(compute_s, hbm_s, ici_s, 1e-12)
  terms = {"compute": compute_s, "hbm": hbm_s, "ici": ici_s}
  return {"compute_s": compute_s, "hbm_s": hbm_s, "ici_s": ici_s, "step_s": step_s,
          "bound_by": max(terms, key=terms.get),
          "mfu_upper_bound": model_flops / (num_chips * chip.peak_bf16_flops * step_s),
          "tokens_per_s_upper_bound": tokens / step_s}


def compile_run(cfg: loop.TrainConfig, accelerator_type: str, num_slices: int = 1,
                batch_size: Optional[int] = None, decode: bool = True) -> dict:
  """Compiles the run for `num_slices` slices of `accelerator_type` and reports on it.

  Returns:
    The report (see `t5gemma compile`): topology, chips, mesh, batch_size, fits,
    hbm_per_chip_gib, flops_per_step {model, executed, model_dense_attention, xla},
    bytes_accessed_per_chip, compile_error (when the compiler ran out of HBM),
    collectives, roofline, tokens_per_s_upper_bound, compile_s and, with `decode`, the
    decode step's memory and compile time.
  """
  found, run_cfg, mesh = target_mesh(cfg, accelerator_type, num_slices)
  rows = cfg.batch_size if batch_size is None else batch_size
  n = mesh.devices.size
  capacity = found.chip.hbm_bytes
  lengths = cfg.task_feature_lengths
  s, t = lengths["inputs"], lengths["targets"]
  model_flops = flops.training_flops_per_step(cfg.model, rows, s, t)
  executed = flops.executed_flops_per_step(cfg.model, rows, s, t, cfg.run.remat_policy)
  error = None
  steps = loop.build_steps(run_cfg, mesh)
  try:
    train = compile_train_step(run_cfg, mesh, rows, steps)
  except OutOfMemory as oom:
    train, error = None, oom
  if train is not None:
    memory, cost, coll = train.memory(), train.cost(), train.collectives(n)
    hbm = train.hbm_bytes()
  else:  # the compiler's own figures; the state's size from its shardings
    state = sharded_bytes(steps.abstract)
    batch = sharded_bytes(abstract_batch(run_cfg, rows, steps.batch_sharding))
    memory = {"arguments": state + batch, "outputs": state, "temporaries": error.required,
              "code": 0.0, "total": state + batch + error.required}
    cost, coll, hbm = {"flops": None, "bytes_accessed": None}, {}, 0.0
  per_chip = {"flops": executed / n, "bytes_accessed": hbm}
  roof = roofline(found.chip, per_chip, sum(c["traffic_bytes"] for c in coll.values()),
                  model_flops, n, rows * (s + t))
  gib = {k: v / chips.GIB for k, v in memory.items()}
  gib["capacity"] = capacity / chips.GIB
  report = {
      "topology": found.type, "num_slices": num_slices, "chips": n,
      "topology_name": found.topology_name, "mesh": dict(mesh.shape), "batch_size": rows,
      "lengths": dict(lengths), "fits": error is None and memory["total"] <= capacity,
      "hbm_per_chip_gib": gib,
      "flops_per_step": {
          "xla": None if cost["flops"] is None else cost["flops"] * n, "model": model_flops,
          "executed": executed,
          "model_dense_attention": flops.training_flops_per_step(cfg.model, rows, s, t,
                                                                 dense_attention=True)},
      "bytes_accessed_per_chip": {"xla": cost["bytes_accessed"], "per_trip": hbm},
      "collectives": {k: {"count": int(v["count"]), "in_loop": int(v["in_loop"]),
                          "bytes": v["bytes"]} for k, v in sorted(coll.items())},
      "roofline": {k: v for k, v in roof.items() if k != "tokens_per_s_upper_bound"},
      "tokens_per_s_upper_bound": roof["tokens_per_s_upper_bound"],
      "compile_s": train.seconds if train is not None else error.seconds,
  }
  if error is not None:
    report["compile_error"] = str(error)
    return report
  if decode:
    try:
      dec = compile_decode(run_cfg, mesh, steps)
      total = dec.memory()["total"]
      report["decode"] = {"hbm_per_chip_gib": total / chips.GIB, "fits": total <= capacity,
                          "compile_s": dec.seconds}
    except OutOfMemory as oom:
      report["decode"] = {"hbm_per_chip_gib": oom.required / chips.GIB, "fits": False,
                          "compile_s": oom.seconds, "compile_error": str(oom)}
  return report


def find_batch(cfg: loop.TrainConfig, accelerator_type: str, num_slices: int = 1,
               limit: int = 1 << 16) -> tuple[Optional[int], dict]:
  """The largest global batch (a multiple of the data-parallel size times the microbatches)
  whose train step fits in HBM, by doubling then bisection on compiles.

  Returns:
    (batch or None when not even the smallest fits, the report of the last batch that fit or,
    when none did, of the smallest tried).
  """
  _, _, mesh = target_mesh(cfg, accelerator_type, num_slices)
  unit = sharding.data_parallel_size(mesh) * cfg.num_microbatches
  reports: dict[int, dict] = {}

  def fits(units: int) -> bool:
    if units not in reports:
      reports[units] = compile_run(cfg, accelerator_type, num_slices, units * unit,
                                   decode=False)
    return reports[units]["fits"]

  start = max(cfg.batch_size // unit, 1)
  if not fits(start):
    hi = start
    while hi > 1 and not fits(hi // 2):
      hi //= 2
    if hi == 1:
      return None, reports[1]
    lo, hi = hi // 2, hi
  else:
    lo, hi = start, start * 2
    while hi * unit <= limit and fits(hi):
      lo, hi = hi, hi * 2
    if hi * unit > limit:
      return lo * unit, reports[lo]
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo * unit, reports[lo]
