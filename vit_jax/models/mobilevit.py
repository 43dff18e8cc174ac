"""MobileViT v1 (Mehta & Rastegari 2022, "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision
Transformer") and v2 (Mehta & Rastegari 2022, "Separable Self-attention for Mobile Vision Transformers"), laid out
like timm's `mobilevit.py` (a ByobNet of Apple's ml-cvnets weights), NHWC.

  stem: 3x3 conv s2 + BN + SiLU                                                              stride 2
  5 stages (strides 1, 2, 2, 2, 2), each `ir_depths[i]` inverted residuals (timm BottleneckBlock with bottle_in,
  linear_out: 1x1 expand x expand_ratio of the input width + BN + SiLU, depthwise 3x3 (the stride) + BN + SiLU,
  1x1 project + BN; residual only where the shape is kept), then, where transformer_depths[i] > 0, one block of
  global mixing:
    v1 (MobileVitBlock):   local 3x3 conv + BN + SiLU, 1x1 to the transformer width; unfold into p x p patches
                           (one sequence of the N = (H/p)(W/p) patches per pixel offset in the patch); pre-norm
                           transformer blocks (LayerNorm eps 1e-5, 4 heads, qkv bias, MLP x2 with SiLU); LayerNorm;
                           fold back; 1x1 conv + BN + SiLU; fusion: 3x3 conv + BN + SiLU of concat(input, that)
    v2 (MobileVitV2Block): local depthwise 3x3 + BN + SiLU, 1x1 to half the width; unfold as above to (P, N);
                           blocks of separable linear attention (GroupNorm(1) pre-norms, eps 1e-5): a 1x1 conv to
                           [1 score | C keys | C values], softmax of the score over the N patches, context vector
                           = score-weighted sum of the keys, out = relu(values) * context, 1x1 out-projection;
                           MLP 1x1 convs x2 with SiLU; GroupNorm(1); fold back; 1x1 conv + BN (no activation)
  v1 only: final 1x1 conv + BN + SiLU to num_features; head: mean over H, W -> dropout -> Linear

Maps whose side is not a multiple of the patch are resized to the next multiple with PyTorch's bilinear (v1: before
unfolding, align_corners=False, and back after folding; v2: at the block's input, align_corners=True, and kept),
as timm does. Numerics are PyTorch's: symmetric padding, BatchNorm eps 1e-5 (statistics in `batch_stats`), SiLU,
exact softmax. Parameter names mirror timm's ('.' -> '/', list index i -> '_i', stage block j -> blocks_j).

Deploy form: `inference_mode=True` has every conv + BatchNorm as one conv with bias; `fold_batchnorms` (the
families' FamilyFacts.fold, vit_jax.deploy.fold_for_inference) turns trained variables into it. timm ships no
fused MobileViT, so this form has C fewer parameters per BatchNorm of C channels than timm's (only) count.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import attention
from vit_jax.models import facts
from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models.conv import Conv
from vit_jax.models.layers import DropPath

Array = jax.Array
VERSIONS = (1, 2)
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
_zeros = nn.initializers.zeros


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
  """timm's make_divisible: `value` rounded to a multiple of `divisor`, never more than 10% below it."""
  new = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return new + divisor if new < round_limit * value else new


