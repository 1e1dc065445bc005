"""One table of accelerators: TPU chips by generation, the names of their slices, peak FLOP/s.

Every TPU name in the project is read here, by one parser:
  - Cloud TPU accelerator types, as gcloud's --accelerator-type takes them (launch/tpu.py):
    v2-8, v3-32, v4-128, v5p-256, v5litepod-16, v6e-64. The size counts TensorCores: 2 per
    chip on v2 to v5p, 1 on v5e and v6e, so v4-128 is 64 chips and v5litepod-16 is 16.
  - libtpu topology names (aot.py): v5e:16x16, v4:4x4x4, the chips per dimension of one
    slice; aot also takes a size, v5e-256 or v4-128, and picks the usual shape.
v5e, v5lite and v5litepod all name v5e; v6lite names v6e; v5 names v5p.

Importing this module needs no jax (launch/tpu.py runs where jax is not installed); only
topology_devices imports it, to make compile-only devices.
"""

import dataclasses
import math
import os
import re
from typing import Any

GiB = 2**30


class TpuUnavailableError(RuntimeError):
  """libtpu is not installed (or cannot make a topology) on this host."""


@dataclasses.dataclass(frozen=True)
class TpuChip:
  """One TPU generation: what one JAX device of it can do, and how its slices are named.

  A JAX device is one chip (v4 and v5p in megacore mode), except on v2 and v3, which have
  no megacore mode: there a device is one TensorCore, and the per-device figures are half
  a chip's.
  """
  generation: str  # The name in slice types: 'v5e' as in v5e-256.
  device_kind: str  # jax Device.device_kind.
  peak_flops: float  # Dense bf16 FLOP/s per device.
  hbm_bytes: int  # Nominal HBM per device (Cloud TPU documentation).
  hbm_usable_bytes: int  # What XLA's TPU compiler lets one program use (its RESOURCE_EXHAUSTED limit).
  cores_per_chip: int  # TensorCores: v4-N and v5p-N count cores, v5e-N and v6e-N count chips.
  topology_rank: int  # 3 for the 3D tori (v4, v5p), 2 for v2, v3, v5e and v6e.
  hbm_bandwidth: float  # Bytes/s per device (Cloud TPU documentation).
  accelerator_name: str  # gcloud's --accelerator-type prefix: 'v5litepod' as in v5litepod-16.
  runtime_version: str  # Default TPU VM software version.
  megacore: bool = False  # One JAX device drives both TensorCores of a chip (v4, v5p).
  single_host_chips: tuple[int, ...] = (4,)  # Slice sizes, in chips, that one TPU VM serves.

  @property
  def devices_per_chip(self) -> int:
    return 1 if self.megacore else self.cores_per_chip


# hbm_usable_bytes were read from the "exceeds available HBM (X G)" message of
# libtpu 0.0.42.1 (jax 0.10.2) compiling for compile-only devices: 30.75 /
# 95.74 / 15.75 / 31.25 GiB (v4 / v5p / v5e / v6e), 7.48 / 15.48 GiB per
# TensorCore (v2 / v3). The v5p documentation says "95 GB" per chip, below what
# its compiler allows, so the nominal figure is given as 96 GiB. The v2 page of
# the documentation gives no bandwidth: 716 GB/s per chip is jax's own figure
# (jax/_src/pallas/mosaic/tpu_info.py).
TPU_CHIPS = {
    'v2': TpuChip('v2', 'TPU v2', 45e12 / 2, 8 * GiB, int(7.48 * GiB), 2, 2, 716e9 / 2,
                  'v2', 'tpu-ubuntu2204-base'),
    'v3': TpuChip('v3', 'TPU v3', 123e12 / 2, 16 * GiB, int(15.48 * GiB), 2, 2, 900e9 / 2,
                  'v3', 'tpu-ubuntu2204-base'),
    'v4': TpuChip('v4', 'TPU v4', 275e12, 32 * GiB, int(30.75 * GiB), 2, 3, 1200e9,
                  'v4', 'tpu-ubuntu2204-base', megacore=True),
    'v5p': TpuChip('v5p', 'TPU v5', 459e12, 96 * GiB, int(95.74 * GiB), 2, 3, 2765e9,
                   'v5p', 'v2-alpha-tpuv5', megacore=True),
    'v5e': TpuChip('v5e', 'TPU v5 lite', 197e12, 16 * GiB, int(15.75 * GiB), 1, 2, 819e9,
                   'v5litepod', 'v2-alpha-tpuv5-lite', single_host_chips=(1, 4, 8)),
    'v6e': TpuChip('v6e', 'TPU v6 lite', 918e12, 32 * GiB, int(31.25 * GiB), 1, 2, 1640e9,
                   'v6e', 'v2-alpha-tpuv6e', single_host_chips=(1, 4, 8)),
}
GENERATION_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6lite': 'v6e', 'v5': 'v5p'}
# Hosts of a slice larger than one TPU VM hold 4 chips each.
CHIPS_PER_HOST = 4

