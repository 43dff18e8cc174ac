"""LeViT (Graham et al. 2021, "LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference"), as timm's
`levit.py` in its linear (`nn.Linear`) mode, on NHWC maps.

  stem/conv{1..n}                   n = log2(patch_size) 3x3 stride-2 convs (widths C0/2^(n-1) .. C0), each followed by
                                    BatchNorm, Hardswish between them (timm Stem16: patch_size 16, four convs)
  stages_0/blocks_{j}               LeViT blocks at the stem's resolution
  stages_{i}/downsample             (i > 0) attention downsampling + a residual MLP (mlp ratio 2)
  stages_{i}/blocks_{j}             LeViT blocks at the halved resolution
  head_norm, head                   BatchNorm1d + Linear on the mean-pooled tokens (timm head.bn / head.linear)
  head_dist_norm, head_dist         the distillation head (timm head_dist)

Every linear layer is a `ConvNorm`: a bias-free Dense (or Conv) followed by BatchNorm (eps 1e-5, statistics in the
`batch_stats` collection) - timm's LinearNorm / ConvNorm. Attention (timm `Attention`): one ConvNorm gives per head
[q (key_dim) | k (key_dim) | v (attn_ratio * key_dim)]; softmax(q k^T key_dim^-0.5 + B) v, where B is a learned
per-head table over the |dy| * W + |dx| offsets of the map (`attention_biases`, (heads, H * W)); then Hardswish and
a ConvNorm projection. Attention downsampling (timm `AttentionDownsample`, heads = in_dim // key_dim, attn_ratio 4):
keys/values from every position, queries from the stride-2 subsampled map, a bias table indexed by the offsets
between query and key positions. The MLP is ConvNorm -> Hardswish -> ConvNorm (ratio 2). Residual branches
(attention, MLP) use DropPath at one rate for every block (timm passes drop_path_rate unchanged to each block).

Logits are the mean of the two heads (timm's LevitDistilled at inference); `train=True` with
`distilled_training=True` returns both (the DeiT distillation loss of vit_jax.losses).

Deploy form (`deploy=True`, built by `fold` = FamilyFacts.fold): every ConvNorm is one Dense/Conv with a bias, and
each head's BatchNorm is folded into its Linear - timm's `fuse()` of every LinearNorm/ConvNorm/NormLinear, with
the same parameter count as timm's fused model.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

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
from vit_jax.models.layers import DropPath, logical

Array = jax.Array

BN_EPS = 1e-5
# torch's default nn.Linear / nn.Conv2d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_default = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


class ConvNorm(nn.Module):
  """A bias-free Dense (kernel_size None) or Conv, then BatchNorm (timm LinearNorm / ConvNorm); `deploy=True`: one
  Dense/Conv with a bias (the BatchNorm folded in). Submodules `linear` and `bn`, as timm's names.

  `bn_scale_init` 0 starts a residual branch at zero (timm's bn_weight_init=0 on the last layer of a branch).
  """
  features: int
  kernel_size: Optional[int] = None
  stride: int = 1
  groups: int = 1
  bn_scale_init: float = 1.0
  deploy: bool = False
  dtype: Any = jnp.float32
  inner_name: str = 'linear'  # The layer's name (timm: 'linear' in LeViT, 'conv' in EfficientViT-M).

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.kernel_size is None:
      layer = nn.Dense(self.features, use_bias=self.deploy, dtype=self.dtype, name=self.inner_name,
                       kernel_init=logical(_torch_default, ('embed', None)))
    else:
      k, pad = self.kernel_size, self.kernel_size // 2
      layer = Conv(self.features, (k, k), strides=(self.stride, self.stride), padding=((pad, pad), (pad, pad)),
                   feature_group_count=self.groups, use_bias=self.deploy, dtype=self.dtype, name=self.inner_name,
                   kernel_init=logical(_torch_default, (None, None, None, 'embed')))
    x = layer(x)
    if self.deploy:
      if train:
        raise ValueError('A deploy-form (BatchNorm-folded) model is for inference: apply it with train=False, or '
                         'train the model built with deploy=False.')
      return x
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BN_EPS, dtype=self.dtype,
                        axis_name=None, scale_init=nn.initializers.constant(self.bn_scale_init), name='bn')(x)


class Stem(nn.Module):
  """`convs` 3x3 stride-2 ConvNorms (widths out_dim / 2^(convs-1) .. out_dim) with `act` between them (timm LeViT
  Stem16 for convs=4 with Hardswish; EfficientViT-M's PatchEmbedding with ReLU)."""
  out_dim: int
  convs: int
  act: Callable[[Array], Array] = jax.nn.hard_swish
  inner_name: str = 'linear'
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    for i in range(self.convs):
      if i:
        x = self.act(x)
      x = ConvNorm(self.out_dim // 2 ** (self.convs - 1 - i), kernel_size=3, stride=2, deploy=self.deploy,
                   dtype=self.dtype, inner_name=self.inner_name, name=f'conv{i + 1}')(x, train)
    return x


def attention_bias_index(q_size: tuple[int, int], k_size: tuple[int, int], stride: int) -> np.ndarray:
  """(Nq, Nk) indices into a (heads, Hk * Wk) bias table: |dy| * Wk + |dx| between the query position
  (stride * qy, stride * qx) and each key position (timm's attention_bias_idxs, row-major positions)."""
  qy, qx = np.meshgrid(np.arange(q_size[0]) * stride, np.arange(q_size[1]) * stride, indexing='ij')
  ky, kx = np.meshgrid(np.arange(k_size[0]), np.arange(k_size[1]), indexing='ij')
  dy = np.abs(qy.reshape(-1, 1) - ky.reshape(1, -1))
  dx = np.abs(qx.reshape(-1, 1) - kx.reshape(1, -1))
  return (dy * k_size[1] + dx).astype(np.int32)


def _bias_table(module: nn.Module, heads: int, k_size: tuple[int, int]) -> Array:
  shape = (heads, k_size[0] * k_size[1])
  table = module.param('attention_biases', nn.initializers.zeros, shape, jnp.float32)
  if table.shape != shape:
    raise ValueError(f'attention_biases of shape {table.shape} do not fit a {k_size[0]}x{k_size[1]} map '
                     f'(expected {shape}); convert or resize the checkpoint for this image size.')
  return table


def _attend(q: Array, k: Array, v: Array, bias: Array, impl: str) -> Array:
  """softmax(q k^T / sqrt(dk) + bias) v for (B, L, H, D) inputs; v may be wider than q and k."""
  if impl != 'einsum' and v.shape[-1] != q.shape[-1]:
    # jax.nn.dot_product_attention needs one head width; pad q and k with zeros (no change to q k^T) and rescale.
    pad = v.shape[-1] - q.shape[-1]
    if pad > 0:
      widen = lambda t: jnp.pad(t, ((0, 0),) * 3 + ((0, pad),))
      return attention.dot_product_attention(widen(q), widen(k), v, bias=bias[None],
                                             scale=q.shape[-1] ** -0.5, implementation=impl)
  return attention.dot_product_attention(q, k, v, bias=bias[None], scale=q.shape[-1] ** -0.5,
                                         implementation=impl)


class Attention(nn.Module):
  """LeViT self-attention with a learned per-head bias over the map's offsets (timm levit Attention)."""
  key_dim: int
  num_heads: int
  attn_ratio: float
  deploy: bool = False
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    b, h, w, dim = x.shape
    kd, vd, heads = self.key_dim, int(self.attn_ratio * self.key_dim), self.num_heads
    cn = dict(deploy=self.deploy, dtype=self.dtype)
    qkv = ConvNorm(heads * (2 * kd + vd), name='qkv', **cn)(x, train).reshape(b, h * w, heads, 2 * kd + vd)
    q, k, v = qkv[..., :kd], qkv[..., kd:2 * kd], qkv[..., 2 * kd:]
    table = _bias_table(self, heads, (h, w))
    bias = table[:, attention_bias_index((h, w), (h, w), 1)]
    y = _attend(q, k, v, bias, self.attention_impl).reshape(b, h, w, heads * vd)
    return ConvNorm(dim, bn_scale_init=0.0, name='proj', **cn)(jax.nn.hard_swish(y), train)


class AttentionDownsample(nn.Module):
  """Attention whose queries come from the stride-2 subsampled map (timm levit AttentionDownsample)."""
  out_dim: int
  key_dim: int
  num_heads: int
  attn_ratio: float
  stride: int = 2
  deploy: bool = False
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    b, h, w, _ = x.shape
    kd, vd, heads = self.key_dim, int(self.attn_ratio * self.key_dim), self.num_heads
    cn = dict(deploy=self.deploy, dtype=self.dtype)
    kv = ConvNorm(heads * (kd + vd), name='kv', **cn)(x, train).reshape(b, h * w, heads, kd + vd)
    k, v = kv[..., :kd], kv[..., kd:]
    sub = x[:, ::self.stride, ::self.stride]
    hq, wq = sub.shape[1], sub.shape[2]
    q = ConvNorm(heads * kd, name='q', **cn)(sub, train).reshape(b, hq * wq, heads, kd)
    table = _bias_table(self, heads, (h, w))
    bias = table[:, attention_bias_index((hq, wq), (h, w), self.stride)]
    y = _attend(q, k, v, bias, self.attention_impl).reshape(b, hq, wq, heads * vd)
    return ConvNorm(self.out_dim, name='proj', **cn)(jax.nn.hard_swish(y), train)


class Mlp(nn.Module):
  """ConvNorm -> Hardswish -> ConvNorm (timm LevitMlp; the second BatchNorm's scale starts at 0)."""
  hidden: int
  deploy: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    cn = dict(deploy=self.deploy, dtype=self.dtype)
    y = jax.nn.hard_swish(ConvNorm(self.hidden, name='ln1', **cn)(x, train))
    return ConvNorm(x.shape[-1], bn_scale_init=0.0, name='ln2', **cn)(y, train)


class LevitBlock(nn.Module):
  """x + DropPath(attn(x)); x + DropPath(mlp(x))."""
  key_dim: int
  num_heads: int
  attn_ratio: float
  mlp_ratio: float
  drop_path_rate: float = 0.0
  deploy: bool = False
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    drop = DropPath(self.drop_path_rate)
    x = x + drop(Attention(self.key_dim, self.num_heads, self.attn_ratio, deploy=self.deploy, dtype=self.dtype,
                           attention_impl=self.attention_impl, name='attn')(x, train), deterministic=not train)
    mlp = Mlp(int(x.shape[-1] * self.mlp_ratio), deploy=self.deploy, dtype=self.dtype, name='mlp')
    return x + drop(mlp(x, train), deterministic=not train)


class LevitDownsample(nn.Module):
  """Attention downsampling to `out_dim`, then x + DropPath(mlp(x)) (timm LevitDownsample)."""
  out_dim: int
  key_dim: int
  num_heads: int
  attn_ratio: float = 4.0
  mlp_ratio: float = 2.0
  drop_path_rate: float = 0.0
  deploy: bool = False
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = AttentionDownsample(self.out_dim, self.key_dim, self.num_heads, self.attn_ratio, deploy=self.deploy,
                            dtype=self.dtype, attention_impl=self.attention_impl, name='attn_downsample')(x, train)
    mlp = Mlp(int(self.out_dim * self.mlp_ratio), deploy=self.deploy, dtype=self.dtype, name='mlp')
    return x + DropPath(self.drop_path_rate)(mlp(x, train), deterministic=not train)


class LevitStage(nn.Module):
  """Optional attention downsampling (stages 1..), then `depth` LeViT blocks."""
  out_dim: int
  depth: int
  key_dim: int
  num_heads: int
  attn_ratio: float
  mlp_ratio: float
  downsample_heads: int = 0  # 0: no downsampling (stage 0).
  drop_path_rate: float = 0.0
  remat: Union[bool, str] = False
  deploy: bool = False
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    common = dict(drop_path_rate=self.drop_path_rate, deploy=self.deploy, dtype=self.dtype,
                  attention_impl=self.attention_impl)
    if self.downsample_heads:
      x = LevitDownsample(self.out_dim, self.key_dim, self.downsample_heads, name='downsample', **common)(x, train)
    block_cls = layers.remat(LevitBlock, self.remat, static_argnums=(2,))
    for j in range(self.depth):
      x = block_cls(self.key_dim, self.num_heads, self.attn_ratio, self.mlp_ratio, name=f'blocks_{j}',
                    **common)(x, train)
    return x


class Levit(nn.Module):
  """LeViT classifier on NHWC images (timm LevitDistilled, linear mode).

  patch_size is the stem's stride (a power of two: log2 of it 3x3 stride-2 convs; 16 in every published model).
  drop_rate is the dropout before the classifiers; drop_path_rate is every residual branch's rate (timm).
  num_classes=0 gives a model whose logits are the pooled pre-logits.
  """
  num_classes: int = 1000
  patch_size: int = 16
  embed_dim: Sequence[int] = (128, 256, 384)
  key_dim: int = 16
  depth: Sequence[int] = (4, 4, 4)
  num_heads: Sequence[int] = (4, 8, 12)
  attn_ratio: float = 2.0
  mlp_ratio: float = 2.0
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  distilled_training: bool = True
  deploy: bool = False  # BatchNorm folded into the linears (vit_jax.deploy.fold_for_inference builds it).
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False  # False/'none', True/'full', or a jax.checkpoint_policies name (layers.remat).
  attention_impl: str = 'einsum'

  @property
  def num_features(self) -> int:
    return int(self.embed_dim[-1])

  @property
  def stem_convs(self) -> int:
    return int(round(math.log2(self.patch_size)))

  def setup(self):
    n = len(self.embed_dim)
    if len(self.depth) != n or len(tuple(layers.per_stage(self.num_heads, n, 'num_heads'))) != n:
      raise ValueError(f'embed_dim {tuple(self.embed_dim)}, depth {tuple(self.depth)} and num_heads '
                       f'{self.num_heads} need one value per stage.')
    if self.patch_size < 2 or 2 ** self.stem_convs != self.patch_size:
      raise ValueError(f'LeViT patch_size is the stem stride, a power of two >= 2 (16 in the published models); '
                       f'got {self.patch_size}.')
    heads = layers.per_stage(self.num_heads, n, 'num_heads')
    self.stem = Stem(self.embed_dim[0], self.stem_convs, deploy=self.deploy, dtype=self.dtype)
    self.stages = [
        LevitStage(out_dim=self.embed_dim[i], depth=self.depth[i], key_dim=self.key_dim, num_heads=heads[i],
                   attn_ratio=self.attn_ratio, mlp_ratio=self.mlp_ratio,
                   downsample_heads=self.embed_dim[i - 1] // self.key_dim if i > 0 else 0,
                   drop_path_rate=self.drop_path_rate, remat=self.remat, deploy=self.deploy, dtype=self.dtype,
                   attention_impl=self.attention_impl)
        for i in range(n)]
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes > 0:
      if not self.deploy:  # timm's head.bn / head_dist.bn (folded into the linears in deploy form).
        bn = lambda: nn.BatchNorm(momentum=0.9, epsilon=BN_EPS, dtype=self.dtype, axis_name=None)
        self.head_norm, self.head_dist_norm = bn(), bn()
      dense = lambda: nn.Dense(self.num_classes, dtype=self.dtype,
                               kernel_init=logical(_trunc_normal, ('embed', 'classes')),
                               bias_init=logical(nn.initializers.zeros, ('classes',)))
      self.head, self.head_dist = dense(), dense()

  def check_input_size(self, height: int, width: int) -> None:
    last = self.stage_resolutions(height, width)[-1]
    if height < self.patch_size or width < self.patch_size or min(last) < 1:
      raise ValueError(f'Input size {height}x{width} is too small for this LeViT (stem stride {self.patch_size}); '
                       f'use images of at least {self.patch_size}x{self.patch_size} px.')

  def stage_resolutions(self, height: int, width: int) -> list[tuple[int, int]]:
    """(H, W) of every stage map: each stride-2 conv and downsampling gives ceil(x / 2), as PyTorch's."""
    for _ in range(self.stem_convs):
      height, width = (height + 1) // 2, (width + 1) // 2
    out = [(height, width)]
    for _ in range(len(self.embed_dim) - 1):
      height, width = (height + 1) // 2, (width + 1) // 2
      out.append((height, width))
    return out

  def forward_intermediates(self, images: Array, *, train: bool = False, norm: bool = False) -> list[Array]:
    """Per-stage NHWC maps (strides patch_size, 2x, 4x). LeViT has no final norm (`norm` changes nothing)."""
    del norm
    if images.ndim != 4:
      raise ValueError(f'Expected NHWC images, got shape {images.shape}.')
    self.check_input_size(images.shape[1], images.shape[2])
    x = self.stem(images.astype(self.dtype), train)
    outs = []
    for stage in self.stages:
      x = stage(x, train)
      outs.append(x)
    return outs

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """The last stage's NHWC map (timm's forward_features tokens, as a map)."""
    return self.forward_intermediates(images, train=train)[-1]

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False) -> Array:
    """Mean over H and W (the pre-logits); then the mean of the two heads' float32 logits, or
    (logits, logits_dist) when training with distilled_training."""
    x = jnp.mean(features, axis=(1, 2))
    if pre_logits or self.num_classes == 0:
      return x
    def classify(norm_name: str, head: nn.Module) -> Array:
      y = x if self.deploy else getattr(self, norm_name)(x, use_running_average=not train)
      return head(self.head_drop(y, deterministic=not train)).astype(jnp.float32)
    logits, logits_dist = classify('head_norm', self.head), classify('head_dist_norm', self.head_dist)
    if train and self.distilled_training:
      return logits, logits_dist
    return (logits + logits_dist) / 2

  def __call__(self, images: Array, *, train: bool = False) -> Array:
    return self.forward_head(self.forward_features(images, train=train), train=train)



# ----------------------------------------------------------------------------------------------------------------
# Family facts: timm key table, layer grouping, analytic MACs, bias-table resizing, deploy folding.
# ----------------------------------------------------------------------------------------------------------------

def conv_norm_rules(timm_module: str, ours: str, kind: str = 'linear',
                    inner: str = 'linear') -> tuple[facts.Rule, facts.Rule]:
  """The two rules of one timm LinearNorm/ConvNorm: its layer (`kind`) and its BatchNorm."""
  return ((timm_module + r'\.' + inner, ours + '/' + inner, kind),
          (timm_module + r'\.bn', ours + '/bn', 'batchnorm'))


_TS = r'stages\.(\d+)\.'
_TD = _TS + r'downsample\.'
_TB = _TS + r'blocks\.(\d+)\.'
_OD = r'stages_\1/downsample/'
_OB = r'stages_\1/blocks_\2/'
TIMM_RULES: tuple[facts.Rule, ...] = (
    *conv_norm_rules(r'stem\.conv(\d+)', r'stem/conv\1', 'conv'),
    *conv_norm_rules(_TD + r'attn_downsample\.kv', _OD + 'attn_downsample/kv'),
    *conv_norm_rules(_TD + r'attn_downsample\.q\.ln', _OD + 'attn_downsample/q'),
    *conv_norm_rules(_TD + r'attn_downsample\.proj\.ln', _OD + 'attn_downsample/proj'),
    (_TD + r'attn_downsample\.attention_biases', _OD + 'attn_downsample/attention_biases', 'rel_table'),
    *conv_norm_rules(_TD + r'mlp\.(ln[12])', _OD + r'mlp/\2'),
    *conv_norm_rules(_TB + r'attn\.qkv', _OB + 'attn/qkv'),
    *conv_norm_rules(_TB + r'attn\.proj\.ln', _OB + 'attn/proj'),
    (_TB + r'attn\.attention_biases', _OB + 'attn/attention_biases', 'rel_table'),
    *conv_norm_rules(_TB + r'mlp\.(ln[12])', _OB + r'mlp/\3'),
    (r'head\.bn', 'head_norm', 'batchnorm'),
    (r'head\.linear', 'head', 'linear'),
    (r'head_dist\.bn', 'head_dist_norm', 'batchnorm'),
    (r'head_dist\.linear', 'head_dist', 'linear'),
)
# timm's group_matcher: the stem is layer 0; a stage's attention downsampling goes with its first block.
GROUPING = facts.LayerGrouping(
    blocks=((r'^stages_(\d+)/blocks_(\d+)/', 'block2'), (r'^stages_(\d+)/downsample/', 'before')),
    stem=r'^stem/')


def forward_macs(model: Levit, image_size: int) -> float:
  """Multiply-adds of one forward pass on one image (convs, linears and the attention matmuls; BatchNorm and the
  activations are not counted, as the paper's FLOPs).

  Stem: h w 9 C_in C_out per conv. A block on N = h w tokens of width C (heads H, key dim d, value dim v):
  N C H (2d + v) (qkv) + N^2 H (d + v) (q k^T and attn v) + N H v C (proj) + 2 N C^2 mlp_ratio (MLP). The attention
  downsampling from N_k keys to N_q queries (heads H' = C_in / d, value dim 4d): N_k C_in H'(d + 4d) +
  N_q C_in H' d + N_q N_k H' (d + 4d) + N_q H' 4d C, then its MLP (ratio 2). Heads: 2 C classes.
  """
  res = model.stage_resolutions(image_size, image_size)
  h, w, cin = image_size, image_size, 3
  macs = 0.0
  m = model.stem_convs
  for i in range(m):
    h, w = (h + 1) // 2, (w + 1) // 2
    cout = model.embed_dim[0] // 2 ** (m - 1 - i)
    macs += h * w * 9 * cin * cout
    cin = cout
  heads = layers.per_stage(model.num_heads, len(model.embed_dim), 'num_heads')
  d = model.key_dim
  for i, c in enumerate(model.embed_dim):
    n = res[i][0] * res[i][1]
    if i > 0:
      c_in, nk = model.embed_dim[i - 1], res[i - 1][0] * res[i - 1][1]
      hd, v = c_in // d, 4 * d
      macs += nk * c_in * hd * (d + v) + n * c_in * hd * d + n * nk * hd * (d + v) + n * hd * v * c
      macs += 2 * n * c * int(c * 2.0)
    v = int(model.attn_ratio * d)
    per_block = (n * c * heads[i] * (2 * d + v) + n * n * heads[i] * (d + v) + n * heads[i] * v * c
                 + 2 * n * c * int(c * model.mlp_ratio))
    macs += model.depth[i] * per_block
  return float(macs + 2 * model.embed_dim[-1] * model.num_classes)


def resize_bias_table(table: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A (heads, S*S) attention-bias table fitted to (heads, S'*S'): each head's S x S offset grid resized bicubic
  with antialiasing (timm's resize_rel_pos_bias_table_levit, torch bicubic antialias=True = jax.image.resize)."""
  table = np.asarray(table)
  if table.ndim != 2 or len(shape) != 2 or table.shape[0] != shape[0]:
    raise ValueError(f'Cannot fit an attention-bias table of shape {table.shape} to {tuple(shape)}: the head counts '
                     'differ (check the model variant).')
  old, new = math.isqrt(table.shape[1]), math.isqrt(shape[1])
  if old * old != table.shape[1] or new * new != shape[1]:
    raise ValueError(f'Cannot fit an attention-bias table of shape {table.shape} to {tuple(shape)}: only square '
                     'maps resize.')
  if old == new:
    return table
  grid = resize.resize_grid(table.T.reshape(old, old, -1), (new, new), 'bicubic')
  return grid.reshape(new * new, -1).T.astype(table.dtype)


def _resize(path: str, value: np.ndarray, shape: tuple, context: Any) -> Optional[np.ndarray]:
  """FamilyFacts.resize: the attention-bias tables are sized by the map, so by the input resolution."""
  del context
  if not path.endswith('/attention_biases'):
    return None
  return resize_bias_table(value, shape)


def _infer_image_size(state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]) -> Optional[int]:
  """The input size of a timm checkpoint: its first block's bias table covers the stem's S x S map."""
  table = state_dict.get('stages.0.blocks.0.attn.attention_biases')
  if table is None:
    return None
  side = math.isqrt(table.shape[-1])
  return side * int(options.get('patch_size', 16)) if side * side == table.shape[-1] else None


def fold(options: Mapping[str, Any], variables: Mapping[str, Any]) -> tuple[dict, dict]:
  """FamilyFacts.fold: every ConvNorm's BatchNorm into its layer, each head's BatchNorm into its Linear."""
  from vit_jax import deploy  # pylint: disable=g-import-not-at-top  (deploy sits above the models)
  if 'batch_stats' not in variables:
    raise ValueError('Folding LeViT needs its BatchNorm statistics: pass {"params": ..., "batch_stats": ...}.')
  params, stats = dict(variables['params']), dict(variables['batch_stats'])
  for norm, head in (('head_norm', 'head'), ('head_dist_norm', 'head_dist')):
    if norm in params:
      kernel, bias = deploy.fold_batchnorm_before(
          params[head]['kernel'], params[head]['bias'], scale=params[norm]['scale'], offset=params[norm]['bias'],
          mean=stats[norm]['mean'], var=stats[norm]['var'], epsilon=BN_EPS)
      params[head] = {'kernel': kernel, 'bias': bias}
      del params[norm], stats[norm]
  folded = deploy.fold_batchnorm_pairs(params, stats, layer='linear', norm='bn', epsilon=BN_EPS)
  return {**options, 'deploy': True}, {'params': folded}


FACTS = facts.register_family(facts.FamilyFacts(
    name='levit',
    layouts={'timm': facts.ConversionTable(TIMM_RULES, source_heads=('head.linear', 'head_dist.linear'))},
    grouping=GROUPING, forward_macs=forward_macs, resize=_resize, infer_image_size=_infer_image_size,
    heads=('head', 'head_dist'), fold=fold))


# ----------------------------------------------------------------------------------------------------------------
# Registry: timm 1.0.31's counts at 224 px, 1000 classes (REFERENCE.md section 7); the BatchNorm-folded counts are
# in tests/test_levit_efficientvit.py. drop_path_rate 0 as timm's constructors.
# ----------------------------------------------------------------------------------------------------------------

_VARIANTS = {  # name: (embed_dim, key_dim, num_heads, depth, num_params)
    'levit_128s': ((128, 256, 384), 16, (4, 6, 8), (2, 3, 4), 7_777_058),
    'levit_128': ((128, 256, 384), 16, (4, 8, 12), (4, 4, 4), 9_213_936),
    'levit_192': ((192, 288, 384), 32, (3, 5, 6), (4, 4, 4), 10_947_069),
    'levit_256': ((256, 384, 512), 32, (4, 6, 8), (4, 4, 4), 18_893_876),
    'levit_384': ((384, 512, 768), 32, (6, 9, 12), (4, 4, 4), 39_128_836),
}
for _name, (_dims, _kd, _heads, _depth, _count) in _VARIANTS.items():
  registry.register_model(_name, Levit, family='levit', image_size=224, num_params=_count,
                          timm_name=f'{_name}.fb_dist_in1k', embed_dim=_dims, key_dim=_kd, num_heads=_heads,
                          depth=_depth)
