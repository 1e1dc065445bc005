"""Frozen-feature evaluation of the Fashion-MNIST study: one protocol for raw pixels and any encoder.

Every row (raw pixels, the encoder with random weights, the MAE encoder) is
measured the same way:

* features of all 60,000 training images and the 10,000 test images, each
  image normalised as the training pipeline's eval transform does (28x28, no
  resize): (pixel / 255 - mean) / std;
* kNN: cosine similarity, k=20, votes weighted exp(sim / 0.07)
  (`mae_jax.knn.knn_classify`, the pretraining monitor's classifier);
* linear probe: multinomial logistic regression on standardised features (the
  train set's per-dimension mean and std, as BatchNorm without affine), an L2
  penalty, full-batch L-BFGS;
* choices (the encoder's feature kind, the probe's L2 penalty) are made on a
  held-out part of the training set (fit on train[:50000], score on
  train[50000:]); the chosen one is then fitted on all 60,000 and scored once
  on the test set. The test set picks nothing.

Encoder feature kinds (FEATURE_KINDS): 'cls' (the cls token after the final
norm), 'mean' (the mean of the patch tokens after the final norm) and
'mean_blocks' (the mean patch token of every block, each through a
parameter-free LayerNorm, concatenated: depth x width numbers) and 'tokens'
(every patch token after the final norm, in patch order: patches x width
numbers, what `python -m mae_jax.features --pool=none` writes).
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mae_jax import knn
from mae_jax.data import prepare, sources
from mae_jax.models import vit

FEATURE_KINDS = ('cls', 'mean', 'mean_blocks', 'tokens')
KNN_K = 20
KNN_TEMPERATURE = 0.07
L2_GRID = (1e-5, 1e-4, 1e-3)  # Mean-loss L2 penalties the probe chooses among (on held-out data).
HOLDOUT = 10_000  # train[-HOLDOUT:] scores the choices.
NUM_CLASSES = 10


def load_fashion_mnist(source_dir: str = sources.DEFAULT_FASHION_MNIST_DIR) -> dict:
  """{'train_x' [60000, 28, 28] uint8, 'train_y', 'test_x', 'test_y'} from the IDX files."""
  out = {}
  for split, (images_file, labels_file) in prepare.FASHION_MNIST_FILES.items():
    out[f'{split}_x'] = prepare.read_idx(os.path.join(source_dir, images_file))
    out[f'{split}_y'] = prepare.read_idx(os.path.join(source_dir, labels_file)).astype(np.int32)
  return out


def normalize(images: np.ndarray, mean: float, std: float) -> np.ndarray:
  """uint8 [N, H, W] -> float32 [N, H, W, 1], as the eval transform (no resize at 28x28)."""
  return ((images.astype(np.float32) / 255.0 - mean) / std)[..., None]


def _layer_norm(x):
  mean = x.mean(axis=-1, keepdims=True)
  var = x.var(axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + vit.LAYER_NORM_EPS)


def encoder_features(encoder_kwargs: dict, params, images: np.ndarray, batch_size: int = 1000) -> dict:
  """{kind: float32 [N, D]} for every FEATURE_KINDS entry, from one pass of the encoder."""
  encoder = vit.VisionTransformer(**encoder_kwargs, final_norm=True)
  layers = tuple(range(int(encoder_kwargs['depth'])))

  @jax.jit
  def features(params, x):
    final, _, blocks = encoder.apply({'params': params}, x, return_layers=layers)
    final = final.astype(jnp.float32)
    return {'cls': final[:, 0], 'mean': final[:, 1:].mean(axis=1),
            'tokens': final[:, 1:].reshape(final.shape[0], -1),
            'mean_blocks': jnp.concatenate([_layer_norm(b[:, 1:].astype(jnp.float32).mean(axis=1))
                                            for b in blocks], axis=-1)}

  params = jax.device_put(params)
  parts = [jax.device_get(features(params, jnp.asarray(images[i:i + batch_size])))
           for i in range(0, len(images), batch_size)]
  return {kind: np.concatenate([p[kind] for p in parts]).astype(np.float32) for kind in FEATURE_KINDS}


def knn_top1(train_f: np.ndarray, train_y: np.ndarray, eval_f: np.ndarray, eval_y: np.ndarray) -> float:
  """kNN top-1 (cosine, k=20, T=0.07) in [0, 1]."""
  scores = knn.knn_classify(train_f, train_y, eval_f, num_classes=NUM_CLASSES, k=KNN_K,
                            temperature=KNN_TEMPERATURE)
  return float(knn.topk_accuracy(scores, eval_y, ks=(1,))['top1'])


@functools.partial(jax.jit, static_argnames=('num_classes', 'max_iter'))
def _fit_softmax(x, y, l2, *, num_classes: int, max_iter: int):
  """Weights [D + 1, C] minimising mean cross-entropy + l2 / 2 * |W|^2 (bias not penalised)."""
  x = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
  onehot = jax.nn.one_hot(y, num_classes)
  penalised = jnp.ones((x.shape[1], 1)).at[-1].set(0.0)

  def loss(w):
    logits = x @ w
    ce = -(onehot * jax.nn.log_softmax(logits)).sum(axis=1).mean()
    return ce + 0.5 * l2 * jnp.sum(penalised * w * w)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)
  w = jnp.zeros((x.shape[1], num_classes), jnp.float32)

  def body(carry):
    w, state, _ = carry
    value, grad = value_and_grad(w, state=state)
    updates, state = solver.update(grad, state, w, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(w, updates), state, optax.tree.norm(grad)

  def cond(carry):
    _, state, grad_norm = carry
    count = optax.tree_utils.tree_get(state, 'count')
    return (count < max_iter) & (grad_norm > 1e-5)

  w, _, _ = jax.lax.while_loop(cond, body, (w, solver.init(w), jnp.asarray(jnp.inf)))
  return w


def _predict(w, x):
  x = np.concatenate([x, np.ones((x.shape[0], 1), x.dtype)], axis=1)
  return np.asarray(x @ np.asarray(w)).argmax(axis=1)


def _standardize(train_f, *others):
  mean = train_f.mean(axis=0)
  std = train_f.std(axis=0) + 1e-6
  return [(f - mean) / std for f in (train_f, *others)]


def probe_top1(train_f, train_y, eval_f, eval_y, l2: float, max_iter: int = 300) -> float:
  """Logistic regression (standardised features, L2 penalty l2, L-BFGS) top-1 in [0, 1]."""
  train_f, eval_f = _standardize(train_f, eval_f)
  w = _fit_softmax(jnp.asarray(train_f), jnp.asarray(train_y), jnp.float32(l2), num_classes=NUM_CLASSES,
                   max_iter=max_iter)
  return float((_predict(w, eval_f) == eval_y).mean())


def evaluate_row(features: dict, data: dict, *, probe_iters: int = 300, l2_grid=None, test: bool = True,
                 log=print) -> dict:
  """kNN and linear probe of one row's feature kinds, choices made on held-out training data.

  `features`: {kind: (train [60000, D], test [10000, D])}. Returns
  {'knn': {...}, 'linear_probe': {...}}, each with the chosen kind's test
  top-1 in % ('top1'), the choice, and every kind's held-out and test figures.
  test=False (the ablation) scores the held-out part only: 'top1' is then the
  chosen kind's held-out figure.
  """
  l2_grid = tuple(l2_grid or L2_GRID)
  train_y, test_y = data['train_y'], data['test_y']
  fit, hold = slice(0, len(train_y) - HOLDOUT), slice(len(train_y) - HOLDOUT, None)
  knn_kinds, probe_kinds = {}, {}
  for kind, (train_f, test_f) in features.items():
    start = time.time()
    knn_kinds[kind] = {'holdout': 100 * knn_top1(train_f[fit], train_y[fit], train_f[hold], train_y[hold])}
    held_by_l2 = {l2: probe_top1(train_f[fit], train_y[fit], train_f[hold], train_y[hold], l2, probe_iters)
                  for l2 in l2_grid}
    l2 = max(held_by_l2, key=held_by_l2.get)
    probe_kinds[kind] = {'holdout': 100 * held_by_l2[l2], 'l2': l2,
                         'holdout_by_l2': {str(k): 100 * v for k, v in held_by_l2.items()}}
    if test:
      knn_kinds[kind]['test'] = 100 * knn_top1(train_f, train_y, test_f, test_y)
      probe_kinds[kind]['test'] = 100 * probe_top1(train_f, train_y, test_f, test_y, l2, probe_iters)
    shown = 'test' if test else 'holdout'
    log(f'  {kind}: kNN {knn_kinds[kind][shown]:.2f} (held-out {knn_kinds[kind]["holdout"]:.2f}), '
        f'linear probe {probe_kinds[kind][shown]:.2f} (held-out {probe_kinds[kind]["holdout"]:.2f}, '
        f'l2 {l2:g}), {time.time() - start:.0f} s')

  def chosen(kinds):
    kind = max(kinds, key=lambda k: kinds[k]['holdout'])
    return {'top1': kinds[kind]['test' if test else 'holdout'], 'features': kind, 'kinds': kinds}

  return {'knn': chosen(knn_kinds), 'linear_probe': chosen(probe_kinds)}


def pixel_features(data: dict, mean: float, std: float) -> dict:
  """{'pixels': (train [60000, 784], test [10000, 784])}: the normalised pixels as they are."""
  flat = lambda x: normalize(x, mean, std).reshape(len(x), -1)
  return {'pixels': (flat(data['train_x']), flat(data['test_x']))}


def encoder_rows(encoder_kwargs: dict, params, data: dict, mean: float, std: float) -> dict:
  """{kind: (train, test)} of an encoder's features."""
  train = encoder_features(encoder_kwargs, params, normalize(data['train_x'], mean, std))
  test = encoder_features(encoder_kwargs, params, normalize(data['test_x'], mean, std))
  return {kind: (train[kind], test[kind]) for kind in FEATURE_KINDS}
