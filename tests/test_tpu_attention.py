"""The Pallas TPU flash attention (model.attention_impl='tpu_flash'), run in interpret mode on the CPU."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import default
from mae_jax import aot, parallel, pretrain_step, train_state
from mae_jax.models import tpu_attention, vit

pytestmark = pytest.mark.skipif(not tpu_attention.interpret_supported(),
                                reason='this JAX cannot run Pallas TPU kernels in interpret mode')


def interpret():
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.force_tpu_interpret_mode()


def qkv(shape, seed=0):
  return tuple(jax.random.normal(k, shape, jnp.float32) for k in jax.random.split(jax.random.key(seed), 3))


def loss_and_grads(fn, q, k, v):
  cotangent = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize('tokens', [5, 130])  # padded to one and to two 128-token blocks
def test_matches_xla_attention_forward_and_backward(tokens):
  q, k, v = qkv((2, tokens, 2, 32))
  with interpret():
    out = tpu_attention.flash_attention(q, k, v)
    loss, grads = loss_and_grads(tpu_attention.flash_attention, q, k, v)
  ref_loss, ref_grads = loss_and_grads(jax.nn.dot_product_attention, q, k, v)
  np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)


def test_padding_is_masked():
  """Padded keys get no weight: a query's output does not change when the tokens are doubled by padding."""
  q, k, v = qkv((1, 3, 1, 8), seed=1)
  with interpret():
    out = tpu_attention.flash_attention(q, k, v)
  weights = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(8), axis=-1)
  np.testing.assert_allclose(out, jnp.einsum('bhqk,bkhd->bqhd', weights, v), atol=1e-5)


# Two devices: interpret mode runs each device's kernel as host callbacks that meet at
# barriers, which more simulated devices than host threads can deadlock.
@pytest.mark.parametrize('mesh_shape', [{'num_devices': 2, 'data': 1, 'fsdp': 2, 'tensor': 1, 'dcn_data': 1},
                                        {'num_devices': 2, 'data': 1, 'fsdp': 1, 'tensor': 2, 'dcn_data': 1}])
def test_sharded_under_a_mesh(mesh_shape):
  """Under jax.set_mesh the kernel runs per device (shard_map over batch and heads) and equals XLA's attention."""
  mesh = parallel.create_mesh(ml_collections.ConfigDict(mesh_shape))
  q, k, v = qkv((4, 20, 4, 16), seed=2)
  sharding = jax.sharding.NamedSharding(mesh, P(('data', 'fsdp'), None, 'tensor', None))
  q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
  with interpret(), jax.set_mesh(mesh):
    loss, grads = jax.jit(functools.partial(loss_and_grads, tpu_attention.flash_attention))(q, k, v)
  ref_loss, ref_grads = loss_and_grads(jax.nn.dot_product_attention, q, k, v)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)


def test_attention_module_matches_xla():
  x = jax.random.normal(jax.random.key(3), (2, 17, 64), jnp.float32)
  xla = vit.Attention(num_heads=4, attention_impl='xla')
  params = xla.init(jax.random.key(4), x)
  with interpret():
    out = vit.Attention(num_heads=4, attention_impl='tpu_flash').apply(params, x)
  np.testing.assert_allclose(out, xla.apply(params, x), atol=2e-5, rtol=2e-5)


def tiny_config(image_size=32):
  config = default.get_config()
  config.model.name = 'mae_vit_test'
  config.dataset.image_size = image_size
  config.dataset.channels = 3
  config.batch_size = 16
  return config


def test_needs_a_tpu_backend():
  config = tiny_config()
  config.model.attention_impl = 'tpu_flash'
  with pytest.raises(ValueError, match=r"model.attention_impl='tpu_flash' needs a TPU backend.*'xla'"):
    pretrain_step.validate_config(config, parallel.create_mesh(config.mesh))
  config.model.attention_impl = 'cudnn'
  with pytest.raises(ValueError, match=r"model.attention_impl='cudnn' needs a GPU backend"):
    pretrain_step.validate_config(config, parallel.create_mesh(config.mesh))
  with pytest.raises(ValueError, match='must be one of'):
    vit.check_attention_platform('flash', 'tpu')


@pytest.mark.skipif(not aot.tpu_available()[0], reason='libtpu cannot make compile-only TPU devices here')
def test_compiles_for_a_tpu_slice():
  """The trainer's step with the kernel compiles for a 4-chip TPU slice, with no [B, H, T, T] tensor left."""
  config = tiny_config(image_size=64)  # 8x8 patches of 8: 64 tokens (+ cls) in the decoder
  config.model.dtype = 'bfloat16'
  config.model.attention_impl = 'tpu_flash'
  spec = aot.parse_topology('v5e:2x2')
  devices = aot.topology_devices(spec)
  config.batch_size = 8 * len(devices)
  mesh = parallel.create_mesh(config.mesh, devices)
  step = aot.make_train_step(config, mesh)
  with train_state.mesh_context(mesh):
    compiled = step.jitted.lower(step.abstract_state, step.abstract_batch).compile()
  text = compiled.as_text()
  assert 'tpu_custom_call' in text  # the Mosaic kernel
  tokens = 1 + (64 // 8) ** 2
  assert f',{tokens},{tokens}]' not in text  # no materialised attention logits or weights
