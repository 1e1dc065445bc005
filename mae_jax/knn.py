"""Weighted kNN of frozen encoder features: the pretraining monitor and `downstream=knn`.

Cosine similarity, votes exp(sim / T) of the k nearest (DINO's evaluation:
config.knn.k = 20, temperature 0.07). `KnnMonitor` is built once (checking its
settings and splits before training starts) and called with the current params;
`run_knn` evaluates a pretrained encoder and writes results.json.
"""

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mae_jax import data, loop, metrics, parallel, train_state
from mae_jax.data import input_pipeline, inputs, sources
from mae_jax.models import from_config
from mae_jax.weights import pretrained

POOLS = ('cls', 'mean')
# What config.knn holds (configs/default.py declares each with its default).
KNN_KEYS = ('k', 'temperature', 'train_examples', 'eval_examples', 'pool', 'batch_size')
# Labelled synthetic data has this many classes when the config leaves num_classes at 0.
SYNTHETIC_NUM_CLASSES = 10


def knn_settings(config, **overrides) -> dict:
  """config.knn with `overrides`, checked: the keys are KNN_KEYS, the values in range."""
  knn = config.knn.to_dict()
  for what, keys in (('config.knn', knn), ('kNN settings', overrides)):
    unknown = sorted(set(keys) - set(KNN_KEYS))
    if unknown:
      raise ValueError(f'{what} has unknown keys {unknown}; known: {sorted(KNN_KEYS)}')
  missing = sorted(set(KNN_KEYS) - set(knn))
  if missing:
    raise ValueError(f'config.knn lacks {missing}: declare them (configs/default.py declares every kNN key)')
  knn.update(overrides)
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


def extract_features(encode_fn, params, batches, mesh=None, max_examples: int = -1, *,
                     max_corrupt_fraction: float = 1.0, what: str = 'the split'):
  """Runs encode_fn(params, images) -> [B, D] over padded batches; returns (features, labels).

  `batches` yields {'image', 'label', 'mask'?, 'corrupt'?} local batches; only
  rows with mask True are kept, in order, and at most `max_examples` (<= 0:
  all). Rows flagged corrupt (undecodable images) are counted: a warning
  naming `what`, an error above `max_corrupt_fraction` of the images read.
  """
  mesh = mesh or parallel.data_parallel_mesh()
  encode = encode_fn if hasattr(encode_fn, 'lower') else jax.jit(encode_fn)
  devices = set(mesh.devices.flat)

  def on_mesh(x):  # Host or single-device arrays: replicated over the mesh.
    if isinstance(x, jax.Array) and x.sharding.device_set == devices:
      return x
    return parallel.host_to_global(x, parallel.replicated(mesh))

  params = jax.tree.map(on_mesh, params)
  features, labels, count, corrupt = [], [], 0, 0
  with train_state.mesh_context(mesh):
    for local in batches:
      local = dict(local)
      local.setdefault('mask', np.ones(len(local['label']), bool))
      batch = parallel.global_batch_from_local(local, mesh)
      out = encode(params, batch['image'])
      mask = _to_host(batch['mask']).astype(bool)
      features.append(_to_host(out)[mask])
      labels.append(_to_host(batch['label'])[mask])
      count += int(mask.sum())
      if 'corrupt' in batch:
        corrupt += int(_to_host(batch['corrupt']).sum())
      if 0 < max_examples <= count:
        break
  loop.check_eval_corrupt(corrupt, count + corrupt, max_corrupt_fraction, what)
  features = np.concatenate(features) if features else np.zeros((0, 0), np.float32)
  labels = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
  if max_examples > 0:
    features, labels = features[:max_examples], labels[:max_examples]
  return features.astype(np.float32), labels.astype(np.int32)


