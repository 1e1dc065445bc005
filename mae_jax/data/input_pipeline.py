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
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from mae_jax.data import preprocess, sources

_SHUFFLE_STREAM = 0  # fold_in tags that separate the two random streams.
_AUGMENT_STREAM = 1
# fold_in tags inside an epoch's key: blocks use their index (>= 0).
_BLOCK_OFFSET = -1
_PIECE_ORDER = -2
_MAX_READ_CYCLE = 16  # Pieces (files) read at the same time, at most.
_MAX_PIECES_PER_SPAN = 4  # Bounds the re-reading of a file cut into pieces (see _Pieces).
_MAX_CHUNK = 32  # Examples per guarded preprocessing call, at most.
_READ_BUFFER = 8 << 20  # Bytes buffered per open file, as TFDS does.


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
      given an encoded image string or a uint8 [H, W, C] image and a [2] int
      seed; default the MAE pretraining transform of `dataset_config`.

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
  if preprocess_fn is None:
    preprocess_fn = preprocess.make_pretrain_preprocess_fn(config)

  builder = sources.get_builder(config)
  split = sources.process_split(config.train_split, process_index,
                                process_count)
  num_local = sources.split_num_examples(builder, split,
                                         'config.dataset.train_split')
  if num_local == 0:
    raise ValueError(
        f'config.dataset.train_split={config.train_split!r} leaves no '
        f'examples for process {process_index} of {process_count}: use a '
        'larger split or fewer processes.')

  source = _RecordSource.create(builder, split)
  num_local = source.num_examples
  shuffle = config.shuffle_buffer > 1
  block_size = min(config.shuffle_buffer, num_local)
  pieces = _Pieces.cut(source.spans, block_size if shuffle else num_local)
  cycle = pieces.read_cycle(block_size, num_local) if shuffle else 1

  # Decoded images can be cached only when they all have one shape;
  # otherwise the cache holds encoded bytes.
  image_shape = builder.info.features['image'].shape
  warm_up = None
  if config.cache:
    decode_fn = None
    if sources.image_is_encoded(builder) and all(
        d is not None for d in image_shape):
      decode_fn = _stored_image_decoder(builder)
    read_piece, warm_up = _cached_pieces(source, pieces, decode_fn)
    parallel = False
  else:
    read_piece, parallel = pieces.reader(source), source.parallel

  key = tf.constant([seed, process_index], tf.int64)
  shuffle_key = tf.random.experimental.stateless_fold_in(key, _SHUFFLE_STREAM)
  augment_key = tf.random.experimental.stateless_fold_in(key, _AUGMENT_STREAM)

  def epoch_records(epoch):
    epoch_key = tf.random.experimental.stateless_fold_in(shuffle_key, epoch)
    order = tf.range(pieces.count, dtype=tf.int64)
    if shuffle:
      order = tf.random.experimental.stateless_shuffle(
          order, tf.random.experimental.stateless_fold_in(epoch_key,
                                                          _PIECE_ORDER))
    records = tf.data.Dataset.from_tensor_slices(order)
    if cycle == 1:
      records = records.flat_map(read_piece)
    else:
      records = records.interleave(
          read_piece, cycle_length=cycle, block_length=1,
          num_parallel_calls=tf.data.AUTOTUNE if parallel else None,
          deterministic=True if parallel else None)
    return _block_shuffle(records, block_size, epoch_key, num_local)

  start = start_step * local_batch
  first_epoch, offset = divmod(start, num_local)
  ds = tf.data.Dataset.counter(first_epoch).flat_map(epoch_records)
  if warm_up is not None:  # Fills the cache; yields nothing.
    ds = warm_up.concatenate(ds)
  ds = ds.skip(offset)  # Still undecoded: resuming decodes nothing extra.
  ds = ds.enumerate(start)  # Position of each example in this process's stream.

  def preprocess_one(position, image):
    return preprocess_fn(
        image, tf.random.experimental.stateless_fold_in(augment_key, position))

  def preprocess_chunk(positions, examples):
    images, valid = _guarded_map(preprocess_one, (positions, examples['image']))
    if 'valid' in examples:  # Decoded before caching.
      valid &= examples['valid']
    return {'image': images, 'label': _labels(examples, tf.size(positions)),
            'valid': valid}

  # Chunks of consecutive examples are preprocessed under one guard each,
  # in parallel; a batch is a whole number of chunks.
  chunk = _chunk_size(local_batch)
  ds = ds.batch(chunk, drop_remainder=True)
  ds = ds.map(preprocess_chunk, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch // chunk, drop_remainder=True)
  ds = ds.map(lambda chunks: _replace_corrupt(_merge_chunks(chunks,
                                                            local_batch)))
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
  if preprocess_fn is None:
    preprocess_fn = preprocess.make_eval_preprocess_fn(config)
  builder = sources.get_builder(config)
  splits = [sources.process_split(split, i, process_count)
            for i in range(process_count)]
  sizes = [sources.split_num_examples(builder, s, 'split') for s in splits]
  num_batches = math.ceil(max(sizes) / local_batch)

  def preprocess_chunk(examples):
    images, valid = _guarded_map(preprocess_fn, (examples['image'],))
    labels = _labels(examples, tf.size(valid))
    return {'image': images, 'label': tf.where(valid, labels, -1),
            'valid': valid}

  ds = None
  if sizes[process_index]:
    ds = sources.read_records(builder, splits[process_index])
    ds = ds.batch(min(local_batch, _MAX_CHUNK))
    ds = ds.map(preprocess_chunk, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.unbatch().batch(local_batch).prefetch(tf.data.AUTOTUNE)
    ds = ds.with_options(_options())
  image_shape = (config.image_size, config.image_size, config.channels)
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
    stored; None for varying sizes), has_labels, num_classes and class_names
    (None for unlabeled data).
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
      'has_labels': labeled,
      'num_classes': label.num_classes if labeled else None,
      'class_names': list(label.names) if labeled else None,
  }


