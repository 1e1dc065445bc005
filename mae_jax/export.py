"""Weight export and import: Orbax, safetensors (reference / timm names), Hugging Face.

Python API:

  export_weights(params, 'mae_vit_base_patch16', 'safetensors', 'mae_base.safetensors')
  params = import_weights('mae_pretrain_vit_base.pth', 'mae_vit_base_patch16')

Formats:
  orbax        the params (encoder only, or all of them) as their own Orbax
               checkpoint, in the unscanned layout; restores without optimizer
               state.
  safetensors  one file with the reference / timm key names (`blocks.0.attn.qkv.weight`
               [3D, D], ...), readable by `timm` and by the reference code.
  hf           a Hugging Face folder: config.json + model.safetensors for
               `transformers.ViTMAEForPreTraining` (full) or `ViTMAEModel` (encoder
               only), with the Hub's key names.

Every export writes a JSON file of metadata beside it (`metadata_path(out)`):
model name and overrides, image and patch size, norm_pix_loss, step, config.

Imports read an Orbax folder, a safetensors file with reference / timm or Hugging
Face names (told apart by the key names), a Hugging Face folder, or a reference
`.pth` checkpoint (state dict under 'model', loaded with `weights_only=True`;
needs torch). The result matches `models.get_model(name, **overrides)`'s params
layout, scanned or not. A file without a decoder gives params with only
'encoder'; a fine-tuned classifier (`head.*`) gives the `get_classifier` layout.

Position tables are fixed sin-cos tables in mae_jax, not parameters: exports write
them (`pos_embed`, `decoder_pos_embed`), imports compare them with the fixed
table and ignore them, logging a warning if they differ (a learned or resized
table).

Command line:

  python -m mae_jax.export --workdir=DIR [--step=N] --format=hf --out=PATH [--full]
  python -m mae_jax.export --import_from=FILE [--model=NAME] --format=orbax --out=PATH
"""

import argparse
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mae_jax import models
from mae_jax.models import mae, pos_embed, vit

FORMATS = ('orbax', 'safetensors', 'hf')
METADATA_FILENAME = 'mae_jax_metadata.json'
HF_WEIGHTS = 'model.safetensors'
HF_INDEX = 'model.safetensors.index.json'
HF_TORCH_WEIGHTS = 'pytorch_model.bin'
TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')
POS_KEYS = ('pos_embed', 'decoder_pos_embed')  # Reference names of the fixed tables.
TORCH_HINT = 'pip install mae_jax[torch]  (or: pip install torch safetensors)'
SAFETENSORS_HINT = 'pip install safetensors  (or: pip install mae_jax[torch])'
# Model fields that change the params or the data they fit; kept in the metadata.
STRUCTURAL_FIELDS = ('image_size', 'in_channels', 'patch_size', 'embed_dim', 'depth', 'num_heads',
                     'decoder_embed_dim', 'decoder_depth', 'decoder_num_heads', 'mlp_ratio',
                     'norm_pix_loss', 'encoder_mask_tokens')
_MAX_LISTED = 12  # Keys named in an error message before "... and N more".

Tree = dict[str, Any]


# ----------------------------------------------------------------------------
# Params trees: numpy, scanned <-> unscanned, layouts.
# ----------------------------------------------------------------------------


def _numpy_tree(tree) -> Tree:
  """Host numpy copy of a params tree (bfloat16 leaves become float32)."""
  def to_numpy(x):
    x = np.asarray(jax.device_get(x))
    return x.astype(np.float32) if x.dtype.name == 'bfloat16' else x
  return jax.tree.map(to_numpy, dict(tree))


def _plain(tree):
  """Nested plain dicts (FrozenDict and other mappings become dict)."""
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def _unwrap(params) -> Tree:
  """Accepts params or {'params': params} (a variables dict), as nested plain dicts."""
  params = _plain(params)
  if set(params) == {'params'}:
    params = params['params']
  return params


