"""MaxViT (Tu et al. 2022, "MaxViT: Multi-Axis Vision Transformer"), laid out like timm's `maxxvit.py`.

Every block is MBConv -> block (window) attention -> grid attention, each attention followed by its MLP:

  stem: conv 3x3 s2 (bias) -> BatchNorm + GELU -> conv 3x3 (bias)                          stride 2
  4 stages, the first block of each strides by 2:                                           strides 4, 8, 16, 32
    MBConv (pre-norm BN, 1x1 expand x4 of the output width, BN + GELU, depthwise 3x3 (the stride), BN + GELU,
            squeeze-excitation (SiLU, 1/4 of the output width), 1x1 project with bias; shortcut = 2x2 average
            pool and a 1x1 conv (bias) where the width changes)
    block attention: x + attn(LN(x)) on non-overlapping P x P windows, then x + MLP(LN(x))
    grid attention:  the same on a P x P grid of tokens strided over the whole map (dilated, global mixing)
  head (timm NormMlpClassifierHead): mean over H, W -> LayerNorm -> Linear + tanh (pre-logits) -> Linear

Attention: head dim 32, qkv and proj with bias, scale head_dim^-0.5, a learned 2-D relative position bias per
block attention, P = img_size // 32 (7 at 224 px), so the bias tables (and the parameter count) grow with the
resolution the model is built for.

Two numerics, both the paper's architecture (equal parameter counts):
  - `maxvit_t` / `maxvit_s` / `maxvit_b`: PyTorch conventions, i.e. timm's MaxxVitCfg defaults: symmetric conv
    padding, BatchNorm eps 1e-5, LayerNorm eps 1e-6, exact GELU, qkv channels grouped per head
    ([q_h, k_h, v_h] for each head h: `head_first=True`), a Swin-style bias table ((2P-1)^2, heads) indexed by
    query - key (`rel_pos_type='bias'`).
  - `maxvit_*_tf_224`: the official TensorFlow weights as timm ports them (`maxvit_tiny_tf_224.in1k`, ...): TF
    "SAME" padding (asymmetric for the strided 3x3 convs and pools, here explicit pads), BatchNorm eps 1e-3,
    LayerNorm eps 1e-5, tanh GELU, qkv channels [q | k | v] (`head_first=False`) and a (heads, 2P-1, 2P-1) table
    indexed by key - query (`rel_pos_type='bias_tf'`).

Parameter names mirror timm, so a timm state dict converts with a short table:

  stem/{conv1,norm1,conv2}                                  timm stem.*
  stages_{i}/blocks_{j}/conv/{pre_norm,conv1_1x1,norm1,conv2_kxk,norm2,conv3_1x1}
  stages_{i}/blocks_{j}/conv/shortcut_expand                 timm ...conv.shortcut.expand (width changes only)
  stages_{i}/blocks_{j}/conv/se/{fc1,fc2}
  stages_{i}/blocks_{j}/attn_{block,grid}/{norm1,norm2}      LayerNorm
  stages_{i}/blocks_{j}/attn_{block,grid}/attn/{qkv,proj}    Linear
  stages_{i}/blocks_{j}/attn_{block,grid}/attn/rel_pos/relative_position_bias_table
  stages_{i}/blocks_{j}/attn_{block,grid}/mlp/{fc1,fc2}
  norm, pre_logits, head                                    timm head.norm, head.pre_logits.fc, head.fc

BatchNorm statistics live in the `batch_stats` collection (flax BatchNorm, momentum 0.9 = 1 - torch's 0.1);
apply with train=True and mutable=['batch_stats'] to update them.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import attention
from vit_jax.models import facts
from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models import resize
from vit_jax.models.conv import Conv
from vit_jax.models.layers import DropPath

Array = jax.Array
Pads = tuple[tuple[int, int], tuple[int, int]]

PADDINGS = ('torch', 'same')
REL_POS_TYPES = ('bias', 'bias_tf')
PARTITION_RATIO = 32  # timm's partition_ratio: the window / grid side is img_size // 32.

_xavier = nn.initializers.xavier_uniform()


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
  """timm's make_divisible: `value` rounded to a multiple of `divisor`, never more than 10% below it."""
  new = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return new + divisor if new < round_limit * value else new