def linear_resize_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
  """(n_out, n_in) weights of PyTorch's 1-D linear interpolation (F.interpolate 'bilinear', no antialiasing)."""
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    if align_corners:
      src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    else:
      src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = min(int(math.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    frac = src - i0
    m[i, i0] += 1.0 - frac
    m[i, i1] += frac
  return m


def resize_bilinear(x: Array, size: tuple[int, int], align_corners: bool) -> Array:
  """An NHWC map resized to `size` as torch's F.interpolate(mode='bilinear', align_corners=...)."""
  mh = jnp.asarray(linear_resize_matrix(x.shape[1], size[0], align_corners), x.dtype)
  mw = jnp.asarray(linear_resize_matrix(x.shape[2], size[1], align_corners), x.dtype)
  return jnp.einsum('pw,bhwc->bhpc', mw, jnp.einsum('oh,bhwc->bowc', mh, x))


def unfold(x: Array, patch: int) -> Array:
  """(B, H, W, C) -> (B, P, N, C): P = patch^2 pixel offsets (row-major), N = (H/p)(W/p) patches (row-major)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 2, 4, 1, 3, 5)
  return x.reshape(b, patch * patch, (h // patch) * (w // patch), c)


def fold(x: Array, patch: int, size: tuple[int, int]) -> Array:
  """Inverse of `unfold` for a map of `size` (H, W)."""
  b, _, _, c = x.shape
  nh, nw = size[0] // patch, size[1] // patch
  x = x.reshape(b, patch, patch, nh, nw, c).transpose(0, 3, 1, 4, 2, 5)
  return x.reshape(b, size[0], size[1], c)


class ConvNormAct(nn.Module):
  """timm ConvNormAct: conv (no bias, symmetric padding k // 2) -> BatchNorm -> SiLU (unless act=False).

  folded=True: the deploy form, a conv with bias (the BatchNorm folded in by `fold_batchnorms`)."""
  features: int
  kernel: int = 1
  stride: int = 1
  groups: int = 1
  act: bool = True
  folded: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    p = self.kernel // 2
    x = Conv(self.features, (self.kernel, self.kernel), strides=(self.stride, self.stride),
             padding=((p, p), (p, p)), feature_group_count=self.groups, use_bias=self.folded, dtype=self.dtype,
             name='conv')(x)
    if not self.folded:
      x = layers.torch_batch_norm('bn', train=train, dtype=self.dtype)(x)
    return nn.silu(x) if self.act else x


class InvertedResidual(nn.Module):
  """timm BottleneckBlock(bottle_in=True, linear_out=True, depthwise): x + DropPath(conv3(conv2(conv1(x)))) when the
  shape is kept, else DropPath(...) alone (no shortcut, timm's downsample='')."""
  features: int
  stride: int = 1
  expand_ratio: float = 4.0
  drop_path: float = 0.0
  inference_mode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    mid = make_divisible(x.shape[-1] * self.expand_ratio)
    cna = dict(folded=self.inference_mode, dtype=self.dtype)
    y = ConvNormAct(mid, 1, name='conv1_1x1', **cna)(x, train)
    y = ConvNormAct(mid, 3, self.stride, groups=mid, name='conv2_kxk', **cna)(y, train)
    y = ConvNormAct(self.features, 1, act=False, name='conv3_1x1', **cna)(y, train)
    y = DropPath(self.drop_path)(y, deterministic=not train)
    return x + y if self.stride == 1 and x.shape[-1] == self.features else y


class Mlp(nn.Module):
  """fc1 -> SiLU -> fc2 (bias): Linear layers (v1, timm Mlp) or 1x1 convs over (P, N) maps (v2, timm ConvMlp)."""
  hidden: int
  conv: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    layer = lambda features, name: (
        Conv(features, (1, 1), kernel_init=_trunc_normal, bias_init=_zeros, dtype=self.dtype, name=name)
        if self.conv else nn.Dense(features, kernel_init=_trunc_normal, bias_init=_zeros, dtype=self.dtype,
                                   name=name))
    return layer(x.shape[-1], 'fc2')(nn.silu(layer(self.hidden, 'fc1')(x)))


class Attention(nn.Module):
  """timm Attention: fused qkv (bias) -> softmax(q k^T / sqrt(d)) v -> proj, on (B', N, C) sequences."""
  num_heads: int = 4
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, length, dim = x.shape
    if dim % self.num_heads:
      raise ValueError(f'MobileViT transformer width {dim} is not divisible by num_heads={self.num_heads}.')
    head_dim = dim // self.num_heads
    dense = dict(kernel_init=_trunc_normal, bias_init=_zeros, dtype=self.dtype)
    qkv = nn.Dense(3 * dim, name='qkv', **dense)(x).reshape(n, length, 3, self.num_heads, head_dim)
    out = attention.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=head_dim ** -0.5,
                                          implementation=self.attention_impl)
    return nn.Dense(dim, name='proj', **dense)(out.reshape(n, length, dim))


class TransformerBlock(nn.Module):
  """timm vision_transformer Block as MobileViT v1 builds it: x + attn(LN(x)), x + MLP(LN(x)); LN eps 1e-5."""
  num_heads: int = 4
  mlp_ratio: float = 2.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    drop = lambda y: DropPath(self.drop_path)(y, deterministic=not train)
    y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='norm1')(x)
    x = x + drop(Attention(self.num_heads, self.dtype, self.attention_impl, name='attn')(y))
    y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='norm2')(x)
    return x + drop(Mlp(int(x.shape[-1] * self.mlp_ratio), dtype=self.dtype, name='mlp')(y))


class LinearSelfAttention(nn.Module):
  """timm LinearSelfAttention (MobileViT v2) on (B, P, N, C): a score per patch, softmax over the N patches, the
  score-weighted sum of the keys as one context vector per pixel offset, relu(values) * context, out-projection."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dim = x.shape[-1]
    conv = dict(kernel_init=_trunc_normal, bias_init=_zeros, dtype=self.dtype)
    qkv = Conv(1 + 2 * dim, (1, 1), name='qkv_proj', **conv)(x)
    query, key, value = qkv[..., :1], qkv[..., 1:1 + dim], qkv[..., 1 + dim:]
    scores = jax.nn.softmax(query.astype(jnp.float32), axis=2).astype(x.dtype)
    context = jnp.sum(key * scores, axis=2, keepdims=True)
    return Conv(dim, (1, 1), name='out_proj', **conv)(nn.relu(value) * context)


class LinearTransformerBlock(nn.Module):
  """timm LinearTransformerBlock: x + attn(GN1(x)), x + ConvMlp(GN1(x)); GroupNorm with one group, eps 1e-5."""
  mlp_ratio: float = 2.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    drop = lambda y: DropPath(self.drop_path)(y, deterministic=not train)
    norm = lambda name: nn.GroupNorm(num_groups=1, epsilon=1e-5, dtype=self.dtype, name=name)
    x = x + drop(LinearSelfAttention(self.dtype, name='attn')(norm('norm1')(x)))
    return x + drop(Mlp(int(x.shape[-1] * self.mlp_ratio), conv=True, dtype=self.dtype, name='mlp')(
        norm('norm2')(x)))


class MobileViTBlock(nn.Module):
  """timm MobileVitBlock (v1) or MobileVitV2Block (v2, `version=2`): local conv, unfold, global blocks, fold."""
  features: int
  transformer_dim: int
  depth: int
  version: int = 1
  patch_size: int = 2
  num_heads: int = 4
  mlp_ratio: float = 2.0
  drop_path: float = 0.0
  inference_mode: bool = False
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    cna = dict(folded=self.inference_mode, dtype=self.dtype)
    p = self.patch_size
    b, h, w, c = x.shape
    size = (-(-h // p) * p, -(-w // p) * p)  # The next multiples of the patch.
    v2 = self.version == 2
    if v2 and size != (h, w):
      x = resize_bilinear(x, size, align_corners=True)
    shortcut = x
    y = ConvNormAct(c, 3, groups=c if v2 else 1, name='conv_kxk', **cna)(x, train)
    y = Conv(self.transformer_dim, (1, 1), use_bias=False, dtype=self.dtype, name='conv_1x1')(y)
    if not v2 and size != (h, w):
      y = resize_bilinear(y, size, align_corners=False)
    y = unfold(y, p)  # (B, P, N, C)
    if v2:
      for j in range(self.depth):
        y = LinearTransformerBlock(self.mlp_ratio, self.drop_path, self.dtype, name=f'transformer_{j}')(y, train)
      y = nn.GroupNorm(num_groups=1, epsilon=1e-5, dtype=self.dtype, name='norm')(y)
    else:
      seq = y.reshape((-1,) + y.shape[2:])  # (B * P, N, C): one sequence of patches per pixel offset.
      for j in range(self.depth):
        seq = TransformerBlock(self.num_heads, self.mlp_ratio, self.drop_path, self.dtype, self.attention_impl,
                               name=f'transformer_{j}')(seq, train)
      y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='norm')(seq).reshape(y.shape)
    y = fold(y, p, size)
    if not v2 and size != (h, w):
      y = resize_bilinear(y, (h, w), align_corners=False)
    y = ConvNormAct(self.features, 1, act=not v2, name='conv_proj', **cna)(y, train)
    if v2:
      return y
    return ConvNormAct(self.features, 3, name='conv_fusion', **cna)(
        jnp.concatenate([shortcut, y], axis=-1), train)


class MobileViTStage(nn.Module):
  """`ir_depth` inverted residuals (the first strides), then a MobileViT block if transformer_depth > 0."""
  features: int
  stride: int
  ir_depth: int
  transformer_depth: int
  transformer_dim: int
  drop_path_rates: tuple[float, ...]
  block_kwargs: Any = None  # dict of MobileViTBlock fields shared by every block (version, patch_size, ...).
  expand_ratio: float = 4.0
  remat: Any = False
  inference_mode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    ir_cls = layers.remat(InvertedResidual, self.remat, static_argnums=(2,))
    for j in range(self.ir_depth):
      x = ir_cls(self.features, self.stride if j == 0 else 1, self.expand_ratio, self.drop_path_rates[j],
                 self.inference_mode, dtype=self.dtype, name=f'blocks_{j}')(x, train)
    if self.transformer_depth:
      block_cls = layers.remat(MobileViTBlock, self.remat, static_argnums=(2,))
      x = block_cls(self.features, self.transformer_dim, self.transformer_depth,
                    drop_path=self.drop_path_rates[-1], inference_mode=self.inference_mode, dtype=self.dtype,
                    **dict(self.block_kwargs or {}), name=f'blocks_{self.ir_depth}')(x, train)
    return x


class MobileViT(nn.Module):
  """MobileViT v1 / v2 classifier on NHWC images (timm ByobNet with its mobilevit configs; any input size).

  version 1: transformer_dims gives each MobileViT block's width; version 2: half the stage width
  (transformer_ratio). drop_path_rate grows linearly over the blocks (an inverted residual or a MobileViT block
  each). num_classes=0: the logits are the pooled pre-logits (width num_features).
  """
  num_classes: int = 1000
  version: int = 1
  stem_width: int = 16
  widths: Sequence[int] = (16, 24, 48, 64, 80)
  strides: Sequence[int] = (1, 2, 2, 2, 2)
  ir_depths: Sequence[int] = (1, 3, 1, 1, 1)
  transformer_depths: Sequence[int] = (0, 0, 2, 4, 3)
  transformer_dims: Optional[Sequence[int]] = (0, 0, 64, 80, 96)  # v1 only.
  transformer_ratio: float = 0.5  # v2 only: transformer width = make_divisible(ratio x stage width).
  expand_ratio: float = 2.0
  patch_size: int = 2
  num_heads: int = 4
  mlp_ratio: float = 2.0
  final_width: int = 320  # v1's final 1x1 conv (num_features); 0: none (v2).
  inference_mode: bool = False  # Deploy form: every conv + BatchNorm as one conv with bias (FACTS.fold).
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: Any = False  # bool or a named policy (layers.remat).
  attention_impl: str = 'einsum'  # Attention kernel (v1): 'einsum' | 'xla' | 'cudnn' (vit_jax.models.attention).

  @property
  def num_features(self) -> int:
    """Width of the pooled pre-logits: the final conv's, else the last stage's."""
    return int(self.final_width or self.widths[-1])

  def transformer_dim(self, i: int) -> int:
    """Width of stage i's MobileViT block (v1: transformer_dims[i]; v2: transformer_ratio x the stage width)."""
    if self.version == 2:
      return make_divisible(self.transformer_ratio * self.widths[i])
    return int(self.transformer_dims[i])

  def _check_options(self) -> None:
    if self.version not in VERSIONS:
      raise ValueError(f'MobileViT version={self.version!r}: expected one of {VERSIONS}.')
    n = len(self.widths)
    names = ('strides', 'ir_depths', 'transformer_depths') + (('transformer_dims',) if self.version == 1 else ())
    for name in names:
      if getattr(self, name) is None or len(getattr(self, name)) != n:
        raise ValueError(f'MobileViT {name} needs one entry per stage (widths {tuple(self.widths)}), got '
                         f'{getattr(self, name)}.')
    if self.patch_size < 1:
      raise ValueError(f'MobileViT patch_size={self.patch_size} must be >= 1.')

  def setup(self):
    self._check_options()
    n = len(self.widths)
    per_stage = [d + (1 if t else 0) for d, t in zip(self.ir_depths, self.transformer_depths)]
    dpr = np.linspace(0.0, self.drop_path_rate, max(sum(per_stage), 1))
    starts = np.cumsum([0] + per_stage)
    shared = dict(version=self.version, patch_size=self.patch_size, num_heads=self.num_heads,
                  mlp_ratio=self.mlp_ratio, attention_impl=self.attention_impl)
    self.stem = ConvNormAct(self.stem_width, 3, 2, folded=self.inference_mode, dtype=self.dtype)
    self.stages = [
        MobileViTStage(self.widths[i], self.strides[i], self.ir_depths[i], self.transformer_depths[i],
                       self.transformer_dim(i) if self.transformer_depths[i] else 0,
                       tuple(float(r) for r in dpr[starts[i]:starts[i + 1]]), shared, self.expand_ratio,
                       self.remat, self.inference_mode, self.dtype, name=f'stages_{i}')
        for i in range(n)]
    if self.final_width:
      self.final_conv = ConvNormAct(self.final_width, 1, folded=self.inference_mode, dtype=self.dtype)
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes > 0:
      self.head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_trunc_normal, bias_init=_zeros)

  def _stages(self, images: Array, train: bool) -> list[Array]:
    if images.ndim != 4:
      raise ValueError(f'Expected NHWC images, got shape {images.shape}.')
    x = self.stem(images, train)
    outs = []
    for stage in self.stages:
      x = stage(x, train)
      outs.append(x)
    return outs

  def forward_intermediates(self, images: Array, *, train: bool = False, norm: bool = False) -> list[Array]:
    """Per-stage NHWC outputs (strides 2, 4, 8, 16, 32). MobileViT has no norm on the maps (`norm` is accepted for
    the shared API and changes nothing; v1's final conv belongs to forward_features, as in timm)."""
    del norm
    return self._stages(images, train)

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """The last stage map through v1's final 1x1 conv (timm's forward_features), NHWC."""
    x = self._stages(images, train)[-1]
    return self.final_conv(x, train) if self.final_width else x

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False) -> Array:
    """Mean over H, W (the pre-logits), then dropout and the classifier."""
    x = jnp.mean(features, axis=(1, 2))
    if pre_logits:
      return x
    x = self.head_drop(x, deterministic=not train)
    return self.head(x).astype(jnp.float32) if self.num_classes > 0 else x

  def __call__(self, images: Array, *, train: bool = False) -> Array:
    return self.forward_head(self.forward_features(images, train=train), train=train)