def unstack_blocks(params: Tree) -> Tree:
  """Scanned layout (`blocks` with a leading [depth] axis) -> `blocks_{i}` subtrees."""
  out = {}
  for name, sub in params.items():
    if isinstance(sub, dict) and 'blocks' in sub:
      sub = dict(sub)
      stacked = sub.pop('blocks')
      depth = jax.tree.leaves(stacked)[0].shape[0]
      for i in range(depth):
        sub[f'blocks_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
    out[name] = sub
  return out


def stack_blocks(params: Tree) -> Tree:
  """Unscanned `blocks_{i}` subtrees -> one `blocks` subtree with a leading [depth] axis."""
  out = {}
  for name, sub in params.items():
    if isinstance(sub, dict) and 'blocks_0' in sub:
      sub = dict(sub)
      depth = sum(1 for k in sub if re.fullmatch(r'blocks_\d+', k))
      blocks = [sub.pop(f'blocks_{i}') for i in range(depth)]
      sub['blocks'] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    out[name] = sub
  return out


def _layout(params: Tree) -> str:
  if 'head' in params:
    return 'classifier'
  return 'mae' if 'decoder' in params else 'encoder'


def _flat_shapes(tree: Tree) -> dict[str, tuple]:
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat['/'.join(str(getattr(p, 'key', p)) for p in path)] = tuple(leaf.shape)
  return flat


def _mae_fields(overrides: dict) -> dict:
  fields = set(mae.MaskedAutoencoder.__dataclass_fields__) - {'parent', 'name'}
  return {k: v for k, v in overrides.items() if k in fields}


def model_settings(model_name: str, overrides: dict) -> mae.MaskedAutoencoder:
  """The (unbound) MaskedAutoencoder of a name: every field, defaults included."""
  return models.get_model(model_name, **_mae_fields(overrides))


def _image_hw(model: mae.MaskedAutoencoder) -> tuple[int, int]:
  size = model.image_size
  return (size, size) if isinstance(size, int) else tuple(size)


def _abstract_params(model_name: str, layout: str, overrides: dict, num_classes: int = 0,
                     global_pool: bool = True) -> Tree:
  """ShapeDtypeStructs of the unscanned params a layout of a named model has."""
  overrides = {**overrides, 'scan_layers': False}
  settings = model_settings(model_name, overrides)
  if layout == 'classifier':
    model = models.get_classifier(model_name, num_classes, global_pool, **overrides)
    init = lambda x: model.init({'params': jax.random.key(0)}, x)
  else:
    model = settings
    init = lambda x: model.init({'params': jax.random.key(0), 'mask': jax.random.key(0)}, x, train=False)
  h, w = _image_hw(settings)
  images = jax.ShapeDtypeStruct((1, h, w, settings.in_channels), jnp.float32)
  params = jax.eval_shape(init, images)['params']
  params = dict(params)
  if layout == 'encoder':
    params = {'encoder': params['encoder']}
  return params


def _grid(model_name: str, overrides: dict) -> tuple[int, int]:
  return model_settings(model_name, overrides).grid_size


def _check_shapes(found: dict, expected: dict, source: str, what: str, hint: str = ''):
  """Raises ValueError naming the source and every missing, unexpected or mis-shaped key."""
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  wrong = sorted(f'{k}: {tuple(found[k])} (expected {tuple(expected[k])})'
                 for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
  if not (missing or unexpected or wrong):
    return
  def listed(keys):
    more = f' ... and {len(keys) - _MAX_LISTED} more' if len(keys) > _MAX_LISTED else ''
    return ', '.join(keys[:_MAX_LISTED]) + more
  lines = [f'{source} does not match {what}:']
  if missing:
    lines.append(f'  missing keys ({len(missing)}): {listed(missing)}')
  if unexpected:
    lines.append(f'  unexpected keys ({len(unexpected)}): {listed(unexpected)}')
  if wrong:
    lines.append(f'  shape mismatches ({len(wrong)}): {listed(wrong)}')
  if hint:
    lines.append(f'  {hint}')
  raise ValueError('\n'.join(lines))


def _canonical_params(params, model_name: str, overrides: dict, source: str = 'params') -> Tree:
  """Unscanned numpy params, checked against the named model's layout."""
  params = unstack_blocks(_numpy_tree(_unwrap(params)))  # Host copies first, then slice.
  layout = _layout(params)
  num_classes = params['head']['kernel'].shape[-1] if layout == 'classifier' else 0
  expected = _abstract_params(model_name, layout, overrides, num_classes, 'fc_norm' in params)
  _check_shapes(_flat_shapes(params), _flat_shapes(expected), source,
                f'{model_name} ({layout} params, overrides {overrides or "none"})',
                'pass the model name (and overrides such as image_size / in_channels) it was trained with')
  return params


# ----------------------------------------------------------------------------
# mae_jax <-> reference / timm names.
# ----------------------------------------------------------------------------


def _linear_to_ref(p, prefix):  # Flax kernel [in, out] -> torch weight [out, in].
  return {prefix + 'weight': p['kernel'].T, prefix + 'bias': p['bias']}


def _norm_to_ref(p, prefix):
  return {prefix + 'weight': p['scale'], prefix + 'bias': p['bias']}


def _block_to_ref(block, prefix, xp):
  attn = block['attn']
  names = ('query', 'key', 'value')
  state = {
      # qkv rows are ordered (3, heads, head_dim): q, k, v stacked.
      prefix + 'attn.qkv.weight': xp.concatenate([attn[n]['kernel'].T for n in names], axis=0),
      prefix + 'attn.qkv.bias': xp.concatenate([attn[n]['bias'] for n in names], axis=0),
  }
  state.update(_norm_to_ref(block['norm1'], prefix + 'norm1.'))
  state.update(_linear_to_ref(attn['proj'], prefix + 'attn.proj.'))
  state.update(_norm_to_ref(block['norm2'], prefix + 'norm2.'))
  state.update(_linear_to_ref(block['mlp']['fc1'], prefix + 'mlp.fc1.'))
  state.update(_linear_to_ref(block['mlp']['fc2'], prefix + 'mlp.fc2.'))
  return state


def _block_indices(tree: Tree) -> list[int]:
  return sorted(int(k.split('_')[1]) for k in tree if re.fullmatch(r'blocks_\d+', k))


def _to_reference(params: Tree, grid, xp=np) -> dict:
  """Unscanned params -> reference state dict (xp: np for data, jnp under eval_shape)."""
  unknown = sorted(set(params) - {'encoder', 'decoder', 'fc_norm', 'head'})
  if unknown:
    raise ValueError(
        f'params {unknown} have no reference / timm name (e.g. the encoder_mask_tokens ablation): '
        f'export them with format=orbax')
  state = {}
  enc = params['encoder']
  width = enc['cls_token'].shape[-1]
  state['cls_token'] = enc['cls_token']
  state['pos_embed'] = pos_embed.get_2d_sincos_pos_embed(width, grid, cls_token=True)[None]
  state['patch_embed.proj.weight'] = enc['patch_embed']['kernel'].transpose(3, 2, 0, 1)  # HWIO -> OIHW
  state['patch_embed.proj.bias'] = enc['patch_embed']['bias']
  for i in _block_indices(enc):
    state.update(_block_to_ref(enc[f'blocks_{i}'], f'blocks.{i}.', xp))
  if 'norm' in enc:
    state.update(_norm_to_ref(enc['norm'], 'norm.'))
  if 'decoder' in params:
    dec = params['decoder']
    dec_width = dec['mask_token'].shape[-1]
    state.update(_linear_to_ref(dec['embed'], 'decoder_embed.'))
    state['mask_token'] = dec['mask_token']
    state['decoder_pos_embed'] = pos_embed.get_2d_sincos_pos_embed(dec_width, grid, cls_token=True)[None]
    for j in _block_indices(dec):
      state.update(_block_to_ref(dec[f'blocks_{j}'], f'decoder_blocks.{j}.', xp))
    state.update(_norm_to_ref(dec['norm'], 'decoder_norm.'))
    state.update(_linear_to_ref(dec['pred'], 'decoder_pred.'))
  if 'fc_norm' in params:
    state.update(_norm_to_ref(params['fc_norm'], 'fc_norm.'))
  if 'head' in params:
    state.update(_linear_to_ref(params['head'], 'head.'))
  return state


def _linear_from_ref(state, prefix):
  return {'kernel': state[prefix + 'weight'].T, 'bias': state[prefix + 'bias']}


def _norm_from_ref(state, prefix):
  return {'scale': state[prefix + 'weight'], 'bias': state[prefix + 'bias']}


def _block_from_ref(state, prefix):
  qkv_w, qkv_b = state[prefix + 'attn.qkv.weight'], state[prefix + 'attn.qkv.bias']
  width = qkv_w.shape[1]
  attn = {name: {'kernel': qkv_w[k * width:(k + 1) * width].T, 'bias': qkv_b[k * width:(k + 1) * width]}
          for k, name in enumerate(('query', 'key', 'value'))}
  attn['proj'] = _linear_from_ref(state, prefix + 'attn.proj.')
  return {'norm1': _norm_from_ref(state, prefix + 'norm1.'), 'attn': attn,
          'norm2': _norm_from_ref(state, prefix + 'norm2.'),
          'mlp': {'fc1': _linear_from_ref(state, prefix + 'mlp.fc1.'),
                  'fc2': _linear_from_ref(state, prefix + 'mlp.fc2.')}}


def _from_reference(state: dict, template: Tree) -> Tree:
  """Reference state dict (already checked) -> unscanned params shaped like template."""
  params = {}
  enc_t = template['encoder']
  enc = {'cls_token': state['cls_token'],
         'patch_embed': {'kernel': state['patch_embed.proj.weight'].transpose(2, 3, 1, 0),  # OIHW -> HWIO
                         'bias': state['patch_embed.proj.bias']}}
  for i in _block_indices(enc_t):
    enc[f'blocks_{i}'] = _block_from_ref(state, f'blocks.{i}.')
  if 'norm' in enc_t:
    enc['norm'] = _norm_from_ref(state, 'norm.')
  params['encoder'] = enc
  if 'decoder' in template:
    dec = {'embed': _linear_from_ref(state, 'decoder_embed.'), 'mask_token': state['mask_token'],
           'norm': _norm_from_ref(state, 'decoder_norm.'), 'pred': _linear_from_ref(state, 'decoder_pred.')}
    for j in _block_indices(template['decoder']):
      dec[f'blocks_{j}'] = _block_from_ref(state, f'decoder_blocks.{j}.')
    params['decoder'] = dec
  if 'fc_norm' in template:
    params['fc_norm'] = _norm_from_ref(state, 'fc_norm.')
  if 'head' in template:
    params['head'] = _linear_from_ref(state, 'head.')
  # The model's parameter dtype (float32): a float16 / float64 file is cast, float32 is copied bit-exactly.
  return jax.tree.map(lambda x, t: np.ascontiguousarray(x, dtype=t.dtype), params, template)


def _reference_shapes(template: Tree, grid) -> dict[str, tuple]:
  """Key -> shape of the reference state dict of a params template, without data."""
  shapes = jax.eval_shape(lambda p: _to_reference(p, grid, jnp), template)
  return {k: tuple(v.shape) for k, v in shapes.items()}


def reference_key_shapes(model_name: str, *, encoder_only: bool = False, hf: bool = False,
                         **model_overrides) -> dict[str, tuple]:
  """Key -> shape of a named model's export (reference / timm names, or HF's), without any data."""
  layout = 'encoder' if encoder_only else 'mae'
  template = _abstract_params(model_name, layout, model_overrides)
  shapes = _reference_shapes(template, _grid(model_name, model_overrides))
  if not hf:
    return shapes
  prefix = '' if encoder_only else 'vit.'
  out = {}
  for key, shape in shapes.items():
    names = hf_key_names(key, prefix)
    for name in names:
      out[name] = (shape[0] // len(names),) + tuple(shape[1:])
  return out


def to_reference_state_dict(params, model_name: str, **model_overrides) -> dict[str, np.ndarray]:
  """mae_jax params (scanned or not; MAE, encoder or classifier) -> reference / timm state dict.

  Keys and layouts are those of the reference repository and timm's
  VisionTransformer: torch Linear weights [out, in], the patch Conv2d [D, C, p, p],
  fused `attn.qkv` [3D, D], plus the fixed `pos_embed` / `decoder_pos_embed`.
  """
  params = _canonical_params(params, model_name, model_overrides)
  state = _to_reference(params, _grid(model_name, model_overrides))
  return {k: np.ascontiguousarray(v) for k, v in state.items()}


def _layout_of_state(keys, source: str, hf: bool = False) -> tuple[str, bool]:
  """('mae' | 'encoder' | 'classifier', global_pool) from a state dict's key names."""
  keys = set(keys)
  if hf:
    if any(k.startswith('classifier.') for k in keys):
      raise ValueError(f'{source}: a Hugging Face image classifier (classifier.*) is not supported; '
                       f'convert a ViTMAE / ViT backbone, or use reference / timm names')
    return ('mae' if any(k.startswith('decoder.') for k in keys) else 'encoder'), True
  has_decoder = any(k.startswith('decoder_') or k == 'mask_token' for k in keys)
  if 'head.weight' in keys:
    if has_decoder:
      raise ValueError(f'{source} has both a classifier head (head.*) and a decoder (decoder_*): '
                       f'expected a pretraining or a fine-tuning checkpoint, not both')
    return 'classifier', 'fc_norm.weight' in keys
  return ('mae' if has_decoder else 'encoder'), True


def _import_state(state: dict, model_name: str, overrides: dict, source: str,
                  names_fn=None, hf: bool = False) -> Tree:
  """Checks a state dict against a named model and converts it to unscanned params.

  names_fn maps a reference key to the file's key(s); a list of three keys means
  the reference tensor is their row-wise concatenation (HF's split q / k / v).
  """
  names_fn = names_fn or (lambda key: [key])
  layout, global_pool = _layout_of_state(state, source, hf)
  num_classes = 0
  if layout == 'classifier':
    num_classes = int(np.shape(state['head.weight'])[0])
  template = _abstract_params(model_name, layout, overrides, num_classes, global_pool)
  grid = _grid(model_name, overrides)
  ref_shapes = _reference_shapes(template, grid)
  expected, pos_file_keys = {}, {}
  for ref_key, shape in ref_shapes.items():
    file_keys = names_fn(ref_key)
    part = (shape[0] // len(file_keys),) + tuple(shape[1:])
    for file_key in file_keys:
      if ref_key in POS_KEYS:
        pos_file_keys[file_key] = (ref_key, shape)
      else:
        expected[file_key] = part
  state = dict(state)
  for file_key, (_, shape) in pos_file_keys.items():
    if file_key in state:
      _check_pos_table(np.asarray(state.pop(file_key)), shape[-1], grid, file_key, source)
  _check_shapes({k: np.shape(v) for k, v in state.items()}, expected, source,
                f'{model_name} ({layout}, overrides {overrides or "none"})',
                'pass the model name (and overrides such as image_size / in_channels) the weights were trained '
                'with; a missing decoder is fine (encoder-only import), a partial one is not')
  ref_state = {}
  for ref_key in ref_shapes:
    if ref_key in POS_KEYS:
      continue
    parts = [np.asarray(state[k]) for k in names_fn(ref_key)]
    ref_state[ref_key] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
  params = _from_reference(ref_state, template)
  if layout == 'encoder':
    logging.info('%s has no decoder: the imported params hold only the encoder', source)
  return params


def _check_pos_table(table: np.ndarray, width: int, grid, key: str, source: str):
  """Logs (never fails) when a stored position table is not mae_jax's fixed one."""
  fixed = pos_embed.get_2d_sincos_pos_embed(width, grid, cls_token=True)[None]  # [1, 1 + L, D]
  if table.shape != fixed.shape:
    logging.warning(
        '%s: %s has shape %s but the model (grid %s) expects %s; mae_jax uses fixed sin-cos '
        'tables, so it is ignored (a learned table would need pos_embed.interpolate_pos_embed)',
        source, key, table.shape, tuple(grid), fixed.shape)
  elif not np.allclose(table.astype(np.float32), fixed, atol=1e-4):
    logging.warning('%s: %s differs from the fixed sin-cos table (a learned table?); mae_jax uses '
                    'fixed tables, so it is ignored', source, key)


def _restack(params: Tree, overrides: dict) -> Tree:
  return stack_blocks(params) if overrides.get('scan_layers') else params


def from_reference_state_dict(state: dict, model_name: str, *, source: str = 'state dict',
                              **model_overrides) -> Tree:
  """Reference / timm state dict (numpy arrays) -> mae_jax params.

  The layout follows the keys: with `decoder_*` the full MAE params, without
  them only {'encoder': ...}, with `head.*` the `get_classifier` params
  (`fc_norm` means global pooling). Blocks are stacked when
  `scan_layers=True` is among the overrides.
  """
  state = {k: _to_numpy_array(v) for k, v in state.items()}
  return _restack(_import_state(state, model_name, model_overrides, source), model_overrides)


# ----------------------------------------------------------------------------
# Hugging Face names.
# ----------------------------------------------------------------------------

_HF_BLOCK_PARTS = {'norm1': 'layernorm_before', 'norm2': 'layernorm_after',
                   'attn.proj': 'attention.output.dense', 'mlp.fc1': 'intermediate.dense',
                   'mlp.fc2': 'output.dense'}
_HF_ENCODER_TOP = {'cls_token': 'embeddings.cls_token', 'pos_embed': 'embeddings.position_embeddings',
                   'patch_embed.proj.weight': 'embeddings.patch_embeddings.projection.weight',
                   'patch_embed.proj.bias': 'embeddings.patch_embeddings.projection.bias',
                   'norm.weight': 'layernorm.weight', 'norm.bias': 'layernorm.bias'}
_HF_DECODER_TOP = {'mask_token': 'decoder.mask_token', 'decoder_pos_embed': 'decoder.decoder_pos_embed'}
# transformers >= 5 names its modules differently in memory (and writes a mixed
# form on save); these rewrite those names to the Hub's, which we write.
_HF_NAME_FIXES = (
    (r'^decoder\.decoder_encoder\.layer\.', 'decoder.decoder_layers.'),
    (r'^(vit\.)?layers\.', r'\1encoder.layer.'),
    (r'\.attention\.([qkv])_proj\.', lambda m: '.attention.attention.' + {
        'q': 'query', 'k': 'key', 'v': 'value'}[m.group(1)] + '.'),
    (r'\.attention\.o_proj\.', '.attention.output.dense.'),
    (r'\.mlp\.fc1\.', '.intermediate.dense.'),
    (r'\.mlp\.fc2\.', '.output.dense.'),
)
_HF_IGNORED = re.compile(r'^(vit\.)?pooler\.')  # ViTModel's pooler: not part of MAE.


def hf_key_names(ref_key: str, prefix: str = 'vit.') -> list[str]:
  """Hugging Face ViTMAE key(s) of a reference key (qkv -> query, key, value)."""
  m = re.fullmatch(r'(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)', ref_key)
  if m:
    group, i, part, kind = m.groups()
    base = f'{prefix}encoder.layer.{i}.' if group == 'blocks' else f'decoder.decoder_layers.{i}.'
    if part == 'attn.qkv':
      return [f'{base}attention.attention.{n}.{kind}' for n in ('query', 'key', 'value')]
    return [f'{base}{_HF_BLOCK_PARTS[part]}.{kind}']
  if ref_key in _HF_ENCODER_TOP:
    return [prefix + _HF_ENCODER_TOP[ref_key]]
  if ref_key in _HF_DECODER_TOP:
    return [_HF_DECODER_TOP[ref_key]]
  m = re.fullmatch(r'(decoder_embed|decoder_norm|decoder_pred)\.(weight|bias)', ref_key)
  if m:
    return [f'decoder.{ref_key}']
  raise ValueError(f'{ref_key} has no Hugging Face ViTMAE name (classifier heads are not exported to hf)')


def to_hf_state_dict(reference_state: dict, prefix: str = 'vit.') -> dict[str, np.ndarray]:
  """Reference state dict -> Hugging Face ViTMAE names (Hub layout)."""
  out = {}
  for key, value in reference_state.items():
    names = hf_key_names(key, prefix)
    rows = value.shape[0] // len(names)
    for k, name in enumerate(names):
      out[name] = np.ascontiguousarray(value[k * rows:(k + 1) * rows] if len(names) > 1 else value)
  return out


def _normalize_hf_names(state: dict) -> tuple[dict, str]:
  """Rewrites transformers-5 names to Hub names; returns (state, 'vit.' or '')."""
  out = {}
  for key, value in state.items():
    if _HF_IGNORED.match(key):
      logging.info('ignoring %s (Hugging Face ViT pooler, not part of MAE)', key)
      continue
    for pattern, repl in _HF_NAME_FIXES:
      key = re.sub(pattern, repl, key)
    out[key] = value
  prefix = 'vit.' if any(k.startswith('vit.') for k in out) else ''
  return out, prefix


def _is_hf_state(keys) -> bool:
  return any(k.startswith(('vit.', 'embeddings.', 'encoder.layer.', 'layers.', 'decoder.')) for k in keys)


def hf_config(model_name: str, overrides: dict, encoder_only: bool, mask_ratio: float = 0.75) -> dict:
  """config.json of a transformers ViTMAE model equal to a named mae_jax model."""
  m = model_settings(model_name, overrides)
  h, w = _image_hw(m)
  return {
      'architectures': ['ViTMAEModel' if encoder_only else 'ViTMAEForPreTraining'],
      'model_type': 'vit_mae',
      'hidden_size': m.embed_dim,
      'num_hidden_layers': m.depth,
      'num_attention_heads': m.num_heads,
      'intermediate_size': int(m.embed_dim * m.mlp_ratio),
      'hidden_act': 'gelu',  # Exact (erf) GELU, as mae_jax.
      'hidden_dropout_prob': 0.0,
      'attention_probs_dropout_prob': 0.0,
      'initializer_range': 0.02,
      'layer_norm_eps': vit.LAYER_NORM_EPS,  # HF's default is 1e-12; MAE uses 1e-6.
      'image_size': h if h == w else [h, w],
      'patch_size': m.patch_size,
      'num_channels': m.in_channels,
      'qkv_bias': True,
      'decoder_hidden_size': m.decoder_embed_dim,
      'decoder_num_hidden_layers': m.decoder_depth,
      'decoder_num_attention_heads': m.decoder_num_heads,
      'decoder_intermediate_size': int(m.decoder_embed_dim * m.mlp_ratio),
      'mask_ratio': float(mask_ratio),
      'norm_pix_loss': bool(m.norm_pix_loss),
  }


def model_name_from_hf_config(config: dict) -> tuple[str, dict]:
  """The mae_jax model (name, overrides) whose sizes equal a ViTMAE config.json."""
  size = config.get('image_size', 224)
  overrides = {'image_size': size if isinstance(size, int) else tuple(size),
               'in_channels': config.get('num_channels', 3),
               'norm_pix_loss': bool(config.get('norm_pix_loss', False))}
  want = {'patch_size': config.get('patch_size'), 'embed_dim': config.get('hidden_size'),
          'depth': config.get('num_hidden_layers'), 'num_heads': config.get('num_attention_heads')}
  for name in models.MODELS:
    try:
      m = model_settings(name, overrides)
    except ValueError:  # e.g. this image size does not fit the model's patch size.
      continue
    if all(getattr(m, k) == v for k, v in want.items()):
      return name, overrides
  raise ValueError(f'no mae_jax model has {want}: pass model_name= (or --model=) with overrides')


# ----------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------


def metadata_path(out: str) -> str:
  """Where the metadata JSON of an export lives: inside a folder, beside a file."""
  if out.endswith('.safetensors') or os.path.isfile(out):
    return os.path.splitext(out)[0] + '.metadata.json'
  return os.path.join(out, METADATA_FILENAME)


def _json_safe(value):
  if isinstance(value, dict):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    return value.item()
  if hasattr(value, 'to_dict'):  # ml_collections.ConfigDict
    return _json_safe(value.to_dict())
  return str(value)


def _metadata(model_name, overrides, fmt, params, encoder_only, extra) -> dict:
  settings = model_settings(model_name, overrides)
  layout = _layout(params)
  meta = {
      'format': fmt,
      'model_name': model_name,
      'model_overrides': {k: v for k, v in overrides.items() if k in STRUCTURAL_FIELDS},
      'layout': layout,  # mae (encoder + decoder) | encoder | classifier
      'encoder_only': layout == 'encoder',
      'image_size': settings.image_size,
      'patch_size': settings.patch_size,
      'in_channels': settings.in_channels,
      'norm_pix_loss': bool(settings.norm_pix_loss),
      'step': None,
      'config': None,
      'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
  }
  del encoder_only
  if layout == 'classifier':
    meta['num_classes'] = int(params['head']['kernel'].shape[-1])
    meta['global_pool'] = 'fc_norm' in params
  meta.update(extra or {})
  return _json_safe(meta)


def read_metadata(path: str) -> dict | None:
  """The mae_jax metadata of an export (sidecar JSON or safetensors header), or None."""
  candidates = [metadata_path(path)]
  if os.path.isdir(path):
    candidates.append(os.path.join(path, METADATA_FILENAME))
  for candidate in candidates:
    if os.path.isfile(candidate):
      with open(candidate) as f:
        return json.load(f)
  if os.path.isfile(path) and path.endswith('.safetensors'):
    header = _safetensors_header_metadata(path)
    if header and 'mae_jax' in header:
      return json.loads(header['mae_jax'])
  return None


def _safetensors():
  try:
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'the safetensors / hf formats need the safetensors package: {SAFETENSORS_HINT}') from e
  return safetensors


def _safetensors_header_metadata(path: str) -> dict | None:
  safetensors = _safetensors()
  with safetensors.safe_open(path, framework='np') as f:
    return f.metadata()


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  return dict(_safetensors().numpy.load_file(path))


def _save_safetensors(state: dict, path: str, meta: dict):
  # format=pt lets transformers read the file; the mae_jax entry carries our metadata.
  header = {'format': 'pt', 'mae_jax': json.dumps(meta)}
  _safetensors().numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path,
                                 metadata=header)
  if '://' not in path:  # safetensors writes 0600; give the file the mode of the others (umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _to_numpy_array(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # A torch tensor.
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A reference .pth: the state dict under 'model' (or 'state_dict', or bare), as numpy.

  Uses `torch.load(weights_only=True)`, which refuses pickled code.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'reading {path} needs PyTorch: {TORCH_HINT}') from e
  # Training checkpoints of the reference also hold 'args', an argparse.Namespace:
  # a plain attribute bag, allowed; any other class still makes the load fail.
  safe = getattr(torch.serialization, 'safe_globals', None)
  context = safe([argparse.Namespace]) if safe else contextlib.nullcontext()
  try:
    with context:
      checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: torch.load(weights_only=True) failed ({e}); only checkpoints of '
                     f'tensors and plain containers are read, never pickled code') from e
  state = checkpoint
  if isinstance(checkpoint, dict):
    for key in ('model', 'state_dict', 'model_state_dict'):
      if isinstance(checkpoint.get(key), dict):
        state = checkpoint[key]
        break
  if not isinstance(state, dict):
    raise TypeError(f'{path}: expected a state dict (or one under "model"), got {type(state).__name__}')
  state = {k: v for k, v in state.items() if hasattr(v, 'shape')}
  if state and all(k.startswith('module.') for k in state):  # Saved from a DDP wrapper.
    state = {k[len('module.'):]: v for k, v in state.items()}
  return {k: _to_numpy_array(v) for k, v in state.items()}


