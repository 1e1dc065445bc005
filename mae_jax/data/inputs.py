"""Config -> input: the data package's entry points for the trainers.

Each function takes the whole experiment config and picks the source by
config.dataset.name: 'synthetic' (`synthetic`, in memory) or a TFDS data set
(`input_pipeline`). They read declared config keys directly; the downstream
ones (`make_train_preprocess_fn`, `create_train_iterator`,
`create_eval_iterator`) expect a downstream config (num_classes, randaug.*,
reprob, remode, recount; see configs/common.py).

Every iterator yields this process's share of each global batch, and is a
pure function of (config.seed, step) or of the split: resuming at a step
yields what an uninterrupted run yields from there.
"""

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mae_jax import config_tools, data
from mae_jax.data import augment, input_pipeline, preprocess, sources, synthetic

SYNTHETIC = 'synthetic'  # config.dataset.name of the in-memory source.
_SYNTHETIC_EVAL_SEED_OFFSET = 10**6  # Synthetic splits other than train_split: fresh examples.


def _is_synthetic(config) -> bool:
  return config.dataset.name == SYNTHETIC


# ----------------------------------------------------------------------------
# Pretraining (unlabelled).

def num_train_examples(config) -> int:
  """Examples of config.dataset.train_split (synthetic: config.dataset.num_examples)."""
  if _is_synthetic(config):
    return int(config.dataset.num_examples)
  return input_pipeline.num_examples(config.dataset, config.dataset.train_split)


@config_tools.settings_check
def check_input(config) -> None:
  """Checks the data set against the settings before a model is built or a checkpoint read.

  The data set exists (DatasetNotFoundError with the prepare command), its
  images fit config.dataset.channels, the statistics that mean = std = ()
  stand for are there and finite, RandAugment (randaug.num_layers > 0) gets
  8-bit grey or RGB images, and a pretraining kNN monitor (eval_every_steps
  > 0) has labels. The same checks run again where the pipeline is built; here
  they fail in seconds instead of after the compile.
  """
  if _is_synthetic(config):
    return
  data = sources.DatasetConfig.from_config(config.dataset.to_dict())
  builder = sources.get_builder(data)
  sources.check_channels(builder, data)
  sources.resolve_stats(data, builder)
  _, dtype = sources.stored_image(builder)
  augments = 'randaug' in config and config.downstream != 'knn'  # The kNN job reads the eval transform only.
  num_layers = int(config.randaug.num_layers) if augments else 0
  _check_rand_augment(num_layers, sources.pixel_scale(dtype), data.channels, np.dtype(dtype).name,
                      f'data set {builder.name!r}')
  if 'downstream' not in config and config.eval_every_steps > 0 and not sources.has_labels(builder):
    raise ValueError(f'eval_every_steps={config.eval_every_steps}: the kNN monitor of pretraining needs labels, '
                     f'and data set {builder.name!r} has none; set --config.eval_every_steps=0 (or prepare the '
                     'data with one sub-folder per class)')


def _check_rand_augment(num_layers: int, pixel_max: float | None, channels: int, dtype_name: str, what: str):
  """RandAugment's ops take 8-bit grey or RGB images (`check_input` asks first, the training transform again)."""
  if num_layers > 0 and (pixel_max != 255.0 or channels not in (1, 3)):
    raise ValueError(f'randaug.num_layers={num_layers}: RandAugment works on 8-bit grey or RGB images, but {what} '
                     f'holds {channels} channels of {dtype_name}; set --config.randaug.num_layers=0')


def check_eval_split(config) -> None:
  """Names a config.dataset.eval_split the data set lacks (or an empty one) now, not at the first evaluation."""
  if _is_synthetic(config):
    return
  split = config.dataset.eval_split
  builder = sources.get_builder(config.dataset)
  if sources.split_num_examples(builder, split, 'dataset.eval_split') == 0:
    raise ValueError(f'dataset.eval_split={split!r} of {builder.name!r} has no examples; evaluate on another '
                     "split, e.g. 'train[95%:]' with dataset.train_split='train[:95%]'")


