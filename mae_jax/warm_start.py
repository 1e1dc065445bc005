"""Warm start: pretraining from released or earlier weights (`config.init_from`).

`config.init_from=PATH` starts a pretraining run at step 0, with a fresh
optimizer state and the learning-rate schedule from its start, from:

  * a reference `.pth` checkpoint (read with torch `weights_only=True`),
  * a safetensors file with reference / timm or Hugging Face names,
  * a Hugging Face folder (`ViTMAEForPreTraining` or `ViTMAEModel`),
  * a mae_jax export (any format of `mae_jax.export`),
  * a mae_jax pretraining workdir (its newest checkpoint).

The decoder comes from the file when the file has one; else the encoder does,
and the decoder is initialised as a run without `init_from` would initialise it.
The log says which parts came from the file and which are fresh.

The weights are read into host numpy arrays and checked against the model's
abstract params: a file that does not fit the config fails here, before
anything compiles, naming each tensor, its shape in the file and in the model,
and the config key to change. They are then placed into the state's shardings
leaf by leaf (`parallel.place_tree`): every process cuts only its own shards,
so no device ever holds the whole model (FSDP over many hosts works). A
checkpoint in the run's own workdir wins: the run resumes and `init_from` is
ignored (logged).
"""

import dataclasses
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from mae_jax import checkpoint, config_tools, fileio, models, parallel
from mae_jax.models import from_config
from mae_jax.weights import files, hf, layout, reference

MAX_LISTED = 8  # Tensors named in an error before "... and N more".

# Where a size of the model shows in the tensor shapes: (quantity, reference / timm key, its dim, mae_jax path,
# its dim). The MLP widths are compared as ratios to the width, as the model sets them.
SIZES = (
    ('patch size', 'patch_embed.proj.weight', -1, 'encoder/patch_embed/kernel', 0),
    ('number of image channels', 'patch_embed.proj.weight', 1, 'encoder/patch_embed/kernel', 2),
    ('encoder width', 'cls_token', -1, 'encoder/cls_token', -1),
    ('encoder MLP width', 'blocks.0.mlp.fc1.weight', 0, 'encoder/blocks_0/mlp/fc1/kernel', -1),
    ('decoder width', 'mask_token', -1, 'decoder/mask_token', -1),
    ('decoder MLP width', 'decoder_blocks.0.mlp.fc1.weight', 0, 'decoder/blocks_0/mlp/fc1/kernel', -1),
)
# (quantity, block-index regex in reference / timm, Hugging Face and mae_jax names).
DEPTHS = (
    ('encoder depth', r'blocks\.(\d+)\.', r'(?:vit\.)?encoder\.layer\.(\d+)\.', r'encoder/blocks_(\d+)/'),
    ('decoder depth', r'decoder_blocks\.(\d+)\.', r'decoder\.decoder_layers\.(\d+)\.', r'decoder/blocks_(\d+)/'),
)
# Not in the shapes: read from the source's config (Hugging Face config.json, mae_jax metadata, a run's config).
HEADS = (('number of attention heads', 'num_heads'), ('number of decoder attention heads', 'decoder_num_heads'))
# The config key that sets each quantity here.
CONFIG_KEYS = {
    'patch size': 'model.name (or model.patch_size)',
    'number of image channels': 'dataset.channels',
    'encoder width': 'model.name (or model.embed_dim)',
    'encoder MLP ratio': 'model.mlp_ratio',
    'encoder depth': 'model.name (or model.depth)',
    'decoder width': 'model.decoder_embed_dim',
    'decoder MLP ratio': 'model.mlp_ratio',
    'decoder depth': 'model.decoder_depth',
    'number of attention heads': 'model.name (or model.num_heads)',
    'number of decoder attention heads': 'model.decoder_num_heads',
}


# The encoder's final norm, under reference, Hugging Face or mae_jax names.
_FINAL_NORM = re.compile(r'^(norm\.|(vit\.)?layernorm\.|encoder/norm/)')


@dataclasses.dataclass(frozen=True)
class WarmStart:
  """The params of `config.init_from`, on the mesh, and what they cover."""
  params: dict  # The leaves from the file (a subtree of the params, same layout), placed in their shardings.
  source: str
  loaded: tuple[str, ...]  # '/'-joined paths of the leaves from the file.
  fresh: tuple[str, ...]  # Paths of the leaves initialised afresh.


# ----------------------------------------------------------------------------
# Names: reference / timm, Hugging Face, mae_jax.


