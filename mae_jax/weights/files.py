"""Weight files: the formats on disk, their metadata, `export_weights` and `import_weights`.

Formats written (FORMATS):
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
needs torch). An import is two steps that callers may also take apart:
`read_state_dict` (the file's tensors under its own names) or
`read_orbax_params`, then `params_from_state_dict` (names and layouts
converted, shapes checked against a named model). Warm starts
(`mae_jax.warm_start`) check a file against the run's config in between.
"""

import argparse
import ast
import contextlib
import io
import json
import os
import time

import numpy as np
from absl import logging

from mae_jax import fileio, models
from mae_jax.weights import hf, layout, reference
from mae_jax.weights.layout import Tree

FORMATS = ('orbax', 'safetensors', 'hf')
METADATA_FILENAME = 'mae_jax_metadata.json'
HF_WEIGHTS = 'model.safetensors'
HF_INDEX = 'model.safetensors.index.json'
HF_TORCH_WEIGHTS = 'pytorch_model.bin'
TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')
TORCH_HINT = 'pip install mae_jax[torch]  (or: pip install torch safetensors)'
SAFETENSORS_HINT = 'pip install safetensors  (or: pip install mae_jax[torch])'
# Model fields that change the params or the data they fit; kept in the metadata.
STRUCTURAL_FIELDS = ('image_size', 'in_channels', 'patch_size', 'embed_dim', 'depth', 'num_heads',
                     'decoder_embed_dim', 'decoder_depth', 'decoder_num_heads', 'mlp_ratio',
                     'norm_pix_loss', 'encoder_mask_tokens')


# ----------------------------------------------------------------------------
# Metadata.
# ----------------------------------------------------------------------------


def metadata_path(out: str) -> str:
  """Where the metadata JSON of an export lives: inside a folder, beside a file."""
  if out.endswith('.safetensors') or (fileio.exists(out) and not fileio.isdir(out)):
    return os.path.splitext(out)[0] + '.metadata.json'
  return fileio.join(out, METADATA_FILENAME)


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


def _metadata(model_name, overrides, fmt, params, extra) -> dict:
  settings = layout.model_settings(model_name, overrides)
  kind = layout.params_layout(params)
  meta = {
      'format': fmt,
      'model_name': model_name,
      'model_overrides': {k: v for k, v in overrides.items() if k in STRUCTURAL_FIELDS},
      'layout': kind,  # mae (encoder + decoder) | encoder | classifier
      'encoder_only': kind == 'encoder',
      'image_size': settings.image_size,
      'patch_size': settings.patch_size,
      'in_channels': settings.in_channels,
      'norm_pix_loss': bool(settings.norm_pix_loss),
      'step': None,
      'config': None,
      'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
  }
  if kind == 'classifier':
    meta['num_classes'] = int(params['head']['kernel'].shape[-1])
    meta['global_pool'] = 'fc_norm' in params
  meta.update(extra or {})
  return _json_safe(meta)


def read_metadata(path: str) -> dict | None:
  """The mae_jax metadata of an export (sidecar JSON or safetensors header), or None."""
  candidates = [metadata_path(path)]
  if fileio.isdir(path):
    candidates.append(fileio.join(path, METADATA_FILENAME))
  for candidate in candidates:
    if fileio.exists(candidate) and not fileio.isdir(candidate):
      return json.loads(fileio.read_text(candidate))
  if path.endswith('.safetensors') and fileio.exists(path):
    header = _safetensors_header_metadata(path)
    if header and 'mae_jax' in header:
      return json.loads(header['mae_jax'])
  return None


# ----------------------------------------------------------------------------
# safetensors, torch and Hugging Face files.
# ----------------------------------------------------------------------------


def _safetensors():
  try:
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'the safetensors / hf formats need the safetensors package: {SAFETENSORS_HINT}') from e
  return safetensors


