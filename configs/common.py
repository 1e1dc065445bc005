"""Helpers shared by the config files: argument strings, runlocal, overrides, sweeps.

A config file's `get_config(arg)` takes a big_vision-style string such as
`variant=L/16,epochs=800,runlocal=True`; `parse_arg` reads it against the
file's defaults. `apply_runlocal` shrinks any recipe to a few CPU steps on
synthetic data without touching the recipe's own values. `set_overrides` and
`check_keys` apply and check `key.sub=value` overrides, naming close matches
when a key does not exist. `grid` expands the product of value lists into the
named runs of a sweep (see configs/sweeps/).
"""

import ast
import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from mae_jax.config_tools import (  # noqa: F401
  REPO_ROOT,
  check_config_flags,
  check_keys,
  config_flag_overrides,
  config_keys,
  load_config,
  load_module,
  split_spec,
  unknown_key_message,
)
from mae_jax.data import IMAGENET_MEAN, IMAGENET_STD

# Model variant -> the MAE in mae_jax.models.MODELS and how it is laid out on a
# TPU pod slice. The same variant uses the same layout in pretraining,
# fine-tuning and linear probing, so checkpoints load without conversion.
# Checked with `python -m mae_jax.aot --topology=v4-128` (64 chips, batch 4096):
# B/16 data-parallel 7.0 GiB per chip; L/16 FSDP 8.1 GiB; H/14 FSDP with remat
# 'dots' 11.4 GiB of 30.75 (with scanned blocks 15.6 GiB; data-parallel 24.0 GiB).
# Unrolled blocks compile slower but need less memory than nn.scan's stacked
# per-layer buffers, and leave XLA's cost analysis a loop-free program.
VARIANTS = {
    'B/16': {'name': 'mae_vit_base_patch16', 'scan_layers': False, 'remat_policy': 'none',
             'mesh': {'data': -1, 'fsdp': 1}},
    'L/16': {'name': 'mae_vit_large_patch16', 'scan_layers': False, 'remat_policy': 'none',
             'mesh': {'data': 1, 'fsdp': -1}},
    'H/14': {'name': 'mae_vit_huge_patch14', 'scan_layers': False, 'remat_policy': 'dots',
             'mesh': {'data': 1, 'fsdp': -1}},
}


# What `runlocal=True` shrinks a recipe to.
RUNLOCAL_MODEL = 'mae_vit_test'  # 32x32x3, a few thousand parameters.
RUNLOCAL_IMAGE_SIZE = 32
RUNLOCAL_BATCH_SIZE = 16
RUNLOCAL_STEPS = 3
RUNLOCAL_NUM_CLASSES = 10
# Model fields a recipe may set from the reference table; runlocal puts back
# the tiny model's own values (a sweep or --config override still wins).
RUNLOCAL_MODEL_SIZE_FIELDS = ('patch_size', 'embed_dim', 'depth', 'num_heads', 'decoder_embed_dim',
                              'decoder_depth', 'decoder_num_heads', 'mlp_ratio')

_TRUE = ('true', 'yes', '1')
_FALSE = ('false', 'no', '0')
_RUN_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')


# ----------------------------------------------------------------------------
# Argument strings.

def _parse_bool(text: str, key: str) -> bool:
  if text.lower() in _TRUE:
    return True
  if text.lower() in _FALSE:
    return False
  raise ValueError(f'{key}={text!r}: expected a bool (True / False)')


