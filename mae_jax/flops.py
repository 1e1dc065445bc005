"""Analytic FLOPs of MAE and of the fine-tuning classifier (matmuls only, 2 FLOPs per multiply-add).

Also the peak and HBM of a device.

The forward count covers every matmul: the patch embedding of all patches, the
encoder blocks on the cls + visible tokens, the decoder embedding of those
tokens, the decoder blocks and the pixel prediction on cls + all patches.
Layer norms, softmax, GELU and the loss are left out (well under 1%).

About the reference table (REFERENCE.md): for ViT-B/L/H with an 8-block
decoder it lists 19.7 / 41.7 / 97.4 GFLOPs per image for MAE. Those figures
are reproduced to 0.1 G only when the decoder embedding (encoder width ->
512) is counted on all 1 + L tokens instead of the 1 + len_keep encoder
outputs. Neither this implementation nor the PyTorch reference computes that:
both embed the encoder's output and append mask tokens that are already 512
wide. So what the model does is 19.6 / 41.5 / 97.1 G
(`mae_forward_flops`); `count_masked_decoder_embed=True` reproduces the
table. With mask tokens in the encoder both conventions agree (every token is
embedded): 46.0 / 134.0 / 349.1 G. The ViT-L/dec8 ratio is therefore 3.23x
as implemented (3.22x in the reference's convention).
"""

import jax

from mae_jax import accelerators
from mae_jax.accelerators import PEAK_FLOPS, TPU_CHIPS, GiB, TpuChip, tpu_chip  # noqa: F401  pylint: disable=unused-import

# The chip table lives in accelerators; the names above stay readable here (aot, benchmarks).


def _blocks_macs(tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
  """q/k/v/proj + MLP + the two attention matmuls, per example."""
  dense = (4 + 2 * mlp_ratio) * tokens * width * width
  attention = 2 * tokens * tokens * width
  return depth * (dense + attention)


def mae_forward_flops(model_kwargs: dict, mask_ratio: float, encoder_mask_tokens: bool = False,
                      count_masked_decoder_embed: bool = False) -> float:
  """Forward FLOPs per image of a MaskedAutoencoder with the given fields.

  Args:
    model_kwargs: MaskedAutoencoder fields (`models.model_kwargs(name)`).
    mask_ratio: fraction of patches removed.
    encoder_mask_tokens: the ablation where the encoder sees all tokens.
    count_masked_decoder_embed: also count the decoder embedding of the masked
      tokens, as the reference's FLOP table does (not computed by the model).
  """
  from mae_jax.models import mae  # pylint: disable=g-import-not-at-top
  size = model_kwargs.get('image_size', 224)
  h, w = (size, size) if isinstance(size, int) else size
  p, c = model_kwargs['patch_size'], model_kwargs.get('in_channels', 3)
  num_patches = (h // p) * (w // p)
  width, dec = model_kwargs['embed_dim'], model_kwargs['decoder_embed_dim']
  mlp = model_kwargs.get('mlp_ratio', 4.0)
  visible = num_patches if encoder_mask_tokens else mae.num_visible(num_patches, mask_ratio)
  embedded = num_patches if count_masked_decoder_embed else visible
  macs = num_patches * p * p * c * width  # patch embedding of every patch
  macs += _blocks_macs(1 + visible, width, model_kwargs['depth'], mlp)
  macs += (1 + embedded) * width * dec  # decoder embed
  macs += _blocks_macs(1 + num_patches, dec, model_kwargs['decoder_depth'], mlp)
  macs += (1 + num_patches) * dec * p * p * c  # pixel prediction
  return 2.0 * macs


def mae_train_flops(model_kwargs: dict, mask_ratio: float, encoder_mask_tokens: bool = False) -> float:
  """Training FLOPs per image: forward + backward (2x forward).

  Rematerialisation recomputes part of the forward; that work is not counted,
  so MFU stays comparable across remat policies (as MaxText reports it).
  """
  return 3.0 * mae_forward_flops(model_kwargs, mask_ratio, encoder_mask_tokens)


def classifier_forward_flops(encoder_kwargs: dict, num_classes: int) -> float:
  """Forward FLOPs per image of the fine-tuning classifier (ViTClassifier) with these encoder fields.

  Patch embedding of every patch, the encoder blocks on cls + all patches (no
  masking downstream) and the head; pooling and norms are left out.
  """
  size = encoder_kwargs.get('image_size', 224)
  h, w = (size, size) if isinstance(size, int) else size
  p, c = encoder_kwargs['patch_size'], encoder_kwargs.get('in_channels', 3)
  num_patches = (h // p) * (w // p)
  width = encoder_kwargs['embed_dim']
  macs = num_patches * p * p * c * width
  macs += _blocks_macs(1 + num_patches, width, encoder_kwargs['depth'], encoder_kwargs.get('mlp_ratio', 4.0))
  macs += width * num_classes  # head
  return 2.0 * macs


def classifier_train_flops(encoder_kwargs: dict, num_classes: int) -> float:
  """Fine-tuning FLOPs per image: forward + backward (2x forward); remat recompute not counted."""
  return 3.0 * classifier_forward_flops(encoder_kwargs, num_classes)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """Peak bf16 FLOP/s of a device, or None when unknown (e.g. CPU)."""
  device = device or jax.devices()[0]
  return accelerators.peak_flops(getattr(device, 'device_kind', ''))


def hbm_bytes_per_device(device: jax.Device | None = None, usable: bool = True) -> int | None:
  """HBM of one TPU device (usable by a program, or nominal), or None when unknown."""
  device = device or jax.devices()[0]
  chip = accelerators.tpu_chip(getattr(device, 'device_kind', ''))
  if chip is None:
    return None
  return chip.hbm_usable_bytes if usable else chip.hbm_bytes