def _what_it_is_instead(path: str) -> str:
  """A weight file that does not load: what its first bytes say it is (a git-lfs pointer, an HTML page)."""
  try:
    with fileio.path(path).open('rb') as f:
      start = f.read(64).lstrip()
  except OSError:
    start = b''
  if start.startswith(b'version https://git-lfs'):
    return ('it is a git-lfs pointer, not the weights: fetch them with `git lfs pull` in the clone (or '
            '`hf download`)')
  if start[:1] == b'<':
    return 'it is an HTML or XML page, not the weights: download the file itself'
  return 'damaged, or cut short: download it again'


def _not_safetensors(path: str, why: str) -> ValueError:
  return ValueError(f'{path} is not a readable safetensors file ({why}); {_what_it_is_instead(path)}')


def _safetensors_header_metadata(path: str) -> dict | None:
  """The header's metadata: read from the first bytes (an 8-byte length, then the JSON header)."""
  with fileio.path(path).open('rb') as f:
    head = f.read(8)
    length = int.from_bytes(head, 'little')
    if len(head) < 8 or length > _MAX_SAFETENSORS_HEADER:
      raise _not_safetensors(path, 'no header')
    data = f.read(length)
  try:
    header = json.loads(data)
  except (ValueError, UnicodeDecodeError) as e:
    raise _not_safetensors(path, f'its header is not JSON: {e}') from e
  if not isinstance(header, dict):
    raise _not_safetensors(path, 'its header is not a JSON object')
  return header.get('__metadata__')