@dataclasses.dataclass(frozen=True)
class _Naming:
  kind: str  # 'reference', 'hf' or 'mae_jax'
  prefix: str = ''  # Hugging Face: 'vit.' (ViTMAEForPreTraining) or '' (ViTMAEModel).

  def key(self, ref_key: str, path: str) -> str:
    if self.kind == 'mae_jax':
      return path
    return hf.hf_key_names(ref_key, self.prefix)[0] if self.kind == 'hf' else ref_key

  def depth_pattern(self, patterns) -> str:
    return patterns[('reference', 'hf', 'mae_jax').index(self.kind)]

  def part(self, key: str) -> str:
    """'encoder', 'decoder', 'head' (a classifier's) or 'other' (e.g. the encoder_mask_tokens ablation's token)."""
    if self.kind == 'mae_jax':
      top = key.split('/')[0]
      return {'encoder': 'encoder', 'decoder': 'decoder', 'head': 'head', 'fc_norm': 'head'}.get(top, 'other')
    if self.kind == 'hf':
      return 'decoder' if key.startswith('decoder.') else 'encoder'
    if key.startswith(('head.', 'fc_norm.')):
      return 'head'
    return 'decoder' if key.startswith('decoder_') or key == 'mask_token' else 'encoder'

  def position_tables(self) -> set[str]:
    if self.kind == 'mae_jax':
      return set()
    if self.kind == 'hf':
      return {name for key in reference.POS_KEYS for name in hf.hf_key_names(key, self.prefix)}
    return set(reference.POS_KEYS)


def _architecture(shapes: dict, naming: _Naming) -> dict:
  """The quantities of SIZES and DEPTHS that a {name: shape} dict tells."""
  out = {}
  for quantity, ref_key, ref_dim, path, path_dim in SIZES:
    shape = shapes.get(naming.key(ref_key, path))
    if shape:
      out[quantity] = shape[path_dim if naming.kind == 'mae_jax' else ref_dim]
  for quantity, *patterns in DEPTHS:
    pattern = naming.depth_pattern(patterns)
    indices = {int(m.group(1)) for key in shapes if (m := re.match(pattern, key))}
    if indices:
      out[quantity] = max(indices) + 1
  for prefix in ('encoder', 'decoder'):  # The MLP width as the model sets it: a ratio to the width.
    mlp, width = out.pop(f'{prefix} MLP width', None), out.get(f'{prefix} width')
    if mlp and width:
      out[f'{prefix} MLP ratio'] = mlp / width
  return out


