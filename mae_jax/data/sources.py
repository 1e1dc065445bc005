"""Where images come from: the `config.dataset` fields and the TFDS builder.

Every source is read through TFDS: a catalog data set already built in
`data_dir` (local or gs://), or one written by `mae_jax.data.prepare` from
Fashion-MNIST IDX files or from a folder of the user's own images. Nothing is
downloaded here: a data set that is not prepared is one clear error that says
how to prepare it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mae_jax.data import augment

DEFAULT_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'


class DatasetNotFoundError(FileNotFoundError):
  """The configured data set, data_dir or source folder does not exist."""


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """The `config.dataset` fields that the input pipeline reads.

  See `configs/default.py` for their meaning. Build one with `from_config`.
  """

  name: str
  data_dir: str = ''
  train_split: str = 'train'
  eval_split: str = 'test'
  image_size: int | tuple[int, int] = 224  # Square side, or (height, width).
  channels: int = 3
  mean: tuple[float, ...] = (0.485, 0.456, 0.406)
  std: tuple[float, ...] = (0.229, 0.224, 0.225)
  crop_scale: tuple[float, float] = (0.2, 1.0)
  crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  eval_resize: int = 256
  shuffle_buffer: int = 10_000
  cache: bool = False
  prefetch: int = 2

  @classmethod
  def from_config(cls, dataset_config: Any) -> DatasetConfig:
    """Reads a `config.dataset` ConfigDict, a mapping or a DatasetConfig."""
    if isinstance(dataset_config, DatasetConfig):
      return dataset_config
    if hasattr(dataset_config, 'to_dict'):  # ml_collections.ConfigDict
      dataset_config = dataset_config.to_dict()
    if not isinstance(dataset_config, Mapping):
      raise TypeError(
          f'dataset_config={dataset_config!r}: expected config.dataset (a '
          'ConfigDict), a mapping or a DatasetConfig.')
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in dataset_config.items() if k in known}
    for key in ('mean', 'std', 'crop_scale', 'crop_ratio'):
      if key in kwargs:
        kwargs[key] = tuple(float(v) for v in kwargs[key])
    if isinstance(kwargs.get('image_size'), (list, tuple)):
      kwargs['image_size'] = tuple(kwargs['image_size'])
    if 'name' not in kwargs or not kwargs['name']:
      raise ValueError(
          'config.dataset.name is empty: set it to a TFDS data set name, e.g. '
          "'fashion_mnist', or the --name given to mae_jax.data.prepare.")
    config = cls(**kwargs)
    config.validate()
    return config

  def validate(self):
    """Raises ValueError naming the first invalid field."""
    size = self.image_size
    if isinstance(size, tuple):
      if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(
            f'config.dataset.image_size={size}: must be one int > 0 (square) '
            'or (height, width) with two ints > 0.')
    elif not isinstance(size, int) or size <= 0:
      raise ValueError(
          f'config.dataset.image_size={size}: must be > 0 (square), or '
          '(height, width).')
    if not isinstance(self.channels, int) or self.channels < 1:
      raise ValueError(
          f'config.dataset.channels={self.channels}: must be >= 1 (1 grey, 3 '
          'RGB, or the channel count of an array data set).')
    if bool(self.mean) != bool(self.std):
      raise ValueError(
          f'config.dataset.mean={self.mean}, std={self.std}: set both, or '
          'both to () to take them from the data set\'s metadata.')
    for key in ('mean', 'std'):
      value = getattr(self, key)
      if value and len(value) != self.channels:
        raise ValueError(
            f'config.dataset.{key}={value}: needs one value per channel '
            f'(config.dataset.channels={self.channels}), or () for the data '
            "set's stored statistics.")
    if self.std and min(self.std) <= 0:
      raise ValueError(f'config.dataset.std={self.std}: must be > 0.')
    low, high = self.crop_scale
    if not 0 < low <= high <= 1:
      raise ValueError(
          f'config.dataset.crop_scale={self.crop_scale}: must be (low, high) '
          'with 0 < low <= high <= 1.')
    low, high = self.crop_ratio
    if not 0 < low <= high:
      raise ValueError(
          f'config.dataset.crop_ratio={self.crop_ratio}: must be (low, high) '
          'with 0 < low <= high.')
    if self.eval_resize < 224:
      raise ValueError(
          f'config.dataset.eval_resize={self.eval_resize}: must be >= 224 '
          '(up to image_size 224 the shorter side is resized to image_size * eval_resize / 224, above it '
          'to image_size, then center-cropped to image_size; 256 is the reference).')
    if self.shuffle_buffer < 1:
      raise ValueError(
          f'config.dataset.shuffle_buffer={self.shuffle_buffer}: must be '
          '>= 1 (1 disables shuffling).')

  @property
  def image_hw(self) -> tuple[int, int]:
    """(height, width) of the model's input."""
    size = self.image_size
    return tuple(size) if isinstance(size, tuple) else (size, size)

  @property
  def eval_resize_size(self) -> int:
    """Shorter side before the eval center crop, e.g. 256 at image_size 224."""
    return min(augment.eval_resize_size(self.image_hw, self.eval_resize))

  @property
  def eval_resize_hw(self) -> tuple[int, int]:
    """(height, width) the eval image is resized to cover before the crop."""
    return augment.eval_resize_size(self.image_hw, self.eval_resize)

  @property
  def has_stats(self) -> bool:
    """Whether mean and std are set (else they come from the data set)."""
    return bool(self.mean) and bool(self.std)