# Dense bf16 peak FLOP/s per device, by jax device_kind prefix: the TPU chips above,
# other spellings of their kinds, and chips not in the table.
PEAK_FLOPS = {
    **{chip.device_kind: chip.peak_flops for chip in TPU_CHIPS.values()},
    'TPU v5e': TPU_CHIPS['v5e'].peak_flops,
    'TPU v5p': TPU_CHIPS['v5p'].peak_flops,
    'TPU v6e': TPU_CHIPS['v6e'].peak_flops,
    'TPU7x': 2307e12,
    'NVIDIA H200': 989e12,  # SXM.
    'NVIDIA H200 NVL': 835e12,
    'NVIDIA H100': 989e12,  # SXM.
    'NVIDIA H100 NVL': 835e12,
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA GH200': 989e12,
    'NVIDIA A100': 312e12,
    'NVIDIA B200': 2250e12,
}


def tpu_chip(device_kind: str) -> TpuChip | None:
  """The TpuChip whose device_kind is exactly `device_kind` ('TPU v5' is v5p, not v5e)."""
  for chip in TPU_CHIPS.values():
    if chip.device_kind == device_kind:
      return chip
  return None


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of a device of this kind (longest PEAK_FLOPS prefix), or None."""
  for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
    if device_kind.startswith(prefix):
      return PEAK_FLOPS[prefix]
  return None


# ----------------------------------------------------------------------------
# Names of slices.

_TPU_NAME = re.compile(r'(v[0-9a-z]+)([-:])(.+)')


def _parse_name(name: str, flag: str, expected: str,
                with_shape: bool) -> tuple[TpuChip, tuple[int, ...] | None, int]:
  """'v4-128' -> (v4, None, 64 chips); 'v5e:4x8' -> (v5e, (4, 8), 32). Errors name `flag`."""
  known = sorted(TPU_CHIPS)
  text = name.strip().lower()
  match = _TPU_NAME.fullmatch(text)
  if not match or (match.group(2) == ':' and not with_shape):
    raise ValueError(f'{flag}={name!r}: expected {expected}; generations {known}')
  generation, separator, rest = match.groups()
  generation = GENERATION_ALIASES.get(generation, generation)
  if generation not in TPU_CHIPS:
    raise ValueError(f'{flag}={name!r}: unknown TPU generation {generation!r}; known {known}')
  chip = TPU_CHIPS[generation]
  if separator == ':':
    try:
      shape = tuple(int(d) for d in rest.split('x'))
    except ValueError:
      raise ValueError(f'{flag}={name!r}: the shape must be like 4x4 or 4x4x4') from None
    if len(shape) != chip.topology_rank or min(shape) < 1:
      raise ValueError(f'{flag}={name!r}: {generation} slices are {chip.topology_rank}D, '
                       f'e.g. {generation}:' + 'x'.join(['2'] * chip.topology_rank))
    return chip, shape, math.prod(shape)
  if not rest.isdigit():
    raise ValueError(f'{flag}={name!r}: the size after "-" must be a number')
  size = int(rest)
  if size % chip.cores_per_chip:
    raise ValueError(f'{flag}={name!r}: {generation}-N counts TensorCores '
                     f'({chip.cores_per_chip} per chip), so N must be even')
  return chip, None, size // chip.cores_per_chip


@dataclasses.dataclass(frozen=True)
class AcceleratorType:
  """A Cloud TPU slice as gcloud's --accelerator-type names it: v4-128, v5litepod-16."""
  chip: TpuChip
  num_chips: int

  @property
  def name(self) -> str:
    """gcloud's spelling: 'v5litepod-16', also when it was given as v5e-16."""
    return f'{self.chip.accelerator_name}-{self.num_chips * self.chip.cores_per_chip}'

  @property
  def num_hosts(self) -> int:
    """TPU VM workers of one slice: 16 for v4-128, 1 for v5litepod-8, 4 for v5litepod-16."""
    if self.num_chips <= max(self.chip.single_host_chips):
      return 1
    return self.num_chips // CHIPS_PER_HOST


