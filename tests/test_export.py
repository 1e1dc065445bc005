"""mae_jax.weights and the mae_jax.export command line: round trips, key names, errors, PyTorch and HF parity."""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import export, models, weights

TEST_MODEL = 'mae_vit_test'  # 32x32 images, 8x8 patches, width 32, 2 + 1 blocks.

try:
  import safetensors.numpy  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  HAS_SAFETENSORS = True
except ImportError:
  HAS_SAFETENSORS = False
# The safetensors and hf formats need the safetensors package (pip install safetensors).
needs_safetensors = pytest.mark.skipif(not HAS_SAFETENSORS, reason='safetensors is not installed')


def _abstract(model, init_kwargs=None):
  """The params' ShapeDtypeStructs of a model (MAE or classifier), without running init."""
  size = model.image_size if hasattr(model, 'image_size') else model.encoder['image_size']
  channels = model.in_channels if hasattr(model, 'in_channels') else 3
  images = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  rngs = {'params': jax.random.key(0), 'mask': jax.random.key(0)}
  return jax.eval_shape(lambda x: model.init(rngs, x, **(init_kwargs or {})), images)['params']


def _random_params(model, seed=0, init_kwargs=None):
  """Random params of a model's layout at realistic scales (no init: eager init is slow on CPU).

  Norm scales and biases are not the init's ones and zeros, so a mix-up would show.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    noise = rng.standard_normal(leaf.shape)
    if name == 'kernel':
      noise /= np.sqrt(np.prod(leaf.shape[:-1]))  # fan-in
    elif name == 'scale':
      noise = 1.0 + 0.1 * noise
    else:
      noise *= 0.1 if name == 'bias' else 0.02  # cls / mask tokens
    return noise.astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, _abstract(model, init_kwargs))


def _mae_params(model_name, seed=0, **overrides):
  return _random_params(models.get_model(model_name, **overrides), seed, {'train': False})


def _encode(model, params, images):
  return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x, method=model.encode))(params, images))


def _assert_trees_equal(expected, actual):
  expected, actual = jax.device_get(dict(expected)), jax.device_get(dict(actual))
  assert jax.tree.structure(expected) == jax.tree.structure(actual)
  for path, x in jax.tree_util.tree_flatten_with_path(expected)[0]:
    y = actual
    for p in path:
      y = y[p.key]
    assert x.shape == y.shape and x.dtype == y.dtype, (path, x.dtype, y.dtype)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.fixture(scope='module')
def params():
  return _mae_params(TEST_MODEL)


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)


def _out(tmp_path, fmt, name='export'):
  return str(tmp_path / (name + '.safetensors' if fmt == 'safetensors' else name))


# ----------------------------------------------------------------------------
# Round trips.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('fmt', weights.FORMATS)
@pytest.mark.parametrize('encoder_only', [True, False])
def test_round_trip_is_bit_exact(params, tmp_path, fmt, encoder_only):
  if fmt != 'orbax' and not HAS_SAFETENSORS:
    pytest.skip('safetensors is not installed')
  out = weights.export_weights(params, TEST_MODEL, fmt, _out(tmp_path, fmt), encoder_only=encoder_only)
  restored = weights.import_weights(out, TEST_MODEL)
  expected = {'encoder': params['encoder']} if encoder_only else params
  _assert_trees_equal(expected, restored)


@needs_safetensors
def test_round_trip_tiny_patch16_safetensors(tmp_path):
  params = _mae_params('mae_vit_tiny_patch16')
  out = weights.export_weights(params, 'mae_vit_tiny_patch16', 'safetensors',
                              _out(tmp_path, 'safetensors'), encoder_only=False)
  _assert_trees_equal(params, weights.import_weights(out, 'mae_vit_tiny_patch16'))
  # The file gets the mode the umask gives every other file (safetensors alone would write 0600).
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask


@needs_safetensors
def test_scanned_export_equals_unscanned(params, tmp_path):
  scanned = weights.stack_blocks(params)
  # The stacked tree is exactly the layout the scan_layers model creates.
  model = models.get_model(TEST_MODEL, scan_layers=True)
  abstract = _abstract(model, {'train': False})
  assert jax.tree.map(lambda x: x.shape, dict(abstract)) == jax.tree.map(lambda x: x.shape, scanned)
  a = weights.to_reference_state_dict(flax.core.freeze({'params': params}), TEST_MODEL)  # Variables work too.
  b = weights.to_reference_state_dict(scanned, TEST_MODEL, scan_layers=True)
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # Importing with scan_layers=True gives the stacked layout back.
  out = weights.export_weights(scanned, TEST_MODEL, 'safetensors', _out(tmp_path, 'safetensors'),
                              encoder_only=False)
  _assert_trees_equal(scanned, weights.import_weights(out, TEST_MODEL, scan_layers=True))


def test_scanned_model_runs_exported_blocks_in_order(params, tmp_path, images):
  """Stacked blocks (exported from a scan_layers model) compute the unscanned model's features."""
  scanned_model = models.get_model(TEST_MODEL, scan_layers=True)
  scanned = weights.stack_blocks(params)
  out = weights.export_weights(scanned, TEST_MODEL, 'orbax', _out(tmp_path, 'orbax'))
  unscanned = weights.import_weights(out, TEST_MODEL)
  assert 'blocks_1' in unscanned['encoder'] and 'blocks' not in unscanned['encoder']
  want = _encode(models.get_model(TEST_MODEL), unscanned, images)
  np.testing.assert_allclose(_encode(scanned_model, scanned, images), want, atol=1e-5)


