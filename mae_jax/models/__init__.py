"""MAE models: `get_model(name, **overrides)` and the pieces it is built from."""

from mae_jax.models.mae import (
    MODELS,
    MaskedAutoencoder,
    encoder_kwargs,
    get_classifier,
    get_model,
    mae_loss,
    model_kwargs,
    num_visible,
    patch_targets,
    patchify,
    random_masking,
    unpatchify,
)
from mae_jax.models.vit import VisionTransformer, ViTClassifier

__all__ = [
    'encoder_kwargs', 'get_classifier', 'get_model', 'mae_loss', 'MaskedAutoencoder', 'model_kwargs',
    'MODELS', 'num_visible', 'patch_targets', 'patchify', 'random_masking', 'unpatchify',
    'ViTClassifier', 'VisionTransformer',
]