def _infer(text: str) -> Any:
  """Reads an untyped value: a bool, int or float if it looks like one, else the string."""
  if text.lower() in ('true', 'false'):
    return text.lower() == 'true'
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def _convert(text: str, default: Any, key: str) -> Any:
  """Reads `text` as the type of `default` (a bool, int, float or str)."""
  if isinstance(default, bool):
    return _parse_bool(text, key)
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ValueError(f'{key}={text!r}: expected an integer') from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ValueError(f'{key}={text!r}: expected a number') from None
  if default is None:
    return _infer(text)
  return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'key=value,key2=value2' against `defaults` into a ConfigDict.

  Values take the type of their default (bools accept True/False/true/1/...);
  a bare `key` means key=True. A key that is not in `defaults` is an error
  naming the close matches, so a typo never passes silently.

  Example: parse_arg('variant=H/14,runlocal', variant='L/16', runlocal=False)
  gives variant='H/14', runlocal=True.
  """
  values, seen = dict(defaults), set()
  for item in (arg or '').split(','):
    item = item.strip()
    if not item:
      continue
    key, sep, text = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'config argument {item!r}: ' + unknown_key_message(key, defaults, 'argument'))
    if key in seen:
      raise ValueError(f'config argument {key!r} is given twice in {arg!r}')
    seen.add(key)
    values[key] = _convert(text.strip(), defaults[key], key) if sep else True
  return ml_collections.ConfigDict(values)


# ----------------------------------------------------------------------------
# Pieces of the recipes.

def variant_settings(variant: str) -> dict:
  """The VARIANTS entry of 'B/16', 'L/16' or 'H/14' (error with close matches otherwise)."""
  if variant not in VARIANTS:
    raise ValueError(f'variant={variant!r}: ' + unknown_key_message(variant, VARIANTS, 'variant'))
  return VARIANTS[variant]


def set_variant(config: ml_collections.ConfigDict, variant: str) -> None:
  """Sets model.name, its pod-slice layout (scan, remat) and the mesh for a variant."""
  settings = variant_settings(variant)
  config.model.name = settings['name']
  config.model.scan_layers = settings['scan_layers']
  config.model.remat_policy = settings['remat_policy']
  config.model.dtype = 'bfloat16'
  config.mesh.update(settings['mesh'])


def set_imagenet_data(config: ml_collections.ConfigDict, crop_scale=(0.2, 1.0)) -> None:
  """ImageNet-1k at 224: RandomResizedCrop(crop_scale, 3/4..4/3) + flip, ImageNet mean/std.

  The input pipeline always resizes bicubic (antialiased), as the reference.
  """
  dataset = config.dataset
  dataset.name = 'imagenet2012'
  dataset.train_split = 'train'
  dataset.eval_split = 'validation'
  dataset.image_size = 224
  dataset.channels = 3
  dataset.mean = IMAGENET_MEAN
  dataset.std = IMAGENET_STD
  dataset.crop_scale = tuple(crop_scale)
  dataset.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  dataset.eval_resize = 256  # Eval: shorter side to 256, then the center 224 crop.


DOWNSTREAM_KINDS = ('finetune', 'linprobe')
# Keys of the pretraining config that mean nothing downstream.
PRETRAIN_ONLY_KEYS = ('mask_ratio', 'norm_pix_loss', 'visualize_every_steps', 'model.encoder_mask_tokens')


def downstream_base(kind: str, variant: str, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The keys shared by fine-tuning and linear probing, set to neutral values, on `config` (default.py's).

  configs/finetune.py and configs/linprobe.py fill in their recipes; the
  entry point (mae_jax.main) reads `downstream` to pick the trainer: mae_jax.finetune or mae_jax.linprobe.
  Returns `config`, changed in place.
  """
  if kind not in DOWNSTREAM_KINDS:
    raise ValueError(f'downstream={kind!r}: must be one of {DOWNSTREAM_KINDS}')
  config.unlock()  # default.py locks its keys; the recipe adds its own, then locks them again.
  for key in PRETRAIN_ONLY_KEYS:
    node, name = _parent_and_name(config, key)
    del node[name]
  set_variant(config, variant)

  config.downstream = kind  # finetune: train the whole ViT; linprobe: a head on the frozen encoder.
  # Where the pretrained encoder comes from: a pretraining workdir (its
  # checkpoints/) or a file (mae_jax.export output, or the reference .pth).
  # Both empty: random init (runlocal and tests only).
  config.pretrained_workdir = ''
  config.pretrained_path = ''
  config.pretrained_step = -1  # With pretrained_workdir: this step; -1 = the newest.
  config.freeze_encoder = kind == 'linprobe'  # No gradients into the encoder.
  # downstream='knn' (a kNN evaluation as a job) uses DINO's protocol: the whole train split is the feature
  # bank. The pretraining monitor's 10,000 images (default.py) is about 10 per class on ImageNet-1k.
  config.knn.train_examples = -1

  config.num_classes = 1000  # ImageNet-1k.
  config.drop_path_rate = 0.0  # Stochastic depth, linear in depth up to this rate.
  config.global_pool = False  # True: mean of patch tokens then LayerNorm (fc_norm); False: cls token.
  # Position table: 'learned' (timm's ViT, as the reference fine-tunes: a parameter initialised from the
  # checkpoint's table, bicubically interpolated to dataset.image_size) or 'sincos' (the fixed MAE table).
  config.pos_embed = 'sincos'
  config.head_init_std = 0.01  # Head kernel trunc-normal std; bias zero.
  config.head_batchnorm = False  # BatchNorm without affine (eps below) before the head.
  config.head_batchnorm_eps = 1e-6

  # Augmentation and regularisation; zero / 0 layers disables each.
  config.label_smoothing = 0.0
  config.mixup = 0.0  # Mixup alpha.
  config.cutmix = 0.0  # CutMix alpha.
  config.mixup_prob = 1.0  # Chance that a batch gets mixup or cutmix (when either is on).
  config.mixup_switch_prob = 0.5  # Chance of cutmix rather than mixup when both are on.
  config.mixup_mode = 'batch'  # One draw per batch, as the reference.
  config.randaug = ml_collections.ConfigDict()  # RandAugment, timm's rand-mM-mstdS-inc1.
  config.randaug.num_layers = 0  # Ops per image; 0 disables RandAugment.
  config.randaug.magnitude = 9
  config.randaug.magnitude_std = 0.5  # Per-op Gaussian noise on the magnitude.
  config.randaug.increasing = True  # timm's 'inc1' op variants.
  config.reprob = 0.0  # Random erasing probability.
  config.remode = 'pixel'  # Random erasing fill: per-pixel normal noise.
  config.recount = 1  # Random erasing boxes per image.

  # Top-1 on dataset.eval_split; <= 0 evaluates at the end of every epoch.
  config.eval_every_steps = -1
  config.eval_batch_size = 0  # Global eval batch; <= 0: batch_size // grad_accum_steps.
  # Linear probing: encode the train split once (eval transform) and train the head on those features.
  config.probe_cached_features = False
  set_imagenet_data(config, crop_scale=(0.08, 1.0))
  return config