@needs_safetensors
def test_classifier_round_trip_uses_reference_names(tmp_path):
  for global_pool in (True, False):
    model = models.get_classifier(TEST_MODEL, num_classes=10, global_pool=global_pool)
    params = _random_params(model)
    state = weights.to_reference_state_dict(params, TEST_MODEL)
    assert state['head.weight'].shape == (10, 32)
    assert ('fc_norm.weight' in state) == global_pool
    assert ('norm.weight' in state) == (not global_pool)  # The reference deletes norm with global_pool.
    out = weights.export_weights(params, TEST_MODEL, 'safetensors',
                                _out(tmp_path, 'safetensors', f'cls{global_pool}'))
    _assert_trees_equal(params, weights.import_weights(out, TEST_MODEL))


# ----------------------------------------------------------------------------
# Key names and shapes.
# ----------------------------------------------------------------------------


def _reference_keys(depth, decoder_depth):
  block = ['norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight',
           'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias',
           'mlp.fc2.weight', 'mlp.fc2.bias']
  keys = ['cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias',
          'norm.weight', 'norm.bias', 'decoder_embed.weight', 'decoder_embed.bias', 'mask_token',
          'decoder_pos_embed', 'decoder_norm.weight', 'decoder_norm.bias', 'decoder_pred.weight',
          'decoder_pred.bias']
  keys += [f'blocks.{i}.{k}' for i in range(depth) for k in block]
  keys += [f'decoder_blocks.{j}.{k}' for j in range(decoder_depth) for k in block]
  return sorted(keys)


def test_vit_b_reference_keys_and_shapes():
  shapes = weights.reference_key_shapes('mae_vit_base_patch16')  # No weights materialised.
  assert sorted(shapes) == _reference_keys(12, 8)
  expected = {
      'cls_token': (1, 1, 768), 'pos_embed': (1, 197, 768), 'patch_embed.proj.weight': (768, 3, 16, 16),
      'patch_embed.proj.bias': (768,), 'blocks.0.attn.qkv.weight': (2304, 768),
      'blocks.0.attn.qkv.bias': (2304,), 'blocks.11.attn.proj.weight': (768, 768),
      'blocks.0.mlp.fc1.weight': (3072, 768), 'blocks.0.mlp.fc2.weight': (768, 3072),
      'norm.weight': (768,), 'decoder_embed.weight': (512, 768), 'mask_token': (1, 1, 512),
      'decoder_pos_embed': (1, 197, 512), 'decoder_blocks.0.attn.qkv.weight': (1536, 512),
      'decoder_blocks.7.mlp.fc1.weight': (2048, 512), 'decoder_norm.weight': (512,),
      'decoder_pred.weight': (768, 512), 'decoder_pred.bias': (768,),
  }
  for key, shape in expected.items():
    assert shapes[key] == shape, key
  encoder = weights.reference_key_shapes('mae_vit_base_patch16', encoder_only=True)
  assert sorted(encoder) == [k for k in _reference_keys(12, 0) if not k.startswith(('decoder', 'mask'))]
  hf = weights.reference_key_shapes('mae_vit_base_patch16', hf=True)
  assert hf['vit.encoder.layer.11.attention.attention.query.weight'] == (768, 768)
  assert hf['vit.embeddings.position_embeddings'] == (1, 197, 768)
  assert hf['decoder.decoder_layers.7.attention.output.dense.weight'] == (512, 512)
  assert hf['decoder.decoder_pred.weight'] == (768, 512)
  assert len(hf) == len(shapes) + 4 * (12 + 8)  # qkv weight and bias each split in three.