def conv_pads(size: tuple[int, int], kernel: int, stride: int, padding: str) -> Pads:
  """Explicit (low, high) pads per spatial axis of a conv / pool on a `size` map.

  'torch': PyTorch's symmetric ((stride - 1) + (kernel - 1)) // 2 (timm's get_padding). 'same': TensorFlow SAME,
  total = max((ceil(n / stride) - 1) * stride + kernel - n, 0), the odd pixel at the end (bottom / right).
  """
  if padding == 'torch':
    p = ((stride - 1) + (kernel - 1)) // 2
    return ((p, p), (p, p))
  if padding == 'same':
    out = []
    for n in size:
      total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
      out.append((total // 2, total - total // 2))
    return tuple(out)
  raise ValueError(f'Unknown padding {padding!r}; expected one of {PADDINGS}.')


def window_partition(x: Array, p: tuple[int, int]) -> Array:
  """(B, H, W, C) -> (B * H/ph * W/pw, ph * pw, C): contiguous ph x pw windows, row-major over windows."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p[0], p[0], w // p[1], p[1], c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, p[0] * p[1], c)


def window_reverse(windows: Array, p: tuple[int, int], size: tuple[int, int]) -> Array:
  """Inverse of `window_partition` for a map of `size` (H, W)."""
  (h, w), c = size, windows.shape[-1]
  x = windows.reshape(-1, h // p[0], w // p[1], p[0], p[1], c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, h, w, c)


def grid_partition(x: Array, p: tuple[int, int]) -> Array:
  """(B, H, W, C) -> (B * H/ph * W/pw, ph * pw, C): each group holds a ph x pw grid of tokens H/ph (W/pw) apart."""
  b, h, w, c = x.shape
  x = x.reshape(b, p[0], h // p[0], p[1], w // p[1], c).transpose(0, 2, 4, 1, 3, 5)
  return x.reshape(-1, p[0] * p[1], c)


def grid_reverse(groups: Array, p: tuple[int, int], size: tuple[int, int]) -> Array:
  """Inverse of `grid_partition` for a map of `size` (H, W)."""
  (h, w), c = size, groups.shape[-1]
  x = groups.reshape(-1, h // p[0], w // p[1], p[0], p[1], c).transpose(0, 3, 1, 4, 2, 5)
  return x.reshape(-1, h, w, c)


def rel_pos_index(p: tuple[int, int]) -> np.ndarray:
  """Swin / timm RelPosBias index (P, P) into a ((2ph-1)(2pw-1), heads) table: query - key offsets, row-major."""
  coords = np.stack(np.meshgrid(np.arange(p[0]), np.arange(p[1]), indexing='ij')).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]
  return (rel[0] + p[0] - 1) * (2 * p[1] - 1) + rel[1] + p[1] - 1


def rel_pos_bias(table: Array, p: tuple[int, int], rel_pos_type: str) -> Array:
  """The (heads, P, P) attention bias of a relative-position table, P = ph * pw.

  'bias': table ((2ph-1)(2pw-1), heads), entry [query - key] (timm RelPosBias). 'bias_tf': table
  (heads, 2ph-1, 2pw-1), entry [key - query] (timm RelPosBiasTf, the official TF MaxViT).
  """
  if rel_pos_type == 'bias':
    return table[jnp.asarray(rel_pos_index(p))].transpose(2, 0, 1)
  if rel_pos_type == 'bias_tf':
    rows = np.arange(p[0])[None, :] - np.arange(p[0])[:, None] + p[0] - 1  # [query, key] = key - query + ph - 1
    cols = np.arange(p[1])[None, :] - np.arange(p[1])[:, None] + p[1] - 1
    bias = table[:, rows[:, None, :, None], cols[None, :, None, :]]  # (heads, qh, qw, kh, kw)
    return bias.reshape(table.shape[0], p[0] * p[1], p[0] * p[1])
  raise ValueError(f'Unknown rel_pos_type {rel_pos_type!r}; expected one of {REL_POS_TYPES}.')


def rel_table_shape(p: tuple[int, int], heads: int, rel_pos_type: str) -> tuple[int, ...]:
  if rel_pos_type == 'bias':
    return ((2 * p[0] - 1) * (2 * p[1] - 1), heads)
  if rel_pos_type == 'bias_tf':
    return (heads, 2 * p[0] - 1, 2 * p[1] - 1)
  raise ValueError(f'Unknown rel_pos_type {rel_pos_type!r}; expected one of {REL_POS_TYPES}.')


# ----------------------------------------------------------------------------------------------------------------
# Convolutional parts.
# ----------------------------------------------------------------------------------------------------------------

def _conv_init(fan_out_groups: int = 1):
  """EfficientNet-style init (timm's _init_conv): normal(0, sqrt(2 / fan_out)), fan_out = k*k*out / groups."""
  def init(key, shape, dtype=jnp.float32):
    kh, kw, _, out = shape
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / (kh * kw * out / fan_out_groups))
  return init


def _batch_norm(name: str, eps: float, train: bool, dtype: Any) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=eps, axis_name=None, dtype=dtype,
                      name=name)


def _conv(features, kernel, *, stride=1, groups=1, use_bias=True, padding='torch', dtype=jnp.float32, name):
  """A conv with explicit pads whose params sit directly under `name` (timm's module name)."""
  return Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, feature_group_count=groups,
              use_bias=use_bias, dtype=dtype, kernel_init=_conv_init(groups), bias_init=nn.initializers.zeros,
              name=name)


