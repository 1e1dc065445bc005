"""Tests of mae_jax.data.input_pipeline on prepared folders and mocked TFDS.

Most tests use a prepared folder of tiny single-colour images whose grey
level encodes the image's index, so an example can be identified after any
crop, resize and flip: its pixels all equal that level. Others write TFRecord
shards directly: many shards whose labels number the examples (order
tests), and coded images some of which are garbage (corrupt-image tests).
"""

import io
import itertools
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from mae_jax.data import corrupt, input_pipeline, prepare, sources

tf.config.set_visible_devices([], 'GPU')

NUM_IMAGES = 48
CLASSES = ('ant', 'bee', 'cat')


def _level(index):
  return 10 + 5 * index


def _write_coded_images(root):
  """NUM_IMAGES images of varied size and format, plus one corrupt file."""
  for i in range(NUM_IMAGES):
    folder = os.path.join(root, CLASSES[i % 3], 'sub' if i % 2 else '')
    os.makedirs(folder, exist_ok=True)
    size = (12 + i % 7, 10 + i % 5)  # (width, height)
    value = _level(i)
    kind = i % 4
    if kind == 0:
      Image.new('RGB', size, (value,) * 3).save(f'{folder}/{i}.png')
    elif kind == 1:
      Image.new('L', size, value).save(f'{folder}/{i}.png')
    elif kind == 2:
      Image.new('RGBA', size, (value,) * 3 + (255,)).save(f'{folder}/{i}.png')
    else:
      Image.new('RGB', size, (value,) * 3).save(f'{folder}/{i}.jpg',
                                                quality=95)
  with open(os.path.join(root, 'ant', 'broken.jpg'), 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 not really a jpeg')


@pytest.fixture(scope='module')
def coded(tmp_path_factory):
  """config.dataset of the prepared coded folder."""
  root = str(tmp_path_factory.mktemp('coded_images'))
  _write_coded_images(root)
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  prepare.prepare_folder(root, data_dir, name='coded', progress=False)
  return {'name': 'coded', 'data_dir': data_dir, 'train_split': 'train',
          'eval_split': 'train[:45]', 'image_size': 8, 'channels': 3,
          'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25),
          'shuffle_buffer': 16, 'eval_resize': 256}


def _ids(batch):
  """Image indices of a batch of coded images (checks they are uniform)."""
  levels = (batch['image'] * 0.25 + 0.5) * 255  # [B, H, W, C]
  flat = levels.reshape(len(levels), -1)
  assert np.abs(flat - flat.mean(axis=1, keepdims=True)).max() <= 2
  return np.round((flat.mean(axis=1) - 10) / 5).astype(int)


def _take(iterator, count):
  return list(itertools.islice(iterator, count))


def test_dataset_info_and_num_examples(coded):
  info = input_pipeline.dataset_info(coded)
  assert info['num_train_examples'] == NUM_IMAGES  # The corrupt file is out.
  assert info['num_eval_examples'] == 45
  assert info['class_names'] == list(CLASSES)
  assert info['num_classes'] == 3 and info['has_labels']
  assert input_pipeline.num_examples(coded, 'train[:10]') == 10


def test_train_batches_shapes_dtypes_labels(coded):
  iterator = input_pipeline.create_pretrain_iterator(
      coded, global_batch_size=8, seed=0, process_index=0, process_count=1)
  for batch in _take(iterator, 3):
    assert set(batch) == {'image', 'label', 'corrupt'}
    assert batch['image'].shape == (8, 8, 8, 3)
    assert batch['corrupt'].dtype == bool and not batch['corrupt'].any()
    assert batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32
    ids = _ids(batch)
    assert ((ids >= 0) & (ids < NUM_IMAGES)).all()
    np.testing.assert_array_equal(batch['label'], ids % 3)


def test_default_process_arguments_come_from_jax(coded):
  batch = next(input_pipeline.create_pretrain_iterator(
      coded, global_batch_size=4, seed=0))
  assert batch['image'].shape == (4, 8, 8, 3)


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_read_disjoint_parts_that_cover_the_split(coded,
                                                            process_count):
  local = 8 // process_count
  steps = NUM_IMAGES // 8  # One epoch.
  seen = []
  for index in range(process_count):
    iterator = input_pipeline.create_pretrain_iterator(
        coded, global_batch_size=8, seed=3, process_index=index,
        process_count=process_count)
    ids = np.concatenate([_ids(b) for b in _take(iterator, steps)])
    assert len(ids) == steps * local
    assert len(set(ids)) == len(ids)  # An epoch visits each example once.
    seen.append(set(ids))
  assert set.union(*seen) == set(range(NUM_IMAGES))
  assert sum(len(s) for s in seen) == NUM_IMAGES


@pytest.mark.parametrize('process_index,process_count,start_step',
                         [(0, 1, 7), (1, 2, 5), (0, 1, 13)])
def test_resume_yields_exactly_the_uninterrupted_batches(
    coded, process_index, process_count, start_step):
  kwargs = {'global_batch_size': 10, 'seed': 5,
            'process_index': process_index, 'process_count': process_count}
  # 5 or 10 examples per step over 24 or 48 per epoch: steps cross epochs.
  full = _take(input_pipeline.create_pretrain_iterator(coded, **kwargs),
               start_step + 4)
  resumed = _take(input_pipeline.create_pretrain_iterator(
      coded, start_step=start_step, **kwargs), 4)
  for expected, actual in zip(full[start_step:], resumed):
    np.testing.assert_array_equal(expected['image'], actual['image'])
    np.testing.assert_array_equal(expected['label'], actual['label'])


def test_order_depends_on_seed_and_epoch_only(coded):
  def epochs(seed, count=4, **overrides):
    iterator = input_pipeline.create_pretrain_iterator(
        {**coded, **overrides}, global_batch_size=NUM_IMAGES, seed=seed,
        process_index=0, process_count=1)
    return [_ids(b) for b in _take(iterator, count)]

  first = epochs(0)
  for ids in first:  # Each epoch is a permutation of the whole split.
    assert sorted(ids) == list(range(NUM_IMAGES))
  assert len({tuple(ids) for ids in first}) == 4
  # Block boundaries move: the first 16 examples are not always the same set.
  assert len({frozenset(ids[:16]) for ids in first}) > 1
  for a, b in zip(first, epochs(0)):
    np.testing.assert_array_equal(a, b)
  assert any((a != b).any() for a, b in zip(first, epochs(1)))
  # A buffer as large as the split: every epoch is one random permutation.
  full = epochs(0, shuffle_buffer=1000)
  assert len({frozenset(ids[:16]) for ids in full}) == 4


def test_every_example_position_gets_its_own_augmentation_seed(coded):
  iterator = input_pipeline.create_pretrain_iterator(
      coded, global_batch_size=NUM_IMAGES, seed=0, process_index=0,
      process_count=1,
      preprocess_fn=lambda image, seed: tf.cast(seed, tf.float64)[None, None])
  a, b = _take(iterator, 2)
  assert a['image'].shape == (NUM_IMAGES, 1, 1, 2)
  seeds_a = {tuple(x) for x in a['image'].reshape(-1, 2)}
  seeds_b = {tuple(x) for x in b['image'].reshape(-1, 2)}
  assert len(seeds_a) == len(seeds_b) == NUM_IMAGES
  assert not seeds_a & seeds_b


def test_cache_yields_the_same_batches(coded):
  kwargs = {'global_batch_size': 8, 'seed': 1, 'process_index': 0,
            'process_count': 1}
  plain = _take(input_pipeline.create_pretrain_iterator(coded, **kwargs), 8)
  cached = _take(input_pipeline.create_pretrain_iterator(
      {**coded, 'cache': True}, **kwargs), 8)
  for a, b in zip(plain, cached):
    np.testing.assert_array_equal(a['image'], b['image'])


@pytest.mark.parametrize('process_count', [1, 2, 4])
def test_eval_yields_every_example_once_with_padding(coded, process_count):
  counts, ids, lengths = [], [], set()
  for index in range(process_count):
    batches = list(input_pipeline.create_eval_iterator(
        coded, split='train[:45]', batch_size=8, process_index=index,
        process_count=process_count))
    lengths.add(len(batches))
    for batch in batches:
      assert batch['image'].shape == (8 // process_count, 8, 8, 3)
      assert batch['mask'].dtype == bool
      real = batch['mask']
      counts.append(real.sum())
      if real.any():
        real_ids = _ids({'image': batch['image'][real]})
        np.testing.assert_array_equal(batch['label'][real], real_ids % 3)
        ids.extend(real_ids)
      assert (batch['label'][~real] == -1).all()
      assert (batch['image'][~real] == 0).all()
  assert len(lengths) == 1  # Every process yields the same number of batches.
  assert sum(counts) == len(set(ids)) == 45  # Each example exactly once.
  assert set(ids) <= set(range(NUM_IMAGES))


def _write_mock_metadata(root, name, split_sizes):
  """Metadata of a catalog data set, for tfds.testing.mock_data(data_dir=)."""
  builder = tfds.builder(name)
  directory = os.path.join(root, name, str(builder.version))
  os.makedirs(directory)
  split_infos = []
  for split, size in split_sizes.items():
    open(os.path.join(
        directory, f'{name}-{split}.tfrecord-00000-of-00001'), 'wb').close()
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[size],
                                           num_bytes=0))
  tfds.folder_dataset.write_metadata(
      data_dir=directory, features=builder.info.features,
      split_infos=split_infos, check_data=False)
  return root