@needs_safetensors
def test_exported_file_keys_and_layouts(params, tmp_path):
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  out = weights.export_weights(params, TEST_MODEL, 'safetensors', _out(tmp_path, 'safetensors'),
                              encoder_only=False)
  state = safetensors_numpy.load_file(out)
  assert sorted(state) == _reference_keys(2, 1)
  enc = params['encoder']
  np.testing.assert_array_equal(state['patch_embed.proj.weight'],
                                np.transpose(enc['patch_embed']['kernel'], (3, 2, 0, 1)))
  attn = enc['blocks_1']['attn']
  np.testing.assert_array_equal(state['blocks.1.attn.qkv.weight'][32:64], attn['key']['kernel'].T)
  np.testing.assert_array_equal(state['blocks.1.attn.qkv.bias'][64:], attn['value']['bias'])
  np.testing.assert_array_equal(state['pos_embed'][0],
                                models.pos_embed.get_2d_sincos_pos_embed(32, 4, cls_token=True))


@needs_safetensors
def test_metadata_written_and_used(params, tmp_path):
  out = weights.export_weights(params, TEST_MODEL, 'safetensors', _out(tmp_path, 'safetensors'),
                              metadata={'step': 123, 'config': {'mask_ratio': 0.75}},
                              model_overrides={'norm_pix_loss': True})
  meta_file = weights.metadata_path(out)
  assert meta_file == str(tmp_path / 'export.metadata.json')
  with open(meta_file) as f:
    meta = json.load(f)
  assert meta['model_name'] == TEST_MODEL and meta['step'] == 123 and meta['norm_pix_loss'] is True
  assert meta['image_size'] == 32 and meta['patch_size'] == 8 and meta['config'] == {'mask_ratio': 0.75}
  os.remove(meta_file)  # The safetensors header carries the same metadata.
  assert weights.read_metadata(out)['step'] == 123
  _assert_trees_equal({'encoder': params['encoder']}, weights.import_weights(out))  # Name from metadata.
  for fmt in ('orbax', 'hf'):
    folder = weights.export_weights(params, TEST_MODEL, fmt, _out(tmp_path, fmt, fmt))
    assert os.path.isfile(os.path.join(folder, weights.METADATA_FILENAME))


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


def _save_state(state, path):
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
  return path


@needs_safetensors
def test_errors_name_file_and_keys(params, tmp_path):
  state = weights.to_reference_state_dict(params, TEST_MODEL)
  bad = dict(state, **{'blocks.0.mlp.fc1.weight': np.zeros((7, 32), np.float32)})
  path = _save_state(bad, str(tmp_path / 'wrong_shape.safetensors'))
  with pytest.raises(ValueError, match=r'wrong_shape\.safetensors[\s\S]*blocks\.0\.mlp\.fc1\.weight: \(7, 32\)'):
    weights.import_weights(path, TEST_MODEL)
  missing = {k: v for k, v in state.items() if k != 'blocks.1.norm2.bias'}
  path = _save_state(missing, str(tmp_path / 'missing.safetensors'))
  with pytest.raises(ValueError, match=r'missing\.safetensors[\s\S]*missing keys \(1\): blocks\.1\.norm2\.bias'):
    weights.import_weights(path, TEST_MODEL)
  extra = dict(state, **{'blocks.2.norm1.weight': np.ones(32, np.float32)})
  path = _save_state(extra, str(tmp_path / 'extra.safetensors'))
  with pytest.raises(ValueError, match=r'unexpected keys \(1\): blocks\.2\.norm1\.weight'):
    weights.import_weights(path, TEST_MODEL)
  partial = {k: v for k, v in state.items() if not k.startswith('decoder_pred')}
  path = _save_state(partial, str(tmp_path / 'partial.safetensors'))
  with pytest.raises(ValueError, match=r'missing keys \(2\): decoder_pred\.bias, decoder_pred\.weight'):
    weights.import_weights(path, TEST_MODEL)
  with pytest.raises(ValueError, match='does not match mae_vit_tiny_patch16'):
    weights.to_reference_state_dict(params, 'mae_vit_tiny_patch16')
  learned = _save_state(dict(state, pos_embed=state['pos_embed'] + 0.5), str(tmp_path / 'learned.safetensors'))
  with pytest.raises(ValueError, match=r'learned\.safetensors: pos_embed .* the weights are 32 wide, the model 192; '
                                       r'name the model they were trained with'):
    weights.import_weights(learned, 'mae_vit_tiny_patch16')  # The wrong model name for a learned table.


