"""Tests of mae_jax.data.augment: label smoothing, mixup / CutMix, RandAugment, random erasing.

Augmentation ops are checked against PIL, which the reference's timm
transforms use; the training transform of a downstream config
(mae_jax.data.inputs.make_train_preprocess_fn) is checked for determinism.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from configs import finetune as finetune_recipe
from mae_jax.data import augment, inputs, preprocess, sources

tf.config.set_visible_devices([], 'GPU')


# ----------------------------------------------------------------------------
# Mixup / CutMix and label smoothing.

def test_label_smoothing_targets():
  targets = augment.smooth_one_hot(jnp.array([2, 0]), 5, 0.1)
  np.testing.assert_allclose(targets[0], [0.02, 0.02, 0.92, 0.02, 0.02], rtol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize('mixup,cutmix,mode', [(0.8, 1.0, 'batch'), (0.8, 1.0, 'elem')])
def test_mixup_cutmix_mixes_images_and_targets_with_the_same_lam(mixup, cutmix, mode):
  groups, group, size = 2, 4, 8
  batch = groups * group
  images = jax.random.normal(jax.random.key(1), (batch, size, size, 1))
  targets = augment.smooth_one_hot(jnp.arange(batch) % 10, 10, 0.1)
  partner = np.arange(batch).reshape(groups, group)[:, ::-1].reshape(-1)  # Mirror within each shard.
  mix = jax.jit(jax.vmap(lambda key: augment.mixup_cutmix(
      key, images, targets, mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=0.5, mode=mode,
      num_groups=groups)))
  kinds = set()
  lams = []
  draws = jax.device_get(mix(jax.random.split(jax.random.key(0), 24)))
  for out, mixed_targets, lam in zip(*draws):
    lams.append(lam)
    assert ((lam >= 0) & (lam <= 1)).all()
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(mixed_targets, lam[:, None] * targets + (1 - lam[:, None]) * targets[partner],
                               rtol=1e-5, atol=1e-6)
    x, p = np.asarray(images), np.asarray(images)[partner]
    for i in range(batch):
      if np.allclose(out[i], lam[i] * x[i] + (1 - lam[i]) * p[i], atol=1e-5) and not np.allclose(lam[i], 1):
        kinds.add('mixup')
        continue
      from_partner = np.isclose(out[i], p[i]) & ~np.isclose(out[i], x[i])
      assert (np.isclose(out[i], x[i]) | from_partner).all()  # CutMix: every pixel is one of the two.
      np.testing.assert_allclose(1 - from_partner.mean(), lam[i], atol=1e-6)  # lam = area kept.
      kinds.add('cutmix')
    if mode == 'batch':  # One draw per shard.
      assert np.allclose(lam.reshape(groups, group), lam.reshape(groups, group)[:, :1])
  lams = np.stack(lams)
  if mode == 'elem':
    assert (lams.std(axis=1) > 0).any()
  assert lams.min() < 0.9  # Mixing happened.
  assert kinds == {k for k, alpha in (('mixup', mixup), ('cutmix', cutmix)) if alpha > 0}


def test_mixup_off_or_prob_zero_leaves_the_batch_alone():
  images = np.random.default_rng(0).normal(size=(4, 4, 4, 3)).astype(np.float32)
  targets = np.asarray(augment.smooth_one_hot(jnp.arange(4), 4))
  for kwargs in ({}, {'mixup_alpha': 0.8, 'cutmix_alpha': 1.0, 'prob': 0.0}):
    mix = jax.jit(functools.partial(augment.mixup_cutmix, **kwargs))
    out, mixed, lam = mix(jax.random.key(0), images, targets)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(mixed, targets)
    np.testing.assert_array_equal(lam, 1.0)


# ----------------------------------------------------------------------------
# RandAugment and random erasing.

def _pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image.astype(np.uint8))


def _solarize_add(image, add, threshold=128):
  return image.point([min(255, i + add) if i < threshold else i for i in range(256)] * len(image.getbands()))


# op: (level, sign, PIL reference of timm's op at that level)
PIL_OPS = {
    'AutoContrast': (5.0, 1.0, ImageOps.autocontrast),
    'Equalize': (5.0, 1.0, ImageOps.equalize),
    'Invert': (5.0, 1.0, ImageOps.invert),
    'Posterize': (5.0, 1.0, lambda im: ImageOps.posterize(im, 2)),  # 4 - int(0.5 * 4) bits.
    'Solarize': (5.0, 1.0, lambda im: ImageOps.solarize(im, 128)),  # 256 - int(0.5 * 256).
    'SolarizeAdd': (5.0, 1.0, lambda im: _solarize_add(im, 55)),  # int(0.5 * 110).
    'Color': (5.0, -1.0, lambda im: ImageEnhance.Color(im).enhance(0.55)),  # 1 - 0.5 * 0.9.
    'Contrast': (5.0, 1.0, lambda im: ImageEnhance.Contrast(im).enhance(1.45)),
    'Brightness': (5.0, 1.0, lambda im: ImageEnhance.Brightness(im).enhance(1.45)),
    'Sharpness': (5.0, 1.0, lambda im: ImageEnhance.Sharpness(im).enhance(1.45)),
}


@pytest.mark.parametrize('name', sorted(PIL_OPS))
def test_rand_augment_pixel_ops_match_pil(name):
  rng = np.random.default_rng(3)
  image = np.clip(rng.normal(120, 50, (12, 10, 3)), 0, 255).round()
  level, sign, reference = PIL_OPS[name]
  want = np.asarray(reference(_pil(image)), np.float32)
  got = augment._rand_augment_op(augment.RAND_AUGMENT_OPS.index(name),  # pylint: disable=protected-access
                                 tf.constant(image, tf.float32), level, sign, 128.0).numpy()
  assert got.shape == image.shape
  assert np.abs(got - want).max() <= 1.0, name


def test_rand_augment_geometric_ops():
  image = np.random.default_rng(4).uniform(0, 255, (20, 20, 1)).round().astype(np.float32)
  op = lambda name, level, sign: augment._rand_augment_op(
      augment.RAND_AUGMENT_OPS.index(name), tf.constant(image), level, sign, 7.0).numpy()
  for name in ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'):
    np.testing.assert_array_equal(op(name, 0.0, 1.0), image)  # Level 0: identity.
  shifted = op('TranslateX', 10.0, 1.0)  # 0.45 * 20 = 9 pixels: output x reads input x + 9.
  np.testing.assert_array_equal(shifted[:, :11], image[:, 9:])
  np.testing.assert_array_equal(shifted[:, 11:], 7.0)
  turned = op('Rotate', 10.0, 1.0)
  assert turned.shape == image.shape and (turned == 7.0).any() and not np.array_equal(turned, image)


def test_rand_augment_is_a_pure_function_of_the_seed():
  image = tf.constant(np.random.default_rng(5).uniform(0, 255, (16, 16, 3)).round(), tf.float32)
  run = lambda seed: augment.rand_augment(image, tf.constant(seed, tf.int64), num_layers=2,
                                          magnitude=9, magnitude_std=0.5).numpy()
  np.testing.assert_array_equal(run([1, 2]), run([1, 2]))
  outputs = [run([1, s]) for s in range(12)]
  assert sum(not np.array_equal(o, image.numpy()) for o in outputs) >= 6  # 2 ops at p=0.5 each.
  assert all(o.min() >= 0 and o.max() <= 255 for o in outputs)


def test_random_erasing_erases_one_box_of_the_reference_size():
  image = tf.fill([24, 20, 3], 5.0)
  areas = []
  for s in range(20):
    out = augment.random_erasing(image, tf.constant([0, s], tf.int64), probability=1.0).numpy()
    changed = (out != 5.0).any(axis=-1)
    rows, cols = np.where(changed.any(axis=1))[0], np.where(changed.any(axis=0))[0]
    assert changed.sum() == len(rows) * len(cols)  # A rectangle.
    assert rows.max() - rows.min() + 1 == len(rows) and cols.max() - cols.min() + 1 == len(cols)
    areas.append(changed.mean())
  assert 0.015 <= min(areas) and max(areas) <= 0.36
  kept = augment.random_erasing(image, tf.constant([0, 1], tf.int64), probability=0.0).numpy()
  np.testing.assert_array_equal(kept, image.numpy())


def test_random_erasing_with_several_boxes_divides_the_area_by_the_count_drawn():
  """timm: n boxes in [1, recount], each of U(min, max) area / n: the erased area does not shrink with recount."""
  image = tf.ones([64, 64, 3])

  def mean_erased(count):
    return np.mean([1 - augment.random_erasing(image, tf.constant([0, s], tf.int64), probability=1.0, mode='const',
                                               count=count).numpy().mean() for s in range(150)])

  one, three = mean_erased(1), mean_erased(3)
  assert 0.15 < one < 0.2 and 0.85 * one < three < 1.05 * one, (one, three)  # Dividing by recount: 2/3 of it.


def test_train_transform_is_deterministic_per_seed():
  config = finetune_recipe.get_config('variant=B/16,runlocal=True')
  assert config.randaug.num_layers > 0 and config.reprob > 0
  fn = inputs.make_train_preprocess_fn(config)
  image = tf.constant(np.random.default_rng(6).integers(0, 256, (40, 36, 3)), tf.uint8)
  a, b, c = (fn(image, tf.constant(s, tf.int64)).numpy() for s in ([0, 1], [0, 1], [0, 2]))
  assert a.shape == (32, 32, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


# ----------------------------------------------------------------------------
# The evaluation resize of the reference's fine-tuning.

EVAL_SIZES = (160, 224, 384, 448, 28)


def _reference_eval_resize(input_size: int) -> int:
  """build_transform in the reference's util/datasets.py (eval branch)."""
  crop_pct = 224 / 256 if input_size <= 224 else 1.0
  return int(input_size / crop_pct)


