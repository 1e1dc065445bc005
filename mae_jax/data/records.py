"""A process's records, read in pieces and reordered every epoch.

The input pipeline (`input_pipeline.create_pretrain_dataset`) reads a
process's part of the training split through this module:

  * `RecordSource`: where the records are, in a fixed order: the split's
    TFRecord files (read directly, images left encoded), or, for builders
    TFDS does not read from TFRecord files, `as_dataset`.
  * `Pieces`: those records cut into pieces (whole files, or up to
    _MAX_PIECES_PER_SPAN runs of a long file), each readable on its own.
  * `read_epoch`: one epoch: the pieces in an order keyed by the epoch,
    several read at a time, then shuffled in blocks (`block_shuffle`) whose
    boundaries move from epoch to epoch.
  * `cached_pieces`: the same pieces held in memory (decoded when all images
    have one shape).

Every function here is a pure function of its arguments and keys, so an
epoch's order depends only on (seed, process, epoch).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from mae_jax.data import corrupt, preprocess, sources

# fold_in tags inside an epoch's key: blocks use their index (>= 0).
_BLOCK_OFFSET = -1
_PIECE_ORDER = -2
_MAX_READ_CYCLE = 16  # Pieces (files) read at the same time, at most.
_MAX_PIECES_PER_SPAN = 4  # Bounds the re-reading of a file cut into pieces (see Pieces).
_READ_BUFFER = 8 << 20  # Bytes buffered per open file, as TFDS does.

ReadFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.data.Dataset]


@dataclasses.dataclass(frozen=True)
class RecordSource:
  """Where a process's records come from, in their fixed order.

  Attributes:
    spans: (file, skip, take) per file, in order: records skip..skip+take-1
      of file number `file`.
    read: fn(file, skip, take) -> tf.data.Dataset of those records, as
      {'image': encoded string or uint8 [H, W, C], 'label'?: int64,
       'record': string naming the record for warnings}.
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
             ) -> RecordSource:
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
      pack = (sources.pack_image if sources.image_is_packed(builder)
              else lambda example: example)
      filenames = tf.constant(files)
      basenames = tf.constant([os.path.basename(name) for name in files])

      def read(file, skip, take):
        records = tf.data.TFRecordDataset(tf.gather(filenames, file),
                                          buffer_size=_READ_BUFFER)
        # Named as sources.read_records names them (for warnings).
        where = tf.strings.join([' of ', tf.gather(basenames, file)])
        return records.skip(skip).take(take).enumerate(skip).map(
            lambda index, record: {
                **pack(features.deserialize_example(record, decoders=decoders)),
                'record': tf.strings.join(['record ', tf.strings.as_string(index), where])})

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
class Pieces:
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
  def cut(cls, spans, block_size: int) -> Pieces:
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

  def reader(self, source: RecordSource) -> Callable[[tf.Tensor],
                                                     tf.data.Dataset]:
    """fn(piece index) -> dataset of the piece's records."""
    # Columns, not tf.unstack: tf.data's noop_elimination crashes (TF 2.21)
    # on a skip or take count that is one output of a multi-output op.
    files, skips, takes = (tf.constant(column) for column in self.table.T)

    def read_piece(index):
      return source.read(tf.gather(files, index), tf.gather(skips, index),
                         tf.gather(takes, index))

    return read_piece


def read_epoch(pieces: Pieces, read_piece: Callable[[tf.Tensor],
                                                    tf.data.Dataset],
               epoch_key: tf.Tensor, *, shuffle: bool, cycle: int,
               parallel: bool, block_size: int,
               num_examples: int) -> tf.data.Dataset:
  """One epoch of records, every one once, in the order keyed by epoch_key.

  Args:
    pieces: the source's pieces.
    read_piece: fn(piece index) -> its records (`Pieces.reader` or
      `cached_pieces`).
    epoch_key: int64 [2] stateless key of this epoch.
    shuffle: whether to reorder; False reads the pieces in order.
    cycle: pieces read at the same time (`Pieces.read_cycle`), 1 to read
      them one after another.
    parallel: whether those pieces may be read in parallel.
    block_size: records per shuffle block (`block_shuffle`).
    num_examples: records per epoch.
  """
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
  return block_shuffle(records, block_size, epoch_key, num_examples)


def cached_pieces(source: RecordSource, pieces: Pieces, decode_fn):
  """Pieces cached in memory: (fn(piece index) -> dataset, warm-up dataset).

  The cache holds one element per piece, its records batched; `decode_fn`
  (if given) decodes the images first, under a guard ('valid' flags). The
  warm-up dataset reads the whole cache once and yields nothing: a cache is
  kept only when it is read to its end, so it must be full before pieces
  are read from it out of order.
  """
  spans = np.asarray(pieces.spans, np.int64).reshape(-1, 4)

  def span_pieces(file, skip, take, size):  # See Pieces.reader on unstack.
    return source.read(file, skip, take).batch(size)

  cached = tf.data.Dataset.from_tensor_slices(tuple(spans.T)).flat_map(
      span_pieces)
  if decode_fn is not None:

    def decode_piece(examples):
      images, valid = corrupt.guarded_map(decode_fn, (examples['image'],), examples['record'])
      return {**examples, 'image': images, 'valid': valid}

    cached = cached.map(decode_piece, num_parallel_calls=tf.data.AUTOTUNE)
  cached = cached.cache()

  def read_piece(index):
    return cached.skip(index).take(1).unbatch()

  warm_up = cached.unbatch().filter(lambda example: tf.constant(False))
  return read_piece, warm_up


def stored_image_decoder(builder: tfds.core.DatasetBuilder):
  """fn(encoded image) -> uint8 image of the stored (fixed) shape, or raises."""
  shape = tuple(builder.info.features['image'].shape)

  def decode(image):
    return tf.ensure_shape(preprocess.decode_image(image, shape[-1]), shape)

  return decode


def block_shuffle(ds: tf.data.Dataset, block_size: int, key: tf.Tensor,
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
