"""Deterministic in-memory sources for tests, benchmarks and runlocal recipes.

Unlabelled (pretraining): the global batch depends only on (seed, step), and
each process takes its own rows of it, so any process count sees the same
data. Labelled (fine-tuning, linear probing, kNN): example number p is a class
pattern plus noise drawn from (seed, p % num_examples) alone.
"""

from typing import Iterator

import numpy as np
import tensorflow as tf

_PATTERN_SEED = 1234  # The classes' patterns, the same for every run.
_AUGMENT_SEED_OFFSET = 7  # Augmentation keys: (seed + 7, position).


def _hw(image_size) -> tuple[int, int]:
  return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def global_batch(seed: int, step: int, batch_size: int, image_size, channels: int) -> np.ndarray:
  """[batch_size, H, W, C] float32 images with smooth structure, from (seed, step) alone.

  image_size is a square side or (height, width).
  """
  height, width = _hw(image_size)
  rng = np.random.default_rng([seed, step])
  coarse = rng.standard_normal((batch_size, 4, 4, channels)).astype(np.float32)
  images = np.repeat(np.repeat(coarse, -(-height // 4), axis=1), -(-width // 4), axis=2)[:, :height, :width]
  return images + 0.1 * rng.standard_normal(images.shape).astype(np.float32)


def create_pretrain_iterator(dataset_config, *, global_batch_size: int, seed: int, start_step: int = 0,
                             process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Yields this process's rows of the global batch for steps start_step, start_step + 1, ..."""
  if global_batch_size % process_count:
    raise ValueError(f'batch_size={global_batch_size} is not divisible by the {process_count} processes')
  local = global_batch_size // process_count
  step = start_step
  while True:
    images = global_batch(seed, step, global_batch_size, dataset_config.image_size, dataset_config.channels)
    rows = slice(process_index * local, (process_index + 1) * local)
    yield {'image': images[rows], 'label': np.full([local], -1, np.int32)}
    step += 1


def labelled_examples(dataset_config, num_classes: int, positions: tf.data.Dataset, seed: int,
                      preprocess_fn=None) -> tf.data.Dataset:
  """tf.data of labelled synthetic examples at `positions`: a class pattern plus noise.

  Args:
    dataset_config: `config.dataset` (image_size, channels, num_examples).
    num_classes: labels are drawn uniformly from [0, num_classes).
    positions: int64 dataset of example positions; position p is example
      p % dataset_config.num_examples, so positions past the end repeat the
      examples (later epochs).
    seed: picks the examples (and their labels).
    preprocess_fn: fn(uint8 image, int64 [2] seed) -> image, given the key
      (seed + 7, position); None yields the uint8 [H, W, C] images.

  Returns:
    A dataset of {'image', 'label': int32}.
  """
  size, channels = _hw(dataset_config.image_size), dataset_config.channels
  num_examples = int(dataset_config.num_examples)
  patterns = tf.constant(np.random.default_rng(_PATTERN_SEED).uniform(
      0, 255, (num_classes, 4, 4, channels)).astype(np.float32))

  def example(position):
    index = position % num_examples
    key = tf.stack([tf.cast(seed, tf.int64), index])
    label = tf.random.stateless_uniform([], key, 0, num_classes, dtype=tf.int32)
    base = tf.image.resize(tf.gather(patterns, label), size, method='nearest')
    noise = 30.0 * tf.random.stateless_normal([*size, channels], key + 1)
    image = tf.cast(tf.clip_by_value(tf.round(base + noise), 0, 255), tf.uint8)
    if preprocess_fn is None:
      return {'image': image, 'label': label}
    aug_key = tf.stack([tf.cast(seed, tf.int64) + _AUGMENT_SEED_OFFSET, position])
    return {'image': preprocess_fn(image, aug_key), 'label': label}

  return positions.map(example, num_parallel_calls=tf.data.AUTOTUNE)