_MAX_SAFETENSORS_HEADER = 100_000_000  # The safetensors format's own limit on the JSON header.


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  safetensors = _safetensors()
  try:
    if fileio.is_remote(path):  # Read whole through the file layer (gs://).
      return dict(safetensors.numpy.load(fileio.read_bytes(path)))
    return dict(safetensors.numpy.load_file(path))
  except (safetensors.SafetensorError, ValueError, OSError, MemoryError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise _not_safetensors(path, str(e)) from e


def _safetensors_bytes(state: dict, meta: dict) -> bytes:
  # format=pt lets transformers read the file; the mae_jax entry carries our metadata.
  header = {'format': 'pt', 'mae_jax': json.dumps(meta)}
  return _safetensors().numpy.save({k: np.ascontiguousarray(v) for k, v in state.items()}, metadata=header)


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
      source = io.BytesIO(fileio.read_bytes(path)) if fileio.is_remote(path) else path
      checkpoint = torch.load(source, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    instead = _what_it_is_instead(path)
    if not instead.startswith('damaged'):  # A git-lfs pointer or a web page: torch's message says nothing more.
      raise ValueError(f'{path} is not a PyTorch checkpoint: {instead}') from e
    raise ValueError(f'{path}: torch.load(weights_only=True) failed ({e}); only checkpoints of tensors and plain '
                     f'containers are read, never pickled code') from e
  state = checkpoint
  if isinstance(checkpoint, dict):
    for key in ('model', 'state_dict', 'model_state_dict'):
      if isinstance(checkpoint.get(key), dict):
        state = checkpoint[key]
        break
  if not isinstance(state, dict):
    raise TypeError(f'{path}: expected a state dict (or one under "model"), got {type(state).__name__}')
  state = {k: v for k, v in state.items() if hasattr(v, 'shape')}
  for prefix in ('module.', 'model.'):  # Saved from a DDP wrapper; a Lightning module's `model` attribute.
    if state and all(k.startswith(prefix) for k in state):
      state = {k[len(prefix):]: v for k, v in state.items()}
  return {k: layout.to_numpy_array(v) for k, v in state.items()}


def _load_hf_folder(path: str) -> dict[str, np.ndarray]:
  index = fileio.join(path, HF_INDEX)
  if fileio.exists(fileio.join(path, HF_WEIGHTS)):
    return _load_safetensors(fileio.join(path, HF_WEIGHTS))
  if fileio.exists(index):
    shards = sorted(set(json.loads(fileio.read_text(index))['weight_map'].values()))
    state = {}
    for shard in shards:
      state.update(_load_safetensors(fileio.join(path, shard)))
    return state
  if fileio.exists(fileio.join(path, HF_TORCH_WEIGHTS)):
    return load_torch_state_dict(fileio.join(path, HF_TORCH_WEIGHTS))
  raise FileNotFoundError(f'{path} has none of {HF_WEIGHTS}, {HF_INDEX}, {HF_TORCH_WEIGHTS}')


def detect_format(path: str) -> str:
  """'orbax', 'hf', 'safetensors' or 'torch' for a path to import."""
  if fileio.isdir(path):
    names = set(fileio.listdir(path))
    if names & {HF_WEIGHTS, HF_INDEX, HF_TORCH_WEIGHTS}:
      return 'hf'
    if names & {'_METADATA', '_CHECKPOINT_METADATA', 'manifest.ocdbt', 'checkpoint'}:
      return 'orbax'
    raise ValueError(f'{path} is neither an Orbax checkpoint (no _METADATA) nor a Hugging Face folder '
                     f'(no {HF_WEIGHTS}); a training run\'s workdir is read as one (export --workdir, '
                     'config.pretrained_workdir), not as weights')
  if not fileio.exists(path):
    raise FileNotFoundError(f'{path} does not exist')
  if path.endswith('.safetensors'):
    return 'safetensors'
  if path.endswith(TORCH_SUFFIXES):
    return 'torch'
  raise ValueError(f'{path}: unknown weight file; expected .safetensors, one of {TORCH_SUFFIXES}, '
                   f'an Orbax folder or a Hugging Face folder')


# ----------------------------------------------------------------------------
# Export and import.
# ----------------------------------------------------------------------------


def check_out(out: str, fmt: str, overwrite: bool) -> None:
  """Checks an export's output path before anything is read or written (nothing is removed here)."""
  if fmt not in FORMATS:
    raise ValueError(f'format={fmt!r}: must be one of {FORMATS}')
  if fmt == 'safetensors' and not out.endswith('.safetensors'):
    raise ValueError(f'--out={out}: a safetensors export must be a file named *.safetensors')
  if fileio.exists(out):
    if not overwrite:
      raise FileExistsError(f'{out} exists: choose another --out or pass overwrite=True (--overwrite)')
    if fileio.isdir(out):
      names = set(fileio.listdir(out))
      if names and not names & {METADATA_FILENAME, '_METADATA', '_CHECKPOINT_METADATA', HF_WEIGHTS}:
        raise FileExistsError(f'{out} is a folder that holds no export: refusing to replace it')


def _clear_out(out: str) -> None:
  """Removes a previous export at `out` (checked by check_out), once the new one is ready to be written."""
  if fileio.isdir(out):
    fileio.rmtree(out)
  elif fileio.exists(out):
    fileio.remove(out)


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
  check_out(out, fmt, overwrite)
  overrides = dict(model_overrides or {})
  params = layout.unwrap(params)
  if 'encoder' not in params:
    raise ValueError(f'the params hold no encoder (top-level keys {sorted(params)}): nothing to export')
  if encoder_only and 'head' not in params:
    params = {'encoder': params['encoder']}
  params = layout.canonical_params(params, model_name, overrides)
  if fmt == 'hf' and layout.params_layout(params) == 'classifier':
    raise ValueError('format=hf: a fine-tuned classifier has no ViTMAE equivalent; '
                     'use format=safetensors (timm names) or orbax')
  if fmt == 'hf' and 'decoder' in params:
    rows, cols = layout.grid_size(model_name, overrides)
    if rows != cols:  # transformers builds ViTMAE's decoder table for square grids only.
      raise ValueError(f'format=hf with the decoder (--full): a {rows}x{cols} patch grid; transformers\' '
                       'ViTMAEForPreTraining only loads square ones. Export the encoder alone (drop --full: '
                       'ViTMAEModel takes it), or use format=safetensors')
  meta = _metadata(model_name, overrides, fmt, params, metadata)
  if fmt == 'orbax':
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    _clear_out(out)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.fspath(fileio.path(out)), params)
  else:  # The files are made in memory first: a failure leaves a previous export where it was.
    state = reference.to_reference(params, layout.grid_size(model_name, overrides))
    if fmt == 'safetensors':
      written = {out: _safetensors_bytes(state, meta)}
    else:
      encoder_only = layout.params_layout(params) == 'encoder'
      prefix = '' if encoder_only else 'vit.'  # ViTMAEModel's own names vs ViTMAEForPreTraining's.
      mask_ratio = (metadata or {}).get('mask_ratio', ((metadata or {}).get('config') or {}).get(
          'mask_ratio', 0.75))
      hf_config = hf.hf_config(model_name, overrides, encoder_only, mask_ratio)
      written = {fileio.join(out, 'config.json'): json.dumps(hf_config, indent=2).encode('utf-8'),
                 fileio.join(out, HF_WEIGHTS): _safetensors_bytes(hf.to_hf_state_dict(state, prefix), meta)}
    _clear_out(out)
    for path, data in written.items():
      fileio.write_bytes(path, data)  # Each written whole, through the one file layer (local or gs://).
  fileio.write_text(metadata_path(out), json.dumps(meta, indent=2))
  logging.info('Exported %s (%s) to %s', model_name, meta['layout'], out)
  return out


def model_heads(model_name: str, overrides: dict) -> dict:
  """{'num_heads': ..., 'decoder_num_heads': ...} of a named model with overrides."""
  settings = layout.model_settings(model_name, overrides)
  return {'num_heads': settings.num_heads, 'decoder_num_heads': settings.decoder_num_heads}


def declared_heads(path: str) -> dict:
  """Attention heads that a weight file's own config (metadata or config.json) declares; {} when unknown.

  Shapes do not tell the number of heads: weights split into the wrong number
  load without complaint and compute another attention.
  """
  config_json = fileio.join(path, 'config.json')
  if fileio.isdir(path) and fileio.exists(config_json):
    hf_config = json.loads(fileio.read_text(config_json))
    return {'num_heads': hf_config.get('num_attention_heads'),
            'decoder_num_heads': hf_config.get('decoder_num_attention_heads')}
  meta = read_metadata(path)
  if meta and meta.get('model_name') in models.MODELS:
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in (meta.get('model_overrides') or {}).items()}
    return model_heads(meta['model_name'], overrides)
  return {}


