"""Per-example image preprocessing in TensorFlow, as in the MAE reference.

Pretraining: RandomResizedCrop (area scale 0.2-1, aspect 3/4-4/3, bicubic),
random horizontal flip, mean/std normalisation. Eval: resize the shorter side
to image_size * 256 / 224 (bicubic) and take the central image_size crop.
Resizing is antialiased, like PIL's, which the reference uses.

Randomness comes only from stateless ops driven by an explicit per-example
`seed` ([2] int tensor), so an output is a pure function of (image, seed).
Images may be encoded (a JPEG/PNG string: JPEGs are decoded only inside the
crop window) or already decoded arrays [H, W, C] of any channel count: uint8
and uint16 (resized values clipped to the dtype's range; mean / std in [0, 1]
units, the value divided by 255 or 65535) or float32 (not clipped; mean / std
in the stored units). `image_size` is a square side or (height, width).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from mae_jax.data import sources

# fn(image, seed) -> float32 [height, width, channels]: the train-time transform.
PreprocessFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

_JPEG_DCT = 'INTEGER_ACCURATE'  # libjpeg's default (ISLOW), as PIL decodes.


def hw(size: int | Sequence[int]) -> tuple[int, int]:
  """A square side or (height, width) -> (height, width)."""
  return (size, size) if isinstance(size, int) else tuple(size)


def match_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """Converts a decoded [H, W, C] image to `channels`.

  uint8 images convert between 1, 3 and 4 (alpha dropped) channels; other
  arrays must already have `channels`.
  """
  have = image.shape[-1]
  if have == channels:
    return image
  if image.dtype != tf.uint8 or channels not in (1, 3):
    raise ValueError(
        f'An image has {have} channels of {image.dtype.name} but '
        f'config.dataset.channels={channels}: set it to {have}.')
  if have == 1 and channels == 3:
    return tf.tile(image, [1, 1, 3])
  if have in (3, 4) and channels == 1:
    return tf.image.rgb_to_grayscale(image[..., :3])
  if have == 4 and channels == 3:
    return image[..., :3]
  raise ValueError(
      f'Cannot convert an image with {have} channels to '
      f'config.dataset.channels={channels}.')


def decode_image(image: tf.Tensor, channels: int) -> tf.Tensor:
  """JPEG/PNG bytes -> uint8 [H, W, channels]; an array keeps its dtype."""
  if image.dtype != tf.string:
    return match_channels(image, channels)
  decoded = tf.cond(
      tf.io.is_jpeg(image),
      lambda: tf.io.decode_jpeg(image, channels=channels, dct_method=_JPEG_DCT),
      lambda: tf.io.decode_image(image, channels=channels,
                                 expand_animations=False))
  decoded.set_shape([None, None, channels])
  return decoded


def decode_and_crop(image: tf.Tensor, window_fn: Callable[..., tf.Tensor],
                    channels: int) -> tf.Tensor:
  """Decodes the window `window_fn(height, width) -> [y, x, h, w]` of image.

  A JPEG is decoded only inside the window (its size is read from the
  header); other formats are decoded whole, then cropped.
  """
  def crop_decoded(decoded):
    shape = tf.shape(decoded)
    y, x, h, w = tf.unstack(window_fn(shape[0], shape[1]))
    return decoded[y:y + h, x:x + w]

  if image.dtype != tf.string:
    return crop_decoded(match_channels(image, channels))

  def crop_jpeg():
    shape = tf.image.extract_jpeg_shape(image)
    return tf.io.decode_and_crop_jpeg(
        image, window_fn(shape[0], shape[1]), channels=channels,
        dct_method=_JPEG_DCT)

  def crop_other():
    return crop_decoded(tf.io.decode_image(
        image, channels=channels, expand_animations=False))

  cropped = tf.cond(tf.io.is_jpeg(image), crop_jpeg, crop_other)
  cropped.set_shape([None, None, channels])
  return cropped


def sample_crop_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor,
                       *, scale: Sequence[float] = (0.2, 1.0),
                       ratio: Sequence[float] = (3 / 4, 4 / 3),
                       attempts: int = 10) -> tf.Tensor:
  """RandomResizedCrop window: int32 [y, x, h, w] within a height x width image.

  Like torchvision's sampler: up to `attempts` draws of an area fraction
  U(scale) and a log-uniform aspect ratio w/h in `ratio`; the first draw that
  fits is placed uniformly at random. If none fits, the largest central crop
  with an aspect ratio clamped into `ratio` is used.
  """
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  height_f = tf.cast(height, tf.float32)
  width_f = tf.cast(width, tf.float32)
  area_seed, ratio_seed, offset_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))

  target_area = height_f * width_f * tf.random.stateless_uniform(
      [attempts], area_seed, minval=scale[0], maxval=scale[1])
  aspect = tf.exp(tf.random.stateless_uniform(
      [attempts], ratio_seed, minval=math.log(ratio[0]),
      maxval=math.log(ratio[1])))
  crop_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  crop_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

  # Fallback: central crop, aspect ratio clamped into `ratio`.
  image_ratio = width_f / height_f
  fallback_w = tf.where(
      image_ratio > ratio[1],
      tf.cast(tf.round(height_f * ratio[1]), tf.int32), width)
  fallback_h = tf.where(
      image_ratio < ratio[0],
      tf.cast(tf.round(width_f / ratio[0]), tf.int32), height)

  found = tf.reduce_any(fits)
  h = tf.clip_by_value(tf.where(found, crop_h[first], fallback_h), 1, height)
  w = tf.clip_by_value(tf.where(found, crop_w[first], fallback_w), 1, width)
  u = tf.random.stateless_uniform([2], offset_seed)
  random_y = tf.cast(tf.floor(u[0] * tf.cast(height - h + 1, tf.float32)),
                     tf.int32)
  random_x = tf.cast(tf.floor(u[1] * tf.cast(width - w + 1, tf.float32)),
                     tf.int32)
  y = tf.where(found, tf.minimum(random_y, height - h), (height - h) // 2)
  x = tf.where(found, tf.minimum(random_x, width - w), (width - w) // 2)
  return tf.stack([y, x, h, w])


def resize_shorter_side(image: tf.Tensor, size: int,
                        max_value: float | None = 255.0) -> tf.Tensor:
  """Bicubic, antialiased resize so the shorter side is `size`: float32.

  The longer side is size * long / short rounded down, as torchvision does.
  """
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  shorter = tf.cast(tf.minimum(height, width), tf.float32)
  def scaled(side):
    return tf.cast(tf.cast(side, tf.float32) * size / shorter, tf.int32)
  new_height = tf.where(height <= width, size, scaled(height))
  new_width = tf.where(width < height, size, scaled(width))
  return _bicubic(image, new_height, new_width, max_value)


def resize_to_cover(image: tf.Tensor, size: Sequence[int],
                    max_value: float | None = 255.0) -> tf.Tensor:
  """Bicubic resize keeping the aspect ratio, to the smallest size covering
  (height, width) = `size` (the shorter-side rule for non-square targets)."""
  shape = tf.shape(image)
  height = tf.cast(shape[0], tf.float32)
  width = tf.cast(shape[1], tf.float32)
  scale = tf.maximum(size[0] / height, size[1] / width)
  new_height = tf.maximum(size[0], tf.cast(height * scale, tf.int32))
  new_width = tf.maximum(size[1], tf.cast(width * scale, tf.int32))
  return _bicubic(image, new_height, new_width, max_value)


def center_crop(image: tf.Tensor, size: int | Sequence[int]) -> tf.Tensor:
  """The central [height, width] crop; offsets rounded as torchvision does."""
  height, width = hw(size)
  shape = tf.shape(image)
  top = tf.cast(tf.round(tf.cast(shape[0] - height, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - width, tf.float32) / 2), tf.int32)
  cropped = image[top:top + height, left:left + width]
  cropped.set_shape([height, width, image.shape[-1]])
  return cropped


def resize(image: tf.Tensor, size: int | Sequence[int],
           max_value: float | None = 255.0) -> tf.Tensor:
  """Bicubic, antialiased resize to `size` (side or (height, width)): float32.

  Values are clipped to [0, max_value] (None: not clipped, float pixels).
  """
  height, width = hw(size)
  channels = image.shape[-1]
  resized = _bicubic(image, height, width, max_value)
  resized.set_shape([height, width, channels])
  return resized


def _bicubic(image: tf.Tensor, height, width,
             max_value: float | None = 255.0) -> tf.Tensor:
  """Bicubic resize, antialiased when shrinking (as PIL), clipped to [0, max_value].

  Antialiasing only changes a shrinking axis, and TF's antialiased kernel is
  about 3x slower, so images enlarged on both axes take the plain kernel
  (the two agree within 0.25 of a grey level there).
  """
  shape = tf.shape(image)
  size = tf.stack([height, width])
  enlarging = (shape[0] <= height) & (shape[1] <= width)
  resized = tf.cond(
      enlarging,
      lambda: tf.image.resize(image, size, method='bicubic'),
      lambda: tf.image.resize(image, size, method='bicubic', antialias=True))
  if max_value is None:
    return resized
  return tf.clip_by_value(resized, 0.0, max_value)


def normalize(image: tf.Tensor, mean: Sequence[float],
              std: Sequence[float], max_value: float | None = 255.0
              ) -> tf.Tensor:
  """Pixels -> (x / max_value - mean) / std, float32 (x: float pixels if None)."""
  scale = 1.0 if max_value is None else max_value
  mean = tf.constant([scale * m for m in mean], tf.float32)
  std = tf.constant([scale * s for s in std], tf.float32)
  return (tf.cast(image, tf.float32) - mean) / std


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mirrors left-right with probability 1/2."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def pixel_max(image: tf.Tensor) -> float | None:
  """The largest pixel value of an image's dtype (None for float pixels)."""
  return sources.pixel_scale(image.dtype)