def _load_hf_folder(path: str) -> dict[str, np.ndarray]:
  index = os.path.join(path, HF_INDEX)
  if os.path.isfile(os.path.join(path, HF_WEIGHTS)):
    return _load_safetensors(os.path.join(path, HF_WEIGHTS))
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    state = {}
    for shard in shards:
      state.update(_load_safetensors(os.path.join(path, shard)))
    return state
  if os.path.isfile(os.path.join(path, HF_TORCH_WEIGHTS)):
    return load_torch_state_dict(os.path.join(path, HF_TORCH_WEIGHTS))
  raise FileNotFoundError(f'{path} has none of {HF_WEIGHTS}, {HF_INDEX}, {HF_TORCH_WEIGHTS}')


def detect_format(path: str) -> str:
  """'orbax', 'hf', 'safetensors' or 'torch' for a path to import."""
  if os.path.isdir(path):
    names = set(os.listdir(path))
    if names & {HF_WEIGHTS, HF_INDEX, HF_TORCH_WEIGHTS}:
      return 'hf'
    if names & {'_METADATA', '_CHECKPOINT_METADATA', 'manifest.ocdbt', 'checkpoint'}:
      return 'orbax'
    raise ValueError(f'{path} is neither an Orbax checkpoint (no _METADATA) nor a Hugging Face folder '
                     f'(no {HF_WEIGHTS}); for a training workdir use --workdir')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist')
  if path.endswith('.safetensors'):
    return 'safetensors'
  if path.endswith(TORCH_SUFFIXES):
    return 'torch'
  raise ValueError(f'{path}: unknown weight file; expected .safetensors, one of {TORCH_SUFFIXES}, '
                   f'an Orbax folder or a Hugging Face folder')