def check_encoder_heads(declared: dict, heads: int, source: str, setting: str) -> None:
  """Refuses an encoder whose declared number of attention heads is not the model's `heads`."""
  if declared.get('num_heads') and int(declared['num_heads']) != int(heads):
    raise ValueError(f'{source}: its encoder has {declared["num_heads"]} attention heads, the model '
                     f'{heads}; the weights would load and compute another attention: {setting}')


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
  config_json = fileio.join(path, 'config.json')
  if model_name is None and fileio.isdir(path) and fileio.exists(config_json):
    with fileio.path(config_json).open('r') as f:
      model_name, hf_overrides = hf.model_name_from_hf_config(json.load(f), config_json)
    overrides = {**hf_overrides, **overrides}
    logging.info('%s: config.json matches %s %s', path, model_name, hf_overrides)
  if model_name is None:
    raise ValueError(f'{path} has no mae_jax metadata ({metadata_path(path)}): pass model_name= (or --model=)')
  if isinstance(overrides.get('image_size'), list):
    overrides['image_size'] = tuple(overrides['image_size'])
  if 'num_heads' in model_overrides:
    check_encoder_heads(declared_heads(path), model_heads(model_name, overrides)['num_heads'], path,
                        'pass the number the file was trained with (or none)')
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
    The model is the one asked for: `load_weights` also reads in_channels and
    image_size from the file and returns the model the weights fit.
  """
  return _load(path, model_name, model_overrides, infer=False)[0]


def load_weights(path: str, model_name: str | None = None, **model_overrides) -> tuple[Tree, str, dict]:
  """(params, model name, overrides): `import_weights`, with the model the weights fit.

  The overrides are the caller's, then the metadata's (or a Hugging Face
  config.json's), then what the file itself shows: in_channels from the patch
  embedding, image_size from a fixed sin-cos position table.
  """
  return _load(path, model_name, model_overrides, infer=True)


def _load(path: str, model_name: str | None, model_overrides: dict, infer: bool) -> tuple[Tree, str, dict]:
  fmt = detect_format(path)
  model_name, overrides = resolve_model(path, model_name, model_overrides)
  if fmt == 'orbax':
    params = read_orbax_params(path)
    kind = layout.params_layout(params)
    num_classes = params['head']['kernel'].shape[-1] if kind == 'classifier' else 0
    template = layout.abstract_params(model_name, kind, overrides, num_classes, 'fc_norm' in params,
                                      layout.pos_embed_kind(params))
    layout.check_shapes(layout.flat_shapes(params), layout.flat_shapes(template), path,
                        f'{model_name} ({kind}, overrides {overrides or "none"})',
                        'pass the model name (and overrides) the checkpoint was exported with')
    return layout.restack(params, overrides), model_name, overrides
  state = read_state_dict(path)
  if infer:
    overrides = reference.infer_overrides(state, model_name, overrides, path)
  return params_from_state_dict(state, model_name, overrides, path), model_name, overrides


def parse_overrides(items) -> dict:
  """['in_channels=4', 'image_size=448', 'image_size=(224, 448)'] (a command line's) -> model overrides.

  Values are Python literals (numbers, tuples, booleans), else strings; the keys
  must be fields of the MAE model.
  """
  fields = layout.mae_field_names()
  overrides = {}
  for item in items or ():
    key, sep, text = item.partition('=')
    key = key.strip()
    if not sep or not key:
      raise ValueError(f'--override={item!r}: expected KEY=VALUE, e.g. --override=in_channels=4')
    if key not in fields:
      raise ValueError(f'--override={item!r}: {key!r} is not a model field; known: {", ".join(sorted(fields))}')
    text = text.strip()
    default = layout.mae_field_default(key)
    if isinstance(default, bool):  # As the trainers' --config flags read it: true / false, 1 / 0.
      if text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'--override={item!r}: {key} is true or false')
      value = text.lower() in ('true', '1')
    else:
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        value = text
    overrides[key] = tuple(value) if isinstance(value, list) else value
  return overrides


def read_orbax_params(path: str) -> Tree:
  """An Orbax export's params as host numpy arrays, unscanned; not checked against any model."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(os.fspath(fileio.path(path)))
  return layout.unstack_blocks(layout.numpy_tree(layout.plain(restored)))


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a .pth, a safetensors file or a Hugging Face folder, as numpy, under the file's names."""
  fmt = detect_format(path)
  if fmt == 'torch':
    return load_torch_state_dict(path)
  if fmt == 'hf':
    return _load_hf_folder(path)
  if fmt == 'safetensors':
    return _load_safetensors(path)
  raise ValueError(f'{path} is an Orbax export (a params tree with mae_jax names, not a state dict): '
                   'read it with read_orbax_params or import_weights')


def params_from_state_dict(state: dict, model_name: str, overrides: dict, source: str) -> Tree:
  """A state dict with reference / timm or Hugging Face names -> the named model's params (checked).

  The layout follows the keys, as in `import_weights`: with a decoder the full
  MAE, without one {'encoder': ...}, with `head.*` a classifier.
  """
  if hf.is_hf_state(state):
    state, prefix = hf.normalize_hf_names(state)
    params = reference.import_state(state, model_name, overrides, source,
                                    names_fn=lambda key: hf.hf_key_names(key, prefix), hf=True)
  else:
    params = reference.import_state(state, model_name, overrides, source)
  return layout.restack(params, overrides)
