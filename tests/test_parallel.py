"""Mesh resolution and partition rules."""

import jax
import ml_collections
import numpy as np
import pytest

from mae_jax import parallel


def _mesh_config(**kw):
  config = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, num_devices=-1))
  config.update(kw)
  return config


def test_minus_one_takes_the_remaining_devices():
  assert parallel.resolve_mesh_shape(_mesh_config(fsdp=4), 8)['data'] == 2
  assert parallel.resolve_mesh_shape(_mesh_config(data=2, fsdp=-1), 8)['fsdp'] == 4
  mesh = parallel.create_mesh(_mesh_config(data=2, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}


@pytest.mark.parametrize('kw,match', [
    (dict(data=3), r'data\*fsdp\*tensor = 3 but there are 8 devices'),
    (dict(data=4, fsdp=4), 'is larger than the 8 devices'),
    (dict(data=-1, fsdp=-1), 'only one axis may be -1'),
    (dict(fsdp=3), 'do not divide the 8 devices'),
    (dict(data=0), 'mesh.data=0'),
])
def test_bad_meshes_name_the_setting(kw, match):
  with pytest.raises(ValueError, match=match):
    parallel.resolve_mesh_shape(_mesh_config(**kw), 8)



@pytest.mark.parametrize('kw,devices,message', [
    (dict(data=3), 1, 'mesh: data*fsdp*tensor = 3 is larger than the 1 device; lower mesh.data, or set mesh.data=-1'),
    (dict(data=4, fsdp=4), 8, 'mesh: data*fsdp*tensor = 16 is larger than the 8 devices; lower mesh.data or mesh.fsdp, '
                              'or set mesh.data=-1'),
    (dict(data=3), 8, 'mesh: data*fsdp*tensor = 3 but there are 8 devices; set mesh.data=-1 to use the rest, or change '
                      'mesh.data, mesh.fsdp or mesh.tensor'),
    (dict(data=3, dcn_data=2), 8, 'mesh: data*fsdp*tensor = 3 but there are 4 devices per slice (8 in all); set '
                                  'mesh.data=-1 to use the rest, or change mesh.data, mesh.fsdp or mesh.tensor'),
    (dict(fsdp=3), 8, 'mesh: the fixed axes fsdp=3, tensor=1 (product 3) do not divide the 8 devices; change '
                      'mesh.fsdp or mesh.tensor'),
    (dict(data=-1, fsdp=-1), 8, 'mesh: only one axis may be -1, got mesh.data=-1 and mesh.fsdp=-1'),
])
def test_bad_mesh_messages_read_as_text(kw, devices, message):
  """Axis names as mesh.NAME (not a tuple's repr), counts with their plural ('1 device')."""
  with pytest.raises(ValueError) as error:
    parallel.resolve_mesh_shape(_mesh_config(**kw), devices)
  assert str(error.value) == message


def test_too_few_devices_says_how_many_in_words():
  with pytest.raises(ValueError) as error:
    parallel.create_mesh(_mesh_config(num_devices=16), jax.devices()[:1])
  assert str(error.value) == 'mesh.num_devices=16 but only 1 device is visible'

def test_num_devices_subset():
  mesh = parallel.create_mesh(_mesh_config(num_devices=4, data=2, fsdp=2))
  assert mesh.devices.size == 4
  with pytest.raises(ValueError, match='mesh.num_devices=16'):
    parallel.create_mesh(_mesh_config(num_devices=16))


def test_multislice_dcn_data():
  sizes = parallel.resolve_mesh_shape(_mesh_config(dcn_data=2, fsdp=2), 8)
  assert sizes == {'data': 2, 'fsdp': 2, 'tensor': 1, 'dcn_data': 2}
  mesh = parallel.create_mesh(_mesh_config(dcn_data=2, fsdp=2))
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2, 'tensor': 1}


@pytest.mark.parametrize('kw,sizes', [
    (dict(data=-1), dict(data=8, fsdp=1, dcn_data=4)),  # A slice's devices; data-parallel over the slices.
    (dict(data=1, fsdp=-1), dict(data=1, fsdp=8, dcn_data=4)),
    (dict(data=32), dict(data=8, fsdp=1, dcn_data=4)),  # The job's sizes: the data axis spans the slices,
    (dict(data=4, fsdp=8), dict(data=1, fsdp=8, dcn_data=4)),
    (dict(data=2, fsdp=16), dict(data=2, fsdp=16, dcn_data=1)),  # or, where it cannot, one mesh of every device.
    (dict(data=1, fsdp=32), dict(data=1, fsdp=32, dcn_data=1)),
    (dict(data=2, fsdp=8, dcn_data=2), dict(data=2, fsdp=8, dcn_data=2)),  # dcn_data set: per group of 16.
])
def test_sizes_over_several_slices(kw, sizes):
  """32 devices in 4 slices (TPU slices, or the 4 hosts of a GPU job, which XLA numbers as slices)."""
  assert parallel.resolve_mesh_shape(_mesh_config(**kw), 32, num_slices=4) == {'tensor': 1, **sizes}


def test_partition_rules():
  mesh = parallel.create_mesh(_mesh_config(data=2, fsdp=2, tensor=2))
  spec = lambda name, shape, min_size=1: parallel.partition_spec(name, shape, mesh, min_fsdp_size=min_size)
  P = jax.sharding.PartitionSpec
  assert spec('params/encoder/blocks_0/attn/query/kernel', (64, 64)) == P('fsdp', 'tensor')
  assert spec('params/encoder/blocks_0/mlp/fc2/kernel', (256, 64)) == P('tensor', 'fsdp')
  assert spec('params/encoder/blocks_0/mlp/fc1/bias', (256,)) == P('tensor')
  # Scanned blocks: the leading [depth] axis is not sharded.
  assert spec('params/encoder/blocks/attn/query/kernel', (12, 64, 64)) == P(None, 'fsdp', 'tensor')
  # Generic FSDP: the largest divisible dimension.
  assert spec('params/decoder/pred/kernel', (64, 192)) == P(None, 'fsdp')
  assert spec('params/encoder/patch_embed/kernel', (8, 8, 3, 33)) == P('fsdp', None, None, None)
  # Small tensors stay replicated; so do dims that do not divide.
  assert spec('params/decoder/pred/kernel', (64, 192), min_size=10**6) == P(None, None)
  assert spec('params/encoder/blocks_0/attn/query/kernel', (63, 63)) == P(None, None)


def test_rules_from_config_validates():
  with pytest.raises(ValueError, match='unknown axes'):
    parallel.rules_from_config(ml_collections.ConfigDict({'rules': (('.*', ('model',)),)}))
  with pytest.raises(ValueError, match='does not compile'):
    parallel.rules_from_config(ml_collections.ConfigDict({'rules': (('(', 'fsdp'),)}))
  rules = parallel.rules_from_config(ml_collections.ConfigDict({'rules': (('.*', 'replicate'),)}))
  assert rules == (('.*', 'replicate'),)


def test_global_batch_from_local():
  mesh = parallel.create_mesh(_mesh_config(data=4, fsdp=2))
  local = {'image': np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  batch = parallel.global_batch_from_local(local, mesh)
  assert batch['image'].shape == (16, 3)
  assert len(batch['image'].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(batch['image']), local['image'])
