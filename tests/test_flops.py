"""Analytic FLOPs against the reference table, and the device lookups used for MFU and HBM."""

import jax
import pytest

from mae_jax import flops, models

G = 1e9


def _forward(name, encoder_mask_tokens=False, decoder_depth=8, **kwargs):
  return flops.mae_forward_flops(models.model_kwargs(name, decoder_depth=decoder_depth), 0.75,
                                 encoder_mask_tokens, **kwargs) / G


@pytest.mark.parametrize('name,with_mask_tokens', [
    ('mae_vit_large_patch16', 134.0),
    ('mae_vit_huge_patch14', 349.1),
    ('mae_vit_base_patch16', 46.0),
])
def test_mask_token_variant_matches_reference(name, with_mask_tokens):
  assert round(_forward(name, encoder_mask_tokens=True), 1) == with_mask_tokens


@pytest.mark.parametrize('name,as_computed,reference', [
    ('mae_vit_large_patch16', 41.5, 41.7),
    ('mae_vit_huge_patch14', 97.1, 97.4),
    ('mae_vit_base_patch16', 19.6, 19.7),
])
def test_mae_variant_and_the_reference_convention(name, as_computed, reference):
  # What the model computes: the decoder embeds only the 1 + len_keep encoder outputs.
  assert round(_forward(name), 1) == as_computed
  # The reference table also counts the decoder embedding of the masked tokens.
  assert round(_forward(name, count_masked_decoder_embed=True), 1) == reference
  # That convention changes nothing when the encoder already sees every token.
  assert _forward(name, True, count_masked_decoder_embed=True) == pytest.approx(_forward(name, True))


def test_speedup_ratios():
  large = 'mae_vit_large_patch16'
  ratio_ref = _forward(large, True) / _forward(large, count_masked_decoder_embed=True)
  assert round(ratio_ref, 2) == 3.22  # REFERENCE.md, ViT-L/dec8
  assert round(_forward(large, True) / _forward(large), 2) == 3.23  # as implemented
  huge = 'mae_vit_huge_patch14'
  assert round(_forward(huge, True) / _forward(huge, count_masked_decoder_embed=True), 2) == 3.59  # REFERENCE.md
  # A 1-block decoder makes MAE cheaper still; the mask-token encoder barely changes.
  assert _forward(large, decoder_depth=1) < 0.8 * _forward(large)
  assert _forward(large, True, decoder_depth=1) / _forward(large, decoder_depth=1) > 3.8


def test_train_is_three_forwards_and_scales_with_mask_ratio():
  kwargs = models.model_kwargs('mae_vit_base_patch16')
  assert flops.mae_train_flops(kwargs, 0.75) == pytest.approx(3 * flops.mae_forward_flops(kwargs, 0.75))
  assert flops.mae_forward_flops(kwargs, 0.5) > flops.mae_forward_flops(kwargs, 0.75)
  # Image size and channels enter through the patch count and the pixel dimension.
  small = models.model_kwargs('mae_vit_test')
  assert flops.mae_forward_flops(dict(small, image_size=64), 0.75) > flops.mae_forward_flops(small, 0.75)


def test_peak_and_hbm_unknown_on_cpu():

  cpu = jax.devices('cpu')[0]
  assert flops.peak_flops_per_device(cpu) is None
  assert flops.hbm_bytes_per_device(cpu) is None
