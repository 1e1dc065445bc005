"""Tests for mae_jax/optim.py: schedule, masks, layer-wise decay, AdamW, LARS, SGD."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import linprobe
from mae_jax import optim


def make_config(**overrides):
  """The optim keys of configs/default.py (with timm's no-decay names), with overrides."""
  config = ml_collections.ConfigDict({
      'name': 'adamw', 'base_lr': 1.5e-4, 'min_lr': 0.0, 'warmup_epochs': 1.0, 'warmup_steps': -1,
      'b1': 0.9, 'b2': 0.95, 'weight_decay': 0.05, 'grad_clip_norm': 0.0, 'layer_decay': 1.0,
      'momentum': 0.9, 'trust_coefficient': 0.001, 'no_decay_names': optim.NO_DECAY_NAMES})
  for key, value in overrides.items():
    config[key] = value
  return config


def reference_lr(step, peak, min_lr, warmup, total):
  """The reference's per-step formula, in float64."""
  if step < warmup:
    return peak * step / warmup
  return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def shapes(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x), jnp.float32), tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def flat(tree):
  return {'/'.join(optim.path_names(kp)): v for kp, v in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------- schedule


def test_scaled_lr():
  assert optim.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
  assert optim.scaled_lr(5e-4, 1024) == pytest.approx(2e-3)
  assert optim.scaled_lr(0.1, 256) == pytest.approx(0.1)


def test_schedule_matches_reference_formula_at_every_step():
  config = make_config(base_lr=1.5e-4, min_lr=1e-6, warmup_epochs=4.0)
  steps_per_epoch, total = 100, 2000
  lr_fn = optim.create_learning_rate_fn(config, global_batch=4096, steps_per_epoch=steps_per_epoch,
                                        total_steps=total)
  peak, warmup = 1.5e-4 * 4096 / 256, 400
  steps = np.arange(total + 1)
  got = np.asarray(jax.jit(jax.vmap(lr_fn))(jnp.asarray(steps, jnp.int32)), np.float64)
  want = np.array([reference_lr(s, peak, 1e-6, warmup, total) for s in steps])
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-10)
  assert got[0] == 0.0
  assert got[warmup] == pytest.approx(peak, rel=1e-6)
  assert got[total] == pytest.approx(1e-6, rel=1e-4)
  assert np.all(np.diff(got[:warmup + 1]) > 0)
  assert np.all(np.diff(got[warmup:]) < 0)
  # Past the end the rate stays at min_lr instead of climbing the cosine again.
  assert float(lr_fn(total + 500)) == pytest.approx(1e-6, rel=1e-4)


def test_schedule_warmup_steps_override_and_no_warmup():
  config = make_config(base_lr=1e-3, warmup_steps=7, warmup_epochs=100.0)
  lr_fn = optim.create_learning_rate_fn(config, global_batch=256, steps_per_epoch=10, total_steps=50)
  for step in (0, 3, 7, 8, 30, 50):
    assert float(lr_fn(step)) == pytest.approx(reference_lr(step, 1e-3, 0.0, 7, 50), abs=1e-9)
  config = make_config(base_lr=1e-3, warmup_epochs=0.0)
  lr_fn = optim.create_learning_rate_fn(config, global_batch=256, steps_per_epoch=10, total_steps=50)
  assert float(lr_fn(0)) == pytest.approx(1e-3)
  # Fractional warmup epochs round to whole steps.
  config = make_config(warmup_epochs=0.25)
  assert optim.warmup_steps_from_config(config, steps_per_epoch=10) == 2


def test_schedule_rejects_bad_lengths():
  with pytest.raises(ValueError, match='total_steps'):
    optim.create_learning_rate_fn(make_config(warmup_steps=20), global_batch=256,
                                  steps_per_epoch=10, total_steps=10)
  with pytest.raises(ValueError, match='total_steps=0'):
    optim.create_learning_rate_fn(make_config(), global_batch=256, steps_per_epoch=10, total_steps=0)


# ----------------------------------------------------------------------------- weight decay mask


