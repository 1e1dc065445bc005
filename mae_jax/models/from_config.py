"""The one place a config becomes a model: the MAE, its encoder, a classifier.

Every reader goes through here: the pretraining and downstream trainers, aot,
visualize, export (from a run's saved config.json) and the weight loaders. A
config is a ConfigDict or the plain dict a run saved; `model.name` picks the
size from `mae.MODELS`, the other `model.*` keys override its fields, and the
data shape comes from `dataset.image_size` / `dataset.channels`.
"""

from collections.abc import Mapping
from typing import Any

from mae_jax.models import mae, pos_embed, vit

# config.model keys that are not MaskedAutoencoder fields.
NOT_MODEL_FIELDS = ('name',)


def _get(tree: Any, key: str, default: Any = None) -> Any:
  if isinstance(tree, Mapping) or hasattr(tree, 'get'):
    return tree.get(key, default)
  return default


def _mae_fields() -> set[str]:
  return {f for f in mae.MaskedAutoencoder.__dataclass_fields__ if f not in ('parent', 'name')}


def model_name(config) -> str:
  name = _get(_get(config, 'model', {}), 'name')
  if not name:
    raise ValueError('the config has no model.name: set --config.model.name (one of '
                     f'{sorted(mae.MODELS)})')
  return name


def model_overrides(config, strict: bool = True) -> dict:
  """MaskedAutoencoder fields the config sets: model.* (but name), the data shape, norm_pix_loss.

  strict=False (a config a run saved, perhaps by another version) skips model.*
  keys that are not model fields instead of refusing them.
  """
  fields = _mae_fields()
  model = _get(config, 'model', {}) or {}
  # None: a size the config leaves to the model name (model.embed_dim, ... are declared as None).
  overrides = {k: v for k, v in model.items() if k not in NOT_MODEL_FIELDS and k in fields and v is not None}
  unknown = sorted(k for k in model.keys() if k not in NOT_MODEL_FIELDS and k not in fields)
  if unknown and strict:
    raise ValueError(f'model.{unknown[0]}: not a model setting; allowed: {sorted(fields)}')
  dataset = _get(config, 'dataset', {}) or {}
  size = _get(dataset, 'image_size')
  if size:
    overrides['image_size'] = tuple(size) if isinstance(size, (list, tuple)) else size
  channels = _get(dataset, 'channels')
  if channels:
    overrides['in_channels'] = channels
  if _get(config, 'norm_pix_loss') is not None:
    overrides['norm_pix_loss'] = _get(config, 'norm_pix_loss')
  return overrides


def build_mae(config) -> mae.MaskedAutoencoder:
  """The MaskedAutoencoder a pretraining config describes (data shape, loss and perf knobs included)."""
  return mae.get_model(model_name(config), **model_overrides(config))


def encoder_overrides(config) -> dict:
  """The encoder's fields among model_overrides(config)."""
  return {k: v for k, v in model_overrides(config).items() if k in mae.ENCODER_FIELDS}


def encoder_kwargs(config) -> dict:
  """VisionTransformer fields of the config's encoder, drop path and position table included.

  Downstream configs declare `drop_path_rate` and `pos_embed` ('learned' for
  fine-tuning, 'sincos' for linear probing); a pretraining config has neither
  (no drop path, the fixed sin-cos table).
  """
  overrides = encoder_overrides(config)
  drop_path = _get(config, 'drop_path_rate')
  if drop_path is not None:
    overrides['drop_path_rate'] = float(drop_path)
  kwargs = mae.encoder_kwargs(model_name(config), **overrides)
  kwargs['pos_embed'] = pos_embed_kind(config)
  return kwargs


def pos_embed_kind(config) -> str:
  """config.pos_embed of a downstream config ('sincos' when absent), checked."""
  kind = _get(config, 'pos_embed') or 'sincos'
  if kind not in pos_embed.POS_EMBED_KINDS:
    raise ValueError(f'pos_embed={kind!r}: must be one of {pos_embed.POS_EMBED_KINDS} (learned: a trained table '
                     f'initialised from the checkpoint, as the reference fine-tunes; sincos: the fixed table)')
  return kind


def build_encoder(config, final_norm: bool = True) -> vit.VisionTransformer:
  """The encoder alone, without drop path (frozen for linear probing, kNN and features)."""
  kwargs = encoder_kwargs(config)
  kwargs['drop_path_rate'] = 0.0
  return vit.VisionTransformer(**kwargs, final_norm=final_norm)


def build_classifier(config, num_classes: int) -> vit.ViTClassifier:
  """The fine-tuning model: encoder, global pool + fc_norm (or cls), head."""
  return vit.ViTClassifier(num_classes=num_classes, encoder=encoder_kwargs(config),
                           global_pool=bool(config.global_pool), head_init_std=float(config.head_init_std))