def test_output_path_errors(params, tmp_path):
  with pytest.raises(ValueError, match=r'\*\.safetensors'):
    weights.export_weights(params, TEST_MODEL, 'safetensors', str(tmp_path / 'weights.bin'))
  with pytest.raises(ValueError, match='format='):
    weights.export_weights(params, TEST_MODEL, 'onnx', str(tmp_path / 'x'))
  out = weights.export_weights(params, TEST_MODEL, 'orbax', str(tmp_path / 'enc'))
  with pytest.raises(FileExistsError, match='overwrite'):
    weights.export_weights(params, TEST_MODEL, 'orbax', out)
  weights.export_weights(params, TEST_MODEL, 'orbax', out, overwrite=True)
  os.makedirs(tmp_path / 'precious')
  (tmp_path / 'precious' / 'notes.txt').write_text('keep me')
  with pytest.raises(FileExistsError, match='holds no export'):
    weights.export_weights(params, TEST_MODEL, 'hf', str(tmp_path / 'precious'), overwrite=True)


@needs_safetensors
def test_a_trained_position_table_is_kept_as_stored(params, tmp_path):
  """A table that is not the fixed sin-cos one (a fine-tuned model's) comes back as encoder/pos_embed, unresized."""
  state = weights.to_reference_state_dict(params, TEST_MODEL)
  table = np.random.default_rng(0).standard_normal((1, 17, 32)).astype(np.float32)
  state['pos_embed'] = table
  path = _save_state(state, str(tmp_path / 'learned_pos.safetensors'))
  for image_size in (None, 64):  # At another image size too: the fine-tuning loader resizes it, not the import.
    restored = weights.import_weights(path, TEST_MODEL, **({} if image_size is None else {'image_size': image_size}))
    np.testing.assert_array_equal(restored['encoder'].pop('pos_embed'), table)
    _assert_trees_equal(params, restored)


# ----------------------------------------------------------------------------
# PyTorch: a minimal reference ViT with the reference key names.
# ----------------------------------------------------------------------------


def _torch_vit(torch, *, dim, depth, heads, patch, in_chans, num_patches, mlp_ratio=4.0):
  nn = torch.nn

  class Attention(nn.Module):

    def __init__(self):
      super().__init__()
      self.qkv = nn.Linear(dim, 3 * dim)
      self.proj = nn.Linear(dim, dim)

    def forward(self, x):
      b, n, c = x.shape
      qkv = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
      q, k, v = qkv[0], qkv[1], qkv[2]
      attn = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
      return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))

  class Mlp(nn.Module):

    def __init__(self):
      super().__init__()
      self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
      self.act = nn.GELU()  # Exact erf GELU.
      self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x):
      return self.fc2(self.act(self.fc1(x)))

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.norm1 = nn.LayerNorm(dim, eps=1e-6)
      self.attn = Attention()
      self.norm2 = nn.LayerNorm(dim, eps=1e-6)
      self.mlp = Mlp()

    def forward(self, x):
      x = x + self.attn(self.norm1(x))
      return x + self.mlp(self.norm2(x))

  class PatchEmbed(nn.Module):

    def __init__(self):
      super().__init__()
      self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):  # [N, C, H, W] -> [N, L, D]
      return self.proj(x).flatten(2).transpose(1, 2)

  class VisionTransformer(nn.Module):

    def __init__(self):
      super().__init__()
      self.patch_embed = PatchEmbed()
      self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
      self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim), requires_grad=False)
      self.blocks = nn.ModuleList([Block() for _ in range(depth)])
      self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
      x = self.patch_embed(x) + self.pos_embed[:, 1:]
      cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
      x = torch.cat([cls, x], dim=1)
      for block in self.blocks:
        x = block(x)
      return self.norm(x)

  return VisionTransformer()


