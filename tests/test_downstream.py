"""Tests of mae_jax.downstream: fine-tuning, linear probing, kNN, augmentation and metrics.

Tiny models (mae_vit_test) on the labelled synthetic source, 8 CPU devices
(tests/conftest.py). Augmentation ops are checked against PIL, which the
reference's timm transforms use.
"""

import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from configs import finetune as finetune_recipe
from configs import linprobe as linprobe_recipe
from configs import test as test_config
from launch import sweep as sweep_lib
from mae_jax import checkpoint, downstream, metrics, optim, train
from mae_jax.data import prepare

tf.config.set_visible_devices([], 'GPU')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module', autouse=True)
def jit_cache(tmp_path_factory):
  """Shares compilations between the runs of this module (and its command-line subprocess)."""
  with sweep_lib.compilation_cache(str(tmp_path_factory.mktemp('jit_cache'))):
    yield


def flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def reference_layer_id(path: str, depth: int) -> int:
  """The reference's layer id (timm / BEiT param groups) of a classifier parameter path."""
  names = path.split('/')
  if names[0] != 'encoder':
    return depth + 1  # fc_norm, head.
  if names[1] in ('cls_token', 'pos_embed', 'patch_embed'):
    return 0
  if names[1].startswith('blocks_'):
    return int(names[1].split('_')[1]) + 1
  return depth + 1


# ----------------------------------------------------------------------------
# Layer-wise lr decay.

def test_layer_decay_scales_every_vit_b_parameter_of_the_finetune_recipe():
  config = finetune_recipe.get_config('variant=B/16')
  model = downstream.build_classifier(config, 1000)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))['params']
  decay = config.optim.layer_decay
  scales = flat(optim.layerwise_lr_scales(params, 12, decay))
  assert len(scales) == 3 + 12 * 16 + 4  # patch embed (2) + cls, 12 blocks, fc_norm (2) + head (2).
  assert 'encoder/norm/scale' not in scales  # Global pool: fc_norm replaces the final norm.
  for path, scale in scales.items():
    np.testing.assert_allclose(scale, decay ** (13 - reference_layer_id(path, 12)), rtol=1e-6, err_msg=path)


def test_finetune_optimizer_first_step_is_lr_times_the_layer_scale():
  config = finetune_recipe.get_config('variant=B/16,runlocal=True')
  config.optim.weight_decay = 0.0
  config.optim.warmup_steps = -1
  config.optim.warmup_epochs = 0.0
  model = downstream.build_classifier(config, 10)
  depth = model.encoder['depth']
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params'])
  tx, lr_fn = downstream.make_optimizer(config, abstract, depth, steps_per_epoch=10, total_steps=100)

  @jax.jit
  def first_update():
    params = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), abstract)
    return tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)[0]

  updates = first_update()
  peak = float(lr_fn(0))
  assert peak == pytest.approx(config.optim.base_lr * config.batch_size / 256)
  for path, update in flat(updates).items():
    want = -peak * config.optim.layer_decay ** (depth + 1 - reference_layer_id(path, depth))
    np.testing.assert_allclose(update, np.full(update.shape, want), rtol=1e-5, err_msg=path)


# ----------------------------------------------------------------------------
# Mixup / CutMix and label smoothing.

