"""Writing a TFDS data set by hand: sharded TFRecord files, metadata, an atomic rename.

Shared by the sources of `mae_jax.data.prepare` (Fashion-MNIST, folders of
images, `arrays`). A data set is written into OUT.incomplete and renamed to
OUT only when every file is complete, so an interrupted run leaves nothing
that TFDS would read.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mae_jax.data import sources

SKIPPED_FILES_NAME = 'skipped_files.txt'  # Files a prepare skipped, one 'path<TAB>why' line each.


class PrepareError(ValueError):
  """The source cannot be prepared as asked (the message says why)."""


def list_files(folder: str, extensions: Sequence[str]) -> list[str]:
  """Sorted '/'-separated paths of the files under folder ending in `extensions`.

  Hidden files and folders (names starting with '.') are ignored.
  """
  files = []
  for dirpath, dirnames, filenames in tf.io.gfile.walk(folder):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    rel_dir = os.path.relpath(dirpath, folder)
    for filename in filenames:
      if filename.startswith('.') or not filename.lower().endswith(tuple(extensions)):
        continue
      relpath = filename if rel_dir == '.' else os.path.join(rel_dir, filename)
      files.append(relpath.replace(os.sep, '/'))
  return sorted(files)


def ordered_map(fn: Callable[[Any], Any], items: Sequence[Any],
                 num_workers: int) -> Iterator[Any]:
  """fn over items on a thread pool, in order, with bounded look-ahead."""
  window = 8 * num_workers
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= window:
        yield pending.popleft().result()
    for future in pending:
      yield future.result()


def write_splits(tmp_dir: str, name: str, source: str, folder: str, splits: dict[str, list[str]], features,
                 read: Callable[[str], tuple[Any, str | None]], label_of: Callable[[str], int] | None, *,
                 seed: int, num_workers: int | None, bar: progress_bar, skipped: list,
                 on_example: Callable[[str, Any], None] = lambda split, value: None) -> list[tfds.core.SplitInfo]:
  """Writes each split's files as sharded records, in a seeded random order; returns their SplitInfos.

  read(relpath) -> (the 'image' value, None) or (None, why it cannot be read): such files are skipped and
  appended to `skipped` as (relpath, why). on_example(split, value) sees every example written. A split
  none of whose files reads is a PrepareError naming them (`source`: 'folder' or 'arrays').
  """
  split_infos = []
  for split, split_files in splits.items():
    split_files, num_shards = shuffle_and_shard(folder, split_files, seed)

    def examples(split=split, split_files=split_files, num_shards=num_shards):
      for index, (relpath, (value, error)) in enumerate(
          zip(split_files, ordered_map(read, split_files, num_workers or os.cpu_count()))):
        bar.update(1)
        if error is not None:
          skipped.append((relpath, error))
          continue
        on_example(split, value)
        example = {'image': value, 'file_name': relpath}
        if label_of is not None:
          example['label'] = label_of(relpath)
        yield index * num_shards // len(split_files), features.serialize_example(example)

    split_infos.append(write_shards(tmp_dir, name, split, examples(), num_shards))
  empty = [info.name for info in split_infos if info.num_examples == 0]
  if empty:
    which = f' of split {empty[0]}' if len(splits) > 1 else ''
    kind = 'image' if source == 'folder' else 'array'
    raise PrepareError(f'--source={source}:{folder}: none of the {len(splits[empty[0]])} {kind} files{which} could '
                       'be read:\n' + format_skipped([item for item in skipped if item[0] in set(splits[empty[0]])]))
  return split_infos


def write_skipped(tmp_dir: str, skipped: Sequence[tuple[str, str]]) -> None:
  """SKIPPED_FILES_NAME in the data set's folder: one 'path<TAB>why' line per skipped file (none: no file)."""
  if skipped:
    with tf.io.gfile.GFile(os.path.join(tmp_dir, SKIPPED_FILES_NAME), 'w') as f:
      f.write(''.join(f'{path}\t{error}\n' for path, error in skipped))


def format_skipped(skipped: Sequence[tuple[str, str]], limit: int = 50
                    ) -> str:
  lines = [f'  {path}: {error}' for path, error in skipped[:limit]]
  if len(skipped) > limit:
    lines.append(f'  ... and {len(skipped) - limit} more')
  return '\n'.join(lines)


def report(name: str, out_dir: str, split_infos: Sequence[tfds.core.SplitInfo], seconds: float,
           skipped: Sequence[tuple[str, str]], what: str, extra: str = '') -> None:
  """Prints what a prepare wrote ('Prepared NAME: train N, ... examples in S shards ...') and what it skipped."""
  counts = ', '.join(f'{info.name} {info.num_examples}' for info in split_infos)
  shards = sum(len(info.shard_lengths) for info in split_infos)
  print(f'Prepared {name}: {counts} examples in {shards} shards in {out_dir} in {seconds:.1f} s.'
        + (f' {extra}' if extra else ''))
  if skipped:
    print(f'Skipped {len(skipped)} unreadable {what} files (listed in {os.path.join(out_dir, SKIPPED_FILES_NAME)}):\n'
          + format_skipped(skipped))