def default_data_dir() -> str:
  """The directory TFDS uses when config.dataset.data_dir is ''."""
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser(
      '~/tensorflow_datasets')


def prepare_hint(name: str, data_dir: str) -> str:
  """The command that prepares data set `name` into `data_dir`."""
  data_dir = data_dir or default_data_dir()
  if name == 'fashion_mnist':
    return ('Prepare it with: python -m mae_jax.data.prepare '
            f'--source=fashion_mnist --data_dir={data_dir}')
  return ('Prepare your own images with: python -m mae_jax.data.prepare '
          f'--source=folder:/path/to/images --name={name} '
          f'--data_dir={data_dir} ; or build a TFDS catalog data set with: '
          f'tfds build {name} --data_dir={data_dir}')


def get_builder(dataset_config: Any) -> tfds.core.DatasetBuilder:
  """Returns the TFDS builder of a prepared data set, or one clear error.

  `config.dataset.name` is a TFDS name (optionally `name:version` or
  `name/config`) looked up in `config.dataset.data_dir`, or the path of a
  prepared version directory (the folder holding `dataset_info.json`).

  Raises:
    DatasetNotFoundError: data_dir, the data set or its files are missing.
    ValueError: the data set has no usable 'image' feature.
  """
  config = DatasetConfig.from_config(dataset_config)
  name, data_dir = config.name, config.data_dir
  if _looks_like_path(name):
    name = os.path.expanduser(name)
    if not tf.io.gfile.exists(os.path.join(name, 'dataset_info.json')):
      raise DatasetNotFoundError(
          f'config.dataset.name={name!r} is a path but holds no '
          'dataset_info.json: point it at a prepared data set version '
          'directory (e.g. DATA_DIR/my_images/1.0.0), or set name to a data '
          'set name and data_dir to its parent folder.')
    builder = tfds.builder_from_directory(name)
  else:
    if data_dir and not tf.io.gfile.isdir(data_dir):
      raise DatasetNotFoundError(
          f'config.dataset.data_dir={data_dir!r} does not exist. '
          + prepare_hint(name.split(':')[0], data_dir))
    try:
      builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.DatasetNotFoundError:
      raise DatasetNotFoundError(
          f'Data set {name!r} (config.dataset.name) was not found in '
          f'{data_dir or default_data_dir()} (config.dataset.data_dir). '
          + prepare_hint(name, data_dir)) from None
    if not tf.io.gfile.exists(
        os.path.join(builder.data_dir, 'dataset_info.json')):
      raise DatasetNotFoundError(
          f'Data set {name!r} (config.dataset.name) is not prepared in '
          f'{data_dir or default_data_dir()} (config.dataset.data_dir): '
          f'{builder.data_dir} is missing. ' + prepare_hint(
              builder.name, data_dir))
  _check_features(builder, name)
  return builder


def _looks_like_path(name: str) -> bool:
  return name.startswith(('/', './', '../', '~', 'gs://'))


def _check_features(builder: tfds.core.DatasetBuilder, name: str):
  features = builder.info.features
  if 'image' not in features:
    raise ValueError(
        f'Data set {name!r} (config.dataset.name) has no "image" feature '
        f'(features: {sorted(features.keys())}); the input pipeline reads '
        '"image" and, when present, "label".')
  image = features['image']
  dtype = np.dtype(image.np_dtype)
  if isinstance(image, tfds.features.Image) and dtype != np.uint8:
    raise ValueError(
        f'Data set {name!r}: image dtype {dtype} is not supported; '
        'the input pipeline reads uint8 images.')
  if dtype not in PIXEL_DTYPES:
    raise ValueError(
        f'Data set {name!r}: image dtype {dtype} is not supported; the input '
        f'pipeline reads {", ".join(str(np.dtype(d)) for d in PIXEL_DTYPES)}.')


