r"""Downstream evaluation of an MAE encoder: fine-tuning, linear probing and kNN.

  python -m mae_jax.downstream --config=configs/finetune.py:variant=B/16 \
    --config.pretrained_workdir=PRETRAIN_DIR --workdir=FT_DIR

`config.downstream` picks what runs (`train_and_evaluate` dispatches):

* `finetune`: the whole ViT classifier trains (`finetune`). Global average
  pooling of the patch tokens + fc_norm (or the cls token after the encoder's
  norm), head trunc-normal(head_init_std), layer-wise lr decay, drop path,
  RandAugment, random erasing, mixup / cutmix with label smoothing, warmup +
  cosine. top-1 / top-5 on dataset.eval_split.
* `linprobe`: BatchNorm(no affine, eps 1e-6) + Linear on the frozen encoder's
  cls token (after its final norm), LARS (`linear_probe`).
* `knn`: weighted kNN (cosine similarity, votes exp(sim / T)) of the frozen
  encoder's features (`run_knn`); `KnnMonitor` runs the same evaluation inside
  pretraining.

The pretrained encoder comes from `pretrained_workdir` (a pretraining or
fine-tuning run's checkpoints), or `pretrained_path` (an export of
mae_jax.export, a reference .pth, safetensors or a Hugging Face folder); with
neither, the encoder starts from random weights (runlocal, tests, baselines).

Training is the pretraining loop's design: one named mesh, state initialised
into its shardings (pretrained weights are merged on the host and placed shard
by shard, so a mesh whose FSDP axis spans hosts, as for L/16 and H/14, never
needs a whole parameter on one process), a jitted step with donated state,
non-finite steps skipped,
Orbax checkpoints with automatic and exact resume, SIGTERM saves and stops,
clu metrics plus metrics.jsonl. A fine-tuning checkpoint holds the classifier
params (`encoder`, `fc_norm` or nothing, `head`), so it can be exported or
used as `pretrained_workdir` again. A linear-probe checkpoint holds only what
trains: {'params': {'head': ...}, 'batch_stats': {'head_bn': ...}}; the frozen
encoder is re-read from the pretrained source recorded in its config.

Augmentation (training images, TensorFlow, per example, stateless: a pure
function of (seed, example position), so resuming replays it exactly):
RandomResizedCrop (dataset.crop_scale / crop_ratio, bicubic) and horizontal
flip; then for fine-tuning RandAugment and random erasing, as timm's
`rand-mM-mstdS-inc1` and `RandomErasing(mode='pixel')`. The RandAugment ops are
timm's 15 'increasing' ops: AutoContrast, Equalize, Invert, Rotate (30 deg),
Posterize (4..0 bits), Solarize, SolarizeAdd, Color, Contrast, Brightness,
Sharpness (factor 1 +- 0.9 m / 10), ShearX/Y (0.3), TranslateX/Y (0.45 of the
size); each of `num_layers` draws applies with probability 0.5 at magnitude
N(m, mstd) clipped to [0, 10], with a random sign. Differences from PIL:
geometric ops fill with the dataset mean grey (one value for all channels)
and resample bilinearly. Mixup / CutMix run on the device, one draw per
data-parallel shard of the batch ('batch' mode, as the reference's one draw per
GPU) or per example ('elem'); the partner of an example is its mirror in the
shard, CutMix's lam is corrected to the box actually cut.
"""

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import periodic_actions

from mae_jax import checkpoint as ckpt_lib
from mae_jax import metrics as metrics_lib
from mae_jax import models, optim, parallel
from mae_jax import train as train_lib

KINDS = ('finetune', 'linprobe', 'knn')
MIXUP_MODES = ('batch', 'elem')
ERASE_MODES = ('pixel', 'rand', 'const')
POOLS = ('cls', 'mean')
# kNN defaults (config.knn.*), DINO's evaluation: 20 neighbours, T = 0.07.
KNN_DEFAULTS = {'k': 20, 'temperature': 0.07, 'train_examples': 10_000, 'eval_examples': -1,
                'pool': 'cls', 'batch_size': 256}
RESULTS_FILE = 'results.json'


# ----------------------------------------------------------------------------
# Config.

def _kind(config) -> str:
  kind = config.get('downstream', 'finetune')
  if kind not in KINDS:
    raise ValueError(f'downstream={kind!r}: must be one of {KINDS}')
  return kind


def knn_settings(config, **overrides) -> dict:
  """config.knn.* and then `overrides` over KNN_DEFAULTS (the knn keys are optional), checked."""
  knn = dict(KNN_DEFAULTS)
  given = config.get('knn', None)
  for what, values in (('config.knn', given), ('kNN settings', overrides)):
    if not values:
      continue
    values = values.to_dict() if hasattr(values, 'to_dict') else dict(values)
    unknown = sorted(set(values) - set(KNN_DEFAULTS))
    if unknown:
      raise ValueError(f'{what} has unknown keys {unknown}; known: {sorted(KNN_DEFAULTS)}')
    knn.update(values)
  if knn['pool'] not in POOLS:
    raise ValueError(f'knn.pool={knn["pool"]!r}: must be one of {POOLS}')
  for key, low in (('k', 1), ('batch_size', 1), ('train_examples', None), ('eval_examples', None)):
    value = knn[key]
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or (low is not None and value < low)):
      raise ValueError(f'knn.{key}={value!r}: must be an integer ' + (f'>= {low}' if low else '(<= 0: all)'))
  if not knn['temperature'] > 0:
    raise ValueError(f'knn.temperature={knn["temperature"]}: must be > 0')
  return knn


def _model_overrides(config) -> dict:
  """Encoder fields of config.model plus the data shape."""
  overrides = {k: v for k, v in config.model.items() if k in models.mae.ENCODER_FIELDS}
  overrides.update(image_size=config.dataset.image_size, in_channels=config.dataset.channels)
  return overrides


def encoder_kwargs(config) -> dict:
  """VisionTransformer fields of config.model (data shape and drop path included)."""
  return models.encoder_kwargs(config.model.name, **_model_overrides(config),
                               drop_path_rate=float(config.get('drop_path_rate', 0.0)))


def build_classifier(config, num_classes: int) -> models.ViTClassifier:
  """The fine-tuning model: encoder, global pool + fc_norm (or cls), head."""
  return models.ViTClassifier(num_classes=num_classes, encoder=encoder_kwargs(config),
                              global_pool=bool(config.get('global_pool', True)),
                              head_init_std=float(config.get('head_init_std', 2e-5)))


def build_encoder(config, final_norm: bool = True) -> models.VisionTransformer:
  """The encoder alone (frozen for linear probing and kNN)."""
  kwargs = encoder_kwargs(config)
  kwargs['drop_path_rate'] = 0.0
  return models.VisionTransformer(**kwargs, final_norm=final_norm)


def _is_synthetic(config) -> bool:
  return config.dataset.name == 'synthetic'


def resolve_num_classes(config) -> int:
  """config.num_classes, checked against the data set's labels (<= 0: the data set's)."""
  wanted = int(config.get('num_classes', 0) or 0)
  if _is_synthetic(config):
    if wanted <= 0:
      raise ValueError('num_classes must be > 0 with dataset.name=synthetic')
    return wanted
  from mae_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
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


def num_train_examples(config) -> int:
  if _is_synthetic(config):
    return int(config.dataset.get('num_examples', 1024))
  from mae_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.num_examples(config.dataset, config.dataset.train_split)


