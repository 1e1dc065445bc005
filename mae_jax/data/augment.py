"""Augmentation: RandAugment and random erasing (TensorFlow), mixup / CutMix (JAX), the eval resize rule.

Pure functions of their arguments and seeds; the config-level transform that
uses them is `mae_jax.data.inputs.make_train_preprocess_fn`.

RandAugment and random erasing run per example in the tf.data map, stateless:
a pure function of the example's seed, so resuming replays them exactly. They
follow timm's `rand-mM-mstdS-inc1` and `RandomErasing(mode='pixel')`. The
RandAugment ops are timm's 15 'increasing' ops: AutoContrast, Equalize,
Invert, Rotate (30 deg), Posterize (4..0 bits), Solarize, SolarizeAdd, Color,
Contrast, Brightness, Sharpness (factor 1 +- 0.9 m / 10), ShearX/Y (0.3),
TranslateX/Y (0.45 of the size); each of `num_layers` draws applies with
probability 0.5 at magnitude N(m, mstd) clipped to [0, 10], with a random
sign. Differences from PIL: geometric ops fill with one grey value (the data
set's mean) and resample bilinearly.

Mixup / CutMix and label smoothing run on the device (JAX), one draw per
data-parallel shard of the batch ('batch' mode, as the reference's one draw
per GPU) or per example ('elem'); the partner of an example is its mirror in
the shard, and CutMix's lam is corrected to the box actually cut.
"""

import functools
import math

import jax
import jax.numpy as jnp
import tensorflow as tf

MIXUP_MODES = ('batch', 'elem')
ERASE_MODES = ('pixel', 'rand', 'const')

# ----------------------------------------------------------------------------
# RandAugment and random erasing (TensorFlow, per example).

RAND_AUGMENT_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
                    'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
                    'TranslateX', 'TranslateY')
MAX_LEVEL = 10.0


def _grey(image):
  """ITU-R 601-2 luma of a [H, W, C] image as [H, W, 1] (the image itself when C = 1)."""
  if image.shape[-1] == 1:
    return image
  weights = tf.constant([0.299, 0.587, 0.114], tf.float32)
  return tf.reduce_sum(image * weights, axis=-1, keepdims=True)


def _blend(degenerate, image, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _affine(image, transform, fill):
  """Output pixel (x, y) takes input (a0 x + a1 y + a2, b0 x + b1 y + b2), bilinear, constant fill."""
  shape = tf.shape(image)
  transform = tf.concat([tf.cast(tf.stack(transform), tf.float32), tf.zeros([2])], 0)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform[None], output_shape=shape[:2],
      fill_value=tf.cast(fill, tf.float32), interpolation='BILINEAR', fill_mode='CONSTANT')
  return out[0]


def _equalize(image):
  """PIL ImageOps.equalize, per channel."""

  def channel(c):
    values = tf.cast(c, tf.int32)
    hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
    step = (tf.reduce_sum(hist) - last) // 255
    lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
    lut = tf.cast(tf.clip_by_value(lut, 0, 255), tf.float32)
    return tf.where(step == 0, c, tf.gather(lut, values))

  channels = tf.unstack(image, axis=-1, num=image.shape[-1])
  return tf.stack([channel(c) for c in channels], axis=-1)


def _auto_contrast(image):
  """PIL ImageOps.autocontrast (no cutoff), per channel."""
  low = tf.reduce_min(image, axis=(0, 1), keepdims=True)
  high = tf.reduce_max(image, axis=(0, 1), keepdims=True)
  scale = 255.0 / tf.maximum(high - low, 1e-6)
  return tf.where(high > low, (image - low) * scale, image)


