"""Optimizers, learning-rate schedules, weight-decay masks and layer-wise decay.

Everything here is a pure function of its arguments; the trainer builds the
optimizer once with `create_optimizer` and logs `lr_fn(step)`.

Parameter trees are Flax `params` pytrees (nested dicts). Rules that depend on
where a tensor lives read its path, '/'-joined for messages, e.g.
`encoder/blocks_3/attn/query/kernel`. With `nn.scan` over the blocks, a block
parameter lives under a component named `blocks` (or `decoder_blocks`) and
carries a leading layer axis; see `SCANNED_BLOCK_NAMES`.

Reference choices (facebookresearch/mae) and where this file follows them:

* Schedule: per-step linear warmup from 0, then half-cycle cosine to `min_lr`.
* Weight decay: none on biases, normalisation scales (1-D in the reference) and
  the names in `NO_DECAY_NAMES`, the fine-tuning list of the reference. Its
  pretraining script passes no such list, so there `cls_token` and
  `mask_token` (3-D) are decayed; set `optim.no_decay_names = ()` to match that
  exactly. The fixed position tables are not parameters here at all.
* Layer-wise decay: id 0 for patch embed / cls / pos, i + 1 for block i,
  depth + 1 for everything else; scale = decay ** (depth + 1 - id). The scale
  multiplies the whole step, weight decay included, as a per-group lr does.
* LARS: momentum accumulates the raw (decayed, trust-scaled) gradient and the
  learning rate multiplies the buffer, as the reference's torch LARS. (optax.lars
  scales by the learning rate before the momentum trace, which differs whenever
  the learning rate changes, i.e. during warmup and cosine decay.)
"""

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Leaf names that are never decayed (biases, LayerNorm / BatchNorm scales).
NO_DECAY_LEAVES = ('bias', 'scale')
# Parameter names excluded from decay whatever their rank (timm's ViT
# `no_weight_decay()` list, used by the reference fine-tuning).
NO_DECAY_NAMES = ('pos_embed', 'cls_token', 'dist_token', 'decoder_pos_embed')
# Path components that hold block parameters stacked by `nn.scan` over layers.
SCANNED_BLOCK_NAMES = ('blocks', 'decoder_blocks')
# Names that get layer id 0 in layer-wise decay (besides anything under
# `patch_embed`).
LAYER_ZERO_NAMES = ('cls_token', 'pos_embed', 'dist_token')
OPTIMIZERS = ('adamw', 'lars', 'sgd')
# The config.optim keys each optimizer reads beyond the schedule, decay and clipping ones.
OPTIMIZER_KEYS = {'adamw': ('b1', 'b2', 'no_decay_names'), 'lars': ('momentum', 'trust_coefficient'),
                  'sgd': ('momentum', 'no_decay_names')}


def check_name(name) -> str:
  """optim.name, lower-cased; ValueError naming the setting when it is none of OPTIMIZERS."""
  if str(name).lower() not in OPTIMIZERS:
    raise ValueError(f'optim.name={name!r}: must be one of {OPTIMIZERS}')
  return str(name).lower()


_BLOCK_RE = re.compile(r'^blocks_(\d+)$')

Params = Any
Path = str | Sequence[str]


def scaled_lr(base_lr: float, global_batch: int) -> float:
  """Returns the linear-scaling learning rate base_lr * global_batch / 256."""
  return base_lr * global_batch / 256


def warmup_steps_from_config(optim_config, steps_per_epoch: int) -> int:
  """Warmup length in optimizer steps: warmup_steps if > 0, else from epochs."""
  warmup_steps = int(optim_config['warmup_steps'])
  if warmup_steps > 0:
    return warmup_steps
  return round(float(optim_config['warmup_epochs']) * steps_per_epoch)