def avg_pool2(x: Array, padding: str) -> Array:
  """timm Downsample2d 'avg2': 2x2 average pool, stride 2. 'torch': no padding (a trailing odd row/column is
  dropped); 'same': TF SAME zero padding at the end, the zeros counted in the mean (AvgPool2dSame)."""
  if padding == 'same':
    pads = conv_pads(x.shape[1:3], 2, 2, 'same')
    x = jnp.pad(x, ((0, 0),) + pads + ((0, 0),))
  return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='VALID')


class Stem(nn.Module):
  """conv 3x3 (stride `stride`, 2 in MaxViT) -> BatchNorm + GELU -> conv 3x3 (timm maxxvit Stem); NHWC."""
  width: int
  stride: int = 2
  use_bias: bool = True
  padding: str = 'torch'
  bn_eps: float = 1e-5
  gelu_approximate: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    conv = lambda x, stride, name: _conv(self.width, 3, stride=stride, use_bias=self.use_bias,
                                         padding=conv_pads(x.shape[1:3], 3, stride, self.padding),
                                         dtype=self.dtype, name=name)(x)
    x = conv(x, self.stride, 'conv1')
    x = layers.gelu(_batch_norm('norm1', self.bn_eps, train, self.dtype)(x), approximate=self.gelu_approximate)
    return conv(x, 1, 'conv2')


class SqueezeExcite(nn.Module):
  """timm SEModule: x * sigmoid(fc2(silu(fc1(mean_hw(x))))) with 1x1 convs (here Dense on the pooled vector)."""
  reduced: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.silu(_conv(self.reduced, 1, dtype=self.dtype, padding='VALID', name='fc1')(s))
    s = _conv(x.shape[-1], 1, dtype=self.dtype, padding='VALID', name='fc2')(s)
    return x * nn.sigmoid(s)