@pytest.fixture(scope='module')
def mock_metadata(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('mock_metadata'))
  for name in ('fashion_mnist', 'cifar10'):
    _write_mock_metadata(root, name, {'train': 20, 'test': 20})
  return root


@pytest.mark.parametrize('name,channels,size', [
    ('fashion_mnist', 1, 28), ('fashion_mnist', 3, 16), ('cifar10', 3, 32),
    ('cifar10', 1, 24)])
def test_mocked_catalog_data_sets(mock_metadata, name, channels, size):
  config = {'name': name, 'data_dir': mock_metadata, 'image_size': size,
            'channels': channels, 'mean': (0.5,) * channels,
            'std': (0.5,) * channels}
  with tfds.testing.mock_data(num_examples=20, data_dir=mock_metadata,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    info = input_pipeline.dataset_info(config)
    assert info['num_classes'] == 10 and len(info['class_names']) == 10
    batches = _take(input_pipeline.create_pretrain_iterator(
        config, global_batch_size=8, seed=0, process_index=0,
        process_count=1), 6)  # Crosses epochs of 20.
    evals = list(input_pipeline.create_eval_iterator(
        config, split='test', batch_size=8, process_index=0, process_count=1))
  with tfds.testing.mock_data(num_examples=20, data_dir=mock_metadata,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    builder = sources.get_builder(sources.DatasetConfig.from_config(config))
    names = [e['record'].decode() for e in sources.read_records(builder, 'test').as_numpy_iterator()]
  # Warnings name an example so ('record INDEX of FILE' from TFDS's ids).
  assert names == [f'record {i} of {name}-test.tfrecord-00000-of-00001' for i in range(20)]
  for batch in batches:
    assert batch['image'].shape == (8, size, size, channels)
    assert batch['image'].dtype == np.float32
    assert batch['image'].min() >= -1 - 1e-5
    assert batch['image'].max() <= 1 + 1e-5
    assert ((batch['label'] >= 0) & (batch['label'] < 10)).all()
  assert len(evals) == 3
  assert [b['mask'].sum() for b in evals] == [8, 8, 4]


def test_mocked_cache_of_decoded_images_yields_the_same_batches(
    mock_metadata):
  config = {'name': 'fashion_mnist', 'data_dir': mock_metadata,
            'image_size': 28, 'channels': 1, 'mean': (0.3,), 'std': (0.3,)}
  kwargs = {'global_batch_size': 8, 'seed': 2, 'process_index': 0,
            'process_count': 1}
  with tfds.testing.mock_data(num_examples=20, data_dir=mock_metadata,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    plain = _take(input_pipeline.create_pretrain_iterator(config, **kwargs), 6)
    cached = _take(input_pipeline.create_pretrain_iterator(
        {**config, 'cache': True}, **kwargs), 6)
  for a, b in zip(plain, cached):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_missing_data_dir_is_one_clear_error(tmp_path):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(sources.DatasetNotFoundError) as error:
    input_pipeline.create_pretrain_iterator(
        {'name': 'fashion_mnist', 'data_dir': missing}, global_batch_size=8,
        seed=0, process_index=0, process_count=1)
  message = str(error.value)
  assert missing in message
  assert ('python -m mae_jax.data.prepare --source=fashion_mnist '
          f'--data_dir={missing}') in message


def test_unprepared_data_sets_are_one_clear_error(tmp_path):
  with pytest.raises(sources.DatasetNotFoundError) as error:
    input_pipeline.num_examples(
        {'name': 'fashion_mnist', 'data_dir': str(tmp_path)}, 'train')
  assert '--source=fashion_mnist' in str(error.value)
  assert str(tmp_path) in str(error.value)
  with pytest.raises(sources.DatasetNotFoundError) as error:
    input_pipeline.create_eval_iterator(
        {'name': 'my_photos', 'data_dir': str(tmp_path)}, split='train',
        batch_size=8, process_index=0, process_count=1)
  assert "'my_photos'" in str(error.value)
  assert '--source=folder:' in str(error.value)
  assert '--name=my_photos' in str(error.value)


def test_configuration_errors_name_the_setting(coded):
  with pytest.raises(ValueError, match='global_batch_size=7'):
    input_pipeline.create_pretrain_iterator(
        coded, global_batch_size=7, seed=0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match='batch_size=6'):
    input_pipeline.create_eval_iterator(
        coded, split='train', batch_size=6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match='train_split'):
    input_pipeline.create_pretrain_iterator(
        {**coded, 'train_split': 'validation'}, global_batch_size=8, seed=0,
        process_index=0, process_count=1)
  with pytest.raises(ValueError, match='config.dataset.mean'):
    input_pipeline.num_examples({**coded, 'mean': (0.5,)}, 'train')
  with pytest.raises(ValueError, match='process_index=2'):
    input_pipeline.create_pretrain_iterator(
        coded, global_batch_size=8, seed=0, process_index=2, process_count=2)


# ----------------------------------------------------------------------------
# Data sets written record by record: shard layout and image bytes chosen.

def _png(level, size=(6, 6)):
  buffer = io.BytesIO()
  Image.new('RGB', size, (level,) * 3).save(buffer, 'PNG')
  return buffer.getvalue()


def _write_records(data_dir, name, images, shard_sizes, image_shape):
  """A TFDS data set of encoded `images` labelled 0, 1, ... in shards."""
  assert sum(shard_sizes) == len(images)
  directory = os.path.join(data_dir, name, '1.0.0')
  os.makedirs(directory)
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=image_shape),
      'label': tfds.features.ClassLabel(num_classes=len(images))})
  index = 0
  for shard, size in enumerate(shard_sizes):
    path = os.path.join(directory, f'{name}-train.tfrecord-{shard:05d}-of-'
                        f'{len(shard_sizes):05d}')
    with tf.io.TFRecordWriter(path) as writer:
      for _ in range(size):
        example = tf.train.Example(features=tf.train.Features(feature={
            'image': tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[images[index]])),
            'label': tf.train.Feature(
                int64_list=tf.train.Int64List(value=[index]))}))
        writer.write(example.SerializeToString())
        index += 1
  tfds.folder_dataset.write_metadata(
      data_dir=directory, features=features, check_data=False,
      split_infos=[tfds.core.SplitInfo(name='train',
                                       shard_lengths=list(shard_sizes),
                                       num_bytes=0)])