def validate_config(config, mesh) -> None:
  """Fails fast, naming the key, on settings that cannot work. No compile happens here."""
  kind = _kind(config)
  if config.batch_size <= 0 or config.batch_size % jax.process_count():
    raise ValueError(f'batch_size={config.batch_size}: must be a positive multiple of the '
                     f'{jax.process_count()} processes')
  accum = int(config.get('grad_accum_steps', 1))
  if accum < 1 or config.batch_size % accum:
    raise ValueError(f'grad_accum_steps={accum}: must be >= 1 and divide batch_size={config.batch_size}')
  dp = parallel.batch_axis_size(mesh)
  if (config.batch_size // accum) % dp:
    raise ValueError(f'batch_size={config.batch_size} (micro-batch {config.batch_size // accum}) is not '
                     f'divisible by the data-parallel size {dp} = mesh data x fsdp {dict(mesh.shape)}')
  if config.get('pretrained_workdir', '') and config.get('pretrained_path', ''):
    raise ValueError('pretrained_workdir and pretrained_path are both set: set one of them')
  train_lib.check_loop_settings(config, mesh)
  if kind == 'finetune':
    mode = config.get('mixup_mode', 'batch')
    if mode not in MIXUP_MODES:
      raise ValueError(f'mixup_mode={mode!r}: must be one of {MIXUP_MODES}')
    for key in ('mixup', 'cutmix', 'label_smoothing', 'reprob'):
      if config.get(key, 0.0) < 0:
        raise ValueError(f'{key}={config.get(key)}: must be >= 0')
    if not 0 <= config.get('label_smoothing', 0.0) < 1:
      raise ValueError(f'label_smoothing={config.label_smoothing}: must be in [0, 1)')
    if config.get('remode', 'pixel') not in ERASE_MODES:
      raise ValueError(f'remode={config.remode!r}: must be one of {ERASE_MODES}')
    if config.get('freeze_encoder', False):
      raise ValueError('freeze_encoder=True with downstream=finetune: use downstream=linprobe to train '
                       'a head on a frozen encoder')


# ----------------------------------------------------------------------------
# Pretrained weights.

def _plain(tree):
  if isinstance(tree, flax.core.FrozenDict):
    tree = flax.core.unfreeze(tree)
  if isinstance(tree, dict):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def load_pretrained_encoder(config) -> tuple[dict | None, str]:
  """The pretrained encoder params (host arrays) and where they came from; (None, '') for none."""
  from mae_jax import export  # pylint: disable=g-import-not-at-top
  workdir = config.get('pretrained_workdir', '')
  path = config.get('pretrained_path', '')
  if workdir and path:
    raise ValueError('pretrained_workdir and pretrained_path are both set: set one of them')
  if workdir:
    step = int(config.get('pretrained_step', -1))
    params, _ = ckpt_lib.load_params(workdir, None if step < 0 else step)
    params = _plain(params)
    if 'encoder' not in params:
      raise ValueError(f'pretrained_workdir={workdir!r}: its params have no "encoder" '
                       f'(top-level keys {sorted(params)}); is it a mae_jax pretraining or fine-tuning run?')
    step = ckpt_lib.latest_step(workdir) if step < 0 else step
    source = f'{workdir} step {step}'
  elif path:
    params = export.import_weights(path, config.model.name, **_model_overrides(config))
    source = path
  else:
    return None, ''
  encoder = jax.tree.map(np.asarray, params['encoder'])
  # The target layout decides: stacked `blocks` with scan_layers, else `blocks_{i}`.
  if config.model.get('scan_layers', False):
    encoder = export.stack_blocks({'encoder': encoder})['encoder']
  else:
    encoder = export.unstack_blocks({'encoder': encoder})['encoder']
  return encoder, source


def merge_encoder(params: dict, encoder: dict, source: str) -> dict:
  """Replaces params['encoder'] by pretrained `encoder` (shapes checked; a spare `norm` dropped).

  Only the shapes and dtypes of `params` are read: it may be abstract
  (ShapeDtypeStructs), host arrays or global arrays sharded over any mesh. The
  merged encoder leaves are host (numpy) arrays in the target dtypes; every
  other leaf of `params` is passed through untouched. Place the result with
  `place_tree` / `place_on_mesh`: no process ever fetches a parameter that
  spans other processes' devices (FSDP over hosts for L/16 and H/14).
  """
  target = flax.traverse_util.flatten_dict(_plain(params['encoder']), sep='/')
  found = flax.traverse_util.flatten_dict(_plain(encoder), sep='/')
  missing = sorted(set(target) - set(found))
  unexpected = sorted(k for k in set(found) - set(target) if not k.startswith('norm/'))
  wrong = sorted(f'{k}: {tuple(found[k].shape)} (expected {tuple(target[k].shape)})'
                 for k in set(target) & set(found) if tuple(found[k].shape) != tuple(target[k].shape))
  if missing or unexpected or wrong:
    problems = [f'{what} ({len(keys)}): {", ".join(keys[:5])}{" ..." if len(keys) > 5 else ""}'
                for what, keys in (('missing', missing), ('unexpected', unexpected),
                                   ('shape mismatches', wrong)) if keys]
    raise ValueError(f'pretrained encoder from {source} does not fit model.name / dataset.image_size / '
                     f'dataset.channels of this config: ' + '; '.join(problems))
  merged = {k: np.asarray(found[k]).astype(target[k].dtype, copy=False) for k in target}
  dropped = sorted(set(found) - set(target))
  logging.info('Loaded the pretrained encoder from %s (%d tensors)%s', source, len(merged),
               f'; not used: {dropped}' if dropped else '')
  out = dict(_plain(params))
  out['encoder'] = flax.traverse_util.unflatten_dict(merged, sep='/')
  return out


def host_to_global(value, sharding: jax.sharding.Sharding) -> jax.Array:
  """`value` (the same on every process) as a global array with `sharding`.

  Host values are cut into this process's shards (make_array_from_callback),
  so a sharding that spans several processes works and nothing is fetched from
  another host. A global array already laid out so is returned as is; one with
  another layout is resharded on the devices.
  """
  if isinstance(value, jax.Array):
    if value.sharding == sharding:
      return value
    if not value.is_fully_addressable:
      return jax.jit(lambda x: x, out_shardings=sharding)(value)
    if sharding.is_fully_addressable:
      return jax.device_put(value, sharding)
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def place_tree(tree, shardings):
  """host_to_global over a tree and the matching tree of shardings."""
  return jax.tree.map(host_to_global, tree, shardings)


def config_shardings(tree, config, mesh):
  """Shardings of `tree` (arrays or abstract) by the config's partition rules (FSDP for large tensors)."""
  return parallel.tree_shardings(tree, mesh, parallel.rules_from_config(config.mesh),
                                 config.mesh.get('min_fsdp_size', 2**18))


def init_on_mesh(init_fn: Callable[[], Any], config, mesh):
  """init_fn() computed straight into the config's shardings (never whole on one device)."""
  shardings = config_shardings(jax.eval_shape(init_fn), config, mesh)
  with jax.set_mesh(mesh):
    return jax.jit(init_fn, out_shardings=shardings)()


# ----------------------------------------------------------------------------
# Augmentation: RandAugment and random erasing (TensorFlow, per example).

RAND_AUGMENT_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
                    'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
                    'TranslateX', 'TranslateY')
MAX_LEVEL = 10.0


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


def _grey(image):
  """ITU-R 601-2 luma of a [H, W, C] image as [H, W, 1] (the image itself when C = 1)."""
  tf = _tf()
  if image.shape[-1] == 1:
    return image
  weights = tf.constant([0.299, 0.587, 0.114], tf.float32)
  return tf.reduce_sum(image * weights, axis=-1, keepdims=True)


def _blend(degenerate, image, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped."""
  tf = _tf()
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _affine(image, transform, fill):
  """Output pixel (x, y) takes input (a0 x + a1 y + a2, b0 x + b1 y + b2), bilinear, constant fill."""
  tf = _tf()
  shape = tf.shape(image)
  transform = tf.concat([tf.cast(tf.stack(transform), tf.float32), tf.zeros([2])], 0)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform[None], output_shape=shape[:2],
      fill_value=tf.cast(fill, tf.float32), interpolation='BILINEAR', fill_mode='CONSTANT')
  return out[0]


def _equalize(image):
  """PIL ImageOps.equalize, per channel."""
  tf = _tf()

  def channel(c):
    values = tf.cast(c, tf.int32)
    hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
    step = (tf.reduce_sum(hist) - last) // 255
    lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
    lut = tf.cast(tf.clip_by_value(lut, 0, 255), tf.float32)
    return tf.where(step == 0, c, tf.gather(lut, values))

  channels = tf.unstack(image, axis=-1, num=image.shape[-1])
  return tf.stack([channel(c) for c in channels], axis=-1)


def _auto_contrast(image):
  """PIL ImageOps.autocontrast (no cutoff), per channel."""
  tf = _tf()
  low = tf.reduce_min(image, axis=(0, 1), keepdims=True)
  high = tf.reduce_max(image, axis=(0, 1), keepdims=True)
  scale = 255.0 / tf.maximum(high - low, 1e-6)
  return tf.where(high > low, (image - low) * scale, image)


def _sharpness_degenerate(image):
  """PIL's SMOOTH filter (3x3, centre 5, others 1, / 13); border pixels unchanged."""
  tf = _tf()
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  channels = image.shape[-1]
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.round(smooth)
  return tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]) + image * tf.pad(
      tf.zeros_like(smooth), [[1, 1], [1, 1], [0, 0]], constant_values=1.0)


def _rand_augment_op(index, image, level, sign, fill):
  """Applies op RAND_AUGMENT_OPS[index] at `level` in [0, 10] with `sign` +-1 to a [0, 255] image."""
  tf = _tf()
  index = tf.convert_to_tensor(index, tf.int32)
  level = tf.convert_to_tensor(level, tf.float32)
  sign = tf.convert_to_tensor(sign, tf.float32)
  frac = level / MAX_LEVEL
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  enhance = 1.0 + sign * frac * 0.9

  def rotate():
    angle = sign * frac * 30.0 * math.pi / 180.0
    cx, cy = (width - 1) / 2, (height - 1) / 2
    cos, sin = tf.cos(angle), tf.sin(angle)
    return _affine(image, [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy], fill)

  def posterize():
    bits = 4 - tf.cast(tf.floor(frac * 4), tf.int32)  # timm's PosterizeIncreasing: 4 .. 0 bits kept.
    shift = tf.cast(2 ** (8 - bits), tf.float32)
    return tf.floor(image / shift) * shift

  def solarize():
    threshold = 256.0 - tf.floor(frac * 256.0)
    return tf.where(image >= threshold, 255.0 - image, image)

  def solarize_add():
    return tf.where(image < 128.0, tf.minimum(image + tf.floor(frac * 110.0), 255.0), image)

  def contrast():
    mean = tf.floor(tf.reduce_mean(_grey(image)) + 0.5)
    return _blend(mean, image, enhance)

  def shear(axis):
    s = sign * frac * 0.3
    return _affine(image, [1.0, s, 0.0, 0.0, 1.0, 0.0] if axis == 'x' else [1.0, 0.0, 0.0, s, 1.0, 0.0], fill)

  def translate(axis):
    if axis == 'x':
      return _affine(image, [1.0, 0.0, sign * frac * 0.45 * width, 0.0, 1.0, 0.0], fill)
    return _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, sign * frac * 0.45 * height], fill)

  branches = [
      lambda: _auto_contrast(image),
      lambda: _equalize(image),
      lambda: 255.0 - image,
      rotate,
      posterize,
      solarize,
      solarize_add,
      lambda: _blend(_grey(image), image, enhance),  # Color (saturation).
      contrast,
      lambda: _blend(tf.zeros_like(image), image, enhance),  # Brightness.
      lambda: _blend(_sharpness_degenerate(image), image, enhance),
      lambda: shear('x'),
      lambda: shear('y'),
      lambda: translate('x'),
      lambda: translate('y'),
  ]
  assert len(branches) == len(RAND_AUGMENT_OPS)
  out = tf.switch_case(index, branches)
  out.set_shape(image.shape)
  return tf.clip_by_value(tf.round(out), 0.0, 255.0)  # PIL works on uint8 images.


