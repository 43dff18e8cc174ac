"""FastViT (Vasu et al. 2023, "FastViT: A Fast Hybrid Vision Transformer using Structural Reparameterization"),
laid out like timm's `fastvit.py` (Apple's ml-fastvit weights as timm ports them).

Train-time form (what the published checkpoints hold), NHWC:

  stem: three MobileOne blocks: 3x3 conv s2 -> depthwise 3x3 s2 -> 1x1, each GELU           stride 4
  4 stages (stages 1-3 start with a PatchEmbed: a depthwise-grouped 7x7 s2 conv with a parallel 3x3 branch, then
  a 1x1 MobileOne block with GELU):
    RepMixer block:   x = x + g1 * (mixer(x) - BN(x)),  mixer = BN(dw3x3(x)) + BN(dw1x1(x)) + BN(x)
                      x = x + g2 * ConvMlp(x)
    attention block (the last stage of fastvit_sa*, after a conditional positional encoding x + dw7x7(x)):
                      x = x + g1 * MHSA(BN(x)) (head dim 32, qkv without bias),  x = x + g2 * ConvMlp(x)
    ConvMlp:          BN(dw7x7(x)) -> 1x1 (bias) -> GELU -> 1x1 (bias)
  final_conv: MobileOne block, grouped 3x3 from C to 2C (+ 1x1 branch), squeeze-excitation, GELU
  head: mean over H, W -> dropout -> Linear

A MobileOne block sums parallel branches (k x k conv + BN, a 1x1 conv + BN "scale" branch, and a BatchNorm
"identity" branch when the shape allows), each linear in x, so at inference they collapse into one k x k conv with
bias; RepMixer collapses into one depthwise 3x3 conv; the positional encoding into one depthwise 7x7 conv.
`inference_mode=True` builds that deploy form (timm's `reparameterize_model`, parameter for parameter);
`FACTS.fold` (vit_jax.deploy.fold_for_inference) turns trained train-form variables into it. The ConvMlp's and the
attention's BatchNorms stay (timm keeps them too).

Numerics are PyTorch's: symmetric padding k // 2, BatchNorm eps 1e-5 (momentum 0.1 = flax 0.9, statistics in
`batch_stats`), exact GELU. Parameter names mirror timm's module names ('.' -> '/', list index -> '_i').
"""
from __future__ import annotations

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

TOKEN_MIXERS = ('repmixer', 'attention')
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
_zeros = nn.initializers.zeros


def se_width(channels: int) -> int:
  """timm SEModule(channels, rd_divisor=1): round(channels / 16), at least 1 (make_divisible with divisor 1)."""
  return max(1, int(channels / 16 + 0.5))


def _conv(features: int, kernel: int, *, stride: int = 1, groups: int = 1, use_bias: bool = False,
          dtype: Any = jnp.float32, name: str) -> nn.Conv:
  """A PyTorch-style conv: symmetric padding k // 2 (timm's padding for odd kernels at stride 1 and 2)."""
  pad = kernel // 2
  return Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
              feature_group_count=groups, use_bias=use_bias, dtype=dtype, name=name)


class ConvBN(nn.Module):
  """timm ConvNormAct without activation: conv (no bias) -> BatchNorm."""
  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = _conv(self.features, self.kernel, stride=self.stride, groups=self.groups, dtype=self.dtype, name='conv')(x)
    return layers.torch_batch_norm('bn', train=train, dtype=self.dtype)(x)