def _prepare_out(out: str, fmt: str, overwrite: bool):
  """Checks the output path; with overwrite, removes a previous export there."""
  if fmt == 'safetensors' and not out.endswith('.safetensors'):
    raise ValueError(f'--out={out}: a safetensors export must be a file named *.safetensors')
  if os.path.exists(out):
    if not overwrite:
      raise FileExistsError(f'{out} exists: choose another --out or pass overwrite=True (--overwrite)')
    if os.path.isdir(out):
      names = set(os.listdir(out))
      if names and not names & {METADATA_FILENAME, '_METADATA', '_CHECKPOINT_METADATA', HF_WEIGHTS}:
        raise FileExistsError(f'{out} is a folder that holds no export: refusing to replace it')
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.rmtree(out)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)


def export_weights(params, model_name: str, fmt: str, out: str, *, encoder_only: bool = True,
                   metadata: dict | None = None, model_overrides: dict | None = None,
                   overwrite: bool = False) -> str:
  """Writes params in a format others read; returns the path written.

  Args:
    params: mae_jax params (or {'params': ...}), scanned or not: a full MAE, an
      encoder-only tree, or a classifier from `models.get_classifier`.
    model_name: the `models.MODELS` name the params belong to.
    fmt: 'orbax', 'safetensors' or 'hf'.
    out: a folder (orbax, hf) or a .safetensors file.
    encoder_only: drop the MAE decoder (a classifier is always exported whole).
    metadata: merged into the metadata JSON (e.g. step, config, mask_ratio).
    model_overrides: model fields that differ from the name's (image_size, ...).
    overwrite: replace an existing `out`.
  """
  if fmt not in FORMATS:
    raise ValueError(f'format={fmt!r}: must be one of {FORMATS}')
  overrides = dict(model_overrides or {})
  params = _unwrap(params)
  if encoder_only and 'head' not in params:
    params = {'encoder': params['encoder']}
  params = _canonical_params(params, model_name, overrides)
  meta = _metadata(model_name, overrides, fmt, params, encoder_only, metadata)
  _prepare_out(out, fmt, overwrite)
  if fmt == 'orbax':
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.abspath(out), params)
  else:
    state = _to_reference(params, _grid(model_name, overrides))
    if fmt == 'safetensors':
      _save_safetensors(state, out, meta)
    else:
      layout = _layout(params)
      if layout == 'classifier':
        raise ValueError('format=hf: a fine-tuned classifier has no ViTMAE equivalent; '
                         'use format=safetensors (timm names) or orbax')
      encoder_only = layout == 'encoder'
      prefix = '' if encoder_only else 'vit.'  # ViTMAEModel's own names vs ViTMAEForPreTraining's.
      os.makedirs(out, exist_ok=True)
      mask_ratio = (metadata or {}).get('mask_ratio', ((metadata or {}).get('config') or {}).get(
          'mask_ratio', 0.75))
      with open(os.path.join(out, 'config.json'), 'w') as f:
        json.dump(hf_config(model_name, overrides, encoder_only, mask_ratio), f, indent=2)
      _save_safetensors(to_hf_state_dict(state, prefix), os.path.join(out, HF_WEIGHTS), meta)
  with open(metadata_path(out), 'w') as f:
    json.dump(meta, f, indent=2)
  logging.info('Exported %s (%s) to %s', model_name, meta['layout'], out)
  return out