@needs_safetensors
def test_torch_reference_vit_matches_encoder(params, images, tmp_path):
  torch = pytest.importorskip('torch')
  safetensors_torch = pytest.importorskip('safetensors.torch')
  out = weights.export_weights(params, TEST_MODEL, 'safetensors', _out(tmp_path, 'safetensors'))
  net = _torch_vit(torch, dim=32, depth=2, heads=2, patch=8, in_chans=3, num_patches=16)
  net.load_state_dict(safetensors_torch.load_file(out), strict=True)
  net.eval()
  with torch.no_grad():
    want = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()  # NHWC -> NCHW
  got = _encode(models.get_model(TEST_MODEL), params, images)
  np.testing.assert_allclose(got[:, 0], want[:, 0], atol=1e-4)  # cls features
  np.testing.assert_allclose(got, want, atol=1e-4)


class _Unpicklable:
  """A class a weights-only load must refuse to build."""


def test_torch_pth_import(params, tmp_path):
  torch = pytest.importorskip('torch')
  state = weights.to_reference_state_dict(params, TEST_MODEL)
  path = str(tmp_path / 'checkpoint-399.pth')
  # As the reference's misc.save_model: args is an argparse.Namespace.
  torch.save({'model': {k: torch.from_numpy(v) for k, v in state.items()}, 'epoch': 399,
              'args': argparse.Namespace(model='mae_vit_test', mask_ratio=0.75)}, path)
  _assert_trees_equal(params, weights.import_weights(path, TEST_MODEL))
  unsafe = str(tmp_path / 'unsafe.pth')
  torch.save({'model': {}, 'payload': _Unpicklable()}, unsafe)
  with pytest.raises(ValueError, match=r'unsafe\.pth: torch\.load\(weights_only=True\) failed'):
    weights.import_weights(unsafe, TEST_MODEL)
  bare = str(tmp_path / 'bare.pth')
  torch.save({k: torch.from_numpy(v) for k, v in state.items() if not k.startswith(('decoder', 'mask'))}, bare)
  _assert_trees_equal({'encoder': params['encoder']}, weights.import_weights(bare, TEST_MODEL))
  for prefix in ('module.', 'model.'):  # A DDP wrapper's names; a Lightning module's `model` attribute.
    wrapped = str(tmp_path / 'wrapped.pth')
    torch.save({'state_dict': {prefix + k: torch.from_numpy(v) for k, v in state.items()}}, wrapped)
    _assert_trees_equal(params, weights.import_weights(wrapped, TEST_MODEL))