def test_label_smoothing_targets():
  targets = downstream.smooth_one_hot(jnp.array([2, 0]), 5, 0.1)
  np.testing.assert_allclose(targets[0], [0.02, 0.02, 0.92, 0.02, 0.02], rtol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize('mixup,cutmix,mode', [(0.8, 1.0, 'batch'), (0.8, 1.0, 'elem')])
def test_mixup_cutmix_mixes_images_and_targets_with_the_same_lam(mixup, cutmix, mode):
  groups, group, size = 2, 4, 8
  batch = groups * group
  images = jax.random.normal(jax.random.key(1), (batch, size, size, 1))
  targets = downstream.smooth_one_hot(jnp.arange(batch) % 10, 10, 0.1)
  partner = np.arange(batch).reshape(groups, group)[:, ::-1].reshape(-1)  # Mirror within each shard.
  mix = jax.jit(jax.vmap(lambda key: downstream.mixup_cutmix(
      key, images, targets, mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=0.5, mode=mode,
      num_groups=groups)))
  kinds = set()
  lams = []
  draws = jax.device_get(mix(jax.random.split(jax.random.key(0), 24)))
  for out, mixed_targets, lam in zip(*draws):
    lams.append(lam)
    assert ((lam >= 0) & (lam <= 1)).all()
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(mixed_targets, lam[:, None] * targets + (1 - lam[:, None]) * targets[partner],
                               rtol=1e-5, atol=1e-6)
    x, p = np.asarray(images), np.asarray(images)[partner]
    for i in range(batch):
      if np.allclose(out[i], lam[i] * x[i] + (1 - lam[i]) * p[i], atol=1e-5) and not np.allclose(lam[i], 1):
        kinds.add('mixup')
        continue
      from_partner = np.isclose(out[i], p[i]) & ~np.isclose(out[i], x[i])
      assert (np.isclose(out[i], x[i]) | from_partner).all()  # CutMix: every pixel is one of the two.
      np.testing.assert_allclose(1 - from_partner.mean(), lam[i], atol=1e-6)  # lam = area kept.
      kinds.add('cutmix')
    if mode == 'batch':  # One draw per shard.
      assert np.allclose(lam.reshape(groups, group), lam.reshape(groups, group)[:, :1])
  lams = np.stack(lams)
  if mode == 'elem':
    assert (lams.std(axis=1) > 0).any()
  assert lams.min() < 0.9  # Mixing happened.
  assert kinds == {k for k, alpha in (('mixup', mixup), ('cutmix', cutmix)) if alpha > 0}


def test_mixup_off_or_prob_zero_leaves_the_batch_alone():
  images = np.random.default_rng(0).normal(size=(4, 4, 4, 3)).astype(np.float32)
  targets = np.asarray(downstream.smooth_one_hot(jnp.arange(4), 4))
  for kwargs in ({}, {'mixup_alpha': 0.8, 'cutmix_alpha': 1.0, 'prob': 0.0}):
    mix = jax.jit(functools.partial(downstream.mixup_cutmix, **kwargs))
    out, mixed, lam = mix(jax.random.key(0), images, targets)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(mixed, targets)
    np.testing.assert_array_equal(lam, 1.0)


# ----------------------------------------------------------------------------
# Metrics and kNN.

def test_top1_top5_count_only_real_rows_of_a_padded_batch():
  logits = jnp.array([
      [0.0, 9, 8, 7, 6, 5, 4],  # label 1: top-1.
      [0.0, 9, 8, 7, 6, 5, 4],  # label 4: rank 4, top-5 only.
      [9.0, 8, 7, 6, 5, 4, 0],  # label 6: last, neither.
      [0.0, 9, 8, 7, 6, 5, 4],  # Padding (label -1): would be a top-1 hit for label 1.
      [0.0, 9, 8, 7, 6, 5, 4]])
  labels = jnp.array([1, 4, 6, -1, 1])
  mask = jnp.array([True, True, True, False, False])
  counts = jax.device_get(downstream.classification_counts(logits, labels, mask))
  assert (counts['correct1'], counts['correct5'], counts['count']) == (1, 2, 3)
  summary = downstream.summarize_counts(counts)
  assert summary['eval/top1'] == pytest.approx(1 / 3) and summary['eval/top5'] == pytest.approx(2 / 3)


def test_synthetic_eval_split_yields_every_example_once_padded():
  config = finetune_recipe.get_config('variant=B/16,runlocal=True')
  config.dataset.num_examples = 20
  batches = list(downstream.create_eval_iterator(config, 10, 'test', batch_size=8))
  assert [b['mask'].sum() for b in batches] == [8, 8, 4]
  assert all(b['image'].shape == (8, 32, 32, 3) for b in batches)
  assert (batches[-1]['label'][~batches[-1]['mask']] == -1).all()


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
  result = downstream.knn_eval(encode, {}, _feature_batches(train_x, train_labels),
                               _feature_batches(eval_x, eval_labels), num_classes=10)
  assert result['num_train'] == 500 and result['num_eval'] == 210  # Padding ignored.
  assert result['top1'] == 1.0 and result['top5'] == 1.0
  shuffled = rng.permutation(train_labels)
  chance = downstream.knn_eval(encode, {}, _feature_batches(train_x, shuffled),
                               _feature_batches(eval_x, eval_labels), num_classes=10)
  assert chance['top1'] < 0.25 and chance['top5'] < 0.75


def test_knn_votes_are_temperature_weighted_cosine_similarities():
  bank = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)
  labels = np.array([0, 1, 1])
  query = np.array([[2.0, 0.2]], np.float32)  # Scale must not matter: cosine.
  scores = downstream.knn_classify(bank, labels, query, num_classes=2, k=2, temperature=0.5)
  cos = bank @ (query[0] / np.linalg.norm(query[0]))
  want = [np.exp(cos[0] / 0.5), np.exp(cos[1] / 0.5)]  # The two nearest: bank rows 0 and 1.
  np.testing.assert_allclose(scores[0], want, rtol=1e-5)


