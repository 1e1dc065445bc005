"""tfds -> tf.data -> per-process numpy batches, deterministic and resumable.

Each process reads a disjoint part of the split (`tfds.split_for_jax_process`)
and yields its local share of every global batch. With a fixed seed and
process count, the batches are a pure function of (seed, step):

  * Order. The process's records, in their fixed file order, are cut into
    pieces: whole files, or up to 4 runs of at least one `shuffle_buffer`
    of records of a file that holds at least two. Every epoch reads the pieces in its
    own order, a stateless permutation keyed by (seed, process, epoch),
    several at a time (about as many as make one shuffle block, at most 16
    files in parallel), then shuffles consecutive blocks of `shuffle_buffer`
    records with stateless permutations keyed by (seed, process, epoch,
    block); block boundaries move by a random offset each epoch. So where an
    example comes in one epoch says little about where it comes in the next
    (the more pieces, the less), every record is read exactly once per epoch,
    and the memory held is one shuffle block plus a read buffer per open
    file. With shuffle_buffer >= the examples per process, every epoch is a
    full random permutation; shuffle_buffer = 1 reads the files in order.
    Epochs follow each other without a gap, so a batch may straddle two
    epochs.
  * Reading. Records come straight from the data set's TFRecord files. A
    piece that starts inside a file reads past the records before it (their
    bytes, not parsed or decoded), so a file cut into k <= 4 pieces is read
    about (k + 1) / 2 <= 2.5 times per epoch. Catalog shards (ImageNet's hold ~1,250
    images) are shorter than the default buffer and read once; a file of
    small records (Fashion-MNIST's single file) is cut, cheaply. Builders
    that TFDS does not read from TFRecord files (other file formats, custom
    readers, tfds.testing.mock_data) are read through `as_dataset`, a piece
    by skipping over the split's records. With `cache`, the pieces are read
    once into memory (decoded when all images have one shape) and every
    epoch takes them from there.
  * Augmentation. Example number p of a process's stream is augmented with a
    key derived from (seed, process, p).
  * Resuming at step k skips k * local_batch records while they are still
    undecoded bytes, then continues exactly as an uninterrupted run would;
    nothing skipped is decoded or augmented.
  * Corrupt images. A record whose image cannot be decoded (or preprocessed)
    is skipped and counted: its row of the batch holds a copy of another
    example of the same batch and batch['corrupt'] is True there; no other
    example moves, so resuming stays exact. Each one is logged (a warning
    with TensorFlow's error message).

Images are decoded inside the parallel preprocessing map (JPEGs only inside
their crop window), batched and prefetched.

The reading and reordering of records lives in `records`, the guard against
corrupt images in `corrupt`; this module puts them together.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from mae_jax.data import corrupt, preprocess, records, sources

_SHUFFLE_STREAM = 0  # fold_in tags that separate the two random streams.
_AUGMENT_STREAM = 1


def create_pretrain_iterator(dataset_config: Any, *, global_batch_size: int,
                             seed: int, start_step: int = 0,
                             process_index: int | None = None,
                             process_count: int | None = None,
                             preprocess_fn: preprocess.PreprocessFn | None = None
                             ) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator over this process's share of the training batches.

  Args:
    dataset_config: `config.dataset` (see configs/default.py).
    global_batch_size: examples per step over all processes; each process
      yields global_batch_size // process_count of them.
    seed: data seed: order and augmentation.
    start_step: first step to yield; resuming at k yields what an
      uninterrupted run yields from step k on.
    process_index: this process, default `jax.process_index()`.
    process_count: number of processes, default `jax.process_count()`.
    preprocess_fn: fn(image, seed) -> float32 [H, W, C] of a static shape,
      given an encoded image string or a stored [H, W, C] array (uint8,
      uint16 or float32) and a [2] int seed; default the MAE pretraining
      transform of `dataset_config` (mean / std () are taken from the data
      set's metadata).

  Yields:
    {'image': float32 [local_batch, H, W, C] normalised,
     'label': int32 [local_batch], -1 where the data set has no labels,
     'corrupt': bool [local_batch], True where the record's image could not
       be decoded: that row is a copy of another example of the batch (image
       and label; zeros and -1 if no example of the batch could be decoded).
       `batch['corrupt'].sum()` counts this process's corrupt records.}
  """
  ds = create_pretrain_dataset(
      dataset_config, global_batch_size=global_batch_size, seed=seed,
      start_step=start_step, process_index=process_index,
      process_count=process_count, preprocess_fn=preprocess_fn)
  return ds.as_numpy_iterator()


