"""The pretrained encoder of a downstream run: read it, then merge it into freshly built params.

The encoder comes from `config.pretrained_workdir` (a pretraining or fine-tuning
run's checkpoints, at `config.pretrained_step`, -1 for the newest) or
`config.pretrained_path` (anything `import_weights` reads: an export of
mae_jax, a reference .pth, safetensors or a Hugging Face folder).

Position table, as the reference's fine-tuning (`interpolate_pos_embed`): with
`config.pos_embed='learned'` the run's table starts from the source's: its
trained table when it has one, else the fixed sin-cos table at the source's
grid (a MAE checkpoint), resized bicubically (PyTorch's, align_corners=False;
the cls entry kept) when the source's grid is not the run's. With 'sincos'
the run uses the fixed table at its own grid and a trained table in the
source is not used (logged).
"""

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from mae_jax import checkpoint
from mae_jax.models import from_config, mae
from mae_jax.models import pos_embed as pos_tables
from mae_jax.weights import files, layout


def _saved_grid(saved_config) -> tuple[int, int] | None:
  """The patch grid of a run's saved config (a dict), or None when it does not say."""
  try:
    kwargs = mae.model_kwargs(from_config.model_name(saved_config), **layout.mae_fields(
        from_config.model_overrides(saved_config, strict=False)))
  except (ValueError, TypeError):
    return None
  h, w = pos_tables.as_grid(kwargs['image_size'])
  return h // kwargs['patch_size'], w // kwargs['patch_size']


def _file_grid(path: str, patch_size: int) -> tuple[int, int] | None:
  """The patch grid a weight file was exported at, from its mae_jax metadata (None without)."""
  meta = files.read_metadata(path) or {}
  size = meta.get('image_size')
  if not size:
    return None
  h, w = pos_tables.as_grid(size)
  return h // patch_size, w // patch_size


