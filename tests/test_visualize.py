"""Reconstruction grids."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mae_jax import models, visualize


def test_norm_pix_reconstruction_uses_only_visible_statistics():
  model = models.get_model('mae_vit_test', norm_pix_loss=True)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3)) * 3 + 1
  variables = model.init({'params': jax.random.key(0), 'mask': jax.random.key(1)}, images)
  # A prediction equal to the normalised target: visible patches come back exactly; a masked one is
  # mapped with the average mean and variance of its visible 3x3 neighbours (else of all visible).
  target = models.patch_targets(images, 8, True)
  recon, pasted, mask_image = visualize.reconstruct(
      _Const(model, target), variables['params'], images, 0.75, jax.random.key(2))
  visible = np.asarray(mask_image) == 0
  np.testing.assert_allclose(np.asarray(recon)[visible], np.asarray(images)[visible], atol=1e-4)
  np.testing.assert_allclose(np.asarray(pasted)[visible], np.asarray(images)[visible], atol=1e-4)
  assert float(mask_image.mean()) == 0.75
  patches = np.asarray(models.patchify(images, 8))  # [2, 16, 192] on a 4x4 grid
  _, _, mask = model.apply(variables, images, mask_ratio=0.75, rngs={'mask': jax.random.key(2)})
  mask = np.asarray(mask)
  recon_patches = np.asarray(models.patchify(recon, 8))
  means, variances = patches.mean(-1), patches.var(-1, ddof=1)
  for n in range(2):
    for index in np.flatnonzero(mask[n]):
      row, col = divmod(index, 4)
      near = [r * 4 + c for r in range(row - 1, row + 2) for c in range(col - 1, col + 2)
              if 0 <= r < 4 and 0 <= c < 4 and mask[n, r * 4 + c] == 0]
      near = near or list(np.flatnonzero(mask[n] == 0))
      mean, var = means[n, near].mean(), variances[n, near].mean()
      want = np.asarray(target)[n, index] * np.sqrt(var + 1e-6) + mean
      np.testing.assert_allclose(recon_patches[n, index], want, rtol=1e-4, atol=1e-4)


def test_reconstruction_does_not_depend_on_hidden_pixels():
  """Changing a masked patch's pixels changes nothing the picture shows of the model's guess."""
  model = models.get_model('mae_vit_test', norm_pix_loss=True)
  images = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
  variables = model.init({'params': jax.random.key(0), 'mask': jax.random.key(1)}, images)
  recon, _, mask_image = visualize.reconstruct(model, variables['params'], images, 0.75, jax.random.key(2))
  hidden = np.argwhere(np.asarray(mask_image)[0, :, :, 0] > 0)[0]  # a pixel of some masked patch
  row, col = (hidden // 8) * 8
  changed = np.array(images)
  changed[0, row:row + 8, col:col + 8] = changed[0, row:row + 8, col:col + 8] * 5 + 3
  recon2, _, _ = visualize.reconstruct(model, variables['params'], changed, 0.75, jax.random.key(2))
  np.testing.assert_allclose(recon2, recon, atol=1e-5)


class _Const:
  """Wraps a model so that apply returns a fixed prediction with the real mask."""

  def __init__(self, model, pred):
    self._model, self._pred = model, pred
    self.norm_pix_loss, self.patch_size = model.norm_pix_loss, model.patch_size

  def apply(self, variables, images, **kwargs):
    loss, _, mask = self._model.apply(variables, images, **kwargs)
    return loss, self._pred, mask


def test_grid_layout_and_png(tmp_path):
  model = models.get_model('mae_vit_test')
  images = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  variables = model.init({'params': jax.random.key(0), 'mask': jax.random.key(1)}, images)
  grid = visualize.reconstruction_grid(model, variables['params'], images, 0.75, jax.random.key(3),
                                       mean=(0.5,) * 3, std=(0.25,) * 3, min_tile=64)
  assert grid.dtype == np.uint8 and grid.shape == (3 * 64, 4 * 64, 3)
  path = visualize.save_png(grid, str(tmp_path / 'g.png'))
  assert Image.open(path).size == (256, 192)
  # Column 0 is the original image, de-normalised.
  expected = np.clip(np.asarray(images[0]) * 0.25 + 0.5, 0, 1)
  np.testing.assert_allclose(grid[:64:2, :64:2] / 255.0, expected, atol=1 / 255 + 1e-6)
  # The picture a user opens names its columns: a white strip with dark text over each column.
  titled = visualize.with_column_titles(grid)
  strip = titled.shape[0] - grid.shape[0]
  assert 14 <= strip <= 28 and np.array_equal(titled[strip:], grid)
  for column in range(4):
    text = titled[:strip, column * 64:(column + 1) * 64]
    assert (text < 128).any() and (text == 255).mean() > 0.5, column


def test_load_image_files_converts_modes(tmp_path):
  rgba = tmp_path / 'a.png'
  Image.fromarray(np.full((40, 50, 4), 200, np.uint8), 'RGBA').save(rgba)
  gray = tmp_path / 'b.png'
  Image.fromarray(np.full((20, 20), 100, np.uint8), 'L').save(gray)
  images = visualize.load_image_files([str(rgba), str(gray)], 32, 3, (0.0,) * 3, (1.0,) * 3)
  assert images.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(images[0], 200 / 255, atol=1e-6)
  assert jnp.allclose(images[1], 100 / 255, atol=1e-2)


def _tiny_run(tmp_path, **overrides):
  from mae_jax import train
  from tests.configs import tiny_synthetic
  config = tiny_synthetic.get_config()
  config.num_train_steps = 2
  config.checkpoint_every_steps = 2
  config.optim.warmup_steps = 1
  for key, value in overrides.items():
    config[key] = value
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  return workdir


def test_visualize_a_run_on_synthetic_data(tmp_path):
  workdir = _tiny_run(tmp_path)
  before = set(os.listdir(workdir))
  path = visualize.visualize_checkpoint(workdir, str(tmp_path / 'grid.png'), num_images=3)
  assert Image.open(path).size[1] >= 3 * 32
  # The run's TensorBoard gets the grid too, through the trainers' writer (gs:// workdirs alike).
  (events,) = [f for f in set(os.listdir(workdir)) - before if f.startswith('events.out.tfevents')]
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  accumulator = event_accumulator.EventAccumulator(os.path.join(workdir, events))
  accumulator.Reload()
  assert accumulator.Tags()['images'] == ['reconstructions']
  # A picture of other images or at another mask ratio is the PNG's only: the run's TensorBoard stays its own.
  visualize.visualize_checkpoint(workdir, str(tmp_path / 'other.png'), num_images=3, mask_ratio=0.5)
  Image.new('RGB', (32, 32), (90, 20, 200)).save(tmp_path / 'mine.png')
  visualize.visualize_checkpoint(workdir, str(tmp_path / 'mine_grid.png'), image_files=[str(tmp_path / 'mine.png')])
  assert [f for f in set(os.listdir(workdir)) - before if f.startswith('events.out.tfevents')] == [events]


def test_visualize_needs_a_decoder(tmp_path, monkeypatch):
  from mae_jax import checkpoint
  workdir = _tiny_run(tmp_path)
  params, config = checkpoint.load_params(workdir)
  encoder_only = {'encoder': params['encoder']}
  monkeypatch.setattr(checkpoint, 'load_params', lambda *_: (encoder_only, config))
  with pytest.raises(ValueError, match='has no MAE decoder.*workdir of a pretraining run'):
    visualize.visualize_checkpoint(workdir)


def test_visualize_exported_weights_equals_the_checkpoint(tmp_path):
  """--weights on a full export draws exactly what --workdir draws for the same images and seed."""
  from mae_jax import export
  workdir = _tiny_run(tmp_path)
  files = []
  for i in range(2):
    files.append(str(tmp_path / f'img{i}.png'))
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), np.uint8)).save(files[-1])
  weights = export.export_from_workdir(workdir, 'safetensors', str(tmp_path / 'mae.safetensors'), full=True)
  from_ckpt = visualize.visualize_checkpoint(workdir, str(tmp_path / 'a.png'), image_files=files, seed=3)
  from_weights = visualize.visualize_weights(weights, files, str(tmp_path / 'b.png'), seed=3)
  np.testing.assert_array_equal(np.asarray(Image.open(from_ckpt)), np.asarray(Image.open(from_weights)))
  encoder_only = export.export_from_workdir(workdir, 'safetensors', str(tmp_path / 'enc.safetensors'))
  with pytest.raises(ValueError, match='no MAE decoder.*--full'):
    visualize.visualize_weights(encoder_only, files, str(tmp_path / 'c.png'))
