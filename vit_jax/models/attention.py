"""Scaled dot-product attention with a selectable kernel, shared by the attention modules of every family.

'einsum' is the plain two-einsum path (works everywhere, supports attention-weight dropout); 'xla' and 'cudnn' call
`jax.nn.dot_product_attention` (cudnn: fused flash attention on NVIDIA GPUs, bf16/fp16 and head_dim <= 128 only).
All paths take the softmax in float32 and return the input dtype.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ('einsum', 'xla', 'cudnn')


def dot_product_attention(query: Array, key: Array, value: Array, *, bias: Optional[Array] = None,
                          mask: Optional[Array] = None, scale: Optional[float] = None,
                          implementation: str = 'einsum', dropout: Optional[Callable[[Array], Array]] = None) -> Array:
  """softmax(scale * q k^T + bias, masked) v for (B, Lq, H, Dh) queries and (B, Lk, H, Dh) keys/values.

  `scale` defaults to 1 / sqrt(head_dim). `bias` (float) and `mask` (bool, True = attend) broadcast to
  (B, H, Lq, Lk). `dropout` maps the attention weights to their dropped-out version; only the einsum path
  materialises the weights, so the fused paths refuse it (set the attention dropout rate to 0, or use
  implementation='einsum').
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS} '
                     '(config.model.attention_impl).')
  if implementation != 'einsum':
    if dropout is not None:
      raise ValueError(f'attention_impl={implementation!r} cannot drop out attention weights; set the attention '
                       "dropout rate to 0 or use attention_impl='einsum'.")
    return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, scale=scale,
                                        implementation=implementation)
  dtype = query.dtype
  if scale is None:
    query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
  elif scale != 1.0:
    query = query * jnp.asarray(scale, dtype)
  logits = jnp.einsum('bqhd,bkhd->bhqk', query, key).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  if dropout is not None:
    weights = dropout(weights)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, value)