# Pixel dtypes of stored arrays, and the value that is 1.0 in mean/std units
# (None: float pixels, whose mean and std are in the stored units).
PIXEL_DTYPES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0,
                np.dtype(np.float32): None}
# The data set's metadata.json key under which prepare stores channel stats.
STATS_KEY = 'mae_jax_channel_stats'
METADATA_FILENAME = 'metadata.json'


def pixel_scale(dtype: Any) -> float | None:
  """The stored value that is 1.0 in mean/std units (None for float pixels)."""
  dtype = np.dtype(tf.as_dtype(dtype).as_numpy_dtype)
  if dtype == np.dtype(object):  # Encoded JPEG/PNG bytes decode to uint8.
    return 255.0
  if dtype not in PIXEL_DTYPES:
    raise ValueError(f'image dtype {dtype}: the input pipeline reads '
                     f'{", ".join(str(d) for d in PIXEL_DTYPES)}.')
  return PIXEL_DTYPES[dtype]


def stored_image(builder: tfds.core.DatasetBuilder) -> tuple[tuple, np.dtype]:
  """(shape, dtype) of the stored 'image' feature; None for varying sizes."""
  image = builder.info.features['image']
  return tuple(image.shape), np.dtype(image.np_dtype)


def check_channels(builder: tfds.core.DatasetBuilder, config: DatasetConfig):
  """Raises ValueError when config.dataset.channels cannot read the data set.

  Encoded images (JPEG/PNG) convert between 1 and 3 channels; stored arrays
  must have exactly config.dataset.channels.
  """
  shape, dtype = stored_image(builder)
  stored = shape[-1]
  if image_is_encoded(builder):
    if config.channels not in (1, 3):
      raise ValueError(
          f'config.dataset.channels={config.channels}: data set '
          f'{builder.name!r} stores encoded images (JPEG/PNG), which decode '
          'to 1 or 3 channels: set --config.dataset.channels=3 (or 1 for grey).')
  elif stored is not None and stored != config.channels:
    raise ValueError(
        f'config.dataset.channels={config.channels} but data set '
        f'{builder.name!r} stores {stored}-channel {dtype} arrays: set '
        f'--config.dataset.channels={stored}.')


def channel_stats(builder: tfds.core.DatasetBuilder) -> dict | None:
  """Per-channel statistics that mae_jax.data.prepare stored, or None.

  Returns {'mean': [...], 'std': [...], 'units': str, 'dtype': str,
  'split': str, 'num_pixels': int} as written by `prepare`.
  """
  path = os.path.join(builder.data_dir, METADATA_FILENAME)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    metadata = json.load(f)
  return metadata.get(STATS_KEY)


def resolve_stats(config: DatasetConfig,
                  builder: tfds.core.DatasetBuilder | None = None
                  ) -> DatasetConfig:
  """config with mean / std taken from the data set's metadata when ().

  Raises:
    ValueError: mean / std are () and the data set stores no statistics, or
      stores them for another channel count.
  """
  if config.has_stats:
    return config
  builder = builder or get_builder(config)
  stats = channel_stats(builder)
  if stats is None:
    raise ValueError(
        f'config.dataset.mean=() and std=() mean "from the data set\'s '
        f'metadata", but data set {config.name!r} stores no channel '
        f'statistics (no {STATS_KEY!r} in {builder.data_dir}/'
        f'{METADATA_FILENAME}). Set --config.dataset.mean and '
        '--config.dataset.std (one value per channel, in [0, 1] pixel units '
        'for integer pixels), or prepare the data set again with '
        'python -m mae_jax.data.prepare, which stores them.')
  mean = tuple(float(v) for v in stats['mean'])
  std = tuple(float(v) for v in stats['std'])
  if not all(math.isfinite(v) for v in mean + std):
    raise ValueError(
        f'data set {config.name!r} stores channel statistics that are not finite (mean {list(mean)}, std '
        f'{list(std)} in {builder.data_dir}/{METADATA_FILENAME}): some of its pixels are NaN or infinite. '
        'Replace them in the source files and prepare the data set again (mae_jax.data.prepare now refuses '
        'such files, naming them).')
  if len(mean) != config.channels:
    raise ValueError(
        f'config.dataset.channels={config.channels} but data set '
        f'{config.name!r} stores statistics of {len(mean)} channels; set '
        f'--config.dataset.channels={len(mean)} or set config.dataset.mean '
        'and std explicitly.')
  resolved = dataclasses.replace(config, mean=mean,
                                 std=tuple(s if s > 0 else 1.0 for s in std))
  resolved.validate()
  return resolved


