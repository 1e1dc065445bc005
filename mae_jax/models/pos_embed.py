"""Position tables: the fixed 2D sin-cos table of the MAE reference, and resizing a table to a new grid.

The pretraining encoder and decoder use the fixed sin-cos tables as constants:
never parameters, so no optimizer, weight decay or checkpoint touches them.
Fine-tuning (timm's ViT, `VisionTransformer(pos_embed='learned')`) learns a
table initialised from the checkpoint's; when the resolution changes, the
patch part of that table is resized with `resize_pos_embed`, which equals
PyTorch's `F.interpolate(mode='bicubic', align_corners=False)` as the
reference's `interpolate_pos_embed` calls it, for any grid, square or not.
"""

import math

import numpy as np

# PyTorch's bicubic kernel (cubic convolution, Keys' a = -0.75; PIL and jax.image use -0.5).
CUBIC_A = -0.75
POS_EMBED_KINDS = ('sincos', 'learned')


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


def _cubic(x: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel with a = CUBIC_A, at distances |x| < 2."""
  x = np.abs(x)
  a = CUBIC_A
  near = ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  return np.where(x <= 1, near, far)


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of PyTorch's 1-D bicubic resize (align_corners=False, no antialias).

  Output i samples the input at src = (i + 0.5) * size_in / size_out - 0.5 with
  the 4 taps floor(src) - 1 .. floor(src) + 2, clamped to the border (the edge
  pixel repeats), as ATen's upsample_bicubic2d.
  """
  scale = size_in / size_out
  src = (np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.floor(src)
  frac = src - base
  matrix = np.zeros((size_out, size_in), np.float64)
  rows = np.arange(size_out)
  for tap in range(-1, 3):
    index = np.clip(base.astype(np.int64) + tap, 0, size_in - 1)
    np.add.at(matrix, (rows, index), _cubic(frac - tap))
  return matrix


def resize_bicubic(image: np.ndarray, size) -> np.ndarray:
  """[h, w, C] -> [H, W, C] exactly as torch's F.interpolate(mode='bicubic', align_corners=False).

  Computed in float64; the result keeps the input's float dtype.
  """
  out_h, out_w = size
  h, w = image.shape[:2]
  rows, cols = bicubic_matrix(h, out_h), bicubic_matrix(w, out_w)
  out = np.einsum('Hh,hwc,Ww->HWc', rows, image.astype(np.float64), cols)
  return out.astype(image.dtype if np.issubdtype(image.dtype, np.floating) else np.float32)


def as_grid(grid) -> tuple[int, int]:
  """(rows, columns) of an int or a pair."""
  return (int(grid), int(grid)) if isinstance(grid, (int, np.integer)) else (int(grid[0]), int(grid[1]))


def table_grid(num_positions: int, candidates=(), num_extra: int = 1, what: str = 'the position table'):
  """The (rows, columns) grid of a table of `num_positions` rows (cls first).

  The first of `candidates` (grids, None skipped) with that many patches wins,
  else the square grid, as the reference assumes; anything else is an error.
  """
  patches = num_positions - num_extra
  for grid in candidates:
    if grid is not None and math.prod(as_grid(grid)) == patches:
      return as_grid(grid)
  side = math.isqrt(max(patches, 0))
  if patches > 0 and side * side == patches:
    return side, side
  known = [as_grid(g) for g in candidates if g is not None]
  raise ValueError(f'{what} has {patches} patch positions: neither a square grid nor one of {known}; '
                   f'cannot tell its grid to interpolate it (set dataset.image_size to the size it was trained at)')


def resize_pos_embed(table: np.ndarray, grid_in, grid_out, num_extra: int = 1) -> np.ndarray:
  """Resizes a [(1,) num_extra + h*w, D] table to grid_out; the cls (extra) rows are kept.

  The patch rows are resized as an image [h, w, D] with `resize_bicubic`, as the
  reference's `interpolate_pos_embed` (PyTorch bicubic, align_corners=False)
  does. The same grid returns the table unchanged.
  """
  grid_in, grid_out = as_grid(grid_in), as_grid(grid_out)
  batched = table.ndim == 3
  rows = table[0] if batched else table
  if rows.shape[0] != num_extra + math.prod(grid_in):
    raise ValueError(f'position table of shape {table.shape} does not hold {num_extra} + '
                     f'{grid_in[0]}x{grid_in[1]} positions')
  if grid_in != grid_out:
    patches = rows[num_extra:].reshape(*grid_in, rows.shape[-1])
    patches = resize_bicubic(patches, grid_out).reshape(-1, rows.shape[-1])
    rows = np.concatenate([rows[:num_extra], patches.astype(rows.dtype)], axis=0)
  return rows[None] if batched else rows
