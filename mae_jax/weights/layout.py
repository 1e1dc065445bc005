"""The params pytree: host copies, scanned <-> unscanned blocks, a named model's abstract params.

A params tree is a full MAE ({'encoder', 'decoder'}), an encoder alone
({'encoder'}) or a classifier from `models.get_classifier` ({'encoder',
'fc_norm' with global pooling, 'head'}). A fine-tuned encoder may hold its
trained position table `encoder/pos_embed` [1, 1 + L, D]. The scanned layout (scan_layers=True)
holds a `blocks` subtree whose leaves have a leading [depth] axis; the unscanned
one holds `blocks_0`, `blocks_1`, ... Conversions work on the unscanned layout.
"""

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import models
from mae_jax.models import mae

MAX_LISTED = 12  # Keys named in an error message before "... and N more".

Tree = dict[str, Any]


def numpy_tree(tree) -> Tree:
  """Host numpy copy of a params tree (bfloat16 leaves become float32)."""
  def to_numpy(x):
    x = np.asarray(jax.device_get(x))
    return x.astype(np.float32) if x.dtype.name == 'bfloat16' else x
  return jax.tree.map(to_numpy, dict(tree))


def to_numpy_array(value) -> np.ndarray:
  """A numpy array of a torch tensor (bfloat16 becomes float32) or any array-like."""
  if hasattr(value, 'detach'):  # A torch tensor.
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def plain(tree):
  """Nested plain dicts (FrozenDict and other mappings become dict)."""
  if isinstance(tree, Mapping):
    return {k: plain(v) for k, v in tree.items()}
  return tree


def unwrap(params) -> Tree:
  """Accepts params or {'params': params} (a variables dict), as nested plain dicts."""
  params = plain(params)
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


def restack(params: Tree, overrides: dict) -> Tree:
  """Unscanned params in the layout the overrides' model creates (stacked with scan_layers)."""
  return stack_blocks(params) if overrides.get('scan_layers') else params


def block_indices(tree: Tree) -> list[int]:
  """The i of every `blocks_{i}` subtree, ascending."""
  return sorted(int(k.split('_')[1]) for k in tree if re.fullmatch(r'blocks_\d+', k))


def params_layout(params: Tree) -> str:
  """'classifier', 'mae' (encoder + decoder) or 'encoder'."""
  if 'head' in params:
    return 'classifier'
  return 'mae' if 'decoder' in params else 'encoder'


def flat_shapes(tree: Tree) -> dict[str, tuple]:
  """'encoder/blocks_0/attn/query/kernel' -> shape, for every leaf."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat['/'.join(str(getattr(p, 'key', p)) for p in path)] = tuple(leaf.shape)
  return flat


def mae_field_names() -> set[str]:
  """The MaskedAutoencoder fields a model name's settings can be overridden with."""
  return set(mae.MaskedAutoencoder.__dataclass_fields__) - {'parent', 'name'}


def mae_field_default(name: str):
  """The MaskedAutoencoder field's default value."""
  return mae.MaskedAutoencoder.__dataclass_fields__[name].default


def mae_fields(overrides: dict) -> dict:
  """The overrides that are MaskedAutoencoder fields."""
  fields = mae_field_names()
  return {k: v for k, v in overrides.items() if k in fields}


def model_settings(model_name: str, overrides: dict) -> mae.MaskedAutoencoder:
  """The (unbound) MaskedAutoencoder of a name: every field, defaults included."""
  return models.get_model(model_name, **mae_fields(overrides))


def image_hw(model: mae.MaskedAutoencoder) -> tuple[int, int]:
  """(height, width) of a model's images."""
  size = model.image_size
  return (size, size) if isinstance(size, int) else tuple(size)


def grid_size(model_name: str, overrides: dict) -> tuple[int, int]:
  """(rows, columns) of a named model's patch grid."""
  return model_settings(model_name, overrides).grid_size


def abstract_params(model_name: str, layout: str, overrides: dict, num_classes: int = 0,
                    global_pool: bool = True, pos_embed: str = 'sincos') -> Tree:
  """ShapeDtypeStructs of the unscanned params a layout of a named model has.

  pos_embed='learned' adds the encoder's trained position table
  `encoder/pos_embed` [1, 1 + L, D] (a fine-tuned classifier, or an encoder
  taken from one); 'sincos' models have none.
  """
  overrides = {**overrides, 'scan_layers': False}
  settings = model_settings(model_name, overrides)
  if layout == 'classifier':
    model = models.get_classifier(model_name, num_classes, global_pool, pos_embed, **overrides)
    init = lambda x: model.init({'params': jax.random.key(0)}, x)
  else:
    model = settings
    init = lambda x: model.init({'params': jax.random.key(0), 'mask': jax.random.key(0)}, x, train=False)
  h, w = image_hw(settings)
  images = jax.ShapeDtypeStruct((1, h, w, settings.in_channels), jnp.float32)
  params = jax.eval_shape(init, images)['params']
  params = dict(params)
  if layout == 'encoder':
    params = {'encoder': params['encoder']}
  if pos_embed == 'learned' and 'pos_embed' not in params['encoder']:
    grid = settings.grid_size
    params['encoder'] = {**params['encoder'], 'pos_embed': jax.ShapeDtypeStruct(
        (1, 1 + grid[0] * grid[1], settings.embed_dim), jnp.float32)}
  return params


def pos_embed_kind(params: Tree) -> str:
  """'learned' when params hold the encoder's trained position table, else 'sincos'."""
  return 'learned' if 'pos_embed' in params.get('encoder', {}) else 'sincos'


def check_shapes(found: dict, expected: dict, source: str, what: str, hint: str = ''):
  """Raises ValueError naming the source and every missing, unexpected or mis-shaped key."""
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  wrong = sorted(f'{k}: {tuple(found[k])} (expected {tuple(expected[k])})'
                 for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
  if not (missing or unexpected or wrong):
    return
  def listed(keys):
    more = f' ... and {len(keys) - MAX_LISTED} more' if len(keys) > MAX_LISTED else ''
    return ', '.join(keys[:MAX_LISTED]) + more
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


def canonical_params(params, model_name: str, overrides: dict, source: str = 'params') -> Tree:
  """Unscanned numpy params, checked against the named model's layout."""
  params = unstack_blocks(numpy_tree(unwrap(params)))  # Host copies first, then slice.
  layout = params_layout(params)
  num_classes = params['head']['kernel'].shape[-1] if layout == 'classifier' else 0
  expected = abstract_params(model_name, layout, overrides, num_classes, 'fc_norm' in params,
                             pos_embed_kind(params))
  check_shapes(flat_shapes(params), flat_shapes(expected), source,
               f'{model_name} ({layout} params, overrides {overrides or "none"})',
               'pass the model name (and overrides such as image_size / in_channels) it was trained with')
  return params
