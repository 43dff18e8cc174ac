"""EfficientFormer (Li et al. 2022, "EfficientFormer: Vision Transformers at MobileNet Speed"), laid out like timm's
`efficientformer.py`; EfficientFormerV2 (its own family, 'efficientformerv2') is in the second half of this file.

A 4-stage pyramid of "MetaBlocks" on NHWC maps, with a few attention blocks on the flattened last stage:

  stem: conv 3x3 s2 -> BatchNorm -> ReLU -> conv 3x3 s2 -> BatchNorm -> ReLU                     stride 4
  stages 1-3 start with conv 3x3 s2 -> BatchNorm (downsample)                                    strides 8, 16, 32
  4-D block (every block but the last `num_vit`):
    x + ls1 * (avgpool3x3(x) - x)                   (pool without the zero padding in the mean: PoolFormer)
    x + ls2 * BN(fc2(GELU(BN(fc1(x)))))            (1x1 convs, hidden = mlp_ratio x width)
  the last stage flattens to tokens before its last `num_vit` blocks; 3-D block:
    x + ls1 * attn(LN(x)),  x + ls2 * fc2(GELU(fc1(LN(x))))
  head: LayerNorm of the tokens -> mean -> (head(x) + head_dist(x)) / 2   (the distillation head, averaged)

Attention (the same for every variant): 8 heads, key dim 32, value dim 4 x 32 per head, qkv grouped per head
([q_h, k_h, v_h] for each head h), scale key_dim^-0.5, plus a learned bias per head indexed by the absolute
offset (|dy|, |dx|) between query and key on the attn_resolution x attn_resolution map (7 x 7 at 224 px: the table
is (heads, 49) and fixes the input size; `FamilyFacts.resize` fits it bicubically to another resolution).

Norm epsilons are PyTorch's (BatchNorm and LayerNorm 1e-5); GELU is exact; layer scales start at 1e-5.

Parameter names mirror timm, block indices included: timm numbers the flattening step as a module of the last
stage's nn.Sequential, so the 3-D blocks of stage 3 are `blocks_{j + 1}` for their block index j (e.g. l1's last
stage has blocks_0..2 (4-D) and blocks_4 (3-D)).

  stem/{conv1,norm1,conv2,norm2}; stages_{i}/downsample/{conv,norm}
  stages_{i}/blocks_{k}/{ls1,ls2,mlp/{fc1,norm1,fc2,norm2}}                      4-D blocks
  stages_3/blocks_{k}/{norm1,token_mixer/{qkv,proj,attention_biases},norm2,mlp/{fc1,fc2},ls1,ls2}   3-D
  norm, head, head_dist

Deploy form (`deploy=True`, built by `vit_jax.deploy.fold_for_inference` through this family's `fold`): every
BatchNorm folded into the conv before it (stem, downsamples, the 4-D blocks' MLPs), so the model has no
`batch_stats` and its convs carry the folded biases.

BatchNorm statistics live in the `batch_stats` collection (flax momentum 0.9 = 1 - torch's 0.1); apply with
train=True and mutable=['batch_stats'] to update them.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import facts
from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models import resize
from vit_jax.models.conv import Conv
from vit_jax.models.layers import DropPath

Array = jax.Array

BN_EPS = 1e-5
LN_EPS = 1e-5
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
_zeros = nn.initializers.zeros


def _conv(features: int, kernel: int, *, stride: int = 1, dtype: Any, name: str) -> nn.Conv:
  """A conv with bias and PyTorch's symmetric padding kernel // 2 (timm's default Conv2d init is kept simple:
  trunc-normal 0.02, zero bias)."""
  pad = kernel // 2
  return Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
              dtype=dtype, kernel_init=layers.logical(_trunc_normal, (None, None, None, 'embed')),
              bias_init=layers.logical(_zeros, ('embed',)), name=name)


def _dense(features: int, *, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=_trunc_normal, bias_init=_zeros, name=name)


def _norm_or_identity(deploy: bool, name: str, train: bool, dtype: Any):
  """BatchNorm after a conv, or (deploy form: folded into that conv) the identity."""
  if deploy:
    return lambda x: x
  return layers.torch_batch_norm(name, train=train, dtype=dtype, epsilon=BN_EPS)


def attention_bias_index(resolution: int) -> np.ndarray:
  """(N, N) index into a (heads, resolution**2) table, N = resolution**2: |dy| * resolution + |dx| between the
  query and key positions (row-major), as timm's EfficientFormer Attention."""
  coords = np.stack(np.meshgrid(np.arange(resolution), np.arange(resolution), indexing='ij')).reshape(2, -1)
  rel = np.abs(coords[:, :, None] - coords[:, None, :])
  return rel[0] * resolution + rel[1]


class Attention(nn.Module):
  """Multi-head attention with per-head [q, k, v] channel groups, value width attn_ratio x key_dim and a learned
  bias per head indexed by the absolute 2-D offset (timm EfficientFormer Attention)."""
  key_dim: int = 32
  num_heads: int = 8
  attn_ratio: float = 4.0
  resolution: int = 7
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, n, dim = x.shape
    if n != self.resolution ** 2:
      raise ValueError(f'EfficientFormer attention has a {self.resolution}x{self.resolution} bias table but got '
                       f'{n} tokens. Fix: feed images whose last stage map is {self.resolution}x{self.resolution}, '
                       'or build the model with attn_resolution = the side of that map.')
    val_dim = int(self.attn_ratio * self.key_dim)
    qkv = _dense(self.num_heads * (2 * self.key_dim + val_dim), dtype=self.dtype, name='qkv')(x)
    qkv = qkv.reshape(b, n, self.num_heads, 2 * self.key_dim + val_dim)
    q, k, v = jnp.split(qkv, [self.key_dim, 2 * self.key_dim], axis=-1)
    biases = self.param('attention_biases', _zeros, (self.num_heads, self.resolution ** 2))
    bias = jnp.asarray(biases)[:, attention_bias_index(self.resolution)]  # (heads, N, N)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * (self.key_dim ** -0.5) + bias.astype(q.dtype)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, n, self.num_heads * val_dim)
    return _dense(dim, dtype=self.dtype, name='proj')(out)


class ConvMlp(nn.Module):
  """fc1 (1x1 conv) -> BN -> GELU -> fc2 (1x1 conv) -> BN on an NHWC map (timm ConvMlpWithNorm); the BatchNorms
  are folded into the convs in deploy form."""
  hidden_dim: int
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    y = _conv(self.hidden_dim, 1, dtype=self.dtype, name='fc1')(x)
    y = layers.gelu(_norm_or_identity(self.deploy, 'norm1', train, self.dtype)(y), approximate=False)
    y = _conv(x.shape[-1], 1, dtype=self.dtype, name='fc2')(y)
    return _norm_or_identity(self.deploy, 'norm2', train, self.dtype)(y)