# ----------------------------------------------------------------------------
# Reading records in pieces.

ReadFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.data.Dataset]


@dataclasses.dataclass(frozen=True)
class _RecordSource:
  """Where a process's records come from, in their fixed order.

  Attributes:
    spans: (file, skip, take) per file, in order: records skip..skip+take-1
      of file number `file`.
    read: fn(file, skip, take) -> tf.data.Dataset of those records, as
      {'image': encoded string or uint8 [H, W, C], 'label'?: int64}.
    parallel: whether pieces may be read in parallel (separate files).
  """

  spans: tuple[tuple[int, int, int], ...]
  read: ReadFn
  parallel: bool

  @property
  def num_examples(self) -> int:
    return sum(take for _, _, take in self.spans)

  @classmethod
  def create(cls, builder: tfds.core.DatasetBuilder, split: Any
             ) -> _RecordSource:
    """The split's TFRecord files if TFDS reads them; else its as_dataset."""
    keys = ['image'] + (['label'] if sources.has_labels(builder) else [])
    instructions = _tfrecord_instructions(builder, split)
    if instructions is not None:
      files = sorted({os.fspath(i.filename) for i in instructions})
      file_index = {name: index for index, name in enumerate(files)}
      spans = tuple((file_index[os.fspath(i.filename)], int(i.skip),
                     int(i.take)) for i in instructions if i.take > 0)
      features = tfds.features.FeaturesDict(
          {k: builder.info.features[k] for k in keys})
      decoders = None
      if sources.image_is_encoded(builder):
        decoders = {'image': tfds.decode.SkipDecoding()}
      filenames = tf.constant(files)

      def read(file, skip, take):
        records = tf.data.TFRecordDataset(tf.gather(filenames, file),
                                          buffer_size=_READ_BUFFER)
        return records.skip(skip).take(take).map(
            lambda record: features.deserialize_example(record,
                                                        decoders=decoders))

      return cls(spans=spans, read=read, parallel=True)

    records = sources.read_records(builder, split)
    count = int(records.cardinality())
    if count <= 0:  # Known for TFDS data; authoritative under mocks.
      count = sources.split_num_examples(builder, split)
    logging.info('Reading %s through as_dataset: each epoch skips over the '
                 'split to reach its pieces.', builder.name)
    return cls(spans=((0, 0, count),),
               read=lambda file, skip, take: records.skip(skip).take(take),
               parallel=False)


def _tfrecord_instructions(builder: tfds.core.DatasetBuilder, split: Any):
  """The split's TFDS file instructions, if TFDS reads it from TFRecords.

  None for builders whose `_as_dataset` is not TFDS's file reader (custom
  builders, tfds.testing.mock_data) and for other file formats.
  """
  as_dataset = getattr(type(builder), '_as_dataset', None)
  if (not isinstance(builder, tfds.core.dataset_builder.FileReaderBuilder)
      or getattr(as_dataset, '__module__', None)
      != tfds.core.dataset_builder.__name__):
    return None
  file_format = builder.info.file_format
  if file_format is not None and (tfds.core.FileFormat.from_value(file_format)
                                  != tfds.core.FileFormat.TFRECORD):
    return None
  try:
    return list(builder.info.splits[split].file_instructions)
  except (AttributeError, KeyError, ValueError, TypeError):
    return None


