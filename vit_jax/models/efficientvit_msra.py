"""EfficientViT-M (Liu et al. 2023, "EfficientViT: Memory Efficient Vision Transformer with Cascaded Group
Attention", MSRA), as timm's `efficientvit_msra.py`, on NHWC maps.

  patch_embed/conv{1..n}            n = log2(patch_size) 3x3 stride-2 ConvNorms (widths C0/2^(n-1) .. C0), ReLU between
  stages_{i}/downsample             (i > 0) res1 (dw 3x3 + FFN, residual), patchmerge (1x1 to 4C, ReLU, 3x3 stride-2
                                    depthwise, ReLU, squeeze-excitation, 1x1 to C'), res2 (dw 3x3 + FFN, residual)
  stages_{i}/blocks_{j}             x + dw0(x); x + ffn0(x); x + mixer(x); x + dw1(x); x + ffn1(x)
  head_norm, head                   BatchNorm1d + Linear on the mean-pooled map (timm head.bn / head.linear)

Every conv is a `ConvNorm` (bias-free conv + BatchNorm eps 1e-5; levit.ConvNorm with timm's inner name 'conv'). The
FFN is 1x1 ConvNorm (2C) -> ReLU -> 1x1 ConvNorm (C). The token mixer (timm LocalWindowAttention) runs cascaded
group attention in ws x ws windows, ws = min(window_size, map size) (the map zero-padded at the bottom/right to whole
windows, cropped back after): the channels are split into one chunk per head; head h attends on its chunk plus the
previous head's output (the cascade), with its own 1x1 ConvNorm giving [q | k | v] (key_dim, key_dim, C / heads),
a depthwise kxk ConvNorm on q (kernels[h]), softmax(q k^T key_dim^-0.5 + B_h) v with a learned table B over the
|dy| * ws + |dx| window offsets; the heads' outputs are concatenated, then ReLU and a 1x1 ConvNorm projection.

timm's model has no stochastic depth; `drop_path_rate` (default 0) drops the five residual branches of every block
at one rate, as LeViT (the paper builds on it).

Deploy form (`deploy=True`, built by `fold` = FamilyFacts.fold): every ConvNorm one conv with a bias, the head's
BatchNorm folded into its Linear - timm's `fuse()`, with the same parameter count.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import facts
from vit_jax.models import layers
from vit_jax.models import levit
from vit_jax.models import registry
from vit_jax.models.conv import Conv
from vit_jax.models.layers import DropPath, logical

Array = jax.Array

BN_EPS = levit.BN_EPS


def _make_divisible(value: float, divisor: int = 8) -> int:
  """timm's make_divisible with round_limit 0 (the squeeze-excitation width)."""
  return max(divisor, int(value + divisor / 2) // divisor * divisor)


class ConvNorm(levit.ConvNorm):
  """levit.ConvNorm with timm EfficientViT-M's inner name ('conv', always a conv)."""
  kernel_size: Optional[int] = 1
  inner_name: str = 'conv'


class SqueezeExcite(nn.Module):
  """x * sigmoid(fc2(ReLU(fc1(mean over H, W)))) with 1x1 convs with bias (timm SEModule, rd_ratio 0.25)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    conv = lambda features, name: Conv(features, (1, 1), dtype=self.dtype, name=name,
                                       kernel_init=logical(levit._torch_default, (None, None, None, 'embed')))  # pylint: disable=protected-access
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = conv(c, 'fc2')(jax.nn.relu(conv(_make_divisible(c * 0.25), 'fc1')(s)))
    return x * jax.nn.sigmoid(s)


class ConvMlp(nn.Module):
  """1x1 ConvNorm to `hidden` -> ReLU -> 1x1 ConvNorm back (its BatchNorm scale starts at 0)."""
  hidden: int
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    cn = dict(deploy=self.deploy, dtype=self.dtype)
    y = jax.nn.relu(ConvNorm(self.hidden, name='pw1', **cn)(x, train))
    return ConvNorm(x.shape[-1], bn_scale_init=0.0, name='pw2', **cn)(y, train)


class CascadedGroupAttention(nn.Module):
  """Cascaded group attention on (windows, ws, ws, C) maps (timm CascadedGroupAttention)."""
  key_dim: int
  num_heads: int
  kernels: Sequence[int]
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    b, h, w, c = x.shape
    heads, kd = self.num_heads, self.key_dim
    if c % heads:
      raise ValueError(f'EfficientViT-M splits its {c} channels into num_heads={heads} equal chunks.')
    if len(self.kernels) < heads:
      raise ValueError(f'kernels {tuple(self.kernels)} needs one query kernel size per head ({heads}).')
    vd = c // heads
    cn = dict(deploy=self.deploy, dtype=self.dtype)
    table = levit._bias_table(self, heads, (h, w))  # pylint: disable=protected-access
    bias = table[:, levit.attention_bias_index((h, w), (h, w), 1)]  # (heads, N, N)
    chunks = jnp.split(x, heads, axis=-1)
    outs, feat = [], chunks[0]
    for i in range(heads):
      if i:
        feat = feat + chunks[i]
      qkv = ConvNorm(2 * kd + vd, name=f'qkvs_{i}', **cn)(feat, train)
      q, k, v = qkv[..., :kd], qkv[..., kd:2 * kd], qkv[..., 2 * kd:]
      q = ConvNorm(kd, kernel_size=self.kernels[i], groups=kd, name=f'dws_{i}', **cn)(q, train)
      q, k, v = (t.reshape(b, h * w, -1) for t in (q, k, v))
      logits = jnp.einsum('bqd,bkd->bqk', q * (kd ** -0.5), k).astype(jnp.float32) + bias[i]
      attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      feat = jnp.einsum('bqk,bkd->bqd', attn, v).reshape(b, h, w, vd)
      outs.append(feat)
    y = jax.nn.relu(jnp.concatenate(outs, axis=-1))
    return ConvNorm(c, bn_scale_init=0.0, name='proj', **cn)(y, train)


def window_partition(x: Array, ws: int) -> tuple[Array, tuple[int, int]]:
  """(B, H, W, C) zero-padded at the bottom/right to whole ws x ws windows -> (B * nH * nW, ws, ws, C), and the
  padded size (timm LocalWindowAttention)."""
  b, h, w, c = x.shape
  ph, pw = -h % ws, -w % ws
  x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  hp, wp = h + ph, w + pw
  x = x.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, ws, ws, c), (hp, wp)


def window_reverse(windows: Array, ws: int, padded: tuple[int, int], size: tuple[int, int]) -> Array:
  """The inverse of `window_partition`, cropped back to `size`."""
  hp, wp = padded
  c = windows.shape[-1]
  x = windows.reshape(-1, hp // ws, wp // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)
  return x[:, :size[0], :size[1]]


class LocalWindowAttention(nn.Module):
  """Cascaded group attention in ws x ws windows, ws = min(window_size, map size) (one window: no partition)."""
  key_dim: int
  num_heads: int
  window_size: int
  kernels: Sequence[int]
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    _, h, w, _ = x.shape
    ws = min(self.window_size, h, w)
    attn = CascadedGroupAttention(self.key_dim, self.num_heads, self.kernels, deploy=self.deploy, dtype=self.dtype,
                                  name='attn')
    if h == ws and w == ws:
      return attn(x, train)
    windows, padded = window_partition(x, ws)
    return window_reverse(attn(windows, train), ws, padded, (h, w))


class ResidualDwFfn(nn.Module):
  """x + dw(x); x + ffn(x): a depthwise 3x3 ConvNorm and an FFN, each residual (timm's res1 / res2)."""
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    c = x.shape[-1]
    cn = dict(deploy=self.deploy, dtype=self.dtype)
    x = x + ConvNorm(c, kernel_size=3, groups=c, name='dw', **cn)(x, train)
    return x + ConvMlp(2 * c, name='ffn', **cn)(x, train)


class PatchMerging(nn.Module):
  """1x1 ConvNorm to 4C -> ReLU -> 3x3 stride-2 depthwise ConvNorm -> ReLU -> squeeze-excitation -> 1x1 ConvNorm."""
  out_dim: int
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    hid = 4 * x.shape[-1]
    cn = dict(deploy=self.deploy, dtype=self.dtype)
    x = jax.nn.relu(ConvNorm(hid, name='conv1', **cn)(x, train))
    x = jax.nn.relu(ConvNorm(hid, kernel_size=3, stride=2, groups=hid, name='conv2', **cn)(x, train))
    x = SqueezeExcite(dtype=self.dtype, name='se')(x)
    return ConvNorm(self.out_dim, name='conv3', **cn)(x, train)


class EfficientVitBlock(nn.Module):
  """x + dw0(x); x + ffn0(x); x + mixer(x); x + dw1(x); x + ffn1(x), each branch through DropPath."""
  key_dim: int
  num_heads: int
  window_size: int
  kernels: Sequence[int]
  drop_path_rate: float = 0.0
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    c = x.shape[-1]
    cn = dict(deploy=self.deploy, dtype=self.dtype)
    drop = lambda y: DropPath(self.drop_path_rate)(y, deterministic=not train)
    dw = lambda name: ConvNorm(c, kernel_size=3, groups=c, bn_scale_init=0.0, name=name, **cn)
    x = x + drop(dw('dw0')(x, train))
    x = x + drop(ConvMlp(2 * c, name='ffn0', **cn)(x, train))
    x = x + drop(LocalWindowAttention(self.key_dim, self.num_heads, self.window_size, self.kernels, name='mixer',
                                      **cn)(x, train))
    x = x + drop(dw('dw1')(x, train))
    return x + drop(ConvMlp(2 * c, name='ffn1', **cn)(x, train))


class Downsample(nn.Module):
  """res1 -> patchmerge (stride 2, to out_dim) -> res2 (timm's ('subsample', 2) stage entry)."""
  out_dim: int
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    cn = dict(deploy=self.deploy, dtype=self.dtype)
    x = ResidualDwFfn(name='res1', **cn)(x, train)
    x = PatchMerging(self.out_dim, name='patchmerge', **cn)(x, train)
    return ResidualDwFfn(name='res2', **cn)(x, train)


class EfficientVitStage(nn.Module):
  out_dim: int
  depth: int
  key_dim: int
  num_heads: int
  window_size: int
  kernels: Sequence[int]
  downsample: bool
  drop_path_rate: float = 0.0
  remat: Union[bool, str] = False
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    cn = dict(deploy=self.deploy, dtype=self.dtype)
    if self.downsample:
      x = Downsample(self.out_dim, name='downsample', **cn)(x, train)
    block_cls = layers.remat(EfficientVitBlock, self.remat, static_argnums=(2,))
    for j in range(self.depth):
      x = block_cls(self.key_dim, self.num_heads, self.window_size, tuple(self.kernels),
                    drop_path_rate=self.drop_path_rate, name=f'blocks_{j}', **cn)(x, train)
    return x


class EfficientVitMsra(nn.Module):
  """EfficientViT-M classifier on NHWC images (timm EfficientVitMsra; stage 0 without downsampling, the later
  stages entered by ('subsample', 2)).

  patch_size is the stem's stride (a power of two; 16 in every published model). drop_rate is the dropout before
  the classifier. num_classes=0 gives a model whose logits are the pooled pre-logits.
  """
  num_classes: int = 1000
  patch_size: int = 16
  embed_dim: Sequence[int] = (64, 128, 192)
  key_dim: Union[int, Sequence[int]] = 16
  depth: Sequence[int] = (1, 2, 3)
  num_heads: Sequence[int] = (4, 4, 4)
  window_size: Union[int, Sequence[int]] = 7
  kernels: Sequence[int] = (5, 5, 5, 5)
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  deploy: bool = False  # BatchNorm folded into the convs (vit_jax.deploy.fold_for_inference builds it).
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False

  @property
  def num_features(self) -> int:
    return int(self.embed_dim[-1])

  @property
  def stem_convs(self) -> int:
    return int(round(math.log2(self.patch_size)))

  def setup(self):
    n = len(self.embed_dim)
    if len(self.depth) != n:
      raise ValueError(f'embed_dim {tuple(self.embed_dim)} and depth {tuple(self.depth)} need one value per stage.')
    if self.patch_size < 2 or 2 ** self.stem_convs != self.patch_size:
      raise ValueError(f'EfficientViT-M patch_size is the stem stride, a power of two >= 2 (16 in the published '
                       f'models); got {self.patch_size}.')
    heads = layers.per_stage(self.num_heads, n, 'num_heads')
    key_dim = layers.per_stage(self.key_dim, n, 'key_dim')
    window = layers.per_stage(self.window_size, n, 'window_size')
    self.patch_embed = levit.Stem(self.embed_dim[0], self.stem_convs, act=jax.nn.relu, inner_name='conv',
                                  deploy=self.deploy, dtype=self.dtype)
    self.stages = [
        EfficientVitStage(out_dim=self.embed_dim[i], depth=self.depth[i], key_dim=key_dim[i], num_heads=heads[i],
                          window_size=window[i], kernels=tuple(self.kernels), downsample=i > 0,
                          drop_path_rate=self.drop_path_rate, remat=self.remat, deploy=self.deploy, dtype=self.dtype)
        for i in range(n)]
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes > 0:
      if not self.deploy:  # timm's head.bn (folded into the linear in deploy form).
        self.head_norm = nn.BatchNorm(momentum=0.9, epsilon=BN_EPS, dtype=self.dtype, axis_name=None)
      self.head = nn.Dense(self.num_classes, dtype=self.dtype,
                           kernel_init=logical(levit._trunc_normal, ('embed', 'classes')),  # pylint: disable=protected-access
                           bias_init=logical(nn.initializers.zeros, ('classes',)))

  def stage_resolutions(self, height: int, width: int) -> list[tuple[int, int]]:
    """(H, W) of every stage map: each stride-2 conv gives ceil(x / 2), as PyTorch's."""
    for _ in range(self.stem_convs):
      height, width = (height + 1) // 2, (width + 1) // 2
    out = [(height, width)]
    for _ in range(len(self.embed_dim) - 1):
      height, width = (height + 1) // 2, (width + 1) // 2
      out.append((height, width))
    return out

  def forward_intermediates(self, images: Array, *, train: bool = False, norm: bool = False) -> list[Array]:
    """Per-stage NHWC maps (strides patch_size, 2x, 4x). No final norm (`norm` changes nothing)."""
    del norm
    if images.ndim != 4:
      raise ValueError(f'Expected NHWC images, got shape {images.shape}.')
    if images.shape[1] < self.patch_size or images.shape[2] < self.patch_size:
      raise ValueError(f'Input size {images.shape[1]}x{images.shape[2]} is too small for this EfficientViT-M (stem '
                       f'stride {self.patch_size}); use images of at least {self.patch_size}x{self.patch_size} px.')
    x = self.patch_embed(images.astype(self.dtype), train)
    outs = []
    for stage in self.stages:
      x = stage(x, train)
      outs.append(x)
    return outs

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """The last stage's NHWC map (timm's forward_features, NHWC)."""
    return self.forward_intermediates(images, train=train)[-1]

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False) -> Array:
    """Mean over H and W (the pre-logits), then BatchNorm, dropout and the classifier (float32 logits)."""
    x = jnp.mean(features, axis=(1, 2))
    if pre_logits or self.num_classes == 0:
      return x
    if not self.deploy:
      x = self.head_norm(x, use_running_average=not train)
    return self.head(self.head_drop(x, deterministic=not train)).astype(jnp.float32)

  def __call__(self, images: Array, *, train: bool = False) -> Array:
    return self.forward_head(self.forward_features(images, train=train), train=train)


# ----------------------------------------------------------------------------------------------------------------
# Family facts: timm key table, layer grouping, bias-table resizing, deploy folding.
# ----------------------------------------------------------------------------------------------------------------

def _cn(timm_module: str, ours: str) -> tuple[facts.Rule, facts.Rule]:
  return levit.conv_norm_rules(timm_module, ours, 'conv', inner='conv')


_TD = r'stages\.(\d+)\.downsample\.'
_OD = r'stages_\1/downsample/'
_TB = r'stages\.(\d+)\.blocks\.(\d+)\.'
_OB = r'stages_\1/blocks_\2/'
TIMM_RULES: tuple[facts.Rule, ...] = (
    *_cn(r'patch_embed\.conv(\d+)', r'patch_embed/conv\1'),
    *_cn(_TD + r'(res[12])\.0\.m', _OD + r'\2/dw'),
    *_cn(_TD + r'(res[12])\.1\.m\.(pw[12])', _OD + r'\2/ffn/\3'),
    *_cn(_TD + r'patchmerge\.(conv[123])', _OD + r'patchmerge/\2'),
    (_TD + r'patchmerge\.se\.(fc[12])', _OD + r'patchmerge/se/\2', 'conv'),
    *_cn(_TB + r'(dw[01])\.m', _OB + r'\3'),
    *_cn(_TB + r'(ffn[01])\.m\.(pw[12])', _OB + r'\3/\4'),
    *_cn(_TB + r'mixer\.m\.attn\.(qkvs|dws)\.(\d+)', _OB + r'mixer/attn/\3_\4'),
    *_cn(_TB + r'mixer\.m\.attn\.proj\.1', _OB + 'mixer/attn/proj'),
    (_TB + r'mixer\.m\.attn\.attention_biases', _OB + 'mixer/attn/attention_biases', 'rel_table'),
    (r'head\.bn', 'head_norm', 'batchnorm'),
    (r'head\.linear', 'head', 'linear'),
)
# timm's group_matcher: the patch embedding is layer 0; a stage's downsampling goes with its first block. The
# cascaded attention ('mixer/attn/') has its own rule: PVTv2 and MViTv2 share the stages_/blocks_/patch_embed
# names, and param_groups tells groupings that fit equally well apart by the number of rules they use.
GROUPING = facts.LayerGrouping(
    blocks=((r'^stages_(\d+)/blocks_(\d+)/mixer/attn/', 'block2'), (r'^stages_(\d+)/blocks_(\d+)/', 'block2'),
            (r'^stages_(\d+)/downsample/', 'before')),
    stem=r'^patch_embed/')


def _resize(path: str, value: np.ndarray, shape: tuple, context: Any) -> Optional[np.ndarray]:
  """FamilyFacts.resize: a window's bias table (heads, ws * ws) resized as timm's checkpoint filter (bicubic,
  antialiased) where the window differs (ws = min(window_size, map size))."""
  del context
  if not path.endswith('/attention_biases'):
    return None
  return levit.resize_bias_table(value, shape)


def fold(options: Mapping[str, Any], variables: Mapping[str, Any]) -> tuple[dict, dict]:
  """FamilyFacts.fold: every ConvNorm's BatchNorm into its conv, the head's BatchNorm into its Linear."""
  from vit_jax import deploy  # pylint: disable=g-import-not-at-top  (deploy sits above the models)
  if 'batch_stats' not in variables:
    raise ValueError('Folding EfficientViT-M needs its BatchNorm statistics: pass {"params": ..., '
                     '"batch_stats": ...}.')
  params, stats = dict(variables['params']), dict(variables['batch_stats'])
  if 'head_norm' in params:
    norm = params.pop('head_norm')
    kernel, bias = deploy.fold_batchnorm_before(
        params['head']['kernel'], params['head']['bias'], scale=norm['scale'], offset=norm['bias'],
        mean=stats['head_norm']['mean'], var=stats.pop('head_norm')['var'], epsilon=BN_EPS)
    params['head'] = {'kernel': kernel, 'bias': bias}
  folded = deploy.fold_batchnorm_pairs(params, stats, layer='conv', norm='bn', epsilon=BN_EPS)
  return {**options, 'deploy': True}, {'params': folded}


FACTS = facts.register_family(facts.FamilyFacts(
    name='efficientvit_msra',
    layouts={'timm': facts.ConversionTable(TIMM_RULES, source_heads=('head.linear',))},
    grouping=GROUPING,
    forward_macs=None,  # XLA's cost analysis (windowed cascaded attention, SE, depthwise convs).
    resize=_resize, heads=('head',), fold=fold))


# ----------------------------------------------------------------------------------------------------------------
# Registry: timm 1.0.31's counts at 224 px, 1000 classes (sum of parameter numel); the BatchNorm-fused counts are
# in tests/test_levit_efficientvit.py. key_dim 16 and windows 7 in every variant.
# ----------------------------------------------------------------------------------------------------------------

_VARIANTS = {  # name: (embed_dim, depth, num_heads, kernels, num_params)
    'efficientvit_m0': ((64, 128, 192), (1, 2, 3), (4, 4, 4), (5, 5, 5, 5), 2_349_436),
    'efficientvit_m1': ((128, 144, 192), (1, 2, 3), (2, 3, 3), (7, 5, 3, 3), 2_980_560),
    'efficientvit_m2': ((128, 192, 224), (1, 2, 3), (4, 3, 2), (7, 5, 3, 3), 4_187_554),
    'efficientvit_m3': ((128, 240, 320), (1, 2, 3), (4, 3, 4), (5, 5, 5, 5), 6_900_722),
    'efficientvit_m4': ((128, 256, 384), (1, 2, 3), (4, 4, 4), (7, 5, 3, 3), 8_804_228),
    'efficientvit_m5': ((192, 288, 384), (1, 3, 4), (3, 3, 4), (7, 5, 3, 3), 12_473_772),
}
for _name, (_dims, _depth, _heads, _kernels, _count) in _VARIANTS.items():
  registry.register_model(_name, EfficientVitMsra, family='efficientvit_msra', image_size=224, num_params=_count,
                          timm_name=f'{_name}.r224_in1k', embed_dim=_dims, depth=_depth, num_heads=_heads,
                          kernels=_kernels, key_dim=16, window_size=7)
