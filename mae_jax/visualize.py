"""Reconstruction grids: original | masked | reconstruction | reconstruction + visible.

`python -m mae_jax.visualize --workdir=DIR [--step=N] [--out=PATH] [--images=FILE,...] [--bands=3,2,1]`
takes a pretraining checkpoint and either images from the run's eval split or
the given image (or .npy / .npz / TIFF array) files, writes a PNG (local or
gs://; and a TensorBoard image under the workdir) and prints the PNG's path.
`--weights=PATH --images=FILE,...` does the same for exported or imported
weights that include the decoder.

Images of any channel count are shown through three of their channels: the
first three (one channel: grey), or the channels `--bands` (or the run's
config.dataset.display_bands) names, counted from 0, shown as red, green,
blue. Integer pixels are shown over their full range; float pixels (whose
range the grid cannot know) over mean +- 2 std of each band.

With norm_pix_loss the model predicts each patch in its own normalised space;
predictions are mapped back to pixels with statistics the model saw: a visible
patch's own mean and variance, and for a masked patch the average over its
visible neighbours (never the hidden patch's own, which would let the picture
look better than the model is).
"""

import io
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from mae_jax import checkpoint, console, fileio, metrics, weights
from mae_jax.data import IMAGENET_MEAN, IMAGENET_STD, arrays, input_pipeline, preprocess, sources, synthetic
from mae_jax.models import from_config
from mae_jax.models import mae as mae_lib


def denormalize_pixels(pred, target, mask, grid):
  """Maps norm_pix predictions [N, L, P] back to pixels using only what the model saw.

  A visible patch uses its own mean and variance. A masked patch, whose
  statistics the model never saw, uses the average mean and variance of the
  visible patches among its 3x3 neighbours on the patch grid `grid` (gh, gw),
  or of all the image's visible patches when none of its neighbours is visible.
  """
  n, length = mask.shape
  gh, gw = grid
  visible = 1.0 - mask

  def estimate(stat):  # [N, L] -> [N, L]: the visible neighbourhood's average at every patch
    pooled = (stat * visible).sum(1, keepdims=True) / jnp.maximum(visible.sum(1, keepdims=True), 1.0)
    padded = lambda x: jnp.pad(x.reshape(n, gh, gw), ((0, 0), (1, 1), (1, 1)))
    box = lambda x: sum(padded(x)[:, i:i + gh, j:j + gw] for i in range(3) for j in range(3)).reshape(n, length)
    weight = box(visible)
    local = box(stat * visible) / jnp.maximum(weight, 1.0)
    return jnp.where(mask > 0, jnp.where(weight > 0, local, pooled), stat)

  mean = estimate(target.mean(-1))[..., None]
  var = estimate(target.var(-1, ddof=1))[..., None]
  return pred * jnp.sqrt(var + mae_lib.NORM_PIX_EPS) + mean


