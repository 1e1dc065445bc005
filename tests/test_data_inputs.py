"""Tests of mae_jax.data.inputs: the config-level entry points of the data package.

Synthetic sources (pretraining and labelled) and a tiny prepared folder, on
the 8 CPU devices of tests/conftest.py (one process).
"""

import itertools
import os
import types

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import finetune as finetune_recipe
from configs import linprobe as linprobe_recipe
from configs import test as test_config
from mae_jax import finetune, linprobe, supervised
from mae_jax.data import input_pipeline, inputs, prepare, sources, synthetic

tf.config.set_visible_devices([], 'GPU')


def _take(iterator, count):
  return list(itertools.islice(iterator, count))


# ----------------------------------------------------------------------------
# Pretraining input.

def test_synthetic_pretrain_input_is_the_global_batch_of_each_step_and_resumes_exactly():
  config = test_config.get_config()
  config.dataset.num_examples = 48
  assert inputs.num_train_examples(config) == 48
  uninterrupted = _take(inputs.create_pretrain_iterator(config, 0), 5)
  resumed = _take(inputs.create_pretrain_iterator(config, 3), 2)
  size, channels = config.dataset.image_size, config.dataset.channels
  for step, batch in enumerate(uninterrupted):
    assert batch['image'].shape == (config.batch_size, size, size, channels)
    np.testing.assert_array_equal(
        batch['image'], synthetic.global_batch(config.seed, step, config.batch_size, size, channels))
    np.testing.assert_array_equal(batch['label'], -1)
  assert not np.array_equal(uninterrupted[0]['image'], uninterrupted[1]['image'])
  for got, want in zip(resumed, uninterrupted[3:]):
    np.testing.assert_array_equal(got['image'], want['image'])


@pytest.fixture(scope='module')
def shades(tmp_path_factory):
  """A prepared folder of 9 images in 3 classes: (config.dataset fields, data set name)."""
  root = str(tmp_path_factory.mktemp('shades'))
  for i in range(9):
    folder = os.path.join(root, ('dark', 'mid', 'light')[i % 3])
    os.makedirs(folder, exist_ok=True)
    Image.new('RGB', (10, 12), (20 * i,) * 3).save(os.path.join(folder, f'{i}.png'))
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  prepare.prepare_folder(root, data_dir, name='shades', progress=False)
  return {'name': 'shades', 'data_dir': data_dir, 'train_split': 'train', 'eval_split': 'train[:4]',
          'image_size': 8, 'channels': 3, 'mean': (0.5,) * 3, 'std': (0.25,) * 3, 'shuffle_buffer': 4}


def test_prepared_data_set_counts_and_classes_come_from_tfds(shades):
  config = finetune_recipe.get_config('variant=B/16,runlocal=True')
  config.dataset.update(shades)
  config.batch_size = 4
  assert inputs.num_train_examples(config) == 9
  config.num_classes = 0
  assert inputs.resolve_num_classes(config) == 3
  batch = next(inputs.create_pretrain_iterator(config, 0))
  assert batch['image'].shape == (4, 8, 8, 3) and not batch['corrupt'].any()
  config.num_classes = 5
  with pytest.raises(ValueError, match=r'num_classes=5 .* has 3 classes'):
    inputs.resolve_num_classes(config)


@pytest.mark.parametrize('trainer', ['finetune', 'linprobe'])
def test_an_eval_split_the_data_set_lacks_is_named_before_training(shades, trainer, tmp_path, monkeypatch):
  recipe = finetune_recipe if trainer == 'finetune' else linprobe_recipe
  config = recipe.get_config('variant=B/16,runlocal=True')
  config.dataset.update(shades)
  config.dataset.eval_split = 'validation'  # A prepared folder has only 'train'.
  monkeypatch.setattr(supervised, 'run', lambda *a, **k: pytest.fail('reached the training loop'))
  run = finetune.finetune if trainer == 'finetune' else linprobe.linear_probe
  with pytest.raises(ValueError, match=r"dataset.eval_split='validation' is not a valid split of data set "
                                       r"'shades' \(splits: \['train'\]\)"):
    run(config, str(tmp_path))


# ----------------------------------------------------------------------------
# Labelled (downstream) input.

def test_synthetic_train_batches_resume_exactly_and_need_a_class_count():
  config = finetune_recipe.get_config('variant=B/16,runlocal=True')
  preprocess_fn = inputs.make_train_preprocess_fn(config)
  uninterrupted = _take(inputs.create_train_iterator(config, 10, 0, preprocess_fn), 4)
  resumed = _take(inputs.create_train_iterator(config, 10, 2, preprocess_fn), 2)
  for got, want in zip(resumed, uninterrupted[2:]):
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['label'], want['label'])
  labels = np.concatenate([b['label'] for b in uninterrupted])
  assert ((labels >= 0) & (labels < 10)).all() and len(set(labels)) > 1
  config.num_classes = 0
  with pytest.raises(ValueError, match='num_classes must be > 0'):
    inputs.resolve_num_classes(config)


def test_synthetic_eval_split_yields_every_example_once_padded():
  config = finetune_recipe.get_config('variant=B/16,runlocal=True')
  config.dataset.num_examples = 20
  batches = list(inputs.create_eval_iterator(config, 10, 'test', batch_size=8))
  assert [b['mask'].sum() for b in batches] == [8, 8, 4]
  assert all(b['image'].shape == (8, 32, 32, 3) for b in batches)
  assert (batches[-1]['label'][~batches[-1]['mask']] == -1).all()


