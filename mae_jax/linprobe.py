r"""Linear probing of a frozen MAE encoder (config.downstream='linprobe').

  python -m mae_jax.main --config=configs/linprobe.py:variant=L/16 \
    --config.pretrained_workdir=PRETRAIN_DIR --workdir=PROBE_DIR

BatchNorm (no affine, eps 1e-6) + Linear on the frozen encoder's cls token
(after its final norm), LARS. A probe checkpoint holds only what trains:
{'params': {'head': ...}, 'batch_stats': {'head_bn': ...}}; the frozen encoder
is re-read from the pretrained source recorded in its config.
"""

import functools
import re
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mae_jax import fileio, knn, parallel, supervised, train_state
from mae_jax.data import augment, inputs
from mae_jax.models import from_config, vit


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
    return nn.Dense(self.num_classes, kernel_init=vit.head_init(self.init_std),
                    name='head')(x)


def probe_feature_fn(config) -> tuple[Callable, vit.VisionTransformer]:
  """(fn(encoder_params, images) -> [B, D], encoder): the frozen features the linear probe reads.

  global_pool=False (the recipe): the cls token after the encoder's final norm.
  global_pool=True: as the reference, the mean of the patch tokens before the
  final norm, through a fresh (frozen, so parameter-free) LayerNorm.
  """
  global_pool = bool(config.global_pool)
  encoder = from_config.build_encoder(config, final_norm=not global_pool)

  def feature_fn(encoder_params, images):
    tokens, _ = encoder.apply({'params': encoder_params}, images, train=False)
    if not global_pool:
      return knn.pool_tokens(tokens, 'cls')
    pooled = knn.pool_tokens(tokens, 'mean')
    mean = pooled.mean(axis=-1, keepdims=True)
    var = pooled.var(axis=-1, keepdims=True)
    return (pooled - mean) * jax.lax.rsqrt(var + vit.LAYER_NORM_EPS)

  return feature_fn, encoder