class MBConv(nn.Module):
  """timm MbConvBlock with MaxViT's settings (expand from the output width, stride in the depthwise conv, SE
  after norm2, output bias): shortcut(x) + DropPath(conv3(SE(act(BN(dw(act(BN(conv1(BN(x)))))))))."""
  out_dim: int
  stride: int = 1
  expand_ratio: float = 4.0
  se_ratio: float = 0.25
  padding: str = 'torch'
  bn_eps: float = 1e-5
  gelu_approximate: bool = False
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    mid = make_divisible(self.out_dim * self.expand_ratio)
    bn = lambda name: _batch_norm(name, self.bn_eps, train, self.dtype)
    act = lambda t: layers.gelu(t, approximate=self.gelu_approximate)
    shortcut = x
    if self.stride == 2:
      shortcut = avg_pool2(shortcut, self.padding)
      if x.shape[-1] != self.out_dim:
        shortcut = _conv(self.out_dim, 1, padding='VALID', dtype=self.dtype, name='shortcut_expand')(shortcut)
    elif x.shape[-1] != self.out_dim:
      raise ValueError(f'MBConv without stride cannot change the width ({x.shape[-1]} -> {self.out_dim}).')
    y = bn('pre_norm')(x)
    y = act(bn('norm1')(_conv(mid, 1, use_bias=False, padding='VALID', dtype=self.dtype, name='conv1_1x1')(y)))
    y = _conv(mid, 3, stride=self.stride, groups=mid, use_bias=False, dtype=self.dtype,
              padding=conv_pads(y.shape[1:3], 3, self.stride, self.padding), name='conv2_kxk')(y)
    y = act(bn('norm2')(y))
    y = SqueezeExcite(int(self.se_ratio * self.out_dim), dtype=self.dtype, name='se')(y)
    y = _conv(self.out_dim, 1, padding='VALID', dtype=self.dtype, name='conv3_1x1')(y)
    return shortcut + DropPath(self.drop_path)(y, deterministic=not train)


# ----------------------------------------------------------------------------------------------------------------
# Attention parts.
# ----------------------------------------------------------------------------------------------------------------

class RelPosAttention(nn.Module):
  """timm AttentionCl with a relative position bias, on (N, P, C) partitions; the bias is the kernel's bias."""
  partition: tuple[int, int]
  dim_head: int = 32
  head_first: bool = True
  rel_pos_type: str = 'bias'
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, length, dim = x.shape
    if dim % self.dim_head:
      raise ValueError(f'Attention width {dim} is not divisible by dim_head={self.dim_head}; pick widths that are '
                       'multiples of dim_head (or set dim_head).')
    heads = dim // self.dim_head
    dense = dict(dtype=self.dtype, kernel_init=_xavier, bias_init=nn.initializers.zeros)
    qkv = nn.Dense(3 * dim, name='qkv', **dense)(x)
    if self.head_first:  # Per head [q, k, v] (timm head_first=True).
      q, k, v = jnp.split(qkv.reshape(n, length, heads, 3 * self.dim_head), 3, axis=-1)
    else:  # [q | k | v], heads inside each (the TF weights).
      qkv = qkv.reshape(n, length, 3, heads, self.dim_head)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    rel = RelPosTable(self.partition, heads, self.rel_pos_type, name='rel_pos')()
    bias = rel_pos_bias(rel, self.partition, self.rel_pos_type)[None].astype(self.dtype)
    out = attention.dot_product_attention(q, k, v, bias=bias, scale=self.dim_head ** -0.5,
                                          implementation=self.attention_impl)
    return nn.Dense(dim, name='proj', **dense)(out.reshape(n, length, dim))


class RelPosTable(nn.Module):
  """Holds `relative_position_bias_table` (timm RelPosBias / RelPosBiasTf), std 0.02."""
  partition: tuple[int, int]
  heads: int
  rel_pos_type: str = 'bias'

  @nn.compact
  def __call__(self) -> Array:
    shape = rel_table_shape(self.partition, self.heads, self.rel_pos_type)
    return self.param('relative_position_bias_table', nn.initializers.truncated_normal(stddev=0.02), shape)


