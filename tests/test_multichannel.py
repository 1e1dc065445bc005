"""Data beyond 8-bit RGB: a 4-channel uint16 data set of 48x32 images, end to end.

prepare (stored losslessly, per-channel statistics in the metadata) ->
pretraining with dataset.mean / std = () -> export and reimport -> a
reconstruction grid through a chosen band triple.
"""

import os

import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
from mae_jax import checkpoint, export, train, visualize, weights
from mae_jax.data import arrays, input_pipeline, sources

HEIGHT, WIDTH, CHANNELS = 48, 32, 4
NUM_IMAGES = 16
BAND_SCALES = np.array([900.0, 12000.0, 30000.0, 65535.0])  # Very different ranges per band.


def _images():
  rng = np.random.default_rng(0)
  rows = np.linspace(0, 1, HEIGHT)[:, None, None]
  cols = np.linspace(0, 1, WIDTH)[None, :, None]
  out = []
  for _ in range(NUM_IMAGES):
    smooth = 0.5 + 0.3 * np.sin(6 * rows * rng.uniform(0.5, 2) + 4 * cols * rng.uniform(0.5, 2)
                                + rng.uniform(0, 6, CHANNELS))
    noisy = np.clip(smooth + 0.1 * rng.standard_normal((HEIGHT, WIDTH, CHANNELS)), 0, 1)
    out.append(np.round(noisy * BAND_SCALES).astype(np.uint16))
  return out


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('bands')
  images = _images()
  for i, image in enumerate(images):
    np.save(root / f'tile_{i:02d}.npy', image)
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  out_dir = arrays.prepare_arrays(str(root), data_dir, name='bands', image_size='48,32', progress=False)
  return data_dir, out_dir, images, root


def _dataset(data_dir):
  return dict(name='bands', data_dir=data_dir, image_size=(HEIGHT, WIDTH), channels=CHANNELS, mean=(), std=(),
              train_split='train', eval_split='train', shuffle_buffer=4)


def test_prepared_arrays_are_lossless_and_stats_equal_numpy(prepared):
  data_dir, _, images, _ = prepared
  builder = sources.get_builder(_dataset(data_dir))
  assert sources.stored_image(builder) == ((HEIGHT, WIDTH, CHANNELS), np.dtype(np.uint16))
  stored = {ex['file_name'].decode(): ex['image'] for ex in builder.as_dataset(split='train').as_numpy_iterator()}
  assert len(stored) == NUM_IMAGES
  for i, image in enumerate(images):
    np.testing.assert_array_equal(stored[f'tile_{i:02d}.npy'], image)  # Bit-exact uint16.
  pixels = np.stack(images).reshape(-1, CHANNELS) / 65535.0
  stats = sources.channel_stats(builder)
  np.testing.assert_allclose(stats['mean'], pixels.mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats['std'], pixels.std(0), rtol=1e-10)
  assert stats['dtype'] == 'uint16' and stats['num_pixels'] == NUM_IMAGES * HEIGHT * WIDTH
  # The pipeline normalises with them: every band comes out about zero-mean, unit-std.
  batch = next(input_pipeline.create_eval_iterator(_dataset(data_dir), split='train', batch_size=NUM_IMAGES,
                                                   process_index=0, process_count=1))
  assert batch['image'].shape == (NUM_IMAGES, HEIGHT, WIDTH, CHANNELS)
  np.testing.assert_allclose(batch['image'].mean((0, 1, 2)), 0, atol=0.05)
  np.testing.assert_allclose(batch['image'].std((0, 1, 2)), 1, atol=0.05)


def test_a_wrong_channel_count_names_the_file_and_the_setting(prepared, tmp_path):
  _, _, images, root = prepared
  bad = tmp_path / 'bad'
  bad.mkdir()
  np.save(bad / 'a.npy', images[0])
  np.save(bad / 'b.npy', images[1][..., :3])
  with pytest.raises(arrays.PrepareError, match=r'b\.npy: 3 channels.*config\.dataset\.channels'):
    arrays.prepare_arrays(str(bad), str(tmp_path / 'tfds'), name='bad', progress=False)
  with pytest.raises(ValueError, match=r'config\.dataset\.channels=3.*4-channel uint16'):
    input_pipeline.create_eval_iterator({**_dataset(prepared[0]), 'channels': 3}, split='train',
                                        batch_size=4, process_index=0, process_count=1)


@pytest.fixture(scope='module')
def workdir(prepared, tmp_path_factory):
  data_dir = prepared[0]
  config = test_config.get_config('steps=2')
  config.dataset.update(_dataset(data_dir))
  config.dataset.display_bands = (3, 2, 1)
  config.batch_size = 8
  workdir = str(tmp_path_factory.mktemp('run'))
  result = train.train_and_evaluate(config, workdir)
  assert result['status'] == 'done' and np.isfinite(result['train/loss'])
  return workdir