def write_shards(directory: str, name: str, split: str,
                  examples: Iterable[tuple[int, bytes]],
                  num_shards: int) -> tfds.core.SplitInfo:
  """Writes (shard index, serialized example) pairs, shard indices ascending.

  Empty shards are dropped; files are named as TFDS expects:
  NAME-SPLIT.tfrecord-00000-of-00004.
  """
  counts = [0] * num_shards
  writer, current = None, None

  def temp_path(shard):
    return os.path.join(directory, f'.{split}-{shard:05d}.tmp')

  try:
    for shard, serialized in examples:
      if shard != current:
        if writer is not None:
          writer.close()
        writer, current = tf.io.TFRecordWriter(temp_path(shard)), shard
      writer.write(serialized)
      counts[shard] += 1
  finally:
    if writer is not None:
      writer.close()
  written = [i for i in range(num_shards) if counts[i]]
  num_bytes = 0
  for new_index, shard in enumerate(written):
    path = os.path.join(
        directory,
        f'{name}-{split}.tfrecord-{new_index:05d}-of-{len(written):05d}')
    tf.io.gfile.rename(temp_path(shard), path)
    num_bytes += tf.io.gfile.stat(path).length
  return tfds.core.SplitInfo(name=split,
                             shard_lengths=[counts[i] for i in written],
                             num_bytes=num_bytes)


def write_metadata(directory, features, split_infos, version, *,
                   channel_stats: dict | None = None, **info_kwargs):
  """Writes dataset_info.json and features.json (TFDS), and metadata.json.

  channel_stats (`arrays.ChannelStats.as_metadata`) go into metadata.json
  under sources.STATS_KEY, where `sources.channel_stats` reads them.
  """
  split_infos = [s for s in split_infos if s.num_examples]
  metadata = None
  if channel_stats is not None:
    metadata = tfds.core.MetadataDict({sources.STATS_KEY: channel_stats})
  tfds.folder_dataset.write_metadata(
      data_dir=directory, features=features, split_infos=split_infos,
      version=version, check_data=True, metadata=metadata, **info_kwargs)


class incomplete_dir:  # pylint: disable=invalid-name
  """Writes into OUT.incomplete, renamed to OUT only when all went well."""

  def __init__(self, out_dir: str):
    self.out_dir = out_dir
    self.tmp_dir = out_dir + '.incomplete'

  def __enter__(self) -> str:
    if tf.io.gfile.exists(self.tmp_dir):  # Left by an interrupted run.
      tf.io.gfile.rmtree(self.tmp_dir)
    tf.io.gfile.makedirs(self.tmp_dir)
    return self.tmp_dir

  def __exit__(self, exc_type, exc, traceback):
    if exc_type is not None:
      tf.io.gfile.rmtree(self.tmp_dir)
      return False
    if tf.io.gfile.exists(self.out_dir):  # --overwrite
      tf.io.gfile.rmtree(self.out_dir)
    tf.io.gfile.rename(self.tmp_dir, self.out_dir)
    return False


class progress_bar:  # pylint: disable=invalid-name
  """A tqdm bar on stderr, or a no-op."""

  def __init__(self, total: int, desc: str, enabled: bool):
    self.bar = None
    if enabled:
      import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm.tqdm(total=total, desc=desc, unit='img', file=sys.stderr,  # Logs and pipes: seldom.
                           mininterval=1.0 if sys.stderr.isatty() else 30.0,
                           leave=False)  # The 'Prepared ...' line that follows says it all.

  def __enter__(self):
    return self

  def update(self, n: int):
    if self.bar is not None:
      self.bar.update(n)

  def __exit__(self, *exc):
    if self.bar is not None:
      self.bar.close()
    return False


def is_prepared(out_dir: str) -> bool:
  return tf.io.gfile.exists(os.path.join(out_dir, 'dataset_info.json'))


def check_name(name: str, allow_catalog: str | None = None):
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise PrepareError(
        f'--name={name!r}: use lower-case letters, digits and "_", starting '
        'with a letter.')
  if name == allow_catalog:
    return
  try:
    tfds.builder_cls(name)
  except tfds.core.DatasetNotFoundError:
    return
  raise PrepareError(
      f'--name={name!r} is a TFDS catalog data set, whose code would be used '
      'to read it; choose another --name.')




TARGET_SHARD_BYTES = 128 << 20  # Source bytes per shard of a folder's data set.