class PartitionAttention(nn.Module):
  """timm PartitionAttentionCl: x + DropPath(attn over partitions of LN(x)), then x + DropPath(MLP(LN(x)))."""
  partition_type: str  # 'block' (windows) or 'grid'.
  partition: tuple[int, int]
  dim_head: int = 32
  mlp_ratio: float = 4.0
  head_first: bool = True
  rel_pos_type: str = 'bias'
  ln_eps: float = 1e-6
  gelu_approximate: bool = False
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    _, h, w, dim = x.shape
    p = self.partition
    if h % p[0] or w % p[1]:
      raise ValueError(f'A {h}x{w} feature map does not split into {p[0]}x{p[1]} partitions. Fix: feed images whose '
                       f'side is a multiple of {PARTITION_RATIO} x the partition size, or set window_size / img_size.')
    split, merge = ((window_partition, window_reverse) if self.partition_type == 'block'
                    else (grid_partition, grid_reverse))
    drop = DropPath(self.drop_path)
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name='norm1')(x)
    y = RelPosAttention(p, self.dim_head, self.head_first, self.rel_pos_type, dtype=self.dtype,
                        attention_impl=self.attention_impl, name='attn')(split(y, p))
    x = x + drop(merge(y, p, (h, w)), deterministic=not train)
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name='norm2')(x)
    y = Mlp(int(dim * self.mlp_ratio), self.gelu_approximate, dtype=self.dtype, name='mlp')(y)
    return x + drop(y, deterministic=not train)


class Mlp(nn.Module):
  """timm Mlp: fc1 -> GELU -> fc2 (ViT-style init: xavier kernels, N(0, 1e-6) biases)."""
  hidden_dim: int
  gelu_approximate: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = dict(dtype=self.dtype, kernel_init=_xavier, bias_init=nn.initializers.normal(1e-6))
    y = layers.gelu(nn.Dense(self.hidden_dim, name='fc1', **dense)(x), approximate=self.gelu_approximate)
    return nn.Dense(x.shape[-1], name='fc2', **dense)(y)


class MaxViTBlock(nn.Module):
  """timm MaxxVitBlock: MBConv, then block attention, then grid attention (one drop-path rate for all three)."""
  out_dim: int
  stride: int
  partition: tuple[int, int]
  dim_head: int = 32
  mlp_ratio: float = 4.0
  head_first: bool = True
  rel_pos_type: str = 'bias'
  padding: str = 'torch'
  bn_eps: float = 1e-5
  ln_eps: float = 1e-6
  gelu_approximate: bool = False
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = MBConv(self.out_dim, self.stride, padding=self.padding, bn_eps=self.bn_eps,
               gelu_approximate=self.gelu_approximate, drop_path=self.drop_path, dtype=self.dtype, name='conv')(
                   x, train)
    for kind in ('block', 'grid'):
      x = PartitionAttention(kind, self.partition, self.dim_head, self.mlp_ratio, self.head_first,
                             self.rel_pos_type, self.ln_eps, self.gelu_approximate, self.drop_path, dtype=self.dtype,
                             attention_impl=self.attention_impl, name=f'attn_{kind}')(x, train)
    return x


class MaxViTStage(nn.Module):
  """`depth` MaxViT blocks; the first strides by 2 and changes the width."""
  out_dim: int
  depth: int
  partition: tuple[int, int]
  drop_path_rates: tuple[float, ...]
  block_kwargs: Any = None  # dict of MaxViTBlock fields shared by every block.
  remat: Any = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    block_cls = layers.remat(MaxViTBlock, self.remat, static_argnums=(2,))
    for j in range(self.depth):
      x = block_cls(self.out_dim, 2 if j == 0 else 1, self.partition, drop_path=self.drop_path_rates[j],
                    **dict(self.block_kwargs or {}), name=f'blocks_{j}')(x, train)
    return x


# ----------------------------------------------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------------------------------------------