@functools.partial(jax.jit, static_argnames=('num_classes', 'k'))
def _knn_scores(train_features, train_labels, eval_features, temperature, *, num_classes, k):
  # [E, N] cosine similarities, in float32 on every backend (a TPU's default is one bfloat16 pass, which
  # reorders near neighbours).
  sims = jnp.matmul(eval_features, train_features.T, precision=jax.lax.Precision.HIGHEST)
  top_sims, top_index = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)
  votes = jax.nn.one_hot(train_labels[top_index], num_classes) * weights[..., None]
  return votes.sum(axis=1)  # [E, num_classes]


# Bytes of one chunk's [queries, bank] similarities: a bank of ImageNet's 1.28M images takes 104 queries a
# chunk, where 1024 would need 5.2 GB next to the bank on one device.
SIMILARITY_BYTES = 512 * 2**20


def knn_classify(train_features, train_labels, eval_features, *, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
  """Class scores [E, num_classes] of weighted kNN: cosine similarity, votes exp(sim / T).

  Queries go `chunk` at a time, fewer when their similarities to the whole bank would exceed
  SIMILARITY_BYTES.
  """
  def normalize(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  if len(train_features) == 0:
    raise ValueError('kNN needs at least one training example')
  k = min(k, len(train_features))
  chunk = max(1, min(chunk, SIMILARITY_BYTES // (4 * len(train_features))))
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
             mesh=None, max_corrupt_fraction: float = 1.0, splits=('the train split', 'the eval split')) -> dict:
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
    max_corrupt_fraction, splits: undecodable images of the two iterators
      (named by `splits`) are left out with a warning, an error above this share.

  Returns:
    {'top1', 'top5', 'num_train', 'num_eval'}.
  """
  train_features, train_labels = extract_features(encode_fn, params, train_iter, mesh, max_train_examples,
                                                  max_corrupt_fraction=max_corrupt_fraction, what=splits[0])
  eval_features, eval_labels = extract_features(encode_fn, params, eval_iter, mesh, max_eval_examples,
                                                max_corrupt_fraction=max_corrupt_fraction, what=splits[1])
  scores = knn_classify(train_features, train_labels, eval_features, num_classes=num_classes, k=k,
                        temperature=temperature)
  return {**topk_accuracy(scores, eval_labels), 'num_train': len(train_labels),
          'num_eval': len(eval_labels)}


def monitor_num_classes(config) -> int:
  """The classes of the config's labelled data (config.num_classes; synthetic data: 10 when 0)."""
  if config.dataset.name == inputs.SYNTHETIC and config.num_classes <= 0:
    return SYNTHETIC_NUM_CLASSES
  return inputs.resolve_num_classes(config)


class KnnMonitor:
  """kNN top-1 / top-5 of a model's frozen features, for pretraining to call every N steps.

  Build it once (it compiles the encoder once), call it with the current params:

    monitor = knn.KnnMonitor(model, config, mesh)
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
    self.num_classes = num_classes or monitor_num_classes(config)
    self.synthetic = config.dataset.name == inputs.SYNTHETIC
    limits = {}  # (split, examples) of the bank and the queries.
    for which in ('train', 'eval'):
      split, count = config.dataset[f'{which}_split'], self.settings[f'{which}_examples']
      if not self.synthetic:
        try:
          size = input_pipeline.num_examples(config.dataset, split)
        except ValueError as e:
          raise ValueError(f'kNN monitor: dataset.{which}_split: {e}') from None
        if size == 0:
          raise ValueError(f'kNN monitor: dataset.{which}_split={split!r} of {config.dataset.name!r} '
                           'has no examples')
        if count >= size:  # 'train[:10000]' of a smaller split is not a valid TFDS split.
          count = -1
      limits[which] = (split, count)
    # The splits read, as absolute slices: the same examples for any number of processes.
    split_infos = None if self.synthetic else sources.get_builder(config.dataset).info.splits
    self.splits = {which: inputs.limited_split(split, count, split_infos) for which, (split, count) in limits.items()}
    pool = self.settings['pool']
    if encode_fn is None:
      def encode_fn(params, images):
        return pool_tokens(model.apply({'params': params}, images, method=model.encode), pool)
    self.encode_fn = jax.jit(encode_fn)
    self.batch_size = parallel.eval_batch_size(int(self.settings['batch_size']), self.mesh)

  def _batches(self, which: str):
    split = self.config.dataset[f'{which}_split'] if self.synthetic else self.splits[which]
    return inputs.create_eval_iterator(self.config, self.num_classes, split, self.batch_size)

  def __call__(self, params, prefix: str = 'eval/knn_') -> dict:
    start = time.time()
    s = self.settings
    result = knn_eval(self.encode_fn, params, self._batches('train'), self._batches('eval'),
                      num_classes=self.num_classes, k=s['k'], temperature=s['temperature'],
                      max_train_examples=s['train_examples'], max_eval_examples=s['eval_examples'],
                      mesh=self.mesh, max_corrupt_fraction=self.config.dataset.max_corrupt_fraction,
                      splits=tuple(f'the kNN {role} (dataset.{which}_split)'
                                   for role, which in (('bank', 'train'), ('queries', 'eval'))))
    logging.info('kNN (k=%d, T=%g, %s pooling) on %d train / %d eval examples: top-1 %.4f (%.1f s)',
                 s['k'], s['temperature'], s['pool'], result['num_train'], result['num_eval'],
                 result['top1'], time.time() - start)
    return {f'{prefix}top1': result['top1'], f'{prefix}top5': result['top5']}


def pixel_knn(config, mesh=None) -> float:
  """kNN top-1 of raw pixels (the eval transform's), on the bank and queries of the kNN monitor of `config`."""
  flatten = lambda params, images: images.reshape(images.shape[0], -1)
  return KnnMonitor(None, config, mesh, encode_fn=flatten)(None, prefix='')['top1']


def knn_monitor(model, params, config, mesh=None, **overrides) -> dict:
  """One kNN evaluation: {'eval/knn_top1', 'eval/knn_top5'} (compiles each call; see KnnMonitor)."""
  return KnnMonitor(model, config, mesh, **overrides)(params)


def frozen_encoder_params(config, encoder, mesh):
  """(params on the mesh, source) of the frozen encoder: pretrained, else random (seed) with a warning."""
  images = jnp.zeros((1, *data.image_shape(config)))
  encoder_params, source = pretrained.load_pretrained_encoder(config)
  if encoder_params is None:
    logging.warning('No pretrained_workdir / pretrained_path: a randomly initialised encoder (seed %d)',
                    config.seed)
    init = lambda: encoder.init(jax.random.fold_in(jax.random.key(config.seed), 2), images)['params']
    return parallel.init_on_mesh(init, config, mesh), f'random init, seed {config.seed}'
  abstract = jax.eval_shape(lambda: encoder.init(jax.random.key(0), images))['params']
  encoder_params = pretrained.merge_encoder({'encoder': abstract}, encoder_params, source)['encoder']
  return parallel.place_on_mesh(encoder_params, config, mesh), source


def run_knn(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """kNN top-1 / top-5 of the pretrained encoder's frozen features (config.knn.*); writes results.json."""
  jax.config.update('jax_threefry_partitionable', True)
  mesh = parallel.create_mesh(config.mesh)
  inputs.check_input(config)
  num_classes = inputs.resolve_num_classes(config)
  knn = knn_settings(config)
  encoder = from_config.build_encoder(config)
  encoder_params, _ = frozen_encoder_params(config, encoder, mesh)

  def encode_fn(params, images):
    return pool_tokens(encoder.apply({'params': params}, images)[0], knn['pool'])

  monitor = KnnMonitor(None, config, mesh, encode_fn=encode_fn, num_classes=num_classes)
  start = time.time()
  result = monitor(encoder_params)
  result['eval/knn_seconds'] = time.time() - start
  writer = metrics.create_writer(workdir, -1, config)  # Step 0 again replaces an earlier run's.
  writer.write_scalars(0, result)
  writer.flush()
  loop.write_config(config, workdir)
  out = {**result, 'status': 'done', 'step': 0}
  loop.write_results(workdir, {**out, 'downstream': 'knn', 'knn': knn})
  return out
