r"""Frozen-encoder features of a folder of images or a prepared data set, written to one file.

  python -m mae_jax.features --weights=mae_base.safetensors --images=/data/photos \
      --layers=3,5,7,11 --pool=none --out=features.safetensors
  python -m mae_jax.features --workdir=DIR [--step=N] --dataset=my_images --data_dir=DIR \
      --split='train[:10%]' --pool=cls --out=gs://bucket/features.npz

The encoder comes from `--weights` (anything `mae_jax.weights.import_weights`
reads: an export of this project, a reference .pth, safetensors, a Hugging Face
folder; the model from its metadata or `--model`) or from a run's checkpoint
(`--workdir`, `--step`). Images are read as the eval transform reads them
(shorter side resized, centre crop to the model's image size, normalised with
the run's mean / std, else `--mean` / `--std`, else ImageNet's); a folder's
files are decoded as `mae_jax.data.prepare` stores them, so a folder and the
data set prepared from it give the same features.

`--layers` takes blocks' outputs (0-based, negative from the end; before the
final norm, as Hugging Face's `hidden_states[i + 1]`); without it the output is
the final normed tokens. `--pool`: cls (the cls token, [N, D]), mean (the mean
of the patch tokens, [N, D]) or none (every token, cls first, [N, 1 + L, D]).

Output (by extension; local or gs://, written whole by process 0):
  .safetensors  one tensor per layer (`layer_3`, ...; `features` without
                --layers), `labels` when the data set has them; the header's
                metadata holds `names` and `mae_jax_features` (JSON).
  .npz          the same arrays plus `names` and `metadata` (a JSON string).
  .npy          one array, layers stacked on axis 1 ([N, K, ...]) when several;
                names and metadata in FILE_STEM.metadata.json beside it.
Names are the files' paths relative to --images, or SPLIT/INDEX for a data set.
`read_features(path)` reads any of them back.
"""

import math
import sys
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from mae_jax import console  # Before TensorFlow: console imports it with its native log lines sent to the log file.

# isort: split
import tensorflow as tf

from mae_jax import checkpoint, fileio, parallel, train_state
from mae_jax.data import IMAGENET_MEAN, IMAGENET_STD, dataset_writer, input_pipeline, prepare, preprocess, sources
from mae_jax.feature_files import (  # noqa: F401  # Part of this module's API (read_features, ...).
  METADATA_KEY,
  OUT_EXTENSIONS,
  FeaturesError,
  check_out,
  read_features,
  sidecar_path,
  write_features,
)
from mae_jax.models import from_config, mae, vit
from mae_jax.models import pos_embed as pos_tables
from mae_jax.weights import files, layout, reference

POOLS = ('cls', 'mean', 'none')
COMPUTE_DTYPES = ('float32', 'bfloat16')
FINAL_KEY = 'features'  # The final normed output's name (no --layers).
MAX_LISTED_SKIPPED = 100  # Skipped file names kept in the metadata.


# ----------------------------------------------------------------------------
# Settings.
# ----------------------------------------------------------------------------


def parse_layers(layers: Sequence[str | int] | str | None) -> tuple[int, ...] | None:
  """'3,5,7,11' or ['3', '5'] -> (3, 5); empty -> None (the final normed output)."""
  if layers is None:
    return None
  if isinstance(layers, str):
    layers = [s for s in layers.split(',') if s.strip()]
  try:
    parsed = tuple(int(str(i).strip()) for i in layers)
  except ValueError:
    raise FeaturesError(f'--layers={",".join(map(str, layers))}: must be block indices such as 3,5,7,11 '
                        '(0-based, negative from the end)') from None
  if len(set(parsed)) != len(parsed):
    raise FeaturesError(f'--layers={",".join(map(str, parsed))}: lists a block twice')
  return parsed or None