# ----------------------------------------------------------------------------
# Augmentation.

def _pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image.astype(np.uint8))


def _solarize_add(image, add, threshold=128):
  return image.point([min(255, i + add) if i < threshold else i for i in range(256)] * len(image.getbands()))


# op: (level, sign, PIL reference of timm's op at that level)
PIL_OPS = {
    'AutoContrast': (5.0, 1.0, ImageOps.autocontrast),
    'Equalize': (5.0, 1.0, ImageOps.equalize),
    'Invert': (5.0, 1.0, ImageOps.invert),
    'Posterize': (5.0, 1.0, lambda im: ImageOps.posterize(im, 2)),  # 4 - int(0.5 * 4) bits.
    'Solarize': (5.0, 1.0, lambda im: ImageOps.solarize(im, 128)),  # 256 - int(0.5 * 256).
    'SolarizeAdd': (5.0, 1.0, lambda im: _solarize_add(im, 55)),  # int(0.5 * 110).
    'Color': (5.0, -1.0, lambda im: ImageEnhance.Color(im).enhance(0.55)),  # 1 - 0.5 * 0.9.
    'Contrast': (5.0, 1.0, lambda im: ImageEnhance.Contrast(im).enhance(1.45)),
    'Brightness': (5.0, 1.0, lambda im: ImageEnhance.Brightness(im).enhance(1.45)),
    'Sharpness': (5.0, 1.0, lambda im: ImageEnhance.Sharpness(im).enhance(1.45)),
}


@pytest.mark.parametrize('name', sorted(PIL_OPS))
def test_rand_augment_pixel_ops_match_pil(name):
  rng = np.random.default_rng(3)
  image = np.clip(rng.normal(120, 50, (12, 10, 3)), 0, 255).round()
  level, sign, reference = PIL_OPS[name]
  want = np.asarray(reference(_pil(image)), np.float32)
  got = downstream._rand_augment_op(downstream.RAND_AUGMENT_OPS.index(name),  # pylint: disable=protected-access
                                    tf.constant(image, tf.float32), level, sign, 128.0).numpy()
  assert got.shape == image.shape
  assert np.abs(got - want).max() <= 1.0, name


def test_rand_augment_geometric_ops():
  image = np.random.default_rng(4).uniform(0, 255, (20, 20, 1)).round().astype(np.float32)
  op = lambda name, level, sign: downstream._rand_augment_op(
      downstream.RAND_AUGMENT_OPS.index(name), tf.constant(image), level, sign, 7.0).numpy()
  for name in ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'):
    np.testing.assert_array_equal(op(name, 0.0, 1.0), image)  # Level 0: identity.
  shifted = op('TranslateX', 10.0, 1.0)  # 0.45 * 20 = 9 pixels: output x reads input x + 9.
  np.testing.assert_array_equal(shifted[:, :11], image[:, 9:])
  np.testing.assert_array_equal(shifted[:, 11:], 7.0)
  turned = op('Rotate', 10.0, 1.0)
  assert turned.shape == image.shape and (turned == 7.0).any() and not np.array_equal(turned, image)


def test_rand_augment_is_a_pure_function_of_the_seed():
  image = tf.constant(np.random.default_rng(5).uniform(0, 255, (16, 16, 3)).round(), tf.float32)
  run = lambda seed: downstream.rand_augment(image, tf.constant(seed, tf.int64), num_layers=2,
                                             magnitude=9, magnitude_std=0.5).numpy()
  np.testing.assert_array_equal(run([1, 2]), run([1, 2]))
  outputs = [run([1, s]) for s in range(12)]
  assert sum(not np.array_equal(o, image.numpy()) for o in outputs) >= 6  # 2 ops at p=0.5 each.
  assert all(o.min() >= 0 and o.max() <= 255 for o in outputs)