def _sharpness_degenerate(image):
  """PIL's SMOOTH filter (3x3, centre 5, others 1, / 13); border pixels unchanged."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  channels = image.shape[-1]
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.round(smooth)
  return tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]) + image * tf.pad(
      tf.zeros_like(smooth), [[1, 1], [1, 1], [0, 0]], constant_values=1.0)


def _rand_augment_op(index, image, level, sign, fill):
  """Applies op RAND_AUGMENT_OPS[index] at `level` in [0, 10] with `sign` +-1 to a [0, 255] image."""
  index = tf.convert_to_tensor(index, tf.int32)
  level = tf.convert_to_tensor(level, tf.float32)
  sign = tf.convert_to_tensor(sign, tf.float32)
  frac = level / MAX_LEVEL
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  enhance = 1.0 + sign * frac * 0.9

  def rotate():
    # For a given sign this turns the other way than PIL's img.rotate; the sign is +-1 at random, so the
    # augmentations drawn are the same.
    angle = sign * frac * 30.0 * math.pi / 180.0
    cx, cy = (width - 1) / 2, (height - 1) / 2
    cos, sin = tf.cos(angle), tf.sin(angle)
    return _affine(image, [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy], fill)

  def posterize():
    bits = 4 - tf.cast(tf.floor(frac * 4), tf.int32)  # timm's PosterizeIncreasing: 4 .. 0 bits kept.
    shift = tf.cast(2 ** (8 - bits), tf.float32)
    return tf.floor(image / shift) * shift

  def solarize():
    threshold = 256.0 - tf.floor(frac * 256.0)
    return tf.where(image >= threshold, 255.0 - image, image)

  def solarize_add():
    return tf.where(image < 128.0, tf.minimum(image + tf.floor(frac * 110.0), 255.0), image)

  def contrast():
    mean = tf.floor(tf.reduce_mean(_grey(image)) + 0.5)
    return _blend(mean, image, enhance)

  def shear(axis):
    s = sign * frac * 0.3
    return _affine(image, [1.0, s, 0.0, 0.0, 1.0, 0.0] if axis == 'x' else [1.0, 0.0, 0.0, s, 1.0, 0.0], fill)

  def translate(axis):
    if axis == 'x':
      return _affine(image, [1.0, 0.0, sign * frac * 0.45 * width, 0.0, 1.0, 0.0], fill)
    return _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, sign * frac * 0.45 * height], fill)

  branches = [
      lambda: _auto_contrast(image),
      lambda: _equalize(image),
      lambda: 255.0 - image,
      rotate,
      posterize,
      solarize,
      solarize_add,
      lambda: _blend(_grey(image), image, enhance),  # Color (saturation).
      contrast,
      lambda: _blend(tf.zeros_like(image), image, enhance),  # Brightness.
      lambda: _blend(_sharpness_degenerate(image), image, enhance),
      lambda: shear('x'),
      lambda: shear('y'),
      lambda: translate('x'),
      lambda: translate('y'),
  ]
  assert len(branches) == len(RAND_AUGMENT_OPS)
  out = tf.switch_case(index, branches)
  out.set_shape(image.shape)
  return tf.clip_by_value(tf.round(out), 0.0, 255.0)  # PIL works on uint8 images.


def rand_augment(image, seed, *, num_layers: int, magnitude: float, magnitude_std: float = 0.5,
                 fill: float = 128.0, prob: float = 0.5):
  """timm's RandAugment (rand-mM-mstdS-inc1) on a float32 [H, W, C] image in [0, 255].

  Each of `num_layers` draws picks one of RAND_AUGMENT_OPS uniformly (with
  replacement) and applies it with probability `prob` at magnitude
  N(magnitude, magnitude_std) clipped to [0, 10], with a random sign.
  """
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, max(num_layers, 1)))
  for layer in range(num_layers):
    op_seed, apply_seed, level_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(seeds[layer], 4))
    index = tf.random.stateless_uniform([], op_seed, 0, len(RAND_AUGMENT_OPS), dtype=tf.int32)
    level = magnitude + magnitude_std * tf.random.stateless_normal([], level_seed)
    level = tf.clip_by_value(level, 0.0, MAX_LEVEL)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    apply = tf.random.stateless_uniform([], apply_seed) < prob
    image = tf.cond(apply, functools.partial(_rand_augment_op, index, image, level, sign, fill),
                    lambda im=image: im)
  return image


def random_erasing(image, seed, *, probability: float, mode: str = 'pixel', count: int = 1,
                   min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                   attempts: int = 10):
  """timm's RandomErasing on a normalised float32 [H, W, C] image.

  With `probability`, erases n boxes (n = count, or a random n in [1, count]
  when count > 1), each of area U(min_area, max_area) * H * W / n and aspect
  log-uniform in [min_aspect, 1 / min_aspect]: the first of `attempts` draws
  that fits, placed uniformly. The box is filled with N(0, 1) per pixel
  ('pixel'), per channel ('rand') or zeros ('const').
  """
  if mode not in ERASE_MODES:
    raise ValueError(f'remode={mode!r}: must be one of {ERASE_MODES}')
  apply_seed, count_seed, box_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  num_boxes = tf.random.stateless_uniform([], count_seed, 1, count + 1, dtype=tf.int32) if count > 1 else 1
  erased = image
  box_seeds = tf.unstack(tf.random.experimental.stateless_split(box_seed, count))
  for box in range(count):
    area_seed, aspect_seed, offset_seed, fill_seed = tf.unstack(
        tf.random.experimental.stateless_split(box_seeds[box], 4))
    area = (tf.random.stateless_uniform([attempts], area_seed, min_area, max_area) * height_f * width_f
            / tf.cast(num_boxes, tf.float32))  # Divided by the count drawn, as timm.
    aspect = tf.exp(tf.random.stateless_uniform([attempts], aspect_seed, math.log(min_aspect),
                                                -math.log(min_aspect)))
    h = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    w = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    fits = (h < height) & (w < width) & (h > 0) & (w > 0)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    h, w = h[first], w[first]
    u = tf.random.stateless_uniform([2], offset_seed)
    top = tf.cast(tf.floor(u[0] * tf.cast(height - h + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(u[1] * tf.cast(width - w + 1, tf.float32)), tf.int32)
    rows = tf.range(height)[:, None, None]
    cols = tf.range(width)[None, :, None]
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    inside &= tf.reduce_any(fits) & (tf.constant(box) < num_boxes)
    if mode == 'pixel':
      fill = tf.random.stateless_normal(shape, fill_seed)
    elif mode == 'rand':
      fill = tf.random.stateless_normal([1, 1, shape[2]], fill_seed) + tf.zeros_like(image)
    else:
      fill = tf.zeros_like(image)
    erased = tf.where(inside, fill, erased)
  apply = tf.random.stateless_uniform([], apply_seed) < probability
  return tf.where(apply, erased, image)


# ----------------------------------------------------------------------------
# The evaluation resize of the reference's fine-tuning.

REFERENCE_SIZE = 224  # The size the reference's crop_pct 224 / 256 is defined at.


def eval_crop_pct(image_size, eval_resize: int = 256) -> float:
  """The reference's eval crop_pct: 224 / eval_resize (224 / 256) up to 224, else 1.0 (no zoom).

  From build_transform in the reference's util/datasets.py; image_size is a
  side or (height, width), and counts as above 224 when either side is.
  """
  return REFERENCE_SIZE / eval_resize if max(_pair(image_size)) <= REFERENCE_SIZE else 1.0


def eval_resize_size(image_size, eval_resize: int = 256):
  """The shorter side (per side for (height, width)) the eval image is resized to before the center crop.

  The reference's int(image_size / crop_pct), in exact integer arithmetic:
  160 -> 182, 224 -> 256, 28 -> 32; 384 -> 384 and 448 -> 448 (crop_pct 1.0
  above 224). `eval_resize` is the shorter side at 224 (256 in the reference).
  """
  if eval_crop_pct(image_size, eval_resize) == 1.0:
    return image_size if isinstance(image_size, int) else _pair(image_size)
  sizes = tuple(side * eval_resize // REFERENCE_SIZE for side in _pair(image_size))
  return sizes[0] if isinstance(image_size, int) else sizes


def _pair(image_size) -> tuple[int, int]:
  return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


# ----------------------------------------------------------------------------
# Mixup / CutMix and label smoothing (JAX, on the device).

def smooth_one_hot(labels, num_classes: int, smoothing: float = 0.0):
  """One-hot targets with smoothing: 1 - s + s / K on the label, s / K elsewhere (timm)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def _mix_one(rng, image, partner, *, mixup_alpha: float, cutmix_alpha: float, prob: float,
             switch_prob: float):
  """Mixes one image with its partner; returns (image, lam). All draws come from `rng`."""
  apply_key, switch_key, mix_key, cut_key, box_key = jax.random.split(rng, 5)
  apply = jax.random.uniform(apply_key) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(switch_key) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(mix_key, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.ones([])
  lam_cutmix = jax.random.beta(cut_key, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.ones([])

  # CutMix box of timm's rand_bbox: sides (H, W) * sqrt(1 - lam), centre uniform, clipped.
  height, width = image.shape[0], image.shape[1]
  cut_ratio = jnp.sqrt(1.0 - lam_cutmix)
  cut_h = jnp.floor(height * cut_ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * cut_ratio).astype(jnp.int32)
  y_key, x_key = jax.random.split(box_key)
  cy = jax.random.randint(y_key, [], 0, height)
  cx = jax.random.randint(x_key, [], 0, width)
  y1, y2 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x1, x2 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None, None]
  cols = jnp.arange(width)[None, :, None]
  box = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
  lam_box = 1.0 - ((y2 - y1) * (x2 - x1)).astype(jnp.float32) / (height * width)  # Corrected lam.

  cut = jnp.where(box, partner, image)
  mixed = lam_mixup * image + (1.0 - lam_mixup) * partner
  out = jnp.where(apply, jnp.where(use_cutmix, cut, mixed), image)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mixup), 1.0)
  return out.astype(image.dtype), lam