def test_pretrains_exports_and_reimports(prepared, workdir, tmp_path):
  params, run_config = checkpoint.load_params(workdir)
  assert params['encoder']['patch_embed']['kernel'].shape[:3] == (8, 8, CHANNELS)
  # The run recorded the statistics it normalised with, so exports carry them.
  stats = sources.channel_stats(sources.get_builder(_dataset(prepared[0])))
  np.testing.assert_allclose(run_config['dataset']['mean'], stats['mean'])
  out = export.export_from_workdir(workdir, 'safetensors', str(tmp_path / 'bands.safetensors'), full=True)
  meta = weights.read_metadata(out)
  assert tuple(meta['image_size']) == (HEIGHT, WIDTH) and meta['in_channels'] == CHANNELS
  restored = weights.import_weights(out)
  flat = lambda tree: {k: np.asarray(v) for k, v in _flatten(tree)}
  expected, got = flat(params), flat(restored)
  assert expected.keys() == got.keys()
  for key, value in expected.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_visualises_the_chosen_band_triple(prepared, workdir, tmp_path):
  png = visualize.visualize_checkpoint(workdir, str(tmp_path / 'grid.png'), num_images=2, bands='3,2,1')
  grid = np.asarray(Image.open(png))
  scale = 112 // WIDTH
  titles = grid.shape[0] - 2 * HEIGHT * scale  # A white strip naming the columns, then the grid.
  assert 14 <= titles <= 28 and grid.shape[1:] == (4 * WIDTH * scale, 3) and grid[:titles].mean() > 200
  grid = grid[titles:]
  # Column 0 shows bands 3, 2, 1 of the first eval image as red, green, blue, over the uint16 range.
  stats = sources.channel_stats(sources.get_builder(_dataset(prepared[0])))
  run_config = checkpoint.load_params(workdir)[1]
  first = visualize.eval_images(_as_config(run_config), 1)[0]
  shown = first[..., [3, 2, 1]] * np.array(stats['std'])[[3, 2, 1]] + np.array(stats['mean'])[[3, 2, 1]]
  np.testing.assert_allclose(grid[:HEIGHT * scale:scale, :WIDTH * scale:scale] / 255.0, np.clip(shown, 0, 1),
                             atol=1 / 255 + 1e-6)
  with pytest.raises(ValueError, match=r'bands.*\[0, 4\)'):
    visualize.visualize_checkpoint(workdir, str(tmp_path / 'no.png'), num_images=2, bands='4,2,1')
  # Exported weights with an array file: the band triple from the run's config.display_bands.
  out = export.export_from_workdir(workdir, 'safetensors', str(tmp_path / 'full.safetensors'), full=True)
  tile = str(prepared[3] / 'tile_00.npy')
  png = visualize.visualize_weights(out, [tile], str(tmp_path / 'weights.png'))
  assert np.asarray(Image.open(png)).shape == (HEIGHT * scale + titles, 4 * WIDTH * scale, 3)


def _flatten(tree, prefix=''):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f'{prefix}{key}/')
    else:
      yield f'{prefix}{key}', value


def _as_config(config_dict):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(config_dict)


def test_float_arrays_from_tiff_pages_keep_their_values(tmp_path):
  root = tmp_path / 'tiffs'
  root.mkdir()
  rng = np.random.default_rng(1)
  pages = [rng.normal(loc, 3.0, (20, 12)).astype(np.float32) for loc in (-5.0, 0.0, 100.0)]
  Image.fromarray(pages[0]).save(root / 'x.tif', save_all=True,
                                 append_images=[Image.fromarray(p) for p in pages[1:]])
  out_dir = arrays.prepare_arrays(str(root), str(tmp_path / 'tfds'), name='floats', progress=False)
  builder = sources.get_builder({'name': out_dir, 'channels': 3})
  (example,) = list(builder.as_dataset(split='train').as_numpy_iterator())
  np.testing.assert_array_equal(example['image'], np.stack(pages, -1))
  stats = sources.channel_stats(builder)
  np.testing.assert_allclose(stats['mean'], [p.mean(dtype=np.float64) for p in pages], rtol=1e-9)
  assert stats['units'] == 'stored float units'
  assert os.path.basename(out_dir) == arrays.VERSION