def create_pretrain_iterator(config, start_step: int) -> Iterator[dict]:
  """This process's local pretraining batches from `start_step` on; a pure function of (seed, step)."""
  kwargs = dict(global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
                process_index=jax.process_index(), process_count=jax.process_count())
  if _is_synthetic(config):
    return synthetic.create_pretrain_iterator(config.dataset, **kwargs)
  return input_pipeline.create_pretrain_iterator(config.dataset, **kwargs)


# ----------------------------------------------------------------------------
# Downstream (labelled).

def dataset_config(config) -> sources.DatasetConfig:
  """config.dataset as the input pipeline reads it.

  The synthetic source ignores mean / std, and pretraining configs made
  synthetic by runlocal may keep a one-channel mean: repeat it per channel.
  """
  values = config.dataset.to_dict()
  if _is_synthetic(config):
    for key in ('mean', 'std'):
      if len(values[key]) != values['channels']:
        values[key] = ((values[key] or (0.0 if key == 'mean' else 1.0))[0],) * values['channels']
    return sources.DatasetConfig.from_config(values)
  return sources.resolve_stats(sources.DatasetConfig.from_config(values))


def resolve_dataset_stats(config):
  """A copy of `config` whose dataset.mean / std, when () ('from the data set'), hold the stored statistics.

  Trainers call it first, so the saved config.json, exports and reconstruction
  grids carry the numbers the run normalised with. Configs with explicit
  values and the synthetic source come back unchanged (as a copy).
  """
  config = config.copy_and_resolve_references()
  if _is_synthetic(config) or (len(config.dataset.mean) and len(config.dataset.std)):
    return config
  resolved = dataset_config(config)
  config.dataset.mean = resolved.mean  # Existing keys: allowed on a locked config too.
  config.dataset.std = resolved.std
  return config


def make_train_preprocess_fn(config) -> Callable:
  """fn(image, seed) -> normalised float32 [S, S, C]: the training transform of a downstream config.

  RandomResizedCrop + flip always; RandAugment when randaug.num_layers > 0 and
  random erasing when reprob > 0 (fine-tuning recipes set them, linear probing
  does not).
  """
  data = dataset_config(config)
  num_layers = int(config.randaug.num_layers)
  magnitude = float(config.randaug.magnitude)
  magnitude_std = float(config.randaug.magnitude_std)
  reprob = float(config.reprob)
  remode = config.remode
  recount = int(config.recount)
  fill = 255.0 * float(np.mean(data.mean))

  def preprocess_fn(image, seed):
    crop_seed, flip_seed, aug_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))

    def window_fn(height, width):
      return preprocess.sample_crop_window(height, width, crop_seed, scale=data.crop_scale,
                                           ratio=data.crop_ratio)

    max_value = preprocess.pixel_max(image)
    _check_rand_augment(num_layers, max_value, data.channels, image.dtype.name, f'data set {data.name!r}')
    image = preprocess.resize(preprocess.decode_and_crop(image, window_fn, data.channels), data.image_size,
                              max_value)
    image = preprocess.random_flip(image, flip_seed)
    if num_layers > 0:
      image = augment.rand_augment(image, aug_seed, num_layers=num_layers, magnitude=magnitude,
                                   magnitude_std=magnitude_std, fill=fill)
    image = preprocess.normalize(image, data.mean, data.std, max_value)
    if reprob > 0:
      image = augment.random_erasing(image, erase_seed, probability=reprob, mode=remode, count=recount)
    return image

  return preprocess_fn


def resolve_num_classes(config) -> int:
  """config.num_classes, checked against the data set's labels (<= 0: the data set's)."""
  wanted = int(config.num_classes)
  if _is_synthetic(config):
    if wanted <= 0:
      raise ValueError('num_classes must be > 0 with dataset.name=synthetic')
    return wanted
  info = input_pipeline.dataset_info(config.dataset)
  if not info['has_labels']:
    raise ValueError(f'dataset.name={config.dataset.name!r} has no labels: fine-tuning, linear probing '
                     'and kNN need a labelled data set (a ClassLabel feature named "label")')
  if wanted <= 0:
    return int(info['num_classes'])
  if wanted != info['num_classes']:
    raise ValueError(f'num_classes={wanted} but dataset {config.dataset.name!r} has '
                     f'{info["num_classes"]} classes: set --config.num_classes={info["num_classes"]} '
                     '(or 0 to take it from the data set)')
  return wanted