def rand_augment(image, seed, *, num_layers: int, magnitude: float, magnitude_std: float = 0.5,
                 fill: float = 128.0, prob: float = 0.5):
  """timm's RandAugment (rand-mM-mstdS-inc1) on a float32 [H, W, C] image in [0, 255].

  Each of `num_layers` draws picks one of RAND_AUGMENT_OPS uniformly (with
  replacement) and applies it with probability `prob` at magnitude
  N(magnitude, magnitude_std) clipped to [0, 10], with a random sign.
  """
  tf = _tf()
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, max(num_layers, 1)))
  for layer in range(num_layers):
    op_seed, apply_seed, level_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(seeds[layer], 4))
    index = tf.random.stateless_uniform([], op_seed, 0, len(RAND_AUGMENT_OPS), dtype=tf.int32)
    level = magnitude + magnitude_std * tf.random.stateless_normal([], level_seed)
    level = tf.clip_by_value(level, 0.0, MAX_LEVEL)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    apply = tf.random.stateless_uniform([], apply_seed) < prob
    image = tf.cond(apply, functools.partial(_rand_augment_op, index, image, level, sign, fill),
                    lambda im=image: im)
  return image


def random_erasing(image, seed, *, probability: float, mode: str = 'pixel', count: int = 1,
                   min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                   attempts: int = 10):
  """timm's RandomErasing on a normalised float32 [H, W, C] image.

  With `probability`, erases `count` boxes (a random count in [1, count] when
  count > 1), each of area U(min_area, max_area) * H * W / count and aspect
  log-uniform in [min_aspect, 1 / min_aspect]: the first of `attempts` draws
  that fits, placed uniformly. The box is filled with N(0, 1) per pixel
  ('pixel'), per channel ('rand') or zeros ('const').
  """
  tf = _tf()
  if mode not in ERASE_MODES:
    raise ValueError(f'remode={mode!r}: must be one of {ERASE_MODES}')
  apply_seed, count_seed, box_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  num_boxes = tf.random.stateless_uniform([], count_seed, 1, count + 1, dtype=tf.int32) if count > 1 else 1
  erased = image
  box_seeds = tf.unstack(tf.random.experimental.stateless_split(box_seed, count))
  for box in range(count):
    area_seed, aspect_seed, offset_seed, fill_seed = tf.unstack(
        tf.random.experimental.stateless_split(box_seeds[box], 4))
    area = tf.random.stateless_uniform([attempts], area_seed, min_area, max_area) * height_f * width_f / count
    aspect = tf.exp(tf.random.stateless_uniform([attempts], aspect_seed, math.log(min_aspect),
                                                -math.log(min_aspect)))
    h = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    w = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    fits = (h < height) & (w < width) & (h > 0) & (w > 0)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    h, w = h[first], w[first]
    u = tf.random.stateless_uniform([2], offset_seed)
    top = tf.cast(tf.floor(u[0] * tf.cast(height - h + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(u[1] * tf.cast(width - w + 1, tf.float32)), tf.int32)
    rows = tf.range(height)[:, None, None]
    cols = tf.range(width)[None, :, None]
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    inside &= tf.reduce_any(fits) & (tf.constant(box) < num_boxes)
    if mode == 'pixel':
      fill = tf.random.stateless_normal(shape, fill_seed)
    elif mode == 'rand':
      fill = tf.random.stateless_normal([1, 1, shape[2]], fill_seed) + tf.zeros_like(image)
    else:
      fill = tf.zeros_like(image)
    erased = tf.where(inside, fill, erased)
  apply = tf.random.stateless_uniform([], apply_seed) < probability
  return tf.where(apply, erased, image)


def dataset_config(config):
  """config.dataset as the input pipeline reads it.

  The synthetic source ignores mean / std, and pretraining configs made
  synthetic by runlocal may keep a one-channel mean: repeat it per channel.
  """
  from mae_jax.data import sources  # pylint: disable=g-import-not-at-top
  values = config.dataset.to_dict()
  if _is_synthetic(config):
    for key in ('mean', 'std'):
      if len(values[key]) != values['channels']:
        values[key] = (values[key][0],) * values['channels']
  return sources.DatasetConfig.from_config(values)


def make_train_preprocess_fn(config) -> Callable:
  """fn(image, seed) -> normalised float32 [S, S, C]: the training transform of a downstream config.

  RandomResizedCrop + flip always; RandAugment when randaug.num_layers > 0 and
  random erasing when reprob > 0 (fine-tuning recipes set them, linear probing
  does not).
  """
  from mae_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  tf = _tf()
  data = dataset_config(config)
  randaug = config.get('randaug', None)
  num_layers = int(randaug.num_layers) if randaug else 0
  magnitude = float(randaug.get('magnitude', 9)) if randaug else 0.0
  magnitude_std = float(randaug.get('magnitude_std', 0.5)) if randaug else 0.0
  reprob = float(config.get('reprob', 0.0))
  remode = config.get('remode', 'pixel')
  recount = int(config.get('recount', 1))
  fill = 255.0 * float(np.mean(data.mean))

  def preprocess_fn(image, seed):
    crop_seed, flip_seed, aug_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))

    def window_fn(height, width):
      return preprocess.sample_crop_window(height, width, crop_seed, scale=data.crop_scale,
                                           ratio=data.crop_ratio)

    image = preprocess.resize(preprocess.decode_and_crop(image, window_fn, data.channels), data.image_size)
    image = preprocess.random_flip(image, flip_seed)
    if num_layers > 0:
      image = rand_augment(image, aug_seed, num_layers=num_layers, magnitude=magnitude,
                           magnitude_std=magnitude_std, fill=fill)
    image = preprocess.normalize(image, data.mean, data.std)
    if reprob > 0:
      image = random_erasing(image, erase_seed, probability=reprob, mode=remode, count=recount)
    return image

  return preprocess_fn


# ----------------------------------------------------------------------------
# Mixup / CutMix and label smoothing (JAX, on the device).