def reconstruct(model, params, images, mask_ratio: float, rng):
  """Returns (reconstruction, reconstruction with visible patches pasted, mask image), NHWC."""
  images = jnp.asarray(images, jnp.float32)
  _, pred, mask = model.apply({'params': params}, images, mask_ratio=mask_ratio, rngs={'mask': rng},
                              train=False)
  pred = pred.astype(jnp.float32)
  grid = (images.shape[1] // model.patch_size, images.shape[2] // model.patch_size)
  if model.norm_pix_loss:
    pred = denormalize_pixels(pred, mae_lib.patchify(images, model.patch_size), mask, grid)
  channels = images.shape[-1]
  recon = mae_lib.unpatchify(pred, model.patch_size, grid, channels)
  mask_image = mae_lib.unpatchify(jnp.repeat(mask[..., None], model.patch_size**2 * channels, -1),
                                  model.patch_size, grid, channels)
  pasted = images * (1 - mask_image) + recon * mask_image
  return recon, pasted, mask_image


def parse_bands(bands, channels: int) -> tuple[int, ...]:
  """The channels shown as RGB: `bands` ('3,2,1', a sequence, or empty = the first three; one channel: grey).

  Raises ValueError naming the setting when a band is not a channel of the images.
  """
  if isinstance(bands, str):
    try:
      bands = [int(b) for b in bands.split(',') if b.strip()]
    except ValueError:
      raise ValueError(f'--bands={bands}: give three channel indices counted from 0, e.g. 3,2,1') from None
  bands = tuple(int(b) for b in (bands or ()))
  if not bands:
    return (0, 1, 2) if channels >= 3 else (0,)
  if len(bands) not in (1, 3) or not all(0 <= b < channels for b in bands):
    raise ValueError(f'--bands / dataset.display_bands={bands}: give three (or one, shown grey) channel '
                     f'indices in [0, {channels}) (counted from 0) for images of {channels} channels')
  return bands


def _to_uint8(images, mean, std, bands=None, value_range=None):
  """Normalised [N, H, W, C] -> uint8 [N, H, W, 3] of `bands`, de-normalised; value_range: per band (low, high)."""
  images = np.asarray(images)
  bands = parse_bands(bands, images.shape[-1])
  mean = np.broadcast_to(np.asarray(mean, np.float32), images.shape[-1:])[list(bands)]
  std = np.broadcast_to(np.asarray(std, np.float32), images.shape[-1:])[list(bands)]
  images = images[..., list(bands)] * std + mean
  low, high = (0.0, 1.0) if value_range is None else value_range
  images = np.clip((images - low) / np.maximum(np.asarray(high) - low, 1e-12), 0.0, 1.0)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return (images * 255 + 0.5).astype(np.uint8)


def reconstruction_grid(model, params, images, mask_ratio: float, rng, *, mean, std, min_tile: int = 112,
                        bands=None, value_range=None):
  """uint8 [rows*H, 4*W, 3] grid, one row per image; masked patches shown grey."""
  recon, pasted, mask_image = reconstruct(model, params, images, mask_ratio, rng)
  return grid_of(images, recon, pasted, mask_image, mean=mean, std=std, min_tile=min_tile, bands=bands,
                 value_range=value_range)


def grid_of(images, recon, pasted, mask_image, *, mean, std, min_tile: int = 112, bands=None, value_range=None):
  """The grid of `reconstruct`'s outputs (host arrays): original | masked | reconstruction | pasted.

  bands: the channels shown as RGB (`parse_bands`); value_range: (low, high)
  de-normalised values shown black and white, per band (default (0, 1)).
  """
  show = lambda x: _to_uint8(x, mean, std, bands, value_range)
  originals = show(images)
  masked = np.where(np.asarray(mask_image)[..., :1] > 0, np.uint8(128), originals)
  columns = [originals, masked, show(recon), show(pasted)]
  rows = [np.concatenate([c[i] for c in columns], axis=1) for i in range(len(originals))]
  grid = np.concatenate(rows, axis=0)
  scale = max(1, min_tile // min(originals.shape[1:3]))
  return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)


def float_value_range(mean, std):
  """(low, high) per band for float pixels, whose range is unknown: mean -+ 2 std."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return mean - 2 * std, mean + 2 * std


GRID_COLUMNS = ('original', 'masked', 'reconstruction', 'recon. + visible')  # grid_of's columns.


def with_column_titles(grid: np.ndarray, titles=GRID_COLUMNS) -> np.ndarray:
  """The grid under a white strip naming its equal-width columns (each title shrunk to fit its column)."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  width = grid.shape[1] // len(titles)
  height = max(14, min(28, width // 6))
  strip = Image.new('RGB', (grid.shape[1], height), (255, 255, 255))
  draw = ImageDraw.Draw(strip)
  for i, title in enumerate(titles):
    for size in range(height - 4, 5, -1):  # The largest size whose text fits the column.
      try:
        font = ImageFont.load_default(size=size)
      except TypeError:  # Pillow < 10.1: one bitmap size.
        font = ImageFont.load_default()
      if draw.textlength(title, font=font) <= width - 4:
        break
    left = i * width + (width - draw.textlength(title, font=font)) / 2
    draw.text((max(i * width + 2, left), 2), title, fill=(0, 0, 0), font=font)
  return np.concatenate([np.asarray(strip, np.uint8), grid], axis=0)


def save_png(grid: np.ndarray, path: str) -> str:
  """Writes the grid as a PNG (local or gs://); returns the path."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(grid).save(buffer, format='PNG')
  if not fileio.is_remote(path):
    path = os.path.abspath(path)
  fileio.write_bytes(path, buffer.getvalue())
  return path


def load_image_files(paths: Sequence[str], image_size, channels: int, mean, std) -> np.ndarray:
  """Reads image or array files, resizes to cover, center-crops, normalises: [N, H, W, C].

  image_size is a side or (height, width). Array files (.npy, .npz, TIFF)
  take the data pipeline's eval transform (any channels, uint8 / uint16 /
  float32, mean / std in its units); other images are read with PIL.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  height, width = preprocess.hw(image_size)
  out = []
  for path in paths:
    if path.lower().endswith(arrays.ARRAY_EXTENSIONS):
      out.append(_load_array_file(path, (height, width), channels, mean, std))
      continue
    try:
      with fileio.path(path).open('rb') as f, Image.open(f) as image:
        image = image.convert('L' if channels == 1 else 'RGB')
        scale = max(height / image.size[1], width / image.size[0])
        size = (max(width, round(image.size[0] * scale)), max(height, round(image.size[1] * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
    except OSError as e:
      raise ValueError(f'--images: cannot read {path}: {e}') from e
    if channels not in (1, 3):
      raise ValueError(f'--images: {path} is an image file, read as 1 or 3 channels, but the model takes '
                       f'{channels} (dataset.channels): pass .npy / .npz / TIFF arrays of {channels} channels')
    array = np.asarray(image, np.float32).reshape(height, width, channels) / 255.0
    out.append((array - np.asarray(mean)) / np.asarray(std))
  return np.stack(out).astype(np.float32)


def _load_array_file(path, size, channels, mean, std) -> np.ndarray:
  try:
    array = arrays.read_array(fileio.read_bytes(path), path)
  except (OSError, ValueError) as e:
    raise ValueError(f'--images: cannot read {path}: {e}') from e
  if array.shape[-1] != channels:
    raise ValueError(f'--images: {path} has {array.shape[-1]} channels but the model takes {channels} '
                     '(dataset.channels)')
  resize = tuple(round(s * 256 / 224) for s in size)
  image = preprocess.eval_preprocess(array, image_size=size, resize_size=resize, channels=channels,
                                     mean=mean, std=std)
  return np.asarray(image)


def eval_images(config: ml_collections.ConfigDict, num_images: int, split: str | None = None) -> np.ndarray:
  """The first `num_images` images of the eval split, eval-preprocessed."""
  batches = input_pipeline.create_eval_iterator(
      config.dataset, split=split or config.dataset.eval_split, batch_size=num_images,
      process_index=0, process_count=1)
  batch = next(iter(batches))
  return np.asarray(batch['image'])[np.asarray(batch['mask'], bool)][:num_images]


def visualize_checkpoint(workdir: str, out: str | None = None, *, step: int | None = None,
                         image_files: Sequence[str] = (), num_images: int = 8, seed: int = 0,
                         mask_ratio: float | None = None, bands=None) -> str:
  """Writes the reconstruction grid of a pretraining checkpoint; returns the PNG path.

  bands: channels shown as RGB (see `parse_bands`); default the run's
  config.dataset.display_bands, else the first three. The grid of the run's
  own images at its mask ratio also goes to the run's TensorBoard (tag
  'reconstructions', at the checkpoint's step).
  """
  params, config_dict = checkpoint.load_params(workdir, step)
  if 'decoder' not in params or 'downstream' in config_dict:
    raise ValueError(
        f'--workdir={workdir}: its checkpoint has no MAE decoder (top-level keys {sorted(params)}), so '
        f'nothing can be reconstructed: use the workdir of a pretraining run.')
  config = ml_collections.ConfigDict(config_dict)
  model = from_config.build_mae(config)
  synthetic_data = config.dataset.name == 'synthetic'
  mean, std, value_range = config.dataset.mean, config.dataset.std, None
  if not synthetic_data:
    data = sources.DatasetConfig.from_config(config.dataset)
    builder = None
    if not data.has_stats or not image_files:
      builder = sources.get_builder(data)
      data = sources.resolve_stats(data, builder)
      if sources.stored_image(builder)[1] == np.float32:
        value_range = float_value_range(data.mean, data.std)
    mean, std = data.mean, data.std
  if image_files:
    images = load_image_files(image_files, config.dataset.image_size, config.dataset.channels, mean, std)
  elif synthetic_data:  # a run on generated data: show generated images
    images = synthetic.global_batch(seed, 0, num_images, config.dataset.image_size, config.dataset.channels)
  else:
    images = eval_images(config, num_images)
  ratio = config.mask_ratio if mask_ratio is None else mask_ratio
  if not bands and 'display_bands' in config.dataset:  # runs saved before the key existed lack it
    bands = config.dataset.display_bands
  grid = reconstruction_grid(model, params, images, ratio, jax.random.key(seed), mean=mean, std=std,
                             bands=bands, value_range=value_range)
  out = out or fileio.join(workdir, 'reconstructions.png')
  out = save_png(with_column_titles(grid), out)
  if not image_files and ratio == config.mask_ratio:
    # The run's own images at its own mask ratio: its TensorBoard gets the picture too, through the writer the
    # trainers use (fileio: gs:// as well); a storage error there is a warning (metrics._Storage), the PNG above
    # is the result. Pictures of other images or ratios are the PNG's only.
    writer = metrics.TensorBoardWriter(workdir)
    writer.write_images(checkpoint.latest_step(workdir) if step is None else step, {'reconstructions': grid[None]})
    writer.close()
  return out


def visualize_weights(path: str, image_files: Sequence[str], out: str, *, model_name: str | None = None,
                      seed: int = 0, mask_ratio: float = 0.75, norm_pix_loss: bool | None = None,
                      bands=None) -> str:
  """Writes the reconstruction grid of exported or imported weights (with a decoder); returns the PNG path.

  `path` is anything `weights.load_weights` reads (an export of this project, a
  reference .pth, a safetensors file, a Hugging Face folder). The image
  normalisation and norm_pix_loss come from the export's metadata (its run's
  config) when it has them, else ImageNet's statistics and norm_pix_loss=True.
  """
  if not image_files:
    raise ValueError('--weights needs --images=FILE,...: weights carry no data set to take images from')
  params, model_name, overrides = weights.load_weights(path, model_name)
  meta = weights.read_metadata(path) or {}
  dataset = ((meta.get('config') or {}).get('dataset') or {})
  if norm_pix_loss is None:
    norm_pix_loss = bool(meta.get('norm_pix_loss', True))
  if 'decoder' not in params:
    raise ValueError(f'--weights={path}: the weights have no MAE decoder, so nothing can be reconstructed; '
                     f'export or import them with --full')
  model = mae_lib.get_model(model_name, **{**overrides, 'norm_pix_loss': norm_pix_loss})
  mean, std = tuple(dataset.get('mean') or ()), tuple(dataset.get('std') or ())
  if not mean or not std:
    if model.in_channels != 3:
      raise ValueError(f'--weights={path}: its metadata carries no dataset.mean / std for its '
                       f'{model.in_channels} channels; export from a run whose config.json has them')
    mean, std = IMAGENET_MEAN, IMAGENET_STD
  images = load_image_files(image_files, model.image_size, model.in_channels, mean, std)
  bands = bands if bands else dataset.get('display_bands', ())
  grid = reconstruction_grid(model, params, images, mask_ratio, jax.random.key(seed), mean=mean, std=std,
                             bands=bands)
  return save_png(with_column_titles(grid), out)


FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string('workdir', None, 'Workdir of a pretraining run.')
  flags.DEFINE_string('weights', None, 'Instead of --workdir: exported or imported weights with a decoder '
                      '(an export of this project, a reference .pth, safetensors or a Hugging Face folder).')
  flags.DEFINE_string('model', None, "With --weights: the model name, when the weights' metadata lacks it.")
  flags.DEFINE_bool('norm_pix_loss', None, "With --weights: whether the model predicts normalised patches "
                    "(default: the metadata's, else True).")
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
  flags.DEFINE_string('out', None, 'PNG path (default: WORKDIR/reconstructions.png).')
  flags.DEFINE_list('images', [], 'Image files to reconstruct (default: the eval split).')
  flags.DEFINE_integer('num_images', 8, 'Images from the eval split.')
  flags.DEFINE_integer('seed', 0, 'Seed of the masks.')
  flags.DEFINE_float('mask_ratio', None, "Mask ratio (default: the run's; 0.75 with --weights).")
  flags.DEFINE_string('bands', None, 'Channels shown as red, green, blue, counted from 0 (e.g. 3,2,1); '
                      "default: the run's dataset.display_bands, else the first three (one channel: grey).")


def main(argv):
  del argv
  if bool(FLAGS.workdir) == bool(FLAGS.weights):
    raise app.UsageError('give exactly one of --workdir (a pretraining run) and --weights (exported weights)')
  console.setup('visualize', FLAGS.workdir, reads_only=True)  # Library INFO lines to a log file (--verbose: here).
  console.start_backends()  # A stray libtpu's probe errors to the log file.
  try:
    if FLAGS.weights:
      path = visualize_weights(FLAGS.weights, FLAGS.images, FLAGS.out or 'reconstructions.png', model_name=FLAGS.model,
                               seed=FLAGS.seed, mask_ratio=0.75 if FLAGS.mask_ratio is None else FLAGS.mask_ratio,
                               norm_pix_loss=FLAGS.norm_pix_loss, bands=FLAGS.bands)
    else:
      path = visualize_checkpoint(FLAGS.workdir, FLAGS.out, step=FLAGS.step, image_files=FLAGS.images,
                                  num_images=FLAGS.num_images, seed=FLAGS.seed, mask_ratio=FLAGS.mask_ratio,
                                  bands=FLAGS.bands)
  except (ValueError, FileNotFoundError, FileExistsError, fileio.StorageError, checkpoint.CheckpointReadError) as e:
    console.exit_on_error(e, 'mae_jax.visualize')  # A user error: one line; the traceback in the log.
  print(f'Reconstructions written to {path}')


def run():
  console.define_flags()  # --verbose.
  flags.adopt_module_key_flags(console)  # Listed by --help.
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
