"""Surviving corrupt images: decode (or preprocess) under a guard, replace, count.

A record whose image cannot be decoded or preprocessed must not stop a run
that has read millions of good ones, nor move any other example (resuming
stays exact). `guarded_map` runs the preprocessing of a chunk of consecutive
examples, reports which rows failed and logs a warning naming each record; `replace_corrupt` fills each failed
row of a batch with a copy of another example of the same batch and flags it
in batch['corrupt'], which the trainer sums to count them.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import tensorflow as tf
from absl import logging

MAX_CHUNK = 32  # Examples per guarded preprocessing call, at most.


def guarded_map(fn, args, names):
  """Maps fn over the leading axis of `args`, surviving errors of fn.

  Args:
    fn: fn(*one_row_of_args) -> a tensor (or structure) of a static shape.
    args: tuple of tensors with a common leading dimension n.
    names: string [n], what each row is (e.g. 'record 17 of FILE').

  Returns:
    (outputs, valid): fn's outputs stacked to [n, ...], zeros in the rows
    where fn raised an error (e.g. an undecodable image), and bool [n],
    False in those rows. Each such row is a warning that names it and says
    why.
  """
  n = tf.shape(tf.nest.flatten(args)[0])[0]
  rows = tf.data.Dataset.from_tensor_slices((tf.range(n), args))
  mapped = rows.map(lambda index, row: (index, fn(*row)))
  spec = mapped.element_spec[1]
  done = mapped.ignore_errors().batch(tf.cast(n, tf.int64))
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
  return outputs, _warned(fn, args, names, valid)


_WARNED = set()  # Records warned about in this process.
_WARNED_LOCK = threading.Lock()


def forget_warned() -> None:
  """Warn again about records already warned about (a new run in the same process; tests)."""
  with _WARNED_LOCK:
    _WARNED.clear()


def _warned(fn, args, names, valid):
  """valid, once each failed row has been logged (a no-op when none failed).

  TensorFlow's own warning for a skipped element names neither the element
  nor the data set, and spans several lines: a failed row is run again,
  eagerly, to say why it failed. A record fails again in every epoch and
  every evaluation: the warning is given once per process (the terminal),
  later ones go to the log file only.
  """

  def log(names, valid, *args):
    try:
      for row in np.flatnonzero(~valid.numpy()):
        name = names[row].numpy().decode('utf-8', 'replace')
        with _WARNED_LOCK:
          again = name in _WARNED
          _WARNED.add(name)
        if again:
          logging.info('Skipped again: %s', name)
        else:
          logging.warning('Skipped an image that could not be decoded or preprocessed: %s (%s)',
                          name, _error(fn, [a[row] for a in args]))
    except Exception as e:  # pylint: disable=broad-except  # A failed warning must not fail the batch.
      logging.warning('Skipped %d images that could not be decoded or preprocessed (naming them failed: %s: %s)',
                      int(np.sum(~valid.numpy())), type(e).__name__, e)
    return valid

  def warn():
    logged = tf.py_function(log, [names, valid, *args], tf.bool)
    return tf.ensure_shape(logged, valid.shape)

  return tf.cond(tf.reduce_all(valid), lambda: valid, warn)


def _error(fn, row) -> str:
  """Why fn(*row) fails: its error message, without TensorFlow's op and function names."""
  try:
    fn(*row)
  except tf.errors.OpError as e:
    message = re.sub(r'\{\{function_node [^}]*\}\}', '', e.message)
    message = re.split(r'\s\[Op:|\n\s*\[\[', message)[0]
    return ' '.join(message.split()) or type(e).__name__
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'
  return 'failed in the input pipeline, not when run again'


def chunk_size(local_batch: int) -> int:
  """The largest divisor of local_batch that is at most MAX_CHUNK."""
  return max(d for d in range(1, min(local_batch, MAX_CHUNK) + 1)
             if local_batch % d == 0)


def merge_chunks(chunks: dict[str, tf.Tensor], local_batch: int):
  """[chunks, chunk, ...] -> [local_batch, ...]."""
  def merge(v):
    if v.shape[2:].is_fully_defined():
      return tf.reshape(v, [local_batch, *v.shape[2:]])
    return tf.reshape(v, tf.concat([[local_batch], tf.shape(v)[2:]], 0))

  return {k: merge(v) for k, v in chunks.items()}


def replace_corrupt(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
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
