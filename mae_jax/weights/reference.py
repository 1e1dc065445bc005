"""mae_jax params <-> the reference repository's and timm's state dict names and layouts.

torch Linear weights are [out, in] (Flax kernels [in, out]), the patch Conv2d is
OIHW (Flax HWIO), attention is one fused `attn.qkv` [3D, D] (Flax: separate
query / key / value).

Position tables: the MAE's are fixed sin-cos tables, not parameters, but the
reference state dict carries them (`pos_embed`, `decoder_pos_embed`). A
fine-tuned model (timm's ViT) trains its `pos_embed`. An import keeps the
file's encoder table as `encoder/pos_embed` [1, 1 + L_file, D] (float32, as
stored, cls first) whenever it is not mae_jax's fixed table at the requested
grid (a learned table, or one at another resolution); the loader of a
fine-tuning run interpolates it to the run's grid. An export writes the
params' own table when they hold one, else the fixed table. The decoder table
is always the fixed one (a different stored one is logged and ignored).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mae_jax.models import pos_embed
from mae_jax.weights import layout
from mae_jax.weights.hf import hf_key_names
from mae_jax.weights.layout import Tree

POS_KEYS = ('pos_embed', 'decoder_pos_embed')  # Reference names of the fixed tables.


# ----------------------------------------------------------------------------
# mae_jax -> reference.
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


def to_reference(params: Tree, grid, xp=np) -> dict:
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
  if 'pos_embed' in enc:  # A trained table (fine-tuning).
    state['pos_embed'] = enc['pos_embed']
  else:
    state['pos_embed'] = pos_embed.get_2d_sincos_pos_embed(width, grid, cls_token=True)[None]
  state['patch_embed.proj.weight'] = enc['patch_embed']['kernel'].transpose(3, 2, 0, 1)  # HWIO -> OIHW
  state['patch_embed.proj.bias'] = enc['patch_embed']['bias']
  for i in layout.block_indices(enc):
    state.update(_block_to_ref(enc[f'blocks_{i}'], f'blocks.{i}.', xp))
  if 'norm' in enc:
    state.update(_norm_to_ref(enc['norm'], 'norm.'))
  if 'decoder' in params:
    dec = params['decoder']
    dec_width = dec['mask_token'].shape[-1]
    state.update(_linear_to_ref(dec['embed'], 'decoder_embed.'))
    state['mask_token'] = dec['mask_token']
    state['decoder_pos_embed'] = pos_embed.get_2d_sincos_pos_embed(dec_width, grid, cls_token=True)[None]
    for j in layout.block_indices(dec):
      state.update(_block_to_ref(dec[f'blocks_{j}'], f'decoder_blocks.{j}.', xp))
    state.update(_norm_to_ref(dec['norm'], 'decoder_norm.'))
    state.update(_linear_to_ref(dec['pred'], 'decoder_pred.'))
  if 'fc_norm' in params:
    state.update(_norm_to_ref(params['fc_norm'], 'fc_norm.'))
  if 'head' in params:
    state.update(_linear_to_ref(params['head'], 'head.'))
  return state


def reference_shapes(template: Tree, grid) -> dict[str, tuple]:
  """Key -> shape of the reference state dict of a params template, without data."""
  shapes = jax.eval_shape(lambda p: to_reference(p, grid, jnp), template)
  return {k: tuple(v.shape) for k, v in shapes.items()}


def reference_key_shapes(model_name: str, *, encoder_only: bool = False, hf: bool = False,
                         **model_overrides) -> dict[str, tuple]:
  """Key -> shape of a named model's export (reference / timm names, or HF's), without any data."""
  kind = 'encoder' if encoder_only else 'mae'
  template = layout.abstract_params(model_name, kind, model_overrides)
  shapes = reference_shapes(template, layout.grid_size(model_name, model_overrides))
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
  params = layout.canonical_params(params, model_name, model_overrides)
  state = to_reference(params, layout.grid_size(model_name, model_overrides))
  return {k: np.ascontiguousarray(v) for k, v in state.items()}


# ----------------------------------------------------------------------------
# Reference -> mae_jax.
# ----------------------------------------------------------------------------


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
  for i in layout.block_indices(enc_t):
    enc[f'blocks_{i}'] = _block_from_ref(state, f'blocks.{i}.')
  if 'norm' in enc_t:
    enc['norm'] = _norm_from_ref(state, 'norm.')
  params['encoder'] = enc
  if 'decoder' in template:
    dec = {'embed': _linear_from_ref(state, 'decoder_embed.'), 'mask_token': state['mask_token'],
           'norm': _norm_from_ref(state, 'decoder_norm.'), 'pred': _linear_from_ref(state, 'decoder_pred.')}
    for j in layout.block_indices(template['decoder']):
      dec[f'blocks_{j}'] = _block_from_ref(state, f'decoder_blocks.{j}.')
    params['decoder'] = dec
  if 'fc_norm' in template:
    params['fc_norm'] = _norm_from_ref(state, 'fc_norm.')
  if 'head' in template:
    params['head'] = _linear_from_ref(state, 'head.')
  # The model's parameter dtype (float32): a float16 / float64 file is cast, float32 is copied bit-exactly.
  return jax.tree.map(lambda x, t: np.ascontiguousarray(x, dtype=t.dtype), params, template)


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


def is_fixed_table(table: np.ndarray, width: int, grid) -> bool:
  """Whether a stored [1, 1 + L, D] table is mae_jax's fixed sin-cos table at `grid`.

  Within 1e-4; a table stored in bfloat16 or float16 (every value exactly one of
  that type's, whatever dtype it reached us in) within that type's rounding.
  """
  fixed = pos_embed.get_2d_sincos_pos_embed(width, grid, cls_token=True)[None]  # [1, 1 + L, D]
  if table.shape != fixed.shape:
    return False
  table = np.asarray(table, np.float32)
  for dtype, rtol in ((jnp.bfloat16, 2.0 ** -7), (np.float16, 2.0 ** -10)):  # One unit in the last place.
    if np.array_equal(table, table.astype(dtype).astype(np.float32)):
      return bool(np.allclose(table, fixed, rtol=rtol, atol=1e-4))
  return bool(np.allclose(table, fixed, atol=1e-4))


def _check_pos_table(table: np.ndarray, width: int, grid, key: str, source: str):
  """Logs (never fails) when a stored decoder position table is not mae_jax's fixed one."""
  if not is_fixed_table(table, width, grid):
    logging.warning('%s: %s (shape %s) is not the fixed sin-cos table of the model (grid %s); the MAE decoder '
                    'uses the fixed table, so it is ignored', source, key, table.shape, tuple(grid))


def fixed_table_grid(table: np.ndarray) -> tuple[int, int] | None:
  """The square grid of a [1, 1 + L, D] table when it is the fixed sin-cos table there, else None."""
  if table.ndim != 3 or table.shape[1] < 2:
    return None
  side = math.isqrt(table.shape[1] - 1)
  grid = (side, side)
  return grid if side * side == table.shape[1] - 1 and is_fixed_table(table, table.shape[-1], grid) else None


def without_fixed_table(encoder: dict) -> dict:
  """`encoder` without its `pos_embed` when that is the fixed sin-cos table at its own (square) grid.

  An import keeps such a table when the model asked for another grid (fine-tuning
  resizes it bicubically, as the reference does); a model with the fixed table
  (features, a conversion) takes the fixed table of its own grid instead.
  """
  table = encoder.get('pos_embed')
  if table is None or fixed_table_grid(np.asarray(table)) is None:
    return encoder
  return {k: v for k, v in encoder.items() if k != 'pos_embed'}


def _encoder_table(table: np.ndarray, width: int, grid, key: str, source: str) -> np.ndarray | None:
  """The file's encoder position table as float32 [1, 1 + L, D], or None when it is the fixed one.

  A fixed table at another grid is kept as stored: fine-tuning at another size
  resizes it bicubically, as the reference does.
  """
  if is_fixed_table(table, width, grid):
    return None
  if table.ndim == 2:
    table = table[None]
  if table.ndim != 3 or table.shape[0] != 1 or table.shape[-1] != width or table.shape[1] < 2:
    hint = (f': the weights are {table.shape[-1]} wide, the model {width}; name the model they were trained with '
            '(a config\'s model.name; model_name= or --model= for an import)'
            if table.ndim == 3 and table.shape[-1] != width else '')
    raise ValueError(f'{source}: {key} has shape {tuple(table.shape)}; a position table is [1, 1 + L, {width}] '
                     f'(cls first) for this model{hint}')
  logging.info('%s: %s %s is a learned table or one at another grid (the model\'s is %s): kept as '
               'encoder/pos_embed', source, key, tuple(table.shape), tuple(grid))
  return np.ascontiguousarray(table, dtype=np.float32)


_PATCH_KERNEL_SUFFIXES = ('patch_embed.proj.weight', 'patch_embeddings.projection.weight')
_ENCODER_TABLE_SUFFIXES = ('pos_embed', 'embeddings.position_embeddings')


def _encoder_key(state: dict, suffixes) -> str | None:
  found = [k for k in state if k.endswith(suffixes) and 'decoder' not in k]
  return found[0] if len(found) == 1 else None


def infer_overrides(state: dict, model_name: str, overrides: dict, source: str) -> dict:
  """`overrides`, with in_channels and image_size read from the file where neither it nor the caller says.

  in_channels is the patch embedding's input width; image_size comes from a
  fixed sin-cos encoder table (an MAE checkpoint) of a square grid. A learned
  table says nothing of the size the model will run at: it is resized to it.
  """
  overrides = dict(overrides)
  model = layout.model_settings(model_name, overrides)
  kernel = _encoder_key(state, _PATCH_KERNEL_SUFFIXES)
  if 'in_channels' not in overrides and kernel and np.ndim(state[kernel]) == 4:
    channels = int(np.shape(state[kernel])[1])
    if channels != model.in_channels:
      logging.info('%s: %d input channels (%s)', source, channels, kernel)
      overrides['in_channels'] = channels
  table_key = _encoder_key(state, _ENCODER_TABLE_SUFFIXES)
  if 'image_size' not in overrides and table_key:
    table = np.asarray(state[table_key], np.float32)
    own = fixed_table_grid(table if table.ndim == 3 else table[None])
    if own is not None and own != tuple(model.grid_size):
      overrides['image_size'] = own[0] * model.patch_size
      logging.info('%s: image_size %d (its fixed position table is for a %dx%d grid)', source,
                   overrides['image_size'], *own)
  return overrides


def import_state(state: dict, model_name: str, overrides: dict, source: str,
                 names_fn=None, hf: bool = False) -> Tree:
  """Checks a state dict against a named model and converts it to unscanned params.

  names_fn maps a reference key to the file's key(s); a list of three keys means
  the reference tensor is their row-wise concatenation (HF's split q / k / v).
  """
  names_fn = names_fn or (lambda key: [key])
  kind, global_pool = _layout_of_state(state, source, hf)
  num_classes = 0
  if kind == 'classifier':
    num_classes = int(np.shape(state['head.weight'])[0])
  template = layout.abstract_params(model_name, kind, overrides, num_classes, global_pool)
  grid = layout.grid_size(model_name, overrides)
  ref_shapes = reference_shapes(template, grid)
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
  table = None
  for file_key, (ref_key, shape) in pos_file_keys.items():
    if file_key not in state:
      continue
    if ref_key == 'pos_embed':
      table = _encoder_table(np.asarray(state.pop(file_key)), shape[-1], grid, file_key, source)
    else:
      _check_pos_table(np.asarray(state.pop(file_key)), shape[-1], grid, file_key, source)
  layout.check_shapes({k: np.shape(v) for k, v in state.items()}, expected, source,
                      f'{model_name} ({kind}, overrides {overrides or "none"})',
                      'pass the model name (and overrides such as image_size / in_channels) the weights were '
                      'trained with; a missing decoder is fine (encoder-only import), a partial one is not')
  ref_state = {}
  for ref_key in ref_shapes:
    if ref_key in POS_KEYS:
      continue
    parts = [np.asarray(state[k]) for k in names_fn(ref_key)]
    ref_state[ref_key] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
  params = _from_reference(ref_state, template)
  if table is not None:
    params['encoder']['pos_embed'] = table
  if kind == 'encoder':
    logging.info('%s has no decoder: the imported params hold only the encoder', source)
  return params


def from_reference_state_dict(state: dict, model_name: str, *, source: str = 'state dict',
                              **model_overrides) -> Tree:
  """Reference / timm state dict (numpy arrays) -> mae_jax params.

  The layout follows the keys: with `decoder_*` the full MAE params, without
  them only {'encoder': ...}, with `head.*` the `get_classifier` params
  (`fc_norm` means global pooling). Blocks are stacked when
  `scan_layers=True` is among the overrides. A `pos_embed` that is not the
  fixed sin-cos table at the model's grid is kept as `encoder/pos_embed`.
  """
  state = {k: layout.to_numpy_array(v) for k, v in state.items()}
  return layout.restack(import_state(state, model_name, model_overrides, source), model_overrides)