def create_learning_rate_fn(optim_config, *, global_batch: int, steps_per_epoch: int,
                            total_steps: int) -> optax.Schedule:
  """Returns the per-step schedule: linear warmup from 0, then half-cycle cosine.

  With peak = scaled_lr(base_lr, global_batch) and W warmup steps:
  step < W: peak * step / W; else
  min_lr + (peak - min_lr) * 0.5 * (1 + cos(pi * (step - W) / (total_steps - W))).
  Steps past total_steps stay at min_lr. Works on traced integer steps.

  Args:
    optim_config: reads base_lr, min_lr, warmup_steps, warmup_epochs.
    global_batch: effective batch per optimizer step (all devices, all
      accumulation micro-batches).
    steps_per_epoch: optimizer steps per epoch, for warmup_epochs.
    total_steps: optimizer steps of the whole run.
  """
  if total_steps <= 0:
    raise ValueError(f'total_steps={total_steps}: must be > 0')
  if steps_per_epoch <= 0:
    raise ValueError(f'steps_per_epoch={steps_per_epoch}: must be > 0')
  peak = scaled_lr(float(optim_config['base_lr']), global_batch)
  min_lr = float(optim_config['min_lr'])
  warmup = warmup_steps_from_config(optim_config, steps_per_epoch)
  if warmup > total_steps:
    raise ValueError(f'optim warmup of {warmup} steps (warmup_steps / warmup_epochs) '
                     f'exceeds total_steps={total_steps}: must be <= total_steps')
  decay_steps = max(total_steps - warmup, 1)

  def lr_fn(step):
    step = jnp.asarray(step, jnp.float32)
    warmup_lr = peak * step / max(warmup, 1)
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    cosine_lr = min_lr + (peak - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(step < warmup, warmup_lr, cosine_lr)

  return lr_fn


def _key_name(entry) -> str | None:
  """The name of one jax key-path entry; None for a flax box's `value` field."""
  if isinstance(entry, jax.tree_util.DictKey):
    return str(entry.key)
  if isinstance(entry, jax.tree_util.GetAttrKey):
    # nn.Partitioned and friends store the array in `.value`.
    return None if entry.name == 'value' else entry.name
  if isinstance(entry, jax.tree_util.SequenceKey):
    return str(entry.idx)
  if isinstance(entry, jax.tree_util.FlattenedIndexKey):
    return str(entry.key)
  return str(entry)


def path_names(key_path) -> tuple[str, ...]:
  """Turns a jax key path into a tuple of component names."""
  return tuple(n for n in map(_key_name, key_path) if n is not None)


def _as_names(path: Path) -> tuple[str, ...]:
  return tuple(path.split('/')) if isinstance(path, str) else tuple(path)


def is_scanned(path: Path, scanned_names: Sequence[str] = SCANNED_BLOCK_NAMES) -> bool:
  """Whether a parameter has a leading layer axis from nn.scan over blocks."""
  return any(name in scanned_names for name in _as_names(path))


def decays(path: Path, ndim: int, *, no_decay_names: Sequence[str] = NO_DECAY_NAMES,
           scanned_names: Sequence[str] = SCANNED_BLOCK_NAMES) -> bool:
  """Whether the tensor at `path` (of rank `ndim`) gets weight decay.

  Decided by the leaf name first, because nn.scan adds a layer axis that makes a
  LayerNorm scale 2-D: 'bias' and 'scale' never decay, names in no_decay_names
  never decay, 'kernel' always does. Any other leaf decays when its rank without
  the scan axis is > 1 (the reference's "no decay on 1-D tensors").
  """
  names = _as_names(path)
  leaf = names[-1]
  if leaf in NO_DECAY_LEAVES or leaf in no_decay_names:
    return False
  if leaf == 'kernel':
    return True
  per_layer_ndim = ndim - 1 if is_scanned(names, scanned_names) else ndim
  return per_layer_ndim > 1


def weight_decay_mask(params: Params, *, no_decay_names: Sequence[str] = NO_DECAY_NAMES,
                      scanned_names: Sequence[str] = SCANNED_BLOCK_NAMES) -> Params:
  """Returns a pytree of bools like `params`: True where weight decay applies.

  Only shapes are read, so `params` may hold jax.ShapeDtypeStruct leaves. See
  `decays` for the rule.
  """
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: decays(path_names(kp), len(x.shape), no_decay_names=no_decay_names,
                           scanned_names=scanned_names), params)


def layer_id(path: Path, depth: int) -> int | np.ndarray:
  """Layer id of a parameter for layer-wise lr decay (reference rule).

  0 for the patch embedding, cls token and learned position embedding; i + 1 for
  encoder block i (`.../blocks_{i}/...`); depth + 1 for everything else (final
  norm, fc_norm, head, and any decoder parameter). For a scanned encoder
  (`.../blocks/...` with a leading layer axis) returns the ids [1, ..., depth].

  Args:
    path: '/'-joined path or tuple of path components.
    depth: number of encoder blocks.
  """
  names = _as_names(path)
  if any(n == 'decoder' or n.startswith('decoder_') for n in names):
    return depth + 1
  if any(n in LAYER_ZERO_NAMES or n.startswith('patch_embed') for n in names):
    return 0
  for n in names:
    match = _BLOCK_RE.match(n)
    if match:
      block = int(match.group(1))
      if block >= depth:
        raise ValueError(f'parameter {"/".join(names)} is in block {block}, but depth={depth}: '
                         f'block indices must be in [0, {depth})')
      return block + 1
    if n == 'blocks':
      return np.arange(1, depth + 1)
  return depth + 1


