"""Softmax attention with a hand-written backward pass: `attention_impl='xla'` in blocks without remat.

The same function as `jax.nn.dot_product_attention` (no mask, no bias), in the
reference's order of operations (timm scales the queries before q @ k^T), with
fewer passes over the [batch, heads, queries, keys] tensors than the backward
pass that autodiff derives from the softmax:

  forward:  s = (q / sqrt(d)) k^T,  p = softmax(s) (float32),  o = p v
  backward: dv = p^T do,  dp = do v^T,  ds = p * (dp - rowsum(do * o)),
            dq = ds k / sqrt(d),  dk = ds^T (q / sqrt(d))

rowsum(do * o) equals rowsum(dp * p) and reads [queries, head_dim] values
instead of [queries, keys]. The probabilities, in the inputs' dtype, are the
only [queries, keys] residual. Inputs and output are [batch, tokens, heads,
head_dim]; the logits, the softmax and ds are float32 whatever the input
dtype, as `jax.nn.dot_product_attention` computes them.
"""

import jax
import jax.numpy as jnp
import numpy as np


def _heads_first(x):  # [B, T, N, D] -> [B, N, T, D]
  return jnp.swapaxes(x, 1, 2)


def _query_scale(q):  # 1 / sqrt(head_dim) in the queries' dtype
  return np.float32(1.0 / np.sqrt(q.shape[-1])).astype(q.dtype)


def _forward(q, k, v):
  """The output and the backward pass's residuals (the custom vjp's forward rule)."""
  qs = _heads_first(q * _query_scale(q))
  logits = jnp.einsum('bntd,bnsd->bnts', qs, _heads_first(k), preferred_element_type=jnp.float32)
  logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  unnormalized = jnp.exp(logits)
  probs = unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)
  probs = probs.astype(v.dtype)  # kept for the backward pass in the inputs' dtype, as autodiff keeps it
  out = jnp.einsum('bnts,bnsd->bntd', probs, _heads_first(v))
  return _heads_first(out), (qs, k, v, probs, out)


@jax.custom_vjp
def dot_product_attention(q, k, v):
  """softmax(q k^T / sqrt(head_dim)) v for [batch, tokens, heads, head_dim] inputs."""
  return _forward(q, k, v)[0]


def _bwd(residuals, d_out):
  qs, k, v, probs, out = residuals  # qs, out: heads first
  d_out = _heads_first(d_out)  # the output's dtype, v's
  d_v = jnp.einsum('bnts,bntd->bnsd', probs, d_out)
  d_probs = jnp.einsum('bntd,bnsd->bnts', d_out, _heads_first(v), preferred_element_type=jnp.float32)
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = (probs.astype(jnp.float32) * (d_probs - row)).astype(qs.dtype)
  d_q = jnp.einsum('bnts,bnsd->bntd', d_logits, _heads_first(k)) * _query_scale(qs)
  d_k = jnp.einsum('bnts,bntd->bnsd', d_logits, qs)
  return _heads_first(d_q), _heads_first(d_k), _heads_first(d_v)


dot_product_attention.defvjp(_forward, _bwd)
