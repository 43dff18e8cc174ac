"""Building blocks shared by the transformer families.

Parameter names and shapes follow the official flax ViT code, so published checkpoints load without renaming.
Every module takes `dtype`, the compute dtype; parameters always stay float32.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import attention

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


class MlpBlock(nn.Module):
  """Transformer feed-forward block: Dense_0 -> GELU -> dropout -> Dense_1 -> dropout.

  `gelu_approximate=True` is the tanh approximation used by the official JAX ViT; timm (PyTorch) weights need
  the exact erf GELU (`False`).
  """
  mlp_dim: int
  out_dim: Optional[int] = None  # Defaults to the input width.
  dropout_rate: float = 0.0
  gelu_approximate: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.normal(stddev=1e-6)

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    out_dim = self.out_dim or x.shape[-1]
    dense = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=self.kernel_init, bias_init=self.bias_init)
    x = nn.Dense(self.mlp_dim, name='Dense_0', **dense)(x)
    x = nn.gelu(x, approximate=self.gelu_approximate)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(out_dim, name='Dense_1', **dense)(x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


class DropPath(nn.Module):
  """Stochastic depth: zeroes whole residual branches per example (rescaling survivors by 1/keep).

  Draws from the 'dropout' rng; the identity when `deterministic` or `rate == 0`.
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f'DropPath rate must be in [0, 1), got {self.rate}.')
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention with flax's `nn.MultiHeadDotProductAttention` parameter tree.

  Submodules `query`, `key`, `value` (kernel (D, heads, head_dim), bias (heads, head_dim)) and `out`
  (kernel (heads, head_dim, D), bias (D,)). Our own module so the attention kernel and sharding can be swapped
  without renaming parameters. Softmax runs in float32 whatever `dtype` is; attention-weight dropout is
  per element (as the official ViT's `broadcast_dropout=False`). `attention_impl` picks the kernel
  (`attention.IMPLEMENTATIONS`: 'einsum', 'xla', 'cudnn').
  """
  num_heads: int
  qkv_features: Optional[int] = None  # Defaults to the query input width.
  out_features: Optional[int] = None  # Defaults to the query input width.
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Optional[Array] = None, *, mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """`inputs_q` (B, Lq, D), `inputs_kv` (B, Lk, Dkv) or None for self-attention; `mask` broadcasts to
    (B, heads, Lq, Lk), True = attend."""
    if inputs_kv is None:
      inputs_kv = inputs_q
    features = self.qkv_features or inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(f'Attention width {features} is not divisible by num_heads={self.num_heads}.')
    head_dim = features // self.num_heads
    dense = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=self.kernel_init,
                 bias_init=self.bias_init)
    proj = lambda name: nn.DenseGeneral((self.num_heads, head_dim), axis=-1, name=name, **dense)
    q = proj('query')(inputs_q)  # (B, Lq, H, Dh)
    k = proj('key')(inputs_kv)
    v = proj('value')(inputs_kv)

    dropout = None
    if self.dropout_rate > 0 and not deterministic:
      dropout = lambda w: nn.Dropout(rate=self.dropout_rate)(w, deterministic=False)
    x = attention.dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl, dropout=dropout)

    out_features = self.out_features or inputs_q.shape[-1]
    return nn.DenseGeneral(out_features, axis=(-2, -1), name='out', **dense)(x)


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision): a learned probe token attends over the sequence.

  Returns (B, D): x + MLP(LN(x)) for the attended probe x. Names match big_vision checkpoints: `probe`,
  `MultiHeadDotProductAttention_0`, `LayerNorm_0`, `MlpBlock_0`.
  """
  num_heads: int
  mlp_dim: Optional[int] = None  # Defaults to 4x the width.
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, _, d = x.shape
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, d), jnp.float32)
    probe = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d))
    x = MultiHeadAttention(num_heads=self.num_heads, dtype=self.dtype, attention_impl=self.attention_impl,
                           name='MultiHeadDotProductAttention_0')(probe, x)
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name='LayerNorm_0')(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim or 4 * d, gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                     name='MlpBlock_0')(y)
    return x[:, 0]