def test_random_erasing_erases_one_box_of_the_reference_size():
  image = tf.fill([24, 20, 3], 5.0)
  areas = []
  for s in range(20):
    out = downstream.random_erasing(image, tf.constant([0, s], tf.int64), probability=1.0).numpy()
    changed = (out != 5.0).any(axis=-1)
    rows, cols = np.where(changed.any(axis=1))[0], np.where(changed.any(axis=0))[0]
    assert changed.sum() == len(rows) * len(cols)  # A rectangle.
    assert rows.max() - rows.min() + 1 == len(rows) and cols.max() - cols.min() + 1 == len(cols)
    areas.append(changed.mean())
  assert 0.015 <= min(areas) and max(areas) <= 0.36
  kept = downstream.random_erasing(image, tf.constant([0, 1], tf.int64), probability=0.0).numpy()
  np.testing.assert_array_equal(kept, image.numpy())


def test_train_transform_is_deterministic_per_seed():
  config = finetune_recipe.get_config('variant=B/16,runlocal=True')
  assert config.randaug.num_layers > 0 and config.reprob > 0
  fn = downstream.make_train_preprocess_fn(config)
  image = tf.constant(np.random.default_rng(6).integers(0, 256, (40, 36, 3)), tf.uint8)
  a, b, c = (fn(image, tf.constant(s, tf.int64)).numpy() for s in ([0, 1], [0, 1], [0, 2]))
  assert a.shape == (32, 32, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


# ----------------------------------------------------------------------------
# Training: fine-tuning resume, pretrained encoders, linear probe, CLI.

def _finetune_config(steps=4):
  config = finetune_recipe.get_config('variant=B/16,runlocal=True')  # Every augmentation of the recipe.
  config.num_train_steps = steps
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 3
  return config


def test_finetune_checkpoints_and_resumes_exactly(tmp_path):
  config = _finetune_config()
  full = str(tmp_path / 'full')
  result = downstream.finetune(config, full)
  assert result['status'] == 'done' and result['step'] == 4
  assert 0 <= result['eval/top1'] <= result['eval/top5'] <= 1 and np.isfinite(result['train/loss'])
  assert sorted(checkpoint.load_meta(full, 2)['eval']) == []  # No eval before the end.
  with open(os.path.join(full, 'results.json'), encoding='utf-8') as f:
    assert json.load(f)['eval/top1'] == result['eval/top1']

  # A run that stopped after step 2: the step-2 checkpoint alone.
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(os.path.join(full, 'checkpoints'), os.path.join(resumed, 'checkpoints'))
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '4'))
  assert checkpoint.latest_step(resumed) == 2
  again = downstream.finetune(config, resumed)
  assert again['step'] == 4
  for (path, a), b in zip(flat(checkpoint.load_params(full)[0]).items(),
                          flat(checkpoint.load_params(resumed)[0]).values()):
    np.testing.assert_array_equal(a, b, err_msg=path)
  losses = {r['step']: r['train/loss'] for r in metrics.read_jsonl(os.path.join(full, 'metrics.jsonl'))
            if 'train/loss' in r}
  resumed_losses = {r['step']: r['train/loss'] for r in metrics.read_jsonl(
      os.path.join(resumed, 'metrics.jsonl')) if 'train/loss' in r}
  assert resumed_losses == {3: losses[3], 4: losses[4]}
  assert again['eval/top1'] == result['eval/top1']


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A pretraining workdir of mae_vit_test (1 step on synthetic 32x32x3)."""
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  assert train.train_and_evaluate(test_config.get_config('steps=1'), workdir)['status'] == 'done'
  return workdir


def test_finetune_starts_from_the_pretrained_encoder(pretrained, tmp_path):
  config = _finetune_config(steps=1)
  config.pretrained_workdir = pretrained
  config.optim.base_lr = 0.0  # Nothing moves: the checkpoint holds the loaded weights.
  downstream.finetune(config, str(tmp_path))
  tuned = flat(checkpoint.load_params(str(tmp_path))[0])
  source = flat(checkpoint.load_params(pretrained)[0]['encoder'])
  encoder = {k.removeprefix('encoder/'): v for k, v in tuned.items() if k.startswith('encoder/')}
  assert set(source) - set(encoder) == {'norm/scale', 'norm/bias'}  # Global pool: fc_norm instead.
  for key, value in encoder.items():
    np.testing.assert_array_equal(value, source[key], err_msg=key)
  assert {k.split('/')[0] for k in tuned} == {'encoder', 'fc_norm', 'head'}


def test_pretrained_encoder_that_does_not_fit_is_one_clear_error(pretrained):
  config = _finetune_config()
  config.pretrained_workdir = pretrained
  encoder, source = downstream.load_pretrained_encoder(config)
  wide = downstream.build_classifier(config, 10).clone(encoder={**downstream.encoder_kwargs(config), 'embed_dim': 64})
  params = jax.eval_shape(lambda: wide.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))['params']
  with pytest.raises(ValueError, match='does not fit model.name.*shape mismatches'):
    downstream.merge_encoder(params, encoder, source)


def test_linear_probe_trains_only_bn_and_linear_on_the_frozen_encoder(pretrained, tmp_path):
  config = linprobe_recipe.get_config('variant=B/16,runlocal=True')
  config.pretrained_workdir = pretrained
  config.probe_cached_features = True
  workdir = str(tmp_path)
  result = downstream.linear_probe(config, workdir)
  assert result['status'] == 'done' and 0 <= result['eval/top1'] <= 1 and 0 <= result['eval/knn_top1'] <= 1

  saved = checkpoint.load_params(workdir)[0]
  assert {k: sorted(v) for k, v in saved.items()} == {'params': ['head'], 'batch_stats': ['head_bn']}
  init = downstream.ProbeHead(10).init(jax.random.key(config.seed), jnp.zeros((2, 32)))
  assert not np.allclose(saved['params']['head']['kernel'], init['params']['head']['kernel'])
  assert np.abs(saved['batch_stats']['head_bn']['mean']).max() > 0  # BatchNorm statistics moved.

  # The features it trained on are those of the pretrained encoder, untouched.
  feature_fn, _ = downstream.probe_feature_fn(config)
  encoder = checkpoint.load_params(pretrained)[0]['encoder']
  want, labels = downstream.extract_features(
      jax.jit(feature_fn), encoder, downstream.create_eval_iterator(config, 10, 'train', 16))
  with np.load(os.path.join(workdir, 'features', 'train.npz')) as got:
    np.testing.assert_allclose(got['features'], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got['labels'], labels)


def test_knn_monitor_on_the_pretraining_model(pretrained):
  config = test_config.get_config('steps=1')
  params = checkpoint.load_params(pretrained)[0]
  result = downstream.knn_monitor(train.build_model(config), params, config, k=5)
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


# ----------------------------------------------------------------------------
# Several processes: FSDP over hosts (the L/16 and H/14 layout).

def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_fine_tune_fsdp_over_both_from_pretrained_weights(pretrained, tmp_path):
  """mesh fsdp=-1 over 2 processes x 4 devices: every parameter spans both processes.

  Loading the pretrained encoder must not fetch a parameter to one host; the
  run matches a 1-process run on 8 devices (lr 0: the checkpoint holds exactly
  the loaded weights).
  """
  overrides = {'mesh.data': 1, 'mesh.fsdp': -1, 'mesh.min_fsdp_size': 1, 'num_train_steps': 1,
               'optim.base_lr': 0.0, 'pretrained_workdir': pretrained, 'randaug.num_layers': 0, 'reprob': 0.0,
               'mixup': 0.0, 'cutmix': 0.0}
  spec = 'variant=L/16,runlocal=True'
  multi = str(tmp_path / 'multi')
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO)
  command = [sys.executable, '-m', 'mae_jax.downstream', f'--config=configs/finetune.py:{spec}',
             f'--workdir={multi}', *[f'--config.{k}={v}' for k, v in overrides.items()],
             f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2']
  with contextlib.ExitStack() as stack:
    logs = [stack.enter_context(open(str(tmp_path / f'process_{i}.log'), 'w+b')) for i in range(2)]
    procs = [subprocess.Popen(command + [f'--process_id={i}'], env=env, cwd=REPO, stdout=logs[i],
                              stderr=subprocess.STDOUT) for i in range(2)]
    try:
      # Meanwhile the same run in this process, on 8 devices.
      config = finetune_recipe.get_config(spec)
      for key, value in overrides.items():
        node, name = config, key
        while '.' in name:
          head, name = name.split('.', 1)
          node = node[head]
        node[name] = value
      single = str(tmp_path / 'single')
      downstream.finetune(config, single)
      for p in procs:
        p.wait(timeout=240)
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    outputs = []
    for log in logs:
      log.seek(0)
      outputs.append(log.read().decode())
  assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
  assert all('Loaded the pretrained encoder' in out for out in outputs)

  results = {}
  for workdir in (multi, single):
    with open(os.path.join(workdir, downstream.RESULTS_FILE), encoding='utf-8') as f:
      results[workdir] = json.load(f)
  assert results[multi]['status'] == 'done' and results[multi]['step'] == 1
  for key in ('eval/top1', 'eval/top5', 'eval/loss', 'eval/num_examples', 'train/loss'):
    np.testing.assert_allclose(results[multi][key], results[single][key], rtol=1e-5, err_msg=key)
  tuned = flat(checkpoint.load_params(multi)[0])
  source = flat(checkpoint.load_params(pretrained)[0]['encoder'])
  assert {k.split('/')[0] for k in tuned} == {'encoder', 'fc_norm', 'head'}
  for key, value in tuned.items():
    if key.startswith('encoder/'):
      np.testing.assert_array_equal(value, source[key.removeprefix('encoder/')], err_msg=key)
  for key, value in flat(checkpoint.load_params(single)[0]).items():
    np.testing.assert_array_equal(tuned[key], value, err_msg=key)


def test_merged_encoder_is_host_arrays_and_the_rest_is_untouched(pretrained):
  config = _finetune_config()
  config.pretrained_workdir = pretrained
  encoder, source = downstream.load_pretrained_encoder(config)
  model = downstream.build_classifier(config, 10)
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params'])()
  merged = downstream.merge_encoder(params, encoder, source)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(merged['encoder']))
  assert merged['head']['kernel'] is params['head']['kernel']  # Not fetched, not copied.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(1, 8, 1), ('data', 'fsdp', 'tensor'))
  config.mesh.min_fsdp_size = 1
  placed = downstream.place_on_mesh(merged, config, mesh)
  flat_placed = flat(placed)
  for key, value in flat(merged).items():
    np.testing.assert_array_equal(flat_placed[key], value, err_msg=key)
  assert flat_placed['encoder/cls_token'].sharding.mesh == mesh


# ----------------------------------------------------------------------------
# kNN settings and sliced splits.

def test_limited_split_slices_plain_splits_and_passes_sliced_ones_through():
  assert downstream.limited_split('train', 100) == 'train[:100]'
  assert downstream.limited_split('train', -1) == 'train'
  for split in ('train[:95%]', 'train[95%:]', 'train[10:20]', 'train+validation'):
    assert downstream.limited_split(split, 100) == split  # Readers stop after 100 themselves.


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
  monitor = downstream.KnnMonitor(None, config, encode_fn=_pixels)
  assert monitor.num_classes == 2
  seen = []
  knn_eval = downstream.knn_eval
  monkeypatch.setattr(downstream, 'knn_eval', lambda *a, **k: seen.append(knn_eval(*a, **k)) or seen[-1])
  result = monitor({})
  assert seen[0]['num_train'] == bank and seen[0]['num_eval'] == 6
  assert result == {'eval/knn_top1': 1.0, 'eval/knn_top5': 1.0}  # Dark and light never mix.


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
  monkeypatch.setattr(downstream, 'knn_eval', lambda *a, **k: pytest.fail('evaluated'))
  with pytest.raises(ValueError, match=match):
    downstream.KnnMonitor(None, config, encode_fn=_pixels, **overrides)


# ----------------------------------------------------------------------------
# Loop settings checked before anything compiles.

@pytest.mark.parametrize('recipe', [finetune_recipe, linprobe_recipe], ids=['finetune', 'linprobe'])
@pytest.mark.parametrize('key,value,match', [
    ('log_every_steps', 0, 'log_every_steps=0'),
    ('log_every_steps', -10, 'log_every_steps=-10'),
    ('max_nonfinite_steps', 0, 'max_nonfinite_steps=0'),
    ('max_nonfinite_steps', -1, 'max_nonfinite_steps=-1'),
    ('num_epochs', 0.1, r'num_epochs=0.1 x 4 steps per epoch \(64 examples.*is 0 training steps'),
])
def test_loop_settings_that_cannot_work_fail_before_any_compile(recipe, key, value, match, tmp_path,
                                                                monkeypatch):
  config = recipe.get_config('variant=B/16,runlocal=True')  # 64 examples, batch 16: 4 steps per epoch.
  if key == 'num_epochs':
    config.num_train_steps = -1
  config[key] = value
  monkeypatch.setattr(downstream, '_run', lambda *a, **k: pytest.fail('reached the training loop'))
  run = downstream.finetune if recipe is finetune_recipe else downstream.linear_probe
  with pytest.raises(ValueError, match=match):
    run(config, str(tmp_path))
  assert not os.listdir(str(tmp_path))
