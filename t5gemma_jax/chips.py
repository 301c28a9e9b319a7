"""Cloud TPU slices by the names gcloud uses (v5p-64, v5litepod-16, v6e-64, v4-8, ...).

One table of chip figures (peak bf16 FLOP/s, HBM capacity and bandwidth, interconnect
bandwidth), each with its source, and the rule that turns an accelerator type into a slice
(chips, hosts, physical topology). The launcher, the FLOP counter's MFU and the ahead-of-time
compiler all read these; no jax import here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's per-chip figures.

  Attributes:
    generation: "v4", "v5e", "v5p", "v6e".
    device_kind: what `jax.Device.device_kind` reports for it.
    peak_bf16_flops: dense bf16 matmul peak, FLOP/s.
    hbm_bytes: HBM capacity.
    hbm_bandwidth: HBM bandwidth, bytes/s.
    ici_bandwidth: bidirectional inter-chip interconnect bandwidth per chip, bytes/s.
    dims: 3 for a 3D torus (v4, v5p; sizes count TensorCores, 2 per chip), 2 for a 2D torus
      (v5e, v6e; sizes count chips).
    source: where the figures come from.
  """

  generation: str
  device_kind: str
  peak_bf16_flops: float
  hbm_bytes: float
  hbm_bandwidth: float
  ici_bandwidth: float
  dims: int
  source: str


CHIPS = {
    # Cloud TPU docs, "TPU v4": 275 TFLOPs bf16; HBM2 32 GiB, 1200 GBps. ICI: the Cloud TPU
    # system-architecture table gives 2400 Gbps per chip (300 GB/s) each way: 600 GB/s both.
    "v4": Chip("v4", "TPU v4", 275e12, 32 * GIB, 1200e9, 600e9, 3,
               "cloud.google.com/tpu/docs/v4; ICI: tpu/docs/system-architecture-tpu-vm"),
    # Cloud TPU docs, "TPU v5e": 197 TFLOPs bf16; HBM 16 GiB, 819 GBps; bidirectional ICI
    # 400 GBps per chip.
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16 * GIB, 819e9, 400e9, 2,
                "cloud.google.com/tpu/docs/v5e"),
    # Cloud TPU docs, "TPU v5p": 459 TFLOPs bf16; HBM 95 GiB, 2765 GBps; bidirectional ICI
    # 1200 GBps per chip.
    "v5p": Chip("v5p", "TPU v5", 459e12, 95 * GIB, 2765e9, 1200e9, 3,
                "cloud.google.com/tpu/docs/v5p"),
    # Cloud TPU docs, "TPU v6e" (Trillium): 918 TFLOPs bf16; HBM 32 GB, 1638 GBps;
    # bidirectional ICI 800 GBps per chip.
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32e9, 1638e9, 800e9, 2,
                "cloud.google.com/tpu/docs/v6e"),
}

# Accelerator-type prefix -> generation (gcloud spells v5e slices "v5litepod-N").
_PREFIXES = {"v4": "v4", "v5litepod": "v5e", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}
CANONICAL_PREFIX = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}
_2D_SHAPES = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
_3D_SMALL = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
CHIPS_PER_HOST = 4  # 2x2x1 chips per host on v4 / v5p and on multi-host v5e / v6e slices


@dataclasses.dataclass(frozen=True)
class Slice:
  """One slice of an accelerator type.

  Attributes:
    type: canonical accelerator type ("v5p-64", "v5litepod-16").
    chip: the chip's figures.
    chips, hosts: per slice.
    shape: the physical chip topology, e.g. (2, 4, 4) or (4, 4).
  """

  type: str
  chip: Chip
  chips: int
  hosts: int
  shape: tuple[int, ...]

  @property
  def topology_name(self) -> str:
    """The name libtpu's topology API takes, e.g. "v5p:2x4x4"."""
    return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

  def topology_options(self) -> dict:
    """Keyword arguments of `jax.experimental.topologies.get_topology_desc` for this slice:
    megacore (one device per chip) on v4 / v5p, 2x2 chips per host, wrap-around links on
    full-cube or full-pod dimensions."""
    options = {"chips_per_host_bounds": (2, 2, 1) if self.chips >= 4 else (1, 1, 1)}
    if self.chip.dims == 3:
      options["chip_config_name"] = "megacore"
      wrap = self.chips >= 64
      options["wrap"] = (wrap, wrap, wrap)
    else:
      full = [d >= 16 for d in self.shape]
      options["wrap"] = (full[0], full[1], False)
    return options


def _cube_shape(chips: int) -> tuple[int, int, int]:
  """The most cubic x <= y <= z of multiples of 4 with x * y * z = chips (Cloud TPU's
  shapes for v4 / v5p slices of 64 chips and more)."""
  best = None
  for x in range(4, round(chips ** (1 / 3)) + 5, 4):
    for y in range(x, int(math.isqrt(chips // x)) + 5, 4):
      if chips % (x * y) or (chips // (x * y)) % 4 or chips // (x * y) < y:
        continue
      shape = (x, y, chips // (x * y))
      if best is None or shape[2] < best[2]:
        best = shape
  if best is None:
    raise ValueError(f"{chips} chips do not form a 3D torus of multiples of 4")
  return best


def parse(accelerator_type: str) -> Slice:
  """A `Slice` for 'v5p-64', 'v4-8', 'v5litepod-16' (or 'v5e-16'), 'v6e-64', ...

  Raises:
    ValueError: an unknown generation or a size that generation does not come in (the
      message names the accelerator type).
  """
  text = accelerator_type.strip().lower()
  m = re.fullmatch(r"(v4|v5litepod|v5e|v5p|v6e)-(\d+)", text)
  if not m:
    raise ValueError(f"unknown accelerator type {accelerator_type!r}; expected v4-N, "
                     "v5litepod-N (or v5e-N), v5p-N or v6e-N as gcloud spells them")
  gen = _PREFIXES[m.group(1)]
  chip, n = CHIPS[gen], int(m.group(2))
  canonical = f"{CANONICAL_PREFIX[gen]}-{n}"
  if chip.dims == 3:
    if n < 8 or n % 8:
      raise ValueError(f"accelerator type {accelerator_type!r}: {gen} sizes count "
                       "TensorCores (2 per chip), a multiple of 8")
    chips = n // 2
    if chips in _3D_SMALL:
      shape = _3D_SMALL[chips]
    elif chips % 64 == 0:
      shape = _cube_shape(chips)
    else:
      raise ValueError(f"accelerator type {accelerator_type!r}: {chips} chips is not a "
                       f"{gen} slice (4, 8, 16, 32 or a multiple of 64 chips)")
    hosts = max(chips // CHIPS_PER_HOST, 1)
  else:
    if n not in _2D_SHAPES:
      raise ValueError(f"accelerator type {accelerator_type!r}: {gen} slices have "
                       f"{sorted(_2D_SHAPES)} chips")
    chips, shape = n, _2D_SHAPES[n]
    hosts = 1 if n <= 8 else n // CHIPS_PER_HOST
  return Slice(canonical, chip, chips, hosts, shape)


def chip_for_device_kind(kind: str) -> Optional[Chip]:
  """The `Chip` whose `device_kind` is `kind` (case and spacing ignored), or None."""
  kind = " ".join(kind.lower().split())
  for chip in CHIPS.values():
    if chip.device_kind.lower() == kind:
      return chip
  return None