def layerwise_lr_scales(params: Params, depth: int, decay: float) -> Params:
  """Returns a pytree like `params` of lr scales decay ** (depth + 1 - layer_id).

  Leaves are float32 scalars, or [depth] float32 vectors for parameters of a
  scanned encoder (one scale per layer, along the leading axis). Only shapes are
  read, so `params` may hold jax.ShapeDtypeStruct leaves.
  """
  if depth <= 0:
    raise ValueError(f'depth={depth}: must be > 0 for layer-wise lr decay')

  def scale(key_path, x):
    names = path_names(key_path)
    ids = layer_id(names, depth)
    if isinstance(ids, np.ndarray) and (not x.shape or x.shape[0] != depth):
      raise ValueError(f'scanned parameter {"/".join(names)} has shape {tuple(x.shape)}: '
                       f'expected a leading layer axis of size depth={depth}')
    return (float(decay)**(depth + 1 - np.asarray(ids, np.float64))).astype(np.float32)

  return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_layerwise_lr(
    scales: Params | Callable[[Params], Params]) -> optax.GradientTransformation:
  """Multiplies each update by its layer-wise lr scale.

  Args:
    scales: a pytree like the params with scalar leaves or [L] leaves (applied
      along the leading axis), or a function from the updates pytree to one,
      e.g. functools.partial(layerwise_lr_scales, depth=12, decay=0.65).
  """

  def update_fn(updates, state, params=None):
    del params
    tree = scales(updates) if callable(scales) else scales

    def apply(update, s):
      s = jnp.asarray(s, update.dtype)
      if s.ndim == 1:
        s = s.reshape(s.shape + (1,) * (update.ndim - 1))
      return update * s

    return jax.tree.map(apply, updates, tree), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_lars_trust_ratio(
    trust_coefficient: float = 0.001,
    mask: Params | Callable[[Params], Params] | None = None,
    scanned_names: Sequence[str] = SCANNED_BLOCK_NAMES) -> optax.GradientTransformation:
  """Scales updates by trust_coefficient * ||param|| / ||update||, per tensor.

  The ratio is 1 where either norm is 0. Tensors stacked by nn.scan get one
  ratio per layer (norms over all but the leading axis), as their unstacked
  counterparts would. Leaves where `mask` is False pass through unchanged.
  """

  def update_fn(updates, state, params):
    if params is None:
      raise ValueError('scale_by_lars_trust_ratio needs params: pass them to update()')
    tree_mask = mask(updates) if callable(mask) else mask
    if tree_mask is None:
      tree_mask = jax.tree.map(lambda _: True, updates)

    def apply(key_path, update, param, adapt):
      if not adapt:
        return update
      # One norm per tensor, or per layer for a tensor stacked by nn.scan.
      axes = None
      if is_scanned(path_names(key_path), scanned_names) and update.ndim > 1:
        axes = tuple(range(1, update.ndim))

      def norm(x):
        return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes,
                                keepdims=axes is not None))

      param_norm, update_norm = norm(param), norm(update)
      both_positive = (param_norm > 0) & (update_norm > 0)
      safe_update_norm = jnp.where(update_norm > 0, update_norm, 1.0)
      ratio = jnp.where(both_positive, trust_coefficient * param_norm / safe_update_norm, 1.0)
      return (update * ratio).astype(update.dtype)

    return jax.tree_util.tree_map_with_path(apply, updates, params, tree_mask), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def lars_mask(params: Params, scanned_names: Sequence[str] = SCANNED_BLOCK_NAMES) -> Params:
  """LARS adaptation and decay mask: all tensors except biases, scales and 1-D ones."""
  return weight_decay_mask(params, no_decay_names=(), scanned_names=scanned_names)


def lars(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9,
         trust_coefficient: float = 0.001, weight_decay: float = 0.0,
         mask: Params | Callable[[Params], Params] | None = lars_mask,
         lr_scales=None) -> optax.GradientTransformation:
  """LARS as in the MAE reference (MoCo v3's), for linear probing.

  For masked-in tensors (by default every tensor of per-layer rank > 1 except
  biases and scales): d = g + weight_decay * p, then d *= trust ratio; other
  tensors use d = g. Then mu = momentum * mu + d and p -= lr * mu.

  Args:
    learning_rate: scalar or schedule of the optimizer step.
    momentum: momentum of the buffer mu.
    trust_coefficient: LARS trust coefficient.
    weight_decay: coupled (L2) weight decay on masked-in tensors.
    mask: pytree of bools or a function of the params returning one.
    lr_scales: optional layer-wise scales for `scale_by_layerwise_lr`.
  """
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask),
      scale_by_lars_trust_ratio(trust_coefficient, mask),
      optax.trace(decay=momentum),
      scale_by_layerwise_lr(lr_scales) if lr_scales is not None else optax.identity(),
      optax.scale_by_learning_rate(learning_rate),
  )