def parse_accelerator_type(name: str) -> AcceleratorType:
  """'v4-128', 'v5litepod-16' (or v5e-16) -> AcceleratorType, checking Cloud TPU makes that size.

  A slice is one host (v4-8; v5litepod-1, -4 or -8) or whole hosts of 4 chips, from twice
  the largest one-host slice (v4-16, v5litepod-16).
  """
  flag = '--accelerator_type'
  chip, _, num_chips = _parse_name(
      name, flag, 'GENERATION-SIZE, e.g. v4-8, v4-128, v5p-256, v5litepod-256, v6e-64',
      with_shape=False)
  largest_host = max(chip.single_host_chips)
  if num_chips not in chip.single_host_chips and (
      num_chips < 2 * largest_host or num_chips % CHIPS_PER_HOST):
    cores = chip.cores_per_chip
    unit = 'TensorCores' if cores > 1 else 'chips'
    one_host = ', '.join(str(n * cores) for n in chip.single_host_chips)
    raise ValueError(f'{flag}={name!r}: the size of a {chip.accelerator_name} slice must be '
                     f'{one_host} (one host) or a multiple of {CHIPS_PER_HOST * cores} from '
                     f'{2 * largest_host * cores} {unit}')
  return AcceleratorType(chip, num_chips)


# ----------------------------------------------------------------------------
# Topologies: slices as libtpu makes them, for compiling on a host without TPUs.

@dataclasses.dataclass(frozen=True)
class TopologySpec:
  """A TPU slice (times num_slices) as libtpu names it."""
  name: str  # As given: 'v5e-256' or 'v5e:16x16'.
  chip: TpuChip
  shape: tuple[int, ...]  # Chips per dimension of one slice.
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def num_chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def topology_name(self) -> str:
    """The libtpu topology name of one slice: 'v5e:16x16', 'v4:4x4x4'."""
    return f'{self.chip.generation}:' + 'x'.join(str(d) for d in self.shape)

  def topology_kwargs(self) -> dict:
    """Extra get_topology_desc arguments: megacore, host bounds, torus wrap-around."""
    rank = self.chip.topology_rank
    kwargs: dict[str, Any] = {'num_slices': self.num_slices}
    if self.chip.megacore:
      kwargs['chip_config_name'] = 'megacore'  # one JAX device per chip, as on a real v4 / v5p
    shape3 = tuple(self.shape) + (1,) * (3 - rank)
    if all(d % b == 0 for d, b in zip(shape3, (2, 2, 1))):
      kwargs['chips_per_host_bounds'] = (2, 2, 1)  # 4 chips per host (the v4 / v5p / pod layout)
    else:
      kwargs['chips_per_host_bounds'] = shape3  # 1 or 2 chips: one host
    if rank == 3:  # full cubes of 4x4x4 chips close the torus
      wrap = all(d % 4 == 0 for d in self.shape)
      kwargs['wrap'] = (wrap,) * 3
    else:  # v5e / v6e wrap a dimension that spans the whole 16-chip pod edge
      kwargs['wrap'] = tuple(d == 16 for d in self.shape) + (False,)
    return kwargs