def small_vit_shapes(scanned: bool, depth: int = 2, width: int = 8):
  """A small encoder + decoder params tree with the model's paths."""
  block = {
      'norm1': {'scale': (width,), 'bias': (width,)},
      'attn': {name: {'kernel': (width, width), 'bias': (width,)}
               for name in ('query', 'key', 'value', 'proj')},
      'norm2': {'scale': (width,), 'bias': (width,)},
      'mlp': {'fc1': {'kernel': (width, 4 * width), 'bias': (4 * width,)},
              'fc2': {'kernel': (4 * width, width), 'bias': (width,)}},
  }
  stack = lambda shape: (depth,) + shape
  encoder = {'patch_embed': {'kernel': (4, 4, 3, width), 'bias': (width,)},
             'cls_token': (1, 1, width), 'norm': {'scale': (width,), 'bias': (width,)}}
  decoder = {'embed': {'kernel': (width, width), 'bias': (width,)}, 'mask_token': (1, 1, width),
             'norm': {'scale': (width,), 'bias': (width,)},
             'pred': {'kernel': (width, 48), 'bias': (48,)}}
  if scanned:
    stacked = jax.tree.map(stack, block, is_leaf=lambda x: isinstance(x, tuple))
    encoder['blocks'] = stacked
    decoder['blocks'] = stacked
  else:
    for i in range(depth):
      encoder[f'blocks_{i}'] = block
      decoder[f'blocks_{i}'] = block
  return shapes({'encoder': encoder, 'decoder': decoder})


@pytest.mark.parametrize('scanned', [False, True])
def test_weight_decay_mask(scanned):
  mask = flat(optim.weight_decay_mask(small_vit_shapes(scanned)))
  for path, decayed in mask.items():
    leaf = path.split('/')[-1]
    if leaf == 'kernel' or leaf == 'mask_token':
      assert decayed, path
    else:
      assert leaf in ('bias', 'scale', 'cls_token'), path
      assert not decayed, path
  blocks = 'encoder/blocks' if scanned else 'encoder/blocks_1'
  assert not mask[f'{blocks}/norm1/scale']  # 2-D when scanned, still no decay
  assert mask[f'{blocks}/mlp/fc1/kernel']


def test_weight_decay_mask_by_rank_for_other_names():
  params = shapes({'embedding': (10, 4), 'gain': (4,), 'blocks': {'gain': (3, 4), 'table': (3, 4, 4)}})
  mask = flat(optim.weight_decay_mask(params))
  assert mask == {'embedding': True, 'gain': False, 'blocks/gain': False, 'blocks/table': True}
  # The reference pretraining passes no name list: cls_token is then decayed by rank.
  mask = flat(optim.weight_decay_mask(shapes({'cls_token': (1, 1, 4)}), no_decay_names=()))
  assert mask == {'cls_token': True}


def test_weight_decay_mask_names_win_over_rank():
  """Biases and scales stacked under a name not known as scanned still get no decay."""
  params = shapes({'layers': {'norm': {'scale': (3, 4), 'bias': (3, 4)}, 'fc': {'kernel': (3, 4, 4)}}})
  mask = flat(optim.weight_decay_mask(params))
  assert mask == {'layers/norm/scale': False, 'layers/norm/bias': False, 'layers/fc/kernel': True}


def test_boxed_params_use_the_inner_name():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  params = {'encoder': {'blocks_1': {'fc': {
      'kernel': nn.Partitioned(jnp.ones((2, 3)), names=('a', 'b')),
      'bias': nn.Partitioned(jnp.ones((3,)), names=('b',))}}}}
  assert flat(optim.weight_decay_mask(params)) == {'encoder/blocks_1/fc/kernel': True,
                                                   'encoder/blocks_1/fc/bias': False}
  scales = flat(optim.layerwise_lr_scales(params, 2, 0.5))
  assert scales == {'encoder/blocks_1/fc/kernel': 0.5, 'encoder/blocks_1/fc/bias': 0.5}


# ----------------------------------------------------------------------------- layer-wise decay


