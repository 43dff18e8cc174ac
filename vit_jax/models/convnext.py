"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s"), laid out like timm's `convnext.py`.

Parameter names mirror timm so that a timm state dict maps onto these modules with a short table:

  stem/conv, stem/norm                          timm stem.0 (4x4 stride-4 conv), stem.1 (LayerNorm)
  stages_{i}/downsample/{norm,conv}             timm stages.{i}.downsample.0 / .1 (LayerNorm, 2x2 stride-2 conv)
  stages_{i}/blocks_{j}/conv_dw                 timm ...conv_dw (7x7 depthwise, padding 3)
  stages_{i}/blocks_{j}/norm                    timm ...norm (channels-last LayerNorm)
  stages_{i}/blocks_{j}/mlp/Dense_{0,1}         timm ...mlp.fc1 / mlp.fc2 (pointwise, exact GELU)
  stages_{i}/blocks_{j}/gamma                   timm ...gamma (layer scale, initialised to 1e-6)
  head_norm, head                               timm head.norm (LayerNorm of the pooled features), head.fc

Every LayerNorm has epsilon 1e-6; there is no BatchNorm. A block is x + DropPath(gamma * MLP(LN(dwconv(x)))); the
head mean-pools the last stage map, normalises it and classifies (timm's `NormMlpClassifierHead` without a hidden
layer). forward_features returns the last stage map unnormalised, as timm (its `norm_pre` is the identity).

Inputs are NHWC images; every stage map must be non-empty (`check_input_size`). Sizes divisible by
patch_size * 2**(stages - 1) give strides exactly 4, 8, 16, 32; others round down, as PyTorch's convs do.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import facts
from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models.conv import Conv
from vit_jax.models.layers import DropPath, constrain, logical

Array = jax.Array

LN_EPS = 1e-6
LAYER_SCALE_INIT = 1e-6
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
_zeros = nn.initializers.zeros
_MAP = ('batch', 'height', 'width', 'embed')  # Logical axes of an NHWC feature map.


