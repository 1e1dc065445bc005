"""Hugging Face ViTMAE names and config.json, mapped from and to the reference / timm names.

`ViTMAEForPreTraining` holds the encoder under `vit.` and the decoder under
`decoder.`; `ViTMAEModel` (an encoder export) holds the encoder without the
`vit.` prefix. The reference's fused `attn.qkv` is split into `query`, `key`
and `value`.
"""

import re

import numpy as np
from absl import logging

from mae_jax import models
from mae_jax.models import vit
from mae_jax.weights import layout

_HF_BLOCK_PARTS = {'norm1': 'layernorm_before', 'norm2': 'layernorm_after',
                   'attn.proj': 'attention.output.dense', 'mlp.fc1': 'intermediate.dense',
                   'mlp.fc2': 'output.dense'}
_HF_ENCODER_TOP = {'cls_token': 'embeddings.cls_token', 'pos_embed': 'embeddings.position_embeddings',
                   'patch_embed.proj.weight': 'embeddings.patch_embeddings.projection.weight',
                   'patch_embed.proj.bias': 'embeddings.patch_embeddings.projection.bias',
                   'norm.weight': 'layernorm.weight', 'norm.bias': 'layernorm.bias'}
_HF_DECODER_TOP = {'mask_token': 'decoder.mask_token', 'decoder_pos_embed': 'decoder.decoder_pos_embed'}
# transformers >= 5 names its modules differently in memory (and writes a mixed
# form on save); these rewrite those names to the Hub's, which we write.
_HF_NAME_FIXES = (
    (r'^decoder\.decoder_encoder\.layer\.', 'decoder.decoder_layers.'),
    (r'^(vit\.)?layers\.', r'\1encoder.layer.'),
    (r'\.attention\.([qkv])_proj\.', lambda m: '.attention.attention.' + {
        'q': 'query', 'k': 'key', 'v': 'value'}[m.group(1)] + '.'),
    (r'\.attention\.o_proj\.', '.attention.output.dense.'),
    (r'\.mlp\.fc1\.', '.intermediate.dense.'),
    (r'\.mlp\.fc2\.', '.output.dense.'),
)
_HF_IGNORED = re.compile(r'^(vit\.)?pooler\.')  # ViTModel's pooler: not part of MAE.


def hf_key_names(ref_key: str, prefix: str = 'vit.') -> list[str]:
  """Hugging Face ViTMAE key(s) of a reference key (qkv -> query, key, value)."""
  m = re.fullmatch(r'(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)', ref_key)
  if m:
    group, i, part, kind = m.groups()
    base = f'{prefix}encoder.layer.{i}.' if group == 'blocks' else f'decoder.decoder_layers.{i}.'
    if part == 'attn.qkv':
      return [f'{base}attention.attention.{n}.{kind}' for n in ('query', 'key', 'value')]
    return [f'{base}{_HF_BLOCK_PARTS[part]}.{kind}']
  if ref_key in _HF_ENCODER_TOP:
    return [prefix + _HF_ENCODER_TOP[ref_key]]
  if ref_key in _HF_DECODER_TOP:
    return [_HF_DECODER_TOP[ref_key]]
  m = re.fullmatch(r'(decoder_embed|decoder_norm|decoder_pred)\.(weight|bias)', ref_key)
  if m:
    return [f'decoder.{ref_key}']
  raise ValueError(f'{ref_key} has no Hugging Face ViTMAE name (classifier heads are not exported to hf)')


def to_hf_state_dict(reference_state: dict, prefix: str = 'vit.') -> dict[str, np.ndarray]:
  """Reference state dict -> Hugging Face ViTMAE names (Hub layout)."""
  out = {}
  for key, value in reference_state.items():
    names = hf_key_names(key, prefix)
    rows = value.shape[0] // len(names)
    for k, name in enumerate(names):
      out[name] = np.ascontiguousarray(value[k * rows:(k + 1) * rows] if len(names) > 1 else value)
  return out


def normalize_hf_names(state: dict) -> tuple[dict, str]:
  """Rewrites transformers-5 names to Hub names; returns (state, 'vit.' or '')."""
  out = {}
  for key, value in state.items():
    if _HF_IGNORED.match(key):
      logging.info('ignoring %s (Hugging Face ViT pooler, not part of MAE)', key)
      continue
    for pattern, repl in _HF_NAME_FIXES:
      key = re.sub(pattern, repl, key)
    out[key] = value
  prefix = 'vit.' if any(k.startswith('vit.') for k in out) else ''
  return out, prefix


def is_hf_state(keys) -> bool:
  """Whether state dict keys are Hugging Face names (else reference / timm names)."""
  return any(k.startswith(('vit.', 'embeddings.', 'encoder.layer.', 'layers.', 'decoder.')) for k in keys)


