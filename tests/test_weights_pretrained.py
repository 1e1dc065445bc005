"""mae_jax.weights.pretrained: a downstream run's pretrained encoder, from a workdir or a file, merged."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mae_jax import checkpoint
from mae_jax.models import from_config
from mae_jax.models import pos_embed as pos_tables
from mae_jax.weights import export_weights, import_weights, layout, pretrained, to_reference_state_dict

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


# ----------------------------------------------------------------------------
# The learned position table of fine-tuning (pos_embed='learned').


def _learned_config(image_size=32, **keys):
  config = _config(**keys)
  config.pos_embed = 'learned'
  config.dataset.image_size = image_size
  return config


@pytest.fixture(scope='module')
def finetuned_pth(tmp_path_factory):
  """A reference-layout fine-tuned checkpoint (timm names, head, fc_norm) whose pos_embed is not sin-cos."""
  torch = pytest.importorskip('torch')
  abstract = layout.abstract_params(TEST_MODEL, 'classifier', {}, num_classes=10, pos_embed='learned')
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), abstract)
  state = to_reference_state_dict(params, TEST_MODEL)
  assert state['pos_embed'].shape == (1, 17, 32)
  np.testing.assert_array_equal(state['pos_embed'], params['encoder']['pos_embed'])
  path = str(tmp_path_factory.mktemp('ft') / 'checkpoint.pth')
  torch.save({'model': {k: torch.from_numpy(v) for k, v in state.items()}}, path)
  return path, params


def _reference_interpolate(table, new_size):
  """The reference's util/pos_embed.interpolate_pos_embed on a [1, 1 + n*n, D] table, in torch."""
  torch = pytest.importorskip('torch')
  table = torch.from_numpy(table)
  width, size = table.shape[-1], int((table.shape[-2] - 1) ** 0.5)
  tokens = table[:, 1:].reshape(-1, size, size, width).permute(0, 3, 1, 2)
  tokens = torch.nn.functional.interpolate(tokens, size=(new_size, new_size), mode='bicubic', align_corners=False)
  return torch.cat((table[:, :1], tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1).numpy()


def test_import_keeps_a_learned_table_and_drops_the_fixed_one(params, finetuned_pth, tmp_path):
  path, tuned = finetuned_pth
  imported = import_weights(path, TEST_MODEL)
  _assert_trees_equal(tuned, imported)  # encoder/pos_embed included, [1, 1 + L, D] as in the file.
  mae_file = export_weights(params, TEST_MODEL, 'safetensors', str(tmp_path / 'mae.safetensors'))
  assert 'pos_embed' not in import_weights(mae_file, TEST_MODEL)['encoder']  # The fixed table at this grid.
  # At another image size the file's (fixed, 4x4) table is not the model's: kept as stored, for the loader.
  other = import_weights(mae_file, TEST_MODEL, image_size=48)['encoder']['pos_embed']
  np.testing.assert_allclose(other[0], pos_tables.get_2d_sincos_pos_embed(32, 4, cls_token=True), atol=1e-6)


@pytest.mark.parametrize('image_size', [32, 48, 16])
def test_fine_tuning_starts_from_the_files_learned_table_interpolated_as_the_reference(finetuned_pth, image_size):
  path, tuned = finetuned_pth
  config = _learned_config(image_size, pretrained_path=path)
  encoder, source = pretrained.load_pretrained_encoder(config)
  grid = image_size // 8
  want = tuned['encoder']['pos_embed']
  if grid != 4:
    want = _reference_interpolate(want, grid)
  assert encoder['pos_embed'].shape == (1, 1 + grid * grid, 32)
  np.testing.assert_allclose(encoder['pos_embed'], want, atol=1e-5, rtol=0)
  # Merged into the classifier of that size: the model's table is the file's.
  model = from_config.build_classifier(ml_collections.ConfigDict(
      {**config.to_dict(), 'global_pool': True, 'head_init_std': 2e-5}), 10)
  target = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))
  merged = pretrained.merge_encoder(target['params'], encoder, source)
  np.testing.assert_array_equal(merged['encoder']['pos_embed'], encoder['pos_embed'])