def create_train_iterator(config, num_classes: int, start_step: int, preprocess_fn) -> Iterator[dict]:
  """This process's local training batches {'image', 'label'} from `start_step` on."""
  local = config.batch_size // jax.process_count()
  if _is_synthetic(config):
    positions = tf.data.Dataset.counter(start_step).flat_map(
        lambda s: tf.data.Dataset.range(s * config.batch_size + jax.process_index() * local,
                                        s * config.batch_size + (jax.process_index() + 1) * local))
    ds = synthetic.labelled_examples(config.dataset, num_classes, positions, config.seed, preprocess_fn)
    return ds.batch(local, drop_remainder=True).prefetch(2).as_numpy_iterator()
  return input_pipeline.create_pretrain_iterator(
      config.dataset, global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count(), preprocess_fn=preprocess_fn)


def create_eval_iterator(config, num_classes: int, split: str, batch_size: int) -> Iterator[dict]:
  """One pass over `split` (eval transform, no augmentation), padded: {'image', 'label', 'mask'}."""
  if not _is_synthetic(config):
    return input_pipeline.create_eval_iterator(config.dataset, split=split, batch_size=batch_size,
                                               process_index=jax.process_index(),
                                               process_count=jax.process_count())
  # Synthetic: the train split is the training examples, any other split fresh ones.
  total = int(config.dataset.num_examples)
  seed = config.seed if split == config.dataset.train_split else config.seed + _SYNTHETIC_EVAL_SEED_OFFSET
  local = batch_size // jax.process_count()
  per_process = -(-total // jax.process_count())
  start = min(total, jax.process_index() * per_process)
  stop = min(total, start + per_process)
  eval_fn = preprocess.make_eval_preprocess_fn(dataset_config(config))
  ds = synthetic.labelled_examples(config.dataset, num_classes, tf.data.Dataset.range(start, stop), seed)
  ds = ds.map(lambda ex: {'image': eval_fn(ex['image']), 'label': ex['label']})
  return pad_batches(ds.batch(local).as_numpy_iterator(), local, -(-per_process // local),
                     (local, *data.image_shape(config)))


def pad_batches(batches: Iterator[dict], local: int, num_batches: int, image_shape) -> Iterator[dict]:
  """Pads batches to `local` rows (mask False) and appends empty ones up to num_batches.

  Padding rows hold zero images and label -1; image_shape is the shape of a
  whole empty batch, [local, H, W, C].
  """
  yielded = 0
  for batch in batches:
    real = len(batch['label'])
    pad = local - real
    if pad:
      batch = {'image': np.concatenate([batch['image'], np.zeros((pad,) + batch['image'].shape[1:],
                                                                  np.float32)]),
               'label': np.concatenate([batch['label'], np.full((pad,), -1, np.int32)])}
    yield {**batch, 'mask': np.arange(local) < real}
    yielded += 1
  while yielded < num_batches:
    yield {'image': np.zeros(image_shape, np.float32), 'label': np.full((local,), -1, np.int32),
           'mask': np.zeros((local,), bool)}
    yielded += 1


def limited_split(split: str, count: int, split_infos: Mapping[str, Any] | None = None) -> str:
  """`split` limited to its first `count` examples ('train' -> 'train[:count]'); count <= 0: all.

  A sliced or combined split ('train[10%:95%]', 'train+validation') becomes
  absolute slices ('train[100:1100]') from `split_infos` (a builder's
  info.splits), so that the examples do not depend on the number of
  processes that read them; without split_infos it comes back unchanged, and
  readers of it stop after `count` examples themselves.
  """
  if count <= 0:
    return split
  if '[' not in split and '+' not in split:
    return f'{split}[:{count}]'
  if split_infos is None:
    return split
  pieces = []
  for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(split_infos):
    start = part.from_ or 0
    stop = part.to if part.to is not None else split_infos[part.splitname].num_examples
    stop = min(stop, start + count)
    if stop > start:
      pieces.append(f'{part.splitname}[{start}:{stop}]')
      count -= stop - start
    if count <= 0:
      break
  return '+'.join(pieces) or split