def smooth_one_hot(labels, num_classes: int, smoothing: float = 0.0):
  """One-hot targets with smoothing: 1 - s + s / K on the label, s / K elsewhere (timm)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def _mix_one(rng, image, partner, *, mixup_alpha: float, cutmix_alpha: float, prob: float,
             switch_prob: float):
  """Mixes one image with its partner; returns (image, lam). All draws come from `rng`."""
  apply_key, switch_key, mix_key, cut_key, box_key = jax.random.split(rng, 5)
  apply = jax.random.uniform(apply_key) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(switch_key) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(mix_key, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.ones([])
  lam_cutmix = jax.random.beta(cut_key, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.ones([])

  # CutMix box of timm's rand_bbox: sides (H, W) * sqrt(1 - lam), centre uniform, clipped.
  height, width = image.shape[0], image.shape[1]
  cut_ratio = jnp.sqrt(1.0 - lam_cutmix)
  cut_h = jnp.floor(height * cut_ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * cut_ratio).astype(jnp.int32)
  y_key, x_key = jax.random.split(box_key)
  cy = jax.random.randint(y_key, [], 0, height)
  cx = jax.random.randint(x_key, [], 0, width)
  y1, y2 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x1, x2 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None, None]
  cols = jnp.arange(width)[None, :, None]
  box = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
  lam_box = 1.0 - ((y2 - y1) * (x2 - x1)).astype(jnp.float32) / (height * width)  # Corrected lam.

  cut = jnp.where(box, partner, image)
  mixed = lam_mixup * image + (1.0 - lam_mixup) * partner
  out = jnp.where(apply, jnp.where(use_cutmix, cut, mixed), image)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mixup), 1.0)
  return out.astype(image.dtype), lam


def mixup_cutmix(rng, images, targets, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5, mode: str = 'batch', num_groups: int = 1):
  """Mixup / CutMix of images [B, H, W, C] and soft targets [B, K], as timm's Mixup.

  The batch splits into `num_groups` contiguous groups (one per data-parallel
  shard: no cross-device traffic); in each, example i pairs with example
  n - 1 - i. Mode 'batch' draws one lam (and CutMix box) per group, 'elem' one
  per example. With probability `prob` a draw mixes: CutMix with
  probability `switch_prob` when both alphas are > 0, lam ~ Beta(alpha, alpha).
  Targets mix with the lam actually applied (CutMix: 1 - box area / image area).

  Returns (images, targets, lam [B]).
  """
  if mode not in MIXUP_MODES:
    raise ValueError(f'mixup_mode={mode!r}: must be one of {MIXUP_MODES}')
  batch = images.shape[0]
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets, jnp.ones([batch], jnp.float32)
  if batch % num_groups:
    raise ValueError(f'batch of {batch} does not split into {num_groups} mixup groups')
  group = batch // num_groups
  grouped = images.reshape((num_groups, group) + images.shape[1:])
  partners = grouped[:, ::-1]
  mix = functools.partial(_mix_one, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
                          switch_prob=switch_prob)
  keys = jax.random.split(rng, num_groups)
  if mode == 'batch':
    per_group = jax.vmap(mix, in_axes=(None, 0, 0))
    mixed, lam = jax.vmap(per_group)(keys, grouped, partners)
  else:
    keys = jax.vmap(lambda k: jax.random.split(k, group))(keys)
    mixed, lam = jax.vmap(jax.vmap(mix))(keys, grouped, partners)
  lam = lam.reshape(batch)
  grouped_targets = targets.reshape((num_groups, group) + targets.shape[1:])
  partner_targets = grouped_targets[:, ::-1].reshape(targets.shape)
  targets = lam[:, None] * targets + (1.0 - lam[:, None]) * partner_targets
  return mixed.reshape(images.shape), targets, lam


# ----------------------------------------------------------------------------
# Metrics.

def classification_counts(logits, labels, mask) -> dict:
  """Sums over real examples: correct top-1, correct top-5 (top-K for K < 5 classes), loss, count."""
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  k = min(5, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  hits = top == labels[:, None]
  loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
  return {'correct1': jnp.sum(hits[:, 0] * mask), 'correct5': jnp.sum(jnp.any(hits, axis=1) * mask),
          'loss': jnp.sum(loss * mask), 'count': jnp.sum(mask)}


def summarize_counts(totals: dict, prefix: str = 'eval/') -> dict:
  count = max(float(totals['count']), 1.0)
  return {f'{prefix}top1': float(totals['correct1']) / count,
          f'{prefix}top5': float(totals['correct5']) / count,
          f'{prefix}loss': float(totals['loss']) / count,
          f'{prefix}num_examples': float(totals['count'])}


# ----------------------------------------------------------------------------
# Input.

def _synthetic_labelled(config, num_classes: int, positions, seed: int, preprocess_fn=None):
  """tf.data of labelled synthetic examples at `positions`: a class pattern plus noise (uint8)."""
  tf = _tf()
  size, channels = config.dataset.image_size, config.dataset.channels
  num_examples = int(config.dataset.get('num_examples', 1024))
  patterns = tf.constant(np.random.default_rng(1234).uniform(
      0, 255, (num_classes, 4, 4, channels)).astype(np.float32))

  def example(position):
    index = position % num_examples
    key = tf.stack([tf.cast(seed, tf.int64), index])
    label = tf.random.stateless_uniform([], key, 0, num_classes, dtype=tf.int32)
    base = tf.image.resize(tf.gather(patterns, label), [size, size], method='nearest')
    noise = 30.0 * tf.random.stateless_normal([size, size, channels], key + 1)
    image = tf.cast(tf.clip_by_value(tf.round(base + noise), 0, 255), tf.uint8)
    if preprocess_fn is None:
      return {'image': image, 'label': label}
    aug_key = tf.stack([tf.cast(seed, tf.int64) + 7, position])
    return {'image': preprocess_fn(image, aug_key), 'label': label}

  return positions.map(example, num_parallel_calls=tf.data.AUTOTUNE)


def create_train_iterator(config, num_classes: int, start_step: int, preprocess_fn) -> Iterator[dict]:
  """This process's local training batches {'image', 'label'} from `start_step` on."""
  local = config.batch_size // jax.process_count()
  if _is_synthetic(config):
    tf = _tf()
    positions = tf.data.Dataset.counter(start_step).flat_map(
        lambda s: tf.data.Dataset.range(s * config.batch_size + jax.process_index() * local,
                                        s * config.batch_size + (jax.process_index() + 1) * local))
    ds = _synthetic_labelled(config, num_classes, positions, config.seed, preprocess_fn)
    return ds.batch(local, drop_remainder=True).prefetch(2).as_numpy_iterator()
  from mae_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.create_pretrain_iterator(
      config.dataset, global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count(), preprocess_fn=preprocess_fn)