def test_files_that_are_not_weights_say_what_they_are(params, tmp_path):
  """A git-lfs pointer (a clone without git-lfs), a saved web page, a file cut short: named, with the fix."""
  pointer = b'version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 345678\n'
  exported = str(tmp_path / 'good.safetensors')
  weights.export_weights(params, TEST_MODEL, 'safetensors', exported)
  with open(exported, 'rb') as f:
    whole = f.read()
  cases = {'lfs.safetensors': (pointer, 'it is a git-lfs pointer, not the weights: fetch them with `git lfs pull`'),
           'page.safetensors': (b'<!DOCTYPE html><html></html>', 'it is an HTML or XML page'),
           'cut.safetensors': (whole[:len(whole) // 2], 'damaged, or cut short: download it again')}
  for name, (data, match) in cases.items():
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf'{name} is not a readable safetensors file \(.*\); {re.escape(match)}'):
      weights.import_weights(str(path), TEST_MODEL)
  folder = tmp_path / 'hf'
  folder.mkdir()
  (folder / 'model.safetensors').write_bytes(pointer)  # A Hugging Face repo cloned without git-lfs.
  with pytest.raises(ValueError, match=r'hf/model\.safetensors is not a readable safetensors file.*git-lfs pointer'):
    weights.import_weights(str(folder), TEST_MODEL)
  if importlib.util.find_spec('torch'):
    (tmp_path / 'lfs.pth').write_bytes(pointer)
    with pytest.raises(ValueError, match=r'lfs\.pth is not a PyTorch checkpoint: it is a git-lfs pointer'):
      weights.import_weights(str(tmp_path / 'lfs.pth'), TEST_MODEL)


def test_pth_without_torch_names_the_install(tmp_path, monkeypatch):
  path = tmp_path / 'checkpoint.pth'
  path.write_bytes(b'not read')
  monkeypatch.setitem(sys.modules, 'torch', None)  # As if torch were not installed.
  with pytest.raises(ImportError, match=r'checkpoint\.pth needs PyTorch: pip install mae_jax\[torch\]'):
    weights.import_weights(str(path), TEST_MODEL)


# ----------------------------------------------------------------------------
# Hugging Face transformers.
# ----------------------------------------------------------------------------


def test_hf_export_loads_into_transformers(params, images, tmp_path):
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  import torch  # pylint: disable=g-import-not-at-top
  want = _encode(models.get_model(TEST_MODEL), params, images)
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
  noise = torch.arange(16, dtype=torch.float32).expand(2, 16)  # Ascending: keeps patch order.
  for encoder_only in (True, False):
    folder = weights.export_weights(params, TEST_MODEL, 'hf', str(tmp_path / f'hf{encoder_only}'),
                                   encoder_only=encoder_only)
    net, info = transformers.ViTMAEModel.from_pretrained(folder, mask_ratio=0.0, output_loading_info=True)
    assert not info['missing_keys'] and not info['mismatched_keys'], info
    net.eval()
    with torch.no_grad():
      got = net(pixel_values=pixels, noise=noise).last_hidden_state.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
  # The full export is a ViTMAEForPreTraining; its own save_pretrained output imports back.
  full, info = transformers.ViTMAEForPreTraining.from_pretrained(folder, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  resaved = str(tmp_path / 'resaved')
  full.save_pretrained(resaved)
  _assert_trees_equal(params, weights.import_weights(resaved))  # Model found from config.json.


def test_a_non_square_grid_exports_to_hf_without_the_decoder_only(tmp_path):
  shape = {'image_size': (32, 48)}
  trained = models.get_model(TEST_MODEL, **shape).init(
      {'params': jax.random.key(1), 'mask': jax.random.key(2)}, jnp.zeros((1, 32, 48, 3)), train=False)['params']
  with pytest.raises(ValueError, match=r"a 4x6 patch grid; transformers' ViTMAEForPreTraining only loads square"):
    weights.export_weights(trained, TEST_MODEL, 'hf', str(tmp_path / 'full'), encoder_only=False,
                           model_overrides=shape)
  assert not os.path.exists(tmp_path / 'full')
  weights.export_weights(trained, TEST_MODEL, 'hf', str(tmp_path / 'encoder'), model_overrides=shape)


def test_hf_folder_of_any_sizes_imports_from_its_config_json(tmp_path):
  """A ViTMAE whose sizes no registered model has (depth 3, MLP ratio 2, its own decoder) imports as it computes."""
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  import torch  # pylint: disable=g-import-not-at-top

  from mae_jax.models import pos_embed  # pylint: disable=g-import-not-at-top
  hf_sizes = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8, decoder_hidden_size=48, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                  decoder_intermediate_size=96, layer_norm_eps=1e-6)
  torch.manual_seed(0)
  net = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**hf_sizes)).eval()
  with torch.no_grad():  # The fixed sin-cos tables (transformers' fresh model leaves them at zero).
    for name, table in net.named_parameters():
      if name.endswith(('position_embeddings', 'decoder_pos_embed')):
        table.copy_(torch.from_numpy(pos_embed.get_2d_sincos_pos_embed(table.shape[-1], (4, 4), cls_token=True)[None]))
  folder = str(tmp_path / 'hf')
  net.save_pretrained(folder)
  name, overrides = weights.resolve_model(folder, None, {})
  assert (name, overrides['depth'], overrides['mlp_ratio'], overrides['decoder_embed_dim']) == (TEST_MODEL, 3, 2.0, 48)
  params = weights.import_weights(folder)
  x = np.random.default_rng(2).standard_normal((2, 32, 32, 3)).astype(np.float32)
  noise = np.random.default_rng(3).uniform(size=(2, 16)).astype(np.float32)
  with torch.no_grad():
    want = net(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)), noise=torch.from_numpy(noise)).logits.numpy()
  _, got, _ = models.get_model(name, **overrides).apply({'params': params}, x, noise=jnp.asarray(noise), train=False)
  np.testing.assert_allclose(got, want, atol=1e-4)
  # Settings mae_jax does not compute are refused, naming the file and the key.
  source = str(tmp_path / 'config.json')
  for change, match in (({'hidden_act': 'relu'}, "hidden_act='relu'"), ({'qkv_bias': False}, 'qkv_bias=false'),
                        ({'decoder_intermediate_size': 192}, "the decoder's MLP ratio \\(4\\) differs")):
    with pytest.raises(ValueError, match=rf'config\.json: {match}'):
      weights.model_name_from_hf_config({'model_type': 'vit_mae', **hf_sizes, **change}, source)


