"""The pretrained encoder of a downstream run: read it, then merge it into freshly built params.

The encoder comes from `config.pretrained_workdir` (a pretraining or fine-tuning
run's checkpoints, at `config.pretrained_step`, -1 for the newest) or
`config.pretrained_path` (anything `import_weights` reads: an export of
mae_jax, a reference .pth, safetensors or a Hugging Face folder).
"""

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from mae_jax import checkpoint
from mae_jax.models import from_config
from mae_jax.weights import files, layout


def load_pretrained_encoder(config) -> tuple[dict | None, str]:
  """The pretrained encoder params (host arrays) and where they came from; (None, '') for none."""
  workdir = config.pretrained_workdir
  path = config.pretrained_path
  if workdir and path:
    raise ValueError('pretrained_workdir and pretrained_path are both set: set one of them')
  if workdir:
    step = int(config.pretrained_step)
    params, _ = checkpoint.load_params(workdir, None if step < 0 else step)
    params = layout.plain(params)
    if 'encoder' not in params:
      raise ValueError(f'pretrained_workdir={workdir!r}: its params have no "encoder" '
                       f'(top-level keys {sorted(params)}); is it a mae_jax pretraining or fine-tuning run?')
    step = checkpoint.latest_step(workdir) if step < 0 else step
    source = f'{workdir} step {step}'
  elif path:
    params = files.import_weights(path, from_config.model_name(config), **from_config.encoder_overrides(config))
    source = path
  else:
    return None, ''
  encoder = jax.tree.map(np.asarray, params['encoder'])
  # The target layout decides: stacked `blocks` with scan_layers, else `blocks_{i}`.
  if config.model.scan_layers:
    encoder = layout.stack_blocks({'encoder': encoder})['encoder']
  else:
    encoder = layout.unstack_blocks({'encoder': encoder})['encoder']
  return encoder, source


def merge_encoder(params: dict, encoder: dict, source: str) -> dict:
  """Replaces params['encoder'] by pretrained `encoder` (shapes checked; a spare `norm` dropped).

  Only the shapes and dtypes of `params` are read: it may be abstract
  (ShapeDtypeStructs), host arrays or global arrays sharded over any mesh. The
  merged encoder leaves are host (numpy) arrays in the target dtypes; every
  other leaf of `params` is passed through untouched. Place the result with
  `place_tree` / `place_on_mesh`: no process ever fetches a parameter that
  spans other processes' devices (FSDP over hosts for L/16 and H/14).
  """
  target = traverse_util.flatten_dict(layout.plain(params['encoder']), sep='/')
  found = traverse_util.flatten_dict(layout.plain(encoder), sep='/')
  missing = sorted(set(target) - set(found))
  unexpected = sorted(k for k in set(found) - set(target) if not k.startswith('norm/'))
  wrong = sorted(f'{k}: {tuple(found[k].shape)} (expected {tuple(target[k].shape)})'
                 for k in set(target) & set(found) if tuple(found[k].shape) != tuple(target[k].shape))
  if missing or unexpected or wrong:
    problems = [f'{what} ({len(keys)}): {", ".join(keys[:5])}{" ..." if len(keys) > 5 else ""}'
                for what, keys in (('missing', missing), ('unexpected', unexpected),
                                   ('shape mismatches', wrong)) if keys]
    raise ValueError(f'pretrained encoder from {source} does not fit model.name / dataset.image_size / '
                     f'dataset.channels of this config: ' + '; '.join(problems))
  merged = {k: np.asarray(found[k]).astype(target[k].dtype, copy=False) for k in target}
  dropped = sorted(set(found) - set(target))
  logging.info('Loaded the pretrained encoder from %s (%d tensors)%s', source, len(merged),
               f'; not used: {dropped}' if dropped else '')
  out = dict(layout.plain(params))
  out['encoder'] = traverse_util.unflatten_dict(merged, sep='/')
  return out
