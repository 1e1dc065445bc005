"""Fixed 2D sin-cos position tables, as in the MAE reference.

The tables are constants: they are never parameters, so no optimizer, weight
decay or checkpoint touches them.
"""

import numpy as np


def get_1d_sincos_pos_embed(embed_dim: int, positions: np.ndarray) -> np.ndarray:
  """Returns [len(positions), embed_dim]: sin of all frequencies, then cos."""
  if embed_dim % 2:
    raise ValueError(f'embed_dim={embed_dim}: must be even for a sin-cos table')
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega  # [D/2]
  angles = np.einsum('m,d->md', positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size, cls_token: bool = False) -> np.ndarray:
  """Returns the [(1 +) h*w, embed_dim] table in row-major patch order.

  The first half of the channels encodes the w (column) coordinate, the second
  half the h (row) coordinate; the optional cls row is all zeros.

  Args:
    embed_dim: channels; must be divisible by 4.
    grid_size: int or (h, w) number of patches per axis.
    cls_token: prepend a zero row for the cls token.
  """
  if embed_dim % 4:
    raise ValueError(f'embed_dim={embed_dim}: must be divisible by 4 for a 2D sin-cos table')
  grid_h, grid_w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')  # [h, w] each
  emb_w = get_1d_sincos_pos_embed(embed_dim // 2, cols)
  emb_h = get_1d_sincos_pos_embed(embed_dim // 2, rows)
  table = np.concatenate([emb_w, emb_h], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros([1, embed_dim]), table], axis=0)
  return table.astype(np.float32)

