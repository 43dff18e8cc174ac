"""BiT ResNet stem of the hybrid ViTs (R+ViT-Ti/16, R26+ViT-S/32, R50+ViT-B/16, ...).

Follows google-research/vision_transformer (models_resnet.py and the `resnet` branch of models_vit.py):
weight-standardised convolutions (eps 1e-5, added to the std), GroupNorm with 32 groups, a 7x7/2 root conv and
3x3/2 max pool, then pre-activation-free bottleneck units (ResNet v1.5: stride on the 3x3 conv). Parameter
names are the official ones: `conv_root`, `gn_root`, `block{i}/unit{j}/{conv1,conv2,conv3,conv_proj}`,
`block{i}/unit{j}/{gn1,gn2,gn3,gn_proj}`. `ResNetStem` shares its parent's scope when the parent calls
`nn.share_scope`, so in the ViT these names sit at the top level of the params, as in the official files.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

WS_EPS = 1e-5  # Weight-standardisation epsilon of the official code (added to the std, not the variance).


# Numerics of the stem's normalisations: (weight-standardisation eps, eps inside the sqrt?, GroupNorm eps).
# 'official': google-research/vision_transformer, (w - mean) / (std + 1e-5) and flax's GroupNorm eps 1e-6.
# 'timm': timm's ResNetV2 for the hybrids, (w - mean) / sqrt(var + 1e-8) (StdConv2dSame eps=1e-8) and GroupNorm eps
# 1e-5; use it to reproduce timm's logits from timm-converted weights (the gap is ~1e-2 on a random R50+B/16).
NORM_STYLES = {'official': (WS_EPS, False, 1e-6), 'timm': (1e-8, True, 1e-5)}


def weight_standardize(w: Array, axis: Sequence[int] = (0, 1, 2), eps: float = WS_EPS, *,
                       eps_in_sqrt: bool = False) -> Array:
  """(w - mean) / (std + eps) (or / sqrt(var + eps)) over the kernel's spatial and input axes (HWIO: all but O)."""
  w = w - jnp.mean(w, axis=tuple(axis))
  if eps_in_sqrt:
    return w / jnp.sqrt(jnp.var(w, axis=tuple(axis)) + eps)
  return w / (jnp.std(w, axis=tuple(axis)) + eps)


class StdConv(nn.Conv):
  """nn.Conv whose kernel is weight-standardised on every call; the stored parameter stays raw."""
  norm_style: str = 'official'

  def param(self, name: str, init_fn: Callable[..., Any], *init_args, **init_kwargs) -> Any:
    value = super().param(name, init_fn, *init_args, **init_kwargs)
    if name == 'kernel':
      eps, in_sqrt, _ = _norm_style(self.norm_style)
      value = weight_standardize(value.astype(jnp.float32), eps=eps, eps_in_sqrt=in_sqrt).astype(value.dtype)
    return value


def _norm_style(style: str) -> tuple[float, bool, float]:
  if style not in NORM_STYLES:
    raise ValueError(f'Unknown resnet norm style {style!r}; expected one of {sorted(NORM_STYLES)}.')
  return NORM_STYLES[style]


def _gn(name: str, dtype: Any, style: str = 'official', **kw) -> nn.GroupNorm:
  # Official: flax defaults (32 groups, epsilon 1e-6).
  return nn.GroupNorm(num_groups=32, epsilon=_norm_style(style)[2], dtype=dtype, param_dtype=jnp.float32, name=name,
                      **kw)


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1 (x4), GroupNorm + ReLU, projection shortcut when needed."""
  features: int
  strides: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32
  norm_style: str = 'official'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = dict(use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, norm_style=self.norm_style)
    gn = lambda name, **kw: _gn(name, self.dtype, self.norm_style, **kw)
    residual = x
    if x.shape[-1] != self.features * 4 or tuple(self.strides) != (1, 1):
      residual = StdConv(self.features * 4, (1, 1), strides=self.strides, name='conv_proj', **conv)(residual)
      residual = gn('gn_proj')(residual)
    y = StdConv(self.features, (1, 1), name='conv1', **conv)(x)
    y = nn.relu(gn('gn1')(y))
    y = StdConv(self.features, (3, 3), strides=self.strides, name='conv2', **conv)(y)
    y = nn.relu(gn('gn2')(y))
    y = StdConv(self.features * 4, (1, 1), name='conv3', **conv)(y)
    y = gn('gn3', scale_init=nn.initializers.zeros)(y)  # Zero-init: each unit starts as identity.
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`block_size` bottleneck units (`unit1` ... ) of width `nout` (output 4 * nout); the first is strided."""
  block_size: int
  nout: int
  first_stride: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32
  norm_style: str = 'official'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    unit = dict(dtype=self.dtype, norm_style=self.norm_style)
    x = ResidualUnit(self.nout, strides=tuple(self.first_stride), name='unit1', **unit)(x)
    for i in range(1, self.block_size):
      x = ResidualUnit(self.nout, strides=(1, 1), name=f'unit{i + 1}', **unit)(x)
    return x


class ResNetStem(nn.Module):
  """Root (conv 7x7/2, GroupNorm, ReLU, max pool 3x3/2) plus `len(num_layers)` stages.

  num_layers: units per stage; () keeps only the root (output stride 4, width 64 * width_factor). Stage i
  (from 0) has width 64 * width_factor * 2**i (output 4x that) and stride 2 except the first, so the output
  stride is 4 * 2**(len(num_layers) - 1) for a non-empty `num_layers`.
  """
  num_layers: tuple[int, ...] = ()
  width_factor: float = 1
  dtype: Any = jnp.float32
  norm_style: str = 'official'  # See NORM_STYLES.

  @property
  def width(self) -> int:
    return int(64 * self.width_factor)

  @property
  def stride(self) -> int:
    return 4 * 2 ** max(len(self.num_layers) - 1, 0)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = self.width
    x = StdConv(width, (7, 7), strides=(2, 2), use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                norm_style=self.norm_style, name='conv_root')(x)
    x = nn.relu(_gn('gn_root', self.dtype, self.norm_style)(x))
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
    for i, block_size in enumerate(self.num_layers):
      x = ResNetStage(block_size=block_size, nout=width * 2 ** i, first_stride=(2, 2) if i else (1, 1),
                      dtype=self.dtype, norm_style=self.norm_style, name=f'block{i + 1}')(x)
    return x