def _order(key: str):
  """Tensors outside the blocks first (patch embedding, tokens: they tell the sizes), then block by block."""
  in_block = bool(re.search(r'(blocks|layer|layers)[._/]\d+', key))
  return in_block, [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', key)]


def _listed(keys) -> str:
  more = f' ... and {len(keys) - MAX_LISTED} more' if len(keys) > MAX_LISTED else ''
  return ', '.join(keys[:MAX_LISTED]) + more


def check_fit(found: dict, expected: dict, naming: _Naming, source: str, model: str,
              declared_heads: dict | None = None, model_heads: dict | None = None) -> list[str]:
  """Checks a source's {name: shape} against the model's; returns the names not used, with why.

  The encoder must be whole; the decoder whole or absent (then it starts
  afresh); position tables (fixed sin-cos tables in pretraining) and a
  classifier's head are not used. Raises ValueError naming every tensor that
  does not fit, its shapes, and the config keys to change.
  """
  # The reference's fixed position tables are not params (any grid is fine: reference.import_state warns
  # when a table is not the model's).
  tables = naming.position_tables()
  found = {k: v for k, v in found.items() if k not in tables}
  expected = {k: v for k, v in expected.items() if k not in tables}
  not_used = []
  for key in sorted(set(found) - set(expected)):
    if key.split('/')[-1] == 'pos_embed':
      del found[key]
      not_used.append(f'{key} (a learned or other-grid position table; pretraining uses the fixed sin-cos table)')
    elif naming.part(key) == 'head':
      del found[key]
      not_used.append(f'{key} (a classifier\'s; pretraining has no head)')
  has_decoder = any(naming.part(key) == 'decoder' for key in found)
  required = {key for key in expected if naming.part(key) == 'encoder' or
              (has_decoder and naming.part(key) == 'decoder')}
  missing = sorted(required - set(found), key=_order)
  unexpected = sorted(set(found) - set(expected), key=_order)
  wrong = sorted((key for key in set(found) & set(expected) if tuple(found[key]) != tuple(expected[key])),
                 key=_order)
  file_arch, model_arch = _architecture(found, naming), _architecture(expected, naming)
  for quantity, field in HEADS:
    if (declared_heads or {}).get(field) and (model_heads or {}).get(field):
      if field == 'num_heads' or has_decoder:
        file_arch[quantity], model_arch[quantity] = declared_heads[field], model_heads[field]
  differ = [q for q in file_arch if q in model_arch and file_arch[q] != model_arch[q]]
  if not (missing or unexpected or wrong or differ):
    return not_used
  lines = [f'config.init_from={source} does not fit the model of this config ({model}):']
  lines += [f'  {key}: shape {tuple(found[key])} in the file, {tuple(expected[key])} in the model'
            for key in wrong[:MAX_LISTED]]
  if len(wrong) > MAX_LISTED:
    lines.append(f'  ... and {len(wrong) - MAX_LISTED} more tensors of other shapes')
  if missing:
    lines.append(f'  in the model but not in the file ({len(missing)}): {_listed(missing)}')
  if unexpected:
    lines.append(f'  in the file but not in the model ({len(unexpected)}): {_listed(unexpected)}')
  lines += [f'  the file\'s {q} is {file_arch[q]}, the model\'s {model_arch[q]}: change {CONFIG_KEYS[q]}'
            for q in differ]
  if missing and all(_FINAL_NORM.search(key) for key in missing):
    lines.append('  (no final norm of the encoder: a classifier fine-tuned with global pooling has none, its fc_norm '
                 'normalises the pooled tokens; start from a pretraining checkpoint or its export)')
  elif not differ:
    lines.append('  (its sizes match, but not its tensors: is it an MAE / ViT checkpoint?)')
  raise ValueError('\n'.join(lines))


# ----------------------------------------------------------------------------
# Reading a source into host arrays with mae_jax names.


def weight_overrides(config) -> dict:
  """The config's model fields that shape the params (what a weight file is checked against)."""
  overrides = from_config.model_overrides(config)
  return {k: v for k, v in overrides.items() if k in files.STRUCTURAL_FIELDS and k != 'encoder_mask_tokens'}


def is_workdir(path: str) -> bool:
  return fileio.isdir(checkpoint.checkpoint_dir(path))


def _read_workdir(path: str) -> tuple[dict, str, dict]:
  """(unscanned host params, description, declared heads) of a pretraining workdir's newest checkpoint.

  The run's saved config gives the tree to restore; every leaf is restored
  straight into host memory (numpy), never onto a device.
  """
  meta = checkpoint.load_meta(path)
  saved = meta.get('config') or {}
  if 'downstream' in saved:
    kind, source = saved['downstream'], saved.get('pretrained_workdir') or saved.get('pretrained_path')
    start = f': config.init_from={source}' if source else ''
    if kind != 'finetune':  # A probe saves its head alone.
      raise ValueError(f'config.init_from={path} is a {kind} run\'s workdir: it holds no encoder (a probe trains '
                       f'its head on a frozen one). Start from the encoder it probed{start}')
    if saved.get('global_pool'):
      raise ValueError(f'config.init_from={path} is a fine-tuning run\'s workdir with global pooling: its encoder '
                       'has no final norm for pretraining to start from. Start from the encoder it was fine-tuned '
                       f'from{start}')
    raise ValueError(f'config.init_from={path} is a {kind} run\'s workdir; warm starts read '
                     'pretraining runs. Export its encoder (python -m mae_jax.export --workdir=... '
                     '--format=orbax --out=EXPORT) and set config.init_from=EXPORT')
  name = from_config.model_name(saved)
  overrides = {k: v for k, v in from_config.model_overrides(saved, strict=False).items()
               if k in files.STRUCTURAL_FIELDS or k == 'scan_layers'}
  model = models.get_model(name, **overrides)
  size = layout.image_hw(model)
  images = jax.ShapeDtypeStruct((1, *size, model.in_channels), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init({'params': jax.random.key(0), 'mask': jax.random.key(0)}, x,
                                                 train=False), images)['params']
  template = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), layout.plain(abstract))
  try:
    params, _ = checkpoint.load_params(path, meta['step'], template)
  except (ValueError, KeyError) as e:
    raise ValueError(f'config.init_from={path}: its checkpoint at step {meta["step"]} does not hold the params '
                     f'of the model its config describes ({name}, {overrides}): {e}') from e
  params = layout.unstack_blocks(layout.numpy_tree(layout.plain(params)))
  return params, f'{path} (step {meta["step"]})', files.model_heads(name, overrides)


def _detect_format(path: str) -> str:
  try:
    return files.detect_format(path)
  except ValueError as e:
    raise ValueError(f'config.init_from: {e}') from e


