"""EfficientViT-B (Cai et al. 2023, "EfficientViT: Multi-Scale Linear Attention for High-Resolution Dense
Prediction", MIT Han Lab), laid out like timm's `efficientvit_mit.py` (`EfficientVit`, efficientvit_b0..b3).

Not Microsoft's EfficientViT-M (cascaded group attention), which is another family.

  stem: conv 3x3 s2 -> BN -> Hardswish, then depths[0] residual DSConvs (dw 3x3 -> BN -> Hardswish -> 1x1 -> BN)
  stages 1, 2 (convolutional): MBConv s2 (no shortcut), then residual MBConvs
      MBConv: 1x1 expand x4 -> BN -> Hardswish -> dw 3x3 -> BN -> Hardswish -> 1x1 -> BN
  stages 3, 4 (attention): MBConv s2 with "fewer norms" (biases instead of the first two BNs), then blocks of
      x + LiteMLA(x)  and  x + MBConv(x) (fewer norms)
  head: 1x1 conv -> BN -> Hardswish -> mean over H, W -> Linear (no bias) -> LayerNorm -> Hardswish (pre-logits)
        -> dropout -> Linear

LiteMLA (multi-scale ReLU linear attention): a 1x1 conv makes q, k, v (3 x heads x head_dim channels, heads =
width // head_dim); each scale s (5) adds an aggregated copy (depthwise s x s conv, then a 1x1 conv grouped per
3 x head_dim channels); every (head, scale) group attends globally with ReLU kernels,
  out = ReLU(q) (ReLU(k)^T [v, 1]),  out = out[:, :-1] / (out[:, -1] + 1e-5),
computed in float32 whatever the compute dtype (timm disables autocast there), then a 1x1 conv -> BN projects the
concatenated groups back. Conv padding is PyTorch's symmetric kernel // 2; BatchNorm eps 1e-5, LayerNorm eps 1e-5.
The model takes any input size (no position tables); timm's default weights are 224 px.

Parameter names mirror timm's, without the `main` wrappers of its stem and EfficientViT blocks:
  stem/in_conv/{conv,norm}, stem/res{j}/{depth_conv,point_conv}/{conv,norm}
  stages_{i}/blocks_{j}/main/{inverted_conv,depth_conv,point_conv}/{conv,norm}       (MBConv blocks)
  stages_{i}/blocks_{j}/context_module/{qkv/conv, aggreg_{s}_{0,1}, proj/{conv,norm}}  (LiteMLA)
  stages_{i}/blocks_{j}/local_module/{inverted_conv,depth_conv,point_conv}/{conv,norm}
  head_in_conv/{conv,norm}, head_fc, head_norm, head        timm head.in_conv, head.classifier.{0,1,4}

Deploy form (`deploy=True`, from `vit_jax.deploy.fold_for_inference`): every BatchNorm folded into the conv before
it (each such conv then has a bias); no `batch_stats`.

timm's EfficientViT has no stochastic depth; drop_path_rate (default 0, i.e. timm) adds it to the residual
branches here, growing linearly over the blocks that have a shortcut.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import facts
from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models.conv import Conv
from vit_jax.models.layers import DropPath

Array = jax.Array

BN_EPS = 1e-5
LN_EPS = 1e-5
ATTN_EPS = 1e-5  # timm / the official LiteMLA's eps in out[:, :-1] / (out[:, -1] + eps).
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


class ConvNormAct(nn.Module):
  """conv (PyTorch symmetric padding) -> optional BatchNorm -> optional Hardswish (timm ConvNormAct).

  In deploy form a BatchNorm is folded into the conv, which then has a bias.
  """
  features: int
  kernel: int = 1
  stride: int = 1
  groups: int = 1
  use_bias: bool = False
  norm: bool = True
  act: bool = False
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    pad = ((self.stride - 1) + (self.kernel - 1)) // 2
    norm = self.norm and not self.deploy
    x = Conv(self.features, (self.kernel, self.kernel), strides=(self.stride, self.stride),
             padding=((pad, pad), (pad, pad)), feature_group_count=self.groups,
             use_bias=self.use_bias or (self.norm and self.deploy), dtype=self.dtype,
             kernel_init=nn.initializers.kaiming_normal(), bias_init=nn.initializers.zeros, name='conv')(x)
    if norm:
      x = layers.torch_batch_norm('norm', train=train, dtype=self.dtype, epsilon=BN_EPS)(x)
    return jax.nn.hard_swish(x) if self.act else x


class MBConv(nn.Module):
  """1x1 expand -> dw kxk (stride) -> 1x1 project (timm MBConv with EfficientViT-B's Hardswish).

  fewer_norm: the expand and depthwise convs have biases instead of BatchNorms (the attention stages).
  """
  out_dim: int
  stride: int = 1
  expand_ratio: float = 4.0
  fewer_norm: bool = False
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    mid = round(x.shape[-1] * self.expand_ratio)
    first = dict(use_bias=self.fewer_norm, norm=not self.fewer_norm, act=True, deploy=self.deploy, dtype=self.dtype)
    x = ConvNormAct(mid, 1, name='inverted_conv', **first)(x, train)
    x = ConvNormAct(mid, 3, self.stride, groups=mid, name='depth_conv', **first)(x, train)
    return ConvNormAct(self.out_dim, 1, deploy=self.deploy, dtype=self.dtype, name='point_conv')(x, train)


class DSConv(nn.Module):
  """dw 3x3 -> BN -> Hardswish -> 1x1 -> BN (timm DSConv, the stem's residual blocks)."""
  out_dim: int
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    c = x.shape[-1]
    x = ConvNormAct(c, 3, groups=c, act=True, deploy=self.deploy, dtype=self.dtype, name='depth_conv')(x, train)
    return ConvNormAct(self.out_dim, 1, deploy=self.deploy, dtype=self.dtype, name='point_conv')(x, train)


def relu_linear_attention(q: Array, k: Array, v: Array, eps: float = ATTN_EPS) -> Array:
  """ReLU linear attention over the token axis, in float32: (B, G, N, d) each -> (B, G, N, d) in v's dtype.

  out = ReLU(q) (ReLU(k)^T [v, 1]) with the last column as the normaliser: out[..., :-1] / (out[..., -1:] + eps).
  """
  dtype = v.dtype
  q, k, v = (jnp.maximum(t.astype(jnp.float32), 0.0) if i < 2 else t.astype(jnp.float32)
             for i, t in enumerate((q, k, v)))
  v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
  kv = jnp.einsum('bgnd,bgne->bgde', k, v, precision=jax.lax.Precision.HIGHEST)
  out = jnp.einsum('bgnd,bgde->bgne', q, kv, precision=jax.lax.Precision.HIGHEST)
  return (out[..., :-1] / (out[..., -1:] + eps)).astype(dtype)


class LiteMLA(nn.Module):
  """Multi-scale ReLU linear attention on an NHWC map (timm LiteMLA); see the module doc."""
  head_dim: int = 32
  scales: Sequence[int] = (5,)
  eps: float = ATTN_EPS
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    b, h, w, c = x.shape
    heads = c // self.head_dim
    if heads < 1:
      raise ValueError(f'LiteMLA on {c} channels with head_dim {self.head_dim} has no head; use widths of at least '
                       'head_dim in the attention stages (or a smaller head_dim).')
    total = heads * self.head_dim
    qkv = ConvNormAct(3 * total, 1, norm=False, deploy=self.deploy, dtype=self.dtype, name='qkv')(x, train)
    groups = [qkv]
    for i, s in enumerate(self.scales):
      y = Conv(3 * total, (s, s), padding=((s // 2, s // 2),) * 2, feature_group_count=3 * total, use_bias=False,
               dtype=self.dtype, kernel_init=nn.initializers.kaiming_normal(), name=f'aggreg_{i}_0')(qkv)
      groups.append(Conv(3 * total, (1, 1), feature_group_count=3 * heads, use_bias=False, dtype=self.dtype,
                         kernel_init=nn.initializers.kaiming_normal(), name=f'aggreg_{i}_1')(y))
    # Channels [q, k, v] of head_dim each per (scale, head) group, groups in channel order (as timm's reshape).
    qkv = jnp.concatenate(groups, axis=-1).reshape(b, h * w, -1, 3 * self.head_dim).transpose(0, 2, 1, 3)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    out = relu_linear_attention(q, k, v, self.eps)  # (B, G, N, d)
    out = out.transpose(0, 2, 1, 3).reshape(b, h, w, -1)
    return ConvNormAct(c, 1, deploy=self.deploy, dtype=self.dtype, name='proj')(out, train)


class EfficientVitBlock(nn.Module):
  """x + LiteMLA(x), then x + MBConv(x) with fewer norms (timm EfficientVitBlock)."""
  head_dim: int = 32
  expand_ratio: float = 4.0
  scales: Sequence[int] = (5,)
  drop_path: float = 0.0
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    drop = DropPath(self.drop_path)
    y = LiteMLA(self.head_dim, self.scales, deploy=self.deploy, dtype=self.dtype, name='context_module')(x, train)
    x = x + drop(y, deterministic=not train)
    y = MBConv(x.shape[-1], 1, self.expand_ratio, fewer_norm=True, deploy=self.deploy, dtype=self.dtype,
               name='local_module')(x, train)
    return x + drop(y, deterministic=not train)


class ResidualMBConv(nn.Module):
  """x + MBConv(x) (stride 1, same width), or MBConv(x) alone where it strides (timm ResidualBlock)."""
  out_dim: int
  stride: int = 1
  expand_ratio: float = 4.0
  fewer_norm: bool = False
  drop_path: float = 0.0
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    y = MBConv(self.out_dim, self.stride, self.expand_ratio, self.fewer_norm, self.deploy, dtype=self.dtype,
               name='main')(x, train)
    if self.stride != 1:
      return y
    return x + DropPath(self.drop_path)(y, deterministic=not train)


class EfficientVitStage(nn.Module):
  """A strided MBConv, then depth-1 residual MBConvs (convolutional stage) or `depth` EfficientViT blocks."""
  out_dim: int
  depth: int
  vit_stage: bool
  head_dim: int = 32
  expand_ratio: float = 4.0
  scales: Sequence[int] = (5,)
  drop_path_rates: tuple[float, ...] = ()
  deploy: bool = False
  remat: Union[bool, str] = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    common = dict(deploy=self.deploy, dtype=self.dtype)
    x = ResidualMBConv(self.out_dim, 2, self.expand_ratio, self.vit_stage, name='blocks_0', **common)(x, train)
    rates = self.drop_path_rates or (0.0,) * self.depth
    if self.vit_stage:
      block = layers.remat(EfficientVitBlock, self.remat, static_argnums=(2,))
      for j in range(self.depth):
        x = block(self.head_dim, self.expand_ratio, self.scales, rates[j], name=f'blocks_{j + 1}', **common)(
            x, train)
    else:
      block = layers.remat(ResidualMBConv, self.remat, static_argnums=(2,))
      for j in range(1, self.depth):
        x = block(self.out_dim, 1, self.expand_ratio, False, rates[j], name=f'blocks_{j}', **common)(x, train)
    return x


class Stem(nn.Module):
  """conv 3x3 s2 -> BN -> Hardswish, then `depth` residual DSConvs (timm Stem)."""
  width: int
  depth: int
  stride: int = 2
  drop_path_rates: tuple[float, ...] = ()
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = ConvNormAct(self.width, 3, self.stride, act=True, deploy=self.deploy, dtype=self.dtype, name='in_conv')(
        x, train)
    for j in range(self.depth):
      y = DSConv(self.width, self.deploy, dtype=self.dtype, name=f'res{j}')(x, train)
      rate = self.drop_path_rates[j] if self.drop_path_rates else 0.0
      x = x + DropPath(rate)(y, deterministic=not train)
    return x


class EfficientVit(nn.Module):
  """EfficientViT-B classifier on NHWC images (timm `EfficientVit`).

  widths/depths: the stem's and the 4 stages' (depths[0] residual DSConvs in the stem). Stages 3 and 4 attend.
  num_features is the pre-logits width head_widths[1]. num_classes=0: the logits are the pre-logits.
  """
  num_classes: int = 1000
  patch_size: int = 2  # The stem conv's stride: 2 (the paper, timm), or 1 for small images.
  widths: Sequence[int] = (8, 16, 32, 64, 128)
  depths: Sequence[int] = (1, 2, 2, 2, 2)
  head_dim: int = 16
  head_widths: Sequence[int] = (1024, 1280)
  expand_ratio: float = 4.0
  scales: Sequence[int] = (5,)
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  deploy: bool = False
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False  # False/'none', True/'full', or a jax.checkpoint_policies name (layers.remat).

  @property
  def num_features(self) -> int:
    return int(self.head_widths[1])

  def setup(self):
    if len(self.widths) != 5 or len(self.depths) != 5:
      raise ValueError(f'EfficientViT-B takes 5 widths and depths (stem + 4 stages), got widths {tuple(self.widths)} '
                       f'and depths {tuple(self.depths)}.')
    if self.patch_size not in (1, 2):
      raise ValueError(f'patch_size={self.patch_size}: EfficientViT-B\'s stem conv strides by 2 (the reference) or 1.')
    if len(self.head_widths) != 2:
      raise ValueError(f'head_widths needs (conv width, pre-logits width), got {tuple(self.head_widths)}.')
    # Drop-path rates over the blocks with a shortcut: the stem's DSConvs, then each stage's unstrided blocks.
    residual = [self.depths[0]] + [d if i >= 2 else d - 1 for i, d in enumerate(self.depths[1:])]
    dpr = [float(r) for r in np.linspace(0.0, self.drop_path_rate, max(sum(residual), 1))]
    starts = np.cumsum([0] + residual)
    self.stem = Stem(self.widths[0], self.depths[0], self.patch_size, tuple(dpr[:residual[0]]), self.deploy,
                     dtype=self.dtype)
    stages = []
    for i in range(4):
      rates = dpr[starts[i + 1]:starts[i + 2]]
      if i < 2:
        rates = [0.0] + rates  # Index j of a convolutional stage is blocks_j (blocks_0 strides, no shortcut).
      stages.append(EfficientVitStage(self.widths[i + 1], self.depths[i + 1], vit_stage=i >= 2, head_dim=self.head_dim,
                                      expand_ratio=self.expand_ratio, scales=tuple(self.scales),
                                      drop_path_rates=tuple(rates), deploy=self.deploy, remat=self.remat,
                                      dtype=self.dtype, name=f'stages_{i}'))
    self.stages = stages
    self.head_in_conv = ConvNormAct(self.head_widths[0], 1, act=True, deploy=self.deploy, dtype=self.dtype)
    self.head_fc = nn.Dense(self.head_widths[1], use_bias=False, dtype=self.dtype, kernel_init=_trunc_normal)
    self.head_norm = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes > 0:
      self.head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_trunc_normal)

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
    """The 4 stages' NHWC maps (strides 4, 8, 16, 32 with patch_size 2). EfficientViT has no norm on the last map (its BatchNorm is
    in the head, after a conv), so `norm` changes nothing; it is accepted for the shared API."""
    del norm
    return self._stages(images, train)

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """The last stage's NHWC map (timm's forward_features)."""
    return self._stages(images, train)[-1]

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False) -> Array:
    """1x1 conv -> BN -> Hardswish -> mean over H, W -> Linear -> LayerNorm -> Hardswish (pre-logits) -> dropout
    -> classifier."""
    x = self.head_in_conv(features, train)
    x = jax.nn.hard_swish(self.head_norm(self.head_fc(jnp.mean(x, axis=(1, 2)))))
    if pre_logits or self.num_classes == 0:
      return x
    return self.head(self.head_drop(x, deterministic=not train)).astype(jnp.float32)

  def __call__(self, images: Array, *, train: bool = False) -> Array:
    return self.forward_head(self.forward_features(images, train=train), train=train)


# ----------------------------------------------------------------------------------------------------------------
# Family facts: timm conversion, layer grouping, BatchNorm folding.
# ----------------------------------------------------------------------------------------------------------------

_TB = r'stages\.(\d+)\.blocks\.(\d+)\.'
_OB = r'stages_\1/blocks_\2/'
_MB = r'(inverted_conv|depth_conv|point_conv)'
TIMM_RULES: tuple[facts.Rule, ...] = (
    (r'stem\.in_conv\.conv', 'stem/in_conv/conv', 'conv'),
    (r'stem\.in_conv\.norm', 'stem/in_conv/norm', 'batchnorm'),
    (r'stem\.res(\d+)\.main\.(depth_conv|point_conv)\.conv', r'stem/res\1/\2/conv', 'conv'),
    (r'stem\.res(\d+)\.main\.(depth_conv|point_conv)\.norm', r'stem/res\1/\2/norm', 'batchnorm'),
    (_TB + r'main\.' + _MB + r'\.conv', _OB + r'main/\3/conv', 'conv'),
    (_TB + r'main\.' + _MB + r'\.norm', _OB + r'main/\3/norm', 'batchnorm'),
    (_TB + r'context_module\.main\.(qkv|proj)\.conv', _OB + r'context_module/\3/conv', 'conv'),
    (_TB + r'context_module\.main\.proj\.norm', _OB + 'context_module/proj/norm', 'batchnorm'),
    (_TB + r'context_module\.main\.aggreg\.(\d+)\.([01])', _OB + r'context_module/aggreg_\3_\4', 'conv'),
    (_TB + r'local_module\.main\.' + _MB + r'\.conv', _OB + r'local_module/\3/conv', 'conv'),
    (_TB + r'local_module\.main\.' + _MB + r'\.norm', _OB + r'local_module/\3/norm', 'batchnorm'),
    (r'head\.in_conv\.conv', 'head_in_conv/conv', 'conv'),
    (r'head\.in_conv\.norm', 'head_in_conv/norm', 'batchnorm'),
    (r'head\.classifier\.0', 'head_fc', 'linear'),
    (r'head\.classifier\.1', 'head_norm', 'norm'),
    (r'head\.classifier\.4', 'head', 'linear'),
)


def fold_batchnorms(params: Mapping[str, Any], batch_stats: Mapping[str, Any], epsilon: float = BN_EPS) -> dict:
  """Params with every BatchNorm ('.../norm' of a ConvNormAct) folded into its sibling conv and removed."""
  from vit_jax import deploy  # pylint: disable=g-import-not-at-top  (models must not import it at load time)
  flat = traverse_util.flatten_dict(dict(params), sep='/')
  stats = traverse_util.flatten_dict(dict(batch_stats), sep='/')
  for stat_path in sorted(p for p in stats if p.endswith('/norm/mean')):
    unit = stat_path[:-len('/norm/mean')]
    kernel, bias = deploy.fold_batchnorm(
        flat[f'{unit}/conv/kernel'], flat.get(f'{unit}/conv/bias'), scale=flat.pop(f'{unit}/norm/scale'),
        offset=flat.pop(f'{unit}/norm/bias'), mean=stats[stat_path], var=stats[f'{unit}/norm/var'],
        epsilon=epsilon)
    flat[f'{unit}/conv/kernel'], flat[f'{unit}/conv/bias'] = kernel, bias
  return traverse_util.unflatten_dict(flat, sep='/')


def _fold(options: Mapping[str, Any], variables: Mapping[str, Any]) -> tuple[dict, dict]:
  """FamilyFacts.fold: the deploy form (deploy=True) and its variables (params only)."""
  if options.get('deploy'):
    return dict(options), dict(variables)
  return {**options, 'deploy': True}, {'params': fold_batchnorms(variables['params'],
                                                                 variables.get('batch_stats', {}))}


def _mbconv_macs(side: int, out_side: int, in_ch: int, out_ch: int, expand_ratio: float) -> int:
  """MBConv: 1x1 expand on the input map, depthwise 3x3 (strided) and 1x1 project on the output map."""
  mid = round(in_ch * expand_ratio)
  return (layers.conv_macs(side, in_ch, mid) + layers.conv_macs(out_side, mid, mid, 3, mid)
          + layers.conv_macs(out_side, mid, out_ch))


def forward_macs(model: EfficientVit, image_size: int) -> float:
  """Multiply-adds of one forward pass on one image (convs, linears and the attention matmuls; BatchNorm,
  LayerNorm, activations and the normaliser division are not counted, as the paper's MACs). Folding the
  BatchNorms changes nothing here.

  LiteMLA on n = s^2 positions of width C (heads H = C / d, scales S): qkv n C 3Hd; per scale a depthwise
  k x k conv n k^2 3Hd and a 1x1 conv grouped per 3d channels n d 3Hd; the ReLU attention of each of the
  H (1 + S) groups 2 n d (d + 1) (k^T [v, 1], then q times that); proj n H d (1 + S) C.
  """
  widths, d = tuple(model.widths), model.head_dim
  s = layers.conv_side(image_size, 3, model.patch_size)
  macs = layers.conv_macs(s, 3, widths[0], 3)
  macs += model.depths[0] * (layers.conv_macs(s, widths[0], widths[0], 3, widths[0]) + s * s * widths[0] ** 2)
  for i in range(4):
    cin, c, depth = widths[i], widths[i + 1], model.depths[i + 1]
    out = layers.conv_side(s, 3, 2)
    macs += _mbconv_macs(s, out, cin, c, model.expand_ratio)
    s, n = out, out * out
    if i < 2:
      macs += (depth - 1) * _mbconv_macs(s, s, c, c, model.expand_ratio)
      continue
    heads = c // d
    total, groups = heads * d, heads * (1 + len(model.scales))
    attention = n * c * 3 * total + groups * 2 * n * d * (d + 1) + n * groups * d * c
    attention += sum(layers.conv_macs(s, 3 * total, 3 * total, k, 3 * total) + n * d * 3 * total
                     for k in model.scales)
    macs += depth * (attention + _mbconv_macs(s, s, c, c, model.expand_ratio))
  head_conv, pre_logits = model.head_widths
  macs += s * s * widths[-1] * head_conv + head_conv * pre_logits
  return float(macs + pre_logits * max(model.num_classes, 0))


FACTS = facts.register_family(facts.FamilyFacts(
    name='efficientvit_mit',
    layouts={'timm': facts.ConversionTable(TIMM_RULES, (r'.*\.num_batches_tracked',),
                                           source_heads=('head.classifier.4',))},
    grouping=facts.LayerGrouping(blocks=((r'^stages_(\d+)/blocks_(\d+)/', 'block2'),), stem=r'^stem/'),
    forward_macs=forward_macs,
    heads=('head',),
    fold=_fold,
))


# ----------------------------------------------------------------------------------------------------------------
# Registry: timm 1.0.31 counts at 224 px, 1000 classes (timm's default tags are the r224 weights).
# ----------------------------------------------------------------------------------------------------------------

_B = {  # our name: (widths, depths, head_dim, head_widths, count)
    'b0': ((8, 16, 32, 64, 128), (1, 2, 2, 2, 2), 16, (1024, 1280), 3_410_008),
    'b1': ((16, 32, 64, 128, 256), (1, 2, 3, 3, 4), 16, (1536, 1600), 9_102_024),
    'b2': ((24, 48, 96, 192, 384), (1, 3, 4, 4, 6), 32, (2304, 2560), 24_330_712),
    'b3': ((32, 64, 128, 256, 512), (1, 4, 6, 6, 9), 32, (2304, 2560), 48_646_056),
}
for _size, (_widths, _depths, _head_dim, _head_widths, _count) in _B.items():
  registry.register_model(f'efficientvit_{_size}', EfficientVit, family='efficientvit_mit', image_size=224,
                          num_params=_count, timm_name=f'efficientvit_{_size}.r224_in1k', widths=_widths,
                          depths=_depths, head_dim=_head_dim, head_widths=_head_widths)
