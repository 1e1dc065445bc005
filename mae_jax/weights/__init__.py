"""Weights in and out of mae_jax: Orbax, safetensors (reference / timm names), Hugging Face, .pth.

  export_weights(params, 'mae_vit_base_patch16', 'safetensors', 'mae_base.safetensors')
  params = import_weights('mae_pretrain_vit_base.pth', 'mae_vit_base_patch16')

An import matches `models.get_model(name, **overrides)`'s params layout,
scanned or not. A file without a decoder gives params with only 'encoder'; a
fine-tuned classifier (`head.*`) gives the `get_classifier` layout.

One module per idea:
  layout      the params pytree: stacked / unstacked blocks, a named model's
              abstract params, shape checks.
  reference   mae_jax params <-> the reference / timm state dict names.
  hf          Hugging Face ViTMAE names and config.json.
  files       the formats on disk, their metadata, export_weights / import_weights.
  pretrained  a downstream run's pretrained encoder: load it, merge it into params.

The command line is `python -m mae_jax.export`.
"""

from mae_jax.weights.files import (
    FORMATS,
    METADATA_FILENAME,
    detect_format,
    export_weights,
    import_weights,
    load_torch_state_dict,
    load_weights,
    metadata_path,
    read_metadata,
    resolve_model,
)
from mae_jax.weights.hf import hf_config, hf_key_names, model_name_from_hf_config, to_hf_state_dict
from mae_jax.weights.layout import model_settings, stack_blocks, unstack_blocks
from mae_jax.weights.pretrained import load_pretrained_encoder, merge_encoder
from mae_jax.weights.reference import from_reference_state_dict, reference_key_shapes, to_reference_state_dict

__all__ = [
    'detect_format', 'export_weights', 'FORMATS', 'from_reference_state_dict', 'hf_config', 'hf_key_names',
    'import_weights', 'load_pretrained_encoder', 'load_torch_state_dict', 'load_weights', 'merge_encoder',
    'METADATA_FILENAME',
    'metadata_path', 'model_name_from_hf_config', 'model_settings', 'read_metadata', 'reference_key_shapes',
    'resolve_model', 'stack_blocks', 'to_hf_state_dict', 'to_reference_state_dict', 'unstack_blocks',
]
