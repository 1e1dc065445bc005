"""mae_jax.weights.pretrained: a downstream run's pretrained encoder, from a workdir or a file, merged."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mae_jax import checkpoint
from mae_jax.weights import export_weights, layout, pretrained

TEST_MODEL = 'mae_vit_test'  # 32x32 images, 8x8 patches, width 32, 2 + 1 blocks.


def _config(**pretrained_keys):
  """The keys load_pretrained_encoder reads, as every downstream config declares them."""
  config = ml_collections.ConfigDict({
      'model': {'name': TEST_MODEL, 'scan_layers': False},
      'dataset': {'image_size': 32, 'channels': 3},
      'pretrained_workdir': '', 'pretrained_path': '', 'pretrained_step': -1,
  })
  config.update(pretrained_keys)
  return config


@pytest.fixture(scope='module')
def params():
  """Random unscanned MAE params of TEST_MODEL (no init: eager init is slow on CPU)."""
  abstract = layout.abstract_params(TEST_MODEL, 'mae', {})
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), abstract)


@pytest.fixture(scope='module')
def workdir(params, tmp_path_factory):
  """A run's checkpoints at steps 3 and 7; step 7 holds params + 1."""
  workdir = str(tmp_path_factory.mktemp('run'))
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  for step, delta in ((3, 0.0), (7, 1.0)):
    ckpt.save(step, jax.tree.map(lambda x, d=delta: x + d, params), {'count': np.zeros((), np.int32)},
              {'step': step, 'config': {'model': {'name': TEST_MODEL}}})
  ckpt.close()
  return workdir


def _assert_trees_equal(expected, actual):
  assert jax.tree.structure(expected) == jax.tree.structure(actual)
  for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_no_pretrained_source_gives_none():
  assert pretrained.load_pretrained_encoder(_config()) == (None, '')


def test_both_sources_set_is_an_error():
  with pytest.raises(ValueError, match='pretrained_workdir and pretrained_path are both set'):
    pretrained.load_pretrained_encoder(_config(pretrained_workdir='a', pretrained_path='b'))


def test_workdir_encoder_at_the_newest_or_a_given_step(params, workdir):
  encoder, source = pretrained.load_pretrained_encoder(_config(pretrained_workdir=workdir))
  assert source == f'{workdir} step 7'
  _assert_trees_equal(jax.tree.map(lambda x: x + 1.0, params['encoder']), encoder)
  encoder, source = pretrained.load_pretrained_encoder(_config(pretrained_workdir=workdir, pretrained_step=3))
  assert source == f'{workdir} step 3'
  _assert_trees_equal(params['encoder'], encoder)


def test_file_encoder_takes_the_configs_block_layout(params, tmp_path):
  path = export_weights(params, TEST_MODEL, 'orbax', str(tmp_path / 'enc'))
  config = _config(pretrained_path=path)
  encoder, source = pretrained.load_pretrained_encoder(config)
  assert source == path and 'blocks_1' in encoder
  _assert_trees_equal(params['encoder'], encoder)
  config.model.scan_layers = True
  encoder, _ = pretrained.load_pretrained_encoder(config)
  assert encoder['blocks']['norm1']['scale'].shape == (2, 32)
  _assert_trees_equal(layout.stack_blocks(params)['encoder'], encoder)


def test_file_that_does_not_fit_the_config_names_the_file(params, tmp_path):
  path = export_weights(params, TEST_MODEL, 'orbax', str(tmp_path / 'enc'))
  config = _config(pretrained_path=path)
  config.dataset.channels = 1
  with pytest.raises(ValueError, match=r'enc does not match mae_vit_test[\s\S]*patch_embed/kernel'):
    pretrained.load_pretrained_encoder(config)


def test_merge_replaces_the_encoder_casts_and_drops_a_spare_norm(params):
  # An abstract bfloat16 encoder without the final norm (global pooling) beside a concrete head.
  encoder = {k: v for k, v in params['encoder'].items() if k != 'norm'}
  target = {'encoder': jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), encoder),
            'head': {'kernel': np.zeros((32, 10), np.float32)}}
  merged = pretrained.merge_encoder(target, params['encoder'], 'the source')
  assert 'norm' not in merged['encoder']
  assert merged['head']['kernel'] is target['head']['kernel']
  for leaf in jax.tree.leaves(merged['encoder']):
    assert isinstance(leaf, np.ndarray) and leaf.dtype == jnp.bfloat16
  np.testing.assert_array_equal(merged['encoder']['cls_token'],
                                params['encoder']['cls_token'].astype(jnp.bfloat16))


def test_merge_of_an_encoder_that_does_not_fit_is_one_clear_error(params):
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {'encoder': params['encoder']})
  encoder = dict(params['encoder'], cls_token=np.zeros((1, 1, 64), np.float32))
  del encoder['blocks_1']
  with pytest.raises(ValueError, match=r'from the source does not fit model.name / dataset.image_size'
                                       r'.*missing \(\d+\): blocks_1/.*shape mismatches \(1\): cls_token'):
    pretrained.merge_encoder(target, encoder, 'the source')