def _conv(features: int, kernel: int, *, stride: int = 1, groups: int = 1, dtype: Any, name: str) -> nn.Conv:
  """timm-initialised conv (trunc-normal 0.02 kernel, zero bias) with PyTorch's symmetric padding kernel // 2 for
  odd kernels and none for the patchifying (kernel == stride) convs."""
  pad = 'VALID' if kernel == stride else ((kernel // 2, kernel // 2),) * 2
  return Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, feature_group_count=groups,
              dtype=dtype, kernel_init=logical(_trunc_normal, (None, None, None, 'embed')),
              bias_init=logical(_zeros, ('embed',)), name=name)


class ConvNeXtBlock(nn.Module):
  """x + DropPath(gamma * Linear(GELU(Linear(LN(dwconv7x7(x)))))) on an NHWC map."""
  mlp_ratio: float = 4.0
  layer_scale_init: float = LAYER_SCALE_INIT
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    dim = x.shape[-1]
    x = constrain(x, _MAP)
    y = _conv(dim, 7, groups=dim, dtype=self.dtype, name='conv_dw')(x)
    y = layers.layer_norm('norm', epsilon=LN_EPS, dtype=self.dtype)(y)
    b, h, w, _ = y.shape  # The pointwise MLP runs on the (B, H*W, C) tokens of the map.
    y = layers.MlpBlock(mlp_dim=int(self.mlp_ratio * dim), gelu_approximate=False, dtype=self.dtype,
                        kernel_init=_trunc_normal, bias_init=_zeros, name='mlp')(y.reshape(b, h * w, dim))
    y = y.reshape(b, h, w, dim)
    gamma = self.param('gamma', logical(nn.initializers.constant(self.layer_scale_init), ('embed',)), (dim,))
    y = y * gamma.astype(y.dtype)
    return constrain(x + DropPath(self.drop_path_rate)(y, deterministic=not train), _MAP)


class Downsample(nn.Module):
  """LayerNorm, then a 2x2 stride-2 conv to the next stage's width."""
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = layers.layer_norm('norm', epsilon=LN_EPS, dtype=self.dtype)(x)
    return _conv(self.out_dim, 2, stride=2, dtype=self.dtype, name='conv')(x)


class Stem(nn.Module):
  """Patchify: a patch_size x patch_size conv with stride patch_size, then LayerNorm."""
  patch_size: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = _conv(self.out_dim, self.patch_size, stride=self.patch_size, dtype=self.dtype, name='conv')(x)
    return layers.layer_norm('norm', epsilon=LN_EPS, dtype=self.dtype)(x)


class ConvNeXtStage(nn.Module):
  """Optional downsampling (stages 1..), then `depth` blocks."""
  out_dim: int
  depth: int
  downsample: bool
  mlp_ratio: float = 4.0
  layer_scale_init: float = LAYER_SCALE_INIT
  drop_path_rates: tuple[float, ...] = ()
  remat: Union[bool, str] = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.downsample:
      x = Downsample(self.out_dim, dtype=self.dtype, name='downsample')(x)
    block_cls = layers.remat(ConvNeXtBlock, self.remat, static_argnums=(2,))
    for j in range(self.depth):
      x = block_cls(mlp_ratio=self.mlp_ratio, layer_scale_init=self.layer_scale_init,
                    drop_path_rate=self.drop_path_rates[j] if self.drop_path_rates else 0.0, dtype=self.dtype,
                    name=f'blocks_{j}')(x, train)
    return x


class ConvNeXt(layers.HierarchicalBackbone):
  """ConvNeXt classifier on NHWC images (timm `ConvNeXt` with its defaults: conv_mlp=False, head_norm_first=False).

  drop_rate is the dropout before the classifier; drop_path_rate grows linearly over all blocks (timm).
  num_classes=0 gives a model whose logits are the pooled, normalised pre-logits.
  """
  num_classes: int = 1000
  patch_size: int = 4
  depths: Sequence[int] = (3, 3, 9, 3)
  dims: Sequence[int] = (96, 192, 384, 768)
  mlp_ratio: float = 4.0
  layer_scale_init: float = LAYER_SCALE_INIT
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False  # False/'none', True/'full', or a jax.checkpoint_policies name (layers.remat).

  @property
  def num_features(self) -> int:
    return int(self.dims[-1])

  def setup(self):
    n = len(self.depths)
    if len(self.dims) != n:
      raise ValueError(f'depths {tuple(self.depths)} and dims {tuple(self.dims)} differ in length; give one width '
                       'per stage.')
    dpr = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    starts = np.cumsum((0,) + tuple(self.depths))
    self.stem = Stem(self.patch_size, self.dims[0], dtype=self.dtype)
    self.stages = [
        ConvNeXtStage(out_dim=self.dims[i], depth=self.depths[i], downsample=i > 0, mlp_ratio=self.mlp_ratio,
                      layer_scale_init=self.layer_scale_init,
                      drop_path_rates=tuple(float(r) for r in dpr[starts[i]:starts[i + 1]]), remat=self.remat,
                      dtype=self.dtype)
        for i in range(n)]
    self.head_norm = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype,
                                  scale_init=logical(nn.initializers.ones, ('embed',)),
                                  bias_init=logical(_zeros, ('embed',)))
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes > 0:
      self.head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=logical(_trunc_normal, ('embed', 'classes')),
                           bias_init=logical(_zeros, ('classes',)))

  def patch_embed(self, images: Array) -> Array:
    """The stem (HierarchicalBackbone's patch embedding)."""
    return self.stem(images)

  def stage_resolutions(self, height: int, width: int) -> list[tuple[int, int]]:
    """(H, W) of every stage map: the stem divides by patch_size, each later stage halves (rounding down)."""
    h, w = height // self.patch_size, width // self.patch_size
    out = [(h, w)]
    for _ in range(len(self.depths) - 1):
      h, w = h // 2, w // 2
      out.append((h, w))
    return out

  def stage_modules(self) -> Sequence[nn.Module]:
    return self.stages

  def check_input_size(self, height: int, width: int) -> None:
    last = self.stage_resolutions(height, width)[-1]
    if min(last) < 1:
      need = self.patch_size * 2 ** (len(self.depths) - 1)
      raise ValueError(f'Input size {height}x{width} is too small for this ConvNeXt: its last stage map would be '
                       f'{last[0]}x{last[1]}. Fix: use images of at least {need}x{need} px, or fewer stages '
                       f'(depths/dims) or a smaller patch_size (now {self.patch_size}).')

  def final_norm(self, x: Array) -> Array:
    """None: the norm comes after pooling (head_norm), as timm's head.norm."""
    return x

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False) -> Array:
    """Mean over H and W, head LayerNorm, then (unless pre_logits) dropout and the classifier (float32 logits)."""
    x = self.head_norm(jnp.mean(features, axis=(1, 2)))
    if pre_logits:
      return x
    x = self.head_drop(x, deterministic=not train)
    return self.head(x).astype(jnp.float32) if self.num_classes > 0 else x