def fake_vit_b(depth=12, width=768, scanned=False, num_classes=1000):
  """ViT-B classifier params (ShapeDtypeStructs) and the expected layer id of each leaf."""
  tree, ids = {}, {}

  def add(path, shape, layer):
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jax.ShapeDtypeStruct(shape, jnp.float32)
    ids['/'.join(path)] = layer

  add(('encoder', 'patch_embed', 'kernel'), (16, 16, 3, width), 0)
  add(('encoder', 'patch_embed', 'bias'), (width,), 0)
  add(('encoder', 'cls_token'), (1, 1, width), 0)
  block_leaves = [(('norm1', 'scale'), (width,)), (('norm1', 'bias'), (width,)),
                  (('norm2', 'scale'), (width,)), (('norm2', 'bias'), (width,)),
                  (('mlp', 'fc1', 'kernel'), (width, 4 * width)), (('mlp', 'fc1', 'bias'), (4 * width,)),
                  (('mlp', 'fc2', 'kernel'), (4 * width, width)), (('mlp', 'fc2', 'bias'), (width,))]
  for name in ('query', 'key', 'value', 'proj'):
    block_leaves += [(('attn', name, 'kernel'), (width, width)), (('attn', name, 'bias'), (width,))]
  for sub, shape in block_leaves:
    if scanned:
      add(('encoder', 'blocks') + sub, (depth,) + shape, np.arange(1, depth + 1))
    else:
      for i in range(depth):
        add(('encoder', f'blocks_{i}') + sub, shape, i + 1)
  add(('fc_norm', 'scale'), (width,), depth + 1)
  add(('fc_norm', 'bias'), (width,), depth + 1)
  add(('head', 'kernel'), (width, num_classes), depth + 1)
  add(('head', 'bias'), (num_classes,), depth + 1)
  return tree, ids


@pytest.mark.parametrize('scanned', [False, True])
def test_layerwise_scales_every_parameter_of_vit_b(scanned):
  depth, decay = 12, 0.65
  params, ids = fake_vit_b(depth=depth, scanned=scanned)
  scales = flat(optim.layerwise_lr_scales(params, depth, decay))
  assert set(scales) == set(ids)
  assert len(scales) == 3 + 16 * (1 if scanned else depth) + 4
  for path, layer in ids.items():
    want = decay ** (depth + 1 - np.asarray(layer, np.float64))
    np.testing.assert_allclose(scales[path], want, rtol=1e-6, err_msg=path)
    assert np.shape(scales[path]) == ((depth,) if scanned and 'blocks' in path else ())
  assert scales['head/kernel'] == 1.0
  assert scales['encoder/patch_embed/kernel'] == pytest.approx(decay ** 13)


def reference_layer_id(path, depth):
  """The reference rule, applied to the reference's parameter name of a flax path."""
  names = path.split('/')
  if names[0] == 'encoder':
    names = names[1:]
  if names[0] in ('cls_token', 'pos_embed') or names[0].startswith('patch_embed'):
    return 0
  if names[0].startswith('blocks_'):
    return int(names[0].split('_')[1]) + 1
  if names[0] == 'blocks':
    return np.arange(1, depth + 1)
  return depth + 1


@pytest.mark.parametrize('scanned', [False, True])
def test_layerwise_scales_real_classifier(scanned):
  from mae_jax import models  # pylint: disable=g-import-not-at-top
  model = models.get_classifier('mae_vit_base_patch16', num_classes=1000, scan_layers=scanned)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  params = variables['params']
  scales = flat(optim.layerwise_lr_scales(params, 12, 0.65))
  sizes = {p: int(np.prod(x.shape)) for p, x in flat(params).items()}
  # Every encoder parameter of the reference ViT-B except its final norm (the
  # classifier pools into fc_norm instead), plus fc_norm and a 1000-way head.
  assert sum(sizes.values()) == 85_647_360 - 2 * 768 + 2 * 768 + 768 * 1000 + 1000
  for path, scale in scales.items():
    want = 0.65 ** (13 - np.asarray(reference_layer_id(path, 12), np.float64))
    np.testing.assert_allclose(scale, want, rtol=1e-6, err_msg=path)


def test_real_mae_weight_decay_mask():
  from mae_jax import models  # pylint: disable=g-import-not-at-top
  model = models.get_model('mae_vit_base_patch16')
  variables = jax.eval_shape(lambda: model.init(
      {'params': jax.random.PRNGKey(0), 'mask': jax.random.PRNGKey(1)},
      jnp.zeros((1, 224, 224, 3))))
  params = variables['params']
  mask, sizes = flat(optim.weight_decay_mask(params)), flat(params)
  for path, decayed in mask.items():
    leaf = path.split('/')[-1]
    assert decayed == (leaf in ('kernel', 'mask_token')), path
  total = sum(int(np.prod(x.shape)) for x in sizes.values())
  assert total == 111_655_680