def read_params(config, path: str, target: dict) -> tuple[dict, str, list[str]]:
  """(unscanned host params with mae_jax names, description, names not used) of a source, checked.

  `target` holds the model's unscanned flat shapes ('encoder/blocks_0/...' -> shape).
  """
  name, overrides = from_config.model_name(config), weight_overrides(config)
  model = f'model.name={name!r} with {overrides}'
  mae_jax_names = _Naming('mae_jax')
  if is_workdir(path):
    params, source, heads = _read_workdir(path)
  elif _detect_format(path) == 'orbax':
    params, source, heads = files.read_orbax_params(path), path, files.declared_heads(path)
  else:
    # Reference / timm or Hugging Face names: checked under the file's own names, then converted.
    state = files.read_state_dict(path)
    naming = _Naming('reference')
    if hf.is_hf_state(state):
      state, prefix = hf.normalize_hf_names(state)
      naming = _Naming('hf', prefix)
    check_fit({k: tuple(np.shape(v)) for k, v in state.items()}, _file_shapes(name, overrides, naming), naming,
              path, model, files.declared_heads(path), files.model_heads(name, overrides))
    params = files.params_from_state_dict(state, name, overrides, path)
    return params, path, check_fit(layout.flat_shapes(params), target, mae_jax_names, path, model)
  not_used = check_fit(layout.flat_shapes(params), target, mae_jax_names, source, model, heads,
                       files.model_heads(name, overrides))
  return params, source, not_used


def _file_shapes(name: str, overrides: dict, naming: _Naming) -> dict:
  """{file key: shape} of the model's full MAE under a naming (reference / timm or Hugging Face)."""
  shapes = reference.reference_key_shapes(name, **overrides)
  if naming.kind == 'reference':
    return shapes
  out = {}
  for key, shape in shapes.items():
    names = hf.hf_key_names(key, naming.prefix)
    out.update({n: (shape[0] // len(names),) + tuple(shape[1:]) for n in names})
  return out


# ----------------------------------------------------------------------------
# Into the state.


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(layout.plain(tree), sep='/')


def merge(params, loaded):
  """`params` with the leaves of `loaded` (a subtree in the same layout) in place of theirs; works under jit."""
  flat = _flat(params)
  flat.update(_flat(loaded))
  return traverse_util.unflatten_dict(flat, sep='/')


@config_tools.settings_check  # A file that does not fit the config fails the same way on a rerun: exit 78.
def prepare(config, workdir: str, abstract_params, shardings) -> WarmStart | None:
  """`config.init_from`'s params placed into `shardings`; None without init_from or when resuming.

  Args:
    config: the pretraining config (init_from, model.*, dataset.image_size / channels).
    workdir: the run's workdir: a checkpoint there wins (init_from is ignored, logged).
    abstract_params: the state's params as ShapeDtypeStructs (scanned or not).
    shardings: their shardings (the state's).
  """
  path = config.init_from
  if not path:
    return None
  if checkpoint.latest_step(workdir) is not None:
    logging.info('config.init_from=%s is ignored: %s holds a checkpoint of this run, which it resumes from',
                 path, workdir)
    return None
  path = path if fileio.is_remote(path) else os.path.expanduser(path)
  if not fileio.exists(path):
    raise FileNotFoundError(f'config.init_from={path} does not exist: set it to a reference .pth, a safetensors '
                            "file, a Hugging Face folder, a mae_jax export or workdir, or to '' (random init)")
  abstract_params = layout.plain(abstract_params)
  target = layout.flat_shapes(jax.eval_shape(layout.unstack_blocks, abstract_params))
  params, source, not_used = read_params(config, path, target)
  loaded = {k: v for k, v in _flat(params).items() if k in target}
  if config.model.scan_layers:
    loaded = _flat(layout.stack_blocks(traverse_util.unflatten_dict(loaded, sep='/')))
  abstract, placement = _flat(abstract_params), _flat(shardings)
  host = {k: np.asarray(v).astype(abstract[k].dtype, copy=False) for k, v in loaded.items()}
  # Each process builds only its own shards of each leaf from its host copy: nothing is gathered.
  tree = parallel.place_tree(traverse_util.unflatten_dict(host, sep='/'),
                             traverse_util.unflatten_dict({k: placement[k] for k in host}, sep='/'))
  fresh = tuple(sorted(set(abstract) - set(host)))
  _log(source, tuple(sorted(host)), fresh, not_used)
  return WarmStart(params=tree, source=source, loaded=tuple(sorted(host)), fresh=fresh)


def _parts(paths) -> list[str]:
  return sorted({p.split('/')[0] for p in paths}, key=lambda part: (part != 'encoder', part))  # Encoder first.


def _log(source, loaded, fresh, not_used):
  fresh_parts = [p if p not in _parts(loaded) else f'{p} ({", ".join(f for f in fresh if f.startswith(p + "/"))})'
                 for p in _parts(fresh)]
  line = (f'Warm start from {source}: step 0, fresh optimizer state and schedule. From the file: '
          f'{" and ".join(_parts(loaded))} ({len(loaded)} tensors); initialised afresh: '
          f'{", ".join(fresh_parts) or "nothing"}' + (f'; not used: {", ".join(not_used)}' if not_used else ''))
  logging.info('%s', line)
  if jax.process_index() == 0:  # On the terminal too, as a resume's first line is.
    sys.stderr.write(line + '\n')