def mixup_cutmix(rng, images, targets, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5, mode: str = 'batch', num_groups: int = 1):
  """Mixup / CutMix of images [B, H, W, C] and soft targets [B, K], as timm's Mixup.

  The batch splits into `num_groups` contiguous groups (one per data-parallel
  shard: no cross-device traffic); in each, example i pairs with example
  n - 1 - i. Mode 'batch' draws one lam (and CutMix box) per group, 'elem' one
  per example. With probability `prob` a draw mixes: CutMix with
  probability `switch_prob` when both alphas are > 0, lam ~ Beta(alpha, alpha).
  Targets mix with the lam actually applied (CutMix: 1 - box area / image area).

  Returns (images, targets, lam [B]).
  """
  if mode not in MIXUP_MODES:
    raise ValueError(f'mixup_mode={mode!r}: must be one of {MIXUP_MODES}')
  batch = images.shape[0]
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets, jnp.ones([batch], jnp.float32)
  if batch % num_groups:
    raise ValueError(f'batch of {batch} does not split into {num_groups} mixup groups')
  group = batch // num_groups
  grouped = images.reshape((num_groups, group) + images.shape[1:])
  partners = grouped[:, ::-1]
  mix = functools.partial(_mix_one, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
                          switch_prob=switch_prob)
  keys = jax.random.split(rng, num_groups)
  if mode == 'batch':
    per_group = jax.vmap(mix, in_axes=(None, 0, 0))
    mixed, lam = jax.vmap(per_group)(keys, grouped, partners)
  else:
    keys = jax.vmap(lambda k: jax.random.split(k, group))(keys)
    mixed, lam = jax.vmap(jax.vmap(mix))(keys, grouped, partners)
  lam = lam.reshape(batch)
  grouped_targets = targets.reshape((num_groups, group) + targets.shape[1:])
  partner_targets = grouped_targets[:, ::-1].reshape(targets.shape)
  targets = lam[:, None] * targets + (1.0 - lam[:, None]) * partner_targets
  return mixed.reshape(images.shape), targets, lam
