"""The TPU chip table and the one parser of TPU names (accelerator types and libtpu topologies)."""

import os
import subprocess
import sys

import pytest

from mae_jax import accelerators

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The table.


def test_tpu_chip_table():
  assert accelerators.tpu_chip('TPU v5 lite').generation == 'v5e'
  assert accelerators.tpu_chip('TPU v5').generation == 'v5p'  # exact match: v5p is not v5 lite
  assert accelerators.tpu_chip('TPU v4').cores_per_chip == 2
  assert accelerators.tpu_chip('cpu') is None
  for chip in accelerators.TPU_CHIPS.values():
    assert 0.9 * chip.hbm_bytes < chip.hbm_usable_bytes <= chip.hbm_bytes
    assert accelerators.PEAK_FLOPS[chip.device_kind] == chip.peak_flops
  assert accelerators.TPU_CHIPS['v5e'].hbm_usable_bytes == int(15.75 * accelerators.GiB)


def test_devices_per_chip_and_peak_by_kind_prefix():
  chips = accelerators.TPU_CHIPS
  assert [g for g, c in chips.items() if c.devices_per_chip == 2] == ['v2', 'v3']  # no megacore
  assert chips['v3'].peak_flops == 123e12 / 2  # per TensorCore, the JAX device of a v3
  assert accelerators.peak_flops('TPU v5 lite') == chips['v5e'].peak_flops  # not v5p's 'TPU v5'
  assert accelerators.peak_flops('TPU v5p chip') == chips['v5p'].peak_flops
  assert accelerators.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert accelerators.peak_flops('NVIDIA H200 NVL') == 835e12  # The PCIe card, not the SXM 'NVIDIA H200'.
  assert accelerators.peak_flops('cpu') is None


def test_every_generation_is_reachable_by_its_gcloud_name():
  for generation, chip in accelerators.TPU_CHIPS.items():
    size = max(chip.single_host_chips) * chip.cores_per_chip
    accelerator = accelerators.parse_accelerator_type(f'{chip.accelerator_name}-{size}')
    assert accelerator.chip is chip and accelerator.name == f'{chip.accelerator_name}-{size}'
    assert accelerator.num_hosts == 1, generation
    assert chip.runtime_version


def test_importing_the_table_needs_no_jax():
  # launch/tpu.py reads the table on machines without jax.
  code = 'import sys; from mae_jax import accelerators; print("jax" in sys.modules)'
  done = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=60, check=True)
  assert done.stdout.strip() == 'False'


# Accelerator types (gcloud's --accelerator-type): sizes and hosts.


@pytest.mark.parametrize('accelerator_type, hosts', [
    ('v4-8', 1), ('v4-128', 16), ('v5p-256', 32), ('v5litepod-8', 1),
    ('v5litepod-16', 4), ('v5litepod-256', 64), ('v6e-64', 16), ('v3-32', 4),
])
def test_hosts_per_slice(accelerator_type, hosts):
  assert accelerators.parse_accelerator_type(accelerator_type).num_hosts == hosts


@pytest.mark.parametrize('name, gcloud_name, chips', [
    ('v5e-16', 'v5litepod-16', 16),  # aot's spelling
    ('V4-128', 'v4-128', 64),
    ('v6lite-8', 'v6e-8', 8),
    ('v2-8', 'v2-8', 4),
])
def test_accelerator_type_spellings(name, gcloud_name, chips):
  accelerator = accelerators.parse_accelerator_type(name)
  assert accelerator.name == gcloud_name and accelerator.num_chips == chips


@pytest.mark.parametrize('name, match', [
    ('v4-12', 'multiple of 8 from 16 TensorCores'),  # 6 chips: neither one host nor whole hosts
    ('v4-4', 'must be 8 \\(one host\\)'),
    ('v5litepod-12', 'must be 1, 4, 8 \\(one host\\) or a multiple of 4 from 16 chips'),
    ('v5litepod-2', 'from 16 chips'),
    ('v4-7', 'must be even'),
    ('v4:2x2x2', 'expected GENERATION-SIZE'),  # a libtpu shape is for --topology
    ('v4_8', 'expected GENERATION-SIZE'),
    ('tpu-v4-8', 'expected GENERATION-SIZE'),
    ('v9-8', 'unknown TPU generation'),
])
def test_accelerator_type_errors_name_the_flag(name, match):
  with pytest.raises(ValueError, match=match) as e:
    accelerators.parse_accelerator_type(name)
  assert str(e.value).startswith(f'--accelerator_type={name!r}')


# libtpu topologies (aot --topology).


@pytest.mark.parametrize('name,topology_name,chips', [
    ('v4-8', 'v4:2x2x1', 4),
    ('v4-128', 'v4:4x4x4', 64),  # v4-N counts TensorCores: 2 per chip
    ('v5p-512', 'v5p:4x8x8', 256),
    ('v5e-256', 'v5e:16x16', 256),  # v5e-N counts chips
    ('v5litepod-16', 'v5e:4x4', 16),
    ('v6e-64', 'v6e:8x8', 64),
    ('v6e-8', 'v6e:2x4', 8),
    ('v4:4x4x12', 'v4:4x4x12', 192),
])
def test_parse_topology(name, topology_name, chips):
  spec = accelerators.parse_topology(name)
  assert spec.topology_name == topology_name
  assert spec.num_chips == chips
  assert accelerators.parse_topology(name, num_slices=2).num_chips == 2 * chips


def test_topology_kwargs():
  v4 = accelerators.parse_topology('v4-128').topology_kwargs()
  assert v4['chip_config_name'] == 'megacore' and v4['wrap'] == (True, True, True)
  assert accelerators.parse_topology('v4-16').topology_kwargs()['wrap'] == (False, False, False)
  v5e = accelerators.parse_topology('v5e-256').topology_kwargs()
  assert 'chip_config_name' not in v5e and v5e['wrap'] == (True, True, False)


@pytest.mark.parametrize('name,match', [
    ('v4-7', 'must be even'),
    ('v4-24', 'not a power of two'),
    ('v9-8', 'unknown TPU generation'),
    ('tpu', 'expected GENERATION-SIZE'),
    ('v5e:4x4x4', '2D'),
    ('v3-32', 'no megacore mode'),  # one device per TensorCore: not modelled by TopologySpec
])
def test_parse_topology_errors(name, match):
  with pytest.raises(ValueError, match=match):
    accelerators.parse_topology(name)
