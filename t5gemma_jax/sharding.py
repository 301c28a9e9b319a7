"""Device mesh, the one table of logical-axis rules, and placement helpers.

The model names every parameter and activation dimension logically (embed, mlp, heads, ...);
this module alone maps those names onto mesh axes `data`, `fsdp` and `tensor`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axes. Order matters: flax gives a mesh axis to the first logical
# dimension that asks for it, so activations' "batch" takes fsdp before "embed" could.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape over (data, fsdp, tensor).

  Attributes:
    ici: axis sizes within a slice (fast interconnect); one entry may be -1 to take the
      remaining devices.
    dcn: axis sizes across slices or hosts (data-centre network); product 1 = one slice.
  """

  ici: tuple[int, int, int] = (1, -1, 1)
  dcn: tuple[int, int, int] = (1, 1, 1)


def _fill(shape: Sequence[int], total: int, what: str) -> tuple[int, ...]:
  shape = [int(s) for s in shape]
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"{what} must have {len(MESH_AXES)} sizes for {MESH_AXES}, got {shape}")
  if shape.count(-1) > 1:
    raise ValueError(f"{what} {shape}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if total % known:
      raise ValueError(f"{what} {shape}: {total} devices are not divisible by {known}")
    shape[shape.index(-1)] = total // known
  if math.prod(shape) != total:
    raise ValueError(f"{what} {shape} needs {math.prod(shape)} devices, found {total}")
  return tuple(shape)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Optional[Sequence] = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh over all devices (or `devices`)."""
  devices = list(jax.devices() if devices is None else devices)
  if tuple(cfg.dcn) == (1, 1, 1):
    dcn = (1, 1, 1)
  else:
    # Granules over DCN: TPU slices, or processes (hosts) on GPU clusters.
    tpu_slices = len({getattr(d, "slice_index", 0) for d in devices})
    dcn = _fill(cfg.dcn, tpu_slices if tpu_slices > 1 else jax.process_count(),
                "MeshConfig.dcn")
  slices = math.prod(dcn)
  if len(devices) % slices:
    raise ValueError(f"MeshConfig.dcn {dcn}: {len(devices)} devices do not split into {slices}")
  ici = _fill(cfg.ici, len(devices) // slices, "MeshConfig.ici")
  if slices > 1:
    array = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=not hasattr(devices[0], "slice_index"))
  else:
    try:
      array = mesh_utils.create_device_mesh(ici, devices)
    except (AssertionError, NotImplementedError, ValueError):
      array = np.asarray(devices).reshape(ici)  # CPU / unknown topology: plain order
  return Mesh(array, MESH_AXES)


def maybe_initialize_distributed() -> None:
  """Starts JAX's multi-controller runtime when launched as one of several processes.

  Cloud TPU VMs (single host or pod, queued resources, GKE) and Slurm are detected by JAX
  itself; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  if jax.distributed.is_initialized():
    return
  explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
  managed = any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                           "MEGASCALE_COORDINATOR_ADDRESS")) or _on_cloud_tpu_vm()
  if explicit:
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                               int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
  elif managed:
    jax.distributed.initialize()


def _on_cloud_tpu_vm() -> bool:
  """A Cloud TPU VM keeps its worker list in instance metadata, not in the environment; JAX's
  own cluster detection reads it there."""
  try:
    from jax._src.clusters import cloud_tpu_cluster
  except ImportError:  # a JAX without this module: rely on the environment variables
    return False
  return bool(getattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", False))


def _divisible(spec: P, shape: Sequence[int], mesh: Mesh, name: str) -> P:
  """Drops mesh axes that cannot divide a dimension evenly (that dimension is replicated)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    size = math.prod(mesh.shape[a] for a in names)
    if dim % size:
      logging.warning("sharding: %s dimension %d is not divisible by mesh axes %s (%d); "
                      "replicating it", name, dim, names, size)
      out.append(None)
    else:
      out.append(axes)
  return P(*out)


def logical_to_shardings(abstract: Any, mesh: Mesh, rules=RULES) -> Any:
  """Shardings for a pytree whose leaves are nn.Partitioned (or plain: replicated).

  Args:
    abstract: e.g. `jax.eval_shape(model.init, ...)`, boxed with logical names.
    mesh: the device mesh.
    rules: logical -> mesh axes.

  Returns:
    The same tree structure (unboxed) with a NamedSharding per leaf.
  """
  specs = nn.get_partition_spec(abstract)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  unboxed = nn.meta.unbox(abstract)

  def one(path, spec, leaf):
    spec = spec if isinstance(spec, P) else P()
    return NamedSharding(mesh, _divisible(spec, leaf.shape, mesh, jax.tree_util.keystr(path)))

  return jax.tree_util.tree_map_with_path(one, mesh_specs, unboxed,
                                          is_leaf=lambda x: isinstance(x, P) or x is None)


def like_params(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree that embeds copies of the params (optimizer moments, gradients).

  A leaf whose trailing dict keys name a parameter of the same shape takes that parameter's
  sharding; everything else (step counts, Adafactor's factored row/column statistics) is small
  and replicated.

  Args:
    tree: e.g. the abstract optimizer state.
    params: the (abstract) params, for their shapes; param_shardings: their shardings.
  """
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params),
                                    jax.tree_util.tree_leaves(param_shardings)):
    by_path[tuple(k.key for k in path)] = (tuple(leaf.shape), sharding)

  def one(path, leaf):
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.insert(0, k.key)
    for start in range(len(keys)):
      found = by_path.get(tuple(keys[start:]))
      if found is not None:
        shape, sharding = found
        return sharding if shape == tuple(leaf.shape) else NamedSharding(mesh, P())
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over (data, fsdp), the rest replicated: how every [batch, ...] input is placed."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)