def check_layers(layers: tuple[int, ...] | None, depth: int, model_name: str) -> tuple[int, ...] | None:
  """Block indices as non-negative ints, or a FeaturesError naming --layers and the depth."""
  if layers is None:
    return None
  try:
    resolved = vit.check_return_layers(layers, depth)
  except ValueError as e:
    raise FeaturesError(f'--layers={",".join(map(str, layers))}: {model_name} has {depth} blocks: {e}') from None
  if len(set(resolved)) != len(resolved):
    raise FeaturesError(f'--layers={",".join(map(str, layers))}: names block(s) twice (negative indices count '
                        f'from the end of {depth} blocks)')
  return resolved


def output_keys(layers: tuple[int, ...] | None) -> list[str]:
  """The array names of an output: layer_{i} per block, or `features` for the final normed output."""
  return [FINAL_KEY] if layers is None else [f'layer_{i}' for i in layers]


# ----------------------------------------------------------------------------
# The encoder.
# ----------------------------------------------------------------------------


def load_encoder(*, weights: str | None = None, workdir: str | None = None, step: int | None = None,
                 model_name: str | None = None, dtype: str = 'float32',
                 model_overrides: dict | None = None) -> tuple[dict, dict, dict]:
  """(VisionTransformer fields, its params (host, unscanned), facts: model_name, overrides, source, dataset).

  `dataset` is the run's config.dataset (from the workdir or the weights'
  metadata) or {}: its mean / std normalise the images.
  """
  if bool(weights) == bool(workdir):
    raise FeaturesError('give exactly one of --weights (an export, .pth, safetensors or Hugging Face folder) '
                        'and --workdir (a training run)')
  if dtype not in COMPUTE_DTYPES:
    raise FeaturesError(f'--dtype={dtype}: must be one of {COMPUTE_DTYPES}')
  if weights:
    params, name, overrides = files.load_weights(weights, model_name, **(model_overrides or {}))
    run_config = (files.read_metadata(weights) or {}).get('config') or {}
    source = weights
  else:
    params, run_config = checkpoint.load_params(workdir, step)
    run_name = from_config.model_name(run_config)
    name = model_name or run_name
    overrides = from_config.model_overrides(run_config, strict=False) if name == run_name else {}
    step = checkpoint.latest_step(workdir) if step is None else step
    source = f'{workdir} step {step}'
  params = layout.unstack_blocks(layout.numpy_tree(layout.plain(params)))
  if 'encoder' not in params:
    raise FeaturesError(f'{source}: no encoder in the weights (top-level keys {sorted(params)})')
  structural = {k: v for k, v in overrides.items() if k in mae.ENCODER_FIELDS and k in files.STRUCTURAL_FIELDS}
  kwargs = mae.encoder_kwargs(name, **structural, dtype=dtype, scan_layers=False, remat_policy='none',
                              attention_impl='xla')
  for field in ('image_size', 'in_channels'):  # Fields a model name may leave at the class default.
    kwargs.setdefault(field, mae.MaskedAutoencoder.__dataclass_fields__[field].default)
  encoder = _with_position_table(dict(params['encoder']), kwargs, source)
  facts = {'model_name': name, 'model_overrides': structural, 'source': source,
           'dataset': dict(run_config.get('dataset') or {})}
  return kwargs, encoder, facts