def hf_config(model_name: str, overrides: dict, encoder_only: bool, mask_ratio: float = 0.75) -> dict:
  """config.json of a transformers ViTMAE model equal to a named mae_jax model."""
  m = layout.model_settings(model_name, overrides)
  h, w = layout.image_hw(m)
  return {
      'architectures': ['ViTMAEModel' if encoder_only else 'ViTMAEForPreTraining'],
      'model_type': 'vit_mae',
      'hidden_size': m.embed_dim,
      'num_hidden_layers': m.depth,
      'num_attention_heads': m.num_heads,
      'intermediate_size': int(m.embed_dim * m.mlp_ratio),
      'hidden_act': 'gelu',  # Exact (erf) GELU, as mae_jax.
      'hidden_dropout_prob': 0.0,
      'attention_probs_dropout_prob': 0.0,
      'initializer_range': 0.02,
      'layer_norm_eps': vit.LAYER_NORM_EPS,  # HF's default is 1e-12; MAE uses 1e-6.
      'image_size': h if h == w else [h, w],
      'patch_size': m.patch_size,
      'num_channels': m.in_channels,
      'qkv_bias': True,
      'decoder_hidden_size': m.decoder_embed_dim,
      'decoder_num_hidden_layers': m.decoder_depth,
      'decoder_num_attention_heads': m.decoder_num_heads,
      'decoder_intermediate_size': int(m.decoder_embed_dim * m.mlp_ratio),
      'mask_ratio': float(mask_ratio),
      'norm_pix_loss': bool(m.norm_pix_loss),
  }


def model_name_from_hf_config(hf_config: dict, source: str = 'config.json') -> tuple[str, dict]:
  """The mae_jax model (name, overrides) whose sizes equal a ViTMAE / ViT config.json.

  A registered model of the same encoder sizes is named; any other sizes become
  overrides of the registered model of the same patch size (or the first). The
  decoder sizes and the MLP ratio of a ViTMAE config are overrides too.
  """
  act = hf_config.get('hidden_act', 'gelu')
  if act not in ('gelu', 'gelu_python'):
    raise ValueError(f'{source}: hidden_act={act!r}; mae_jax models use the exact GELU (hidden_act="gelu"), so '
                     'these weights would compute something else')
  if not hf_config.get('qkv_bias', True):
    raise ValueError(f'{source}: qkv_bias=false; mae_jax models have biases on the query, key and value')
  size = hf_config.get('image_size', 224)
  overrides = {'image_size': size if isinstance(size, int) else tuple(size),
               'in_channels': hf_config.get('num_channels', 3),
               'norm_pix_loss': bool(hf_config.get('norm_pix_loss', False))}
  want = {'patch_size': hf_config.get('patch_size'), 'embed_dim': hf_config.get('hidden_size'),
          'depth': hf_config.get('num_hidden_layers'), 'num_heads': hf_config.get('num_attention_heads')}
  missing = [f'{hf}' for hf, ours in (('patch_size', 'patch_size'), ('hidden_size', 'embed_dim'),
                                      ('num_hidden_layers', 'depth'), ('num_attention_heads', 'num_heads'))
             if want[ours] is None]
  if missing:
    raise ValueError(f'{source} lacks {", ".join(missing)}: is it a ViT / ViTMAE config? Pass model_name= '
                     '(or --model=)')
  mlp_ratio = hf_config.get('intermediate_size', 4 * want['embed_dim']) / want['embed_dim']
  if 'decoder_hidden_size' in hf_config:  # ViTMAE: the decoder's sizes (and its MLP ratio, which is shared).
    decoder_width = hf_config['decoder_hidden_size']
    decoder_ratio = hf_config.get('decoder_intermediate_size', 4 * decoder_width) / decoder_width
    if decoder_ratio != mlp_ratio:
      raise ValueError(f'{source}: the decoder\'s MLP ratio ({decoder_ratio:g}) differs from the encoder\'s '
                       f'({mlp_ratio:g}); mae_jax models share one mlp_ratio')
    overrides.update(decoder_embed_dim=decoder_width, decoder_depth=hf_config.get('decoder_num_hidden_layers', 8),
                     decoder_num_heads=hf_config.get('decoder_num_attention_heads', 16))
  if mlp_ratio != 4.0:
    overrides['mlp_ratio'] = mlp_ratio
  candidates = []
  for name in models.MODELS:
    try:
      m = layout.model_settings(name, overrides)
    except ValueError:  # e.g. this image size does not fit the model's patch size.
      continue
    if all(getattr(m, k) == v for k, v in want.items()):
      return name, overrides
    candidates.append((m.patch_size != want['patch_size'], name))
  if not candidates:
    raise ValueError(f'{source}: no mae_jax model takes {overrides}: pass model_name= (or --model=) with overrides')
  base = min(candidates)[1]  # Same patch size first: only the sizes below differ from it.
  logging.info('%s: no registered model has %s; %s with those sizes', source, want, base)
  return base, {**overrides, **want}