def create_pretrain_dataset(dataset_config: Any, *, global_batch_size: int,
                            seed: int, start_step: int = 0,
                            process_index: int | None = None,
                            process_count: int | None = None,
                            preprocess_fn: preprocess.PreprocessFn | None = None
                            ) -> tf.data.Dataset:
  """The tf.data.Dataset behind `create_pretrain_iterator` (same arguments)."""
  config = sources.DatasetConfig.from_config(dataset_config)
  process_index, process_count = _resolve_processes(process_index,
                                                    process_count)
  local_batch = _local_batch_size(global_batch_size, process_count,
                                  'global_batch_size')
  if start_step < 0:
    raise ValueError(f'start_step={start_step}: must be >= 0.')

  builder = sources.get_builder(config)
  sources.check_channels(builder, config)
  if preprocess_fn is None:
    preprocess_fn = preprocess.make_pretrain_preprocess_fn(
        sources.resolve_stats(config, builder))
  split = sources.process_split(config.train_split, process_index,
                                process_count)
  num_local = sources.split_num_examples(builder, split,
                                         'config.dataset.train_split')
  if num_local == 0:
    raise ValueError(
        f'config.dataset.train_split={config.train_split!r} leaves no '
        f'examples for process {process_index} of {process_count}: use a '
        'larger split or fewer processes.')

  source = records.RecordSource.create(builder, split)
  num_local = source.num_examples
  shuffle = config.shuffle_buffer > 1
  block_size = min(config.shuffle_buffer, num_local)
  pieces = records.Pieces.cut(source.spans, block_size if shuffle else num_local)
  cycle = pieces.read_cycle(block_size, num_local) if shuffle else 1

  # Decoded images can be cached only when they all have one shape;
  # otherwise the cache holds encoded bytes.
  image_shape = builder.info.features['image'].shape
  warm_up = None
  if config.cache:
    decode_fn = None
    if sources.image_is_encoded(builder) and all(
        d is not None for d in image_shape):
      decode_fn = records.stored_image_decoder(builder)
    read_piece, warm_up = records.cached_pieces(source, pieces, decode_fn)
    parallel = False
  else:
    read_piece, parallel = pieces.reader(source), source.parallel

  key = tf.constant([seed, process_index], tf.int64)
  shuffle_key = tf.random.experimental.stateless_fold_in(key, _SHUFFLE_STREAM)
  augment_key = tf.random.experimental.stateless_fold_in(key, _AUGMENT_STREAM)

  def epoch_records(epoch):
    return records.read_epoch(
        pieces, read_piece,
        tf.random.experimental.stateless_fold_in(shuffle_key, epoch),
        shuffle=shuffle, cycle=cycle, parallel=parallel,
        block_size=block_size, num_examples=num_local)

  start = start_step * local_batch
  first_epoch, offset = divmod(start, num_local)
  ds = tf.data.Dataset.counter(first_epoch).flat_map(epoch_records)
  if warm_up is not None:  # Fills the cache; yields nothing.
    ds = warm_up.concatenate(ds)
  ds = ds.skip(offset)  # Still undecoded: resuming decodes nothing extra.
  ds = ds.enumerate(start)  # Position of each example in this process's stream.

  unpack = sources.image_unpacker(builder)

  def preprocess_one(position, image):
    return preprocess_fn(
        unpack(image),
        tf.random.experimental.stateless_fold_in(augment_key, position))

  def preprocess_chunk(positions, examples):
    images, valid = corrupt.guarded_map(preprocess_one,
                                        (positions, examples['image']),
                                        examples['record'])
    if 'valid' in examples:  # Decoded before caching.
      valid &= examples['valid']
    return {'image': images, 'label': _labels(examples, tf.size(positions)),
            'valid': valid}

  # Chunks of consecutive examples are preprocessed under one guard each,
  # in parallel; a batch is a whole number of chunks.
  chunk = corrupt.chunk_size(local_batch)
  ds = ds.batch(chunk, drop_remainder=True)
  ds = ds.map(preprocess_chunk, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch // chunk, drop_remainder=True)
  ds = ds.map(lambda chunks: corrupt.replace_corrupt(
      corrupt.merge_chunks(chunks, local_batch)))
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options())


