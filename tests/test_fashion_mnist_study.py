"""The Fashion-MNIST study's protocol (benchmarks/study_eval.py), its outputs and the committed results."""

import json
import os
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import study_eval  # noqa: E402
import study_report  # noqa: E402

from mae_jax.models import mae  # noqa: E402

STUDY_JSON = os.path.join(ROOT, 'benchmarks', 'fashion_mnist_study.json')
ROWS = {'pixels': ('knn', 'linear_probe'), 'random': ('knn', 'linear_probe'),
        'mae': ('knn', 'linear_probe', 'finetune'), 'scratch': ('finetune',)}


def _blobs(rng, n, dim, separation):
  """Ten Gaussian classes in `dim` dimensions, means `separation` apart."""
  labels = rng.integers(0, 10, n).astype(np.int32)
  centres = rng.normal(size=(10, dim)) * separation
  return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def test_probe_and_knn_learn_separable_classes_and_not_noise():
  rng = np.random.default_rng(0)
  x, y = _blobs(rng, 3000, 16, 3.0)
  assert study_eval.probe_top1(x[:2000], y[:2000], x[2000:], y[2000:], 1e-3, max_iter=100) > 0.95
  assert study_eval.knn_top1(x[:2000], y[:2000], x[2000:], y[2000:]) > 0.9
  noise = rng.normal(size=x.shape).astype(np.float32)
  assert study_eval.probe_top1(noise[:2000], y[:2000], noise[2000:], y[2000:], 1e-3, max_iter=100) < 0.3


def test_probe_matches_a_reference_logistic_regression_optimum():
  """L-BFGS reaches the optimum: the gradient of the penalised mean cross-entropy vanishes."""
  rng = np.random.default_rng(1)
  x, y = _blobs(rng, 500, 5, 1.0)
  l2 = 1e-2
  w = np.asarray(study_eval._fit_softmax(x, y, np.float32(l2), num_classes=10, max_iter=300))  # pylint: disable=protected-access
  xb = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)
  logits = xb @ w
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  grad = xb.T @ (p - np.eye(10)[y]) / len(x)
  grad[:-1] += l2 * w[:-1]
  assert np.abs(grad).max() < 1e-3


def test_choices_are_made_on_held_out_training_images(monkeypatch):
  """A kind that is better on the held-out part wins even when another one scores higher on the test set."""
  monkeypatch.setattr(study_eval, 'HOLDOUT', 500)
  monkeypatch.setattr(study_eval, 'L2_GRID', (1e-3,))
  rng = np.random.default_rng(2)
  x, y = _blobs(rng, 2000, 8, 3.0)
  noise = rng.normal(size=x.shape).astype(np.float32)
  data = {'train_y': y[:1500], 'test_y': y[1500:]}
  # 'good' is informative on the training images, 'test_only' only on the test images.
  features = {'good': (x[:1500], x[1500:]),
              'test_only': (noise[:1500], x[1500:])}
  result = study_eval.evaluate_row(features, data, probe_iters=50, log=lambda _: None)
  for metric in ('knn', 'linear_probe'):
    assert result[metric]['features'] == 'good'
    assert result[metric]['top1'] == result[metric]['kinds']['good']['test']
    assert result[metric]['kinds']['good']['holdout'] > 80


def test_encoder_features_kinds_and_shapes():
  kwargs = mae.encoder_kwargs('mae_vit_mini_patch4')
  kwargs.setdefault('image_size', 28)
  kwargs.setdefault('in_channels', 1)

  from mae_jax.models import vit  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(3).normal(size=(5, 28, 28, 1)).astype(np.float32)
  params = vit.VisionTransformer(**kwargs, final_norm=True).init(jax.random.key(0), images[:1])['params']
  out = study_eval.encoder_features(kwargs, params, images, batch_size=2)
  assert set(out) == set(study_eval.FEATURE_KINDS)
  assert out['cls'].shape == out['mean'].shape == (5, 128)
  assert out['mean_blocks'].shape == (5, 4 * 128)
  assert out['tokens'].shape == (5, 49 * 128)
  # Every block's part is layer-normalised.
  np.testing.assert_allclose(out['mean_blocks'].reshape(5, 4, 128).mean(axis=-1), 0, atol=1e-4)


def test_normalize_matches_the_eval_transform():
  images = np.array([[[0, 255]]], np.uint8)
  out = study_eval.normalize(images, 0.5, 0.25)
  assert out.shape == (1, 1, 2, 1)
  np.testing.assert_allclose(out.ravel(), [-2.0, 2.0])


def _doc():
  with open(STUDY_JSON, encoding='utf-8') as f:
    return json.load(f)


def test_committed_study_has_every_row_and_metric():
  doc = _doc()
  for row, metrics in ROWS.items():
    for metric in metrics:
      value = doc['rows'][row][metric]
      assert isinstance(value, float) and 10 < value <= 100, (row, metric, value)
      assert doc['details'][row][metric]['top1'] == value
  assert len(doc['seeds']) >= 2
  assert set(doc['details']['mae']['finetune']['by_seed']) == {str(s) for s in doc['seeds']}
  for key in ('machine', 'date', 'settings', 'wall_seconds', 'pretraining'):
    assert doc[key]
  assert doc['pretraining']['knn_monitor']['curve'] and doc['pretraining']['loss_curve']


def test_readme_table_is_generated_from_the_committed_json():
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    readme = f.read()
  assert study_report.readme_block(readme) == study_report.table(_doc())
  assert os.path.exists(os.path.join(ROOT, study_report.PLOT_README_PATH))


def test_plot_writes_a_png(tmp_path):
  path = tmp_path / 'plot.png'
  study_report.plot(_doc(), str(path))
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_update_readme_replaces_only_the_block(tmp_path):
  path = tmp_path / 'README.md'
  path.write_text(f'before\n{study_report.README_BEGIN}\nold\n{study_report.README_END}\nafter\n')
  study_report.update_readme(str(path), _doc())
  text = path.read_text()
  assert text.startswith('before\n') and text.endswith('\nafter\n') and 'old' not in text
  assert study_report.readme_block(text) == study_report.table(_doc())
  (tmp_path / 'other.md').write_text('no markers')
  with pytest.raises(SystemExit, match='no study markers'):
    study_report.update_readme(str(tmp_path / 'other.md'), _doc())