def resolve_model(path: str, model_name: str | None, model_overrides: dict) -> tuple[str, dict]:
  """(model name, overrides) for importing path: the caller's, filled in from its metadata.

  The metadata's structural overrides (image_size, in_channels, ...) apply when
  its model name is the caller's (or the caller gives none); the caller's
  overrides win. A Hugging Face folder without metadata is matched by its
  config.json sizes.
  """
  meta = read_metadata(path)
  overrides = dict(model_overrides)
  if meta and meta.get('model_name') and model_name in (None, meta['model_name']):
    overrides = {**meta.get('model_overrides', {}), **overrides}
    model_name = meta['model_name']
  config_json = os.path.join(path, 'config.json')
  if model_name is None and os.path.isdir(path) and os.path.isfile(config_json):
    with open(config_json) as f:
      model_name, hf_overrides = model_name_from_hf_config(json.load(f))
    overrides = {**hf_overrides, **overrides}
    logging.info('%s: config.json matches %s %s', path, model_name, hf_overrides)
  if model_name is None:
    raise ValueError(f'{path} has no mae_jax metadata ({metadata_path(path)}): pass model_name= (or --model=)')
  if isinstance(overrides.get('image_size'), list):
    overrides['image_size'] = tuple(overrides['image_size'])
  return model_name, overrides


