"""Model tests: parameter counts, masking, loss, position tables, training signal."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mae_jax import models
from mae_jax.models import mae, pos_embed, vit


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_params(model, image_size=224, channels=3):
  images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  rngs = {'params': jax.random.key(0), 'mask': jax.random.key(1)}
  return jax.eval_shape(lambda x: model.init(rngs, x), images)


@pytest.mark.parametrize('name,total,encoder', [
    ('mae_vit_base_patch16', 111_655_680, 85_647_360),
    ('mae_vit_large_patch16', 329_239_296, 303_099_904),
    ('mae_vit_huge_patch14', 656_613_964, 630_435_840),
])
@pytest.mark.parametrize('scan_layers', [False, True])
def test_reference_parameter_counts(name, total, encoder, scan_layers):
  variables = _abstract_params(models.get_model(name, scan_layers=scan_layers))
  assert set(variables) == {'params'}  # position tables are constants, not variables
  assert _count(variables['params']) == total
  assert _count(variables['params']['encoder']) == encoder


def test_random_masking_properties():
  n, length, dim = 4, 196, 8
  x = jnp.arange(n * length * dim, dtype=jnp.float32).reshape(n, length, dim)
  noise = jax.random.uniform(jax.random.key(0), (n, length))
  x_masked, mask, ids_restore = jax.jit(mae.random_masking, static_argnums=1)(x, 0.75, noise)
  assert x_masked.shape == (n, 49, dim)
  np.testing.assert_array_equal(mask.sum(axis=1), [147] * n)  # exactly len_keep visible
  ids_shuffle = jnp.argsort(noise, axis=1)
  np.testing.assert_array_equal(jnp.take_along_axis(ids_shuffle, ids_restore, axis=1),
                                np.tile(np.arange(length), (n, 1)))
  # Kept tokens are the unmasked ones, in shuffle order.
  for i in range(n):
    kept = np.asarray(x_masked[i, :, 0]) / dim - i * length
    assert set(kept.astype(int)) == set(np.where(np.asarray(mask[i]) == 0)[0])
  # Different examples get different masks.
  assert len({tuple(np.asarray(m)) for m in mask}) == n


def test_len_keep_matches_reference_formula():
  assert models.num_visible(196, 0.75) == 49
  assert models.num_visible(49, 0.75) == 12
  assert models.num_visible(256, 0.9) == int(256 * (1 - 0.9))


@pytest.mark.parametrize('ratio', [0.0, 1.0, 1.2, -0.1])
def test_mask_ratio_out_of_range(ratio):
  with pytest.raises(ValueError, match='mask_ratio'):
    models.num_visible(196, ratio)


def test_mask_ratio_leaving_no_visible_patch():
  model = models.get_model('mae_vit_test')
  params = _abstract_params(model, 32)
  with pytest.raises(ValueError, match='no visible patch'):
    jax.eval_shape(lambda p: model.apply(p, jnp.zeros((1, 32, 32, 3)), mask_ratio=0.99,
                                         rngs={'mask': jax.random.key(0)}), params)


def test_config_errors_name_the_setting():
  with pytest.raises(ValueError, match='image_size=30 is not divisible by patch_size=8'):
    models.get_model('mae_vit_test', image_size=30)
  with pytest.raises(ValueError, match='embed_dim=36 is not divisible by num_heads=5'):
    models.get_model('mae_vit_test', embed_dim=36, num_heads=5)
  with pytest.raises(ValueError, match="model.name='mae_vit_bas_patch16'.*mae_vit_base_patch16"):
    models.get_model('mae_vit_bas_patch16')
  with pytest.raises(ValueError, match='unknown model setting'):
    models.get_model('mae_vit_test', widht=3)


def test_patchify_order_and_roundtrip():
  images = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
  patches = models.patchify(images, 4)
  assert patches.shape == (2, 6, 48)
  # Patch 4 = row 1, column 1; its vector is pixels in (p, q, c) order.
  np.testing.assert_array_equal(patches[1, 4], images[1, 4:8, 4:8, :].reshape(-1))
  np.testing.assert_array_equal(models.unpatchify(patches, 4, (2, 3), 3), images)


def test_norm_pix_targets_are_normalised_per_patch():
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3)) * 5 + 2
  target = models.patch_targets(images, 8, norm_pix_loss=True)
  np.testing.assert_allclose(target.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(target.std(-1, ddof=1), 1.0, atol=1e-3)


def test_loss_ignores_predictions_on_visible_patches():
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  pred = jax.random.normal(jax.random.key(1), (2, 16, 192))
  mask = (jax.random.uniform(jax.random.key(2), (2, 16)) > 0.5).astype(jnp.float32)
  changed = pred + 100.0 * (1 - mask)[..., None]
  base = models.mae_loss(images, pred, mask, 8, True)
  np.testing.assert_allclose(models.mae_loss(images, changed, mask, 8, True), base, rtol=1e-6)
  # ... and does change with predictions on masked patches.
  assert abs(float(models.mae_loss(images, pred + mask[..., None], mask, 8, True)) - float(base)) > 1e-3


def test_loss_is_reference_formula():
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  pred = jax.random.normal(jax.random.key(1), (2, 16, 16))
  mask = jnp.array([[1.0] * 12 + [0.0] * 4, [0.0] * 4 + [1.0] * 12])
  target = np.asarray(models.patchify(images, 4))
  mean, var = target.mean(-1, keepdims=True), target.var(-1, ddof=1, keepdims=True)
  target = (target - mean) / np.sqrt(var + 1e-6)
  expected = (((np.asarray(pred) - target)**2).mean(-1) * mask).sum() / mask.sum()
  np.testing.assert_allclose(models.mae_loss(images, pred, mask, 4, True), expected, rtol=1e-5)


def test_pos_embed_closed_form():
  dim, grid = 16, 3
  table = pos_embed.get_2d_sincos_pos_embed(dim, grid, cls_token=True)
  assert table.shape == (1 + grid * grid, dim)
  np.testing.assert_array_equal(table[0], 0.0)
  quarter = dim // 4
  omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
  for h in range(grid):
    for w in range(grid):
      row = table[1 + h * grid + w]
      expected = np.concatenate([np.sin(w * omega), np.cos(w * omega),
                                 np.sin(h * omega), np.cos(h * omega)])
      np.testing.assert_allclose(row, expected, atol=1e-6)


def test_explicit_noise_gives_deterministic_mask_and_rng_gives_different():
  model = models.get_model('mae_vit_test')
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init({'params': jax.random.key(0), 'mask': jax.random.key(1)}, images)
  noise = jax.random.uniform(jax.random.key(5), (2, 16))
  out1 = model.apply(variables, images, noise=noise)
  out2 = model.apply(variables, images, noise=noise)
  np.testing.assert_array_equal(out1[2], out2[2])
  np.testing.assert_array_equal(out1[2], (jnp.argsort(jnp.argsort(noise, 1), 1) >= 4))
  out3 = model.apply(variables, images, rngs={'mask': jax.random.key(9)})
  assert not np.array_equal(out1[2], out3[2])


def test_encode_returns_all_tokens_cls_first():
  model = models.get_model('mae_vit_test')
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init({'params': jax.random.key(0), 'mask': jax.random.key(1)}, images)
  tokens = model.apply(variables, images, method=model.encode)
  assert tokens.shape == (2, 17, 32)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_encode_return_layers_are_the_block_outputs(scan_layers):
  model = models.get_model('mae_vit_test', scan_layers=scan_layers)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init({'params': jax.random.key(0), 'mask': jax.random.key(1)}, images)
  first, last, again = model.apply(variables, images, return_layers=(0, 1, -1), method=model.encode)
  assert first.shape == last.shape == (2, 17, 32)
  np.testing.assert_array_equal(last, again)
  assert not np.allclose(first, last)
  # The last block's output, normed by the encoder's final LayerNorm, is what encode returns.
  tokens = model.apply(variables, images, method=model.encode)
  norm = variables['params']['encoder']['norm']
  mean, var = last.mean(-1, keepdims=True), last.var(-1, keepdims=True)
  normed = (last - mean) / np.sqrt(var + 1e-6) * norm['scale'] + norm['bias']
  np.testing.assert_allclose(tokens, normed, atol=1e-5)
  with pytest.raises(ValueError, match=r'return_layers=\(2,\).*depth 2'):
    model.apply(variables, images, return_layers=(2,), method=model.encode)


def test_scan_and_unrolled_agree():
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  rngs = {'params': jax.random.key(0), 'mask': jax.random.key(1)}
  plain = models.get_model('mae_vit_test')
  scanned = models.get_model('mae_vit_test', scan_layers=True, remat_policy='full')
  params = plain.init(rngs, images)['params']
  # Stack the unrolled blocks into the scanned layout.
  stacked = {}
  for part, depth in (('encoder', 2), ('decoder', 1)):
    tree = {k: v for k, v in params[part].items() if not k.startswith('blocks_')}
    tree['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[part][f'blocks_{i}'] for i in range(depth)])
    stacked[part] = tree
  noise = jax.random.uniform(jax.random.key(3), (2, 16))
  out_plain = plain.apply({'params': params}, images, noise=noise)
  out_scan = scanned.apply({'params': stacked}, images, noise=noise)
  np.testing.assert_allclose(out_plain[0], out_scan[0], rtol=1e-5)
  np.testing.assert_allclose(out_plain[1], out_scan[1], atol=1e-5)


def test_init_matches_reference_scheme():
  model = models.get_model('mae_vit_base_patch16')
  images = jnp.zeros((1, 224, 224, 3))
  params = jax.jit(lambda: model.init({'params': jax.random.key(0), 'mask': jax.random.key(1)},
                                      images))()['params']
  enc = params['encoder']
  # xavier-uniform bound sqrt(6 / (fan_in + fan_out)); q/k/v as one [768, 2304] matrix.
  qkv = np.concatenate([enc['blocks_0']['attn'][n]['kernel'] for n in ('query', 'key', 'value')], 1)
  assert abs(np.abs(qkv).max() - np.sqrt(6 / (768 + 2304))) < 2e-3
  fc1 = np.asarray(enc['blocks_0']['mlp']['fc1']['kernel'])
  assert abs(np.abs(fc1).max() - np.sqrt(6 / (768 + 3072))) < 2e-3
  patch = np.asarray(enc['patch_embed']['kernel'])
  assert abs(np.abs(patch).max() - np.sqrt(6 / (768 + 768))) < 2e-3
  assert abs(float(np.std(enc['cls_token'])) - 0.02) < 0.005
  np.testing.assert_array_equal(enc['blocks_0']['attn']['query']['bias'], 0.0)
  np.testing.assert_array_equal(enc['norm']['scale'], 1.0)


def test_head_init_is_timms_trunc_normal_cut_at_2_absolute():
  torch = pytest.importorskip('torch')
  for std in (0.01, 1.5):  # Cut at 200 std (a plain normal) and at 1.33 std.
    ours = np.asarray(vit.head_init(std)(jax.random.key(0), (512, 512)))
    ref = torch.nn.init.trunc_normal_(torch.empty(512, 512), std=std,
                                      generator=torch.Generator().manual_seed(0)).numpy()
    assert abs(ours.std() - ref.std()) < 0.01 * std, (std, ours.std(), ref.std())
    assert np.abs(ours).max() <= 2.0
  # The classifier's head (std 2e-5, as the reference's fine-tuning): the full std, not 0.88 of it.
  model = models.get_classifier('mae_vit_test', num_classes=1000, image_size=32)
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))()['params']
  assert abs(float(np.std(params['head']['kernel'])) / 2e-5 - 1) < 0.03


def test_encoder_mask_tokens_variant():
  model = models.get_model('mae_vit_test', encoder_mask_tokens=True)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init({'params': jax.random.key(0), 'mask': jax.random.key(1)}, images)
  assert 'encoder_mask_token' in variables['params']
  loss, pred, mask = model.apply(variables, images, rngs={'mask': jax.random.key(2)})
  assert pred.shape == (2, 16, 192) and np.isfinite(loss)
  np.testing.assert_array_equal(mask.sum(1), [12, 12])


def test_bfloat16_compute_keeps_float32_params_and_loss():
  model = models.get_model('mae_vit_test', dtype='bfloat16')
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init({'params': jax.random.key(0), 'mask': jax.random.key(1)}, images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  loss, pred, _ = model.apply(variables, images, rngs={'mask': jax.random.key(2)})
  assert loss.dtype == jnp.float32 and pred.dtype == jnp.bfloat16


def test_tiny_model_learns_fixed_batch():
  model = models.get_model('mae_vit_test', norm_pix_loss=False)
  images = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3))
  params = model.init({'params': jax.random.key(0), 'mask': jax.random.key(1)}, images)['params']
  tx = optax.adamw(2e-3, b1=0.9, b2=0.95, weight_decay=0.05)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    def loss_fn(p):
      return model.apply({'params': p}, images, rngs={'mask': key})[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(200):
    params, opt_state, loss = step(params, opt_state, jax.random.key(i))
    losses.append(float(loss))
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert last < 0.5 * first, (first, last)


def _tiny_classifier(pos, image_size=32):
  return models.get_classifier('mae_vit_test', num_classes=5, pos_embed=pos, image_size=image_size)


def test_learned_position_table_is_a_parameter_the_classifier_adds():
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  learned = _tiny_classifier('learned')
  params = learned.init(jax.random.key(1), images)['params']
  table = params['encoder']['pos_embed']
  assert table.shape == (1, 1 + 16, 32) and table.dtype == jnp.float32  # [1, 1 + L, D], cls first.
  assert 0.01 < float(jnp.std(table)) < 0.03  # timm's init, normal(0.02).
  fixed = _tiny_classifier('sincos')
  fixed_params = fixed.init(jax.random.key(1), images)['params']
  assert 'pos_embed' not in fixed_params['encoder']
  assert 'pos_embed' not in _abstract_params(models.get_model('mae_vit_test'), 32)['params']['encoder']
  # With the sin-cos table as its value, the learned model computes what the fixed-table model does ...
  sincos = jnp.asarray(pos_embed.get_2d_sincos_pos_embed(32, 4, cls_token=True))[None]
  same = {**fixed_params, 'encoder': {**fixed_params['encoder'], 'pos_embed': sincos}}
  np.testing.assert_allclose(learned.apply({'params': same}, images), fixed.apply({'params': fixed_params}, images),
                             atol=1e-6)
  # ... and the table changes the output and gets a gradient, its cls entry too.
  moved = {**same, 'encoder': {**same['encoder'], 'pos_embed': sincos.at[0, 1].add(jnp.linspace(-1, 1, 32))}}
  features = lambda p: learned.apply({'params': p}, images, return_features=True)[1]
  assert np.abs(features(moved) - features(same)).max() > 1e-3
  grad = jax.grad(lambda p: jnp.square(features(p)[:, :4]).sum())(same)['encoder']['pos_embed']
  assert float(jnp.abs(grad[0, 0]).min()) > 0 and float(jnp.abs(grad[0, 1:]).sum()) > 0


def test_learned_table_refuses_images_of_another_grid():
  model = _tiny_classifier('learned', image_size=(32, 24))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 24, 3))))['params']
  assert params['encoder']['pos_embed'].shape == (1, 1 + 4 * 3, 32)  # A rectangular grid.
  with pytest.raises(ValueError, match=r'learned position table is for image_size=\(32, 24\).*dataset.image_size'):
    jax.eval_shape(lambda p: model.apply({'params': p}, jnp.zeros((1, 32, 32, 3))), params)
  with pytest.raises(ValueError, match="pos_embed='fixed': must be one of"):
    jax.eval_shape(lambda: _tiny_classifier('fixed').init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def test_dense_equals_flax_dense_and_flattens_only_for_cpus():
  """vit.Dense: nn.Dense's parameters, values and gradients; on the CPU one [rows, K] matmul.

  That TPUs keep the former product is test_aot's B/16 v5e-4 row (flattened, its temporaries grow).
  """
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  ours, plain, theirs = vit.Dense(6, name='fc'), vit.Dense(6, dot_general=None, name='fc'), nn.Dense(6, name='fc')
  params = theirs.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, params)
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-6, atol=1e-6)
  grads = jax.grad(loss(ours), argnums=(0, 1))(params, x), jax.grad(loss(theirs), argnums=(0, 1))(params, x)
  for got, want in zip(*grads):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
  # On the CPU the weight gradient is one matmul of the stored arrays. nn.Dense's (and vit.Dense's
  # with dot_general=None) is fed a transposed copy of the output gradient, [6, 10].
  compiled = {name: jax.jit(jax.grad(loss(module))).lower(params, x).compile().as_text()
              for name, module in (('ours', ours), ('plain', plain), ('theirs', theirs))}
  assert 'f32[6,10]{1,0}' not in compiled['ours'] and 'f32[10,6]{1,0}' in compiled['ours']
  assert 'f32[6,10]{1,0}' in compiled['theirs'] and 'f32[6,10]{1,0}' in compiled['plain']
  # dot_general=None (blocks under a remat policy) stages out no platform switch.
  assert 'platform_index' in str(jax.make_jaxpr(ours.apply)(params, x))
  assert 'platform_index' not in str(jax.make_jaxpr(plain.apply)(params, x))