@pytest.mark.parametrize('image_size', [32, 48])
def test_a_mae_checkpoint_gives_its_sincos_table_resized_to_the_run(workdir, params, image_size, tmp_path):
  """No trained table in a MAE checkpoint: the fixed table at its own grid (4x4), resized as the reference."""
  fixed = pos_tables.get_2d_sincos_pos_embed(32, 4, cls_token=True)[None]
  want = fixed if image_size == 32 else _reference_interpolate(fixed, image_size // 8)
  encoder, _ = pretrained.load_pretrained_encoder(_learned_config(image_size, pretrained_workdir=workdir))
  np.testing.assert_allclose(encoder['pos_embed'], want, atol=1e-5, rtol=0)
  path = export_weights(params, TEST_MODEL, 'safetensors', str(tmp_path / 'mae.safetensors'))
  encoder, _ = pretrained.load_pretrained_encoder(_learned_config(image_size, pretrained_path=path))
  np.testing.assert_allclose(encoder['pos_embed'], want, atol=1e-5, rtol=0)


def test_a_hugging_face_folder_with_learned_position_embeddings(params, finetuned_pth, tmp_path):
  _, tuned = finetuned_pth
  encoder = {**tuned['encoder'], 'norm': params['encoder']['norm']}  # ViTMAEModel has the final norm.
  folder = export_weights({'encoder': encoder}, TEST_MODEL, 'hf', str(tmp_path / 'hf'))
  encoder, _ = pretrained.load_pretrained_encoder(_learned_config(32, pretrained_path=folder))
  np.testing.assert_array_equal(encoder['pos_embed'], tuned['encoder']['pos_embed'])


def test_a_fixed_table_run_does_not_use_a_trained_table(finetuned_pth, caplog):
  path, _ = finetuned_pth
  config = _config(pretrained_path=path)  # No pos_embed key: the fixed table (linear probing, kNN).
  encoder, source = pretrained.load_pretrained_encoder(config)
  assert 'pos_embed' not in encoder
  assert 'pos_embed=\'sincos\' and uses the fixed sin-cos table' in caplog.text


def test_merge_into_a_learned_table_without_one_names_the_loader(params):
  target = layout.abstract_params(TEST_MODEL, 'encoder', {}, pos_embed='learned')
  with pytest.raises(ValueError, match=r'missing \(1\): pos_embed.*load_pretrained_encoder'):
    pretrained.merge_encoder(target, params['encoder'], 'the source')


def test_an_encoder_trained_with_another_number_of_heads_is_refused(params, tmp_path):
  """Shapes do not tell the heads: an encoder trained with 4 heads loads into a 2-head model and computes another
  attention. Its file's metadata (or a run's saved config) says how many it had: refused, naming the setting."""
  path = export_weights(params, TEST_MODEL, 'safetensors', str(tmp_path / 'heads4.safetensors'),
                        model_overrides={'num_heads': 4})
  with pytest.raises(ValueError, match=r'pretrained_path=.*heads4.safetensors: its encoder has 4 attention heads, '
                                       r'the model 2.*change model.name \(or model.num_heads\)'):
    pretrained.load_pretrained_encoder(_config(pretrained_path=path))
  config = _config(pretrained_path=path)
  config.model.num_heads = 4
  assert pretrained.load_pretrained_encoder(config)[0] is not None
  # A caller's override that contradicts the file's own.
  with pytest.raises(ValueError, match='its encoder has 4 attention heads, the model 2'):
    import_weights(path, TEST_MODEL, num_heads=2)
  # A run's workdir: its saved config says.
  workdir = str(tmp_path / 'run')
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  ckpt.save(1, params, {'count': np.zeros((), np.int32)},
            {'step': 1, 'config': {'model': {'name': TEST_MODEL, 'num_heads': 4}}})
  ckpt.close()
  with pytest.raises(ValueError, match=r'pretrained_workdir=.*: its encoder has 4 attention heads, the model 2'):
    pretrained.load_pretrained_encoder(_config(pretrained_workdir=workdir))


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_a_fixed_table_stored_at_16_bits_is_still_the_fixed_table(params, tmp_path, dtype):
  """A MAE checkpoint saved in bfloat16 or float16: its table is the fixed one rounded, not a trained table."""
  torch = pytest.importorskip('torch')
  state = to_reference_state_dict(params, TEST_MODEL)
  path = str(tmp_path / f'mae_{dtype}.pth')
  torch.save({'model': {k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in state.items()}}, path)
  assert 'pos_embed' not in import_weights(path, TEST_MODEL)['encoder']
  # A table trained in float32 that stays close to the fixed one is still a trained table.
  from mae_jax.weights import reference  # pylint: disable=g-import-not-at-top
  fixed = pos_tables.get_2d_sincos_pos_embed(32, 4, cls_token=True)[None].astype(np.float32)
  assert reference.is_fixed_table(fixed.astype(getattr(jnp, dtype)), 32, (4, 4))
  assert not reference.is_fixed_table(fixed + np.float32(3e-3), 32, (4, 4))
  assert not reference.is_fixed_table((fixed + np.float32(3e-2)).astype(getattr(jnp, dtype)), 32, (4, 4))