def linprobe_step(state: train_state.TrainState, batch: dict, encoder_params, *, head, feature_fn, tx, lr_fn,
                  num_classes: int, label_smoothing: float, accum_steps: int, max_nonfinite: int,
                  base_rng):
  """One linear-probe step: frozen features (or precomputed ones), BatchNorm + Linear, LARS."""
  if 'features' in batch:
    features = batch['features']
  else:
    features = jax.lax.stop_gradient(feature_fn(encoder_params, batch['image']))
  targets = augment.smooth_one_hot(batch['label'], num_classes, label_smoothing)

  def loss_fn(params, batch_stats, features, targets, key):
    del key
    logits, updates = head.apply({'params': params, 'batch_stats': batch_stats}, features, train=True,
                                 mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, updates['batch_stats']

  loss, batch_stats, grads = train_state.value_and_grad(
      loss_fn, state.params, state.batch_stats, (features, targets), jax.random.fold_in(base_rng, state.step),
      accum_steps)
  new_state, grad_norm, finite = train_state.guarded_update(state, loss, grads, tx, max_nonfinite,
                                                            batch_stats=batch_stats)
  logits = head.apply({'params': state.params, 'batch_stats': state.batch_stats}, features)
  metrics = train_state.step_metrics(loss, grad_norm, finite, lr_fn(state.step), batch)
  metrics['train/top1'] = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  return new_state, metrics


# ----------------------------------------------------------------------------
# Features encoded once (probe_cached_features=True), kept in the workdir.

def _save_features(path: str, source: str, features, labels):
  """Keeps encoded features in the workdir so a resumed probe does not encode again."""
  if jax.process_index() == 0:
    fileio.save_npz(path, features=features, labels=labels, source=np.asarray(source))


def _load_features(path: str, source: str):
  """(features, labels) saved by _save_features from the same encoder, else None."""
  if not fileio.exists(path):
    return None
  saved = fileio.load_npz(path)
  if str(saved['source']) != source:
    return None
  return saved['features'], saved['labels']


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
# The probe.

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
  supervised.validate_config(config, mesh)
  config = supervised.pin_pretrained_step(config, workdir)  # A resumed probe keeps its encoder.
  inputs.check_input(config)
  inputs.check_eval_split(config)
  num_classes = inputs.resolve_num_classes(config)
  feature_fn, encoder = probe_feature_fn(config)
  head = ProbeHead(num_classes=num_classes, batchnorm=bool(config.head_batchnorm),
                   batchnorm_eps=float(config.head_batchnorm_eps), init_std=float(config.head_init_std))
  steps_per_epoch, total_steps = train_state.train_steps(config, inputs.num_train_examples(config))
  encoder_params, source = knn.frozen_encoder_params(config, encoder, mesh)
  width = encoder.embed_dim
  abstract_head = jax.eval_shape(lambda: head.init(jax.random.key(0), jnp.zeros((2, width))))
  tx, lr_fn = supervised.make_optimizer(config, abstract_head['params'], encoder.depth, steps_per_epoch,
                                        total_steps)
  logging.info('Linear probe of %s on %s: %d classes, mesh %s, %d steps (%d per epoch), batch %d',
               config.model.name, config.dataset.name, num_classes, dict(mesh.shape), total_steps,
               steps_per_epoch, config.batch_size)

  def init_fn(rng):
    variables = head.init(rng, jnp.zeros((2, width)))
    return train_state.new_state(variables['params'], tx, variables.get('batch_stats', {}))

  step_fn = functools.partial(
      linprobe_step, head=head, feature_fn=feature_fn, tx=tx, lr_fn=lr_fn, num_classes=num_classes,
      label_smoothing=float(config.label_smoothing), accum_steps=config.grad_accum_steps,
      max_nonfinite=config.max_nonfinite_steps, base_rng=jax.random.fold_in(jax.random.key(config.seed), 1))
  eval_batch = supervised.eval_batch_size(config, mesh)
  cached = bool(config.probe_cached_features)
  features_cache, knn_cache = {}, {}
  encode = jax.jit(feature_fn)

  def cached_features(split):
    if split not in features_cache:
      path = fileio.join(workdir, 'features', re.sub(r'[^A-Za-z0-9_.-]+', '_', split) + '.npz')
      saved = _load_features(path, source)
      if saved is not None:
        features_cache[split] = saved
        return saved
      start = time.time()
      batches = inputs.create_eval_iterator(config, num_classes, split, eval_batch)
      features_cache[split] = knn.extract_features(
          encode, encoder_params, batches, mesh, max_corrupt_fraction=config.dataset.max_corrupt_fraction,
          what=f'split {split!r}')
      logging.info('Encoded %d examples of %s in %.1f s', len(features_cache[split][1]), split,
                   time.time() - start)
      _save_features(path, source, *features_cache[split])
    return features_cache[split]

  @jax.jit
  def eval_step(params, batch_stats, encoder_params, batch):
    features = batch['features'] if 'features' in batch else feature_fn(encoder_params, batch['image'])
    logits = head.apply({'params': params, 'batch_stats': batch_stats}, features)
    return supervised.classification_counts(logits, batch['label'], batch['mask'], batch.get('corrupt'))

  def eval_fn(state, frozen):
    if not cached:
      batches = inputs.create_eval_iterator(config, num_classes, config.dataset.eval_split, eval_batch)
      return supervised.evaluate(eval_step, batches, mesh, state.params, state.batch_stats, frozen, config=config)
    features, labels = cached_features(config.dataset.eval_split)
    metrics = supervised.evaluate(eval_step, _feature_batches(features, labels, eval_batch), mesh,
                                  state.params, state.batch_stats, frozen)
    if 'eval/knn_top1' not in knn_cache:  # The same features, for free: kNN (config.knn.k, temperature).
      settings = knn.knn_settings(config)
      bank, bank_labels = cached_features(config.dataset.train_split)
      scores = knn.knn_classify(bank, bank_labels, features, num_classes=num_classes, k=settings['k'],
                                temperature=settings['temperature'])
      knn_cache.update({f'eval/knn_{k}': v for k, v in knn.topk_accuracy(scores, labels).items()})
    return {**metrics, **knn_cache}

  def batches_fn(start_step):
    if not cached:
      return inputs.create_train_iterator(config, num_classes, start_step,
                                          inputs.make_train_preprocess_fn(config))
    features, labels = cached_features(config.dataset.train_split)
    return _shuffled_feature_batches(features, labels, config.batch_size, config.seed, start_step)

  task = supervised.Task(kind='linprobe', init_fn=init_fn, step_fn=step_fn, eval_fn=eval_fn,
                         batches_fn=batches_fn, frozen=encoder_params, meta=supervised.pretrained_record(config),
                         saved_tree=lambda s: {'params': s.params, 'batch_stats': s.batch_stats},
                         from_saved=lambda saved: (saved['params'], saved['batch_stats']))
  return supervised.run(config, workdir, mesh, task, total_steps, steps_per_epoch)
