"""Masked autoencoder: random masking, the asymmetric encoder/decoder, and the loss."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax.models import pos_embed, vit

Dtype = Any
NORM_PIX_EPS = 1e-6


def num_visible(num_patches: int, mask_ratio: float) -> int:
  """len_keep of the reference: int(L * (1 - mask_ratio)), validated."""
  if not isinstance(mask_ratio, (int, float)):
    raise TypeError(f'mask_ratio={mask_ratio!r}: must be a Python float (it fixes static shapes)')
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f'mask_ratio={mask_ratio}: must be in (0, 1)')
  len_keep = int(num_patches * (1 - mask_ratio))
  if len_keep < 1:
    raise ValueError(
        f'mask_ratio={mask_ratio} leaves no visible patch out of {num_patches}: '
        f'use mask_ratio <= {1 - 1 / num_patches:.4f}')
  return len_keep


def patchify(images, patch_size: int):
  """[N, H, W, C] -> [N, L, p*p*C] with patch vectors in (p, q, c) order."""
  n, height, width, channels = images.shape
  h, w = height // patch_size, width // patch_size
  x = images.reshape(n, h, patch_size, w, patch_size, channels)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # [N, h, w, p, p, C]
  return x.reshape(n, h * w, patch_size * patch_size * channels)


def unpatchify(patches, patch_size: int, grid_size, channels: int):
  """[N, L, p*p*C] -> [N, H, W, C]; grid_size is (h, w) patches (or an int)."""
  h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
  n = patches.shape[0]
  x = patches.reshape(n, h, w, patch_size, patch_size, channels)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # [N, h, p, w, p, C]
  return x.reshape(n, h * patch_size, w * patch_size, channels)


def random_masking(x, mask_ratio: float, noise):
  """Per-example random masking by argsort of noise, with static shapes.

  Args:
    x: [N, L, D] tokens.
    mask_ratio: fraction of tokens removed (a Python float).
    noise: [N, L] values whose argsort gives each example's shuffle.

  Returns:
    x_masked [N, len_keep, D], mask [N, L] (1 = removed, original order),
    ids_restore [N, L] (inverse of the shuffle).
  """
  n, length, _ = x.shape
  len_keep = num_visible(length, mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=1)  # ascending: small noise is kept
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :len_keep]
  x_masked = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
  mask = (ids_restore >= len_keep).astype(jnp.float32)
  del n
  return x_masked, mask, ids_restore


def patch_targets(images, patch_size: int, norm_pix_loss: bool):
  """Regression targets [N, L, p*p*C] in float32, optionally per-patch normalised."""
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)  # unbiased, as the reference
    target = (target - mean) / jnp.sqrt(var + NORM_PIX_EPS)
  return target


def mae_loss(images, pred, mask, patch_size: int, norm_pix_loss: bool):
  """Mean over masked patches of the per-patch mean squared error (float32)."""
  target = patch_targets(images, patch_size, norm_pix_loss)
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)  # [N, L]
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MAEDecoder(nn.Module):
  """Light decoder: embed, add mask tokens, unshuffle, blocks, predict pixels."""
  patch_size: int = 16
  out_channels: int = 3
  embed_dim: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  remat_policy: str = 'none'
  scan_layers: bool = False
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, latent, ids_restore, grid_size, *, train: bool = False):
    """latent [N, 1 + K, D_enc] (cls first); ids_restore [N, L] or None if K == L."""
    dtype = vit.canonical_dtype(self.dtype)
    x = vit.Dense(self.embed_dim, dtype=dtype, kernel_init=vit.dense_init, name='embed')(latent)
    n = x.shape[0]
    if ids_restore is not None:
      mask_token = self.param('mask_token', vit.token_init, (1, 1, self.embed_dim), jnp.float32)
      num_masked = ids_restore.shape[1] + 1 - x.shape[1]
      tokens = jnp.concatenate(
          [x[:, 1:], jnp.broadcast_to(mask_token.astype(x.dtype), (n, num_masked, self.embed_dim))], axis=1)
      tokens = jnp.take_along_axis(tokens, ids_restore[:, :, None], axis=1)  # unshuffle
      x = jnp.concatenate([x[:, :1], tokens], axis=1)  # [N, 1 + L, D_dec]
    pos = pos_embed.get_2d_sincos_pos_embed(self.embed_dim, grid_size, cls_token=True)
    x = x + jnp.asarray(pos, x.dtype)[None]
    x = vit.apply_blocks(x, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                         dtype=dtype, attention_impl=self.attention_impl, deterministic=not train,
                         remat_policy=self.remat_policy, scan_layers=self.scan_layers)
    x = nn.LayerNorm(epsilon=vit.LAYER_NORM_EPS, dtype=dtype, name='norm')(x)
    pred = vit.Dense(self.patch_size**2 * self.out_channels, dtype=dtype, kernel_init=vit.dense_init,
                    name='pred')(x)
    return pred[:, 1:]  # drop the cls slot


class MaskedAutoencoder(nn.Module):
  """MAE with a ViT encoder that sees only the visible patches.

  `apply({'params': p}, images, mask_ratio=0.75, noise=None, rngs={'mask': key})`
  returns (loss, pred [N, L, p*p*C], mask [N, L] with 1 = removed).
  """
  image_size: Any = 224
  patch_size: int = 16
  in_channels: int = 3
  embed_dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  mlp_ratio: float = 4.0
  norm_pix_loss: bool = False
  dtype: Dtype = jnp.float32
  remat_policy: str = 'none'
  scan_layers: bool = False
  attention_impl: str = 'xla'
  encoder_mask_tokens: bool = False  # Ablation: the encoder sees all tokens, mask tokens included.

  def __post_init__(self):
    vit.check_vit_settings(self.image_size, self.patch_size, self.embed_dim, self.num_heads)
    vit.check_vit_settings(self.image_size, self.patch_size, self.decoder_embed_dim,
                           self.decoder_num_heads, prefix='decoder: ')
    if self.attention_impl not in vit.ATTENTION_IMPLS:
      raise ValueError(f'model.attention_impl={self.attention_impl!r}: must be one of {vit.ATTENTION_IMPLS}')
    if self.remat_policy not in vit.REMAT_POLICIES:
      raise ValueError(f'model.remat_policy={self.remat_policy!r}: must be one of {sorted(vit.REMAT_POLICIES)}')
    vit.canonical_dtype(self.dtype)
    super().__post_init__()

  @property
  def grid_size(self):
    h, w = (self.image_size,) * 2 if isinstance(self.image_size, int) else self.image_size
    return h // self.patch_size, w // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size[0] * self.grid_size[1]

  def setup(self):
    common = dict(dtype=self.dtype, remat_policy=self.remat_policy, scan_layers=self.scan_layers,
                  attention_impl=self.attention_impl)
    self.encoder = vit.VisionTransformer(
        patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
        num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, image_size=self.image_size,
        in_channels=self.in_channels, **common)
    self.decoder = MAEDecoder(
        patch_size=self.patch_size, out_channels=self.in_channels, embed_dim=self.decoder_embed_dim,
        depth=self.decoder_depth, num_heads=self.decoder_num_heads, mlp_ratio=self.mlp_ratio, **common)
    if self.encoder_mask_tokens:
      self.encoder_mask_token = self.param('encoder_mask_token', vit.token_init, (1, 1, self.embed_dim))

  def forward_encoder(self, images, mask_ratio: float, noise=None, train: bool = False):
    """Returns latent [N, 1 + len_keep, D] (or 1 + L with encoder mask tokens), mask, ids_restore."""
    n = images.shape[0]
    grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
    length = grid[0] * grid[1]
    num_visible(length, mask_ratio)  # validate before tracing anything else
    if noise is None:
      noise = jax.random.uniform(self.make_rng('mask'), (n, length))
    elif noise.shape != (n, length):
      raise ValueError(f'noise of shape {noise.shape}: expected [N, L] = {(n, length)}')

    def mask_fn(x, pos):
      x_masked, mask, ids_restore = random_masking(x, mask_ratio, noise)
      if self.encoder_mask_tokens:  # keep every token; masked ones become mask token + position
        token = self.encoder_mask_token.astype(x.dtype) + pos[None, 1:].astype(x.dtype)
        return jnp.where(mask[:, :, None] > 0, token, x), (mask, None)
      return x_masked, (mask, ids_restore)

    latent, (mask, ids_restore) = self.encoder(images, train=train, mask_fn=mask_fn)
    return latent, mask, ids_restore

  def __call__(self, images, mask_ratio: float = 0.75, noise=None, train: bool = True):
    latent, mask, ids_restore = self.forward_encoder(images, mask_ratio, noise, train)
    grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
    pred = self.decoder(latent, ids_restore, grid, train=train)
    loss = mae_loss(images, pred, mask, self.patch_size, self.norm_pix_loss)
    return loss, pred, mask

  def encode(self, images, train: bool = False, return_layers=None):
    """All tokens of the unmasked image, cls first: [N, 1 + L, D] after the final norm.

    With `return_layers=(i, ...)` (0-based block indices, negative from the
    end), returns a list with each listed block's output tokens [N, 1 + L, D]
    instead: the intermediate features of dense-task heads (ViTDet, UperNet),
    equal to Hugging Face ViTMAEModel's `hidden_states[i + 1]`.
    """
    if return_layers is None:
      return self.encoder(images, train=train)[0]
    return self.encoder(images, train=train, return_layers=return_layers)[2]


# Reference sizes, plus small ones for tests and demos.
MODELS = {
    'mae_vit_huge_patch14': dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    'mae_vit_large_patch16': dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    'mae_vit_base_patch16': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    'mae_vit_small_patch16': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                                  decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    'mae_vit_tiny_patch16': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                                 decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    # Fashion-MNIST / MNIST scale: 28x28 grayscale, 7x7 patches of 4x4.
    'mae_vit_tiny_patch4': dict(image_size=28, in_channels=1, patch_size=4, embed_dim=192, depth=6,
                                num_heads=3, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    # The CPU demo: minutes for a few hundred steps on two cores.
    'mae_vit_mini_patch4': dict(image_size=28, in_channels=1, patch_size=4, embed_dim=128, depth=4,
                                num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4),
    # For unit tests: a few thousand parameters.
    'mae_vit_test': dict(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                         decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
}
MODEL_DEFAULTS = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0)
ENCODER_FIELDS = ('patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'image_size',
                  'in_channels', 'dtype', 'remat_policy', 'scan_layers', 'attention_impl')


def model_kwargs(name: str, **overrides) -> dict:
  """The MaskedAutoencoder fields of a named model with overrides applied."""
  import difflib  # pylint: disable=g-import-not-at-top
  if name not in MODELS:
    close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.4)
    raise ValueError(f'model.name={name!r} is unknown; did you mean {close}? Known: {sorted(MODELS)}')
  fields = {f for f in MaskedAutoencoder.__dataclass_fields__ if f not in ('parent', 'name')}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'unknown model setting(s) {unknown} for {name}; allowed: {sorted(fields)}')
  kwargs = {**MODEL_DEFAULTS, **MODELS[name]}
  kwargs.update({k: v for k, v in overrides.items() if v is not None})
  return kwargs


def get_model(name: str, **overrides) -> MaskedAutoencoder:
  """Builds a named MAE, e.g. get_model('mae_vit_base_patch16', dtype='bfloat16')."""
  return MaskedAutoencoder(**model_kwargs(name, **overrides))


def encoder_kwargs(name: str, **overrides) -> dict:
  """VisionTransformer fields of a named MAE's encoder (for fine-tuning and probes)."""
  base = name if name.startswith('mae_') else 'mae_' + name
  encoder_overrides = {k: v for k, v in overrides.items() if k in ENCODER_FIELDS}
  kwargs = model_kwargs(base, **encoder_overrides)
  out = {k: kwargs[k] for k in ENCODER_FIELDS if k in kwargs}
  if 'drop_path_rate' in overrides:
    out['drop_path_rate'] = overrides['drop_path_rate']
  return out


def get_classifier(name: str, num_classes: int, global_pool: bool = True, pos_embed: str = 'sincos',
                   **overrides):
  """ViT classifier with the encoder of a named MAE (e.g. 'mae_vit_base_patch16').

  pos_embed='learned' gives timm's trained position table (the reference's
  fine-tuning); 'sincos' the MAE's fixed one.
  """
  return vit.ViTClassifier(num_classes=num_classes, encoder={**encoder_kwargs(name, **overrides),
                                                             'pos_embed': pos_embed},
                           global_pool=global_pool)