def import_weights(path: str, model_name: str | None = None, **model_overrides) -> Tree:
  """Reads weights of any supported format into mae_jax params.

  Args:
    path: an Orbax folder, a Hugging Face folder, a .safetensors file (reference /
      timm or Hugging Face names) or a reference .pth checkpoint.
    model_name: a `models.MODELS` name; None reads it from the export's metadata
      (or, for a Hugging Face folder, matches its config.json sizes).
    **model_overrides: model fields (image_size, in_channels, scan_layers, ...);
      the metadata's structural overrides apply when its model name is the same.

  Returns:
    Params laid out as `models.get_model(model_name, **model_overrides)` creates
    them (stacked blocks with scan_layers=True). Weights without a decoder give
    {'encoder': ...} only; a fine-tuned classifier gives the
    `models.get_classifier` layout (encoder, fc_norm if global pooling, head).
  """
  fmt = detect_format(path)
  model_name, overrides = resolve_model(path, model_name, model_overrides)

  if fmt == 'orbax':
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(os.path.abspath(path))
    params = unstack_blocks(_numpy_tree(_plain(restored)))
    layout = _layout(params)
    num_classes = params['head']['kernel'].shape[-1] if layout == 'classifier' else 0
    template = _abstract_params(model_name, layout, overrides, num_classes, 'fc_norm' in params)
    _check_shapes(_flat_shapes(params), _flat_shapes(template), path,
                  f'{model_name} ({layout}, overrides {overrides or "none"})',
                  'pass the model name (and overrides) the checkpoint was exported with')
    return _restack(params, overrides)

  if fmt == 'torch':
    state = load_torch_state_dict(path)
  elif fmt == 'hf':
    state = _load_hf_folder(path)
  else:
    state = _load_safetensors(path)
  if _is_hf_state(state):
    state, prefix = _normalize_hf_names(state)
    params = _import_state(state, model_name, overrides, path,
                           names_fn=lambda key: hf_key_names(key, prefix), hf=True)
  else:
    params = _import_state(state, model_name, overrides, path)
  return _restack(params, overrides)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def model_from_config(config: dict) -> tuple[str, dict]:
  """(model name, overrides) of a training run's config dict, as train.build_model reads it."""
  model = dict(config.get('model', {}))
  if 'name' not in model:
    raise ValueError('the checkpoint config has no model.name: pass --model= with --import_from instead')
  overrides = _mae_fields(model)
  dataset = config.get('dataset', {}) or {}
  if dataset.get('image_size'):
    size = dataset['image_size']
    overrides['image_size'] = tuple(size) if isinstance(size, (list, tuple)) else size
  if dataset.get('channels'):
    overrides['in_channels'] = dataset['channels']
  if 'norm_pix_loss' in config:
    overrides['norm_pix_loss'] = config['norm_pix_loss']
  return model['name'], overrides