def create_eval_iterator(config, num_classes: int, split: str, batch_size: int) -> Iterator[dict]:
  """One pass over `split` (eval transform, no augmentation), padded: {'image', 'label', 'mask'}."""
  if not _is_synthetic(config):
    from mae_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    return input_pipeline.create_eval_iterator(config.dataset, split=split, batch_size=batch_size,
                                               process_index=jax.process_index(),
                                               process_count=jax.process_count())
  from mae_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  tf = _tf()
  # Synthetic: the train split is the training examples, any other split fresh ones.
  total = int(config.dataset.get('num_examples', 1024))
  seed = config.seed if split == config.dataset.train_split else config.seed + 10**6
  local = batch_size // jax.process_count()
  per_process = -(-total // jax.process_count())
  start = min(total, jax.process_index() * per_process)
  stop = min(total, start + per_process)
  eval_fn = preprocess.make_eval_preprocess_fn(dataset_config(config))
  ds = _synthetic_labelled(config, num_classes, tf.data.Dataset.range(start, stop), seed)
  ds = ds.map(lambda ex: {'image': eval_fn(ex['image']), 'label': ex['label']})
  return _pad_batches(ds.batch(local).as_numpy_iterator(), local, -(-per_process // local),
                      (local, config.dataset.image_size, config.dataset.image_size, config.dataset.channels))


def _pad_batches(batches, local, num_batches, image_shape):
  """Pads batches to `local` rows (mask False) and appends empty ones up to num_batches."""
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


def limited_split(split: str, count: int) -> str:
  """`split` limited to its first `count` examples ('train' -> 'train[:count]'); count <= 0: all.

  A split that is already sliced or combined ('train[:95%]', 'train+validation')
  comes back unchanged: readers of it stop after `count` examples themselves
  (extract_features' max_examples), so the count still holds.
  """
  if count <= 0 or '[' in split or '+' in split:
    return split
  return f'{split}[:{count}]'


def prefetch_to_mesh(iterator, mesh, size: int = 2):
  """Moves host batches into global arrays sharded over the batch axes, `size` ahead."""
  queue = []
  for local in iterator:
    queue.append(parallel.global_batch_from_local(local, mesh))
    if len(queue) > size:
      yield queue.pop(0)
  while queue:
    yield queue.pop(0)


# ----------------------------------------------------------------------------
# Features and kNN.

def pool_tokens(tokens, pool: str):
  """[N, 1 + L, D] -> [N, D]: the cls token or the mean of the patch tokens, float32."""
  if pool == 'cls':
    return tokens[:, 0].astype(jnp.float32)
  if pool == 'mean':
    return tokens[:, 1:].mean(axis=1).astype(jnp.float32)
  raise ValueError(f'pool={pool!r}: must be one of {POOLS}')


def _to_host(x) -> np.ndarray:
  """A global array as a numpy array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def extract_features(encode_fn, params, batches, mesh=None, max_examples: int = -1):
  """Runs encode_fn(params, images) -> [B, D] over padded batches; returns (features, labels).

  `batches` yields {'image', 'label', 'mask'?} local batches; only rows with
  mask True are kept, in order, and at most `max_examples` (<= 0: all).
  """
  mesh = mesh or parallel.create_mesh({'data': -1})
  encode = encode_fn if hasattr(encode_fn, 'lower') else jax.jit(encode_fn)
  devices = set(mesh.devices.flat)

  def on_mesh(x):  # Host or single-device arrays: replicated over the mesh.
    if isinstance(x, jax.Array) and x.sharding.device_set == devices:
      return x
    return host_to_global(x, parallel.replicated(mesh))

  params = jax.tree.map(on_mesh, params)
  features, labels, count = [], [], 0
  with jax.set_mesh(mesh):
    for local in batches:
      local = dict(local)
      local.setdefault('mask', np.ones(len(local['label']), bool))
      batch = parallel.global_batch_from_local(local, mesh)
      out = encode(params, batch['image'])
      mask = _to_host(batch['mask']).astype(bool)
      features.append(_to_host(out)[mask])
      labels.append(_to_host(batch['label'])[mask])
      count += int(mask.sum())
      if 0 < max_examples <= count:
        break
  features = np.concatenate(features) if features else np.zeros((0, 0), np.float32)
  labels = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
  if max_examples > 0:
    features, labels = features[:max_examples], labels[:max_examples]
  return features.astype(np.float32), labels.astype(np.int32)


@functools.partial(jax.jit, static_argnames=('num_classes', 'k'))
def _knn_scores(train_features, train_labels, eval_features, temperature, *, num_classes, k):
  sims = eval_features @ train_features.T  # [E, N] cosine similarities.
  top_sims, top_index = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)
  votes = jax.nn.one_hot(train_labels[top_index], num_classes) * weights[..., None]
  return votes.sum(axis=1)  # [E, num_classes]


def knn_classify(train_features, train_labels, eval_features, *, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
  """Class scores [E, num_classes] of weighted kNN: cosine similarity, votes exp(sim / T)."""
  def normalize(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  if len(train_features) == 0:
    raise ValueError('kNN needs at least one training example')
  k = min(k, len(train_features))
  bank = jnp.asarray(normalize(train_features))
  bank_labels = jnp.asarray(train_labels, jnp.int32)
  queries = normalize(eval_features)
  scores = [np.asarray(_knn_scores(bank, bank_labels, jnp.asarray(queries[i:i + chunk]), temperature,
                                   num_classes=num_classes, k=k))
            for i in range(0, len(queries), chunk)]
  return np.concatenate(scores) if scores else np.zeros((0, num_classes), np.float32)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict:
  """{'top1': ..., 'top5': ...} of class scores [N, K] against labels [N] (top-K for K < 5 classes)."""
  order = np.argsort(-scores, axis=1, kind='stable')
  out = {}
  for k in ks:
    hits = (order[:, :min(k, scores.shape[1])] == labels[:, None]).any(axis=1)
    out[f'top{k}'] = float(hits.mean()) if len(labels) else 0.0
  return out


def knn_eval(encode_fn, params, train_iter, eval_iter, *, num_classes: int, k: int = 20,
             temperature: float = 0.07, max_train_examples: int = -1, max_eval_examples: int = -1,
             mesh=None) -> dict:
  """Weighted kNN accuracy of frozen features.

  Args:
    encode_fn: fn(params, images [B, H, W, C]) -> features [B, D] (jitted here).
    params: its params (may be sharded global arrays).
    train_iter / eval_iter: local batches {'image', 'label', 'mask'?} (eval
      transform, no augmentation); padded rows (mask False) are ignored.
    num_classes: number of classes.
    k, temperature: neighbours and the vote temperature: a neighbour at cosine
      similarity s adds exp(s / temperature) to its class.
    max_train_examples / max_eval_examples: stop reading after this many
      (<= 0: all).
    mesh: where the batches go (default: every device data-parallel).

  Returns:
    {'top1', 'top5', 'num_train', 'num_eval'}.
  """
  train_features, train_labels = extract_features(encode_fn, params, train_iter, mesh, max_train_examples)
  eval_features, eval_labels = extract_features(encode_fn, params, eval_iter, mesh, max_eval_examples)
  scores = knn_classify(train_features, train_labels, eval_features, num_classes=num_classes, k=k,
                        temperature=temperature)
  return {**topk_accuracy(scores, eval_labels), 'num_train': len(train_labels),
          'num_eval': len(eval_labels)}


class KnnMonitor:
  """kNN top-1 / top-5 of a model's frozen features, for pretraining to call every N steps.

  Build it once (it compiles the encoder once), call it with the current params:

    monitor = downstream.KnnMonitor(model, config, mesh)
    ...
    if step % config.eval_every_steps == 0:
      writer.write_scalars(step, monitor(state.params))

  `model` is the pretraining MaskedAutoencoder: features are
  `model.apply({'params': p}, images, method=model.encode)` (all tokens of the
  unmasked image after the encoder's final norm), pooled by config.knn.pool:
  'cls' (default; the token the linear probe reads) or 'mean' (patch tokens).
  The bank is the first config.knn.train_examples (10,000) of
  dataset.train_split, queries the first knn.eval_examples (-1: all) of
  dataset.eval_split, both with the eval transform; sliced splits
  ('train[:95%]') work, and a count above a split's size means all of it.
  The settings and both splits are checked when the monitor is built, before
  pretraining starts. Any other module works through
  `encode_fn(params, images) -> [B, D]`.
  """

  def __init__(self, model, config, mesh=None, *, encode_fn=None, num_classes: int | None = None,
               **overrides):
    # Everything is checked here, before the pretraining loop starts, not at the first evaluation.
    self.settings = knn_settings(config, **overrides)
    self.config = config
    self.mesh = mesh or parallel.create_mesh(config.mesh)
    self.num_classes = num_classes or resolve_num_classes(_with_num_classes(config))
    self.splits = {}  # The splits read: the bank and the queries.
    for which in ('train', 'eval'):
      split, count = config.dataset[f'{which}_split'], self.settings[f'{which}_examples']
      if not _is_synthetic(config):
        from mae_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
        try:
          size = input_pipeline.num_examples(config.dataset, split)
        except ValueError as e:
          raise ValueError(f'kNN monitor: dataset.{which}_split: {e}') from None
        if size == 0:
          raise ValueError(f'kNN monitor: dataset.{which}_split={split!r} of {config.dataset.name!r} '
                           'has no examples')
        if count >= size:  # 'train[:10000]' of a smaller split is not a valid TFDS split.
          count = -1
      self.splits[which] = limited_split(split, count)
    pool = self.settings['pool']
    if encode_fn is None:
      def encode_fn(params, images):
        return pool_tokens(model.apply({'params': params}, images, method=model.encode), pool)
    self.encode_fn = jax.jit(encode_fn)
    self.batch_size = _eval_batch(int(self.settings['batch_size']), self.mesh)

  def _batches(self, which: str):
    split = self.config.dataset[f'{which}_split'] if _is_synthetic(self.config) else self.splits[which]
    return create_eval_iterator(self.config, self.num_classes, split, self.batch_size)

  def __call__(self, params, prefix: str = 'eval/knn_') -> dict:
    start = time.time()
    s = self.settings
    result = knn_eval(self.encode_fn, params, self._batches('train'), self._batches('eval'),
                      num_classes=self.num_classes, k=s['k'], temperature=s['temperature'],
                      max_train_examples=s['train_examples'], max_eval_examples=s['eval_examples'],
                      mesh=self.mesh)
    logging.info('kNN (k=%d, T=%g, %s pooling) on %d train / %d eval examples: top-1 %.4f (%.1f s)',
                 s['k'], s['temperature'], s['pool'], result['num_train'], result['num_eval'],
                 result['top1'], time.time() - start)
    return {f'{prefix}top1': result['top1'], f'{prefix}top5': result['top5']}


def knn_monitor(model, params, config, mesh=None, **overrides) -> dict:
  """One kNN evaluation: {'eval/knn_top1', 'eval/knn_top5'} (compiles each call; see KnnMonitor)."""
  return KnnMonitor(model, config, mesh, **overrides)(params)


def _with_num_classes(config):
  """config with num_classes (pretraining configs have none: take the data set's)."""
  if 'num_classes' in config:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.num_classes = 10 if _is_synthetic(config) else 0
  return config


def _eval_batch(batch_size: int, mesh) -> int:
  """A batch size divisible by the processes and the data-parallel size."""
  unit = math.lcm(parallel.batch_axis_size(mesh), jax.process_count())
  return max(unit, batch_size // unit * unit)


# ----------------------------------------------------------------------------
# The linear-probe head.

class ProbeHead(nn.Module):
  """BatchNorm without affine (optional) then a Linear layer, on frozen features."""
  num_classes: int
  batchnorm: bool = True
  batchnorm_eps: float = 1e-6
  init_std: float = 0.01

  @nn.compact
  def __call__(self, features, *, train: bool = False):
    x = features.astype(jnp.float32)
    if self.batchnorm:
      # torch BatchNorm1d(affine=False): running stats with momentum 0.1.
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=self.batchnorm_eps,
                       use_bias=False, use_scale=False, name='head_bn')(x)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(self.init_std),
                    name='head')(x)


def probe_feature_fn(config) -> tuple[Callable, models.VisionTransformer]:
  """(fn(encoder_params, images) -> [B, D], encoder): the frozen features the linear probe reads.

  global_pool=False (the recipe): the cls token after the encoder's final norm.
  global_pool=True: as the reference, the mean of the patch tokens before the
  final norm, through a fresh (frozen, so parameter-free) LayerNorm.
  """
  global_pool = bool(config.get('global_pool', False))
  encoder = build_encoder(config, final_norm=not global_pool)

  def feature_fn(encoder_params, images):
    tokens, _ = encoder.apply({'params': encoder_params}, images, train=False)
    if not global_pool:
      return pool_tokens(tokens, 'cls')
    pooled = pool_tokens(tokens, 'mean')
    mean = pooled.mean(axis=-1, keepdims=True)
    var = pooled.var(axis=-1, keepdims=True)
    return (pooled - mean) * jax.lax.rsqrt(var + models.vit.LAYER_NORM_EPS)

  return feature_fn, encoder


# ----------------------------------------------------------------------------
# Train state and steps.

@flax.struct.dataclass
class TrainState:
  step: jax.Array  # Optimizer steps taken (skipped non-finite steps count too).
  params: Any  # What trains: the classifier, or the probe head.
  opt_state: Any
  batch_stats: Any  # The probe's BatchNorm statistics; {} when fine-tuning.
  nonfinite_run: jax.Array
  nonfinite_total: jax.Array
  halted: jax.Array


def _new_state(params, batch_stats, tx) -> TrainState:
  zero = jnp.zeros([], jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params), batch_stats=batch_stats,
                    nonfinite_run=zero, nonfinite_total=zero, halted=jnp.zeros([], jnp.bool_))


def _value_and_grad(loss_fn, params, batch_stats, inputs, targets, rng, accum_steps, micro_sharding):
  """(loss, new batch_stats, grads) of loss_fn(params, batch_stats, inputs, targets, key), accumulated."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, batch_stats), grads = grad_fn(params, batch_stats, inputs, targets, rng)
    return loss, batch_stats, grads

  def split(x):  # Strided: every device's rows in every micro-batch.
    x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  def accumulate(carry, xs):
    loss_sum, grad_sum, stats = carry
    index, chunk, chunk_targets = xs
    if micro_sharding is not None:
      chunk = jax.lax.with_sharding_constraint(chunk, micro_sharding)
    (loss, stats), grads = grad_fn(params, stats, chunk, chunk_targets, jax.random.fold_in(rng, index))
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads), stats), None

  zeros = (jnp.zeros([], jnp.float32), jax.tree.map(jnp.zeros_like, params), batch_stats)
  (loss, grads, batch_stats), _ = jax.lax.scan(
      accumulate, zeros, (jnp.arange(accum_steps), split(inputs), split(targets)))
  return loss / accum_steps, batch_stats, jax.tree.map(lambda g: g / accum_steps, grads)


def finetune_step(state: TrainState, batch: dict, frozen, *, model, tx, lr_fn, num_classes: int,
                  label_smoothing: float, mix: Callable, accum_steps: int, max_nonfinite: int, base_rng,
                  micro_sharding=None):
  """One fine-tuning step: smoothed targets, mixup / cutmix, drop path, AdamW with layer decay."""
  del frozen
  rng = jax.random.fold_in(base_rng, state.step)
  mix_key, drop_key = jax.random.split(rng)
  targets = smooth_one_hot(batch['label'], num_classes, label_smoothing)
  images, targets, _ = mix(mix_key, batch['image'], targets)

  def loss_fn(params, batch_stats, images, targets, key):
    logits = model.apply({'params': params}, images, train=True, rngs={'dropout': key})
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean(), batch_stats

  loss, _, grads = _value_and_grad(loss_fn, state.params, state.batch_stats, images, targets, drop_key,
                                   accum_steps, micro_sharding)
  new_state, grad_norm, finite = train_lib.guarded_update(state, loss, grads, tx, max_nonfinite,
                                                          batch_stats=state.batch_stats)
  return new_state, {'train/loss': loss, 'train/grad_norm': grad_norm, 'train/lr': lr_fn(state.step),
                     'train/skipped': (~finite).astype(jnp.float32)}


def linprobe_step(state: TrainState, batch: dict, encoder_params, *, head, feature_fn, tx, lr_fn,
                  num_classes: int, label_smoothing: float, accum_steps: int, max_nonfinite: int,
                  base_rng, micro_sharding=None):
  """One linear-probe step: frozen features (or precomputed ones), BatchNorm + Linear, LARS."""
  if 'features' in batch:
    features = batch['features']
  else:
    features = jax.lax.stop_gradient(feature_fn(encoder_params, batch['image']))
  targets = smooth_one_hot(batch['label'], num_classes, label_smoothing)

  def loss_fn(params, batch_stats, features, targets, key):
    del key
    logits, updates = head.apply({'params': params, 'batch_stats': batch_stats}, features, train=True,
                                 mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, updates['batch_stats']

  loss, batch_stats, grads = _value_and_grad(loss_fn, state.params, state.batch_stats, features, targets,
                                             jax.random.fold_in(base_rng, state.step), accum_steps,
                                             None)
  del micro_sharding
  new_state, grad_norm, finite = train_lib.guarded_update(state, loss, grads, tx, max_nonfinite,
                                                          batch_stats=batch_stats)
  logits = head.apply({'params': state.params, 'batch_stats': state.batch_stats}, features)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  return new_state, {'train/loss': loss, 'train/grad_norm': grad_norm, 'train/lr': lr_fn(state.step),
                     'train/skipped': (~finite).astype(jnp.float32), 'train/top1': accuracy}


# ----------------------------------------------------------------------------
# The loop shared by fine-tuning and linear probing.

@dataclasses.dataclass(frozen=True)
class _Task:
  """What differs between fine-tuning and linear probing."""
  kind: str
  init_fn: Callable  # rng -> TrainState
  step_fn: Callable  # (state, batch, frozen) -> (state, metrics)
  eval_fn: Callable  # (state, frozen) -> metrics dict
  batches_fn: Callable  # start_step -> local batches
  frozen: Any = None  # Encoder params (on the mesh) the step reads but does not train.
  # params (global arrays) -> params whose encoder leaves are the pretrained host arrays.
  pretrained: Callable | None = None
  saved_tree: Callable = lambda s: s.params  # What a checkpoint's 'params' item holds.
  from_saved: Callable = lambda saved: (saved, None)  # -> (params, batch_stats or None)


def _config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _write_config(config, workdir):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))


def _write_results(workdir, results: dict):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, RESULTS_FILE), 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=2, sort_keys=True)


def _eval_points(config, steps_per_epoch: int, total_steps: int) -> Callable[[int], bool]:
  every = int(config.get('eval_every_steps', -1))
  every = every if every > 0 else steps_per_epoch
  return lambda step: step % every == 0 or step == total_steps


def _run(config, workdir: str, mesh, task: _Task, total_steps: int, steps_per_epoch: int) -> dict:
  """Initialises or resumes, trains to total_steps with evals and checkpoints; returns the metrics."""
  init_rng = jax.random.key(config.seed)
  abstract_state = jax.eval_shape(task.init_fn, init_rng)
  rules = parallel.rules_from_config(config.mesh)
  min_fsdp = config.mesh.get('min_fsdp_size', 2**18)
  shardings = parallel.tree_shardings(abstract_state, mesh, rules, min_fsdp)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.get('keep_checkpoints', 2),
                                       every_steps=config.get('checkpoint_every_steps', 0))
  latest = checkpointer.latest_step()
  if latest is not None:
    saved_abstract = task.saved_tree(abstract_state)
    saved_shardings = task.saved_tree(shardings)
    saved, opt_state, meta = checkpointer.restore(
        ckpt_lib.abstract_like(saved_abstract, saved_shardings),
        ckpt_lib.abstract_like(abstract_state.opt_state, shardings.opt_state), latest)
    params, batch_stats = task.from_saved(saved)
    put = lambda v, s: host_to_global(np.asarray(v, np.int32), s)
    state = TrainState(
        step=put(meta['step'], shardings.step), params=params, opt_state=opt_state,
        batch_stats=batch_stats if batch_stats is not None else abstract_state.batch_stats,
        nonfinite_run=put(meta.get('nonfinite_run', 0), shardings.nonfinite_run),
        nonfinite_total=put(meta.get('nonfinite_total', 0), shardings.nonfinite_total),
        halted=host_to_global(np.zeros([], np.bool_), shardings.halted))
    logging.info('Resumed %s from checkpoint step %d', task.kind, meta['step'])
  else:
    with jax.set_mesh(mesh):
      state = jax.jit(task.init_fn, out_shardings=shardings)(init_rng)
    if task.pretrained is not None:
      # Leaf by leaf: the pretrained encoder's host arrays go into their shardings, the rest stays
      # as initialised. Nothing is fetched: with FSDP over hosts no process holds all of a param.
      params = task.pretrained(state.params)
      state = state.replace(params=place_tree(params, shardings.params))
  start_step = int(jax.device_get(state.step))
  _write_config(config, workdir)
  writer = metrics_lib.create_writer(workdir)
  frozen = task.frozen
  frozen_shardings = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)

  batch_sharding = parallel.batch_sharding(mesh)
  jit_step = jax.jit(task.step_fn, in_shardings=(shardings, batch_sharding, frozen_shardings),
                     out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
  batches = prefetch_to_mesh(task.batches_fn(start_step), mesh, config.dataset.get('prefetch', 2))
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  is_eval_step = _eval_points(config, steps_per_epoch, total_steps)
  preemption = train_lib.PreemptionFlag(config.get('preemption_sync_every_steps', 10)).install()
  pending, last, status, evals = [], {}, 'done', {}
  timer_step, timer_start = start_step, None
  step = start_step
  max_nonfinite = config.get('max_nonfinite_steps', 10)
  try:
    with jax.set_mesh(mesh):
      while step < total_steps:
        state, step_metrics = jit_step(state, next(batches), frozen)
        pending.append(step_metrics)
        step += 1
        report(step)
        if timer_start is None:  # The first step includes compilation: time from its end.
          jax.block_until_ready(step_metrics)
          timer_step, timer_start = step, time.time()
        if step % config.log_every_steps == 0 or step == total_steps:
          fetched = jax.device_get(pending)
          last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
          last['train/lr'] = float(fetched[-1]['train/lr'])
          last['train/nonfinite_total'] = float(jax.device_get(state.nonfinite_total))
          if step > timer_step:
            seconds = time.time() - timer_start
            last['perf/images_per_sec'] = (step - timer_step) * config.batch_size / seconds
            last['perf/step_time_sec'] = seconds / (step - timer_step)
          writer.write_scalars(step, last)
          pending, timer_step, timer_start = [], step, time.time()
          if bool(jax.device_get(state.halted)):
            raise train_lib.NonFiniteLossError(
                f'{max_nonfinite} consecutive steps had a non-finite loss or gradients (at step {step}); '
                f'the last good checkpoint is step {checkpointer.latest_step()}. Lower optim.base_lr, '
                'set optim.grad_clip_norm, or check the input data.')
        if is_eval_step(step):
          eval_start = time.time()
          evals = task.eval_fn(state, frozen)
          evals['eval/best_top1'] = max(evals['eval/top1'], _best_so_far(workdir, evals['eval/top1']))
          writer.write_scalars(step, evals)
          logging.info('Step %d: eval top-1 %.4f top-5 %.4f (%.1f s)', step, evals['eval/top1'],
                       evals['eval/top5'], time.time() - eval_start)
          timer_start = time.time() if timer_start is not None else None
        if train_lib.save_or_stop(
            checkpointer, preemption, step, total_steps, state.halted,
            lambda: checkpointer.save(step, task.saved_tree(state), state.opt_state,
                                      _meta(state, config, evals))):
          status = 'preempted'
          break
  finally:
    preemption.uninstall()
    checkpointer.close()
    writer.flush()
  if status == 'done' and not evals:  # Resumed at the end: evaluate the final state again.
    with jax.set_mesh(mesh):
      evals = task.eval_fn(state, frozen)
  result = {**last, **evals, 'status': status, 'step': step}
  if status == 'done':
    _write_results(workdir, {**result, 'downstream': task.kind})
  return result


def _best_so_far(workdir: str, default: float) -> float:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return default
  values = [r['eval/top1'] for r in metrics_lib.read_jsonl(path) if 'eval/top1' in r]
  return max(values, default=default)


def _meta(state: TrainState, config, evals: dict) -> dict:
  return {'step': int(jax.device_get(state.step)),
          'nonfinite_run': int(jax.device_get(state.nonfinite_run)),
          'nonfinite_total': int(jax.device_get(state.nonfinite_total)),
          'downstream': _kind(config), 'eval': {k: float(v) for k, v in evals.items()},
          'config': _config_dict(config)}


def _evaluate(eval_step, batches, mesh, *args) -> dict:
  """Sums eval_step(*args, batch) counts over padded global batches."""
  totals = None
  for batch in prefetch_to_mesh(batches, mesh):
    counts = eval_step(*args, batch)
    totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
  if totals is None:
    raise ValueError('the eval split is empty: check dataset.eval_split')
  return summarize_counts(jax.device_get(totals))


def make_optimizer(config, params, depth: int, steps_per_epoch: int, total_steps: int):
  """(optimizer, lr_fn) of config.optim for `params` (abstract is fine): layer decay over `depth`."""
  return optim.create_optimizer(config.optim, global_batch=config.batch_size, steps_per_epoch=steps_per_epoch,
                                total_steps=total_steps, params=params, depth=depth)


def _mixer(config, mesh) -> Callable:
  mixup, cutmix = float(config.get('mixup', 0.0)), float(config.get('cutmix', 0.0))
  accum = int(config.get('grad_accum_steps', 1))
  return functools.partial(
      mixup_cutmix, mixup_alpha=mixup, cutmix_alpha=cutmix, prob=float(config.get('mixup_prob', 1.0)),
      switch_prob=float(config.get('mixup_switch_prob', 0.5)), mode=config.get('mixup_mode', 'batch'),
      # One draw per data-parallel shard of each micro-batch: as one per GPU in the reference.
      num_groups=parallel.batch_axis_size(mesh) * accum)


# ----------------------------------------------------------------------------
# Fine-tuning.

def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fine-tunes the ViT classifier as configured; resumes from workdir; returns the last metrics.

  The result holds the last logged train metrics, eval/top1, eval/top5,
  eval/loss, eval/best_top1, 'status' ('done' or 'preempted') and 'step'.
  """
  jax.config.update('jax_threefry_partitionable', True)
  mesh = parallel.create_mesh(config.mesh)
  validate_config(config, mesh)
  num_classes = resolve_num_classes(config)
  model = build_classifier(config, num_classes)
  steps_per_epoch, total_steps = train_lib.train_steps(config, num_train_examples(config))
  size, channels = config.dataset.image_size, config.dataset.channels
  image_shape = (1, size, size, channels)
  abstract_params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(image_shape)))['params']
  tx, lr_fn = make_optimizer(config, abstract_params, model.encoder['depth'], steps_per_epoch, total_steps)
  logging.info('Fine-tuning %s on %s: %d classes, mesh %s, %d steps (%d per epoch), batch %d',
               config.model.name, config.dataset.name, num_classes, dict(mesh.shape), total_steps,
               steps_per_epoch, config.batch_size)

  def init_fn(rng):
    params = model.init({'params': rng}, jnp.zeros(image_shape))['params']
    return _new_state(params, {}, tx)

  pretrained = None
  if checkpoint_is_empty(workdir):
    encoder, source = load_pretrained_encoder(config)
    if encoder is not None:
      pretrained = functools.partial(merge_encoder, encoder=encoder, source=source)
    else:
      logging.warning('No pretrained_workdir / pretrained_path: fine-tuning from random weights')

  accum = int(config.get('grad_accum_steps', 1))
  step_fn = functools.partial(
      finetune_step, model=model, tx=tx, lr_fn=lr_fn, num_classes=num_classes,
      label_smoothing=float(config.get('label_smoothing', 0.0)), mix=_mixer(config, mesh),
      accum_steps=accum, max_nonfinite=config.get('max_nonfinite_steps', 10),
      base_rng=jax.random.fold_in(jax.random.key(config.seed), 1),
      micro_sharding=parallel.batch_sharding(mesh))
  eval_batch = _eval_batch(int(config.get('eval_batch_size', 0) or config.batch_size // accum), mesh)

  @jax.jit
  def eval_step(params, batch):
    logits = model.apply({'params': params}, batch['image'], train=False)
    return classification_counts(logits, batch['label'], batch['mask'])

  def eval_fn(state, frozen):
    del frozen
    batches = create_eval_iterator(config, num_classes, config.dataset.eval_split, eval_batch)
    return _evaluate(eval_step, batches, mesh, state.params)

  preprocess_fn = make_train_preprocess_fn(config)
  task = _Task(kind='finetune', init_fn=init_fn, step_fn=step_fn, eval_fn=eval_fn,
               batches_fn=lambda start: create_train_iterator(config, num_classes, start, preprocess_fn),
               pretrained=pretrained)
  return _run(config, workdir, mesh, task, total_steps, steps_per_epoch)


def checkpoint_is_empty(workdir: str) -> bool:
  return ckpt_lib.latest_step(workdir) is None


# ----------------------------------------------------------------------------
# Linear probing.

def linear_probe(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains BatchNorm + Linear on the frozen encoder's features (LARS); resumes; returns metrics.

  With config.probe_cached_features=True the encoder runs once over the train
  split with the eval transform (no augmentation) and the head trains on those
  features: much faster, but without the recipe's RandomResizedCrop + flip.
  Evaluations then also report kNN of the same features (eval/knn_top1,
  eval/knn_top5; config.knn.k and temperature) against the train-split bank.
  """
  jax.config.update('jax_threefry_partitionable', True)
  mesh = parallel.create_mesh(config.mesh)
  validate_config(config, mesh)
  num_classes = resolve_num_classes(config)
  feature_fn, encoder = probe_feature_fn(config)
  head = ProbeHead(num_classes=num_classes, batchnorm=bool(config.get('head_batchnorm', True)),
                   batchnorm_eps=float(config.get('head_batchnorm_eps', 1e-6)),
                   init_std=float(config.get('head_init_std', 0.01)))
  num_examples = num_train_examples(config)
  steps_per_epoch, total_steps = train_lib.train_steps(config, num_examples)
  size, channels = config.dataset.image_size, config.dataset.channels
  image_shape = (1, size, size, channels)

  encoder_params, source = load_pretrained_encoder(config)
  abstract_encoder = jax.eval_shape(lambda: encoder.init(jax.random.key(0), jnp.zeros(image_shape)))['params']
  source = source or f'random init, seed {config.seed}'
  if encoder_params is None:
    logging.warning('No pretrained_workdir / pretrained_path: probing a randomly initialised encoder')
    encoder_params = init_on_mesh(lambda: encoder.init(jax.random.fold_in(jax.random.key(config.seed), 2),
                                                       jnp.zeros(image_shape))['params'], config, mesh)
  else:
    encoder_params = merge_encoder({'encoder': abstract_encoder}, encoder_params, source)['encoder']
    encoder_params = place_on_mesh(encoder_params, config, mesh)
  width = encoder.embed_dim
  abstract_head = jax.eval_shape(lambda: head.init(jax.random.key(0), jnp.zeros((2, width))))
  tx, lr_fn = make_optimizer(config, abstract_head['params'], encoder.depth, steps_per_epoch, total_steps)
  logging.info('Linear probe of %s on %s: %d classes, mesh %s, %d steps (%d per epoch), batch %d',
               config.model.name, config.dataset.name, num_classes, dict(mesh.shape), total_steps,
               steps_per_epoch, config.batch_size)

  def init_fn(rng):
    variables = head.init(rng, jnp.zeros((2, width)))
    return _new_state(variables['params'], variables.get('batch_stats', {}), tx)

  accum = int(config.get('grad_accum_steps', 1))
  step_fn = functools.partial(
      linprobe_step, head=head, feature_fn=feature_fn, tx=tx, lr_fn=lr_fn, num_classes=num_classes,
      label_smoothing=float(config.get('label_smoothing', 0.0)), accum_steps=accum,
      max_nonfinite=config.get('max_nonfinite_steps', 10),
      base_rng=jax.random.fold_in(jax.random.key(config.seed), 1))
  eval_batch = _eval_batch(int(config.get('eval_batch_size', 0) or config.batch_size // accum), mesh)
  cached = bool(config.get('probe_cached_features', False))
  features_cache, knn_cache = {}, {}
  encode = jax.jit(feature_fn)

  def cached_features(split):
    if split not in features_cache:
      path = os.path.join(workdir, 'features', re.sub(r'[^A-Za-z0-9_.-]+', '_', split) + '.npz')
      saved = _load_features(path, source)
      if saved is not None:
        features_cache[split] = saved
        return saved
      start = time.time()
      batches = create_eval_iterator(config, num_classes, split, eval_batch)
      features_cache[split] = extract_features(encode, encoder_params, batches, mesh)
      logging.info('Encoded %d examples of %s in %.1f s', len(features_cache[split][1]), split,
                   time.time() - start)
      _save_features(path, source, *features_cache[split])
    return features_cache[split]

  @jax.jit
  def eval_step(params, batch_stats, encoder_params, batch):
    features = batch['features'] if 'features' in batch else feature_fn(encoder_params, batch['image'])
    logits = head.apply({'params': params, 'batch_stats': batch_stats}, features)
    return classification_counts(logits, batch['label'], batch['mask'])

  def eval_fn(state, frozen):
    if not cached:
      batches = create_eval_iterator(config, num_classes, config.dataset.eval_split, eval_batch)
      return _evaluate(eval_step, batches, mesh, state.params, state.batch_stats, frozen)
    features, labels = cached_features(config.dataset.eval_split)
    metrics = _evaluate(eval_step, _feature_batches(features, labels, eval_batch), mesh, state.params,
                        state.batch_stats, frozen)
    if 'eval/knn_top1' not in knn_cache:  # The same features, for free: kNN (config.knn.k, temperature).
      knn = knn_settings(config)
      bank, bank_labels = cached_features(config.dataset.train_split)
      scores = knn_classify(bank, bank_labels, features, num_classes=num_classes, k=knn['k'],
                            temperature=knn['temperature'])
      knn_cache.update({f'eval/knn_{k}': v for k, v in topk_accuracy(scores, labels).items()})
    return {**metrics, **knn_cache}

  def batches_fn(start_step):
    if not cached:
      return create_train_iterator(config, num_classes, start_step, make_train_preprocess_fn(config))
    features, labels = cached_features(config.dataset.train_split)
    return _shuffled_feature_batches(features, labels, config.batch_size, config.seed, start_step)

  task = _Task(kind='linprobe', init_fn=init_fn, step_fn=step_fn, eval_fn=eval_fn, batches_fn=batches_fn,
               frozen=encoder_params,
               saved_tree=lambda s: {'params': s.params, 'batch_stats': s.batch_stats},
               from_saved=lambda saved: (saved['params'], saved['batch_stats']))
  return _run(config, workdir, mesh, task, total_steps, steps_per_epoch)


def _save_features(path: str, source: str, features, labels):
  """Keeps encoded features in the workdir so a resumed probe does not encode again."""
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path + '.tmp.npz', features=features, labels=labels, source=np.asarray(source))
    os.replace(path + '.tmp.npz', path)


def _load_features(path: str, source: str):
  """(features, labels) saved by _save_features from the same encoder, else None."""
  if not os.path.exists(path):
    return None
  with np.load(path) as saved:
    if str(saved['source']) != source:
      return None
    return saved['features'], saved['labels']


def place_on_mesh(params, config, mesh):
  """Host params (the same on every process) sharded by the config's partition rules (FSDP for large
  tensors); each process builds only its own shards, so the mesh may span processes."""
  return place_tree(params, config_shardings(params, config, mesh))


def _feature_batches(features, labels, batch_size: int):
  """Padded local batches {'features', 'label', 'mask'} of this process's rows of (features, labels)."""
  local = batch_size // jax.process_count()
  per_process = -(-len(labels) // jax.process_count())
  start = jax.process_index() * per_process
  features, labels = features[start:start + per_process], labels[start:start + per_process]
  for i in range(0, per_process, local):
    f, y = features[i:i + local], labels[i:i + local]
    pad = local - len(y)
    yield {'features': np.concatenate([f, np.zeros((pad, features.shape[1]), np.float32)]),
           'label': np.concatenate([y, np.full((pad,), -1, np.int32)]),
           'mask': np.arange(local) < len(y)}


def _shuffled_feature_batches(features, labels, batch_size: int, seed: int, start_step: int):
  """Endless local batches of precomputed features: epoch e is permutation (seed, e); resumable."""
  count = len(labels)
  local = batch_size // jax.process_count()
  position = start_step * batch_size
  while True:
    epoch, offset = divmod(position, count)
    order = np.random.default_rng([seed, epoch]).permutation(count)
    rows = [order[offset:offset + batch_size]]
    while sum(len(r) for r in rows) < batch_size:
      epoch += 1
      rows.append(np.random.default_rng([seed, epoch]).permutation(count))
    rows = np.concatenate(rows)[:batch_size]
    rows = rows[jax.process_index() * local:(jax.process_index() + 1) * local]
    yield {'features': features[rows], 'label': labels[rows]}
    position += batch_size


# ----------------------------------------------------------------------------
# kNN of a pretrained encoder.

def run_knn(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """kNN top-1 / top-5 of the pretrained encoder's frozen features (config.knn.*); writes results.json."""
  jax.config.update('jax_threefry_partitionable', True)
  mesh = parallel.create_mesh(config.mesh)
  num_classes = resolve_num_classes(config)
  knn = knn_settings(config)
  encoder = build_encoder(config)
  size, channels = config.dataset.image_size, config.dataset.channels
  encoder_params, source = load_pretrained_encoder(config)
  abstract = jax.eval_shape(lambda: encoder.init(jax.random.key(0), jnp.zeros((1, size, size, channels))))
  if encoder_params is None:
    logging.warning('No pretrained_workdir / pretrained_path: kNN of a randomly initialised encoder')
    encoder_params = init_on_mesh(lambda: encoder.init(jax.random.fold_in(jax.random.key(config.seed), 2),
                                                       jnp.zeros((1, size, size, channels)))['params'],
                                  config, mesh)
  else:
    encoder_params = merge_encoder({'encoder': abstract['params']}, encoder_params, source)['encoder']
    encoder_params = place_on_mesh(encoder_params, config, mesh)

  def encode_fn(params, images):
    return pool_tokens(encoder.apply({'params': params}, images)[0], knn['pool'])

  monitor = KnnMonitor(None, config, mesh, encode_fn=encode_fn, num_classes=num_classes)
  start = time.time()
  result = monitor(encoder_params)
  result['eval/knn_seconds'] = time.time() - start
  writer = metrics_lib.create_writer(workdir)
  writer.write_scalars(0, result)
  writer.flush()
  _write_config(config, workdir)
  out = {**result, 'status': 'done', 'step': 0}
  _write_results(workdir, {**out, 'downstream': 'knn', 'knn': knn})
  return out


# ----------------------------------------------------------------------------
# Entry points.

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs what config.downstream names: finetune, linprobe or knn."""
  kind = _kind(config)
  if kind == 'finetune':
    return finetune(config, workdir)
  if kind == 'linprobe':
    return linear_probe(config, workdir)
  return run_knn(config, workdir)


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top

  from mae_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  flags = main_lib.FLAGS
  main_lib.maybe_initialize_distributed(flags.coordinator_address, flags.num_processes, flags.process_id)
  result = train_and_evaluate(flags.config, flags.workdir)
  logging.info('Finished: %s', result)
  if jax.process_index() == 0:
    shown = {k: v for k, v in result.items() if k.startswith('eval/') or k in ('status', 'step')}
    print(json.dumps(shown, sort_keys=True))
  if result.get('status') == 'preempted':
    sys.exit(main_lib.PREEMPTED_EXIT_CODE)


def run():
  """Console-script entry point: mae-jax-downstream --config=... --workdir=..."""
  from absl import app  # pylint: disable=g-import-not-at-top

  from configs import common  # pylint: disable=g-import-not-at-top
  from mae_jax import main as main_lib  # pylint: disable=g-import-not-at-top  # Defines the flags.
  del main_lib
  app.run(main, flags_parser=common.parse_flags)


if __name__ == '__main__':
  run()
