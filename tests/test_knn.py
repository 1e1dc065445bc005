"""kNN of frozen features: the evaluator, the pretraining monitor, `downstream=knn` from the command line.

Tiny models (mae_vit_test) on the labelled synthetic source, 8 CPU devices (tests/conftest.py).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
from mae_jax import checkpoint, knn
from mae_jax.data import prepare
from mae_jax.models import from_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures('jit_cache')


def _feature_batches(features, labels, batch=40):
  """Features as [B, 1, 1, D] 'images', the last batch padded."""
  for i in range(0, len(labels), batch):
    f, y = features[i:i + batch], labels[i:i + batch]
    pad = batch - len(y)
    yield {'image': np.concatenate([f, np.zeros((pad,) + f.shape[1:], np.float32)])[:, None, None, :],
           'label': np.concatenate([y, np.full(pad, -1, np.int32)]), 'mask': np.arange(batch) < len(y)}


def test_knn_is_perfect_on_separable_features_and_chance_on_random_labels():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(10, 16)).astype(np.float32)
  train_labels = np.arange(500) % 10
  eval_labels = rng.integers(0, 10, 210)
  train_x = centers[train_labels] + 0.1 * rng.normal(size=(500, 16)).astype(np.float32)
  eval_x = centers[eval_labels] + 0.1 * rng.normal(size=(210, 16)).astype(np.float32)
  encode = lambda params, images: images.reshape(images.shape[0], -1)
  result = knn.knn_eval(encode, {}, _feature_batches(train_x, train_labels),
                               _feature_batches(eval_x, eval_labels), num_classes=10)
  assert result['num_train'] == 500 and result['num_eval'] == 210  # Padding ignored.
  assert result['top1'] == 1.0 and result['top5'] == 1.0
  shuffled = rng.permutation(train_labels)
  chance = knn.knn_eval(encode, {}, _feature_batches(train_x, shuffled),
                               _feature_batches(eval_x, eval_labels), num_classes=10)
  assert chance['top1'] < 0.25 and chance['top5'] < 0.75


def test_knn_votes_are_temperature_weighted_cosine_similarities():
  bank = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)
  labels = np.array([0, 1, 1])
  query = np.array([[2.0, 0.2]], np.float32)  # Scale must not matter: cosine.
  scores = knn.knn_classify(bank, labels, query, num_classes=2, k=2, temperature=0.5)
  cos = bank @ (query[0] / np.linalg.norm(query[0]))
  want = [np.exp(cos[0] / 0.5), np.exp(cos[1] / 0.5)]  # The two nearest: bank rows 0 and 1.
  np.testing.assert_allclose(scores[0], want, rtol=1e-5)


def test_knn_queries_in_chunks_bounded_by_the_similarity_bytes(monkeypatch):
  rng = np.random.default_rng(3)
  bank, labels = rng.standard_normal((50, 8)).astype(np.float32), rng.integers(0, 4, 50)
  queries = rng.standard_normal((23, 8)).astype(np.float32)
  whole = knn.knn_classify(bank, labels, queries, num_classes=4, k=5)
  calls = []
  scores_fn = knn._knn_scores  # pylint: disable=protected-access
  monkeypatch.setattr(knn, '_knn_scores', lambda *a, **k: calls.append(a[2].shape[0]) or scores_fn(*a, **k))
  monkeypatch.setattr(knn, 'SIMILARITY_BYTES', 4 * 50 * 6)  # Six queries' similarities to the bank.
  np.testing.assert_allclose(knn.knn_classify(bank, labels, queries, num_classes=4, k=5), whole, rtol=1e-6)
  assert calls == [6, 6, 6, 5]


def test_knn_monitor_on_the_pretraining_model(pretrained):
  config = test_config.get_config('steps=1')
  params = checkpoint.load_params(pretrained)[0]
  result = knn.knn_monitor(from_config.build_mae(config), params, config, k=5)
  assert set(result) == {'eval/knn_top1', 'eval/knn_top5'}
  assert 0 <= result['eval/knn_top1'] <= result['eval/knn_top5'] <= 1


def test_command_line_knn(tmp_path):
  workdir = str(tmp_path / 'knn')
  command = [sys.executable, '-m', 'mae_jax.downstream', '--config=configs/linprobe.py:variant=B/16,runlocal=True',
             '--config.downstream=knn', f'--workdir={workdir}']
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  printed = json.loads(done.stdout.strip().splitlines()[-1])
  assert printed['status'] == 'done' and 0 <= printed['eval/knn_top1'] <= 1
  assert os.path.exists(os.path.join(workdir, 'results.json'))
  bad = subprocess.run(command[:-1] + ['--config.downstream=knn', '--config.downstrem=x', f'--workdir={workdir}'],
                       cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert bad.returncode != 0 and 'downstream' in bad.stderr


@pytest.fixture(scope='module')
def two_shades(tmp_path_factory):
  """config.dataset of a prepared folder of 24 8x8 images: class 'dark' and class 'light'."""
  root = str(tmp_path_factory.mktemp('two_shades'))
  for i in range(24):
    shade = ('dark', 'light')[i % 2]
    os.makedirs(os.path.join(root, shade), exist_ok=True)
    value = 30 + i if shade == 'dark' else 200 + i
    Image.new('RGB', (8, 8), (value, value // 2, value)).save(os.path.join(root, shade, f'{i:02d}.png'))
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  prepare.prepare_folder(root, data_dir, name='two_shades', progress=False)
  return {'name': 'two_shades', 'data_dir': data_dir, 'image_size': 8, 'channels': 3,
          'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25)}


def _knn_config(dataset: dict, **knn):
  config = test_config.get_config('steps=1')
  config.dataset.update(dataset)
  config.knn.update({'train_examples': 10, 'eval_examples': -1, 'batch_size': 8, 'k': 3, **knn})
  return config


def _pixels(params, images):
  del params
  return images.reshape(images.shape[0], -1)


@pytest.mark.parametrize('train_split,train_examples,bank', [
    ('train[:75%]', 10, 10),  # The README's folder splits: limited, not refused.
    ('train[:75%]', -1, 18),
    ('train', 10, 10),
    ('train', 1000, 24),  # More than the split holds: all of it ('train[:1000]' is no TFDS split).
])
def test_knn_monitor_on_sliced_splits_of_a_folder(two_shades, train_split, train_examples, bank,
                                                  monkeypatch):
  config = _knn_config({**two_shades, 'train_split': train_split, 'eval_split': 'train[75%:]'},
                       train_examples=train_examples)
  monitor = knn.KnnMonitor(None, config, encode_fn=_pixels)
  assert monitor.num_classes == 2
  seen = []
  knn_eval = knn.knn_eval
  monkeypatch.setattr(knn, 'knn_eval', lambda *a, **k: seen.append(knn_eval(*a, **k)) or seen[-1])
  result = monitor({})
  assert seen[0]['num_train'] == bank and seen[0]['num_eval'] == 6
  assert result == {'eval/knn_top1': 1.0, 'eval/knn_top5': 1.0}  # Dark and light never mix.


def test_pixel_knn_reads_the_monitors_bank_and_queries(two_shades):
  config = _knn_config({**two_shades, 'train_split': 'train[:75%]', 'eval_split': 'train[75%:]'})
  assert knn.pixel_knn(config) == 1.0  # Dark and light pixels never mix.


@pytest.mark.parametrize('overrides,match', [
    ({'k': 0}, 'knn.k=0'),
    ({'temperature': 0.0}, 'knn.temperature=0.0'),
    ({'batch_size': 0}, 'knn.batch_size=0'),
    ({'pool': 'max'}, "knn.pool='max'"),
    ({'train_examples': 2.5}, 'knn.train_examples=2.5'),
    ({'neighbours': 5}, r"unknown keys \['neighbours'\]"),
    ({'eval_split': 'tset'}, "dataset.eval_split.*'tset'"),
    ({'train_split': 'train[24:]'}, r"dataset.train_split='train\[24:\]'.*has no examples"),
])
def test_knn_monitor_checks_its_settings_when_built(two_shades, overrides, match, monkeypatch):
  """Bad settings fail when the monitor is built (before pretraining starts), not at its first call."""
  dataset = {**two_shades, 'train_split': 'train[:75%]', 'eval_split': 'train[75%:]'}
  dataset.update({k: overrides.pop(k) for k in ('eval_split', 'train_split') if k in overrides})
  config = _knn_config(dataset)
  monkeypatch.setattr(knn, 'knn_eval', lambda *a, **k: pytest.fail('evaluated'))
  with pytest.raises(ValueError, match=match):
    knn.KnnMonitor(None, config, encode_fn=_pixels, **overrides)