def create_eval_iterator(dataset_config: Any, *, split: str, batch_size: int,
                         process_index: int | None = None,
                         process_count: int | None = None,
                         preprocess_fn=None
                         ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split` with eval preprocessing, padded to full batches.

  Every example is yielded by exactly one process. All processes yield the
  same number of batches (so collective steps line up); batches are padded
  with zero images, label -1 and mask False. An example whose image cannot
  be decoded is skipped the same way (zero image, label -1, mask False) and
  counted in 'corrupt'.

  Args:
    dataset_config: `config.dataset`.
    split: a TFDS split string, e.g. config.dataset.eval_split.
    batch_size: global batch size; each process yields batch_size //
      process_count examples per batch.
    process_index: default `jax.process_index()`.
    process_count: default `jax.process_count()`.
    preprocess_fn: fn(image) -> float32 [H, W, C]; default resize + center
      crop of `dataset_config`.

  Yields:
    {'image': float32 [local_batch, H, W, C], 'label': int32 [local_batch],
     'mask': bool [local_batch], True for real, decodable examples,
     'corrupt': bool [local_batch], True for examples that could not be
       decoded}.
  """
  config = sources.DatasetConfig.from_config(dataset_config)
  process_index, process_count = _resolve_processes(process_index,
                                                    process_count)
  local_batch = _local_batch_size(batch_size, process_count, 'batch_size')
  builder = sources.get_builder(config)
  sources.check_channels(builder, config)
  if preprocess_fn is None:
    preprocess_fn = preprocess.make_eval_preprocess_fn(
        sources.resolve_stats(config, builder))
  splits = [sources.process_split(split, i, process_count)
            for i in range(process_count)]
  sizes = [sources.split_num_examples(builder, s, 'split') for s in splits]
  num_batches = math.ceil(max(sizes) / local_batch)

  unpack = sources.image_unpacker(builder)

  def preprocess_chunk(examples):
    images, valid = corrupt.guarded_map(
        lambda image: preprocess_fn(unpack(image)), (examples['image'],),
        examples['record'])
    labels = _labels(examples, tf.size(valid))
    return {'image': images, 'label': tf.where(valid, labels, -1),
            'valid': valid}

  ds = None
  if sizes[process_index]:
    ds = sources.read_records(builder, splits[process_index])
    ds = ds.batch(min(local_batch, corrupt.MAX_CHUNK))
    ds = ds.map(preprocess_chunk, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.unbatch().batch(local_batch).prefetch(tf.data.AUTOTUNE)
    ds = ds.with_options(_options())
  image_shape = (*config.image_hw, config.channels)
  if ds is not None and ds.element_spec['image'].shape[1:].is_fully_defined():
    image_shape = tuple(ds.element_spec['image'].shape[1:])  # preprocess_fn's.
  return _padded_batches(ds, local_batch, num_batches,
                         (local_batch, *image_shape))


def _padded_batches(ds, local_batch, num_batches, image_shape):
  """Pads the last batch and appends empty ones up to num_batches."""
  yielded = 0
  if ds is not None:
    for batch in ds.as_numpy_iterator():
      real = len(batch['label'])
      valid = np.zeros((local_batch,), bool)
      valid[:real] = batch['valid']
      if real < local_batch:
        pad = local_batch - real
        batch = {
            'image': np.concatenate(
                [batch['image'],
                 np.zeros((pad,) + batch['image'].shape[1:], np.float32)]),
            'label': np.concatenate(
                [batch['label'], np.full((pad,), -1, np.int32)])}
      yield {'image': batch['image'], 'label': batch['label'], 'mask': valid,
             'corrupt': (np.arange(local_batch) < real) & ~valid}
      yielded += 1
  while yielded < num_batches:
    yield {'image': np.zeros(image_shape, np.float32),
           'label': np.full((local_batch,), -1, np.int32),
           'mask': np.zeros((local_batch,), bool),
           'corrupt': np.zeros((local_batch,), bool)}
    yielded += 1


def num_examples(dataset_config: Any, split: str) -> int:
  """Number of examples of a split string (e.g. 'train', 'train[:10%]')."""
  builder = sources.get_builder(dataset_config)
  return sources.split_num_examples(builder, split, 'split')


def dataset_info(dataset_config: Any) -> dict[str, Any]:
  """Facts about the configured data set that the trainer needs.

  Returns:
    name, version, splits ({name: num_examples}), num_train_examples,
    num_eval_examples (None if eval_split is not a split), image_shape (as
    stored; None for varying sizes), image_dtype (as stored: uint8 for
    encoded images), channel_stats (what prepare stored, or None),
    has_labels, num_classes and class_names (None for unlabeled data).
  """
  config = sources.DatasetConfig.from_config(dataset_config)
  builder = sources.get_builder(config)
  labeled = sources.has_labels(builder)
  label = builder.info.features['label'] if labeled else None
  try:
    num_eval = sources.split_num_examples(builder, config.eval_split)
  except ValueError:
    num_eval = None
  return {
      'name': builder.name,
      'version': str(builder.version),
      'splits': {name: int(info.num_examples)
                 for name, info in builder.info.splits.items()},
      'num_train_examples': sources.split_num_examples(
          builder, config.train_split, 'config.dataset.train_split'),
      'num_eval_examples': num_eval,
      'image_shape': tuple(builder.info.features['image'].shape),
      'image_dtype': str(np.dtype(builder.info.features['image'].np_dtype)),
      'channel_stats': sources.channel_stats(builder),
      'has_labels': labeled,
      'num_classes': label.num_classes if labeled else None,
      'class_names': list(label.names) if labeled else None,
  }


# ----------------------------------------------------------------------------
# Helpers.

def _labels(examples: dict[str, tf.Tensor], count: tf.Tensor) -> tf.Tensor:
  if 'label' in examples:
    return tf.cast(examples['label'], tf.int32)
  return tf.fill([count], tf.constant(-1, tf.int32))


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  options.experimental_optimization.map_parallelization = True
  return options


def _resolve_processes(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index}, process_count={process_count}: need '
        'process_count >= 1 and 0 <= process_index < process_count.')
  return process_index, process_count


def _local_batch_size(batch_size: int, process_count: int, setting: str):
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(
        f'{setting}={batch_size}: must be a positive multiple of the number '
        f'of processes ({process_count}); each process yields '
        f'{setting} // {process_count} examples.')
  return batch_size // process_count