def test_layer_id_rules_and_errors():
  assert optim.layer_id('encoder/patch_embed/kernel', 12) == 0
  assert optim.layer_id('encoder/cls_token', 12) == 0
  assert optim.layer_id('encoder/blocks_0/attn/query/kernel', 12) == 1
  assert optim.layer_id(('encoder', 'blocks_11', 'norm2', 'bias'), 12) == 12
  assert optim.layer_id('encoder/norm/scale', 12) == 13
  assert optim.layer_id('decoder/blocks_3/mlp/fc1/kernel', 12) == 13
  assert optim.layer_id('decoder/mask_token', 12) == 13
  np.testing.assert_array_equal(optim.layer_id('encoder/blocks/mlp/fc1/kernel', 3), [1, 2, 3])
  with pytest.raises(ValueError, match='depth=12'):
    optim.layer_id('encoder/blocks_12/mlp/fc1/kernel', 12)
  params = shapes({'encoder': {'blocks': {'mlp': {'fc1': {'kernel': (4, 8, 8)}}}}})
  with pytest.raises(ValueError, match='depth=3'):
    optim.layerwise_lr_scales(params, 3, 0.75)


# ----------------------------------------------------------------------------- AdamW


def tiny_params(rng):
  return {
      'encoder': {
          'patch_embed': {'kernel': rng.normal(size=(2, 2, 1, 3)), 'bias': rng.normal(size=(3,))},
          'cls_token': rng.normal(size=(1, 1, 3)),
          'blocks_0': {'mlp': {'fc1': {'kernel': rng.normal(size=(3, 5)), 'bias': rng.normal(size=(5,))}},
                       'norm1': {'scale': rng.normal(size=(3,)), 'bias': rng.normal(size=(3,))}},
          'blocks_1': {'mlp': {'fc1': {'kernel': rng.normal(size=(3, 5)), 'bias': rng.normal(size=(5,))}}},
      },
      'head': {'kernel': rng.normal(size=(3, 4)), 'bias': rng.normal(size=(4,))},
  }


def run_steps(tx, params, grads_seq):
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for grads in grads_seq:
    params, state = step(params, state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads))
  return jax.tree.map(np.asarray, params)


@pytest.mark.parametrize('layer_decay', [None, 0.5])
def test_adamw_matches_hand_computed_update(layer_decay):
  rng = np.random.default_rng(0)
  params = tiny_params(rng)
  grads_seq = [jax.tree.map(lambda x: rng.normal(size=x.shape), params) for _ in range(5)]
  overrides = {'base_lr': 0.1, 'min_lr': 0.001, 'warmup_steps': 2, 'b1': 0.9, 'b2': 0.95, 'weight_decay': 0.3}
  if layer_decay is not None:
    overrides['layer_decay'] = layer_decay
  config = make_config(**overrides)
  tx, lr_fn = optim.create_optimizer(config, global_batch=512, steps_per_epoch=3, total_steps=6,
                                     params=params, depth=2)
  got = flat(run_steps(tx, params, grads_seq))

  mask = flat(optim.weight_decay_mask(params))
  scales = (flat(optim.layerwise_lr_scales(params, 2, layer_decay)) if layer_decay
            else dict.fromkeys(mask, 1.0))
  want, grads_flat = flat(params), [flat(g) for g in grads_seq]
  eps = 1e-8
  for path in want:
    p, m, v = want[path].astype(np.float64), 0.0, 0.0
    for t, grads in enumerate(grads_flat, start=1):
      lr = reference_lr(t - 1, 0.1 * 512 / 256, 0.001, 2, 6) * scales[path]
      g = grads[path]
      m = 0.9 * m + 0.1 * g
      v = 0.95 * v + 0.05 * g * g
      m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.95**t)
      if mask[path]:
        p = p * (1 - lr * 0.3)  # Decoupled decay, as torch.optim.AdamW.
      p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    np.testing.assert_allclose(got[path], p, rtol=1e-5, atol=1e-6, err_msg=path)
  assert float(lr_fn(2)) == pytest.approx(0.2)
  # The first step runs at lr 0, as the reference's first iteration.
  first = flat(run_steps(tx, params, grads_seq[:1]))
  for path, value in flat(params).items():
    np.testing.assert_allclose(first[path], value, rtol=1e-6, err_msg=path)