class MaxViT(nn.Module):
  """MaxViT on NHWC images (timm `MaxxVit` with block_type 'M' in every stage and a NormMlpClassifierHead).

  img_size sets the partition (window and grid) side, img_size // 32, unless window_size is given (timm sizes it
  from img_size the same way); every stage map (side / 4, / 8, / 16, / 32) must split into partitions, so input
  sides must be multiples of 32 x the partition side (patch_size x 2**stages x the side in general).
  head_hidden_size defaults to the last width.
  num_classes=0: the logits are the pre-logits.
  """
  num_classes: int = 1000
  embed_dim: Sequence[int] = (64, 128, 256, 512)
  depths: Sequence[int] = (2, 2, 5, 2)
  stem_width: int = 64
  stem_bias: bool = True
  patch_size: int = 2  # Stride of the stem's first conv (2 in the paper and timm; the stages then stride by 2 each).
  head_hidden_size: Optional[int] = None
  dim_head: int = 32
  mlp_ratio: float = 4.0
  img_size: int = 224
  window_size: Optional[int] = None  # Partition side; default img_size // 32.
  padding: str = 'torch'  # 'torch' (symmetric) or 'same' (TF weights).
  bn_eps: float = 1e-5
  ln_eps: float = 1e-6
  gelu_approximate: bool = False
  head_first: bool = True
  rel_pos_type: str = 'bias'
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: Any = False  # bool or a named policy (layers.remat).
  attention_impl: str = 'einsum'  # Attention kernel: 'einsum' | 'xla' | 'cudnn' (vit_jax.models.attention).

  @property
  def num_features(self) -> int:
    """Width of the pre-logits (timm's head_hidden_size; the last stage width by default)."""
    return int(self.head_hidden_size or self.embed_dim[-1])

  @property
  def partition(self) -> tuple[int, int]:
    side = self.window_size if self.window_size is not None else self.img_size // PARTITION_RATIO
    if side < 1:
      raise ValueError(f'Partition side {side} (img_size={self.img_size} // {PARTITION_RATIO}, or window_size) must '
                       'be >= 1. Fix: set img_size to at least 32 or window_size >= 1.')
    return (side, side)

  def _check_options(self) -> None:
    if len(self.embed_dim) != len(self.depths):
      raise ValueError(f'embed_dim {tuple(self.embed_dim)} and depths {tuple(self.depths)} need one entry per stage.')
    if self.padding not in PADDINGS:
      raise ValueError(f'padding={self.padding!r}: expected one of {PADDINGS}.')
    if self.rel_pos_type not in REL_POS_TYPES:
      raise ValueError(f'rel_pos_type={self.rel_pos_type!r}: expected one of {REL_POS_TYPES}.')

  def setup(self):
    self._check_options()
    n = len(self.depths)
    dpr = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    starts = np.cumsum((0,) + tuple(self.depths))
    shared = dict(dim_head=self.dim_head, mlp_ratio=self.mlp_ratio, head_first=self.head_first,
                  rel_pos_type=self.rel_pos_type, padding=self.padding, bn_eps=self.bn_eps, ln_eps=self.ln_eps,
                  gelu_approximate=self.gelu_approximate, dtype=self.dtype, attention_impl=self.attention_impl)
    self.stem = Stem(self.stem_width, self.patch_size, self.stem_bias, self.padding, self.bn_eps,
                     self.gelu_approximate, dtype=self.dtype)
    self.stages = [
        MaxViTStage(self.embed_dim[i], self.depths[i], self.partition,
                    tuple(float(r) for r in dpr[starts[i]:starts[i + 1]]), shared, self.remat, name=f'stages_{i}')
        for i in range(n)]
    self.norm = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype)
    self.pre_logits = nn.Dense(self.num_features, dtype=self.dtype, kernel_init=_xavier)
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes > 0:
      self.head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros)

  def check_input_size(self, height: int, width: int) -> None:
    """ValueError naming the fix unless every stage map (stride 4 .. 32) splits into partitions."""
    p = self.partition[0]
    need = p * self.patch_size * 2 ** len(self.depths)
    if height % need or width % need:
      raise ValueError(f'Input {height}x{width} does not fit this MaxViT (partition {p}x{p}, {len(self.depths)} '
                       f'stages): both sides must be multiples of {need}. Fix: resize the images, or build the '
                       f'model with img_size / window_size for your resolution.')

  def _stages(self, images: Array, train: bool) -> list[Array]:
    if images.ndim != 4:
      raise ValueError(f'Expected NHWC images, got shape {images.shape}.')
    self.check_input_size(images.shape[1], images.shape[2])
    x = self.stem(images, train)
    outs = []
    for stage in self.stages:
      x = stage(x, train)
      outs.append(x)
    return outs

  def forward_intermediates(self, images: Array, *, train: bool = False, norm: bool = False) -> list[Array]:
    """Per-stage NHWC outputs (strides 4, 8, 16, 32 with the stem's patch_size 2). MaxViT has no norm on the map (its LayerNorm follows the
    pooling in the head), so `norm` changes nothing; it is accepted for the shared API."""
    del norm
    return self._stages(images, train)

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """The last stage's NHWC map (timm's forward_features: MaxViT's norm sits in the head)."""
    return self._stages(images, train)[-1]

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False) -> Array:
    """Mean over H, W -> LayerNorm -> Linear + tanh (pre-logits) -> dropout -> classifier."""
    x = self.norm(jnp.mean(features, axis=(1, 2)))
    x = jnp.tanh(self.pre_logits(x))
    x = self.head_drop(x, deterministic=not train)
    if pre_logits or self.num_classes == 0:
      return x
    return self.head(x)

  def __call__(self, images: Array, *, train: bool = False) -> Array:
    return self.forward_head(self.forward_features(images, train=train), train=train)