def _layer_decay(optim_config) -> float | None:
  """Returns layer_decay if it enables layer-wise decay, else None."""
  layer_decay = float(optim_config['layer_decay'])
  if layer_decay < 0 or layer_decay > 1:
    raise ValueError(f'optim.layer_decay={layer_decay}: must be in (0, 1) to enable '
                     'layer-wise lr decay, or 0 / 1 to disable it')
  return layer_decay if 0 < layer_decay < 1 else None


def create_optimizer(optim_config, *, global_batch: int, steps_per_epoch: int, total_steps: int,
                     params: Params | None = None,
                     depth: int | None = None
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer named by optim_config.name and its lr schedule.

  Args:
    optim_config: `config.optim` (every key declared in configs/default.py).
      Reads name, base_lr, min_lr, warmup_steps, warmup_epochs, weight_decay,
      grad_clip_norm, layer_decay (in (0, 1) enables layer-wise decay, needs
      depth); adamw: b1, b2 (eps 1e-8), no_decay_names; lars: momentum,
      trust_coefficient; sgd: momentum, no_decay_names.
    global_batch: effective batch per optimizer step.
    steps_per_epoch: optimizer steps per epoch.
    total_steps: optimizer steps of the run.
    params: optional params (or ShapeDtypeStructs) to check the layer-wise
      decay paths and shapes now rather than at the first step.
    depth: encoder depth, required with layer-wise decay.

  Returns:
    (optimizer, lr_fn): lr_fn(step) is the base learning rate at an optimizer
    step, before any layer-wise scale, for logging. The optimizer keeps its own
    step count, starting at 0 like the reference's first iteration.
  """
  name = check_name(optim_config['name'])
  missing = [key for key in OPTIMIZER_KEYS[name] if key not in optim_config]
  if missing:
    raise ValueError(f'optim.name={name!r} reads {", ".join("optim." + k for k in missing)}, which this config '
                     f'does not declare: add them to the config file (configs/default.py has every one)')
  lr_fn = create_learning_rate_fn(optim_config, global_batch=global_batch,
                                  steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  weight_decay = float(optim_config['weight_decay'])
  grad_clip_norm = float(optim_config['grad_clip_norm'])

  lr_scales = None
  layer_decay = _layer_decay(optim_config)
  if layer_decay is not None:
    if depth is None:
      raise ValueError(f'optim.layer_decay={layer_decay} needs the encoder depth: '
                       'pass depth= to create_optimizer')
    lr_scales = functools.partial(layerwise_lr_scales, depth=depth, decay=layer_decay)
    if params is not None:
      lr_scales(params)  # Fails now on unexpected paths or shapes.

  clip = (optax.clip_by_global_norm(grad_clip_norm) if grad_clip_norm > 0 else optax.identity())
  layerwise = (scale_by_layerwise_lr(lr_scales) if lr_scales is not None else optax.identity())

  if name == 'lars':
    tx = lars(lr_fn, momentum=float(optim_config['momentum']),
              trust_coefficient=float(optim_config['trust_coefficient']),
              weight_decay=weight_decay, lr_scales=lr_scales)
    return optax.chain(clip, tx), lr_fn

  no_decay_names = tuple(optim_config['no_decay_names'])
  mask = functools.partial(weight_decay_mask, no_decay_names=no_decay_names)
  if name == 'adamw':
    # Decoupled decay: added after the Adam scaling, so it is multiplied by
    # the (layer-scaled) learning rate only, as torch.optim.AdamW.
    tx = optax.chain(
        clip,
        optax.scale_by_adam(b1=float(optim_config['b1']),
                            b2=float(optim_config['b2']), eps=1e-8),
        optax.add_decayed_weights(weight_decay, mask),
        layerwise,
        optax.scale_by_learning_rate(lr_fn),
    )
  else:  # sgd, with coupled (L2) decay as torch.optim.SGD.
    tx = optax.chain(
        clip,
        optax.add_decayed_weights(weight_decay, mask),
        optax.trace(decay=float(optim_config['momentum'])),
        layerwise,
        optax.scale_by_learning_rate(lr_fn),
    )
  return tx, lr_fn