def _position_table(config, encoder: dict, source: str, source_grid) -> dict:
  """The encoder with the run's position table: the source's, resized to the run's grid (learned runs).

  `source_grid`: the grid of the source's table (the grid its fixed table had
  when it holds none); None: the run's grid.
  """
  kwargs = from_config.encoder_kwargs(config)
  target = pos_tables.as_grid(kwargs['image_size'])
  target = (target[0] // kwargs['patch_size'], target[1] // kwargs['patch_size'])
  encoder = dict(encoder)
  table = encoder.pop('pos_embed', None)
  if kwargs['pos_embed'] != 'learned':
    if table is not None:
      logging.warning('%s holds a trained position table %s; this run has pos_embed=%r and uses the fixed sin-cos '
                      'table (set pos_embed=learned to start from the trained one)', source, table.shape,
                      kwargs['pos_embed'])
    return encoder
  if table is None:  # A MAE checkpoint: its fixed table at its own grid.
    grid = pos_tables.as_grid(source_grid) if source_grid is not None else target
    table = pos_tables.get_2d_sincos_pos_embed(kwargs['embed_dim'], grid, cls_token=True)[None]
    what = 'fixed sin-cos'
  else:
    table = np.asarray(table, np.float32)
    grid = pos_tables.table_grid(table.shape[1], (source_grid, target), what=f'the position table of {source}')
    what = 'trained'
  if grid != target:
    logging.info('Position table (%s) of %s: interpolated bicubically from %dx%d to %dx%d', what, source, *grid,
                 *target)
    table = pos_tables.resize_pos_embed(table, grid, target)
  encoder['pos_embed'] = table
  return encoder


def _run_heads(config) -> int:
  return files.model_heads(from_config.model_name(config), from_config.model_overrides(config))['num_heads']


def load_pretrained_encoder(config) -> tuple[dict | None, str]:
  """The pretrained encoder params (host arrays) and where they came from; (None, '') for none.

  With config.pos_embed='learned' the encoder holds `pos_embed` [1, 1 + L, D]
  for the run's grid (see the module docstring); otherwise it holds none.
  """
  workdir = config.pretrained_workdir
  path = config.pretrained_path
  if workdir and path:
    raise ValueError('pretrained_workdir and pretrained_path are both set: set one of them')
  if workdir:
    step = int(config.pretrained_step)
    # The newest step is looked up once (process 0's view), then loaded and named: a run that is still
    # training may add a checkpoint in between.
    step = checkpoint.latest_step(workdir) if step < 0 else step
    params, saved_config = checkpoint.load_params(workdir, step)
    params = layout.plain(params)
    if 'encoder' not in params:
      raise ValueError(f'pretrained_workdir={workdir!r}: its params have no "encoder" '
                       f'(top-level keys {sorted(params)}); is it a mae_jax pretraining or fine-tuning run?')
    source = f'{workdir} step {step}'
    source_grid = _saved_grid(saved_config or {})
    try:
      declared = files.model_heads(from_config.model_name(saved_config or {}),
                                   from_config.model_overrides(saved_config or {}, strict=False))
    except (ValueError, TypeError, KeyError):  # A saved config that does not say.
      declared = {}
    files.check_encoder_heads(declared, _run_heads(config), f'pretrained_workdir={workdir}',
                              'change model.name (or model.num_heads)')
  elif path:
    files.check_encoder_heads(files.declared_heads(path), _run_heads(config), f'pretrained_path={path}',
                              'change model.name (or model.num_heads)')
    params = files.import_weights(path, from_config.model_name(config), **from_config.encoder_overrides(config))
    source = path
    # A table the import returns is the file's own (any grid); without one the file's table was the fixed
    # table at the run's grid (the import drops exactly that), so the run's grid is the source's.
    table = params['encoder'].get('pos_embed')
    source_grid = None
    if table is not None:
      source_grid = _file_grid(path, int(np.shape(params['encoder']['patch_embed']['kernel'])[0]))
  else:
    return None, ''
  encoder = jax.tree.map(np.asarray, params['encoder'])
  # The target layout decides: stacked `blocks` with scan_layers, else `blocks_{i}`.
  if config.model.scan_layers:
    encoder = layout.stack_blocks({'encoder': encoder})['encoder']
  else:
    encoder = layout.unstack_blocks({'encoder': encoder})['encoder']
  return _position_table(config, encoder, source, source_grid), source


def merge_encoder(params: dict, encoder: dict, source: str) -> dict:
  """Replaces params['encoder'] by pretrained `encoder` (shapes checked; a spare `norm` dropped).

  Only the shapes and dtypes of `params` are read: it may be abstract
  (ShapeDtypeStructs), host arrays or global arrays sharded over any mesh. The
  merged encoder leaves are host (numpy) arrays in the target dtypes; every
  other leaf of `params` is passed through untouched. Place the result with
  `place_tree` / `place_on_mesh`: no process ever fetches a parameter that
  spans other processes' devices (FSDP over hosts for L/16 and H/14).

  A trained `pos_embed` that the target lacks (a fixed-table model) is dropped
  with a warning; `load_pretrained_encoder` gives a learned target its table
  at the target's grid.
  """
  target = traverse_util.flatten_dict(layout.plain(params['encoder']), sep='/')
  found = traverse_util.flatten_dict(layout.plain(encoder), sep='/')
  spare = ('norm/', 'pos_embed')  # The final norm under global pooling; a table for a fixed-table model.
  missing = sorted(set(target) - set(found))
  unexpected = sorted(k for k in set(found) - set(target) if not k.startswith(spare))
  wrong = sorted(f'{k}: {tuple(found[k].shape)} (expected {tuple(target[k].shape)})'
                 for k in set(target) & set(found) if tuple(found[k].shape) != tuple(target[k].shape))
  if missing or unexpected or wrong:
    problems = [f'{what} ({len(keys)}): {", ".join(keys[:5])}{" ..." if len(keys) > 5 else ""}'
                for what, keys in (('missing', missing), ('unexpected', unexpected),
                                   ('shape mismatches', wrong)) if keys]
    hint = ''
    if missing and all(k.startswith('norm/') for k in missing):
      hint = ('; the encoder has no final norm: a classifier fine-tuned with global pooling has none (its fc_norm '
              'follows the pooling). Start from the pretrained encoder it was fine-tuned from')
    if 'pos_embed' in missing or any(k.startswith('pos_embed:') for k in wrong):
      hint = ('; a learned position table (pos_embed=learned) comes from load_pretrained_encoder, which builds '
              'and interpolates it for the config\'s grid')
    raise ValueError(f'pretrained encoder from {source} does not fit model.name / dataset.image_size / '
                     f'dataset.channels of this config: ' + '; '.join(problems) + hint)
  merged = {k: np.asarray(found[k]).astype(target[k].dtype, copy=False) for k in target}
  dropped = sorted(set(found) - set(target))
  if 'pos_embed' in dropped:
    logging.warning('%s: its trained position table is not used (the model has the fixed sin-cos table)', source)
  logging.info('Loaded the pretrained encoder from %s (%d tensors)%s', source, len(merged),
               f'; not used: {dropped}' if dropped else '')
  out = dict(layout.plain(params))
  out['encoder'] = traverse_util.unflatten_dict(merged, sep='/')
  return out