# ----------------------------------------------------------------------------------------------------------------
# Family facts: timm key table, layer grouping, analytic MACs.
# ----------------------------------------------------------------------------------------------------------------

# timm key -> our path (vit_jax/models/facts.py kinds). Only head.fc is the classifier: head.norm stays.
_TB = r'stages\.(\d+)\.blocks\.(\d+)\.'
_OB = r'stages_\1/blocks_\2/'
TIMM_RULES: tuple[facts.Rule, ...] = (
    (r'stem\.0', 'stem/conv', 'conv'),
    (r'stem\.1', 'stem/norm', 'norm'),
    (r'stages\.(\d+)\.downsample\.0', r'stages_\1/downsample/norm', 'norm'),
    (r'stages\.(\d+)\.downsample\.1', r'stages_\1/downsample/conv', 'conv'),
    (_TB + r'conv_dw', _OB + 'conv_dw', 'conv'),  # Depthwise: (C, 1, 7, 7) -> (7, 7, 1, C).
    (_TB + r'norm', _OB + 'norm', 'norm'),
    (_TB + r'mlp\.fc1', _OB + 'mlp/Dense_0', 'linear'),
    (_TB + r'mlp\.fc2', _OB + 'mlp/Dense_1', 'linear'),
    (_TB + r'gamma', _OB + 'gamma', 'raw'),
    (r'head\.norm', 'head_norm', 'norm'),
    (r'head\.fc', 'head', 'linear'),
)


# Layer ids for layer-wise lr decay / freezing: the stem is layer 0, blocks 1..L in order, a stage's downsampling
# goes with its first block, head_norm and head come last (timm's group_matcher).
GROUPING = facts.LayerGrouping(
    blocks=((r'^stages_(\d+)/blocks_(\d+)/', 'block2'),
            (r'^stages_(\d+)/downsample/', 'before')),
    stem=r'^stem(/|$)')


def forward_macs(model: ConvNeXt, image_size: int) -> float:
  """Multiply-adds of one forward pass on one image (convs and linears, as the published GMACs).

  Stem: r^2 * p^2 * 3 * C0 at r = size / p. Per block at resolution r, width C: 49 r^2 C (depthwise) +
  2 r^2 C^2 mlp_ratio (MLP). Downsampling: r^2 * 4 * C_prev * C at the new resolution. Head: C * classes.
  """
  res = model.stage_resolutions(image_size, image_size)
  p, dims = model.patch_size, tuple(model.dims)
  macs = res[0][0] * res[0][1] * p * p * 3 * dims[0]
  for i, (depth, dim) in enumerate(zip(model.depths, dims)):
    area = res[i][0] * res[i][1]
    if i > 0:
      macs += area * 4 * dims[i - 1] * dim
    macs += depth * area * (49 * dim + 2 * dim * dim * model.mlp_ratio)
  return float(macs + dims[-1] * model.num_classes)


facts.register_family(facts.FamilyFacts(
    name='convnext', layouts={'timm': facts.ConversionTable(TIMM_RULES, source_heads=('head.fc',))},
    grouping=GROUPING, forward_macs=forward_macs, heads=('head',)))


# ----------------------------------------------------------------------------------------------------------------
# Registry (timm counts at 224 px, 1000 classes: REFERENCE.md section 7).
# ----------------------------------------------------------------------------------------------------------------

# drop_path_rate: the paper's ImageNet-1k recipe (0.1 / 0.4 / 0.5 / 0.5); timm's constructors default to 0.
registry.register_model('convnext_t', ConvNeXt, family='convnext', num_params=28_589_128,
                        timm_name='convnext_tiny', depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                        drop_path_rate=0.1)
registry.register_model('convnext_s', ConvNeXt, family='convnext', num_params=50_223_688,
                        timm_name='convnext_small', depths=(3, 3, 27, 3), dims=(96, 192, 384, 768),
                        drop_path_rate=0.4)
registry.register_model('convnext_b', ConvNeXt, family='convnext', num_params=88_591_464,
                        timm_name='convnext_base', depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024),
                        drop_path_rate=0.5)
registry.register_model('convnext_l', ConvNeXt, family='convnext', num_params=197_767_336,
                        timm_name='convnext_large', depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536),
                        drop_path_rate=0.5)