# ----------------------------------------------------------------------------
# Command line and workdirs.
# ----------------------------------------------------------------------------


@needs_safetensors
def test_a_file_without_metadata_gives_its_channels_and_size(tmp_path):
  """A reference-named file of a 1-channel MAE trained at 48 px: load_weights reads both from it."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  shape = dict(in_channels=1, image_size=48)
  model = models.get_model(TEST_MODEL, **shape)
  trained = model.init({'params': jax.random.key(1), 'mask': jax.random.key(2)}, jnp.zeros((1, 48, 48, 1)),
                       train=False)['params']
  state = weights.to_reference_state_dict(trained, TEST_MODEL, **shape)
  assert state['pos_embed'].shape == (1, 37, 32)  # The fixed table of its 6x6 grid.
  path = str(tmp_path / 'gray48.safetensors')
  safetensors.numpy.save_file(state, path)
  got, name, overrides = weights.load_weights(path, TEST_MODEL)
  assert (name, overrides) == (TEST_MODEL, shape)
  _assert_trees_equal(trained, got)
  with pytest.raises(ValueError, match=r'patch_embed\.proj\.weight: \(32, 1, 8, 8\) \(expected \(32, 3, 8, 8\)\)'):
    weights.import_weights(path, TEST_MODEL)  # The model as asked: the file's shapes are checked against it.
  # The caller's settings win over what the file shows (features --override, export --override).
  assert weights.load_weights(path, TEST_MODEL, image_size=32, in_channels=1)[2]['image_size'] == 32
  assert weights.files.parse_overrides(['in_channels=4', 'image_size=(32, 48)', 'norm_pix_loss=True']) == {
      'in_channels': 4, 'image_size': (32, 48), 'norm_pix_loss': True}
  assert weights.files.parse_overrides(['norm_pix_loss=false'])['norm_pix_loss'] is False  # Not the text 'false'.
  for bad, match in (('in_chanels=4', "'in_chanels' is not a model field; known: .*in_channels"),
                     ('in_channels', 'expected KEY=VALUE')):
    with pytest.raises(ValueError, match=match):
      weights.files.parse_overrides([bad])


@needs_safetensors
def test_cli_converts_a_file(params, tmp_path):
  source = weights.export_weights(params, TEST_MODEL, 'safetensors', _out(tmp_path, 'safetensors'),
                                 encoder_only=False)
  out = str(tmp_path / 'converted')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'mae_jax.export', f'--import_from={source}', '--format=orbax',
       f'--out={out}', '--full'], capture_output=True, text=True, env=env, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  _assert_trees_equal(params, weights.import_weights(out))
  result = subprocess.run(  # --override: model fields for a file without metadata; a typo is named.
      [sys.executable, '-m', 'mae_jax.export', f'--import_from={source}', '--format=orbax', f'--out={out}2',
       '--override=in_chanels=1'], capture_output=True, text=True, env=env, timeout=120, check=False)
  assert result.returncode == 1 and "'in_chanels' is not a model field" in result.stderr, result.stderr[-2000:]


def test_model_from_config_reads_a_run_config_as_the_trainers_do():
  config = {'model': {'name': TEST_MODEL, 'scan_layers': True}, 'dataset': {'image_size': [32, 32], 'channels': 3},
            'norm_pix_loss': True, 'mask_ratio': 0.75}
  name, overrides = export.model_from_config(config)
  assert name == TEST_MODEL
  assert overrides == {'scan_layers': True, 'image_size': (32, 32), 'in_channels': 3, 'norm_pix_loss': True}
  with pytest.raises(ValueError, match='no model.name: pass --model= with --import_from'):
    export.model_from_config({'model': {'scan_layers': True}, 'dataset': {}})


@needs_safetensors
def test_export_from_workdir(params, tmp_path):
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  scanned = weights.stack_blocks(params)
  config = {'model': {'name': TEST_MODEL, 'scan_layers': True, 'dtype': 'float32'},
            'dataset': {'image_size': 32, 'channels': 3}, 'norm_pix_loss': True, 'mask_ratio': 0.75}
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  ckpt.save(7, scanned, {'count': np.zeros((), np.int32)}, {'step': 7, 'config': config})
  ckpt.close()
  out = export.export_from_workdir(workdir, 'hf', str(tmp_path / 'hf'), full=True)
  with open(os.path.join(out, 'config.json')) as f:
    hf_config = json.load(f)
  assert hf_config['norm_pix_loss'] is True and hf_config['layer_norm_eps'] == 1e-6
  meta = weights.read_metadata(out)
  assert meta['step'] == 7 and meta['config']['model']['name'] == TEST_MODEL
  _assert_trees_equal(params, weights.import_weights(out))


def test_a_refused_export_leaves_the_previous_one_and_an_existing_out_is_refused_before_the_restore(
    params, tmp_path, monkeypatch):
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  keep = weights.export_weights(params, TEST_MODEL, 'hf', str(tmp_path / 'keep_hf'))
  classifier = _random_params(models.get_classifier(TEST_MODEL, num_classes=10, global_pool=True))
  with pytest.raises(ValueError, match='a fine-tuned classifier has no ViTMAE equivalent'):
    weights.export_weights(classifier, TEST_MODEL, 'hf', keep, overwrite=True)
  assert weights.read_metadata(keep) is not None  # The export that was there is still there.
  from mae_jax.weights import files  # pylint: disable=g-import-not-at-top

  def no_safetensors():
    raise ImportError('the safetensors / hf formats need the safetensors package')

  with monkeypatch.context() as patch:  # A failure while the files are made, after the checks.
    patch.setattr(files, '_safetensors', no_safetensors)
    with pytest.raises(ImportError):
      weights.export_weights(params, TEST_MODEL, 'hf', keep, overwrite=True)
  assert weights.read_metadata(keep) is not None and os.path.exists(os.path.join(keep, 'model.safetensors'))

  def no_restore(*args, **kwargs):
    raise AssertionError('restored before --out was checked')

  monkeypatch.setattr(checkpoint, 'load_params', no_restore)
  with pytest.raises(FileExistsError, match='keep_hf exists'):
    export.export_from_workdir(str(tmp_path / 'run'), 'hf', keep)
  with pytest.raises(ValueError, match=r'\*\.safetensors'):
    export.export_from_workdir(str(tmp_path / 'run'), 'safetensors', str(tmp_path / 'x.bin'))


def test_a_linear_probe_workdir_has_no_encoder_to_export(tmp_path):
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'probe')
  head = {'head': {'kernel': np.zeros((32, 10), np.float32), 'bias': np.zeros((10,), np.float32)}}
  config = {'model': {'name': TEST_MODEL}, 'downstream': 'linprobe', 'pretrained_workdir': '/runs/mae'}
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  ckpt.save(3, head, {'count': np.zeros((), np.int32)}, {'step': 3, 'config': config})
  ckpt.close()
  with pytest.raises(ValueError, match=r'holds no encoder.*export the encoder it probed \(/runs/mae\)'):
    export.export_from_workdir(workdir, 'safetensors', str(tmp_path / 'enc.safetensors'))