# ----------------------------------------------------------------------------------------------------------------
# Family facts: timm conversion, layer grouping, table resizing.
# ----------------------------------------------------------------------------------------------------------------

_TS = r'stages\.(\d+)\.blocks\.(\d+)\.'
_OS = r'stages_\1/blocks_\2/'
_ATTN = r'(attn_block|attn_grid)'
_TIMM_RULES = (  # (timm key regex, our path, kind); see vit_jax.models.facts.Rule.
    (r'stem\.conv([12])', r'stem/conv\1', 'conv'),
    (r'stem\.norm1', 'stem/norm1', 'batchnorm'),
    (_TS + r'conv\.(pre_norm|norm1|norm2)', _OS + r'conv/\3', 'batchnorm'),
    (_TS + r'conv\.(conv1_1x1|conv2_kxk|conv3_1x1)', _OS + r'conv/\3', 'conv'),
    (_TS + r'conv\.shortcut\.expand', _OS + 'conv/shortcut_expand', 'conv'),
    (_TS + r'conv\.se\.(fc[12])', _OS + r'conv/se/\3', 'conv'),
    (_TS + _ATTN + r'\.(norm[12])', _OS + r'\3/\4', 'norm'),
    (_TS + _ATTN + r'\.attn\.(qkv|proj)', _OS + r'\3/attn/\4', 'linear'),
    (_TS + _ATTN + r'\.attn\.rel_pos\.relative_position_bias_table',
     _OS + r'\3/attn/rel_pos/relative_position_bias_table', 'rel_table'),
    (_TS + _ATTN + r'\.mlp\.(fc[12])', _OS + r'\3/mlp/\4', 'linear'),
    (r'head\.norm', 'norm', 'norm'),
    (r'head\.pre_logits\.fc', 'pre_logits', 'linear'),
    (r'head\.fc', 'head', 'linear'),
)
# BatchNorm step counters and (older files) the index / one-hot lookup buffers our model recomputes.
_TIMM_IGNORE = (r'.*\.num_batches_tracked', r'.*\.rel_pos\.(relative_position_index|height_lookup|width_lookup)')