# ----------------------------------------------------------------------------------------------------------------
# Family facts (v1 and v2 are two families: their global blocks hold Linear vs 1x1-conv weights under equal keys).
# ----------------------------------------------------------------------------------------------------------------

_SB = r'stages\.(?P<s>\d+)\.(?P<b>\d+)'
_OB = r'stages_\g<s>/blocks_\g<b>'
_TR = _SB + r'\.transformer\.(?P<t>\d+)'
_OT = _OB + r'/transformer_\g<t>'
_CONVS = r'(?P<c>conv1_1x1|conv2_kxk|conv3_1x1|conv_kxk|conv_proj|conv_fusion)'
_COMMON = (
    (r'stem\.conv', 'stem/conv', 'conv'),
    (r'stem\.bn', 'stem/bn', 'batchnorm'),
    (_SB + r'\.' + _CONVS + r'\.conv', _OB + r'/\g<c>/conv', 'conv'),
    (_SB + r'\.' + _CONVS + r'\.bn', _OB + r'/\g<c>/bn', 'batchnorm'),
    (_SB + r'\.conv_1x1', _OB + '/conv_1x1', 'conv'),
    (_TR + r'\.(?P<n>norm1|norm2)', _OT + r'/\g<n>', 'norm'),
    (_SB + r'\.norm', _OB + '/norm', 'norm'),
    (r'final_conv\.conv', 'final_conv/conv', 'conv'),
    (r'final_conv\.bn', 'final_conv/bn', 'batchnorm'),
    (r'head\.fc', 'head', 'linear'),
)
_V1_RULES = _COMMON + (
    (_TR + r'\.attn\.(?P<l>qkv|proj)', _OT + r'/attn/\g<l>', 'linear'),
    (_TR + r'\.mlp\.(?P<l>fc1|fc2)', _OT + r'/mlp/\g<l>', 'linear'),
)
_V2_RULES = _COMMON + (
    (_TR + r'\.attn\.(?P<l>qkv_proj|out_proj)', _OT + r'/attn/\g<l>', 'conv'),
    (_TR + r'\.mlp\.(?P<l>fc1|fc2)', _OT + r'/mlp/\g<l>', 'conv'),
)
_IGNORE = (r'.*\.num_batches_tracked',)