def pretrain_preprocess(image: tf.Tensor, seed: tf.Tensor, *,
                        image_size: int | Sequence[int],
                        channels: int, mean: Sequence[float],
                        std: Sequence[float],
                        crop_scale: Sequence[float] = (0.2, 1.0),
                        crop_ratio: Sequence[float] = (3 / 4, 4 / 3)
                        ) -> tf.Tensor:
  """MAE pretraining transform -> float32 [height, width, channels]."""
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))

  def window_fn(height, width):
    return sample_crop_window(height, width, crop_seed, scale=crop_scale,
                              ratio=crop_ratio)

  max_value = pixel_max(image)
  image = resize(decode_and_crop(image, window_fn, channels), image_size,
                 max_value)
  image = random_flip(image, flip_seed)
  return normalize(image, mean, std, max_value)


def eval_preprocess(image: tf.Tensor, *, image_size: int | Sequence[int],
                    resize_size: int | Sequence[int],
                    channels: int, mean: Sequence[float],
                    std: Sequence[float]) -> tf.Tensor:
  """Resize shorter side to resize_size, center crop image_size, normalise.

  Returns float32 [height, width, channels]. resize_size must be >=
  image_size. A (height, width) resize_size resizes the image (keeping its
  aspect ratio) to the smallest size that covers it.
  """
  max_value = pixel_max(image)
  image = decode_image(image, channels)
  if isinstance(resize_size, int):
    image = resize_shorter_side(image, resize_size, max_value)
  else:
    image = resize_to_cover(image, resize_size, max_value)
  return normalize(center_crop(image, image_size), mean, std, max_value)