def estimate_bytes(folder: str, files: Sequence[str], samples: int = 1000) -> int:
  """Total size of files, extrapolated from at most `samples` of them."""
  step = max(1, len(files) // samples)
  sizes = [tf.io.gfile.stat(os.path.join(folder, f)).length for f in files[::step]]
  return int(sum(sizes) / len(sizes) * len(files))


def folder_features(image_feature, class_names: Sequence[str]) -> tfds.features.FeaturesDict:
  """image, file_name and (with class names) label: the features of a data set prepared from a folder."""
  feature_dict = {'image': image_feature, 'file_name': tfds.features.Text()}
  if class_names:
    feature_dict['label'] = tfds.features.ClassLabel(names=class_names)
  return tfds.features.FeaturesDict(feature_dict)


def shuffle_and_shard(folder: str, files: Sequence[str], seed: int) -> tuple[list[str], int]:
  """The files in a seeded random order, and the number of shards that gives TARGET_SHARD_BYTES each."""
  order = np.random.default_rng(seed).permutation(len(files))
  num_shards = int(min(len(files), max(1, math.ceil(estimate_bytes(folder, files) / TARGET_SHARD_BYTES))))
  return [files[i] for i in order], num_shards


def name_from_folder(folder: str) -> str:
  """A valid data set name made from the folder's name."""
  base = os.path.basename(folder.rstrip('/')) or 'images'
  name = re.sub(r'[^a-z0-9]+', '_', base.lower()).strip('_')
  if not name or not name[0].isalpha():
    name = f'images_{name}'.rstrip('_')
  return name


# First-level folders with these names are the data set's splits (ImageNet's train/ and val/ layout).
SPLIT_FOLDER_NAMES = ('train', 'val', 'validation', 'test')


def split_layout(files: Sequence[str], labels: str, folder: str, split_folders: bool = True
                 ) -> tuple[dict[str, list[str]], list[str], Callable[[str], int] | None]:
  """({split: relpaths}, class names, fn(relpath) -> label) of a tree of files.

  When every file lies under a first-level folder named as a split (train/,
  val/, validation/, test/) and split_folders is on, those folders are the
  splits, and labels come from the second level with one class list for all
  splits. Otherwise every file is in split 'train' and labels come from the
  first level (`class_labels`).
  """
  tops = {f.split('/')[0] for f in files}
  if not split_folders or any('/' not in f for f in files) or not tops <= set(SPLIT_FOLDER_NAMES):
    class_names, label_of = class_labels(files, labels, folder)
    return {'train': list(files)}, class_names, label_of
  splits = {name: [f for f in files if f.split('/')[0] == name] for name in SPLIT_FOLDER_NAMES if name in tops}
  flat = [name for name, paths in splits.items() if any(p.count('/') == 1 for p in paths)]
  if labels == 'auto' and flat and len(flat) < len(splits):
    foldered = [name for name in splits if name not in flat]
    raise PrepareError(f'{folder}: {", ".join(f"{n}/" for n in flat)} holds images directly while '
                       f'{", ".join(f"{n}/" for n in foldered)} has class folders, so neither would be labelled: '
                       'put every split\'s images in class folders, or pass --labels=none')
  inner = [f.split('/', 1)[1] for f in files]
  class_names, inner_label = class_labels(inner, labels, f'{folder}/{{{",".join(splits)}}}')
  if inner_label is None:
    return splits, class_names, None
  return splits, class_names, lambda relpath: inner_label(relpath.split('/', 1)[1])


def describe_layout(splits: dict[str, Sequence[str]], class_names: Sequence[str]) -> str:
  """'splits train 1000, val 50; 10 classes from sub-folder names' for the prepare message."""
  if list(splits) == ['train']:
    text = ''
    where = 'sub-folder names'
  else:
    text = 'splits ' + ', '.join(f'{name} {len(paths)}' for name, paths in splits.items()) + '; '
    where = 'the sub-folder names inside them'
  return text + (f'{len(class_names)} classes from {where}' if class_names else 'no labels')


def class_labels(files: Sequence[str], labels: str, folder: str
                 ) -> tuple[list[str], Callable[[str], int]]:
  """(class names, fn(relpath) -> label) from first-level sub-folder names.

  labels: 'auto' (labelled when no file lies directly in `folder`), 'subdir'
  (always; error otherwise) or 'none'. No labels: ([], None).
  """
  if labels not in ('auto', 'subdir', 'none'):
    raise PrepareError(f'--labels={labels}: must be auto, subdir or none.')
  at_root = [f for f in files if '/' not in f]
  if labels == 'subdir' and at_root:
    raise PrepareError(
        f'--labels=subdir: {len(at_root)} files lie directly in {folder} '
        f'(e.g. {at_root[0]}); move them into class sub-folders or use '
        '--labels=none.')
  if labels == 'none' or (labels == 'auto' and at_root):
    return [], None
  class_names = sorted({f.split('/')[0] for f in files})
  class_index = {name: index for index, name in enumerate(class_names)}
  return class_names, lambda relpath: class_index[relpath.split('/')[0]]