def has_labels(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether the data set has a class-label feature named 'label'."""
  features = builder.info.features
  return 'label' in features and isinstance(
      features['label'], tfds.features.ClassLabel)


def image_is_encoded(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether 'image' is stored as JPEG/PNG bytes (a tfds Image feature)."""
  return isinstance(builder.info.features['image'], tfds.features.Image)


def image_is_packed(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether 'image' is an array of varying size (prepare --source=arrays: without --image_size).

  Such images travel through reading, shuffling, caching and batching as
  serialized tensors (scalar strings, `pack_image`) and are parsed back
  where they are preprocessed (`image_unpacker`), under the corrupt-image guard.
  """
  feature = builder.info.features['image']
  return not image_is_encoded(builder) and not all(d is not None for d in feature.shape)


def pack_image(example: dict) -> dict:
  return {**example, 'image': tf.io.serialize_tensor(example['image'])}


def image_unpacker(builder: tfds.core.DatasetBuilder):
  """fn(image as read) -> the image to preprocess: the stored array of a packed one, else as it is."""
  if not image_is_packed(builder):
    return lambda image: image
  feature = builder.info.features['image']
  dtype, channels = feature.tf_dtype, feature.shape[-1]
  return lambda image: tf.ensure_shape(tf.io.parse_tensor(image, dtype), [None, None, channels])


def split_num_examples(builder: tfds.core.DatasetBuilder, split: Any,
                       setting: str = 'split') -> int:
  """Number of examples of a TFDS split string or sub-split."""
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError, AssertionError) as e:
    raise ValueError(
        f'{setting}={split!r} is not a valid split of data set '
        f'{builder.name!r} (splits: {sorted(builder.info.splits.keys())}); '
        "use a TFDS split string such as 'train', 'train[:90%]' or "
        f"'train[90%:]': {e}") from None


def process_split(split: str, process_index: int, process_count: int) -> Any:
  """The part of `split` read by one process: disjoint, sizes differ <= 1."""
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index}: must be in [0, process_count='
        f'{process_count}).')
  return tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count)


def read_records(builder: tfds.core.DatasetBuilder, split: Any,
                 *, decode_image: bool = False) -> tf.data.Dataset:
  """Examples of `split` in a fixed order, image bytes left undecoded.

  Elements are {'image': string (JPEG/PNG bytes, or a packed array: see
  `image_is_packed`) or an array [H, W, C], 'label'?: int64, 'record':
  string, e.g. 'record 17 of NAME-train.tfrecord-00003-of-00016', for
  warnings about the example}: parsing a record
  is cheap, decoding its image is not, so decoding happens later, after
  examples have been shuffled and skipped.
  """
  decoders = None
  if image_is_encoded(builder) and not decode_image:
    decoders = {'image': tfds.decode.SkipDecoding()}
  options = tf.data.Options()
  options.deterministic = True
  read_config = tfds.ReadConfig(options=options, try_autocache=False,
                                skip_prefetch=True, add_tfds_id=True)
  ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False,
                          read_config=read_config)
  keys = ['image'] + (['label'] if has_labels(builder) else [])
  pack = pack_image if image_is_packed(builder) and not decode_image else (lambda ex: ex)
  if 'tfds_id' in ds.element_spec:  # 'FILE__INDEX' for data TFDS reads from files.
    name = lambda index, ex: tf.strings.regex_replace(ex['tfds_id'], r'^(.*)__(\d+)$', r'record \2 of \1')
  else:
    part = getattr(split, 'split', None)  # tfds.split_for_jax_process's part of a split: say which.
    where = f' of {builder.name} {split}' if part is None else (
        f' of {builder.name} {part} (part {split.index + 1} of {split.count})')
    name = lambda index, ex: tf.strings.join(['example ', tf.strings.as_string(index), where])
  return ds.enumerate().map(lambda index, ex: {**pack({k: ex[k] for k in keys}), 'record': name(index, ex)},
                            num_parallel_calls=tf.data.AUTOTUNE)