def apply_runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a recipe to a few steps of a tiny model on synthetic data (CPU, seconds).

  Everything that sets the size of the job changes: model (mae_vit_test and its
  own widths and depths), data (synthetic 32x32x3), batch, steps, warmup,
  logging and the mesh (all devices data-parallel, float32). What a recipe
  means stays: optimizer kind, betas, decay, mask ratio, norm_pix_loss and the
  augmentation settings are kept, so a runlocal run exercises the recipe's
  code paths. Returns `config`, changed in place.
  """
  from mae_jax.models import mae as mae_models  # pylint: disable=g-import-not-at-top

  tiny = {**mae_models.MODEL_DEFAULTS, **mae_models.MODELS[RUNLOCAL_MODEL]}
  config.model.name = RUNLOCAL_MODEL
  config.model.dtype = 'float32'
  config.model.attention_impl = 'xla'
  for field in RUNLOCAL_MODEL_SIZE_FIELDS:
    if field in config.model:
      config.model[field] = tiny[field]

  # The synthetic source draws images of this shape; the recipe's augmentation
  # settings stay for pipelines that read them.
  config.dataset.name = 'synthetic'
  config.dataset.image_size = RUNLOCAL_IMAGE_SIZE
  config.dataset.channels = 3
  config.dataset.mean = (0.0, 0.0, 0.0)  # the synthetic images are already centred
  config.dataset.std = (1.0, 1.0, 1.0)
  config.dataset.num_examples = 4 * RUNLOCAL_BATCH_SIZE
  if 'downstream' in config:  # Pretraining's kNN monitor takes the data set's classes (num_classes=0).
    config.num_classes = RUNLOCAL_NUM_CLASSES

  config.batch_size = RUNLOCAL_BATCH_SIZE
  config.grad_accum_steps = 1
  config.num_train_steps = RUNLOCAL_STEPS
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1000  # Only the final (or preemption) save.
  config.keep_checkpoints = 1
  config.optim.warmup_steps = 1
  config.eval_every_steps = -1
  config.profile_steps = 0
  if 'visualize_every_steps' in config:
    config.visualize_every_steps = -1

  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  config.mesh.dcn_data = 1
  return config


# ----------------------------------------------------------------------------
# Overrides and key checks.

def _parent_and_name(config: ml_collections.ConfigDict, key: str):
  *parents, name = key.split('.')
  node = config
  for part in parents:
    node = node[part]
  return node, name


def value_at(config: ml_collections.ConfigDict, key: str) -> Any:
  """The value of a dotted key ('optim.base_lr'); a KeyError when it is missing (see check_keys)."""
  node, name = _parent_and_name(config, key)
  return node[name]


def parse_override(text: str, current: Any) -> Any:
  """Reads a command-line value as the type of the value it replaces (as config_flags does)."""
  if isinstance(current, str):
    return text
  if isinstance(current, bool):
    return _parse_bool(text, 'value')
  if isinstance(current, (int, float)) and not isinstance(current, bool):
    return _convert(text, current, 'value')
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def set_overrides(config: ml_collections.ConfigDict,
                  overrides: Mapping[str, Any] | Sequence[str]) -> ml_collections.ConfigDict:
  """Applies {'a.b': value} or ['a.b=value', ...] to `config` in place and returns it.

  Every key is checked first (ValueError with close matches); string values
  from a 'key=value' list are read as the type of the value they replace.
  """
  if isinstance(overrides, Mapping):
    items = list(overrides.items())
    from_text = False
  else:
    items = []
    for item in overrides:
      key, sep, text = item.partition('=')
      if not sep:
        raise ValueError(f'override {item!r}: expected KEY=VALUE, e.g. optim.base_lr=1e-4')
      items.append((key.strip().removeprefix('config.'), text))
    from_text = True
  check_keys(config, [k for k, _ in items])
  for key, value in items:
    node, name = _parent_and_name(config, key)
    if from_text:
      try:
        value = parse_override(value, node[name])
      except ValueError as e:
        raise ValueError(f'{key}={value}: {e}') from None
    try:
      node[name] = value
    except TypeError as e:
      raise TypeError(f'{key}={value!r}: {e}') from None
  return config


def override_to_text(value: Any) -> str:
  """A Python override value as `--config.KEY=VALUE` text that config_flags reads back."""
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    value = tuple(value)
  return repr(value)


# ----------------------------------------------------------------------------
# Sweeps.

def _format_value(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, (tuple, list)):
    return 'x'.join(_format_value(v) for v in value)
  return re.sub(r'[^A-Za-z0-9.-]+', '-', str(value)).strip('-')


def grid(axes: Mapping[str, Sequence[Any]], short_names: Mapping[str, str] | None = None,
         prefix: str = '') -> list[dict]:
  """The product of value lists as named sweep runs.

  Example: grid({'mask_ratio': [0.5, 0.75], 'model.decoder_depth': [1, 8]},
  {'mask_ratio': 'mask', 'model.decoder_depth': 'dec'}) gives 4 runs named
  mask0.5_dec1, mask0.5_dec8, mask0.75_dec1 and mask0.75_dec8, each
  {'name': ..., 'overrides': {'mask_ratio': ..., 'model.decoder_depth': ...}}.
  A key without a short name is named by its last component.
  """
  short_names = dict(short_names or {})
  for key in axes:
    if not axes[key]:
      raise ValueError(f'sweep axis {key!r} has no values')
  runs = []
  for values in itertools.product(*axes.values()):
    overrides = dict(zip(axes, values))
    parts = [short_names.get(k, k.split('.')[-1]) + _format_value(v) for k, v in overrides.items()]
    runs.append({'name': prefix + '_'.join(parts), 'overrides': overrides})
  return runs


def check_sweep(sweep: Mapping[str, Any]) -> None:
  """Checks a get_sweep() result: a base spec and runs with unique, path-safe names."""
  unknown = sorted(set(sweep) - {'base', 'runs'})
  if unknown or 'base' not in sweep or 'runs' not in sweep:
    raise ValueError(f'a sweep is dict(base=\'configs/FILE.py[:ARGS]\', runs=[...]); got keys '
                     f'{sorted(sweep)}')
  if not isinstance(sweep['base'], str) or not sweep['base']:
    raise ValueError(f'sweep base={sweep["base"]!r}: expected \'configs/FILE.py[:ARGS]\'')
  if not sweep['runs']:
    raise ValueError('sweep has no runs')
  seen = set()
  for run in sweep['runs']:
    extra = sorted(set(run) - {'name', 'overrides'})
    if extra or 'name' not in run:
      raise ValueError(f'sweep run {run!r}: expected dict(name=..., overrides={{...}})')
    name = run['name']
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name):
      raise ValueError(f'sweep run name={name!r}: must match {_RUN_NAME.pattern} '
                       '(it names the run\'s workdir)')
    if name in seen:
      raise ValueError(f'sweep run name={name!r} appears twice')
    seen.add(name)