MANY = 800  # Examples of the 'many' data set: 32 shards of 25.


@pytest.fixture(scope='module')
def many(tmp_path_factory):
  """config.dataset of 'many': labels number the examples, images tiny."""
  data_dir = str(tmp_path_factory.mktemp('many'))
  _write_records(data_dir, 'many', [_png(0, (2, 2))] * MANY, [25] * 32,
                 (None, None, 3))
  return {'name': 'many', 'data_dir': data_dir, 'image_size': 2,
          'channels': 3, 'mean': (0.5,) * 3, 'std': (0.5,) * 3}


def _labels(config, steps, batch=80, process_index=0, process_count=1,
            start_step=0):
  """Labels (= example numbers) of `steps` batches, concatenated."""
  iterator = input_pipeline.create_pretrain_iterator(
      config, global_batch_size=batch, seed=0, start_step=start_step,
      process_index=process_index, process_count=process_count,
      preprocess_fn=lambda image, seed: tf.zeros([1], tf.float32))
  return np.concatenate([b['label'] for b in _take(iterator, steps)])


def _label_epochs(config, epochs):
  """Labels of the first `epochs` epochs (batches of 80), one per row."""
  return _labels(config, epochs * MANY // 80).reshape(epochs, MANY)


def _position_correlation(first, second):
  """Correlation of each example's positions in two epochs."""
  where_first = np.argsort(first)
  where_second = np.argsort(second)
  return np.corrcoef(where_first, where_second)[0, 1]


@pytest.mark.parametrize('shuffle_buffer', [5, 50])
def test_examples_change_places_from_epoch_to_epoch(many, shuffle_buffer):
  # Blocks of 5 or 50 records in a split of 800: the order of the pieces
  # (5-record runs of the 25-record files, or whole files read two at a
  # time) changes every epoch, so positions do not carry over.
  epochs = _label_epochs({**many, 'shuffle_buffer': shuffle_buffer}, 3)
  for labels in epochs:  # Every epoch reads every record once.
    np.testing.assert_array_equal(np.sort(labels), np.arange(MANY))
  # 160 pieces in random order give |correlation| ~ 1 / sqrt(160); 32
  # files read two at a time, ~ 1 / sqrt(16). Blocks in a fixed order
  # (pieces never reordered) gave 0.99 and more.
  bound = 0.2 if shuffle_buffer == 5 else 0.3
  for a, b in itertools.combinations(range(3), 2):
    correlation = _position_correlation(epochs[a], epochs[b])
    assert abs(correlation) < bound, (a, b, correlation)


def test_no_shuffling_reads_the_files_in_order(many):
  epochs = _label_epochs({**many, 'shuffle_buffer': 1}, 2)
  np.testing.assert_array_equal(epochs, np.tile(np.arange(MANY), (2, 1)))


@pytest.mark.parametrize('process_index,process_count,start_step',
                         [(0, 1, 13), (1, 2, 7)])
def test_resume_is_exact_when_files_are_read_in_parallel(
    many, process_index, process_count, start_step):
  config = {**many, 'shuffle_buffer': 50}  # Two 25-record files at a time.
  kwargs = {'batch': 60, 'process_index': process_index,
            'process_count': process_count}
  # 60 or 30 examples per step over 800 or 400 per epoch: steps cross
  # epochs, and resuming starts inside one.
  full = _labels(config, start_step + 8, **kwargs)
  resumed = _labels(config, 8, start_step=start_step, **kwargs)
  local = 60 // process_count
  np.testing.assert_array_equal(full[start_step * local:], resumed)


def test_cache_yields_the_same_order_when_files_are_read_in_parallel(many):
  config = {**many, 'shuffle_buffer': 50}
  np.testing.assert_array_equal(_label_epochs(config, 2),
                                _label_epochs({**config, 'cache': True}, 2))


GARBLED = 40  # Examples of the 'garbled' data set: 2 shards of 20.
CORRUPT = {3: b'', 17: b'not an image at all',
           22: _png(_level(22))[:40],  # Truncated PNG.
           35: b'\xff\xd8\xff\xe0' + bytes(range(256)) * 4}  # JPEG header.
# What the warnings say about them: the record, its file and why it failed (a part of the message).
CORRUPT_WARNINGS = {'record 3 of garbled-train.tfrecord-00000-of-00002': 'Input is empty.',
                    'record 17 of garbled-train.tfrecord-00000-of-00002': 'Unknown image file format.',
                    'record 2 of garbled-train.tfrecord-00001-of-00002': 'Invalid PNG.',
                    'record 15 of garbled-train.tfrecord-00001-of-00002': 'Invalid JPEG data'}


@pytest.fixture(autouse=True)
def _fresh_corrupt_warnings():
  """Each test sees the corrupt-image warnings (given once per process) anew."""
  corrupt.forget_warned()


def _check_corrupt_warnings(caplog):
  """Each corrupt record got one warning that names it and says why (epochs after the first: none), no other did."""
  prefix = 'Skipped an image that could not be decoded or preprocessed: '
  found = {}
  for record in caplog.records:
    message = record.getMessage()
    if record.levelname == 'WARNING' and message.startswith(prefix):
      name, why = message[len(prefix):].split(' (', 1)
      found.setdefault(name, []).append(why)
  assert set(found) == set(CORRUPT_WARNINGS)
  for name, whys in found.items():
    assert len(whys) == 1 and CORRUPT_WARNINGS[name] in whys[0], (name, whys)


@pytest.fixture(scope='module')
def garbled(tmp_path_factory):
  """config.dataset of 'garbled' (4 corrupt images) and of its clean twin."""
  data_dir = str(tmp_path_factory.mktemp('garbled'))
  clean = [_png(_level(i)) for i in range(GARBLED)]
  garbage = [CORRUPT.get(i, image) for i, image in enumerate(clean)]
  _write_records(data_dir, 'clean', clean, [20, 20], (6, 6, 3))
  _write_records(data_dir, 'garbled', garbage, [20, 20], (6, 6, 3))
  config = {'data_dir': data_dir, 'image_size': 8, 'channels': 3,
            'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25),
            'shuffle_buffer': 8, 'eval_resize': 256}
  return {**config, 'name': 'garbled'}, {**config, 'name': 'clean'}


def _train_batches(config, steps, start_step=0):
  return _take(input_pipeline.create_pretrain_iterator(
      config, global_batch_size=8, seed=4, start_step=start_step,
      process_index=0, process_count=1), steps)


@pytest.mark.parametrize('cache', [False, True])
def test_corrupt_images_are_replaced_and_counted_in_place(garbled, cache, caplog):
  config, clean_config = garbled
  config = {**config, 'cache': cache}  # Decoded before caching if cached.
  steps = 3 * GARBLED // 8  # Three epochs.
  batches = _train_batches(config, steps)
  _check_corrupt_warnings(caplog)
  caplog.clear()  # Another pipeline of the process (an evaluation's, a resume's): the file only.
  caplog.set_level(logging.INFO)
  _train_batches(config, 2)
  assert not [r for r in caplog.records if r.levelname == 'WARNING'] and 'Skipped again' in caplog.text
  clean = _train_batches(clean_config, steps)
  for epoch in range(3):  # Each corrupt record counted once per epoch.
    epoch_batches = batches[epoch * 5:(epoch + 1) * 5]
    assert sum(b['corrupt'].sum() for b in epoch_batches) == len(CORRUPT)
  for batch, expected in zip(batches, clean):
    assert not expected['corrupt'].any()
    corrupt = batch['corrupt']
    # Every other example is where it would be without corrupt records.
    np.testing.assert_array_equal(batch['image'][~corrupt],
                                  expected['image'][~corrupt])
    np.testing.assert_array_equal(batch['label'][~corrupt],
                                  expected['label'][~corrupt])
    assert set(expected['label'][corrupt]) <= set(CORRUPT)
    assert not set(expected['label'][~corrupt]) & set(CORRUPT)
    # A corrupt row holds a copy (image and label) of a valid one.
    for row in np.flatnonzero(corrupt):
      copies = [other for other in np.flatnonzero(~corrupt)
                if (batch['image'][other] == batch['image'][row]).all()]
      assert copies
      assert batch['label'][row] == batch['label'][copies[0]]
      np.testing.assert_array_equal(_ids(batch)[row], batch['label'][row])
  # Resuming stays exact across corrupt records.
  for expected, actual in zip(batches[6:], _train_batches(config, 4, 6)):
    for key in ('image', 'label', 'corrupt'):
      np.testing.assert_array_equal(expected[key], actual[key])


def test_a_batch_without_any_decodable_image_is_blank(tmp_path):
  _write_records(str(tmp_path), 'junk', [b'junk'] * 4, [4], (None, None, 3))
  config = {'name': 'junk', 'data_dir': str(tmp_path), 'image_size': 8,
            'channels': 3, 'mean': (0.5,) * 3, 'std': (0.5,) * 3}
  batch = next(input_pipeline.create_pretrain_iterator(
      config, global_batch_size=4, seed=0, process_index=0, process_count=1))
  assert batch['corrupt'].all()
  assert (batch['image'] == 0).all() and (batch['label'] == -1).all()


def test_eval_skips_and_counts_corrupt_images(garbled, caplog):
  config, _ = garbled
  batches = list(input_pipeline.create_eval_iterator(
      config, split='train', batch_size=16, process_index=0, process_count=1))
  _check_corrupt_warnings(caplog)
  assert len(batches) == 3  # 40 examples: 16, 16, 8 + padding.
  corrupt = np.concatenate([b['corrupt'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  assert corrupt.sum() == len(CORRUPT)
  assert not (mask & corrupt).any()
  labels = np.concatenate([b['label'] for b in batches])[mask]
  np.testing.assert_array_equal(np.sort(labels),
                                sorted(set(range(GARBLED)) - set(CORRUPT)))
  for batch in batches:
    real = batch['mask']
    np.testing.assert_array_equal(_ids({'image': batch['image'][real]}),
                                  batch['label'][real])
    assert (batch['label'][~real] == -1).all()
    assert (batch['image'][~real] == 0).all()


def test_evaluations_report_corrupt_images_and_stop_above_the_limit(garbled):
  """Fine-tuning's and the probe's evaluate, and kNN's features: 4 of 40 eval images are undecodable."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  from mae_jax import knn, parallel, supervised  # pylint: disable=g-import-not-at-top
  dataset, _ = garbled
  batches = lambda: input_pipeline.create_eval_iterator(dataset, split='train', batch_size=16, process_index=0,
                                                        process_count=1)
  mesh = parallel.data_parallel_mesh()
  eval_step = lambda batch: supervised.classification_counts(
      jax.nn.one_hot(batch['label'], GARBLED), batch['label'], batch['mask'], batch['corrupt'])
  config = ml_collections.ConfigDict({'dataset': {'eval_split': 'train', 'max_corrupt_fraction': 0.2}})
  result = supervised.evaluate(eval_step, batches(), mesh, config=config)
  assert result['eval/corrupt_images'] == len(CORRUPT) and result['eval/num_examples'] == GARBLED - len(CORRUPT)
  assert result['eval/top1'] == 1.0  # The corrupt rows are out of the accuracy, not counted wrong.
  config.dataset.max_corrupt_fraction = 0.05
  with pytest.raises(ValueError, match=r"4 of the 40 images of dataset.eval_split='train' \(10.0%\) could not be "
                                       r'decoded.*dataset.max_corrupt_fraction=0.05'):
    supervised.evaluate(eval_step, batches(), mesh, config=config)
  flatten = lambda params, images: jnp.reshape(images, (images.shape[0], -1))
  _, labels = knn.extract_features(flatten, None, batches(), mesh, max_corrupt_fraction=0.2)
  assert len(labels) == GARBLED - len(CORRUPT)
  with pytest.raises(ValueError, match=r'4 of the 40 images of the kNN bank .* more than '):
    knn.extract_features(flatten, None, batches(), mesh, max_corrupt_fraction=0.05, what='the kNN bank')