@pytest.mark.parametrize('image_size', EVAL_SIZES)
def test_eval_transform_sizes_follow_the_references_rule(image_size):
  """Shorter side to int(size / crop_pct) (crop_pct 224/256 up to 224, else 1), then the center crop."""
  want = _reference_eval_resize(image_size)
  assert augment.eval_resize_size(image_size) == want
  assert want == {160: 182, 224: 256, 384: 384, 448: 448, 28: 32}[image_size]
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (600, 450, 3)), tf.uint8)  # Portrait 4:3.
  resized = preprocess.resize_shorter_side(image, augment.eval_resize_size(image_size))
  assert tuple(resized.shape) == (int(600 * want / 450), want, 3)  # The longer side as torchvision's Resize.
  assert tuple(preprocess.center_crop(resized, image_size).shape) == (image_size, image_size, 3)


def test_eval_resize_of_other_settings():
  assert augment.eval_resize_size(28, 224) == 28  # eval_resize=224: no zoom (the Fashion-MNIST study).
  assert augment.eval_resize_size((48, 32)) == (54, 36)  # (height, width): each side by the same crop_pct.
  assert augment.eval_resize_size((448, 160)) == (448, 160)  # Above 224 on a side: no zoom.
  assert augment.eval_crop_pct(224) == 224 / 256 and augment.eval_crop_pct(225) == 1.0


@pytest.mark.parametrize('image_size', EVAL_SIZES)
def test_the_input_pipelines_eval_resize_is_the_references(image_size):
  """What the data pipeline resizes to with the default eval_resize=256."""
  config = sources.DatasetConfig(name='imagenet2012', image_size=image_size, channels=3)
  assert config.eval_resize_size == _reference_eval_resize(image_size)