def test_limited_split_slices_plain_splits_and_makes_sliced_ones_absolute():
  assert inputs.limited_split('train', 100) == 'train[:100]'
  assert inputs.limited_split('train', -1) == 'train'
  for split in ('train[:95%]', 'train[95%:]', 'train[10:20]', 'train+validation'):
    assert inputs.limited_split(split, 100) == split  # No sizes known: readers stop after 100 themselves.
  # With the split sizes, the first examples of the sliced split, as absolute slices: the same examples for any
  # number of processes (each reads its share of the slice).
  infos = {'train': types.SimpleNamespace(num_examples=1000), 'validation': types.SimpleNamespace(num_examples=50)}
  assert inputs.limited_split('train[10%:95%]', 100, infos) == 'train[100:200]'
  assert inputs.limited_split('train[95%:]', 100, infos) == 'train[950:1000]'
  assert inputs.limited_split('train[990:]+validation', 30, infos) == 'train[990:1000]+validation[0:20]'
  assert inputs.limited_split('train[:95%]', -1, infos) == 'train[:95%]'


def test_a_limited_sliced_split_holds_the_same_examples_for_one_and_two_processes(shades):
  """The kNN monitor's bank: the first knn.train_examples of a sliced dataset.train_split, whatever the
  process count (each process reading its share of the absolute slice)."""
  config = finetune_recipe.get_config('variant=B/16,runlocal=True')
  config.dataset.update(shades)
  split = inputs.limited_split('train[1:]', 5, sources.get_builder(config.dataset).info.splits)
  assert split == 'train[1:6]'

  def shades_read(process_count):
    seen = []
    for index in range(process_count):
      for batch in input_pipeline.create_eval_iterator(config.dataset, split=split, batch_size=4,
                                                       process_index=index, process_count=process_count):
        seen += [round(float(image.mean()), 4) for image, real in zip(batch['image'], batch['mask']) if real]
    return sorted(seen)

  assert len(shades_read(1)) == 5 and shades_read(1) == shades_read(2)


def test_the_data_set_is_checked_against_the_settings_before_anything_is_built(shades, tmp_path, monkeypatch):
  """Channels, RandAugment's 8-bit rule and the kNN monitor's labels fail in seconds, as settings (exit 78)."""
  from mae_jax import config_tools, knn, pretrain_step, train  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(pretrain_step, 'build_train_step', lambda *a, **k: pytest.fail('built the step'))
  monkeypatch.setattr(finetune, 'build_train_step', lambda *a, **k: pytest.fail('built the step'))
  config = test_config.get_config('steps=1')
  config.dataset.update({**shades, 'channels': 4, 'image_size': 32, 'mean': (0.5,) * 4, 'std': (0.25,) * 4})
  with pytest.raises(config_tools.ConfigError, match=r'dataset.channels=4.*--config.dataset.channels=3'):
    train.train_and_evaluate(config, str(tmp_path / 'pretrain'))
  assert not os.path.exists(tmp_path / 'pretrain' / 'config.json')

  unlabelled = tmp_path / 'unlabelled'
  unlabelled.mkdir()
  for i in range(3):
    Image.new('RGB', (8, 8), (40 * i,) * 3).save(unlabelled / f'{i}.png')
  prepare.prepare_folder(str(unlabelled), shades['data_dir'], name='unlabelled', progress=False)
  config.dataset.update({**shades, 'name': 'unlabelled', 'image_size': 32})
  config.eval_every_steps = 1
  with pytest.raises(config_tools.ConfigError,
                     match=r'eval_every_steps=1: the kNN monitor.*--config.eval_every_steps=0'):
    train.train_and_evaluate(config, str(tmp_path / 'pretrain'))

  array_dir = tmp_path / 'arrays'
  array_dir.mkdir()
  for i, label in enumerate(('a', 'b', 'a', 'b')):
    (array_dir / label).mkdir(exist_ok=True)
    np.save(array_dir / label / f'{i}.npy', np.full((8, 8, 3), 1000 * i, np.uint16))
  from mae_jax.data import arrays  # pylint: disable=g-import-not-at-top
  arrays.prepare_arrays(str(array_dir), shades['data_dir'], name='deep', progress=False)
  config = finetune_recipe.get_config('variant=B/16,runlocal=True')
  config.dataset.update({**shades, 'name': 'deep', 'mean': (), 'std': ()})
  config.randaug.num_layers = 2
  with pytest.raises(config_tools.ConfigError, match=r"randaug.num_layers=2: RandAugment works on 8-bit grey or "
                                                      r"RGB images, but data set 'deep' holds 3 channels of uint16"):
    finetune.finetune(config, str(tmp_path / 'finetune'))
  # The kNN job runs the same checks first; it never augments, so RandAugment's rule is not one of them.
  config = linprobe_recipe.get_config('variant=B/16,runlocal=True')
  config.downstream = 'knn'
  config.dataset.update({**shades, 'name': 'deep', 'mean': (), 'std': ()})
  config.randaug.num_layers = 2
  config.num_classes = 0
  def passed(*args, **kwargs):
    raise RuntimeError('checks passed')

  monkeypatch.setattr(knn, 'frozen_encoder_params', passed)
  with pytest.raises(RuntimeError, match='checks passed'):  # 16-bit data and RandAugment: fine for kNN.
    knn.run_knn(config, str(tmp_path / 'knn'))
  config.dataset.channels = 4
  with pytest.raises(config_tools.ConfigError, match=r"dataset.channels=4 but data set 'deep' stores 3-channel"):
    knn.run_knn(config, str(tmp_path / 'knn'))
