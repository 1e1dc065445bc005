"""Linear probing: BatchNorm + Linear on a frozen encoder, its cached features.

Tiny models (mae_vit_test) on the labelled synthetic source, 8 CPU devices (tests/conftest.py).
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import linprobe as linprobe_recipe
from configs import test as test_config
from mae_jax import checkpoint, knn, linprobe, loop, train
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


def test_a_resumed_probe_keeps_the_encoder_it_was_trained_on(pretrained, tmp_path):
  pre, probe = str(tmp_path / 'pre'), str(tmp_path / 'probe')
  shutil.copytree(pretrained, pre)  # A pretraining run at step 1.
  config = linprobe_recipe.get_config('variant=B/16,runlocal=True')
  config.pretrained_workdir = pre
  config.probe_cached_features = True
  config.num_train_steps = 1
  assert linprobe.linear_probe(config, probe)['status'] == 'done'
  assert checkpoint.load_meta(probe, 1)['pretrained'] == {'workdir': pre, 'step': 1}

  # The pretraining run goes on to step 2; the probe, resumed with pretrained_step=-1, stays on step 1.
  pretrain = test_config.get_config('steps=2')
  pretrain.keep_checkpoints = 2
  assert train.train_and_evaluate(pretrain, pre)['status'] == 'done'
  assert checkpoint.latest_step(pre) == 2
  config.num_train_steps = 2
  assert linprobe.linear_probe(config, probe)['status'] == 'done'
  assert checkpoint.load_meta(probe, 2)['pretrained'] == {'workdir': pre, 'step': 1}

  # Asking for another encoder in the same workdir, or resuming once the encoder's step is gone, is an error.
  config.num_train_steps = 3
  config.pretrained_step = 2
  with pytest.raises(loop.ResumeError, match=rf'the run in {probe} \(step 2\) was trained on the encoder of '
                                            rf'{pre} step 1, this one asks for {pre} step 2\. Resume with that'):
    linprobe.linear_probe(config, probe)
  config.pretrained_step = -1
  config.pretrained_workdir = ''  # Nor another kind of encoder: a random one here.
  with pytest.raises(loop.ResumeError, match=rf'{pre} step 1, this one asks for a random initialisation'):
    linprobe.linear_probe(config, probe)
  config.pretrained_workdir = pre
  shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(pre), '1'))  # As keep_checkpoints prunes it.
  with pytest.raises(loop.ResumeError, match=rf'encoder of {pre} step 1, which is gone \(step 1 is not in'):
    linprobe.linear_probe(config, probe)
  assert checkpoint.latest_step(probe) == 2
