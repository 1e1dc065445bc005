"""The hand-written attention backward (attention_impl='xla') and the exact GELU against autodiff and PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mae_jax.models import attention, vit


def autodiff_attention(q, k, v):
  """The textbook attention, differentiated by JAX: the reference for the custom backward pass."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


def _inputs(dtype, shape=(2, 37, 3, 16), scale=2.0):
  rng = np.random.default_rng(0)
  return [jnp.asarray(scale * rng.standard_normal(shape), dtype) for _ in range(4)]


def _value_and_grads(fn, q, k, v, cotangent):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(cotangent))


def test_matches_autodiff_in_float32():
  q, k, v, cotangent = _inputs(jnp.float32)
  got = jax.jit(lambda *a: _value_and_grads(attention.dot_product_attention, *a))(q, k, v, cotangent)
  want = _value_and_grads(autodiff_attention, q, k, v, cotangent)
  for name, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-5, err_msg=name)
  # Also equal to JAX's own dot_product_attention.
  np.testing.assert_allclose(got[0], jax.nn.dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_bfloat16_error_is_that_of_bfloat16():
  """In bfloat16 the custom pass is as close to the float32 truth as autodiff's bfloat16 pass."""
  inputs = _inputs(jnp.float32, shape=(4, 50, 4, 32))
  truth = _value_and_grads(autodiff_attention, *inputs)
  low = [x.astype(jnp.bfloat16) for x in inputs]
  rel = lambda a, t: float(jnp.linalg.norm(a.astype(jnp.float32) - t) / jnp.linalg.norm(t))
  ours = [rel(a, t) for a, t in zip(_value_and_grads(attention.dot_product_attention, *low), truth)]
  autodiff = [rel(a, t) for a, t in zip(_value_and_grads(autodiff_attention, *low), truth)]
  assert all(o.dtype == jnp.bfloat16 for o in _value_and_grads(attention.dot_product_attention, *low))
  for name, o, a in zip(('out', 'dq', 'dk', 'dv'), ours, autodiff):
    assert o < 1.25 * a + 1e-3, (name, ours, autodiff)


def test_under_remat_and_in_the_block():
  """The custom vjp composes with jax.checkpoint and every remat policy; a Block on it has autodiff's gradients."""
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 9, 32)), jnp.float32)
  block = lambda impl: vit.Block(num_heads=4, attention_impl=impl)
  params = block('naive').init(jax.random.PRNGKey(0), x)
  def loss(impl, policy):
    apply = block(impl).apply if policy == 'no remat' else jax.checkpoint(block(impl).apply, policy=policy)
    return lambda p: jnp.sum(apply(p, x) ** 2)
  want = jax.grad(loss('naive', 'no remat'))(params)
  for policy in ('no remat', None, *vit.REMAT_POLICIES.values()):
    got = jax.grad(loss('xla', policy))(params)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5), got, want)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_gelu_is_pytorchs(dtype):
  x = np.linspace(-10, 10, 20001).astype(np.float32)
  x_low = np.array(jnp.asarray(x, dtype).astype(jnp.float32))  # the values the dtype can hold (a writable copy)
  xt = torch.from_numpy(x_low).to(torch.float32 if dtype == jnp.float32 else torch.bfloat16).requires_grad_()
  yt = torch.nn.functional.gelu(xt)
  yt.sum().backward()
  y, grad = jax.value_and_grad(lambda z: jnp.sum(vit.gelu(z).astype(jnp.float32)))(jnp.asarray(x_low, dtype))
  del y
  tol = dict(atol=2e-6, rtol=2e-6) if dtype == jnp.float32 else dict(atol=2e-2, rtol=1e-2)
  np.testing.assert_allclose(np.asarray(vit.gelu(jnp.asarray(x_low, dtype)), np.float32),
                             yt.detach().float().numpy(), **tol)
  np.testing.assert_allclose(np.asarray(grad, np.float32), xt.grad.float().numpy(), **tol)


@pytest.mark.parametrize('remat_policy', ['none', 'dots'])
def test_rematerialised_blocks_use_the_differentiated_attention(remat_policy):
  """A remat policy cannot save what a custom vjp keeps, nor see into a platform switch: remat blocks run JAX's
  differentiated attention and nn.Dense's own product (vit.Dense with dot_general=None)."""

  class Stack(vit.nn.Module):
    @vit.nn.compact
    def __call__(self, x):
      return vit.apply_blocks(x, depth=2, num_heads=2, mlp_ratio=2.0, dtype=jnp.float32, attention_impl='xla',
                              deterministic=True, remat_policy=remat_policy)

  x = jnp.ones((1, 5, 8), jnp.float32)
  params = Stack().init(jax.random.PRNGKey(0), x)
  jaxpr = str(jax.make_jaxpr(Stack().apply)(params, x))
  assert ('custom_vjp_call' in jaxpr) == (remat_policy == 'none')
  assert ('platform_index' in jaxpr) == (remat_policy == 'none')