def _fold_tree(params: Any, stats: Any) -> tuple[dict, dict]:
  """Every {'conv': {kernel}, 'bn': ...} pair (a ConvNormAct) becomes {'conv': {kernel, bias}}."""
  from vit_jax import deploy  # pylint: disable=g-import-not-at-top  (deploy imports the registry: no cycle)
  if set(params) == {'conv', 'bn'} and 'kernel' in params['conv']:
    bn, bs = params['bn'], stats['bn']
    kernel, bias = deploy.fold_batchnorm(params['conv']['kernel'], None, scale=bn['scale'], offset=bn['bias'],
                                         mean=bs['mean'], var=bs['var'], epsilon=1e-5)
    return {'conv': {'kernel': kernel, 'bias': bias}}, {}
  out_p, out_s = {}, {}
  for name, sub in params.items():
    if isinstance(sub, Mapping) and any(isinstance(v, Mapping) for v in sub.values()):
      p, s = _fold_tree(sub, stats.get(name, {}))
    else:
      p, s = sub, stats.get(name, {})
    out_p[name] = p
    if s:
      out_s[name] = s
  return out_p, out_s


def fold_batchnorms(options: Mapping[str, Any], variables: Mapping[str, Any]) -> tuple[dict, dict]:
  """FamilyFacts.fold: every BatchNorm folded into its conv (inference_mode=True), the same logits. timm has no
  fused MobileViT (its reparameterize_model leaves the model as is), so this form has fewer parameters than any
  timm form: each BatchNorm's 2C become the conv's C biases."""
  if options.get('inference_mode'):
    return dict(options), dict(variables)
  if 'batch_stats' not in variables:
    raise ValueError('MobileViT folding needs the BatchNorm running statistics: pass {"params": ..., '
                     '"batch_stats": ...} (what model.init / convert.timm_to_params return).')
  params, stats = _fold_tree(variables['params'], variables['batch_stats'])
  assert not stats, f'BatchNorm statistics left after folding: {list(stats)}'
  return {**options, 'inference_mode': True}, {'params': jax.tree.map(lambda a: jnp.asarray(a, jnp.float32),
                                                                      params)}

