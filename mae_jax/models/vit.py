"""Vision Transformer: pre-norm blocks, the encoder, and a classifier on top.

Layer names follow the reference ViT (`patch_embed`, `cls_token`, `blocks_{i}`
with `norm1`, `attn`, `norm2`, `mlp`, then `norm`) so weight conversion is a
renaming. With `scan_layers` the blocks are one `nn.scan` named `blocks` whose
parameters carry a leading [depth] axis.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.models import attention as attention_ops
from mae_jax.models import pos_embed as pos_tables
from mae_jax.models import tpu_attention
from mae_jax.parallel import BATCH_AXES

Dtype = Any

LAYER_NORM_EPS = 1e-6
ATTENTION_IMPLS = ('xla', 'cudnn', 'tpu_flash', 'naive')
# The device platform each fused implementation runs on (the others run anywhere).
ATTENTION_PLATFORMS = {'cudnn': 'gpu', 'tpu_flash': 'tpu'}
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Reference init: xavier-uniform for every Dense. A fused qkv [D, 3D] matrix is
# one xavier matrix; with separate q/k/v [D, D] kernels that is fan_avg scale 0.5.
dense_init = nn.initializers.xavier_uniform()
qkv_init = nn.initializers.variance_scaling(0.5, 'fan_avg', 'uniform')
# Patch embedding: xavier-uniform on the [p*p*C, D] view of the HWIO kernel.
patch_embed_init = nn.initializers.variance_scaling(
    1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2), out_axis=3)
token_init = nn.initializers.normal(stddev=0.02)
# A learned position table without a checkpoint (fine-tuning from scratch): timm's
# trunc_normal_(std=.02), whose bounds are +-2 absolute (100 std), i.e. a plain normal(0.02).
learned_pos_init = nn.initializers.normal(stddev=0.02)


def head_init(std: float) -> nn.initializers.Initializer:
  """timm's trunc_normal_(std=std) of the classifier and probe heads: cut at +-2 absolute, not +-2 std.

  (flax's truncated_normal(std) cuts at +-2 std, which narrows the draw to 0.88 std.)
  """
  if std <= 0:
    return nn.initializers.zeros  # std 0: a zero head (no draw at all).
  return nn.initializers.truncated_normal(std, lower=-2.0 / std, upper=2.0 / std)


def canonical_dtype(dtype) -> jnp.dtype:
  """Accepts 'bfloat16', 'float32', jnp.bfloat16, ... and returns a jnp.dtype."""
  try:
    canonical = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f'model.dtype={dtype!r}: must be float32, bfloat16 or float16') from e
  if not jnp.issubdtype(canonical, jnp.floating):
    raise ValueError(f'model.dtype={dtype!r}: must be float32, bfloat16 or float16')
  return canonical


def check_attention_platform(attention_impl: str, platform: str, prefix: str = 'model.') -> None:
  """Raises ValueError when a fused attention implementation cannot run on `platform`."""
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f'{prefix}attention_impl={attention_impl!r}: must be one of {ATTENTION_IMPLS}')
  needs = ATTENTION_PLATFORMS.get(attention_impl)
  if needs and platform != needs:
    raise ValueError(f'{prefix}attention_impl={attention_impl!r} needs a {needs.upper()} backend and the devices '
                     f"here are {platform!r}: use {prefix}attention_impl='xla'")


def check_vit_settings(image_size, patch_size, embed_dim, num_heads, prefix=''):
  """Raises ValueError naming the setting when shapes cannot work."""
  sizes = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  for s in sizes:
    if s % patch_size:
      raise ValueError(
          f'{prefix}image_size={image_size} is not divisible by patch_size={patch_size}: '
          f'use an image size that is a multiple of {patch_size}')
  if embed_dim % num_heads:
    raise ValueError(
        f'{prefix}embed_dim={embed_dim} is not divisible by num_heads={num_heads}')
  if embed_dim % 4:
    raise ValueError(f'{prefix}embed_dim={embed_dim}: must be divisible by 4 (2D sin-cos table)')



def constrain_batch(x):
  """Keeps activations split over the mesh's batch axes (data, fsdp) when a mesh is set.

  Without it, FSDP-sharded weights inside a scanned stack can lead the
  partitioner to gather the batch instead of the weights.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  if not axes or x.shape[0] % size:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def drop_path(x, rate, deterministic: bool, rng_fn: Callable[[], jax.Array]):
  """Stochastic depth: drops the whole residual branch per example."""
  if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
    return x
  keep_prob = 1.0 - rate
  keep = jax.random.bernoulli(rng_fn(), keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


def rows_product(inputs, kernel, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """nn.Dense's inputs [..., K] x kernel [K, F]: as one [rows, K] x [K, F] matmul on CPUs, as it is elsewhere.

  Differentiated over [batch, tokens, width], the weight gradient contracts two
  axes, which XLA:CPU lowers as a transposed copy of the output gradient and a
  slower matmul; over [batch * tokens, width] it is one matmul of the stored
  arrays (ViT-B/16 MAE step on two CPU cores: 2.52 -> 2.42-2.50 s,
  BENCHMARKS.md). On TPUs the flattening costs relayout copies (B/16 on v5e-4:
  temporaries 1.87 -> 2.11 GiB), so other platforms keep the product. The
  choice is made for the platform the step is lowered for
  (`lax.platform_dependent`), also when a CPU host compiles for a TPU.
  """
  (lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch) = dimension_numbers
  if tuple(map(tuple, (lhs_contracting, rhs_contracting, lhs_batch, rhs_batch))) != ((inputs.ndim - 1,), (0,), (), ()):
    raise ValueError(f'rows_product computes nn.Dense products only, not dimension numbers {dimension_numbers}')
  product = functools.partial(jax.lax.dot_general, precision=precision,  # kwargs: what a newer flax may pass.
                              preferred_element_type=preferred_element_type, **kwargs)

  def as_is(x, w):
    return product(x, w, dimension_numbers)

  def rows(x, w):
    out = product(x.reshape(-1, x.shape[-1]), w, (((1,), (0,)), ((), ())))
    return out.reshape(*x.shape[:-1], w.shape[-1])

  if inputs.ndim <= 2:
    return as_is(inputs, kernel)
  return jax.lax.platform_dependent(inputs, kernel, cpu=rows, default=as_is)


def dense_product(rematerialised: bool):
  """The Dense product of a block: nn.Dense's own under a remat policy (see Dense), else rows_product."""
  return None if rematerialised else rows_product


class Dense(nn.Dense):
  """nn.Dense (the same parameters, values and names) whose product is, by default, `rows_product`.

  Blocks under a remat policy pass dot_general=None, nn.Dense's own product: a
  remat policy does not see the matmuls inside the platform switch, so 'dots'
  would not save them (H/14 with remat 'dots' on v4-128: 230.2 GB per chip per
  step against 228.2 GB).
  """
  dot_general: Callable | None = rows_product


class Attention(nn.Module):
  """Multi-head self-attention with separate q/k/v projections.

  attention_impl='xla' is `attention.dot_product_attention` (hand-written
  backward pass), except in rematerialised blocks: a remat policy cannot save
  what a custom vjp keeps, so there JAX's differentiated
  `jax.nn.dot_product_attention` runs, whose saved matmul outputs the policies
  know (H/14 with remat 'dots' on v4-128: 228.3 GB per chip per step against
  236.5 GB with the custom pass; BENCHMARKS.md).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  attention_impl: str = 'xla'
  rematerialised: bool = False

  @nn.compact
  def __call__(self, x):  # [batch, tokens, width]
    batch, tokens, width = x.shape
    head_dim = width // self.num_heads
    dense = functools.partial(Dense, dtype=self.dtype, dot_general=dense_product(self.rematerialised))
    split = lambda t: t.reshape(batch, tokens, self.num_heads, head_dim)
    q = split(dense(width, kernel_init=qkv_init, name='query')(x))
    k = split(dense(width, kernel_init=qkv_init, name='key')(x))
    v = split(dense(width, kernel_init=qkv_init, name='value')(x))
    if self.attention_impl == 'naive':
      logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
      weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    elif self.attention_impl == 'tpu_flash':
      out = tpu_attention.flash_attention(q, k, v)
    elif self.attention_impl == 'xla' and not self.rematerialised:
      out = attention_ops.dot_product_attention(q, k, v)
    else:
      out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
    out = out.reshape(batch, tokens, width)
    return dense(width, kernel_init=dense_init, name='proj')(out)


def _normal_cdf(x):
  return 0.5 * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


@jax.custom_jvp
def gelu(x):
  """Exact GELU as PyTorch computes it, x/2 (1 + erf(x/sqrt(2))), with a one-pass derivative."""
  return x * _normal_cdf(x)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  cdf = _normal_cdf(x)
  pdf = jnp.exp(-0.5 * x * x) * np.sqrt(0.5 / np.pi).astype(x.dtype)
  return x * cdf, (cdf + x * pdf) * x_dot


class Mlp(nn.Module):
  """Two Dense layers with exact (erf) GELU."""
  hidden_dim: int
  dtype: Dtype = jnp.float32
  rematerialised: bool = False  # see Dense

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    dense = functools.partial(Dense, dtype=self.dtype, kernel_init=dense_init,
                              dot_general=dense_product(self.rematerialised))
    x = gelu(dense(self.hidden_dim, name='fc1')(x))
    return dense(width, name='fc2')(x)


class Block(nn.Module):
  """Pre-norm transformer block. `drop_path_rate` may be a traced scalar (scan)."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  attention_impl: str = 'xla'
  deterministic: bool = True
  rematerialised: bool = False  # set by apply_blocks under a remat policy (see Attention)

  @nn.compact
  def __call__(self, x, drop_path_rate=0.0):
    norm = functools.partial(nn.LayerNorm, epsilon=LAYER_NORM_EPS, dtype=self.dtype)
    rng_fn = lambda: self.make_rng('dropout')
    x = constrain_batch(x)
    y = Attention(self.num_heads, self.dtype, self.attention_impl, self.rematerialised,
                  name='attn')(norm(name='norm1')(x))
    x = x + drop_path(y, drop_path_rate, self.deterministic, rng_fn)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, self.rematerialised, name='mlp')(norm(name='norm2')(x))
    return constrain_batch(x + drop_path(y, drop_path_rate, self.deterministic, rng_fn))


def check_return_layers(return_layers, depth: int) -> tuple[int, ...]:
  """Block indices (0-based, negative from the end) as non-negative ints; a clear error if out of range."""
  layers = tuple(int(i) for i in return_layers)
  bad = [i for i in layers if not -depth <= i < depth]
  if bad:
    raise ValueError(f'return_layers={layers}: block indices must be in [{-depth}, {depth - 1}] for an '
                     f'encoder of depth {depth} (0 is the first block\'s output, -1 the last)')
  return tuple(i % depth for i in layers)


def apply_blocks(x, *, depth, num_heads, mlp_ratio, dtype, attention_impl, deterministic,
                 drop_path_rate=0.0, remat_policy='none', scan_layers=False, name='blocks',
                 return_layers=None):
  """Runs `depth` blocks on x; must be called inside a compact module.

  With `return_layers` (0-based block indices), returns (x, [the output of each
  listed block]) instead of x.
  """
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f'model.remat_policy={remat_policy!r}: must be one of {sorted(REMAT_POLICIES)}')
  block_cls = Block
  if remat_policy != 'none':
    block_cls = nn.remat(Block, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan_layers)
  use_drop_path = drop_path_rate > 0 and not deterministic  # needs a 'dropout' rng
  kwargs = dict(num_heads=num_heads, mlp_ratio=mlp_ratio, dtype=dtype, attention_impl=attention_impl,
                deterministic=not use_drop_path, rematerialised=remat_policy != 'none')
  rates = np.linspace(0.0, drop_path_rate, depth, dtype=np.float32)  # Stochastic depth grows with depth.
  if scan_layers:
    keep = return_layers is not None

    def body(module, carry, rate):
      out = module(carry, rate)
      return out, (out if keep else None)

    scanned = nn.scan(body, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': use_drop_path},
                      in_axes=0, length=depth)
    x, every = scanned(block_cls(**kwargs, name=name), x, jnp.asarray(rates))
    if return_layers is None:
      return x
    return x, [every[i] for i in return_layers]
  outputs = []
  for i in range(depth):
    rate = float(rates[i]) if drop_path_rate else 0.0
    x = block_cls(**kwargs, name=f'{name}_{i}')(x, rate)
    outputs.append(x)
  if return_layers is None:
    return x
  return x, [outputs[i] for i in return_layers]


class VisionTransformer(nn.Module):
  """ViT encoder: patch embedding, positions, cls token, blocks, norm.

  `pos_embed='sincos'` (the MAE encoder, linear probing) adds the fixed 2D
  sin-cos table, a constant; `pos_embed='learned'` (fine-tuning, as timm's ViT)
  adds the parameter `pos_embed` [1, 1 + L, D] (cls entry first) for the grid
  of `image_size`, initialised normal(0.02) as timm's, and replaced by the
  checkpoint's table when one is loaded (`weights.load_pretrained_encoder`).

  `__call__(images, train, mask_fn)` returns (tokens, aux). `mask_fn(x, pos)`,
  if given, receives the patch tokens with positions added [N, L, D] and the
  [1 + L, D] table, and returns (kept tokens, aux); the cls token is prepended
  after it, as in the reference. With `return_layers` (0-based block indices),
  it returns (tokens, aux, [each listed block's output tokens, cls first]):
  block outputs before the final norm, as Hugging Face's `hidden_states[i + 1]`.
  """
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  image_size: Any = 224
  in_channels: int = 3
  dtype: Dtype = jnp.float32
  drop_path_rate: float = 0.0
  remat_policy: str = 'none'
  scan_layers: bool = False
  attention_impl: str = 'xla'
  final_norm: bool = True
  pos_embed: str = 'sincos'  # sincos (fixed) | learned (a parameter)

  def __post_init__(self):
    check_vit_settings(self.image_size, self.patch_size, self.embed_dim, self.num_heads)
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'model.attention_impl={self.attention_impl!r}: must be one of {ATTENTION_IMPLS}')
    if self.pos_embed not in pos_tables.POS_EMBED_KINDS:
      raise ValueError(f'pos_embed={self.pos_embed!r}: must be one of {pos_tables.POS_EMBED_KINDS}')
    super().__post_init__()

  @property
  def grid_size(self) -> tuple[int, int]:
    h, w = pos_tables.as_grid(self.image_size)
    return h // self.patch_size, w // self.patch_size

  @nn.compact
  def __call__(self, images, *, train: bool = False, mask_fn=None, return_layers=None):
    dtype = canonical_dtype(self.dtype)
    if return_layers is not None:
      return_layers = check_return_layers(return_layers, self.depth)
    if images.ndim != 4 or images.shape[-1] != self.in_channels:
      raise ValueError(f'images of shape {images.shape}: expected [N, H, W, {self.in_channels}] (NHWC)')
    if images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
      raise ValueError(f'image size {images.shape[1:3]} is not divisible by patch_size={self.patch_size}')
    x = nn.Conv(self.embed_dim, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding='VALID', dtype=dtype, kernel_init=patch_embed_init,
                name='patch_embed')(images.astype(dtype))
    n, grid_h, grid_w, width = x.shape
    x = x.reshape(n, grid_h * grid_w, width)  # [N, L, D]
    if self.pos_embed == 'learned':
      if (grid_h, grid_w) != self.grid_size:
        raise ValueError(f'images of size {images.shape[1:3]} make a {grid_h}x{grid_w} patch grid, but the learned '
                         f'position table is for image_size={self.image_size} ({self.grid_size[0]}x'
                         f'{self.grid_size[1]}): set dataset.image_size to the size of the images')
      pos = self.param('pos_embed', learned_pos_init, (1, 1 + grid_h * grid_w, width), jnp.float32)[0]
    else:
      pos = jnp.asarray(pos_tables.get_2d_sincos_pos_embed(width, (grid_h, grid_w), cls_token=True))
    x = x + pos[1:].astype(x.dtype)
    aux = None
    if mask_fn is not None:
      x, aux = mask_fn(x, pos)
    cls = self.param('cls_token', token_init, (1, 1, width), jnp.float32) + pos[:1]
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, width)).astype(x.dtype), x], axis=1)
    x = apply_blocks(x, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                     dtype=dtype, attention_impl=self.attention_impl, deterministic=not train,
                     drop_path_rate=self.drop_path_rate, remat_policy=self.remat_policy,
                     scan_layers=self.scan_layers, return_layers=return_layers)
    layers = None
    if return_layers is not None:
      x, layers = x
    if self.final_norm:
      x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, name='norm')(x)
    return (x, aux) if layers is None else (x, aux, layers)


class ViTClassifier(nn.Module):
  """Fine-tuning model: encoder, then global average pool + fc_norm (or cls), then head."""
  num_classes: int
  encoder: dict  # VisionTransformer fields.
  global_pool: bool = True
  head_init_std: float = 2e-5

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_features: bool = False):
    tokens, _ = VisionTransformer(**self.encoder, final_norm=not self.global_pool,
                                  name='encoder')(images, train=train)
    if self.global_pool:
      features = tokens[:, 1:].mean(axis=1)
      features = nn.LayerNorm(epsilon=LAYER_NORM_EPS, name='fc_norm')(features.astype(jnp.float32))
    else:
      features = tokens[:, 0].astype(jnp.float32)
    logits = nn.Dense(self.num_classes, kernel_init=head_init(self.head_init_std),
                      name='head')(features)
    return (logits, features) if return_features else logits
