"""Reconstruction grids: original | masked | reconstruction | reconstruction + visible.

`python -m mae_jax.visualize --workdir=DIR [--step=N] [--out=PATH] [--images=FILE,...]`
takes a pretraining checkpoint and either images from the run's eval split or
the given image files, writes a PNG (and a TensorBoard image under the
workdir) and prints the PNG's path. `--weights=PATH --images=FILE,...` does the
same for exported or imported weights that include the decoder.

With norm_pix_loss the model predicts each patch in its own normalised space;
predictions are mapped back to pixels with statistics the model saw: a visible
patch's own mean and variance, and for a masked patch the average over its
visible neighbours (never the hidden patch's own, which would let the picture
look better than the model is).
"""

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from mae_jax import checkpoint, weights
from mae_jax.data import IMAGENET_MEAN, IMAGENET_STD, input_pipeline, synthetic
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


def _to_uint8(images, mean, std):
  images = np.asarray(images) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  images = np.clip(images, 0.0, 1.0)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return (images * 255 + 0.5).astype(np.uint8)


def reconstruction_grid(model, params, images, mask_ratio: float, rng, *, mean, std, min_tile: int = 112):
  """uint8 [rows*H, 4*W, 3] grid, one row per image; masked patches shown grey."""
  recon, pasted, mask_image = reconstruct(model, params, images, mask_ratio, rng)
  return grid_of(images, recon, pasted, mask_image, mean=mean, std=std, min_tile=min_tile)


def grid_of(images, recon, pasted, mask_image, *, mean, std, min_tile: int = 112):
  """The grid of `reconstruct`'s outputs (host arrays): original | masked | reconstruction | pasted."""
  originals = _to_uint8(images, mean, std)
  masked = np.where(np.asarray(mask_image) > 0, np.uint8(128), originals)
  columns = [originals, masked, _to_uint8(recon, mean, std), _to_uint8(pasted, mean, std)]
  rows = [np.concatenate([c[i] for c in columns], axis=1) for i in range(len(originals))]
  grid = np.concatenate(rows, axis=0)
  scale = max(1, min_tile // originals.shape[1])
  return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)


def save_png(grid: np.ndarray, path: str) -> str:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid).save(path)
  return path