class SqueezeExcite(nn.Module):
  """timm SEModule: x * sigmoid(fc2(relu(fc1(mean_hw(x))))), 1x1 convs with bias, width `se_width(C)`."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(_conv(se_width(x.shape[-1]), 1, use_bias=True, dtype=self.dtype, name='fc1')(s))
    s = _conv(x.shape[-1], 1, use_bias=True, dtype=self.dtype, name='fc2')(s)
    return x * nn.sigmoid(s)


class MobileOneBlock(nn.Module):
  """timm MobileOneBlock: act(SE(sum of branches)); deploy form act(SE(reparam_conv(x))).

  Branches: `num_conv_branches` k x k conv + BN (`conv_kxk_i`), a 1x1 conv + BN (`conv_scale`, when k > 1 and
  use_scale_branch), a BatchNorm of x (`identity`, when the width is kept at stride 1).
  """
  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  use_se: bool = False
  use_act: bool = True
  use_scale_branch: bool = True
  num_conv_branches: int = 1
  inference_mode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.inference_mode:
      y = _conv(self.features, self.kernel, stride=self.stride, groups=self.groups, use_bias=True,
                dtype=self.dtype, name='reparam_conv')(x)
    else:
      y = 0.0
      if x.shape[-1] == self.features and self.stride == 1:
        y = layers.torch_batch_norm('identity', train=train, dtype=self.dtype)(x)
      if self.kernel > 1 and self.use_scale_branch:
        y = y + ConvBN(self.features, 1, self.stride, self.groups, dtype=self.dtype, name='conv_scale')(x, train)
      for i in range(self.num_conv_branches):
        y = y + ConvBN(self.features, self.kernel, self.stride, self.groups, dtype=self.dtype,
                       name=f'conv_kxk_{i}')(x, train)
    if self.use_se:
      y = SqueezeExcite(dtype=self.dtype, name='se')(y)
    return layers.gelu(y, approximate=False) if self.use_act else y


class ReparamLargeKernelConv(nn.Module):
  """timm ReparamLargeKernelConv (RepLKNet): BN(conv k x k) + BN(conv 3x3), or one conv with bias (deploy form).
  No activation and no SE in the registered FastViTs."""
  features: int
  kernel: int
  stride: int
  groups: int
  small_kernel: int = 3
  inference_mode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.inference_mode:
      return _conv(self.features, self.kernel, stride=self.stride, groups=self.groups, use_bias=True,
                   dtype=self.dtype, name='reparam_conv')(x)
    big = ConvBN(self.features, self.kernel, self.stride, self.groups, dtype=self.dtype, name='large_conv')
    small = ConvBN(self.features, self.small_kernel, self.stride, self.groups, dtype=self.dtype, name='small_conv')
    return big(x, train) + small(x, train)


class PatchEmbed(nn.Module):
  """timm fastvit PatchEmbed: 7x7 s2 large-kernel conv grouped by the input width (`proj_0`), then a 1x1
  MobileOne block with GELU (`proj_1`)."""
  features: int
  patch_size: int = 7
  stride: int = 2
  inference_mode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.features % x.shape[-1]:
      raise ValueError(f'FastViT downsampling groups its conv by the input width: {x.shape[-1]} -> '
                       f'{self.features} channels needs the output width to be a multiple of the input width.')
    x = ReparamLargeKernelConv(self.features, self.patch_size, self.stride, groups=x.shape[-1],
                               inference_mode=self.inference_mode, dtype=self.dtype, name='proj_0')(x, train)
    return MobileOneBlock(self.features, 1, inference_mode=self.inference_mode, dtype=self.dtype,
                          name='proj_1')(x, train)


class LayerScale(nn.Module):
  """x * gamma per channel (timm LayerScale2d; its (C, 1, 1) gamma is stored as (C,))."""
  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gamma = self.param('gamma', nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * gamma.astype(x.dtype)


class RepMixer(nn.Module):
  """timm RepMixer: x + gamma * (mixer(x) - norm(x)); deploy form: one depthwise k x k conv with bias."""
  kernel: int = 3
  layer_scale_init_value: float = 1e-5
  inference_mode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    dim = x.shape[-1]
    if self.inference_mode:
      return _conv(dim, self.kernel, groups=dim, use_bias=True, dtype=self.dtype, name='reparam_conv')(x)
    block = dict(groups=dim, use_act=False, dtype=self.dtype)
    norm = MobileOneBlock(dim, self.kernel, use_scale_branch=False, num_conv_branches=0, name='norm', **block)
    mixer = MobileOneBlock(dim, self.kernel, name='mixer', **block)
    return x + LayerScale(self.layer_scale_init_value, name='layer_scale')(mixer(x, train) - norm(x, train))


class ConvMlp(nn.Module):
  """timm fastvit ConvMlp: BN(dw 7x7 conv) -> 1x1 (bias) -> GELU -> dropout -> 1x1 (bias) -> dropout."""
  hidden: int
  drop: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    dim = x.shape[-1]
    x = ConvBN(dim, 7, groups=dim, dtype=self.dtype, name='conv')(x, train)
    fc = dict(kernel_init=_trunc_normal, bias_init=_zeros, dtype=self.dtype)
    x = Conv(self.hidden, (1, 1), name='fc1', **fc)(x)
    x = nn.Dropout(self.drop)(layers.gelu(x, approximate=False), deterministic=not train)
    x = Conv(dim, (1, 1), name='fc2', **fc)(x)
    return nn.Dropout(self.drop)(x, deterministic=not train)


class Attention(nn.Module):
  """timm fastvit Attention over the H*W tokens (row-major): qkv (no bias) -> softmax(q k^T / sqrt(d)) v -> proj."""
  head_dim: int = 32
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, dim = x.shape
    if dim % self.head_dim:
      raise ValueError(f'FastViT attention width {dim} is not a multiple of head_dim={self.head_dim}.')
    heads = dim // self.head_dim
    dense = dict(kernel_init=_trunc_normal, bias_init=_zeros, dtype=self.dtype)
    qkv = nn.Dense(3 * dim, use_bias=False, name='qkv', **dense)(x.reshape(b, h * w, dim))
    qkv = qkv.reshape(b, h * w, 3, heads, self.head_dim)
    out = attention.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=self.head_dim ** -0.5,
                                          implementation=self.attention_impl)
    return nn.Dense(dim, name='proj', **dense)(out.reshape(b, h * w, dim)).reshape(b, h, w, dim)


class FastViTBlock(nn.Module):
  """A RepMixerBlock or an AttentionBlock (timm), by `token_mixer`."""
  token_mixer: str
  mlp_ratio: float
  kernel: int = 3
  head_dim: int = 32
  layer_scale_init_value: float = 1e-5
  drop: float = 0.0
  drop_path: float = 0.0
  inference_mode: bool = False
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    drop_path = lambda y: DropPath(self.drop_path)(y, deterministic=not train)
    mlp = ConvMlp(int(x.shape[-1] * self.mlp_ratio), self.drop, dtype=self.dtype, name='mlp')
    if self.token_mixer == 'repmixer':
      x = RepMixer(self.kernel, self.layer_scale_init_value, self.inference_mode, dtype=self.dtype,
                   name='token_mixer')(x, train)
      return x + drop_path(LayerScale(self.layer_scale_init_value, name='layer_scale')(mlp(x, train)))
    y = layers.torch_batch_norm('norm', train=train, dtype=self.dtype)(x)
    y = Attention(self.head_dim, dtype=self.dtype, attention_impl=self.attention_impl, name='token_mixer')(y)
    x = x + drop_path(LayerScale(self.layer_scale_init_value, name='layer_scale_1')(y))
    return x + drop_path(LayerScale(self.layer_scale_init_value, name='layer_scale_2')(mlp(x, train)))


class RepCPE(nn.Module):
  """timm RepConditionalPosEnc: x + depthwise k x k conv (bias); deploy form: one conv with the identity folded in."""
  kernel: int = 7
  inference_mode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dim = x.shape[-1]
    if self.inference_mode:
      return _conv(dim, self.kernel, groups=dim, use_bias=True, dtype=self.dtype, name='reparam_conv')(x)
    return x + _conv(dim, self.kernel, groups=dim, use_bias=True, dtype=self.dtype, name='pos_enc')(x)


class FastViTStage(nn.Module):
  """timm FastVitStage: optional PatchEmbed downsample, optional positional encoding, `depth` blocks."""
  features: int
  depth: int
  token_mixer: str
  mlp_ratio: float
  downsample: bool
  pos_emb: bool
  drop_path_rates: tuple[float, ...]
  block_kwargs: Any = None  # dict of FastViTBlock fields shared by every block.
  inference_mode: bool = False
  remat: Any = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.downsample:
      x = PatchEmbed(self.features, inference_mode=self.inference_mode, dtype=self.dtype,
                     name='downsample')(x, train)
    elif x.shape[-1] != self.features:
      raise ValueError(f'A FastViT stage without downsampling keeps the width ({x.shape[-1]} != {self.features}).')
    if self.pos_emb:
      x = RepCPE(inference_mode=self.inference_mode, dtype=self.dtype, name='pos_emb')(x)
    block_cls = layers.remat(FastViTBlock, self.remat, static_argnums=(2,))
    for j in range(self.depth):
      x = block_cls(self.token_mixer, self.mlp_ratio, drop_path=self.drop_path_rates[j],
                    inference_mode=self.inference_mode, **dict(self.block_kwargs or {}), name=f'blocks_{j}')(x, train)
    return x


class FastViT(nn.Module):
  """FastViT classifier on NHWC images (timm `FastVit`, classification head; any input size >= 1 px).

  inference_mode=True builds the re-parameterised deploy form (fewer parameters, same function). drop_path_rate
  grows linearly over all blocks (timm). num_classes=0: the logits are the pooled pre-logits (width 2 x last).
  """
  num_classes: int = 1000
  depths: Sequence[int] = (2, 2, 4, 2)
  embed_dims: Sequence[int] = (48, 96, 192, 384)
  mlp_ratios: Any = 3.0  # A float or one per stage.
  token_mixers: Sequence[str] = ('repmixer',) * 4
  pos_embs: Sequence[bool] = (False,) * 4  # A 7x7 conditional positional encoding at the start of the stage.
  downsamples: Sequence[bool] = (False, True, True, True)
  repmixer_kernel_size: int = 3
  patch_size: int = 4  # The stem's stride: 4 (two stride-2 convs, the paper) or 2 (its depthwise conv at stride 1).
  head_dim: int = 32
  cls_ratio: float = 2.0
  layer_scale_init_value: float = 1e-5
  inference_mode: bool = False
  drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: Any = False  # bool or a named policy (layers.remat).
  attention_impl: str = 'einsum'  # Attention kernel: 'einsum' | 'xla' | 'cudnn' (vit_jax.models.attention).

  @property
  def num_features(self) -> int:
    """Width of the pooled pre-logits: final_conv's output, cls_ratio x the last stage width."""
    return int(self.embed_dims[-1] * self.cls_ratio)

  def _check_options(self) -> None:
    n = len(self.depths)
    for name in ('embed_dims', 'token_mixers', 'pos_embs', 'downsamples'):
      if len(getattr(self, name)) != n:
        raise ValueError(f'FastViT {name} {tuple(getattr(self, name))} needs one entry per stage (depths '
                         f'{tuple(self.depths)}).')
    if self.patch_size not in (2, 4):
      raise ValueError(f'FastViT patch_size={self.patch_size}: the stem strides by 4 (the paper) or 2 (its '
                       'depthwise conv at stride 1); set model.patch_size to 4 or 2.')
    bad = [m for m in self.token_mixers if m not in TOKEN_MIXERS]
    if bad:
      raise ValueError(f'Unknown FastViT token mixer(s) {bad}; expected {TOKEN_MIXERS}.')

  def setup(self):
    self._check_options()
    n = len(self.depths)
    ratios = layers.per_stage(self.mlp_ratios, n, 'mlp_ratios')
    dpr = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    starts = np.cumsum((0,) + tuple(self.depths))
    dims, mode = tuple(self.embed_dims), dict(inference_mode=self.inference_mode, dtype=self.dtype)
    self.stem = [
        MobileOneBlock(dims[0], 3, stride=2, name='stem_0', **mode),
        MobileOneBlock(dims[0], 3, stride=self.patch_size // 2, groups=dims[0], name='stem_1', **mode),
        MobileOneBlock(dims[0], 1, name='stem_2', **mode)]
    shared = dict(kernel=self.repmixer_kernel_size, head_dim=self.head_dim,
                  layer_scale_init_value=self.layer_scale_init_value, drop=self.proj_drop_rate,
                  dtype=self.dtype, attention_impl=self.attention_impl)
    self.stages = [
        FastViTStage(dims[i], self.depths[i], self.token_mixers[i], ratios[i],
                     downsample=bool(self.downsamples[i]) or dims[i] != dims[max(i - 1, 0)],
                     pos_emb=bool(self.pos_embs[i]),
                     drop_path_rates=tuple(float(r) for r in dpr[starts[i]:starts[i + 1]]), block_kwargs=shared,
                     remat=self.remat, name=f'stages_{i}', **mode)
        for i in range(n)]
    self.final_conv = MobileOneBlock(self.num_features, 3, groups=dims[-1], use_se=True, **mode)
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes > 0:
      self.head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_trunc_normal, bias_init=_zeros)

  def _stages(self, images: Array, train: bool) -> list[Array]:
    if images.ndim != 4:
      raise ValueError(f'Expected NHWC images, got shape {images.shape}.')
    x = images
    for block in self.stem:
      x = block(x, train)
    outs = []
    for stage in self.stages:
      x = stage(x, train)
      outs.append(x)
    return outs

  def forward_intermediates(self, images: Array, *, train: bool = False, norm: bool = False) -> list[Array]:
    """Per-stage NHWC outputs (strides 4, 8, 16, 32 at patch_size 4). FastViT has no norm on the maps (`norm` is
    accepted for the shared API and changes nothing; final_conv belongs to forward_features, as in timm)."""
    del norm
    return self._stages(images, train)

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """final_conv of the last stage map (timm's forward_features), NHWC with num_features channels."""
    return self.final_conv(self._stages(images, train)[-1], train)

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
# Family facts: timm conversion, layer grouping, deploy folding.
# ----------------------------------------------------------------------------------------------------------------