def export_from_workdir(workdir: str, fmt: str, out: str, *, step: int | None = None,
                        full: bool = False, overwrite: bool = False) -> str:
  """Restores a run's params (mae_jax.checkpoint.load_params) and exports them."""
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  params, config = checkpoint.load_params(workdir, step=step)
  if step is None:
    step = checkpoint.latest_step(workdir)
  name, overrides = model_from_config(config)
  metadata = {'step': step, 'config': config, 'workdir': os.path.abspath(workdir),
              'mask_ratio': config.get('mask_ratio', 0.75)}
  return export_weights(params, name, fmt, out, encoder_only=not full, metadata=metadata,
                        model_overrides=overrides, overwrite=overwrite)


def convert(source: str, fmt: str, out: str, *, model_name: str | None = None, full: bool = False,
            overwrite: bool = False, **model_overrides) -> str:
  """Imports a .pth / safetensors / hf / orbax export and writes it in another format."""
  model_name, model_overrides = resolve_model(source, model_name, model_overrides)
  params = import_weights(source, model_name, **model_overrides)
  meta = read_metadata(source) or {}
  if full and 'decoder' not in params and 'head' not in params:
    raise ValueError(f'--full: {source} has no decoder; drop --full to export the encoder')
  extra = {'converted_from': os.path.abspath(source), 'step': meta.get('step'), 'config': meta.get('config')}
  return export_weights(params, model_name, fmt, out, encoder_only=not full, metadata=extra,
                        model_overrides=model_overrides, overwrite=overwrite)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'Training workdir whose Orbax checkpoint is exported.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
  flags.DEFINE_string('import_from', None, 'Instead of --workdir: a .pth / .safetensors / hf / orbax path.')
  flags.DEFINE_string('model', None, 'Model name for --import_from (default: from its metadata).')
  flags.DEFINE_enum('format', None, list(FORMATS), 'Output format.')
  flags.DEFINE_string('out', None, 'Output folder (orbax, hf) or .safetensors file.')
  flags.DEFINE_bool('full', False, 'Export the decoder too (default: encoder only).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')
  flags.mark_flags_as_required(['format', 'out'])


def main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  flag_values = flags.FLAGS
  if bool(flag_values.workdir) == bool(flag_values.import_from):
    raise app.UsageError('pass exactly one of --workdir and --import_from')
  try:
    if flag_values.workdir:
      out = export_from_workdir(flag_values.workdir, flag_values.format, flag_values.out,
                                step=flag_values.step, full=flag_values.full, overwrite=flag_values.overwrite)
    else:
      out = convert(flag_values.import_from, flag_values.format, flag_values.out, model_name=flag_values.model,
                    full=flag_values.full, overwrite=flag_values.overwrite)
  except (ValueError, TypeError, FileExistsError, FileNotFoundError, ImportError) as e:
    sys.exit(f'mae_jax.export: {e}')  # A user error: the message says what to change, no traceback.
  print(f'wrote {out} (metadata: {metadata_path(out)})')


def run():
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