@pytest.mark.parametrize('cache', [False, True])
def test_arrays_of_varying_sizes_train_and_evaluate(tmp_path, cache):
  """prepare without --image_size keeps each array's size; training crops and evaluation resizes them."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from mae_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 65535, (20 + i, 24 + 3 * i, CHANNELS), dtype=np.uint16) for i in range(6)]
  root = tmp_path / 'tiles'
  root.mkdir()
  for i, image in enumerate(images):
    np.save(root / f'tile_{i}.npy', image)
  data_dir = str(tmp_path / 'tfds')
  arrays.prepare_arrays(str(root), data_dir, name='tiles', progress=False)
  dataset = dict(name='tiles', data_dir=data_dir, image_size=16, channels=CHANNELS, mean=(), std=(),
                 train_split='train', eval_split='train', shuffle_buffer=4, cache=cache)
  train = input_pipeline.create_pretrain_iterator(dataset, global_batch_size=3, seed=0, process_index=0,
                                                  process_count=1)
  for _ in range(4):  # Two epochs.
    batch = next(train)
    assert batch['image'].shape == (3, 16, 16, CHANNELS) and not batch['corrupt'].any()
  evals = list(input_pipeline.create_eval_iterator(dataset, split='train', batch_size=3, process_index=0,
                                                   process_count=1))
  got = np.concatenate([b['image'] for b in evals])
  assert got.shape == (6, 16, 16, CHANNELS) and not any(b['corrupt'].any() for b in evals)
  config = sources.resolve_stats(sources.DatasetConfig.from_config(dataset), sources.get_builder(dataset))
  eval_fn = preprocess.make_eval_preprocess_fn(config)
  want = np.stack([eval_fn(tf.constant(image)).numpy() for image in images])
  distances = np.abs(got[:, None] - want[None]).max(axis=(2, 3, 4))  # Each read image is one of the arrays.
  assert sorted(distances.argmin(axis=1)) == list(range(6)) and distances.min(axis=1).max() < 1e-5


def test_nan_pixels_are_refused_unreadable_files_skipped_and_split_folders_kept(tmp_path, capsys):
  rng = np.random.default_rng(1)
  tiles = tmp_path / 'tiles'
  for split, count in (('train', 4), ('val', 2)):
    (tiles / split).mkdir(parents=True)
    for i in range(count):
      np.save(tiles / split / f'{i}.npy', rng.uniform(0, 2, (6, 5, 2)).astype(np.float32))
  (tiles / 'train' / 'cut.npy').write_bytes(open(tiles / 'train' / '0.npy', 'rb').read()[:100])  # Cut short.
  data_dir = str(tmp_path / 'tfds')
  out_dir = arrays.prepare_arrays(str(tiles), data_dir, name='tiles', progress=False)
  output = capsys.readouterr().out
  assert 'Skipped 1 unreadable array files' in output and 'train/cut.npy' in output
  builder = sources.get_builder({'name': 'tiles', 'data_dir': data_dir})
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {'train': 4, 'val': 2}
  stats = sources.channel_stats(builder)
  train = np.stack([np.load(tiles / 'train' / f'{i}.npy') for i in range(4)]).reshape(-1, 2)
  np.testing.assert_allclose(stats['mean'], train.mean(0), rtol=1e-6)  # Over the train split only.
  assert stats['split'] == 'train'
  with open(os.path.join(out_dir, 'skipped_files.txt')) as f:
    assert f.read().startswith('train/cut.npy\t')

  # A split none of whose files reads: refused, naming it (its statistics would cover no image).
  broken = tmp_path / 'broken'
  for split in ('train', 'val'):
    (broken / split).mkdir(parents=True)
  np.save(broken / 'val' / 'ok.npy', np.zeros((4, 4, 2), np.float32))
  (broken / 'train' / 'cut.npy').write_bytes(b'\x93NUMPY')
  with pytest.raises(arrays.PrepareError, match=r'none of the 1 array files of split train could be read'):
    arrays.prepare_arrays(str(broken), data_dir, name='broken', progress=False)

  nan = np.load(tiles / 'val' / '1.npy')
  nan[2, 3, 1] = np.nan
  np.save(tiles / 'val' / '1.npy', nan)
  with pytest.raises(arrays.PrepareError, match=r'val/1\.npy: 1 of its 60 values are NaN or infinite.*nan_to_num'):
    arrays.prepare_arrays(str(tiles), data_dir, name='tiles_nan', progress=False)
  # Statistics that are not finite (a data set prepared before the check) are refused where they are read.
  metadata = os.path.join(out_dir, sources.METADATA_FILENAME)
  with open(metadata) as f:
    text = f.read()
  with open(metadata, 'w') as f:
    f.write(text.replace(f'"mean": [{stats["mean"][0]!r}', '"mean": [NaN'))
  with pytest.raises(ValueError, match=r'stores channel statistics that are not finite'):
    sources.resolve_stats(sources.DatasetConfig.from_config(
        {'name': 'tiles', 'data_dir': data_dir, 'channels': 2, 'mean': (), 'std': ()}))