def _default_shape(num_chips: int, rank: int) -> tuple[int, ...]:
  """The usual slice shape: double the smallest dimension, last one first on ties.

  v4 / v5p: 4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 64 -> 4x4x4, 256 -> 4x8x8.
  v5e / v6e: 4 -> 2x2, 8 -> 2x4, 64 -> 8x8, 256 -> 16x16.
  """
  if num_chips < 1 or num_chips & (num_chips - 1):
    raise ValueError(
        f'{num_chips} chips: give the slice shape for a size that is not a power of two, '
        f'e.g. --topology=v4:4x4x12')
  shape = [1] * rank
  if rank == 3 and num_chips >= 4:
    shape = [2, 2, 1]
  while math.prod(shape) < num_chips:
    smallest = min(shape)
    index = max(i for i, d in enumerate(shape) if d == smallest)
    shape[index] *= 2
  if math.prod(shape) != num_chips:
    raise ValueError(f'{num_chips} chips do not form a {rank}D slice; give the shape, e.g. v4:2x2x1')
  return tuple(shape)


def parse_topology(name: str, num_slices: int = 1) -> TopologySpec:
  """'v5e-256', 'v4-128', 'v5p-512', 'v6e-64' or a libtpu name 'v5e:4x4' -> TopologySpec."""
  if num_slices < 1:
    raise ValueError(f'--num_slices={num_slices}: must be >= 1')
  chip, shape, num_chips = _parse_name(
      name, '--topology', 'GENERATION-SIZE (v5e-256, v4-128) or GENERATION:SHAPE (v5e:16x16)',
      with_shape=True)
  if chip.devices_per_chip != 1:
    targets = ', '.join(g for g, c in TPU_CHIPS.items() if c.devices_per_chip == 1)
    raise ValueError(f'--topology={name!r}: {chip.generation} has one JAX device per TensorCore '
                     f'(no megacore mode), which these compiles do not model; use {targets}')
  shape = shape or _default_shape(num_chips, chip.topology_rank)
  return TopologySpec(name=name, chip=chip, shape=shape, num_slices=num_slices)


def tpu_available() -> tuple[bool, str]:
  """(True, '') when libtpu can make compile-only devices here, else (False, why)."""
  try:
    topology_devices(parse_topology('v5e:2x2'))
  except TpuUnavailableError as e:
    return False, str(e)
  return True, ''


def topology_devices(spec: TopologySpec) -> list:
  """Compile-only TPU devices of the slice(s); raises TpuUnavailableError without libtpu."""
  # Every JAX process on a host with libtpu takes /tmp/libtpu_lockfile when it
  # first looks for TPUs, even where there are none; compile-only devices need
  # no chip, so let this process share libtpu with them.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  # Imported here, not at the top, so that launch/tpu.py reads the table without jax.
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    description = topologies.get_topology_desc(
        platform='tpu', topology_name=spec.topology_name, **spec.topology_kwargs())
  except (RuntimeError, NotImplementedError) as e:  # JaxRuntimeError is a RuntimeError
    message = str(e)
    if 'not installed' in message or 'TPU support' in message:
      raise TpuUnavailableError(
          f'libtpu is not installed: pip install "jax[tpu]" (or pip install -e ".[tpu]"). {message}') from e
    if 'lockfile' in message:
      raise TpuUnavailableError(
          f'libtpu is held by another process: set ALLOW_MULTIPLE_LIBTPU_LOAD=1. {message}') from e
    raise ValueError(f'--topology={spec.name} ({spec.topology_name}): libtpu refused it: {message}') from e
  devices = list(description.devices)
  expected = spec.num_chips
  if len(devices) != expected:
    raise ValueError(f'--topology={spec.name}: libtpu made {len(devices)} devices, expected {expected}')
  return devices