class Mlp(nn.Module):
  """fc1 -> GELU -> fc2 on tokens (timm Mlp)."""
  hidden_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = layers.gelu(_dense(self.hidden_dim, dtype=self.dtype, name='fc1')(x), approximate=False)
    return _dense(x.shape[-1], dtype=self.dtype, name='fc2')(y)


def _layer_scale(module: nn.Module, name: str, dim: int, init: float) -> Array:
  return module.param(name, layers.logical(nn.initializers.constant(init), ('embed',)), (dim,))


def pool_mixer(x: Array, pool_size: int) -> Array:
  """avgpool(x) - x with stride 1 and `pool_size // 2` padding that is not counted in the mean (PoolFormer's
  token mixer; torch AvgPool2d(count_include_pad=False))."""
  p = pool_size // 2
  pooled = nn.avg_pool(x, (pool_size, pool_size), strides=(1, 1), padding=((p, p), (p, p)),
                       count_include_pad=False)
  return pooled - x


class MetaBlock4d(nn.Module):
  """x + ls1 * (pool(x) - x), then x + ls2 * ConvMlp(x), on an NHWC map (timm MetaBlock2d)."""
  mlp_ratio: float = 4.0
  pool_size: int = 3
  layer_scale_init: float = 1e-5
  drop_path: float = 0.0
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    dim = x.shape[-1]
    drop = DropPath(self.drop_path)
    y = pool_mixer(x, self.pool_size) * _layer_scale(self, 'ls1', dim, self.layer_scale_init).astype(x.dtype)
    x = x + drop(y, deterministic=not train)
    y = ConvMlp(int(dim * self.mlp_ratio), self.deploy, dtype=self.dtype, name='mlp')(x, train)
    y = y * _layer_scale(self, 'ls2', dim, self.layer_scale_init).astype(x.dtype)
    return x + drop(y, deterministic=not train)


class MetaBlock3d(nn.Module):
  """x + ls1 * attn(LN(x)), then x + ls2 * Mlp(LN(x)), on (B, N, C) tokens (timm MetaBlock1d)."""
  mlp_ratio: float = 4.0
  layer_scale_init: float = 1e-5
  key_dim: int = 32
  num_heads: int = 8
  attn_ratio: float = 4.0
  resolution: int = 7
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    dim = x.shape[-1]
    drop = DropPath(self.drop_path)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='norm1')(x)
    y = Attention(self.key_dim, self.num_heads, self.attn_ratio, self.resolution, dtype=self.dtype,
                  name='token_mixer')(y)
    x = x + drop(y * _layer_scale(self, 'ls1', dim, self.layer_scale_init).astype(x.dtype), deterministic=not train)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='norm2')(x)
    y = Mlp(int(dim * self.mlp_ratio), dtype=self.dtype, name='mlp')(y)
    return x + drop(y * _layer_scale(self, 'ls2', dim, self.layer_scale_init).astype(x.dtype),
                    deterministic=not train)


class Downsample(nn.Module):
  """conv 3x3 stride 2 (padding 1) -> BatchNorm (folded in deploy form)."""
  out_dim: int
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = _conv(self.out_dim, 3, stride=2, dtype=self.dtype, name='conv')(x)
    return _norm_or_identity(self.deploy, 'norm', train, self.dtype)(x)


