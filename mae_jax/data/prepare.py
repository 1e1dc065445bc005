r"""Prepares a data set once, as a TFDS data set of sharded TFRecord files.

  python -m mae_jax.data.prepare --source=fashion_mnist --data_dir=DIR
  python -m mae_jax.data.prepare --source=folder:/path/to/images \
      [--name=my_images] [--channels=3] --data_dir=DIR
  python -m mae_jax.data.prepare --source=arrays:/path/to/arrays \
      [--name=my_bands] [--channels=N] [--image_size=H,W] --data_dir=DIR

Array sources (N channels, 16-bit or float pixels, stored without loss)
are described in `mae_jax.data.arrays`. Per-channel mean and std over the
training split are stored in the data set's metadata.json (integer pixels in
[0, 1] units, float pixels in their own), where config.dataset.mean = () and
std = () find them.

Fashion-MNIST is read from the original IDX .gz files (Debian package
dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist;
--source_dir overrides) and written with the name, version and features of
the TFDS catalog builder, so `tfds.load('fashion_mnist', data_dir=DIR)` finds
it prepared. A folder of images (any tree; JPEG, PNG, WebP, BMP, GIF, TIFF;
any size) becomes data set NAME, version 1.0.0, with one 'train' split
(take eval parts with split strings such as 'train[95%:]'). Labels come from
the first-level sub-folder names when every image lies in one. A tree whose
first-level folders are all split names (train/, val/, validation/, test/,
as ImageNet's train/ and val/) gives those splits instead, labelled by the
folders inside them with one class list (--nosplit_folders: classes). Images are
converted to --channels (alpha composited over white, EXIF rotation
applied); JPEG and PNG files that need no conversion are stored unchanged.

Both load with `tfds.builder_from_directory(DIR/NAME/VERSION)` and with
`tfds.load(NAME, data_dir=DIR)`. A second run finds the data set and does
nothing. Unreadable images are skipped and reported by name and count.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
from absl import app, flags
from PIL import Image, ImageOps, UnidentifiedImageError

from mae_jax import console  # Before TensorFlow: console imports it with its native log lines sent to the log file.

# isort: split
import tensorflow as tf
import tensorflow_datasets as tfds

from mae_jax.data import arrays, dataset_writer, sources

FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif',
                    '.tiff')
FOLDER_VERSION = '1.0.0'
SKIPPED_FILES_NAME = dataset_writer.SKIPPED_FILES_NAME
_LOSSY_FORMATS = ('JPEG', 'MPO', 'WEBP')  # Re-encoded as JPEG, others as PNG.
_JPEG_QUALITY = 95


PrepareError = dataset_writer.PrepareError


def prepare_fashion_mnist(data_dir: str, *,
                          source_dir: str = sources.DEFAULT_FASHION_MNIST_DIR,
                          name: str = 'fashion_mnist', overwrite: bool = False,
                          progress: bool = True) -> str:
  """Writes Fashion-MNIST from IDX files as TFDS data set `name`.

  Args:
    data_dir: TFDS data directory (local or gs://).
    source_dir: folder with {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz.
    name: data set name; the default matches the TFDS catalog builder.
    overwrite: rebuild even if already prepared.
    progress: show a progress bar.

  Returns:
    The prepared version directory, e.g. DIR/fashion_mnist/3.0.1.
  """
  catalog = tfds.builder('fashion_mnist', data_dir=data_dir)
  dataset_writer.check_name(name, allow_catalog='fashion_mnist')
  out_dir = os.path.join(data_dir, name, str(catalog.version))
  if dataset_writer.is_prepared(out_dir) and not overwrite:
    print(f'{name} is already prepared in {out_dir}; nothing to do '
          '(pass --overwrite to rebuild it).')
    return out_dir

  split_arrays = {}
  for split, (images_file, labels_file) in FASHION_MNIST_FILES.items():
    images = read_idx(_source_file(source_dir, images_file))
    labels = read_idx(_source_file(source_dir, labels_file))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise PrepareError(
          f'{source_dir}: {images_file} holds {images.shape} and '
          f'{labels_file} holds {labels.shape}; expected [N, 28, 28] images '
          'and N labels.')
    if labels.size and labels.max() >= 10:
      raise PrepareError(f'{source_dir}/{labels_file}: labels must be < 10.')
    split_arrays[split] = (images, labels)

  features = catalog.info.features
  total = sum(len(labels) for _, labels in split_arrays.values())
  stats = arrays.ChannelStats(1, np.uint8)
  stats.add(split_arrays['train'][0][..., None])
  start = time.time()
  with dataset_writer.incomplete_dir(out_dir) as tmp_dir, dataset_writer.progress_bar(
      total, f'Preparing {name}', progress) as bar:
    split_infos = []
    for split, (images, labels) in split_arrays.items():

      def examples(images=images, labels=labels):
        for image, label in zip(images, labels):
          bar.update(1)
          yield 0, features.serialize_example(
              {'image': _encode_png(image), 'label': int(label)})

      split_infos.append(dataset_writer.write_shards(tmp_dir, name, split, examples(), 1))
    dataset_writer.write_metadata(
        tmp_dir, features, split_infos, str(catalog.version),
        channel_stats=stats.as_metadata('train'),
        description=catalog.info.description, homepage=catalog.info.homepage,
        citation=catalog.info.citation,
        supervised_keys=catalog.info.supervised_keys)
  counts = ', '.join(f'{s.name} {s.num_examples}' for s in split_infos)
  print(f'Prepared {name} ({counts} examples) in {out_dir} in '
        f'{time.time() - start:.1f} s.')
  return out_dir


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzipped) of unsigned bytes."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    data = f.read()
  if data[:2] == b'\x1f\x8b':
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError) as e:
      raise PrepareError(f'{path}: corrupt gzip data ({e}).') from None
  if len(data) < 4 or data[:2] != b'\0\0' or data[2] != 0x08:
    raise PrepareError(
        f'{path}: not an IDX file of unsigned bytes (magic {data[:4]!r}).')
  ndim = data[3]
  header = 4 + 4 * ndim
  dims = struct.unpack(f'>{ndim}I', data[4:header])
  array = np.frombuffer(data, np.uint8, offset=header)
  if array.size != math.prod(dims):
    raise PrepareError(
        f'{path}: header says {dims} ({math.prod(dims)} values) but the file '
        f'holds {array.size}; the file is truncated or corrupt.')
  return array.reshape(dims)


def prepare_folder(folder: str, data_dir: str, *, name: str | None = None,
                   channels: int = 3, labels: str = 'auto', max_size: int = 0,
                   num_workers: int | None = None, overwrite: bool = False,
                   progress: bool = True, seed: int = 0, split_folders: bool = True) -> str:
  """Writes every image under `folder` as TFDS data set `name`, split 'train' (or one split per folder).

  Args:
    folder: root of the image tree (local or gs://).
    data_dir: TFDS data directory (local or gs://).
    name: data set name (lower-case letters, digits, '_'); default from the
      folder's name.
    channels: 1 (grayscale) or 3 (RGB); images are converted to it.
    labels: 'auto' (from first-level sub-folders when no image lies directly
      in `folder`), 'subdir' (always; error otherwise) or 'none'.
    max_size: if > 0, images whose shorter side exceeds it are downscaled so
      that it equals max_size (bicubic); 0 keeps the original size.
    num_workers: decoding threads; default the number of CPUs.
    overwrite: rebuild even if already prepared.
    progress: show a progress bar.
    seed: seed of the fixed shuffle of examples before they are sharded.
    split_folders: first-level folders named train/, val/, validation/ or
      test/ (all of them) become splits of those names, labels then come from
      the folders inside them (`dataset_writer.split_layout`).

  Returns:
    The prepared version directory, DIR/NAME/1.0.0.
  """
  folder = folder.rstrip('/') or '/'
  if not tf.io.gfile.isdir(folder):
    raise sources.DatasetNotFoundError(
        f'--source=folder:{folder}: the folder does not exist.')
  if channels not in (1, 3):
    raise PrepareError(f'--channels={channels}: must be 1 or 3.')
  name = name or dataset_writer.name_from_folder(folder)
  dataset_writer.check_name(name)
  out_dir = os.path.join(data_dir, name, FOLDER_VERSION)
  if dataset_writer.is_prepared(out_dir) and not overwrite:
    print(f'{name} is already prepared in {out_dir}; nothing to do '
          '(pass --overwrite to rebuild it).')
    return out_dir

  files = list_images(folder)
  if not files:
    raise sources.DatasetNotFoundError(
        f'--source=folder:{folder}: no images ({", ".join(IMAGE_EXTENSIONS)}) '
        'found in the folder or its sub-folders. Put your images there, '
        'optionally one sub-folder per class, and run this command again.')
  convert = make_converter(folder, channels, max_size)
  skipped = []
  if labels == 'auto':  # An unreadable file next to the class folders does not take their labels away.
    files, skipped = _unreadable_at_the_top_left_out(files, convert)
  splits, class_names, label_of = dataset_writer.split_layout(files, labels, folder, split_folders)
  labeled = bool(class_names)

  features = dataset_writer.folder_features(tfds.features.Image(shape=(None, None, channels)), class_names)
  print(f'Preparing {name} from {len(files)} image files under {folder} '
        f'({dataset_writer.describe_layout(splits, class_names)}) into {out_dir}.')

  start = time.time()
  with dataset_writer.incomplete_dir(out_dir) as tmp_dir, dataset_writer.progress_bar(
      len(files), f'Preparing {name}', progress) as bar:
    split_infos = dataset_writer.write_splits(tmp_dir, name, 'folder', folder, splits, features, convert,
                                              label_of if labeled else None, seed=seed, num_workers=num_workers,
                                              bar=bar, skipped=skipped)
    dataset_writer.write_metadata(
        tmp_dir, features, split_infos, FOLDER_VERSION,
        description=f'Images from {folder}, prepared by mae_jax.data.prepare.',
        supervised_keys=('image', 'label') if labeled else None)
    dataset_writer.write_skipped(tmp_dir, skipped)

  dataset_writer.report(name, out_dir, split_infos, time.time() - start, skipped, 'image')
  return out_dir


def _unreadable_at_the_top_left_out(files: list[str], convert) -> tuple[list[str], list[tuple[str, str]]]:
  """(files, skipped): the files lying directly in the folder next to sub-folders that `convert` (the
  conversion's own `make_converter`) cannot read, left out.

  Such a file would leave every image unlabelled (`dataset_writer.class_labels`) and then be skipped anyway.
  """
  at_top = [f for f in files if '/' not in f]
  if not at_top or len(at_top) == len(files):
    return files, []
  skipped = []
  for relpath in at_top:
    _, why = convert(relpath)
    if why is not None:
      skipped.append((relpath, why))
  left_out = {relpath for relpath, _ in skipped}
  return [f for f in files if f not in left_out], skipped


def list_images(folder: str) -> list[str]:
  """Sorted '/'-separated paths of the image files under folder.

  Hidden files and folders (names starting with '.') are ignored.
  """
  return dataset_writer.list_files(folder, IMAGE_EXTENSIONS)


def convert_image(data: bytes, *, channels: int, max_size: int = 0) -> bytes:
  """Encoded image -> JPEG or PNG bytes with `channels` channels.

  JPEG and PNG files already in the right mode, upright and small enough are
  returned unchanged. Raises an exception if the data cannot be decoded.
  """
  mode = 'L' if channels == 1 else 'RGB'
  with Image.open(io.BytesIO(data)) as image:
    image.load()  # Decodes everything: raises on truncated or corrupt data.
    source_format = image.format
    rotated = image.getexif().get(0x0112, 1) not in (0, 1)
    too_big = 0 < max_size < min(image.size)
    if (source_format in ('JPEG', 'PNG') and image.mode == mode
        and not rotated and not too_big and 'transparency' not in image.info):
      return data
    if rotated:
      image = ImageOps.exif_transpose(image)
    image = _to_mode(image, mode, source_format)
  if too_big:
    scale = max_size / min(image.size)
    size = tuple(max(1, round(s * scale)) for s in image.size)
    image = image.resize(size, Image.Resampling.BICUBIC)
  buffer = io.BytesIO()
  if source_format in _LOSSY_FORMATS:
    image.save(buffer, format='JPEG', quality=_JPEG_QUALITY)
  else:
    image.save(buffer, format='PNG')
  return buffer.getvalue()


def _to_mode(image: Image.Image, mode: str, source_format: str | None = None) -> Image.Image:
  """Converts any PIL mode to 'L' or 'RGB'; alpha is composited over white; 16-bit pixels are divided by 257.

  Float and 32-bit integer pixels (TIFF modes 'F' and 'I') have no known
  white: they raise, pointing to the array source, which stores them as they are.
  """
  sixteen_bit = image.mode.startswith('I;16') or (image.mode == 'I' and source_format == 'PNG')
  if image.mode in ('I', 'F') and not sixteen_bit:
    kind = 'float' if image.mode == 'F' else '32-bit integer'
    raise ValueError(f'{kind} pixels (PIL mode {image.mode}), which an 8-bit image cannot hold without a chosen '
                     'range; prepare such files with --source=arrays:FOLDER (stored as they are, any channels), '
                     'or convert them to 8- or 16-bit first')
  if sixteen_bit:
    pixels = np.clip(np.asarray(image, np.float64) / 257, 0, 255)
    image = Image.fromarray(np.round(pixels).astype(np.uint8), 'L')
  if image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (
      'transparency' in image.info):
    rgba = image.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, rgba)
  return image.convert(mode)


def make_converter(folder: str, channels: int, max_size: int = 0
                   ) -> Callable[[str], tuple[bytes | None, str | None]]:
  """fn(relpath) -> (the file as `convert_image` stores it, None), or (None, why it cannot be read)."""
  def convert(relpath):
    try:
      with tf.io.gfile.GFile(os.path.join(folder, relpath), 'rb') as f:
        data = f.read()
      return convert_image(data, channels=channels, max_size=max_size), None
    except UnidentifiedImageError:
      return None, 'not an image in a known format, or a corrupt header'
    except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except
      # Any failure to read or decode one file skips that file, reported.
      return None, f'{type(e).__name__}: {e}'
  return convert


def _source_file(source_dir: str, filename: str) -> str:
  path = os.path.join(source_dir, filename)
  if not tf.io.gfile.exists(path):
    raise sources.DatasetNotFoundError(
        f'{path} does not exist. Point --source_dir at the folder holding the '
        'Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, '
        'train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, '
        't10k-labels-idx1-ubyte.gz), or install them with: '
        'apt-get install dataset-fashion-mnist')
  return path


def _encode_png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()


# Command line.


def _define_flags():
  if 'source' in flags.FLAGS:
    return
  flags.DEFINE_string(
      'source', None,
      'fashion_mnist (IDX files, see --source_dir), folder:PATH (a tree of '
      'images; labels from first-level sub-folder names) or arrays:PATH (a '
      'tree of .npy / .npz / multi-page TIFF files, any channels, uint8, '
      'uint16 or float32, stored without loss).')
  flags.DEFINE_string('data_dir', '',
                      'TFDS data directory to write into (local or gs://); '
                      "'' = $TFDS_DATA_DIR or ~/tensorflow_datasets.")
  flags.DEFINE_string('name', None,
                      'Data set name; default fashion_mnist, or the folder '
                      'name for folder sources.')
  flags.DEFINE_string('source_dir', sources.DEFAULT_FASHION_MNIST_DIR,
                      'Folder with the Fashion-MNIST IDX .gz files.')
  flags.DEFINE_integer('channels', 0, 'Folder sources: 1 (grayscale) or 3 '
                       '(0 = 3). Array sources: every file\'s channel count '
                       '(0 = the first file\'s).')
  flags.DEFINE_string('image_size', '', 'Array sources: H,W (or one side) '
                      'that every array must have; \'\' = any size.')
  flags.DEFINE_enum('labels', 'auto', ['auto', 'subdir', 'none'],
                    'Folder sources: labels from sub-folder names.')
  flags.DEFINE_bool('split_folders', True,
                    'Folder and array sources: when every first-level folder is named train, val, validation or '
                    'test, they are the splits and the folders inside them the classes; --nosplit_folders reads '
                    'them as classes.')
  flags.DEFINE_integer('max_size', 0,
                       'Folder sources: downscale images whose shorter side '
                       'exceeds this; 0 keeps sizes.')
  flags.DEFINE_integer('num_workers', 0,
                       'Decoding threads; 0 = number of CPUs.')
  flags.DEFINE_bool('overwrite', False, 'Rebuild an already prepared data set.')
  flags.DEFINE_bool('progress', True, 'Show a progress bar.')
  flags.mark_flag_as_required('source')


def main(argv: Sequence[str]):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  console.setup('prepare')  # TensorFlow's and TFDS's INFO lines to a log file (--verbose: here), not into the bar.
  data_dir = FLAGS.data_dir or sources.default_data_dir()
  source = FLAGS.source
  try:
    if source == 'fashion_mnist':
      prepare_fashion_mnist(data_dir, source_dir=FLAGS.source_dir,
                            name=FLAGS.name or 'fashion_mnist',
                            overwrite=FLAGS.overwrite,
                            progress=FLAGS.progress)
    elif source.startswith('folder:'):
      prepare_folder(source[len('folder:'):], data_dir, name=FLAGS.name,
                     channels=FLAGS.channels or 3, labels=FLAGS.labels,
                     max_size=FLAGS.max_size,
                     num_workers=FLAGS.num_workers or None,
                     overwrite=FLAGS.overwrite, progress=FLAGS.progress,
                     split_folders=FLAGS.split_folders)
    elif source.startswith('arrays:'):
      arrays.prepare_arrays(source[len('arrays:'):], data_dir, name=FLAGS.name,
                            channels=FLAGS.channels,
                            image_size=FLAGS.image_size, labels=FLAGS.labels,
                            num_workers=FLAGS.num_workers or None,
                            overwrite=FLAGS.overwrite, progress=FLAGS.progress,
                            split_folders=FLAGS.split_folders)
    else:
      raise app.UsageError(
          f'--source={source!r}: use fashion_mnist, folder:PATH or '
          'arrays:PATH.')
  except (sources.DatasetNotFoundError, PrepareError) as e:
    sys.exit(f'Error: {e}')


def run():
  """Console-script entry point (mae-jax-prepare)."""
  _define_flags()
  console.define_flags()  # --verbose (this entry point's --progress is its own bar's switch).
  flags.adopt_module_key_flags(console)  # Listed by --help.
  app.run(main)


if __name__ == '__main__':
  run()