def test_layer_decay_scales_whole_step_scanned():
  """A scanned stack gets per-layer scales equal to its unscanned blocks."""
  rng = np.random.default_rng(1)
  unscanned = {'encoder': {f'blocks_{i}': {'mlp': {'fc1': {'kernel': rng.normal(size=(3, 5)),
                                                           'bias': rng.normal(size=(5,))}}}
                           for i in range(3)}}
  stack = lambda *xs: np.stack(xs)
  scanned = {'encoder': {'blocks': jax.tree.map(stack, *unscanned['encoder'].values())}}
  grads = [jax.tree.map(lambda x: rng.normal(size=x.shape), unscanned) for _ in range(3)]
  grads_scanned = [{'encoder': {'blocks': jax.tree.map(stack, *g['encoder'].values())}} for g in grads]
  config = make_config(base_lr=0.05, warmup_steps=1, layer_decay=0.7, weight_decay=0.1)
  for name in ('adamw', 'lars', 'sgd'):
    config.name = name
    kwargs = {'global_batch': 256, 'steps_per_epoch': 2, 'total_steps': 4, 'depth': 3}
    got_unscanned = run_steps(optim.create_optimizer(config, **kwargs)[0], unscanned, grads)
    got_scanned = run_steps(optim.create_optimizer(config, **kwargs)[0], scanned, grads_scanned)
    want = jax.tree.map(stack, *got_unscanned['encoder'].values())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 got_scanned['encoder']['blocks'], want)


# ----------------------------------------------------------------------------- LARS