def _with_position_table(encoder: dict, kwargs: dict, source: str) -> dict:
  """A trained position table (fine-tuned weights, timm's) is used: kwargs get pos_embed='learned'.

  The table is resized bicubically to the images' grid when it was trained at
  another one; a MAE encoder (no table) keeps its fixed sin-cos table.
  """
  # A MAE encoder's fixed table, kept by the import at the file's own grid: the fixed table at the images' grid,
  # as every export format of the same weights gives (and linear probing and kNN use).
  encoder = reference.without_fixed_table(encoder)
  table = encoder.get('pos_embed')
  if table is None:
    kwargs['pos_embed'] = 'sincos'
    return encoder
  kwargs['pos_embed'] = 'learned'
  size, patch = pos_tables.as_grid(kwargs['image_size']), kwargs['patch_size']
  target = (size[0] // patch, size[1] // patch)
  table = np.asarray(table, np.float32)
  try:
    grid = pos_tables.table_grid(table.shape[-2], (target,), what=f'the position table of {source}')
  except ValueError as e:
    raise FeaturesError(str(e)) from None
  if grid != target:
    logging.info('Position table of %s: interpolated bicubically from %dx%d to %dx%d', source, *grid, *target)
    encoder['pos_embed'] = pos_tables.resize_pos_embed(table, grid, target)
  return encoder


def make_features_fn(encoder_kwargs: dict, layers: tuple[int, ...] | None, pool: str, final_norm: bool = True):
  """fn(encoder params, images [B, H, W, C]) -> tuple of float32 features, one per output key."""
  if pool not in POOLS:
    raise FeaturesError(f'--pool={pool}: must be one of {", ".join(POOLS)}')
  encoder = vit.VisionTransformer(**encoder_kwargs, final_norm=final_norm)

  def pooled(tokens):  # [B, 1 + L, D] -> [B, D] or as is.
    if pool == 'cls':
      tokens = tokens[:, 0]
    elif pool == 'mean':
      tokens = tokens[:, 1:].astype(jnp.float32).mean(axis=1)
    return tokens.astype(jnp.float32)

  def features_fn(params, images):
    if layers is None:
      return (pooled(encoder.apply({'params': params}, images)[0]),)
    return tuple(pooled(t) for t in encoder.apply({'params': params}, images, return_layers=layers)[2])

  return features_fn


# ----------------------------------------------------------------------------
# Inputs: local batches {'image', 'index', 'label'} with index -1 on padding rows.
# ----------------------------------------------------------------------------


def dataset_config(run_dataset: dict, encoder_kwargs: dict, *, name: str, data_dir: str = '',
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> dict:
  """The config.dataset the eval transform reads: the run's, with the model's image shape and the stats."""
  channels = encoder_kwargs['in_channels']
  config = dict(run_dataset)
  config.update(name=name, data_dir=data_dir, image_size=encoder_kwargs['image_size'], channels=channels)
  if mean or std:
    if not (mean and std):
      raise FeaturesError('--mean and --std go together: give both (one value per channel)')
    config.update(mean=[float(m) for m in mean], std=[float(s) for s in std])
  elif not (run_dataset.get('mean') and len(run_dataset['mean']) == channels):
    if channels != len(IMAGENET_MEAN):
      raise FeaturesError(f'the weights name no normalisation for {channels}-channel images: '
                          f'pass --mean and --std (one value per channel, in [0, 1] pixel units)')
    config.update(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
  for key in ('mean', 'std'):
    if len(config[key]) != channels:
      raise FeaturesError(f'--{key}={config[key]}: needs one value per channel ({channels})')
  return config


def _padded(batches: Iterator[dict], local: int, num_batches: int, image_shape) -> Iterator[dict]:
  """Pads each batch to `local` rows (index -1) and appends empty batches up to num_batches."""
  yielded = 0
  for batch in batches:
    real = len(batch['index'])
    if real < local:
      batch = {'image': np.concatenate([batch['image'], np.zeros((local - real, *image_shape), np.float32)]),
               'index': np.concatenate([batch['index'], np.full((local - real,), -1, np.int64)]),
               'label': np.concatenate([batch['label'], np.full((local - real,), -1, np.int64)])}
    yield batch
    yielded += 1
  for _ in range(yielded, num_batches):
    yield {'image': np.zeros((local, *image_shape), np.float32), 'index': np.full((local,), -1, np.int64),
           'label': np.full((local,), -1, np.int64)}


def list_folder(folder: str) -> list[str]:
  """The image files under `folder` ('/'-separated relative paths, sorted), as `data.prepare` finds them."""
  if not fileio.isdir(folder):
    raise FeaturesError(f'--images={folder}: not a folder')
  names = prepare.list_images(folder)
  if not names:
    raise FeaturesError(f'--images={folder}: no image files ({", ".join(prepare.IMAGE_EXTENSIONS)}) in the folder '
                        'or its sub-folders')
  return names


def folder_batches(folder: str, names: Sequence[str], config: dict, batch_size: int, *,
                   num_workers: int = 8, skipped: list | None = None) -> tuple[Iterator[dict], int]:
  """(this process's padded local batches of the files `names`, their number); undecodable files are
  skipped and appended to `skipped` as (name, error)."""
  count, index = jax.process_count(), jax.process_index()
  local = batch_size // count
  mine = np.array_split(np.arange(len(names)), count)[index]
  num_batches = math.ceil(max(len(part) for part in np.array_split(np.arange(len(names)), count)) / local)
  skipped = [] if skipped is None else skipped
  read = prepare.make_converter(folder, config['channels'])  # As prepare stores a folder's files.

  def convert(i):
    return (i, *read(names[i]))  # One bad file is skipped, reported by name.

  def encoded():
    for i, data, error in dataset_writer.ordered_map(convert, mine, max(1, num_workers)):
      if error is None:
        yield int(i), data
      else:
        skipped.append((names[i], error))

  eval_fn = preprocess.make_eval_preprocess_fn(config)
  ds = tf.data.Dataset.from_generator(encoded, output_signature=(tf.TensorSpec([], tf.int64),
                                                                 tf.TensorSpec([], tf.string)))
  ds = ds.map(lambda i, data: {'image': eval_fn(data), 'index': i, 'label': tf.constant(-1, tf.int64)},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local).prefetch(2)
  image_shape = tuple(ds.element_spec['image'].shape[1:])
  return _padded(ds.as_numpy_iterator(), local, num_batches, image_shape), num_batches


def dataset_batches(config: dict, split: str, batch_size: int) -> tuple[Iterator[dict], int, int, bool]:
  """(this process's padded local batches of `split`, their number, the split's size, has labels)."""
  try:
    builder = sources.get_builder(config)
  except sources.DatasetNotFoundError as e:
    raise FeaturesError(f'--dataset={config["name"]} (--data_dir={config["data_dir"] or "default"}): {e}') from None
  count, index = jax.process_count(), jax.process_index()
  local = batch_size // count
  sizes = [sources.split_num_examples(builder, sources.process_split(split, i, count), '--split')
           for i in range(count)]
  offset = sum(sizes[:index])
  num_batches = math.ceil(max(sizes) / local)
  labeled = sources.has_labels(builder)
  batches = input_pipeline.create_eval_iterator(config, split=split, batch_size=batch_size,
                                                process_index=index, process_count=count)

  def with_index():
    for b, batch in enumerate(batches):
      position = offset + b * local + np.arange(local)
      yield {'image': batch['image'], 'index': np.where(batch['mask'], position, -1),
             'label': np.asarray(batch['label'], np.int64)}

  return with_index(), num_batches, sum(sizes), labeled


# ----------------------------------------------------------------------------
# Extraction on the mesh.
# ----------------------------------------------------------------------------


def _to_host(x) -> np.ndarray:
  """A global array as numpy on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def extract(features_fn, params, batches: Iterator[dict], *, num_batches: int, total: int,
            mesh: jax.sharding.Mesh, progress: bool = True) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
  """Runs features_fn over the batches, data-parallel on `mesh`.

  Returns (one array per output, rows in index order; the indices; the labels).
  """
  replicated, by_batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  params = jax.tree.map(lambda x: parallel.host_to_global(x, replicated), params)
  run = jax.jit(features_fn, in_shardings=(replicated, by_batch), out_shardings=by_batch)
  outputs, indices, labels = [], [], []
  bar = None
  if progress and jax.process_index() == 0:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=total, desc='features', unit='img', file=sys.stderr, dynamic_ncols=True,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0)
  start = time.time()
  with train_state.mesh_context(mesh):
    for b, local in enumerate(batches):
      batch = parallel.global_batch_from_local({'image': local['image'], 'index': local['index'],
                                                'label': local['label']}, mesh)
      out = run(params, batch['image'])
      index = _to_host(batch['index'])
      keep = index >= 0
      outputs.append([_to_host(o)[keep] for o in out])
      indices.append(index[keep])
      labels.append(_to_host(batch['label'])[keep])
      if bar is not None:
        bar.update(int(keep.sum()))
      if b == 0:
        logging.info('First batch done in %.1f s (compile included)', time.time() - start)
  if bar is not None:
    bar.close()
  if not outputs:
    raise FeaturesError('no batches to run: the input is empty')
  index = np.concatenate(indices)
  order = np.argsort(index, kind='stable')
  arrays = [np.concatenate([o[k] for o in outputs])[order] for k in range(len(outputs[0]))]
  return arrays, index[order], np.concatenate(labels)[order]


# ----------------------------------------------------------------------------
# The whole job.
# ----------------------------------------------------------------------------


def _run_dataset(run_dataset: dict, dataset: str | None, data_dir: str, workdir: str | None) -> tuple[str, str]:
  """(--dataset, --data_dir), defaulting to the --workdir run's data set and, for that data set, its data_dir."""
  name = run_dataset.get('name')
  if not dataset:
    if not name or name == 'synthetic':
      raise FeaturesError(f'the run at {workdir} trained on {name or "no named"} data: give --images or --dataset')
    dataset = name
    logging.info('--dataset: the run\'s, %s', name)
  if not data_dir and dataset == name and run_dataset.get('data_dir'):
    data_dir = run_dataset['data_dir']
    logging.info('--data_dir: the run\'s, %s', data_dir)
  return dataset, data_dir


def write_embeddings(out: str, *, weights: str | None = None, workdir: str | None = None, step: int | None = None,
                     images: str | None = None, dataset: str | None = None, data_dir: str = '',
                     split: str = 'train', layers=None, pool: str = 'cls', batch_size: int = 64,
                     model_name: str | None = None, mean=None, std=None, dtype: str = 'float32',
                     overwrite: bool = False, num_workers: int = 8, progress: bool = True,
                     overrides=()) -> str:
  """Extracts features of a folder (`images`) or a data set split and writes them to `out`; returns out.

  Every process calls it (multi-host jobs); process 0 writes the file.
  """
  if bool(weights) == bool(workdir):
    raise FeaturesError('give exactly one of --weights (an export, .pth, safetensors or Hugging Face folder) '
                        'and --workdir (a training run)')
  if (images and dataset) or not (images or dataset or workdir):
    raise FeaturesError('give exactly one of --images (a folder of image files) and --dataset (a prepared '
                        'data set name or version folder; with --workdir, default the run\'s)')
  if pool not in POOLS:
    raise FeaturesError(f'--pool={pool}: must be one of {", ".join(POOLS)}')
  if batch_size < 1:
    raise FeaturesError(f'--batch_size={batch_size}: must be >= 1')
  layers = parse_layers(layers)
  check_out(out, overwrite)
  names = list_folder(images) if images else None
  try:
    model_overrides = files.parse_overrides(overrides)
  except ValueError as e:
    raise FeaturesError(str(e)) from None
  if model_overrides and workdir:
    raise FeaturesError("--override goes with --weights: a --workdir run's model is in its config")
  encoder_kwargs, params, facts = load_encoder(weights=weights, workdir=workdir, step=step, model_name=model_name,
                                               dtype=dtype, model_overrides=model_overrides)
  if not images:
    dataset, data_dir = _run_dataset(facts['dataset'], dataset, data_dir, workdir)
  layers = check_layers(layers, encoder_kwargs['depth'], facts['model_name'])
  final_norm = 'norm' in params
  if layers is None and not final_norm:
    raise FeaturesError(f'{facts["source"]}: the encoder has no final norm (a classifier fine-tuned with global '
                        'pooling): pass --layers (e.g. --layers=-1 for the last block)')
  config = dataset_config(facts['dataset'], encoder_kwargs, name=dataset or 'folder', data_dir=data_dir,
                          mean=mean, std=std)
  mesh = parallel.data_parallel_mesh()
  batch_size = parallel.eval_batch_size(batch_size, mesh)
  skipped = []
  if images:
    batches, num_batches = folder_batches(images, names, config, batch_size, num_workers=num_workers,
                                          skipped=skipped)
    total = len(names)
    labeled = None  # Known once the readable images are (unreadable files neither give nor take labels).
  else:
    batches, num_batches, total, labeled = dataset_batches(config, split, batch_size)
  logging.info('Features of %d images (%s) from %s (%s): layers %s, pool %s, global batch %d on %d devices',
               total, images or f'{dataset} {split}', facts['source'], facts['model_name'],
               'final norm' if layers is None else list(layers), pool, batch_size, mesh.size)
  fn = make_features_fn(encoder_kwargs, layers, pool, final_norm=final_norm)
  arrays, index, labels = extract(fn, params, batches, num_batches=num_batches, total=total, mesh=mesh,
                                  progress=progress)
  if skipped:
    logging.warning('Skipped %d unreadable files (listed in the output\'s metadata): %s', len(skipped),
                    '; '.join(f'{name} ({why})' for name, why in skipped[:5]) + ('; ...' if len(skipped) > 5 else ''))
  if not len(index):
    raise FeaturesError(f'none of the {total} images could be read: e.g. {skipped[:5]}')
  listed = names
  names = [names[i] for i in index] if images else [f'{split}/{i}' for i in index]
  if images:  # As prepare labels the folder: every file listed but an unreadable one next to the class folders.
    unreadable_at_top = {name for name, _ in skipped if '/' not in name}
    class_names, label_of = folder_labels([name for name in listed if name not in unreadable_at_top], images)
    labeled = label_of is not None
    if labeled:
      labels = np.asarray([label_of(name) for name in names], np.int64)
  metadata = {'model_name': facts['model_name'], 'model_overrides': facts['model_overrides'],
              'source': facts['source'], 'input': images or f'{dataset}:{split}', 'pool': pool,
              'layers': None if layers is None else list(layers), 'image_size': encoder_kwargs['image_size'],
              'mean': config['mean'], 'std': config['std'], 'dtype': dtype, 'num_images': len(names),
              'num_skipped': len(skipped), 'skipped': [n for n, _ in skipped[:MAX_LISTED_SKIPPED]]}
  if images and labeled:
    metadata['class_names'] = list(class_names)
  keys = output_keys(layers)
  if jax.process_index() == 0:
    write_features(out, dict(zip(keys, arrays)), names, metadata, labels if labeled else None)
    logging.info('Wrote %s: %s', out, {k: list(a.shape) for k, a in zip(keys, arrays)})
  return out


FLAGS = flags.FLAGS


def folder_labels(names: Sequence[str], folder: str):
  """(class names, fn(name) -> label, or None) of a folder's image files, as prepare labels a folder.

  Labels come from class sub-folders; an image that lies directly in the folder
  next to sub-folders leaves every image unlabelled, which a warning says.
  """
  try:
    _, class_names, label_of = dataset_writer.split_layout(names, 'auto', folder)
  except dataset_writer.PrepareError as e:
    logging.warning('No labels written: %s', e)
    return [], None
  at_root = [name for name in names if '/' not in name]
  if label_of is None and len(at_root) < len(names):
    logging.warning('No labels written: %d of the images lie directly in %s (e.g. %s), not in a class sub-folder',
                    len(at_root), folder, at_root[0])
  return class_names, label_of


def _define_flags():
  flags.DEFINE_string('weights', None, 'An export, reference .pth, safetensors file or Hugging Face folder.')
  flags.DEFINE_string('workdir', None, 'Instead of --weights: a training run whose checkpoint to read.')
  flags.DEFINE_integer('step', None, 'With --workdir: the checkpoint step (default: the newest).')
  flags.DEFINE_string('model', None, "The model name, overriding the weights' metadata (mae_jax.models.MODELS).")
  flags.DEFINE_multi_string('override', [], 'With --weights: a model field KEY=VALUE (repeatable), e.g. '
                            'image_size=448, in_channels=4; default: the metadata\'s, else what the file shows.')
  flags.DEFINE_string('images', None, 'A folder of image files (any tree).')
  flags.DEFINE_string('dataset', None, "Instead of --images: a prepared data set (name, or version folder); "
                      "with --workdir, default the run's.")
  flags.DEFINE_string('data_dir', '', "With --dataset: its TFDS data_dir (default: the run's, for the run's "
                      'data set).')
  flags.DEFINE_string('split', 'train', "With --dataset: a TFDS split string, e.g. 'test' or 'train[:10%]'.")
  flags.DEFINE_list('layers', [], 'Block outputs to take, e.g. 3,5,7,11 (default: the final normed output).')
  flags.DEFINE_enum('pool', 'cls', list(POOLS), 'cls token, mean of the patch tokens, or none (all tokens).')
  flags.DEFINE_string('out', None, 'Output file: .safetensors, .npz or .npy (local or gs://).')
  flags.DEFINE_integer('batch_size', 64, 'Global batch size (rounded to a multiple of the devices).')
  flags.DEFINE_list('mean', [], "Per-channel mean in [0, 1] units (default: the run's, else ImageNet's).")
  flags.DEFINE_list('std', [], "Per-channel std in [0, 1] units (default: the run's, else ImageNet's).")
  flags.DEFINE_enum('dtype', 'float32', list(COMPUTE_DTYPES), 'Compute dtype; outputs are float32.')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')
  flags.DEFINE_integer('num_workers', 8, 'Threads decoding image files.')
  flags.DEFINE_bool('progress', True, 'Show a progress bar (process 0).')


def main(argv):
  del argv
  console.setup('features', FLAGS.workdir, reads_only=True)  # Library INFO lines to a log file (--verbose: here).
  console.start_backends()  # A stray libtpu's probe errors to the log file.
  tf.config.set_visible_devices([], 'GPU')  # TensorFlow only reads images; the accelerators are JAX's.
  try:
    out = write_embeddings(
        FLAGS.out, weights=FLAGS.weights, workdir=FLAGS.workdir, step=FLAGS.step, images=FLAGS.images,
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, split=FLAGS.split, layers=FLAGS.layers, pool=FLAGS.pool,
        batch_size=FLAGS.batch_size, model_name=FLAGS.model, mean=FLAGS.mean, std=FLAGS.std, dtype=FLAGS.dtype,
        overwrite=FLAGS.overwrite, num_workers=FLAGS.num_workers, progress=FLAGS.progress, overrides=FLAGS.override)
  except FeaturesError as e:  # A flag to fix: one line (and the usage status), not the whole --help.
    console.exit_on_error(e, 'mae_jax.features', code=2)
  except (ValueError, FileNotFoundError, fileio.StorageError, checkpoint.CheckpointReadError) as e:
    # E.g. --workdir without checkpoints, a bucket out of reach: one line, traceback in the log.
    console.exit_on_error(e, 'mae_jax.features')
  if jax.process_index() == 0:
    print(f'Features written to {out}')


def run():
  _define_flags()
  console.define_flags()  # --verbose (this entry point's --progress is its own bar's switch).
  flags.adopt_module_key_flags(console)  # Listed by --help.
  app.run(main)


if __name__ == '__main__':
  run()
