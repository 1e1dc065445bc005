r"""Array data sets: N-channel, 16-bit and float pixels, stored without loss.

  python -m mae_jax.data.prepare --source=arrays:/path/to/arrays \
      [--name=my_bands] [--channels=N] [--image_size=H,W] --data_dir=DIR

Every .npy / .npz file (read with allow_pickle=False) or multi-page TIFF
under the folder is one image:

  * .npy: an array [H, W, C] (or [H, W] for one channel);
  * .npz: the same, under the key 'image' or as the file's only array;
  * .tif / .tiff: the pages are the channels (each page [H, W]; pages with
    several samples, e.g. RGB, add theirs in order), read with PIL, or with
    tifffile when it is installed.

Pixels are uint8, uint16 or float32 (float16 is widened, exactly); other
dtypes fail, naming the file. All images share the first one's channel count
(or --channels) and dtype; with --image_size every image must have that size,
otherwise sizes may vary (training crops and resizes to
config.dataset.image_size). Images are stored as zlib-compressed tensors of
their own dtype, so reading returns exactly the values written.

Labels come from first-level sub-folder names, as for folders of images, and
first-level folders train/, val/, validation/, test/ are splits as there.
Files that cannot be read are skipped and listed (skipped_files.txt); a
float file holding NaN or infinite values stops the preparation, naming it.
Per-channel mean and std over the split are stored in the data set's
metadata.json (see `ChannelStats`); configs with config.dataset.mean = ()
and std = () use them.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image, ImageSequence

from mae_jax.data import dataset_writer, sources
from mae_jax.data.dataset_writer import PrepareError

try:  # Optional: reads TIFF layouts PIL does not (e.g. planar multi-sample pages).
  import tifffile  # pytype: disable=import-error
except ImportError:  # pragma: no cover - depends on the environment
  tifffile = None

ARRAY_EXTENSIONS = ('.npy', '.npz', '.tif', '.tiff')
VERSION = '1.0.0'


class ChannelStats:
  """Per-channel mean and standard deviation, accumulated image by image.

  Integer pixels are counted in [0, 1] units (the value divided by the
  dtype's maximum, 255 or 65535), as config.dataset.mean / std are; float
  pixels in their stored units. Each image's mean and sum of squared
  deviations (float64) are merged with Chan et al.'s parallel formula, so
  the result equals numpy's mean and std (ddof=0) over all pixels of the
  split, without its rounding on long sums.
  """

  def __init__(self, channels: int, dtype: np.dtype):
    self.channels = channels
    self.dtype = np.dtype(dtype)
    self.scale = sources.PIXEL_DTYPES[self.dtype] or 1.0
    self.count = 0
    self.num_images = 0
    self.mean = np.zeros(channels, np.float64)
    self.m2 = np.zeros(channels, np.float64)

  def add(self, image: np.ndarray):
    """Adds one [H, W, C] image."""
    pixels = image.reshape(-1, self.channels).astype(np.float64) / self.scale
    count = pixels.shape[0]
    if not count:
      return
    mean = pixels.mean(0)
    m2 = ((pixels - mean) ** 2).sum(0)
    total = self.count + count
    delta = mean - self.mean
    self.mean = self.mean + delta * count / total
    self.m2 = self.m2 + m2 + delta ** 2 * self.count * count / total
    self.count = total
    self.num_images += 1

  @property
  def std(self) -> np.ndarray:
    return np.sqrt(self.m2 / max(self.count, 1))

  def as_metadata(self, split: str = 'train') -> dict:
    """The dict stored under sources.STATS_KEY in the data set's metadata.json."""
    units = ('stored float units' if sources.PIXEL_DTYPES[self.dtype] is None
             else f'[0, 1]: value / {self.scale:g}')
    return {'mean': [float(v) for v in self.mean], 'std': [float(v) for v in self.std],
            'units': units, 'dtype': str(self.dtype), 'split': split,
            'num_pixels': int(self.count), 'num_images': int(self.num_images)}


class UnreadableFile(Exception):
  """A file that cannot be read as an array (skipped and listed by prepare_arrays)."""


def _first_readable(files: Sequence[str], read) -> tuple[np.ndarray, str]:
  """The first file that reads, which sets the data set's channels and dtype; PrepareError when none does."""
  errors = []
  for relpath in files:
    try:
      return read(relpath), relpath
    except UnreadableFile as e:
      errors.append((relpath, str(e)))
      if len(errors) >= 20:
        break
  raise PrepareError(f'none of the first {len(errors)} array files could be read:\n'
                     + dataset_writer.format_skipped(errors))


def read_array(data: bytes, filename: str) -> np.ndarray:
  """The [H, W, C] array of one .npy, .npz or TIFF file's bytes.

  Raises PrepareError naming the file for layouts and dtypes that are not
  images; decoding errors of corrupt files propagate.
  """
  lower = filename.lower()
  if lower.endswith('.npy'):
    array = np.load(io.BytesIO(data), allow_pickle=False)
  elif lower.endswith('.npz'):
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
      keys = list(arrays.files)
      if 'image' in keys:
        array = arrays['image']
      elif len(keys) == 1:
        array = arrays[keys[0]]
      else:
        raise PrepareError(f'{filename}: holds arrays {keys}; put the image under the key "image" '
                           '(np.savez(path, image=array)) or save one array per file.')
  elif lower.endswith(('.tif', '.tiff')):
    array = _read_tiff(data, filename)
  else:
    raise PrepareError(f'{filename}: not a .npy, .npz or TIFF file.')
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3:
    raise PrepareError(f'{filename}: array of shape {array.shape}; an image is [H, W, C] (channels last) '
                       'or [H, W].')
  if array.dtype == np.float16:
    array = array.astype(np.float32)  # Exact.
  if array.dtype.newbyteorder('=') in sources.PIXEL_DTYPES:
    array = array.astype(array.dtype.newbyteorder('='), copy=False)
  if array.dtype not in sources.PIXEL_DTYPES:
    raise PrepareError(f'{filename}: pixels of dtype {array.dtype}; the data set stores uint8, uint16 or '
                       'float32 without loss: convert the file to one of them (float64 to float32, int16 to '
                       'float32 or shifted to uint16).')
  return array


def _read_tiff(data: bytes, filename: str) -> np.ndarray:
  if tifffile is not None:
    with tifffile.TiffFile(io.BytesIO(data)) as tiff:
      pages = [page.asarray() for page in tiff.pages]
    pages = [p if p.ndim == 3 else p[..., None] for p in pages]
  else:
    pages = []
    with Image.open(io.BytesIO(data)) as image:
      for frame in ImageSequence.Iterator(image):
        page = np.asarray(frame)
        pages.append(page if page.ndim == 3 else page[..., None])
  sizes = {p.shape[:2] for p in pages}
  if len(sizes) != 1:
    raise PrepareError(f'{filename}: its pages have different sizes {sorted(sizes)}; the pages of one '
                       'image are its channels and must share a size.')
  return np.concatenate(pages, axis=-1)


def parse_image_size(value: str | int | Sequence[int] | None) -> tuple[int, int] | None:
  """'48,32' or 48 or (48, 32) -> (48, 32) / (48, 48); None or '' -> None."""
  if value is None or value == '' or value == 0:
    return None
  if isinstance(value, str):
    try:
      parts = [int(v) for v in value.replace('x', ',').split(',')]
    except ValueError:
      raise PrepareError(f'--image_size={value}: use H,W (e.g. 48,32) or one side.') from None
  else:
    parts = [value] if isinstance(value, int) else list(value)
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2 or min(parts) <= 0:
    raise PrepareError(f'--image_size={value}: use H,W (e.g. 48,32) or one side, all > 0.')
  return int(parts[0]), int(parts[1])


def prepare_arrays(folder: str, data_dir: str, *, name: str | None = None, channels: int = 0,
                   image_size: str | int | Sequence[int] | None = None, labels: str = 'auto',
                   num_workers: int | None = None, overwrite: bool = False, progress: bool = True,
                   seed: int = 0, split_folders: bool = True) -> str:
  """Writes every array file under `folder` as TFDS data set `name`, split 'train' (or one split per folder).

  Args:
    folder: root of the tree of .npy / .npz / TIFF files (local or gs://).
    data_dir: TFDS data directory (local or gs://).
    name: data set name; default from the folder's name.
    channels: channels of every image; 0 = the first file's.
    image_size: if set ((H, W), 'H,W' or a side), every image must have it.
    labels: 'auto', 'subdir' or 'none', as for folders of images.
    num_workers: reading threads; default the number of CPUs.
    overwrite: rebuild even if already prepared.
    progress: show a progress bar.
    seed: seed of the fixed shuffle of examples before they are sharded.
    split_folders: first-level folders train/, val/, validation/, test/ become
      splits, as for folders of images (`dataset_writer.split_layout`).

  Returns:
    The prepared version directory, DIR/NAME/1.0.0.

  Raises:
    PrepareError: a file's channel count, dtype or size differs from the
      data set's, or it holds NaN or infinite values (the message names the
      file and the setting). Files that cannot be read are skipped and listed.
  """
  folder = folder.rstrip('/') or '/'
  if not tf.io.gfile.isdir(folder):
    raise sources.DatasetNotFoundError(f'--source=arrays:{folder}: the folder does not exist.')
  if channels < 0:
    raise PrepareError(f'--channels={channels}: must be >= 1, or 0 for the first file\'s.')
  size = parse_image_size(image_size)
  name = name or dataset_writer.name_from_folder(folder)
  dataset_writer.check_name(name)
  out_dir = os.path.join(data_dir, name, VERSION)
  if dataset_writer.is_prepared(out_dir) and not overwrite:
    print(f'{name} is already prepared in {out_dir}; nothing to do (pass --overwrite to rebuild it).')
    return out_dir
  files = dataset_writer.list_files(folder, ARRAY_EXTENSIONS)
  if not files:
    raise sources.DatasetNotFoundError(
        f'--source=arrays:{folder}: no array files ({", ".join(ARRAY_EXTENSIONS)}) found in the folder '
        'or its sub-folders.')
  splits, class_names, label_of = dataset_writer.split_layout(files, labels, folder, split_folders)

  def read(relpath):
    path = os.path.join(folder, relpath)
    try:
      with tf.io.gfile.GFile(path, 'rb') as f:
        return read_array(f.read(), path)
    except PrepareError:
      raise
    except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except
      raise UnreadableFile(f'{type(e).__name__}: {e}') from None

  first, first_path = _first_readable(files, read)
  channels = channels or first.shape[-1]
  dtype = first.dtype
  shape = (*(size or (None, None)), channels)
  features = dataset_writer.folder_features(
      tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.ZLIB), class_names)
  print(f'Preparing {name} from {len(files)} array files under {folder} '
        f'({dataset_writer.describe_layout(splits, class_names)}; {channels} channels of {dtype}, '
        f'{"size %dx%d" % size if size else "any size"}) into {out_dir}.')

  def checked(relpath):
    """(array, None), or (None, why) for a file that cannot be read; PrepareError when it does not fit."""
    try:
      array = read(relpath)
    except UnreadableFile as e:
      return None, str(e)
    path = os.path.join(folder, relpath)
    if array.shape[-1] != channels:
      raise PrepareError(f'{path}: {array.shape[-1]} channels, but the data set has {channels} (--channels, '
                         'config.dataset.channels); every image needs the same channels.')
    if array.dtype != dtype:
      raise PrepareError(f'{path}: pixels of dtype {array.dtype}, but the data set stores {dtype} (the first '
                         f'file, {os.path.join(folder, first_path)}); convert the files to one dtype.')
    if size and array.shape[:2] != size:
      raise PrepareError(f'{path}: size {array.shape[0]}x{array.shape[1]} (HxW), but --image_size='
                         f'{size[0]},{size[1]}; resize the file or leave --image_size unset (training '
                         'resizes to config.dataset.image_size).')
    if array.dtype.kind == 'f' and not np.isfinite(array).all():
      bad = int(array.size - np.isfinite(array).sum())
      raise PrepareError(f'{path}: {bad} of its {array.size} values are NaN or infinite (e.g. a "no data" '
                         'value); training would spread them to every pixel of the batch through the channel '
                         'statistics. Replace them with a value the model may see, e.g. np.nan_to_num(a, nan=0.0), '
                         'and prepare again.')
    return array, None

  stats_split = 'train' if 'train' in splits else next(iter(splits))
  stats = ChannelStats(channels, dtype)
  skipped = []
  start = time.time()
  with dataset_writer.incomplete_dir(out_dir) as tmp_dir, dataset_writer.progress_bar(
      len(files), f'Preparing {name}', progress) as bar:
    split_infos = dataset_writer.write_splits(
        tmp_dir, name, 'arrays', folder, splits, features, checked, label_of if class_names else None, seed=seed,
        num_workers=num_workers, bar=bar, skipped=skipped,
        on_example=lambda split, array: stats.add(array) if split == stats_split else None)
    dataset_writer.write_metadata(
        tmp_dir, features, split_infos, VERSION, channel_stats=stats.as_metadata(stats_split),
        description=f'Arrays from {folder}, prepared by mae_jax.data.prepare.',
        supervised_keys=('image', 'label') if class_names else None)
    dataset_writer.write_skipped(tmp_dir, skipped)
  dataset_writer.report(
      name, out_dir, split_infos, time.time() - start, skipped, 'array',
      extra=(f'Channel mean {np.round(stats.mean, 4).tolist()}, std {np.round(stats.std, 4).tolist()} '
             f'({stats.as_metadata()["units"]}, over split {stats_split}).'))
  return out_dir