def reference_lars(params, grads_seq, lrs, momentum, trust_coefficient, weight_decay):
  """The reference LARS rule in numpy, tensor by tensor."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  mus = {k: np.zeros_like(v) for k, v in params.items()}
  for grads, lr in zip(grads_seq, lrs):
    for k, p in params.items():
      d = grads[k].astype(np.float64)
      if p.ndim > 1:
        d = d + weight_decay * p
        param_norm, update_norm = np.linalg.norm(p), np.linalg.norm(d)
        q = trust_coefficient * param_norm / update_norm if param_norm > 0 and update_norm > 0 else 1.0
        d = d * q
      mus[k] = momentum * mus[k] + d
      params[k] = p - lr * mus[k]
  return params


def test_lars_matches_reference_rule():
  rng = np.random.default_rng(2)
  params = {'head': {'kernel': rng.normal(size=(6, 4)), 'bias': rng.normal(size=(4,))},
            'zero': {'kernel': np.zeros((3, 3))},
            'bn': {'scale': rng.normal(size=(6,))}}
  grads_seq = [jax.tree.map(lambda x: rng.normal(size=x.shape), params) for _ in range(6)]
  config = make_config(name='lars', base_lr=0.1, min_lr=0.0, warmup_steps=2, weight_decay=0.05,
                       momentum=0.9, trust_coefficient=0.001)
  tx, lr_fn = optim.create_optimizer(config, global_batch=1024, steps_per_epoch=4, total_steps=6)
  got = flat(run_steps(tx, params, grads_seq))
  lrs = [reference_lr(t, 0.4, 0.0, 2, 6) for t in range(6)]
  np.testing.assert_allclose([float(lr_fn(t)) for t in range(6)], lrs, rtol=1e-6)
  want = reference_lars(flat(params), [flat(g) for g in grads_seq], lrs, 0.9, 0.001, 0.05)
  for path in want:
    np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-7, err_msg=path)
  # optax.lars applies the learning rate before the momentum trace, so with a
  # changing lr it does not follow the reference; ours must.
  theirs = flat(run_steps(optax.lars(lr_fn, weight_decay=0.05, trust_coefficient=0.001,
                                     weight_decay_mask=optim.lars_mask, trust_ratio_mask=optim.lars_mask),
                          params, grads_seq))
  assert not np.allclose(theirs['head/kernel'], want['head/kernel'], rtol=1e-5, atol=1e-7)


def test_lars_scanned_uses_per_layer_norms():
  rng = np.random.default_rng(3)
  layers = [rng.normal(size=(4, 4)) * (i + 1) for i in range(3)]
  grads_seq = [[rng.normal(size=(4, 4)) for _ in range(3)] for _ in range(3)]
  tx = optim.lars(0.5, weight_decay=0.01)
  got = run_steps(tx, {'blocks': {'kernel': np.stack(layers)}},
                  [{'blocks': {'kernel': np.stack(g)}} for g in grads_seq])['blocks']['kernel']
  for i in range(3):
    want = reference_lars({'k': layers[i]}, [{'k': g[i]} for g in grads_seq], [0.5] * 3, 0.9, 0.001, 0.01)
    np.testing.assert_allclose(got[i], want['k'], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- clipping, SGD, errors


def test_global_norm_clipping():
  config = make_config(name='sgd', base_lr=0.5, min_lr=0.5, warmup_steps=-1, warmup_epochs=0.0,
                       weight_decay=0.0, momentum=0.0, grad_clip_norm=1.0)
  tx, _ = optim.create_optimizer(config, global_batch=256, steps_per_epoch=1, total_steps=10)
  params = {'a': jnp.ones((2, 3)), 'b': jnp.ones((4,))}
  big = {'a': jnp.full((2, 3), 3.0), 'b': jnp.full((4,), 4.0)}
  updates, _ = tx.update(big, tx.init(params), params)
  norm = math.sqrt(6 * 9 + 4 * 16)
  np.testing.assert_allclose(updates['a'], -0.5 * 3.0 / norm, rtol=1e-6)
  np.testing.assert_allclose(updates['b'], -0.5 * 4.0 / norm, rtol=1e-6)
  assert float(optax.tree.norm(updates)) == pytest.approx(0.5, rel=1e-6)
  small = jax.tree.map(lambda x: x * 0.01, big)
  updates, _ = tx.update(small, tx.init(params), params)
  np.testing.assert_allclose(updates['a'], -0.5 * 0.03, rtol=1e-6)


def test_sgd_momentum_and_coupled_decay():
  config = make_config(name='sgd', base_lr=0.1, min_lr=0.1, warmup_epochs=0.0, weight_decay=0.1,
                       momentum=0.9)
  tx, _ = optim.create_optimizer(config, global_batch=256, steps_per_epoch=1, total_steps=10)
  params = {'w': {'kernel': np.full((2, 2), 2.0)}, 'w2': {'bias': np.full((2,), 2.0)}}
  grads = [{'w': {'kernel': np.ones((2, 2))}, 'w2': {'bias': np.ones((2,))}}] * 2
  got = run_steps(tx, params, grads)
  p, mu = 2.0, 0.0
  for _ in range(2):
    mu = 0.9 * mu + (1.0 + 0.1 * p)
    p -= 0.1 * mu
  np.testing.assert_allclose(got['w']['kernel'], p, rtol=1e-6)
  np.testing.assert_allclose(got['w2']['bias'], 2.0 - 0.1 * (1.0 + 1.9), rtol=1e-6)


def test_config_errors():
  kwargs = {'global_batch': 256, 'steps_per_epoch': 10, 'total_steps': 100}
  with pytest.raises(ValueError, match=r"optim.name='adam'.*adamw"):
    optim.create_optimizer(make_config(name='adam'), **kwargs)
  with pytest.raises(ValueError, match='depth'):
    optim.create_optimizer(make_config(layer_decay=0.65), **kwargs)
  with pytest.raises(ValueError, match=r'optim.layer_decay=1.5'):
    optim.create_optimizer(make_config(layer_decay=1.5), depth=12, **kwargs)
  # layer_decay 1 (or 0) turns layer-wise decay off and needs no depth.
  optim.create_optimizer(make_config(layer_decay=1.0), **kwargs)


def test_default_config_builds_every_optimizer():
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config().optim
  for name in optim.OPTIMIZERS:
    config.name = name
    tx, lr_fn = optim.create_optimizer(config, global_batch=256, steps_per_epoch=10, total_steps=100)
    params = {'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros((2,))}}
    updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert float(lr_fn(10)) == pytest.approx(1.5e-4)


def test_an_optimizer_whose_settings_the_config_lacks_is_one_clear_error():
  """The linear-probe recipe declares no Adam settings: switching it to adamw names what to add."""
  config = linprobe.get_config('variant=B/16').optim
  optim.create_optimizer(config, global_batch=256, steps_per_epoch=10, total_steps=100)  # LARS: complete.
  config.name = 'adamw'
  with pytest.raises(ValueError, match=r"optim.name='adamw' reads optim.b1, optim.b2, which this config"):
    optim.create_optimizer(config, global_batch=256, steps_per_epoch=10, total_steps=100)
