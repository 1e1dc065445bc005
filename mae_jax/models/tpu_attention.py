"""Fused attention on TPU: the Pallas flash-attention kernel, padded and per-device.

`jax.nn.dot_product_attention` on TPU materialises the [batch, heads, T, T]
logits (in float32) and probabilities in HBM, forward and backward. For the MAE
decoder (197 tokens, 16 heads of 32) those tensors carry most of the decoder's
memory traffic and temporaries. The Pallas TPU kernel keeps them in VMEM.

The kernel needs the sequence to be a multiple of its 128-token blocks:
tokens are padded to the next multiple and the padding is masked with segment
ids (real tokens are segment 1, padding segment 0, and tokens attend only
within their segment), so the real tokens' outputs and gradients equal those of
unpadded attention. A Mosaic kernel is not partitioned by XLA's SPMD
partitioner, so under a mesh it runs in `jax.shard_map` over the batch axes
(data, fsdp) and, where the heads divide, the tensor axis.

On a CPU, `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` runs the same
kernel in interpret mode (tests/test_tpu_attention.py compares it with XLA's
attention).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mae_jax.parallel import BATCH_AXES

BLOCK = 128  # Tokens per kernel block (query and key), the kernel's default.
HEAD_AXIS = 'tensor'


def _padded_flash(q, k, v):
  """[B, T, H, D] -> [B, T, H, D] on one device's shard."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top
  batch, tokens, _, head_dim = q.shape
  padded = -(-tokens // BLOCK) * BLOCK

  def to_kernel(x):  # [B, T, H, D] -> [B, H, T_padded, D]
    return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - tokens), (0, 0)))

  segments = jnp.broadcast_to((jnp.arange(padded) < tokens).astype(jnp.int32), (batch, padded))
  blocks = fa.BlockSizes(
      block_q=BLOCK, block_k_major=BLOCK, block_k=BLOCK, block_b=1,
      block_q_major_dkv=BLOCK, block_k_major_dkv=BLOCK, block_k_dkv=BLOCK, block_q_dkv=BLOCK,
      block_k_major_dq=BLOCK, block_k_dq=BLOCK, block_q_dq=BLOCK)
  out = fa.flash_attention(to_kernel(q), to_kernel(k), to_kernel(v),
                           segment_ids=fa.SegmentIds(q=segments, kv=segments),
                           sm_scale=float(1.0 / np.sqrt(head_dim)), block_sizes=blocks)
  return out[:, :, :tokens].transpose(0, 2, 1, 3)


def _spec(shape, mesh):
  """PartitionSpec of a [B, T, H, D] array: batch over data x fsdp, heads over tensor (where they divide)."""
  batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if shape[0] % int(np.prod([mesh.shape[a] for a in batch_axes])):
    batch_axes = ()
  head_axis = HEAD_AXIS if HEAD_AXIS in mesh.axis_names and shape[2] % mesh.shape[HEAD_AXIS] == 0 else None
  return P(batch_axes or None, None, head_axis, None)


def flash_attention(q, k, v):
  """Softmax(q k^T / sqrt(D)) v for q, k, v of shape [batch, tokens, heads, head_dim]."""
  if not q.shape == k.shape == v.shape:
    raise ValueError(f'tpu_flash attention needs q, k, v of one shape, got {q.shape}, {k.shape}, {v.shape}')
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _padded_flash(q, k, v)
  spec = _spec(q.shape, mesh)
  sharded = jax.shard_map(_padded_flash, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                          check_vma=False)
  return sharded(q, k, v)


@functools.cache
def interpret_supported() -> bool:
  """Whether this JAX can run the TPU kernel in interpret mode (for tests on a CPU)."""
  try:
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return hasattr(pltpu, 'force_tpu_interpret_mode')
  except ImportError:
    return False