def _resize_macs(size: tuple[int, int], new: tuple[int, int], channels: int) -> int:
  """`resize_bilinear`'s two matrix products: rows (H' H W C), then columns (H' W' W C)."""
  return new[0] * size[0] * size[1] * channels + new[0] * new[1] * size[1] * channels


def forward_macs(model: MobileViT, image_size: int) -> float:
  """Multiply-adds of one forward pass on one image (convs, linears and the attention matmuls; BatchNorm, norms,
  activations, pooling and v2's elementwise context products are not counted, as the papers' FLOPs). Folding the
  BatchNorms changes nothing here.

  A MobileViT block on an h x w map of width C, transformer width d, T = h' w' tokens (h', w': the next multiples
  of the patch) in sequences of N = T / p^2: v1 9 h w C^2 (local conv) + h w C d + L (T 4 d^2 + 2 T N d + 2 T d m)
  + h w d C + 9 h w 2C C (fusion), m the MLP width; v2 9 T C (depthwise) + T C d + L (T d (1 + 2d) + T d^2
  + 2 T d m) + T d C. Where h, w are not multiples of the patch, the bilinear resizes are the matrix products
  the code computes.
  """
  p, v2 = model.patch_size, model.version == 2
  s = layers.conv_side(image_size, 3, 2)
  macs = layers.conv_macs(s, 3, model.stem_width, 3)
  c = model.stem_width
  for i, width in enumerate(model.widths):
    for j in range(model.ir_depths[i]):
      mid = make_divisible(c * model.expand_ratio)
      macs += layers.conv_macs(s, c, mid)
      s = layers.conv_side(s, 3, model.strides[i] if j == 0 else 1)
      macs += layers.conv_macs(s, mid, mid, 3, mid) + layers.conv_macs(s, mid, width)
      c = width
    if not model.transformer_depths[i]:
      continue
    d = model.transformer_dim(i)
    hidden = int(d * model.mlp_ratio)
    side = -(-s // p) * p
    t = side * side
    resized = side != s
    if v2:
      macs += _resize_macs((s, s), (side, side), c) if resized else 0
      macs += layers.conv_macs(side, c, c, 3, c) + t * c * d
      macs += model.transformer_depths[i] * (t * d * (1 + 2 * d) + t * d * d + 2 * t * d * hidden)
      macs += t * d * c
      s = side
    else:
      n = t // (p * p)
      macs += layers.conv_macs(s, c, c, 3) + s * s * c * d
      macs += _resize_macs((s, s), (side, side), d) + _resize_macs((side, side), (s, s), d) if resized else 0
      macs += model.transformer_depths[i] * (t * 4 * d * d + 2 * t * n * d + 2 * t * d * hidden)
      macs += s * s * d * c + layers.conv_macs(s, 2 * c, c, 3)
  if model.final_width:
    macs += s * s * c * model.final_width
  return float(macs + model.num_features * max(model.num_classes, 0))

_GROUPING = facts.LayerGrouping(blocks=((r'^stages_(\d+)/blocks_(\d+)/', 'block2'),), stem=r'^stem/')

FACTS_V1 = facts.register_family(facts.FamilyFacts(
    name='mobilevit',
    layouts={'timm': facts.ConversionTable(_V1_RULES, _IGNORE, source_heads=('head.fc',))},
    grouping=_GROUPING,
    forward_macs=forward_macs,
    heads=('head',),
    fold=fold_batchnorms,
))
FACTS_V2 = facts.register_family(facts.FamilyFacts(
    name='mobilevitv2',
    layouts={'timm': facts.ConversionTable(_V2_RULES, _IGNORE, source_heads=('head.fc',))},
    grouping=_GROUPING,
    forward_macs=forward_macs,
    heads=('head',),
    fold=fold_batchnorms,
))


# ----------------------------------------------------------------------------------------------------------------
# Registry. Counts with timm 1.0.31 at 1000 classes (sum of parameter numel; BatchNorm statistics are buffers).
# timm's default input is 256 px (counts do not depend on it).
# ----------------------------------------------------------------------------------------------------------------

_V1 = {  # name: (widths, transformer_dims, expand_ratio, final_width, count)
    'xxs': ((16, 24, 48, 64, 80), (0, 0, 64, 80, 96), 2.0, 320, 1_272_024),
    'xs': ((32, 48, 64, 80, 96), (0, 0, 96, 120, 144), 4.0, 384, 2_317_848),
    's': ((32, 64, 96, 128, 160), (0, 0, 144, 192, 240), 4.0, 640, 5_578_632),
}
for _v, (_widths, _dims, _ratio, _final, _count) in _V1.items():
  registry.register_model(f'mobilevit_{_v}', MobileViT, family='mobilevit', image_size=256, num_params=_count,
                          timm_name=f'mobilevit_{_v}.cvnets_in1k', version=1, stem_width=16, widths=_widths,
                          transformer_dims=_dims, expand_ratio=_ratio, final_width=_final)

_V2 = {  # name: (width multiplier, count)
    '050': (0.5, 1_370_593), '075': (0.75, 2_866_009), '100': (1.0, 4_901_841), '125': (1.25, 7_478_089),
    '150': (1.5, 10_594_753), '175': (1.75, 14_251_833), '200': (2.0, 18_449_329),
}
for _v, (_mult, _count) in _V2.items():
  registry.register_model(
      f'mobilevitv2_{_v}', MobileViT, family='mobilevitv2', image_size=256, num_params=_count,
      timm_name=f'mobilevitv2_{_v}.cvnets_in1k', version=2, stem_width=int(32 * _mult),
      widths=tuple(int(c * _mult) for c in (64, 128, 256, 384, 512)), ir_depths=(1, 2, 1, 1, 1),
      transformer_depths=(0, 0, 2, 4, 3), transformer_dims=None, expand_ratio=2.0, final_width=0)
