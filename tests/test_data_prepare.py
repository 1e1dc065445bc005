"""Tests of mae_jax.data.prepare: IDX and folder sources into TFDS data sets."""

import gzip
import io
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image, features

from mae_jax.data import input_pipeline, prepare, sources

tf.config.set_visible_devices([], 'GPU')

FASHION_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                   'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_idx(path, array):
  header = struct.pack(f'>BBBB{array.ndim}I', 0, 0, 0x08, array.ndim,
                       *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _write_tiny_fashion_mnist(directory, num_train=12, num_test=5):
  rng = np.random.default_rng(0)
  arrays = {}
  for split, prefix, count in [('train', 'train', num_train),
                               ('test', 't10k', num_test)]:
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (count,), dtype=np.uint8)
    _write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'),
               images)
    _write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'),
               labels)
    arrays[split] = (images, labels)
  return arrays


def _encode(image, fmt, **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _decode(data):
  return Image.open(io.BytesIO(data))


# IDX and Fashion-MNIST.


def test_read_idx_round_trip_and_errors(tmp_path):
  array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  path = str(tmp_path / 'a.gz')
  _write_idx(path, array)
  np.testing.assert_array_equal(prepare.read_idx(path), array)
  truncated = str(tmp_path / 'truncated.gz')
  with gzip.open(truncated, 'wb') as f:
    f.write(struct.pack('>BBBBI', 0, 0, 8, 1, 10) + b'\0' * 5)
  with pytest.raises(prepare.PrepareError, match='truncated.gz.*truncated'):
    prepare.read_idx(truncated)
  not_idx = str(tmp_path / 'not_idx')
  with open(not_idx, 'wb') as f:
    f.write(b'PK\x03\x04 zip file')
  with pytest.raises(prepare.PrepareError, match='not an IDX file'):
    prepare.read_idx(not_idx)


def test_prepare_fashion_mnist_from_idx_files(tmp_path, capsys):
  source_dir = str(tmp_path / 'idx')
  os.makedirs(source_dir)
  arrays = _write_tiny_fashion_mnist(source_dir)
  data_dir = str(tmp_path / 'tfds')
  out_dir = prepare.prepare_fashion_mnist(data_dir, source_dir=source_dir,
                                          progress=False)
  assert out_dir == os.path.join(data_dir, 'fashion_mnist', '3.0.1')

  builder = tfds.builder_from_directory(out_dir)
  assert builder.info.features['label'].names == FASHION_CLASSES
  for split, (images, labels) in arrays.items():
    examples = list(builder.as_dataset(split=split).as_numpy_iterator())
    np.testing.assert_array_equal(
        np.stack([e['image'] for e in examples]), images[..., None])
    np.testing.assert_array_equal([e['label'] for e in examples], labels)

  # The catalog builder finds it prepared: tfds.load does not download.
  test = tfds.load('fashion_mnist', split='test', data_dir=data_dir)
  assert len(list(test)) == 5
  info = input_pipeline.dataset_info({'name': 'fashion_mnist',
                                      'data_dir': data_dir})
  assert info['splits'] == {'train': 12, 'test': 5}
  assert info['class_names'] == FASHION_CLASSES

  # A second run does nothing and says so.
  before = {f: os.path.getmtime(os.path.join(out_dir, f))
            for f in os.listdir(out_dir)}
  capsys.readouterr()
  prepare.prepare_fashion_mnist(data_dir, source_dir=source_dir,
                                progress=False)
  assert 'nothing to do' in capsys.readouterr().out
  assert before == {f: os.path.getmtime(os.path.join(out_dir, f))
                    for f in os.listdir(out_dir)}


def test_prepare_fashion_mnist_missing_files(tmp_path):
  with pytest.raises(sources.DatasetNotFoundError) as error:
    prepare.prepare_fashion_mnist(str(tmp_path / 'tfds'),
                                  source_dir=str(tmp_path), progress=False)
  message = str(error.value)
  assert 'train-images-idx3-ubyte.gz' in message and '--source_dir' in message
  assert not os.path.exists(tmp_path / 'tfds' / 'fashion_mnist' / '3.0.1')


def test_command_line(tmp_path):
  source_dir = str(tmp_path / 'idx')
  os.makedirs(source_dir)
  _write_tiny_fashion_mnist(source_dir)
  command = [sys.executable, '-m', 'mae_jax.data.prepare',
             '--source=fashion_mnist', f'--data_dir={tmp_path / "tfds"}',
             '--noprogress']
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'}
  done = subprocess.run(command + [f'--source_dir={source_dir}'], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120,
                        check=False)
  assert done.returncode == 0, done.stderr
  assert 'train 12, test 5 examples' in done.stdout
  failed = subprocess.run(
      command + [f'--source_dir={tmp_path / "missing"}', '--overwrite'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
      check=False)
  assert failed.returncode == 1
  assert 'Error:' in failed.stderr and '--source_dir' in failed.stderr
  assert 'Traceback' not in failed.stderr


@pytest.mark.skipif(
    not os.path.exists(os.path.join(sources.DEFAULT_FASHION_MNIST_DIR,
                                    'train-images-idx3-ubyte.gz')),
    reason='Debian package dataset-fashion-mnist is not installed')
def test_prepare_real_fashion_mnist(tmp_path):
  data_dir = str(tmp_path)
  prepare.prepare_fashion_mnist(data_dir, progress=False)
  config = {'name': 'fashion_mnist', 'data_dir': data_dir}
  info = input_pipeline.dataset_info(config)
  assert info['splits'] == {'train': 60_000, 'test': 10_000}
  assert info['class_names'] == FASHION_CLASSES
  test = tfds.load('fashion_mnist', split='test', data_dir=data_dir)
  assert int(test.reduce(0, lambda count, _: count + 1)) == 10_000
  labels = prepare.read_idx(os.path.join(sources.DEFAULT_FASHION_MNIST_DIR,
                                         't10k-labels-idx1-ubyte.gz'))
  first = next(iter(test.take(1)))
  assert int(first['label']) == labels[0]
  assert np.bincount(labels).tolist() == [1000] * 10


# Image conversion.


def test_convert_keeps_jpeg_and_png_that_need_no_conversion():
  rgb = Image.new('RGB', (20, 10), (10, 200, 30))
  for fmt in ('JPEG', 'PNG'):
    data = _encode(rgb, fmt)
    assert prepare.convert_image(data, channels=3) == data
  gray = _encode(Image.new('L', (20, 10), 50), 'PNG')
  assert prepare.convert_image(gray, channels=1) == gray


def test_convert_grayscale_rgba_and_rgb_to_configured_channels():
  gray = prepare.convert_image(_encode(Image.new('L', (8, 6), 50), 'PNG'),
                               channels=3)
  assert _decode(gray).mode == 'RGB'
  assert _decode(gray).getpixel((0, 0)) == (50, 50, 50)
  rgba = Image.new('RGBA', (8, 6), (10, 20, 30, 255))
  rgba.putpixel((0, 0), (10, 20, 30, 0))  # Transparent: white background.
  converted = _decode(prepare.convert_image(_encode(rgba, 'PNG'), channels=3))
  assert converted.mode == 'RGB' and converted.format == 'PNG'
  assert converted.getpixel((0, 0)) == (255, 255, 255)
  assert converted.getpixel((1, 0)) == (10, 20, 30)
  rgb = _encode(Image.new('RGB', (8, 6), (255, 0, 0)), 'JPEG')
  converted = _decode(prepare.convert_image(rgb, channels=1))
  assert converted.mode == 'L' and converted.format == 'JPEG'
  assert abs(converted.getpixel((4, 3)) - 76) <= 2  # ITU-R 601 luma of red.


def test_convert_applies_exif_rotation_and_max_size():
  image = Image.new('RGB', (40, 20), (0, 0, 0))
  image.paste((255, 255, 255), (0, 0, 20, 20))  # Left half white.
  exif = Image.Exif()
  exif[0x0112] = 6  # Camera held rotated: display rotated 90 degrees CW.
  converted = _decode(prepare.convert_image(
      _encode(image, 'JPEG', exif=exif.tobytes()), channels=3))
  assert converted.size == (20, 40)
  assert converted.getpixel((10, 5))[0] > 200  # Left half is now on top.
  assert converted.getpixel((10, 35))[0] < 50
  big = _encode(Image.new('RGB', (400, 300), (1, 2, 3)), 'PNG')
  assert _decode(prepare.convert_image(big, channels=3, max_size=150)).size \
      == (200, 150)
  assert prepare.convert_image(big, channels=3, max_size=300) == big


def test_convert_16_bit_and_webp():
  deep = Image.fromarray(np.full((4, 4), 257 * 100, np.uint16))
  converted = _decode(prepare.convert_image(_encode(deep, 'PNG'), channels=1))
  assert converted.mode == 'L' and converted.getpixel((0, 0)) == 100
  if features.check('webp'):
    webp = _encode(Image.new('RGB', (16, 16), (0, 128, 255)), 'WEBP')
    converted = _decode(prepare.convert_image(webp, channels=3))
    assert converted.format == 'JPEG' and converted.size == (16, 16)


def test_convert_rejects_corrupt_data():
  data = _encode(Image.new('RGB', (64, 64), (1, 2, 3)), 'PNG')
  with pytest.raises(Exception):  # noqa: B017  Any decoding error.
    prepare.convert_image(data[:len(data) // 2], channels=3)


# Folders.


def _make_tree(root):
  """Two classes in nested folders, odd formats, junk and a corrupt file."""
  os.makedirs(os.path.join(root, 'dogs', 'puppies'))
  os.makedirs(os.path.join(root, 'cats'))
  os.makedirs(os.path.join(root, '.hidden'))
  Image.new('RGB', (30, 20), (200, 0, 0)).save(f'{root}/dogs/a.jpg')
  Image.new('L', (15, 25), 90).save(f'{root}/dogs/puppies/b.png')
  Image.new('RGBA', (12, 12), (0, 0, 200, 255)).save(f'{root}/cats/c.PNG')
  Image.new('RGB', (500, 375), (5, 5, 5)).save(f'{root}/cats/d.jpeg')
  with open(f'{root}/cats/broken.jpg', 'wb') as f:
    f.write(_encode(Image.new('RGB', (64, 64), (9, 9, 9)), 'JPEG')[:200])
  with open(f'{root}/cats/notes.txt', 'w') as f:
    f.write('not an image')
  Image.new('RGB', (8, 8)).save(f'{root}/.hidden/e.png')
  Image.new('RGB', (8, 8)).save(f'{root}/cats/._f.jpg')


def test_prepare_folder(tmp_path, capsys):
  root = str(tmp_path / 'My Pets-2')
  _make_tree(root)
  data_dir = str(tmp_path / 'tfds')
  out_dir = prepare.prepare_folder(root, data_dir, progress=False)
  assert out_dir == os.path.join(data_dir, 'my_pets_2', '1.0.0')
  output = capsys.readouterr().out
  assert 'Skipped 1 unreadable image files' in output
  assert 'cats/broken.jpg' in output
  with open(os.path.join(out_dir, prepare.SKIPPED_FILES_NAME)) as f:
    assert f.read().startswith('cats/broken.jpg\t')

  for builder in (tfds.builder_from_directory(out_dir),
                  tfds.builder('my_pets_2', data_dir=data_dir)):
    assert builder.info.features['label'].names == ['cats', 'dogs']
    assert builder.info.splits['train'].num_examples == 4
  examples = {e['file_name'].decode(): e for e in tfds.load(
      'my_pets_2', split='train', data_dir=data_dir).as_numpy_iterator()}
  assert sorted(examples) == ['cats/c.PNG', 'cats/d.jpeg', 'dogs/a.jpg',
                              'dogs/puppies/b.png']
  for file_name, example in examples.items():
    assert example['label'] == (1 if file_name.startswith('dogs') else 0)
    assert example['image'].shape[-1] == 3
  assert examples['dogs/puppies/b.png']['image'].shape == (25, 15, 3)
  np.testing.assert_array_equal(examples['cats/c.PNG']['image'][0, 0],
                                (0, 0, 200))

  capsys.readouterr()
  assert prepare.prepare_folder(root, data_dir, progress=False) == out_dir
  assert 'nothing to do' in capsys.readouterr().out
  Image.new('RGB', (8, 8)).save(f'{root}/cats/g.png')
  prepare.prepare_folder(root, data_dir, progress=False, overwrite=True)
  assert input_pipeline.num_examples(
      {'name': 'my_pets_2', 'data_dir': data_dir}, 'train') == 5


def test_prepare_unlabeled_grayscale_folder(tmp_path):
  root = str(tmp_path / 'scans')
  os.makedirs(os.path.join(root, 'more'))
  for i in range(5):
    Image.new('RGB', (10 + i, 10), (i * 40,) * 3).save(f'{root}/{i}.png')
  Image.new('RGB', (10, 10)).save(f'{root}/more/x.jpg')
  data_dir = str(tmp_path / 'tfds')
  prepare.prepare_folder(root, data_dir, channels=1, progress=False)
  config = {'name': 'scans', 'data_dir': data_dir, 'image_size': 8,
            'channels': 1, 'mean': (0.5,), 'std': (0.5,)}
  info = input_pipeline.dataset_info(config)
  assert not info['has_labels'] and info['num_classes'] is None
  assert info['image_shape'] == (None, None, 1)
  batch = next(input_pipeline.create_pretrain_iterator(
      config, global_batch_size=4, seed=0, process_index=0, process_count=1))
  assert batch['image'].shape == (4, 8, 8, 1)
  assert (batch['label'] == -1).all()
  with pytest.raises(prepare.PrepareError, match='--labels=subdir'):
    prepare.prepare_folder(root, data_dir, name='scans_labeled',
                           labels='subdir', progress=False)


def test_an_unreadable_file_next_to_class_folders_is_skipped_and_the_folders_label(tmp_path, capsys):
  root = tmp_path / 'pets'
  for i, pet in enumerate(['cat', 'cat', 'dog']):
    (root / pet).mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (10, 10), (i * 60,) * 3).save(root / pet / f'{i}.png')
  (root / 'notes.png').write_bytes(b'not an image')  # Readable, it would leave every image unlabelled.
  jpeg = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(jpeg, 'JPEG')
  (root / 'cut.jpg').write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])  # A header that opens, cut data.
  data_dir = str(tmp_path / 'tfds')
  prepare.prepare_folder(str(root), data_dir, progress=False)
  info = input_pipeline.dataset_info({'name': 'pets', 'data_dir': data_dir, 'image_size': 8, 'channels': 3})
  assert info['has_labels'] and info['class_names'] == ['cat', 'dog'] and info['num_train_examples'] == 3
  printed = capsys.readouterr().out
  assert 'notes.png' in printed and 'cut.jpg' in printed  # Reported as skipped.


def test_prepare_folder_errors(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  empty = tmp_path / 'empty'
  (empty / 'sub').mkdir(parents=True)
  (empty / 'readme.txt').write_text('no images here')
  with pytest.raises(sources.DatasetNotFoundError) as error:
    prepare.prepare_folder(str(empty), data_dir, progress=False)
  assert str(empty) in str(error.value) and 'no images' in str(error.value)
  with pytest.raises(sources.DatasetNotFoundError, match='does not exist'):
    prepare.prepare_folder(str(tmp_path / 'missing'), data_dir,
                           progress=False)

  corrupt = tmp_path / 'corrupt'
  corrupt.mkdir()
  for name in ('a.jpg', 'b.png'):
    (corrupt / name).write_bytes(b'garbage')
  with pytest.raises(prepare.PrepareError, match='none of the 2'):
    prepare.prepare_folder(str(corrupt), data_dir, progress=False)
  assert not os.path.exists(os.path.join(data_dir, 'corrupt'
                                         )) or not os.listdir(
                                             os.path.join(data_dir, 'corrupt'))

  fine = tmp_path / 'fine'
  fine.mkdir()
  Image.new('RGB', (8, 8)).save(fine / 'a.png')
  with pytest.raises(prepare.PrepareError, match='catalog'):
    prepare.prepare_folder(str(fine), data_dir, name='mnist', progress=False)
  with pytest.raises(prepare.PrepareError, match='--name'):
    prepare.prepare_folder(str(fine), data_dir, name='Bad-Name',
                           progress=False)


def test_prepare_folder_with_split_folders(tmp_path, capsys):
  """ImageNet's layout: train/ and val/ are splits, the folders inside them the classes (one list)."""
  root = tmp_path / 'pets'
  for split, classes in (('train', ('cat', 'dog', 'fish')), ('val', ('cat', 'dog'))):
    for label in classes:
      (root / split / label).mkdir(parents=True)
      for i in range(3 if split == 'train' else 1):
        Image.new('RGB', (8, 8), (10 * i, 0, 0)).save(root / split / label / f'{i}.png')
  data_dir = str(tmp_path / 'tfds')
  out_dir = prepare.prepare_folder(str(root), data_dir, progress=False)
  assert 'splits train 9, val 2; 3 classes from the sub-folder names inside them' in capsys.readouterr().out
  builder = tfds.builder_from_directory(out_dir)
  assert builder.info.features['label'].names == ['cat', 'dog', 'fish']
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {'train': 9, 'val': 2}
  for split in ('train', 'val'):
    for example in builder.as_dataset(split=split).as_numpy_iterator():
      name = example['file_name'].decode()
      assert name.startswith(f'{split}/')
      assert example['label'] == ['cat', 'dog', 'fish'].index(name.split('/')[1])
  # --nosplit_folders: the first level is the classes again.
  prepare.prepare_folder(str(root), data_dir, name='pets_flat', progress=False, split_folders=False)
  flat = tfds.builder('pets_flat', data_dir=data_dir)
  assert flat.info.features['label'].names == ['train', 'val'] and list(flat.info.splits) == ['train']
  # A split of loose images beside one of class folders: refused, as neither would be labelled.
  (root / 'test').mkdir()
  Image.new('RGB', (8, 8)).save(root / 'test' / 'loose.png')
  with pytest.raises(prepare.PrepareError, match=r'test/ holds images directly while train/, val/ has class '
                                                 r'folders.*--labels=none'):
    prepare.prepare_folder(str(root), data_dir, name='pets_mix', progress=False)
  (root / 'test' / 'loose.png').unlink()
  (root / 'test').rmdir()
  # Any other first-level name keeps the single split.
  (root / 'extra').mkdir()
  Image.new('RGB', (8, 8)).save(root / 'extra' / 'x.png')
  prepare.prepare_folder(str(root), data_dir, name='pets_mixed', progress=False)
  mixed = tfds.builder('pets_mixed', data_dir=data_dir)
  assert mixed.info.features['label'].names == ['extra', 'train', 'val']


def test_float_and_32_bit_tiffs_are_refused_pointing_to_the_array_source():
  for array in (np.full((4, 4), 0.5, np.float32), np.full((4, 4), 70000, np.int32)):
    with pytest.raises(ValueError, match=r'pixels \(PIL mode [FI]\).*--source=arrays:'):
      prepare.convert_image(_encode(Image.fromarray(array), 'TIFF'), channels=1)
  sixteen = _decode(prepare.convert_image(_encode(Image.fromarray(np.full((4, 4), 257 * 7, np.uint16)), 'TIFF'),
                                          channels=1))
  assert sixteen.getpixel((0, 0)) == 7