def load_image_files(paths: Sequence[str], image_size: int, channels: int, mean, std) -> np.ndarray:
  """Reads image files, resizes the shorter side, center-crops, normalises: [N, S, S, C]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = []
  for path in paths:
    try:
      with Image.open(path) as image:
        image = image.convert('L' if channels == 1 else 'RGB')
        scale = image_size / min(image.size)
        size = (max(image_size, round(image.size[0] * scale)), max(image_size, round(image.size[1] * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    except OSError as e:
      raise ValueError(f'--images: cannot read {path}: {e}') from e
    array = np.asarray(image, np.float32).reshape(image_size, image_size, channels) / 255.0
    out.append((array - np.asarray(mean)) / np.asarray(std))
  return np.stack(out)


def eval_images(config: ml_collections.ConfigDict, num_images: int, split: str | None = None) -> np.ndarray:
  """The first `num_images` images of the eval split, eval-preprocessed."""
  batches = input_pipeline.create_eval_iterator(
      config.dataset, split=split or config.dataset.eval_split, batch_size=num_images,
      process_index=0, process_count=1)
  batch = next(iter(batches))
  return np.asarray(batch['image'])[np.asarray(batch['mask'], bool)][:num_images]


def visualize_checkpoint(workdir: str, out: str | None = None, *, step: int | None = None,
                         image_files: Sequence[str] = (), num_images: int = 8, seed: int = 0,
                         mask_ratio: float | None = None) -> str:
  """Writes the reconstruction grid of a pretraining checkpoint; returns the PNG path."""
  params, config_dict = checkpoint.load_params(workdir, step)
  if 'decoder' not in params or 'downstream' in config_dict:
    raise ValueError(
        f'--workdir={workdir}: its checkpoint has no MAE decoder (top-level keys {sorted(params)}), so '
        f'nothing can be reconstructed: use the workdir of a pretraining run.')
  config = ml_collections.ConfigDict(config_dict)
  model = from_config.build_mae(config)
  if image_files:
    images = load_image_files(image_files, config.dataset.image_size, config.dataset.channels,
                              config.dataset.mean, config.dataset.std)
  elif config.dataset.name == 'synthetic':  # a run on generated data: show generated images
    images = synthetic.global_batch(seed, 0, num_images, config.dataset.image_size, config.dataset.channels)
  else:
    images = eval_images(config, num_images)
  ratio = config.mask_ratio if mask_ratio is None else mask_ratio
  grid = reconstruction_grid(model, params, images, ratio, jax.random.key(seed),
                             mean=config.dataset.mean, std=config.dataset.std)
  out = out or os.path.join(workdir, 'reconstructions.png')
  save_png(grid, out)
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    writer = metric_writers.create_default_writer(workdir, asynchronous=False)
    writer.write_images(checkpoint.latest_step(workdir) if step is None else step,
                        {'reconstructions': grid[None]})
    writer.close()
  except Exception:  # pylint: disable=broad-except  # TensorBoard is a convenience here
    pass
  return out


def visualize_weights(path: str, image_files: Sequence[str], out: str, *, model_name: str | None = None,
                      seed: int = 0, mask_ratio: float = 0.75, norm_pix_loss: bool | None = None) -> str:
  """Writes the reconstruction grid of exported or imported weights (with a decoder); returns the PNG path.

  `path` is anything `weights.import_weights` reads (an export of this project, a
  reference .pth, a safetensors file, a Hugging Face folder). The image
  normalisation and norm_pix_loss come from the export's metadata (its run's
  config) when it has them, else ImageNet's statistics and norm_pix_loss=True.
  """
  if not image_files:
    raise ValueError('--weights needs --images=FILE,...: weights carry no data set to take images from')
  model_name, overrides = weights.resolve_model(path, model_name, {})
  meta = weights.read_metadata(path) or {}
  dataset = ((meta.get('config') or {}).get('dataset') or {})
  if norm_pix_loss is None:
    norm_pix_loss = bool(meta.get('norm_pix_loss', True))
  params = weights.import_weights(path, model_name)
  if 'decoder' not in params:
    raise ValueError(f'--weights={path}: the weights have no MAE decoder, so nothing can be reconstructed; '
                     f'export or import them with --full')
  model = mae_lib.get_model(model_name, **{**overrides, 'norm_pix_loss': norm_pix_loss})
  mean, std = dataset.get('mean', IMAGENET_MEAN), dataset.get('std', IMAGENET_STD)
  size = model.image_size if isinstance(model.image_size, int) else model.image_size[0]
  images = load_image_files(image_files, size, model.in_channels, mean, std)
  grid = reconstruction_grid(model, params, images, mask_ratio, jax.random.key(seed), mean=mean, std=std)
  return save_png(grid, out)


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


def main(argv):
  del argv
  if bool(FLAGS.workdir) == bool(FLAGS.weights):
    raise app.UsageError('give exactly one of --workdir (a pretraining run) and --weights (exported weights)')
  if FLAGS.weights:
    out = FLAGS.out or 'reconstructions.png'
    path = visualize_weights(FLAGS.weights, FLAGS.images, out, model_name=FLAGS.model, seed=FLAGS.seed,
                             mask_ratio=0.75 if FLAGS.mask_ratio is None else FLAGS.mask_ratio,
                             norm_pix_loss=FLAGS.norm_pix_loss)
    print(f'Reconstructions written to {path}')
    return
  path = visualize_checkpoint(FLAGS.workdir, FLAGS.out, step=FLAGS.step, image_files=FLAGS.images,
                              num_images=FLAGS.num_images, seed=FLAGS.seed, mask_ratio=FLAGS.mask_ratio)
  print(f'Reconstructions written to {path}')


def run():
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
