"""mae_jax.models.pos_embed: the fixed sin-cos table's grids and resizing a table as PyTorch's bicubic does."""

import numpy as np
import pytest

from mae_jax.models import pos_embed


@pytest.mark.parametrize('grid_in,grid_out', [((14, 14), (16, 16)), ((14, 14), (32, 32)), ((7, 7), (12, 9)),
                                              ((16, 16), (8, 8)), ((5, 3), (2, 7))])
def test_resize_equals_torch_bicubic_align_corners_false(grid_in, grid_out):
  """As the reference's interpolate_pos_embed: [1, D, h, w] through F.interpolate, any grid, up or down."""
  torch = pytest.importorskip('torch')
  width = 16
  table = np.random.default_rng(0).standard_normal((1, 1 + grid_in[0] * grid_in[1], width)).astype(np.float32)
  patches = torch.from_numpy(table[:, 1:]).reshape(1, *grid_in, width).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(patches, size=grid_out, mode='bicubic', align_corners=False)
  want = np.concatenate([table[:, :1], want.permute(0, 2, 3, 1).reshape(1, -1, width).numpy()], axis=1)
  got = pos_embed.resize_pos_embed(table, grid_in, grid_out)
  assert got.shape == (1, 1 + grid_out[0] * grid_out[1], width) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(got[0, 0], table[0, 0])  # The cls entry is kept as it is.


def test_sincos_table_resized_is_not_the_sincos_table_of_the_new_grid():
  """Why the loader resizes the checkpoint's table instead of computing a new one: they differ, as in timm."""
  small = pos_embed.get_2d_sincos_pos_embed(32, 14, cls_token=True)
  resized = pos_embed.resize_pos_embed(small, 14, 32)
  fresh = pos_embed.get_2d_sincos_pos_embed(32, 32, cls_token=True)
  assert resized.shape == fresh.shape == (1 + 32 * 32, 32)
  assert np.abs(resized - fresh).max() > 0.1
  np.testing.assert_array_equal(pos_embed.resize_pos_embed(small, 14, (14, 14)), small)  # Same grid: unchanged.


def test_bicubic_weights_are_keys_a_minus_075_with_the_border_clamped():
  matrix = pos_embed.bicubic_matrix(4, 8)  # Upscale by 2: src = i / 2 - 0.25.
  np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)  # Rows interpolate (constants stay).
  # Output 2 samples src 0.75: taps -1, 0, 1, 2 at distances 1.75, 0.75, 0.25, 1.25; tap -1 clamps onto 0.
  cubic = lambda x: (np.where(abs(x) <= 1, 1.25 * abs(x) ** 3 - 2.25 * abs(x) ** 2 + 1,
                              -0.75 * abs(x) ** 3 + 3.75 * abs(x) ** 2 - 6 * abs(x) + 3))
  np.testing.assert_allclose(matrix[2, :3], [cubic(1.75) + cubic(0.75), cubic(0.25), cubic(1.25)], atol=1e-12)


def test_table_grid_prefers_the_known_grid_then_the_square():
  assert pos_embed.table_grid(1 + 12 * 9, [(12, 9)]) == (12, 9)
  assert pos_embed.table_grid(1 + 12 * 9, [None, (9, 12)]) == (9, 12)
  assert pos_embed.table_grid(1 + 196, [(12, 9)]) == (14, 14)
  with pytest.raises(ValueError, match=r'108 patch positions: neither a square grid nor one of \[\(4, 4\)\]'):
    pos_embed.table_grid(1 + 108, [(4, 4)])
  with pytest.raises(ValueError, match='does not hold 1 \\+ 4x4 positions'):
    pos_embed.resize_pos_embed(np.zeros((1, 10, 8), np.float32), 4, 8)