def make_pretrain_preprocess_fn(dataset_config: Any) -> PreprocessFn:
  """fn(image, seed) with the MAE pretraining transform of config.dataset."""
  config = sources.DatasetConfig.from_config(dataset_config)
  _check_stats(config)

  def preprocess_fn(image, seed):
    return pretrain_preprocess(
        image, seed, image_size=config.image_size, channels=config.channels,
        mean=config.mean, std=config.std, crop_scale=config.crop_scale,
        crop_ratio=config.crop_ratio)

  return preprocess_fn


def make_eval_preprocess_fn(dataset_config: Any
                            ) -> Callable[[tf.Tensor], tf.Tensor]:
  """fn(image) with the eval transform of config.dataset."""
  config = sources.DatasetConfig.from_config(dataset_config)
  _check_stats(config)
  square = isinstance(config.image_size, int)

  def preprocess_fn(image):
    return eval_preprocess(
        image, image_size=config.image_size,
        resize_size=config.eval_resize_size if square else config.eval_resize_hw,
        channels=config.channels, mean=config.mean, std=config.std)

  return preprocess_fn


def _check_stats(config: sources.DatasetConfig):
  if not config.has_stats:
    raise ValueError(
        'config.dataset.mean / std are () ("from the data set\'s metadata") '
        'and were not resolved: pass the config through '
        'sources.resolve_stats (the input pipeline does) or set them.')