@dataclasses.dataclass(frozen=True)
class _Pieces:
  """A source's records cut into pieces, in the source's order.

  A span (the records of one file) of `take` records is cut into
  k = min(max(1, take // block_size), _MAX_PIECES_PER_SPAN) pieces of
  size = ceil(take / k) records, the last one possibly shorter: a span
  shorter than 2 * block_size is one piece, a longer one is cut into pieces
  of at least block_size. A piece that starts inside a span reads past the
  records before it, so the cap bounds the reading to (k + 1) / 2 <= 2.5
  times the span per epoch (a single-span `as_dataset` source included).

  Attributes:
    spans: (file, skip, take, size) per span of the source.
    table: int64 [count, 3], (file, skip, take) per piece.
  """

  spans: tuple[tuple[int, int, int, int], ...]
  table: np.ndarray

  @classmethod
  def cut(cls, spans, block_size: int) -> _Pieces:
    sized, table = [], []
    for file, skip, take in spans:
      pieces = min(max(1, take // max(1, block_size)), _MAX_PIECES_PER_SPAN)
      size = -(-take // pieces)
      sized.append((file, skip, take, size))
      for start in range(skip, skip + take, size):
        table.append((file, start, min(size, skip + take - start)))
    return cls(spans=tuple(sized),
               table=np.asarray(table, np.int64).reshape(-1, 3))

  @property
  def count(self) -> int:
    return len(self.table)

  def read_cycle(self, block_size: int, num_examples: int) -> int:
    """Pieces read at the same time: about one shuffle block's worth."""
    per_block = round(block_size * self.count / num_examples)
    return int(max(1, min(_MAX_READ_CYCLE, self.count, per_block)))

  def reader(self, source: _RecordSource) -> Callable[[tf.Tensor],
                                                      tf.data.Dataset]:
    """fn(piece index) -> dataset of the piece's records."""
    # Columns, not tf.unstack: tf.data's noop_elimination crashes (TF 2.21)
    # on a skip or take count that is one output of a multi-output op.
    files, skips, takes = (tf.constant(column) for column in self.table.T)

    def read_piece(index):
      return source.read(tf.gather(files, index), tf.gather(skips, index),
                         tf.gather(takes, index))

    return read_piece


def _cached_pieces(source: _RecordSource, pieces: _Pieces, decode_fn):
  """Pieces cached in memory: (fn(piece index) -> dataset, warm-up dataset).

  The cache holds one element per piece, its records batched; `decode_fn`
  (if given) decodes the images first, under a guard ('valid' flags). The
  warm-up dataset reads the whole cache once and yields nothing: a cache is
  kept only when it is read to its end, so it must be full before pieces
  are read from it out of order.
  """
  spans = np.asarray(pieces.spans, np.int64).reshape(-1, 4)

  def span_pieces(file, skip, take, size):  # See _Pieces.reader on unstack.
    return source.read(file, skip, take).batch(size)

  cached = tf.data.Dataset.from_tensor_slices(tuple(spans.T)).flat_map(
      span_pieces)
  if decode_fn is not None:

    def decode_piece(examples):
      images, valid = _guarded_map(decode_fn, (examples['image'],))
      return {**examples, 'image': images, 'valid': valid}

    cached = cached.map(decode_piece, num_parallel_calls=tf.data.AUTOTUNE)
  cached = cached.cache()

  def read_piece(index):
    return cached.skip(index).take(1).unbatch()

  warm_up = cached.unbatch().filter(lambda example: tf.constant(False))
  return read_piece, warm_up


def _stored_image_decoder(builder: tfds.core.DatasetBuilder):
  """fn(encoded image) -> uint8 image of the stored (fixed) shape, or raises."""
  shape = tuple(builder.info.features['image'].shape)

  def decode(image):
    return tf.ensure_shape(preprocess.decode_image(image, shape[-1]), shape)

  return decode


def _block_shuffle(ds: tf.data.Dataset, block_size: int, key: tf.Tensor,
                   num_examples: int) -> tf.data.Dataset:
  """One epoch of `ds`, permuted within blocks of block_size elements.

  Each block gets its own stateless permutation. Unless one block holds the
  whole epoch (a full permutation), the first block has a random length in
  (0, block_size], so block boundaries, and with them the sets of examples
  that can share a batch, move from epoch to epoch.
  """
  if block_size <= 1:
    return ds
  if block_size >= num_examples:
    return _permute_blocks(ds.batch(block_size), key).unbatch()
  # Shift block boundaries by prepending `pad` fillers, dropped afterwards.
  pad = tf.random.stateless_uniform(
      [], tf.random.experimental.stateless_fold_in(key, _BLOCK_OFFSET),
      minval=0, maxval=block_size, dtype=tf.int64)
  filler = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype),
                                 ds.element_spec)
  flagged = tf.data.Dataset.from_tensors((filler, False)).repeat(pad)
  flagged = flagged.concatenate(ds.map(lambda example: (example, True)))
  ds = _permute_blocks(flagged.batch(block_size), key).unbatch()
  return ds.filter(lambda example, real: real).map(lambda example, _: example)


def _permute_blocks(blocks: tf.data.Dataset, key: tf.Tensor
                    ) -> tf.data.Dataset:
  """Applies a stateless permutation keyed by (key, block index) to blocks."""

  def permute(block_index, block):
    count = tf.shape(tf.nest.flatten(block)[0])[0]
    order = tf.random.experimental.stateless_shuffle(
        tf.range(count),
        tf.random.experimental.stateless_fold_in(key, block_index))
    return tf.nest.map_structure(lambda t: tf.gather(t, order), block)

  return blocks.enumerate().map(permute).prefetch(1)


# ----------------------------------------------------------------------------
# Surviving corrupt images.

def _guarded_map(fn, args):
  """Maps fn over the leading axis of `args`, surviving errors of fn.

  Args:
    fn: fn(*one_row_of_args) -> a tensor (or structure) of a static shape.
    args: tuple of tensors with a common leading dimension n.

  Returns:
    (outputs, valid): fn's outputs stacked to [n, ...], zeros in the rows
    where fn raised an error (e.g. an undecodable image), and bool [n],
    False in those rows. Errors are logged as warnings.
  """
  n = tf.shape(tf.nest.flatten(args)[0])[0]
  rows = tf.data.Dataset.from_tensor_slices((tf.range(n), args))
  mapped = rows.map(lambda index, row: (index, fn(*row)))
  spec = mapped.element_spec[1]
  done = mapped.ignore_errors(log_warning=True).batch(tf.cast(n, tf.int64))
  nothing = tf.data.Dataset.from_tensors((
      tf.zeros([0], tf.int32),
      tf.nest.map_structure(
          lambda s: tf.zeros([0] + [d or 0 for d in s.shape.as_list()],
                             s.dtype), spec)))
  index, outputs = done.concatenate(nothing).take(1).get_single_element()
  complete = tf.equal(tf.size(index), n)

  def scatter(t):
    return tf.scatter_nd(index[:, None], t,
                         tf.concat([[n], tf.shape(t)[1:]], 0))

  def place(t, s):
    t = tf.cond(complete, lambda: t, lambda: scatter(t))
    t.set_shape([None] + s.shape.as_list())
    return t

  outputs = tf.nest.map_structure(place, outputs, spec)
  valid = tf.scatter_nd(index[:, None], tf.ones_like(index), [n]) > 0
  return outputs, valid


def _chunk_size(local_batch: int) -> int:
  """The largest divisor of local_batch that is at most _MAX_CHUNK."""
  return max(d for d in range(1, min(local_batch, _MAX_CHUNK) + 1)
             if local_batch % d == 0)


def _merge_chunks(chunks: dict[str, tf.Tensor], local_batch: int):
  """[chunks, chunk, ...] -> [local_batch, ...]."""
  def merge(v):
    if v.shape[2:].is_fully_defined():
      return tf.reshape(v, [local_batch, *v.shape[2:]])
    return tf.reshape(v, tf.concat([[local_batch], tf.shape(v)[2:]], 0))

  return {k: merge(v) for k, v in chunks.items()}


def _replace_corrupt(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Fills the rows of corrupt examples with copies of valid ones.

  Row i, if not valid, takes valid row number i % (number of valid rows); a
  batch without any valid row keeps zero images and gets label -1. Returns
  the batch with 'corrupt' = ~valid instead of 'valid'.
  """
  batch = dict(batch)
  valid = batch.pop('valid')
  rows = tf.range(tf.size(valid))
  valid_rows = tf.cast(tf.where(valid)[:, 0], tf.int32)
  num_valid = tf.size(valid_rows)

  def copy_valid():
    source = tf.where(valid, rows,
                      tf.gather(valid_rows, rows % tf.maximum(num_valid, 1)))
    return {k: tf.gather(v, source) for k, v in batch.items()}

  def blank():
    return {k: (tf.fill(tf.shape(v), tf.constant(-1, v.dtype))
                if k == 'label' else tf.zeros_like(v))
            for k, v in batch.items()}

  fixed = tf.cond(
      tf.reduce_all(valid), lambda: batch,
      lambda: tf.cond(num_valid > 0, copy_valid, blank))
  for k, v in fixed.items():
    v.set_shape(batch[k].shape)
  return {**fixed, 'corrupt': tf.logical_not(valid)}


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