def _layer_scale(key: str, value: np.ndarray, path: str, shapes: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """timm LayerScale2d gamma (C, 1, 1) -> our (C,)."""
  del key, shapes
  return {path: np.asarray(value).reshape(-1)}


def _mobileone_rules(src: str, dst: str) -> tuple:
  """Rules for a MobileOne block at timm prefix regex `src` / our template `dst` (both forms)."""
  return ((src + r'\.conv_kxk\.(\d+)\.conv', dst + r'/conv_kxk_\g<k>/conv', 'conv'),
          (src + r'\.conv_kxk\.(\d+)\.bn', dst + r'/conv_kxk_\g<k>/bn', 'batchnorm'),
          (src + r'\.conv_scale\.conv', dst + '/conv_scale/conv', 'conv'),
          (src + r'\.conv_scale\.bn', dst + '/conv_scale/bn', 'batchnorm'),
          (src + r'\.identity', dst + '/identity', 'batchnorm'),
          (src + r'\.se\.(fc[12])', dst + r'/se/\g<fc>', 'conv'),
          (src + r'\.reparam_conv', dst + '/reparam_conv', 'conv'))


def _named(rules: tuple) -> tuple:
  """Gives the trailing index / fc groups of `_mobileone_rules` their template names."""
  out = []
  for rx, tmpl, kind in rules:
    rx = rx.replace(r'conv_kxk\.(\d+)', r'conv_kxk\.(?P<k>\d+)').replace(r'se\.(fc[12])', r'se\.(?P<fc>fc[12])')
    out.append((rx, tmpl, kind))
  return tuple(out)


_ST = r'stages\.(?P<s>\d+)'
_OS = r'stages_\g<s>'
_BL = _ST + r'\.blocks\.(?P<b>\d+)'
_OB = _OS + r'/blocks_\g<b>'
_TIMM_RULES = (
    *_named(_mobileone_rules(r'stem\.(?P<i>\d+)', r'stem_\g<i>')),
    (_ST + r'\.downsample\.proj\.0\.(?P<c>large_conv|small_conv)\.conv', _OS + r'/downsample/proj_0/\g<c>/conv',
     'conv'),
    (_ST + r'\.downsample\.proj\.0\.(?P<c>large_conv|small_conv)\.bn', _OS + r'/downsample/proj_0/\g<c>/bn',
     'batchnorm'),
    (_ST + r'\.downsample\.proj\.0\.reparam_conv', _OS + '/downsample/proj_0/reparam_conv', 'conv'),
    *_named(_mobileone_rules(_ST + r'\.downsample\.proj\.1', _OS + '/downsample/proj_1')),
    (_ST + r'\.pos_emb\.(?P<c>pos_enc|reparam_conv)', _OS + r'/pos_emb/\g<c>', 'conv'),
    *_named(_mobileone_rules(_BL + r'\.token_mixer\.(?P<m>norm|mixer)', _OB + r'/token_mixer/\g<m>')),
    (_BL + r'\.token_mixer\.reparam_conv', _OB + '/token_mixer/reparam_conv', 'conv'),
    (_BL + r'\.token_mixer\.layer_scale\.gamma', _OB + '/token_mixer/layer_scale/gamma', _layer_scale),
    (_BL + r'\.token_mixer\.(?P<l>qkv|proj)', _OB + r'/token_mixer/\g<l>', 'linear'),
    (_BL + r'\.norm', _OB + '/norm', 'batchnorm'),
    (_BL + r'\.(?P<l>layer_scale|layer_scale_1|layer_scale_2)\.gamma', _OB + r'/\g<l>/gamma', _layer_scale),
    (_BL + r'\.mlp\.conv\.conv', _OB + '/mlp/conv/conv', 'conv'),
    (_BL + r'\.mlp\.conv\.bn', _OB + '/mlp/conv/bn', 'batchnorm'),
    (_BL + r'\.mlp\.(?P<l>fc1|fc2)', _OB + r'/mlp/\g<l>', 'conv'),
    *_named(_mobileone_rules(r'final_conv', 'final_conv')),
    (r'head\.fc', 'head', 'linear'),
)
_TIMM_IGNORE = (r'.*\.num_batches_tracked',)


def _fused_branch(params: Mapping[str, Any], stats: Mapping[str, Any]) -> tuple[Array, Array]:
  """(kernel, bias) of a ConvBN branch with its BatchNorm folded in."""
  from vit_jax import deploy  # pylint: disable=g-import-not-at-top  (deploy imports the registry: no cycle)
  bn, bs = params['bn'], stats['bn']
  return deploy.fold_batchnorm(params['conv']['kernel'], None, scale=bn['scale'], offset=bn['bias'],
                               mean=bs['mean'], var=bs['var'], epsilon=1e-5)


def _fused_mobileone(params: Mapping[str, Any], stats: Mapping[str, Any], *, size: tuple[int, int],
                     groups: int) -> tuple[Array, Array]:
  """(kernel, bias) of a train-form MobileOne block's branches summed into one conv of `size` x `groups`."""
  from vit_jax import deploy  # pylint: disable=g-import-not-at-top
  kernel, bias = 0.0, 0.0
  for name in sorted(params):
    if name.startswith('conv_kxk_') or name == 'conv_scale':
      k, b = _fused_branch(params[name], stats[name])
      kernel, bias = kernel + deploy.pad_kernel_to(k, size), bias + b
  if 'identity' in params:
    bn, bs = params['identity'], stats['identity']
    channels = bn['scale'].shape[0]
    k, b = deploy.fold_batchnorm(deploy.identity_kernel(channels, size, groups=groups), None, scale=bn['scale'],
                                 offset=bn['bias'], mean=bs['mean'], var=bs['var'], epsilon=1e-5)
    kernel, bias = kernel + k, bias + b
  return kernel, bias


def _fold_tree(params: Mapping[str, Any], stats: Mapping[str, Any]) -> tuple[dict, dict]:
  """Deploy-form (params, batch_stats) of one module subtree: every re-parameterisable module (recognised by its
  branch names) becomes {'reparam_conv': {kernel, bias}}; the rest is copied."""
  from vit_jax import deploy  # pylint: disable=g-import-not-at-top
  names = set(params)
  if {'norm', 'mixer', 'layer_scale'} <= names:  # RepMixer: x + g * (mixer(x) - norm(x)) as one depthwise conv.
    mixer, stats_m = params['mixer'], stats['mixer']
    ref = mixer['conv_kxk_0']['conv']['kernel']
    size, channels = tuple(ref.shape[:2]), ref.shape[-1]
    km, bm = _fused_mobileone(mixer, stats_m, size=size, groups=channels)
    kn, bn = _fused_mobileone(params['norm'], stats['norm'], size=size, groups=channels)
    gamma = params['layer_scale']['gamma']
    kernel = deploy.identity_kernel(channels, size, groups=channels) + gamma * (km - kn)
    return {'reparam_conv': {'kernel': kernel, 'bias': gamma * (bm - bn)}}, {}
  if 'conv_kxk_0' in names:  # MobileOne block (keeps its SE).
    ref = params['conv_kxk_0']['conv']['kernel']
    size, per_group, out = tuple(ref.shape[:2]), ref.shape[2], ref.shape[3]
    kernel, bias = _fused_mobileone(params, stats, size=size, groups=out // per_group if 'identity' in names else 1)
    folded = {'reparam_conv': {'kernel': kernel, 'bias': bias}}
    if 'se' in params:
      folded['se'] = params['se']
    return folded, {}
  if 'large_conv' in names:  # RepLKNet conv: large + small branch.
    kl, bl = _fused_branch(params['large_conv'], stats['large_conv'])
    ks, bs = _fused_branch(params['small_conv'], stats['small_conv'])
    return {'reparam_conv': {'kernel': kl + deploy.pad_kernel_to(ks, tuple(kl.shape[:2])), 'bias': bl + bs}}, {}
  if names == {'pos_enc'}:  # Conditional positional encoding: x + dwconv(x).
    k = params['pos_enc']['kernel']
    kernel = k + deploy.identity_kernel(k.shape[-1], tuple(k.shape[:2]), groups=k.shape[-1])
    return {'reparam_conv': {'kernel': kernel, 'bias': params['pos_enc']['bias']}}, {}
  out_p, out_s = {}, {}
  for name, sub in params.items():
    if isinstance(sub, Mapping) and any(isinstance(v, Mapping) for v in sub.values()):
      p, s = _fold_tree(sub, stats.get(name, {}))
    else:  # A leaf module (conv, dense, norm, layer scale): copied with its statistics.
      p, s = sub, stats.get(name, {})
    out_p[name] = p
    if s:
      out_s[name] = s
  return out_p, out_s


def fold(options: Mapping[str, Any], variables: Mapping[str, Any]) -> tuple[dict, dict]:
  """FamilyFacts.fold: the deploy form (inference_mode=True) of trained train-form variables, same logits.

  Every MobileOne block, large-kernel conv, RepMixer and positional encoding becomes one conv with bias (timm's
  `reparameterize_model`); BatchNorms outside those (ConvMlp, attention norm) keep their statistics.
  """
  if options.get('inference_mode'):
    return dict(options), dict(variables)
  if 'batch_stats' not in variables:
    raise ValueError('FastViT folding needs the BatchNorm running statistics: pass {"params": ..., '
                     '"batch_stats": ...} (what model.init / convert.timm_to_params return).')
  params, stats = _fold_tree(variables['params'], variables['batch_stats'])
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  return {**options, 'inference_mode': True}, {'params': params, 'batch_stats': stats}


def _mobileone_macs(side: int, in_ch: int, out_ch: int, kernel: int, groups: int, inference_mode: bool,
                    use_scale_branch: bool = True, num_conv_branches: int = 1) -> int:
  """A MobileOneBlock's convs on a side x side output: the one re-parameterised k x k conv, or the train-time
  k x k branches plus the 1x1 scale branch (the BatchNorm identity branch has no multiply-adds)."""
  if inference_mode:
    return layers.conv_macs(side, in_ch, out_ch, kernel, groups)
  scale = 1 if kernel > 1 and use_scale_branch else 0
  return (num_conv_branches * layers.conv_macs(side, in_ch, out_ch, kernel, groups)
          + scale * layers.conv_macs(side, in_ch, out_ch, 1, groups))


def forward_macs(model: FastViT, image_size: int) -> float:
  """Multiply-adds of one forward pass on one image (convs, linears and the attention matmuls; BatchNorm, layer
  scales, activations and pooling are not counted, as the paper's FLOPs).

  Counts the form the model is built in: with inference_mode=True the re-parameterised deploy form the paper
  reports (one conv per MobileOne block, RepMixer and positional encoding), otherwise the train-time branches too.
  On an s x s map of width C: RepMixer s^2 9 C (+ s^2 C for the 1x1 branch in train form), ConvMlp
  s^2 C (49 + 2 hidden), attention s^2 4 C^2 + 2 s^4 C, positional encoding s^2 49 C.
  """
  deploy = bool(model.inference_mode)
  dims = tuple(model.embed_dims)
  ratios = layers.per_stage(model.mlp_ratios, len(dims), 'mlp_ratios')
  s = layers.conv_side(image_size, 3, 2)
  macs = _mobileone_macs(s, 3, dims[0], 3, 1, deploy)
  s = layers.conv_side(s, 3, model.patch_size // 2)
  macs += _mobileone_macs(s, dims[0], dims[0], 3, dims[0], deploy)
  macs += _mobileone_macs(s, dims[0], dims[0], 1, 1, deploy)
  c = dims[0]
  for i, dim in enumerate(dims):
    if model.downsamples[i] or dim != dims[max(i - 1, 0)]:
      s = layers.conv_side(s, 7, 2)
      macs += layers.conv_macs(s, c, dim, 7, c) + (0 if deploy else layers.conv_macs(s, c, dim, 3, c))
      macs += _mobileone_macs(s, dim, dim, 1, 1, deploy)
    c = dim
    if model.pos_embs[i]:
      macs += layers.conv_macs(s, c, c, 7, c)
    n, hidden = s * s, int(c * ratios[i])
    if model.token_mixers[i] == 'repmixer':
      mixer = _mobileone_macs(s, c, c, model.repmixer_kernel_size, c, deploy)
    else:
      mixer = n * c * 3 * c + 2 * n * n * c + n * c * c
    mlp = layers.conv_macs(s, c, c, 7, c) + 2 * n * c * hidden
    macs += model.depths[i] * (mixer + mlp)
  out = model.num_features
  macs += _mobileone_macs(s, c, out, 3, c, deploy) + 2 * out * se_width(out)
  return float(macs + out * max(model.num_classes, 0))


FACTS = facts.register_family(facts.FamilyFacts(
    name='fastvit',
    layouts={'timm': facts.ConversionTable(_TIMM_RULES, _TIMM_IGNORE, source_heads=('head.fc',))},
    grouping=facts.LayerGrouping(
        blocks=((r'^stages_(\d+)/blocks_(\d+)/', 'block2'), (r'^stages_(\d+)/(downsample|pos_emb)/', 'before')),
        stem=r'^stem_'),
    forward_macs=forward_macs,
    heads=('head',),
    fold=fold,
))


# ----------------------------------------------------------------------------------------------------------------
# Registry. Counts with timm 1.0.31 at 1000 classes (sum of parameter numel; BatchNorm statistics are buffers);
# after timm's reparameterize_model: t8 3,996,040, t12 7,508,840, s12 9,428,712, sa12 11,545,320, sa24 21,501,288
# (FUSED_COUNTS). timm's default input is 256 px (counts do not depend on it).
# ----------------------------------------------------------------------------------------------------------------

_SA = dict(token_mixers=('repmixer',) * 3 + ('attention',), pos_embs=(False, False, False, True))
_VARIANTS = {  # name: (depths, embed_dims, mlp_ratio, extra, count, fused count)
    't8': ((2, 2, 4, 2), (48, 96, 192, 384), 3.0, {}, 4_026_232, 3_996_040),
    't12': ((2, 2, 6, 2), (64, 128, 256, 512), 3.0, {}, 7_553_704, 7_508_840),
    's12': ((2, 2, 6, 2), (64, 128, 256, 512), 4.0, {}, 9_473_576, 9_428_712),
    'sa12': ((2, 2, 6, 2), (64, 128, 256, 512), 4.0, _SA, 11_580_968, 11_545_320),
    'sa24': ((4, 4, 12, 4), (64, 128, 256, 512), 4.0, _SA, 21_554_216, 21_501_288),
}
FUSED_COUNTS = {f'fastvit_{v}': spec[5] for v, spec in _VARIANTS.items()}
for _v, (_depths, _dims, _ratio, _extra, _count, _) in _VARIANTS.items():
  registry.register_model(f'fastvit_{_v}', FastViT, family='fastvit', image_size=256, num_params=_count,
                          timm_name=f'fastvit_{_v}.apple_in1k', depths=_depths, embed_dims=_dims,
                          mlp_ratios=_ratio, **_extra)
