"""Linear probing: BatchNorm + Linear on a frozen encoder, its cached features.

Tiny models (mae_vit_test) on the labelled synthetic source, 8 CPU devices (tests/conftest.py).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import linprobe as linprobe_recipe
from mae_jax import checkpoint, knn, linprobe
from mae_jax.data import inputs

pytestmark = pytest.mark.usefixtures('jit_cache')


def test_linear_probe_trains_only_bn_and_linear_on_the_frozen_encoder(pretrained, tmp_path):
  config = linprobe_recipe.get_config('variant=B/16,runlocal=True')
  config.pretrained_workdir = pretrained
  config.probe_cached_features = True
  workdir = str(tmp_path)
  result = linprobe.linear_probe(config, workdir)
  assert result['status'] == 'done' and 0 <= result['eval/top1'] <= 1 and 0 <= result['eval/knn_top1'] <= 1

  saved = checkpoint.load_params(workdir)[0]
  assert {k: sorted(v) for k, v in saved.items()} == {'params': ['head'], 'batch_stats': ['head_bn']}
  init = linprobe.ProbeHead(10).init(jax.random.key(config.seed), jnp.zeros((2, 32)))
  assert not np.allclose(saved['params']['head']['kernel'], init['params']['head']['kernel'])
  assert np.abs(saved['batch_stats']['head_bn']['mean']).max() > 0  # BatchNorm statistics moved.

  # The features it trained on are those of the pretrained encoder, untouched.
  feature_fn, _ = linprobe.probe_feature_fn(config)
  encoder = checkpoint.load_params(pretrained)[0]['encoder']
  want, labels = knn.extract_features(
      jax.jit(feature_fn), encoder, inputs.create_eval_iterator(config, 10, 'train', 16))
  with np.load(os.path.join(workdir, 'features', 'train.npz')) as got:
    np.testing.assert_allclose(got['features'], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got['labels'], labels)