class Stem(nn.Module):
  """conv 3x3 s2 -> BN -> ReLU -> conv 3x3 s(stride / 2) -> BN -> ReLU (timm Stem4 at stride 4; BatchNorms
  folded in deploy form)."""
  out_dim: int
  stride: int = 4
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = _conv(self.out_dim // 2, 3, stride=2, dtype=self.dtype, name='conv1')(x)
    x = nn.relu(_norm_or_identity(self.deploy, 'norm1', train, self.dtype)(x))
    x = _conv(self.out_dim, 3, stride=self.stride // 2, dtype=self.dtype, name='conv2')(x)
    return nn.relu(_norm_or_identity(self.deploy, 'norm2', train, self.dtype)(x))


class EfficientFormerStage(nn.Module):
  """Optional downsample, 4-D blocks, then (num_vit > 0) flatten to tokens and `num_vit` 3-D blocks.

  Returns the NHWC map (4-D only) or the (B, H*W, C) tokens.
  """
  out_dim: int
  depth: int
  downsample: bool
  num_vit: int = 0
  drop_path_rates: tuple[float, ...] = ()
  block_kwargs: Any = None  # dict of MetaBlock4d fields shared by every block.
  attn_kwargs: Any = None  # dict of MetaBlock3d attention fields.
  deploy: bool = False
  remat: Union[bool, str] = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.downsample:
      x = Downsample(self.out_dim, self.deploy, dtype=self.dtype, name='downsample')(x, train)
    shared = dict(self.block_kwargs or {})
    block4d = layers.remat(MetaBlock4d, self.remat, static_argnums=(2,))
    block3d = layers.remat(MetaBlock3d, self.remat, static_argnums=(2,))
    first_vit = self.depth - min(self.num_vit, self.depth)
    for j in range(self.depth):
      rate = self.drop_path_rates[j] if self.drop_path_rates else 0.0
      if j < first_vit:
        x = block4d(shared['mlp_ratio'], shared['pool_size'], shared['layer_scale_init'], rate, self.deploy,
                    dtype=self.dtype, name=f'blocks_{j}')(x, train)
        continue
      if j == first_vit:  # timm's Flat: (B, H, W, C) -> (B, H*W, C), a module of its own (index j).
        x = x.reshape(x.shape[0], -1, x.shape[-1])
      x = block3d(shared['mlp_ratio'], shared['layer_scale_init'], **dict(self.attn_kwargs or {}),
                  drop_path=rate, dtype=self.dtype, name=f'blocks_{j + 1}')(x, train)
    return x


class EfficientFormer(nn.Module):
  """EfficientFormer (v1) classifier on NHWC images (timm `EfficientFormer`, always with the distillation head).

  The last stage map must be attn_resolution x attn_resolution (7 at 224 px: inputs of 32 x attn_resolution px,
  or 16 x attn_resolution px with patch_size 2).
  drop_path_rate grows linearly over all blocks (timm); drop_rate is dropout before the heads. num_classes=0: the
  logits are the pooled pre-logits. `deploy=True` is the BatchNorm-folded inference form (see the module doc).
  """
  num_classes: int = 1000
  depths: Sequence[int] = (3, 2, 6, 4)
  embed_dims: Sequence[int] = (48, 96, 224, 448)
  num_vit: int = 1
  patch_size: int = 4  # The stem's stride: 4 (the paper, timm), or 2 (second conv unstrided) for small images.
  mlp_ratio: float = 4.0
  pool_size: int = 3
  layer_scale_init: float = 1e-5
  attn_key_dim: int = 32
  attn_heads: int = 8
  attn_ratio: float = 4.0
  attn_resolution: int = 7
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  deploy: bool = False
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False  # False/'none', True/'full', or a jax.checkpoint_policies name (layers.remat).

  @property
  def num_features(self) -> int:
    return int(self.embed_dims[-1])

  def setup(self):
    n = len(self.depths)
    if len(self.embed_dims) != n:
      raise ValueError(f'depths {tuple(self.depths)} and embed_dims {tuple(self.embed_dims)} differ in length; give '
                       'one width per stage.')
    if self.patch_size not in (2, 4):
      raise ValueError(f'patch_size={self.patch_size}: EfficientFormer\'s stem strides by 4 (the reference) or 2.')
    if not 1 <= self.num_vit:
      raise ValueError(f'num_vit={self.num_vit}: EfficientFormer needs at least one attention (3-D) block in its '
                       'last stage (its head normalises and pools tokens).')
    dpr = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    starts = np.cumsum((0,) + tuple(self.depths))
    block = dict(mlp_ratio=self.mlp_ratio, pool_size=self.pool_size, layer_scale_init=self.layer_scale_init)
    attn = dict(key_dim=self.attn_key_dim, num_heads=self.attn_heads, attn_ratio=self.attn_ratio,
                resolution=self.attn_resolution)
    self.stem = Stem(self.embed_dims[0], self.patch_size, self.deploy, dtype=self.dtype)
    self.stages = [
        EfficientFormerStage(self.embed_dims[i], self.depths[i], downsample=i > 0,
                             num_vit=self.num_vit if i == n - 1 else 0,
                             drop_path_rates=tuple(float(r) for r in dpr[starts[i]:starts[i + 1]]),
                             block_kwargs=block, attn_kwargs=attn, deploy=self.deploy, remat=self.remat,
                             dtype=self.dtype, name=f'stages_{i}')
        for i in range(n)]
    self.norm = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes > 0:
      self.head = _dense(self.num_classes, dtype=self.dtype, name='head')
      self.head_dist = _dense(self.num_classes, dtype=self.dtype, name='head_dist')

  def stage_resolutions(self, height: int, width: int) -> list[tuple[int, int]]:
    """(H, W) of every stage map: the stem's and each downsample's stride-2 3x3 convs (padding 1) round up."""
    half = lambda n: -(-n // 2)  # ceil(n / 2): a 3x3 stride-2 conv with padding 1.
    h, w = half(height), half(width)
    if self.patch_size == 4:
      h, w = half(h), half(w)
    out = [(h, w)]
    for _ in range(len(self.depths) - 1):
      h, w = half(h), half(w)
      out.append((h, w))
    return out

  def check_input_size(self, height: int, width: int) -> None:
    last = self.stage_resolutions(height, width)[-1]
    r = self.attn_resolution
    if last != (r, r):
      side = 8 * self.patch_size * r
      raise ValueError(f'Input {height}x{width} gives a {last[0]}x{last[1]} last stage, but this EfficientFormer\'s '
                       f'attention bias table is for {r}x{r}. Fix: use {side}x{side} images, or build the model '
                       'with attn_resolution for your size (converted tables are resized to it).')

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

  def _to_map(self, tokens: Array) -> Array:
    r = self.attn_resolution
    return tokens.reshape(tokens.shape[0], r, r, tokens.shape[-1])

  def forward_intermediates(self, images: Array, *, train: bool = False, norm: bool = False) -> list[Array]:
    """Per-stage NHWC maps (strides 4, 8, 16, 32); norm=True applies the final LayerNorm to the last one."""
    outs = self._stages(images, train)
    last = self.norm(outs[-1]) if norm else outs[-1]
    return outs[:-1] + [self._to_map(last)]

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """The final-normed last-stage map, NHWC (timm's forward_features gives the same values as (B, H*W, C))."""
    return self._to_map(self.norm(self._stages(images, train)[-1]))

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False) -> Array:
    """Mean over H, W, dropout, then (unless pre_logits) the mean of the class and distillation heads."""
    x = self.head_drop(jnp.mean(features, axis=(1, 2)), deterministic=not train)
    if pre_logits or self.num_classes == 0:
      return x
    return ((self.head(x) + self.head_dist(x)) / 2).astype(jnp.float32)

  def __call__(self, images: Array, *, train: bool = False) -> Array:
    return self.forward_head(self.forward_features(images, train=train), train=train)


# ----------------------------------------------------------------------------------------------------------------
# Family facts: timm conversion, layer grouping, bias-table resizing, BatchNorm folding.
# ----------------------------------------------------------------------------------------------------------------

_TB = r'stages\.(\d+)\.blocks\.(\d+)\.'
_OB = r'stages_\1/blocks_\2/'
TIMM_RULES: tuple[facts.Rule, ...] = (
    (r'stem\.(conv[12])', r'stem/\1', 'conv'),
    (r'stem\.(norm[12])', r'stem/\1', 'batchnorm'),
    (r'stages\.(\d+)\.downsample\.conv', r'stages_\1/downsample/conv', 'conv'),
    (r'stages\.(\d+)\.downsample\.norm', r'stages_\1/downsample/norm', 'batchnorm'),
    (_TB + r'ls([12])\.gamma', _OB + r'ls\3', 'raw'),
    # 1x1 convs (4-D blocks) and Linears (3-D blocks): a (O, I, 1, 1) weight transposes to the (1, 1, I, O) kernel
    # exactly as a Linear's (O, I) to (I, O), so one 'linear' rule serves both.
    (_TB + r'mlp\.(fc[12])', _OB + r'mlp/\3', 'linear'),
    (_TB + r'mlp\.(norm[12])', _OB + r'mlp/\3', 'batchnorm'),
    (_TB + r'(norm[12])', _OB + r'\3', 'norm'),
    (_TB + r'token_mixer\.(qkv|proj)', _OB + r'token_mixer/\3', 'linear'),
    (_TB + r'token_mixer\.attention_biases', _OB + 'token_mixer/attention_biases', 'rel_table'),
    (r'norm', 'norm', 'norm'),
    (r'(head|head_dist)', r'\1', 'linear'),
)
_TIMM_IGNORE = (r'.*\.num_batches_tracked', r'.*\.attention_bias_idxs')


def resize_attention_biases(table: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A (heads, r*r) absolute-offset bias table fitted to (heads, r'*r'): each head's r x r grid resized with
  PyTorch's bicubic (as timm's LeViT-style table resizing)."""
  table = np.asarray(table)
  if table.ndim != 2 or len(shape) != 2 or table.shape[0] != shape[0]:
    raise ValueError(f'Cannot fit an attention bias table of shape {table.shape} to {tuple(shape)}: the head counts '
                     'differ (check attn_heads).')
  old, new = math.isqrt(table.shape[1]), math.isqrt(shape[1])
  if old * old != table.shape[1] or new * new != shape[1]:
    raise ValueError(f'Attention bias tables {table.shape} -> {tuple(shape)} are not square grids.')
  m = resize.torch_bicubic_matrix(old, new)
  grid = table.astype(np.float64).reshape(-1, old, old)
  return np.einsum('ph,nhw,qw->npq', m, grid, m).reshape(shape).astype(table.dtype)


def _resize(path: str, value: np.ndarray, shape: tuple, context: Any) -> Optional[np.ndarray]:
  """FamilyFacts.resize: the attention bias tables follow attn_resolution (the last stage map)."""
  del context
  if not path.endswith('/attention_biases'):
    return None
  return resize_attention_biases(value, shape)


def _infer_image_size(state_dict: Any, options: Mapping[str, Any]) -> Optional[int]:
  """The input size whose last stage map is the model's attn_resolution (a checkpoint table of another size is
  resized to it)."""
  del state_dict
  return 8 * int(options.get('patch_size', 4)) * int(options.get('attn_resolution', 7))


# BatchNorm -> the conv it follows, by the BatchNorm's module name.
_FOLD_INTO = {'norm1': ('conv1', 'fc1'), 'norm2': ('conv2', 'fc2'), 'norm': ('conv',), 'bn': ('conv',)}


def fold_batchnorms(params: Mapping[str, Any], batch_stats: Mapping[str, Any], epsilon: float) -> dict:
  """Params with every BatchNorm folded into the conv before it (a sibling named by `_FOLD_INTO`) and removed.

  Generic over this module's layouts (EfficientFormer v1 and v2 name their conv/BN pairs alike).
  """
  from vit_jax import deploy  # pylint: disable=g-import-not-at-top  (models must not import it at load time)
  flat = traverse_util.flatten_dict(dict(params), sep='/')
  stats = traverse_util.flatten_dict(dict(batch_stats), sep='/')
  for stat_path in sorted(p for p in stats if p.endswith('/mean')):
    bn = stat_path[:-len('/mean')]
    parent, leaf = bn.rsplit('/', 1)
    convs = [f'{parent}/{c}' for c in _FOLD_INTO.get(leaf, ()) if f'{parent}/{c}/kernel' in flat]
    if len(convs) != 1:
      raise ValueError(f'BatchNorm {bn} has no conv to fold into (looked for {_FOLD_INTO.get(leaf)} beside it).')
    conv = convs[0]
    kernel, bias = deploy.fold_batchnorm(
        flat[f'{conv}/kernel'], flat.get(f'{conv}/bias'), scale=flat.pop(f'{bn}/scale'),
        offset=flat.pop(f'{bn}/bias'), mean=stats[f'{bn}/mean'], var=stats[f'{bn}/var'], epsilon=epsilon)
    flat[f'{conv}/kernel'], flat[f'{conv}/bias'] = kernel, bias
  return traverse_util.unflatten_dict(flat, sep='/')


def _fold(options: Mapping[str, Any], variables: Mapping[str, Any]) -> tuple[dict, dict]:
  """FamilyFacts.fold: the deploy form (deploy=True) and its variables (params only)."""
  if options.get('deploy'):
    return dict(options), dict(variables)
  params = fold_batchnorms(variables['params'], variables.get('batch_stats', {}), BN_EPS)
  return {**options, 'deploy': True}, {'params': params}


def forward_macs(model: EfficientFormer, image_size: int) -> float:
  """Multiply-adds of one forward pass on one image (convs, linears and the attention matmuls; BatchNorm,
  LayerNorm, activations, layer scales and the pooling mixer are not counted, as the paper's FLOPs). Folding the
  BatchNorms changes nothing here.

  A 4-D block on an s x s map of width C: 2 s^2 C m (its 1x1 MLP, m = mlp_ratio C). A 3-D block on N tokens
  (H heads, key dim k, value dim v): N C H (2k + v) + N^2 H (k + v) + N H v C + 2 N C m. Heads: 2 C classes.
  """
  model.check_input_size(image_size, image_size)
  res = model.stage_resolutions(image_size, image_size)
  dims = tuple(model.embed_dims)
  s = layers.conv_side(image_size, 3, 2)
  macs = layers.conv_macs(s, 3, dims[0] // 2, 3)
  macs += layers.conv_macs(res[0][0], dims[0] // 2, dims[0], 3)
  heads, k = model.attn_heads, model.attn_key_dim
  v = int(model.attn_ratio * k)
  for i, c in enumerate(dims):
    n, hidden = res[i][0] * res[i][1], int(c * model.mlp_ratio)
    if i > 0:
      macs += layers.conv_macs(res[i][0], dims[i - 1], c, 3)
    vit = min(model.num_vit, model.depths[i]) if i == len(dims) - 1 else 0
    attention = n * c * heads * (2 * k + v) + n * n * heads * (k + v) + n * heads * v * c
    macs += model.depths[i] * 2 * n * c * hidden + vit * attention
  return float(macs + 2 * dims[-1] * max(model.num_classes, 0))


FACTS = facts.register_family(facts.FamilyFacts(
    name='efficientformer',
    layouts={'timm': facts.ConversionTable(TIMM_RULES, _TIMM_IGNORE, source_heads=('head', 'head_dist'))},
    grouping=facts.LayerGrouping(blocks=((r'^stages_(\d+)/blocks_(\d+)/', 'block2'),
                                         (r'^stages_(\d+)/downsample/', 'before')),
                                 stem=r'^stem/'),
    forward_macs=forward_macs,
    resize=_resize,
    infer_image_size=_infer_image_size,
    heads=('head', 'head_dist'),
    fold=_fold,
))


# ----------------------------------------------------------------------------------------------------------------
# Registry: timm 1.0.31 counts at 224 px, 1000 classes (sum of parameter numel; BatchNorm statistics are buffers).
# drop_path_rate: timm's constructors' default, 0.
# ----------------------------------------------------------------------------------------------------------------

_V1 = {  # our name: (depths, widths, num_vit, count)
    'l1': ((3, 2, 6, 4), (48, 96, 224, 448), 1, 12_289_928),
    'l3': ((4, 4, 12, 6), (64, 128, 320, 512), 4, 31_406_000),
    'l7': ((6, 6, 18, 8), (96, 192, 384, 768), 8, 82_229_328),
}
for _size, (_depths, _dims, _num_vit, _count) in _V1.items():
  registry.register_model(f'efficientformer_{_size}', EfficientFormer, family='efficientformer', image_size=224,
                          num_params=_count, timm_name=f'efficientformer_{_size}.snap_dist_in1k', depths=_depths,
                          embed_dims=_dims, num_vit=_num_vit)


# ================================================================================================================
# EfficientFormer V2 (Li et al. 2023, "Rethinking Vision Transformers for MobileNet Size and Speed"), laid out like
# timm's `efficientformer_v2.py`.
#
#   stem: (conv 3x3 s2 -> BN -> GELU) x 2                                                      stride 4
#   stages 1-3 start with conv 3x3 s2 -> BN; stage 3's adds attention downsampling (below)     strides 8, 16, 32
#   block: [x + ls1 * Attention2d(x)] (the last num_vit blocks of stages 2 and 3), then
#          x + ls2 * BN(fc2(GELU(BN(dw3x3(GELU(BN(fc1(x))))))))          (1x1 -> depthwise 3x3 -> 1x1, all biased)
#   head: BatchNorm of the last map -> mean -> (head + head_dist) / 2
#
# Attention2d (8 heads, key dim 32, value dim 128 per head): q, k, v are 1x1 conv + BN; a depthwise 3x3 conv + BN
# of v ("v_local") is added to the attention output; the logits get the per-head bias table (absolute offsets on
# the attention map, as v1) and are mixed across heads by a 1x1 conv before and after the softmax (talking heads);
# output GELU -> 1x1 conv + BN. In stage 2 the block attends on a map halved by a depthwise 3x3 stride-2 conv + BN
# and upsamples the result bilinearly (x2) back. Stage 3's downsampling adds Attention2dDownsample: queries from the
# stride-2 grid (depthwise 3x3 s2 conv + 1x1-strided subsample, then 1x1 conv + BN; key dim 16), keys and values
# from the full map, bias indexed by |query - key| on the full-resolution grid, v_local strided, no talking heads.
#
# The bias tables follow img_size (default 224: 7x7, and 14x14 for the downsampling attention); every BatchNorm
# has eps 1e-5. Deploy form: every BatchNorm folded into its conv, the final one into a per-channel affine.
# ================================================================================================================


def upsample2_bilinear(x: Array) -> Array:
  """PyTorch's nn.Upsample(scale_factor=2, mode='bilinear') (align_corners=False) on an NHWC map."""
  def matrix(n: int) -> np.ndarray:
    src = np.maximum((np.arange(2 * n) + 0.5) / 2 - 0.5, 0.0)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    frac = src - lo
    m = np.zeros((2 * n, n), np.float32)
    m[np.arange(2 * n), lo] += 1 - frac
    m[np.arange(2 * n), hi] += frac
    return m
  mh, mw = matrix(x.shape[1]), matrix(x.shape[2])
  return jnp.einsum('ph,bhwc,qw->bpqc', jnp.asarray(mh, x.dtype), x, jnp.asarray(mw, x.dtype))


def downsample_bias_index(resolution: int) -> np.ndarray:
  """(N2, N) index into a (heads, resolution**2) table: |q - k| * (resolution, 1) between the stride-2 query grid
  (rows and columns 0, 2, 4, ...) and every key position (timm's Attention2dDownsample)."""
  k = np.stack(np.meshgrid(np.arange(resolution), np.arange(resolution), indexing='ij')).reshape(2, -1)
  q = np.stack(np.meshgrid(np.arange(0, resolution, 2), np.arange(0, resolution, 2), indexing='ij')).reshape(2, -1)
  rel = np.abs(q[:, :, None] - k[:, None, :])
  return rel[0] * resolution + rel[1]


class ConvBN(nn.Module):
  """conv (bias; PyTorch padding ((stride - 1) + (kernel - 1)) // 2) -> BatchNorm -> optional GELU (timm ConvNorm /
  ConvNormAct with EfficientFormerV2's settings); the BatchNorm is folded into the conv in deploy form."""
  features: int
  kernel: int = 1
  stride: int = 1
  groups: int = 1
  act: bool = False
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    pad = ((self.stride - 1) + (self.kernel - 1)) // 2
    x = Conv(self.features, (self.kernel, self.kernel), strides=(self.stride, self.stride),
             padding=((pad, pad), (pad, pad)), feature_group_count=self.groups, dtype=self.dtype,
             kernel_init=_trunc_normal, bias_init=_zeros, name='conv')(x)
    x = _norm_or_identity(self.deploy, 'bn', train, self.dtype)(x)
    return layers.gelu(x, approximate=False) if self.act else x


class Attention2d(nn.Module):
  """EfficientFormerV2 attention on an NHWC map (timm Attention2d); see the section doc. `resolution` is the side
  of the map it attends on (after the optional stride-2 conv)."""
  key_dim: int = 32
  num_heads: int = 8
  attn_ratio: float = 4.0
  resolution: int = 7
  stride: Optional[int] = None
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    b, _, _, dim = x.shape
    conv = lambda f, name, **kw: ConvBN(f, deploy=self.deploy, dtype=self.dtype, name=name, **kw)
    if self.stride is not None:
      x = conv(dim, 'stride_conv', kernel=3, stride=self.stride, groups=dim)(x, train)
    h, w = x.shape[1:3]
    if (h, w) != (self.resolution, self.resolution):
      raise ValueError(f'EfficientFormerV2 attention has a {self.resolution}x{self.resolution} bias table but got a '
                       f'{h}x{w} map. Fix: build the model with img_size = the input size.')
    n, heads, d = h * w, self.num_heads, int(self.attn_ratio * self.key_dim)
    q = conv(heads * self.key_dim, 'q')(x, train).reshape(b, n, heads, self.key_dim)
    k = conv(heads * self.key_dim, 'k')(x, train).reshape(b, n, heads, self.key_dim)
    v = conv(heads * d, 'v')(x, train)
    v_local = conv(heads * d, 'v_local', kernel=3, groups=heads * d)(v, train)
    biases = self.param('attention_biases', _zeros, (heads, n))
    bias = jnp.asarray(biases)[:, attention_bias_index(self.resolution)].transpose(1, 2, 0)  # (N, N, heads)
    attn = jnp.einsum('bnhd,bmhd->bnmh', q, k) * (self.key_dim ** -0.5) + bias.astype(q.dtype)
    head_mix = lambda name: Conv(heads, (1, 1), dtype=self.dtype, kernel_init=_trunc_normal, bias_init=_zeros,
                                 name=name)
    attn = head_mix('talking_head1')(attn)
    attn = jax.nn.softmax(attn.astype(jnp.float32), axis=2).astype(v.dtype)
    attn = head_mix('talking_head2')(attn)
    out = jnp.einsum('bnmh,bmhd->bnhd', attn, v.reshape(b, n, heads, d)).reshape(b, h, w, heads * d) + v_local
    if self.stride is not None:
      out = upsample2_bilinear(out)
    return conv(dim, 'proj')(layers.gelu(out, approximate=False), train)


class LocalGlobalQuery(nn.Module):
  """Queries on the stride-2 grid: proj(dw3x3_s2(x) + x[::2, ::2]) (timm LocalGlobalQuery)."""
  features: int
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    c = x.shape[-1]
    local = Conv(c, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), feature_group_count=c, dtype=self.dtype,
                 kernel_init=_trunc_normal, bias_init=_zeros, name='local')(x)
    return ConvBN(self.features, deploy=self.deploy, dtype=self.dtype, name='proj')(local + x[:, ::2, ::2], train)


class Attention2dDownsample(nn.Module):
  """Stride-2 attention from the full map to its stride-2 grid (timm Attention2dDownsample); `resolution` is the
  input map's side."""
  out_dim: int
  key_dim: int = 16
  num_heads: int = 8
  attn_ratio: float = 4.0
  resolution: int = 14
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    b, h, w, _ = x.shape
    if (h, w) != (self.resolution, self.resolution):
      raise ValueError(f'EfficientFormerV2 downsampling attention has a {self.resolution}x{self.resolution} bias '
                       f'table but got a {h}x{w} map. Fix: build the model with img_size = the input size.')
    heads, d = self.num_heads, int(self.attn_ratio * self.key_dim)
    conv = lambda f, name, **kw: ConvBN(f, deploy=self.deploy, dtype=self.dtype, name=name, **kw)
    q = LocalGlobalQuery(heads * self.key_dim, self.deploy, dtype=self.dtype, name='q')(x, train)
    h2, w2 = q.shape[1:3]
    q = q.reshape(b, h2 * w2, heads, self.key_dim)
    k = conv(heads * self.key_dim, 'k')(x, train).reshape(b, h * w, heads, self.key_dim)
    v = conv(heads * d, 'v')(x, train)
    v_local = conv(heads * d, 'v_local', kernel=3, stride=2, groups=heads * d)(v, train)
    biases = self.param('attention_biases', _zeros, (heads, h * w))
    bias = jnp.asarray(biases)[:, downsample_bias_index(self.resolution)]  # (heads, N2, N)
    attn = jnp.einsum('bnhd,bmhd->bhnm', q, k) * (self.key_dim ** -0.5) + bias.astype(q.dtype)
    attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum('bhnm,bmhd->bnhd', attn, v.reshape(b, h * w, heads, d)).reshape(b, h2, w2, heads * d)
    return conv(self.out_dim, 'proj')(layers.gelu(out + v_local, approximate=False), train)


class DownsampleV2(nn.Module):
  """conv 3x3 s2 + BN, plus (stage 3) the downsampling attention (timm efficientformer_v2 Downsample)."""
  out_dim: int
  use_attn: bool = False
  attn_kwargs: Any = None
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    out = ConvBN(self.out_dim, 3, 2, deploy=self.deploy, dtype=self.dtype, name='conv')(x, train)
    if self.use_attn:
      out = out + Attention2dDownsample(self.out_dim, **dict(self.attn_kwargs or {}), deploy=self.deploy,
                                        dtype=self.dtype, name='attn')(x, train)
    return out


class EfficientFormerV2Block(nn.Module):
  """[x + ls1 * Attention2d(x)], then x + ls2 * ConvMlp(x) with the depthwise mid conv (timm
  EfficientFormerV2Block)."""
  mlp_ratio: float = 4.0
  use_attn: bool = False
  attn_kwargs: Any = None
  layer_scale_init: float = 1e-5
  drop_path: float = 0.0
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    dim = x.shape[-1]
    drop = DropPath(self.drop_path)
    if self.use_attn:
      y = Attention2d(**dict(self.attn_kwargs or {}), deploy=self.deploy, dtype=self.dtype, name='token_mixer')(
          x, train)
      x = x + drop(y * _layer_scale(self, 'ls1', dim, self.layer_scale_init).astype(x.dtype), deterministic=not train)
    hidden = int(dim * self.mlp_ratio)
    conv = lambda f, name, **kw: ConvBN(f, deploy=self.deploy, dtype=self.dtype, name=name, **kw)
    y = conv(hidden, 'fc1', act=True)(x, train)
    y = conv(hidden, 'mid', kernel=3, groups=hidden, act=True)(y, train)
    y = conv(dim, 'fc2')(y, train)
    return x + drop(y * _layer_scale(self, 'ls2', dim, self.layer_scale_init).astype(x.dtype),
                    deterministic=not train)


class ChannelAffine(nn.Module):
  """x * scale + bias per channel: an inference BatchNorm with its statistics folded in (deploy form)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],))
    bias = self.param('bias', _zeros, (x.shape[-1],))
    return x * scale.astype(x.dtype) + bias.astype(x.dtype)


class EfficientFormerV2(nn.Module):
  """EfficientFormerV2 classifier on NHWC images (timm `EfficientFormerV2`, with the distillation head).

  img_size sizes the attention bias tables (as timm) and must be the input size. mlp_ratios: one value, one per
  stage, or per stage one per block. num_classes=0: the logits are the pooled pre-logits. `deploy=True`: the
  BatchNorm-folded inference form.
  """
  num_classes: int = 1000
  depths: Sequence[int] = (2, 2, 6, 4)
  embed_dims: Sequence[int] = (32, 48, 96, 176)
  mlp_ratios: Any = 4.0
  num_vit: int = 2
  img_size: int = 224
  patch_size: int = 4  # The stem's stride: 4 (the paper, timm), or 2 (second conv unstrided) for small images.
  layer_scale_init: float = 1e-5
  attn_key_dim: int = 32
  attn_heads: int = 8
  attn_ratio: float = 4.0
  downsample_key_dim: int = 16
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  deploy: bool = False
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False

  @property
  def num_features(self) -> int:
    return int(self.embed_dims[-1])

  def stage_resolutions(self) -> list[int]:
    """Sides of the 4 stage maps for img_size (stem / patch_size, then each stride-2 conv rounds up)."""
    side = -(-self.img_size // 2)
    if self.patch_size == 4:
      side = -(-side // 2)
    out = [side]
    for _ in range(len(self.depths) - 1):
      side = -(-side // 2)
      out.append(side)
    return out

  def setup(self):
    n = len(self.depths)
    if n != 4 or len(self.embed_dims) != 4:
      raise ValueError(f'EfficientFormerV2 has 4 stages; got depths {tuple(self.depths)} and embed_dims '
                       f'{tuple(self.embed_dims)}.')
    if self.patch_size not in (2, 4):
      raise ValueError(f'patch_size={self.patch_size}: EfficientFormerV2\'s stem strides by 4 (the reference) or 2.')
    res = self.stage_resolutions()
    if res[2] % 2:
      raise ValueError(f'img_size={self.img_size} gives a {res[2]}x{res[2]} stage-2 map; its strided attention '
                       'upsamples by 2, so the map must be even. Fix: use an img_size that is a multiple of 32.')
    ratios = self.mlp_ratios if isinstance(self.mlp_ratios, (tuple, list)) else (self.mlp_ratios,) * n
    dpr = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    starts = np.cumsum((0,) + tuple(self.depths))
    attn = dict(key_dim=self.attn_key_dim, num_heads=self.attn_heads, attn_ratio=self.attn_ratio)
    self.stem_conv1 = ConvBN(self.embed_dims[0] // 2, 3, 2, act=True, deploy=self.deploy, dtype=self.dtype)
    self.stem_conv2 = ConvBN(self.embed_dims[0], 3, self.patch_size // 2, act=True, deploy=self.deploy,
                             dtype=self.dtype)
    stages = []
    for i in range(n):
      stage_ratios = layers.per_stage(ratios[i], self.depths[i], f'mlp_ratios[{i}]')
      block_attn = dict(attn, resolution=-(-res[i] // 2) if i == 2 else res[i], stride=2 if i == 2 else None)
      stages.append(EfficientFormerV2Stage(
          out_dim=self.embed_dims[i], depth=self.depths[i], downsample=i > 0, downsample_attn=i >= 3,
          downsample_kwargs=dict(key_dim=self.downsample_key_dim, num_heads=self.attn_heads,
                                 attn_ratio=self.attn_ratio, resolution=res[i - 1] if i else res[0]),
          mlp_ratios=tuple(float(r) for r in stage_ratios),
          first_attn=self.depths[i] - self.num_vit if i >= 2 else self.depths[i], attn_kwargs=block_attn,
          layer_scale_init=self.layer_scale_init,
          drop_path_rates=tuple(float(r) for r in dpr[starts[i]:starts[i + 1]]), deploy=self.deploy,
          remat=self.remat, dtype=self.dtype, name=f'stages_{i}'))
    self.stages = stages
    # A BatchNorm whose mode is chosen per call (torch numerics: eps 1e-5, momentum 0.1 = flax's 0.9).
    self.norm = (ChannelAffine() if self.deploy else
                 nn.BatchNorm(momentum=0.9, epsilon=BN_EPS, dtype=self.dtype, axis_name=None))
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes > 0:
      self.head = _dense(self.num_classes, dtype=self.dtype, name='head')
      self.head_dist = _dense(self.num_classes, dtype=self.dtype, name='head_dist')

  def _final_norm(self, x: Array, train: bool) -> Array:
    if self.deploy:
      return self.norm(x)
    return self.norm(x, use_running_average=not train)

  def _stages(self, images: Array, train: bool) -> list[Array]:
    if images.ndim != 4:
      raise ValueError(f'Expected NHWC images, got shape {images.shape}.')
    if images.shape[1:3] != (self.img_size, self.img_size):
      raise ValueError(f'Input {images.shape[1]}x{images.shape[2]} does not match this EfficientFormerV2\'s '
                       f'img_size {self.img_size} (its attention bias tables are sized by it). Fix: build the model '
                       'with img_size = your input size (converted tables are resized to it).')
    x = self.stem_conv2(self.stem_conv1(images, train), train)
    outs = []
    for stage in self.stages:
      x = stage(x, train)
      outs.append(x)
    return outs

  def forward_intermediates(self, images: Array, *, train: bool = False, norm: bool = False) -> list[Array]:
    """Per-stage NHWC maps (strides 4, 8, 16, 32); norm=True applies the final BatchNorm to the last one."""
    outs = self._stages(images, train)
    if norm:
      outs[-1] = self._final_norm(outs[-1], train)
    return outs

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """The final-normed last-stage map, NHWC (timm's forward_features)."""
    return self._final_norm(self._stages(images, train)[-1], train)

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False) -> Array:
    """Mean over H, W, dropout, then (unless pre_logits) the mean of the class and distillation heads."""
    x = self.head_drop(jnp.mean(features, axis=(1, 2)), deterministic=not train)
    if pre_logits or self.num_classes == 0:
      return x
    return ((self.head(x) + self.head_dist(x)) / 2).astype(jnp.float32)

  def __call__(self, images: Array, *, train: bool = False) -> Array:
    return self.forward_head(self.forward_features(images, train=train), train=train)


class EfficientFormerV2Stage(nn.Module):
  """Optional downsampling, then `depth` blocks; blocks first_attn.. attend."""
  out_dim: int
  depth: int
  downsample: bool
  downsample_attn: bool = False
  downsample_kwargs: Any = None
  mlp_ratios: tuple[float, ...] = ()
  first_attn: int = 0
  attn_kwargs: Any = None
  layer_scale_init: float = 1e-5
  drop_path_rates: tuple[float, ...] = ()
  deploy: bool = False
  remat: Union[bool, str] = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.downsample:
      x = DownsampleV2(self.out_dim, self.downsample_attn, self.downsample_kwargs, self.deploy, dtype=self.dtype,
                       name='downsample')(x, train)
    block = layers.remat(EfficientFormerV2Block, self.remat, static_argnums=(2,))
    for j in range(self.depth):
      x = block(self.mlp_ratios[j], j >= self.first_attn, self.attn_kwargs, self.layer_scale_init,
                self.drop_path_rates[j] if self.drop_path_rates else 0.0, self.deploy, dtype=self.dtype,
                name=f'blocks_{j}')(x, train)
    return x


_V2_CONV_UNITS = r'(conv|q|k|v|v_local|proj|stride_conv|fc1|mid|fc2)'
V2_TIMM_RULES: tuple[facts.Rule, ...] = (
    (r'stem\.(conv[12])\.conv', r'stem_\1/conv', 'conv'),
    (r'stem\.(conv[12])\.bn', r'stem_\1/bn', 'batchnorm'),
    (r'stages\.(\d+)\.downsample\.conv\.conv', r'stages_\1/downsample/conv/conv', 'conv'),
    (r'stages\.(\d+)\.downsample\.conv\.bn', r'stages_\1/downsample/conv/bn', 'batchnorm'),
    (r'stages\.(\d+)\.downsample\.attn\.q\.local', r'stages_\1/downsample/attn/q/local', 'conv'),
    (r'stages\.(\d+)\.downsample\.attn\.q\.proj\.conv', r'stages_\1/downsample/attn/q/proj/conv', 'conv'),
    (r'stages\.(\d+)\.downsample\.attn\.q\.proj\.bn', r'stages_\1/downsample/attn/q/proj/bn', 'batchnorm'),
    (r'stages\.(\d+)\.downsample\.attn\.(k|v|v_local|proj)\.conv', r'stages_\1/downsample/attn/\2/conv', 'conv'),
    (r'stages\.(\d+)\.downsample\.attn\.(k|v|v_local|proj)\.bn', r'stages_\1/downsample/attn/\2/bn', 'batchnorm'),
    (r'stages\.(\d+)\.downsample\.attn\.attention_biases', r'stages_\1/downsample/attn/attention_biases',
     'rel_table'),
    (_TB + r'token_mixer\.' + _V2_CONV_UNITS + r'\.conv', _OB + r'token_mixer/\3/conv', 'conv'),
    (_TB + r'token_mixer\.' + _V2_CONV_UNITS + r'\.bn', _OB + r'token_mixer/\3/bn', 'batchnorm'),
    (_TB + r'token_mixer\.(talking_head[12])', _OB + r'token_mixer/\3', 'conv'),
    (_TB + r'token_mixer\.attention_biases', _OB + 'token_mixer/attention_biases', 'rel_table'),
    (_TB + r'mlp\.' + _V2_CONV_UNITS + r'\.conv', _OB + r'\3/conv', 'conv'),
    (_TB + r'mlp\.' + _V2_CONV_UNITS + r'\.bn', _OB + r'\3/bn', 'batchnorm'),
    (_TB + r'ls([12])\.gamma', _OB + r'ls\3', 'raw'),
    (r'norm', 'norm', 'batchnorm'),
    (r'(head|head_dist)', r'\1', 'linear'),
)


def _fold_v2(options: Mapping[str, Any], variables: Mapping[str, Any]) -> tuple[dict, dict]:
  """FamilyFacts.fold for V2: BatchNorms into their convs, the final BatchNorm into a per-channel affine."""
  if options.get('deploy'):
    return dict(options), dict(variables)
  stats = dict(variables.get('batch_stats', {}))
  final = stats.pop('norm')
  params = dict(fold_batchnorms(variables['params'], stats, BN_EPS))
  norm = params.pop('norm')
  s = norm['scale'] / jnp.sqrt(jnp.asarray(final['var']) + BN_EPS)
  params['norm'] = {'scale': s, 'bias': norm['bias'] - jnp.asarray(final['mean']) * s}
  return {**options, 'deploy': True}, {'params': params}


def _infer_image_size_v2(state_dict: Any, options: Mapping[str, Any]) -> Optional[int]:
  """The model's img_size (its tables are sized by it); a checkpoint of another size is resized to it."""
  del state_dict
  return int(options.get('img_size', 224))


def forward_macs_v2(model: EfficientFormerV2, image_size: int) -> float:
  """Multiply-adds of one forward pass on one image (convs, linears and the attention matmuls; BatchNorm,
  activations and layer scales are not counted, as the paper's FLOPs). Folding the BatchNorms changes nothing here.

  On an s x s map of width C (H heads, key dim k, value dim v, n = s'^2 attended positions): the 1x1 -> depthwise
  3x3 -> 1x1 MLP of hidden width m, s^2 m (2C + 9); attention n C H (2k + v) + 9 n H v (v_local)
  + n^2 H (k + v) + 2 n^2 H^2 (talking heads) + s^2 H v C (proj), with stage 2's depthwise stride-2 conv
  9 n C and the x2 bilinear upsampling (the code's two matrix products, 6 s'^3 H v); stage 3's downsampling
  attention from N keys to N2 strided queries adds its local/strided convs, N2 N H (k + v) and N2 H v C.
  """
  if image_size != model.img_size:
    raise ValueError(f'EfficientFormerV2 built for img_size {model.img_size} cannot run at {image_size} px; build '
                     'it with img_size = the input size.')
  res = model.stage_resolutions()
  dims = tuple(model.embed_dims)
  heads, k, kd = model.attn_heads, model.attn_key_dim, model.downsample_key_dim
  v, vd = int(model.attn_ratio * k), int(model.attn_ratio * kd)
  ratios = model.mlp_ratios if isinstance(model.mlp_ratios, (tuple, list)) else (model.mlp_ratios,) * len(dims)
  macs = layers.conv_macs(layers.conv_side(image_size, 3, 2), 3, dims[0] // 2, 3)
  macs += layers.conv_macs(res[0], dims[0] // 2, dims[0], 3)
  for i, c in enumerate(dims):
    s = res[i]
    if i > 0:
      cin, r = dims[i - 1], res[i - 1]
      macs += layers.conv_macs(s, cin, c, 3)
      if i >= 3:  # Attention2dDownsample: queries on the stride-2 grid (side s), keys and values on r x r.
        big, small = r * r, s * s
        macs += layers.conv_macs(s, cin, cin, 3, cin) + small * cin * heads * kd
        macs += big * cin * heads * (kd + vd) + layers.conv_macs(s, heads * vd, heads * vd, 3, heads * vd)
        macs += small * big * heads * (kd + vd) + small * heads * vd * c
    first_attn = model.depths[i] - model.num_vit if i >= 2 else model.depths[i]
    for j, ratio in enumerate(layers.per_stage(ratios[i], model.depths[i], f'mlp_ratios[{i}]')):
      hidden = int(c * ratio)
      macs += 2 * s * s * c * hidden + layers.conv_macs(s, hidden, hidden, 3, hidden)
      if j < first_attn:
        continue
      a = -(-s // 2) if i == 2 else s  # Stage 2 attends on its map halved by a depthwise stride-2 conv.
      n = a * a
      macs += layers.conv_macs(a, c, c, 3, c) if i == 2 else 0
      macs += n * c * heads * (2 * k + v) + layers.conv_macs(a, heads * v, heads * v, 3, heads * v)
      macs += n * n * heads * (k + v) + 2 * n * n * heads * heads
      macs += 6 * a ** 3 * heads * v if i == 2 else 0
      macs += s * s * heads * v * c
  return float(macs + 2 * dims[-1] * max(model.num_classes, 0))


V2_FACTS = facts.register_family(facts.FamilyFacts(
    name='efficientformerv2',
    layouts={'timm': facts.ConversionTable(V2_TIMM_RULES, _TIMM_IGNORE, source_heads=('head', 'head_dist'))},
    grouping=facts.LayerGrouping(blocks=((r'^stages_(\d+)/blocks_(\d+)/', 'block2'),
                                         (r'^stages_(\d+)/downsample/', 'before')),
                                 stem=r'^stem_conv[12]/'),
    forward_macs=forward_macs_v2,
    resize=_resize,
    infer_image_size=_infer_image_size_v2,
    heads=('head', 'head_dist'),
    fold=_fold_v2,
))

# timm 1.0.31 counts at 224 px; drop_path_rate as timm's constructors (0, 0, 0.02, 0.1).
_V2 = {  # our name: (depths, widths, mlp_ratios, num_vit, drop_path_rate, count)
    's0': ((2, 2, 6, 4), (32, 48, 96, 176), (4, 4, (4, 3, 3, 3, 4, 4), (4, 3, 3, 4)), 2, 0.0, 3_600_256),
    's1': ((3, 3, 9, 6), (32, 48, 120, 224), (4, 4, (4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4)), 2, 0.0,
           6_185_560),
    's2': ((4, 4, 12, 8), (32, 64, 144, 288),
           (4, 4, (4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 3, 3, 3, 3, 4, 4)), 4, 0.02, 12_710_112),
    'l': ((5, 5, 15, 10), (40, 80, 192, 384),
          (4, 4, (4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 4, 3, 3, 3, 3, 4, 4, 4)), 6, 0.1, 26_322_288),
}
for _size, (_depths, _dims, _ratios, _num_vit, _dpr, _count) in _V2.items():
  registry.register_model(f'efficientformerv2_{_size}', EfficientFormerV2, family='efficientformerv2',
                          image_size=224, num_params=_count, timm_name=f'efficientformerv2_{_size}.snap_dist_in1k',
                          depths=_depths, embed_dims=_dims, mlp_ratios=_ratios, num_vit=_num_vit,
                          drop_path_rate=_dpr)