def resize_rel_table(table: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A relative-position bias table fitted to another partition size: each head's (2P-1, 2P'-1) offset grid
  resized with PyTorch's bicubic (as the official Swin / timm fine-tuning at a new window).

  Both layouts: 'bias' ((2ph-1)(2pw-1), heads) with square partitions, 'bias_tf' (heads, 2ph-1, 2pw-1).
  """
  table = np.asarray(table)
  if table.ndim == 3 and len(shape) == 3 and table.shape[0] == shape[0]:
    mh = resize.torch_bicubic_matrix(table.shape[1], shape[1])
    mw = resize.torch_bicubic_matrix(table.shape[2], shape[2])
    return np.einsum('ph,nhw,qw->npq', mh, table.astype(np.float64), mw).astype(table.dtype)
  if table.ndim == 2 and len(shape) == 2 and table.shape[1] == shape[1]:
    old, new = math.isqrt(table.shape[0]), math.isqrt(shape[0])
    if old * old == table.shape[0] and new * new == shape[0]:
      grid = table.T.reshape(table.shape[1], old, old)
      return resize_rel_table(grid, (shape[1], new, new)).reshape(shape[1], -1).T
  raise ValueError(f'Cannot fit a relative-position table of shape {table.shape} to {tuple(shape)}: the head counts '
                   'or layouts differ (check the model variant and rel_pos_type).')


def _resize(path: str, value: np.ndarray, shape: tuple, context: Any) -> Optional[np.ndarray]:
  """FamilyFacts.resize: only the relative-position tables depend on the resolution (partition = img_size // 32)."""
  del context  # Always PyTorch bicubic, as timm / the official Swin and MaxViT fine-tuning.
  if not path.endswith('/relative_position_bias_table'):
    return None
  return resize_rel_table(value, shape)


def _infer_image_size(state_dict: Any, options: Any) -> Optional[int]:
  """The input size whose partitions match the model's options (its tables are sized by img_size / window_size,
  not by the input); a checkpoint of another partition size is then resized to them."""
  del state_dict
  window = options.get('window_size')
  return PARTITION_RATIO * (window if window is not None else options.get('img_size', 224) // PARTITION_RATIO)


FACTS = facts.register_family(facts.FamilyFacts(
    name='maxvit',
    # head.norm and head.pre_logits are kept for a new class count; only timm's head.fc is the classifier.
    layouts={'timm': facts.ConversionTable(_TIMM_RULES, _TIMM_IGNORE, source_heads=('head.fc',))},
    grouping=facts.LayerGrouping(blocks=((r'^stages_(\d+)/blocks_(\d+)/', 'block2'),), stem=r'^stem/'),
    forward_macs=None,  # XLA's cost analysis (convs, SE, attention over partitions: no published formula here).
    resize=_resize,
    infer_image_size=_infer_image_size,
    heads=('head',),
))


# ----------------------------------------------------------------------------------------------------------------
# Registry. Counts at 224 px / 1000 classes measured with timm 1.0.31 (sum of parameter numel; BatchNorm statistics are
# buffers, not counted). drop_path_rate: the MaxViT paper's ImageNet-1k values (T 0.2, S 0.3, B 0.4); timm's
# constructor default is 0.
# ----------------------------------------------------------------------------------------------------------------

_TF_NUMERICS = dict(padding='same', bn_eps=1e-3, ln_eps=1e-5, gelu_approximate=True, head_first=False,
                    rel_pos_type='bias_tf')
_SIZES = {  # our name: (timm size, embed_dim, depths, drop_path_rate, num_params)
    't': ('tiny', (64, 128, 256, 512), (2, 2, 5, 2), 0.2, 30_916_528),
    's': ('small', (96, 192, 384, 768), (2, 2, 5, 2), 0.3, 68_927_956),
    'b': ('base', (96, 192, 384, 768), (2, 6, 14, 2), 0.4, 119_467_708),
}
for _short, (_timm, _dims, _depths, _dpr, _count) in _SIZES.items():
  _arch = dict(embed_dim=_dims, depths=_depths, stem_width=64, drop_path_rate=_dpr)  # Pre-logits = last width.
  # PyTorch numerics: timm builds this architecture from MaxxVitCfg's defaults, but registers no such model.
  registry.register_model(f'maxvit_{_short}', MaxViT, family='maxvit', image_size=224, num_params=_count,
                          timm_name=None, **_arch)
  registry.register_model(f'maxvit_{_short}_tf_224', MaxViT, family='maxvit', image_size=224, num_params=_count,
                          timm_name=f'maxvit_{_timm}_tf_224.in1k', **_arch, **_TF_NUMERICS)
