"""Pyramid Vision Transformer v2 (Wang et al. 2021, "PVT v2"), laid out like timm's `pvt_v2.py`.

Parameter names mirror timm so that a timm state dict maps onto these modules with a short table:

  patch_embed/{proj,norm}                         timm patch_embed.proj / patch_embed.norm (conv k7 s4 p3)
  stages_{i}/downsample/{proj,norm}               timm stages.{i}.downsample.*  (stages 1..3; conv k3 s2 p1)
  stages_{i}/blocks_{j}/norm1, norm2              timm stages.{i}.blocks.{j}.norm1 / norm2
  stages_{i}/blocks_{j}/attn/{q,kv,proj}          timm ...attn.q / attn.kv / attn.proj
  stages_{i}/blocks_{j}/attn/{sr,norm}            timm ...attn.sr / attn.norm  (sr_ratio > 1, or linear)
  stages_{i}/blocks_{j}/mlp/{fc1,dwconv,fc2}      timm ...mlp.fc1 / mlp.dwconv / mlp.fc2
  stages_{i}/norm                                 timm stages.{i}.norm
  head                                            timm head

(Linear weights transpose, conv weights OIHW -> HWIO, LayerNorm weight -> scale.)

LayerNorm epsilons follow timm exactly: the block norms (norm1, norm2) and the per-stage norms use 1e-6 (timm's
`norm_layer`); the patch-embedding norms and the attention's spatial-reduction norm are plain `nn.LayerNorm`
in timm, i.e. 1e-5.

Attention is spatial-reduction attention: queries come from every token; keys/values from the map reduced by a
conv with kernel = stride = sr_ratio and a LayerNorm (no reduction when sr_ratio == 1). The linear variant
(`linear=True`, PVTv2-li) instead adaptive-average-pools the map to 7x7, then 1x1 conv + LayerNorm + GELU, for
every stage (sr_ratios unused), and adds a ReLU after fc1 in the MLP. The MLP is fc1 -> (ReLU) -> depthwise 3x3
conv -> exact GELU -> fc2. The classifier sees the mean over the final (stage-normed) map.

Inputs are NHWC images of any size for which every reduced key/value map is non-empty (see `stage_resolutions`);
strides are exactly 4, 8, 16, 32 for sizes divisible by 32 (otherwise the convs round up, as in PyTorch).
"""
from __future__ import annotations

import math
from typing import Any, Sequence, Union

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
FloatOrSeq = Union[float, Sequence[float]]
IntOrSeq = Union[int, Sequence[int]]

_BLOCK_LN_EPS = 1e-6  # timm's norm_layer: block norm1/norm2 and stage norms.
_TORCH_LN_EPS = 1e-5  # nn.LayerNorm default: patch-embed norms and attention sr norm.
_LINEAR_POOL = 7  # Linear SRA pools keys/values to 7x7.
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


def _conv_init(groups: int = 1) -> nn.initializers.Initializer:
  """timm's conv init: normal(0, sqrt(2 / fan_out)), fan_out = kh * kw * out_channels / groups."""
  def init(key, shape, dtype=jnp.float32):
    kh, kw, _, out = shape
    fan_out = kh * kw * out // groups
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_out)
  return init


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - kernel) // stride + 1


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) averaging matrix with PyTorch's AdaptiveAvgPool bins [floor(i*L/n), ceil((i+1)*L/n))."""
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: Array, out_size: tuple[int, int]) -> Array:
  """PyTorch `AdaptiveAvgPool2d` on an NHWC map (static shapes; exact bin boundaries)."""
  ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], out_size[0]), x.dtype)
  pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], out_size[1]), x.dtype)
  return jnp.einsum('ph,bhwc,qw->bpqc', ph, x, pw)


# ----------------------------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------------------------

class OverlapPatchEmbed(nn.Module):
  """Overlapping patch conv (kernel k, stride s, symmetric padding k // 2, as PyTorch) + LayerNorm(eps 1e-5)."""
  patch_size: int
  stride: int
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, p = self.patch_size, self.patch_size // 2
    x = Conv(self.embed_dim, (k, k), strides=(self.stride, self.stride), padding=((p, p), (p, p)),
             dtype=self.dtype, kernel_init=_conv_init(), name='proj')(x)
    return nn.LayerNorm(epsilon=_TORCH_LN_EPS, dtype=self.dtype, name='norm')(x)


class SpatialReductionAttention(nn.Module):
  """timm `Attention`: full-resolution queries, keys/values from the spatially reduced map. NHWC in and out."""
  num_heads: int
  sr_ratio: int = 1
  linear: bool = False
  qkv_bias: bool = True
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'  # Attention kernel (vit_jax.models.attention).

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    b, h, w, dim = x.shape
    heads = self.num_heads
    if dim % heads:
      raise ValueError(f'Width {dim} is not divisible by num_heads={heads}.')
    hd = dim // heads
    dense = dict(dtype=self.dtype, kernel_init=_trunc_normal, bias_init=nn.initializers.zeros)
    q = nn.Dense(dim, use_bias=self.qkv_bias, name='q', **dense)(x).reshape(b, h * w, heads, hd)

    kv_in = x
    if self.linear:
      kv_in = adaptive_avg_pool(kv_in, (_LINEAR_POOL, _LINEAR_POOL))
      kv_in = Conv(dim, (1, 1), dtype=self.dtype, kernel_init=_conv_init(), name='sr')(kv_in)
      kv_in = nn.LayerNorm(epsilon=_TORCH_LN_EPS, dtype=self.dtype, name='norm')(kv_in)
      kv_in = layers.gelu(kv_in, approximate=False)
    elif self.sr_ratio > 1:
      r = self.sr_ratio
      if h < r or w < r:
        raise ValueError(f'Feature map {h}x{w} is smaller than the spatial-reduction ratio {r}.')
      kv_in = Conv(dim, (r, r), strides=(r, r), padding='VALID', dtype=self.dtype, kernel_init=_conv_init(),
                   name='sr')(kv_in)
      kv_in = nn.LayerNorm(epsilon=_TORCH_LN_EPS, dtype=self.dtype, name='norm')(kv_in)
    kv_in = kv_in.reshape(b, -1, dim)
    kv = nn.Dense(2 * dim, use_bias=self.qkv_bias, name='kv', **dense)(kv_in)
    kv = kv.reshape(b, kv.shape[1], 2, heads, hd)  # timm's (2, heads, hd) split of the 2*dim outputs.
    k, v = kv[:, :, 0], kv[:, :, 1]

    dropout = None
    if self.attn_drop_rate > 0 and not deterministic:
      dropout = lambda weights: nn.Dropout(self.attn_drop_rate)(weights, deterministic=False)
    out = attention.dot_product_attention(q, k, v, scale=hd ** -0.5, implementation=self.attention_impl,
                                          dropout=dropout).reshape(b, h, w, dim)
    out = nn.Dense(dim, name='proj', **dense)(out)
    return nn.Dropout(self.proj_drop_rate)(out, deterministic=deterministic)


class MlpWithDepthwiseConv(nn.Module):
  """fc1 -> (ReLU if extra_relu) -> depthwise 3x3 conv (pad 1) -> exact GELU -> dropout -> fc2 -> dropout."""
  hidden_dim: int
  extra_relu: bool = False
  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    dim = x.shape[-1]
    dense = dict(dtype=self.dtype, kernel_init=_trunc_normal, bias_init=nn.initializers.zeros)
    x = nn.Dense(self.hidden_dim, name='fc1', **dense)(x)
    if self.extra_relu:
      x = nn.relu(x)
    x = Conv(self.hidden_dim, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=self.hidden_dim,
             dtype=self.dtype, kernel_init=_conv_init(self.hidden_dim), name='dwconv')(x)
    x = layers.gelu(x, approximate=False)
    x = nn.Dropout(self.drop_rate)(x, deterministic=deterministic)
    x = nn.Dense(dim, name='fc2', **dense)(x)
    return nn.Dropout(self.drop_rate)(x, deterministic=deterministic)


class PvtBlock(nn.Module):
  """Pre-norm block on an NHWC map: x + DropPath(SRA(LN(x))), x + DropPath(MLP(LN(x))); LN eps 1e-6."""
  num_heads: int
  mlp_ratio: float = 4.0
  sr_ratio: int = 1
  linear: bool = False
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    deterministic = not train
    dim = x.shape[-1]
    y = nn.LayerNorm(epsilon=_BLOCK_LN_EPS, dtype=self.dtype, name='norm1')(x)
    y = SpatialReductionAttention(
        self.num_heads, sr_ratio=self.sr_ratio, linear=self.linear, qkv_bias=self.qkv_bias,
        attn_drop_rate=self.attn_drop_rate, proj_drop_rate=self.drop_rate, dtype=self.dtype,
        attention_impl=self.attention_impl, name='attn')(
            y, deterministic)
    x = x + DropPath(self.drop_path_rate)(y, deterministic=deterministic)
    y = nn.LayerNorm(epsilon=_BLOCK_LN_EPS, dtype=self.dtype, name='norm2')(x)
    y = MlpWithDepthwiseConv(int(dim * self.mlp_ratio), extra_relu=self.linear, drop_rate=self.drop_rate,
                             dtype=self.dtype, name='mlp')(y, deterministic)
    return x + DropPath(self.drop_path_rate)(y, deterministic=deterministic)


class PvtStage(nn.Module):
  """timm's stage: optional overlapping downsample (k3 s2 p1, stages 1..3), blocks, then LayerNorm(eps 1e-6)."""
  dim: int
  depth: int
  num_heads: int
  downsample: bool
  sr_ratio: int = 1
  linear: bool = False
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rates: tuple[float, ...] = ()
  remat: Any = False  # bool or a named policy (layers.remat).
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.downsample:
      x = OverlapPatchEmbed(3, 2, self.dim, dtype=self.dtype, name='downsample')(x)
    block_cls = layers.remat(PvtBlock, self.remat, static_argnums=(2,))
    for j in range(self.depth):
      x = block_cls(
          self.num_heads, mlp_ratio=self.mlp_ratio, sr_ratio=self.sr_ratio, linear=self.linear,
          qkv_bias=self.qkv_bias, drop_rate=self.drop_rate, attn_drop_rate=self.attn_drop_rate,
          drop_path_rate=self.drop_path_rates[j] if self.drop_path_rates else 0.0, dtype=self.dtype,
          attention_impl=self.attention_impl, name=f'blocks_{j}')(x, train)
    return nn.LayerNorm(epsilon=_BLOCK_LN_EPS, dtype=self.dtype, name='norm')(x)


# ----------------------------------------------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------------------------------------------

class PyramidVisionTransformerV2(layers.HierarchicalBackbone):
  """PVTv2 on NHWC images (timm `PyramidVisionTransformerV2`).

  drop_rate is timm's `drop_rate`: dropout after the attention projection, in the MLP and before the classifier.
  mlp_ratios / sr_ratios / num_heads may be one value or one per stage. linear=True is the "-li" variant.
  num_classes=0 gives a model whose logits are the pooled pre-logits (as timm's Identity head).
  """
  num_classes: int = 1000
  depths: Sequence[int] = (3, 4, 6, 3)
  embed_dims: Sequence[int] = (64, 128, 320, 512)
  num_heads: IntOrSeq = (1, 2, 5, 8)
  sr_ratios: IntOrSeq = (8, 4, 2, 1)
  mlp_ratios: FloatOrSeq = (8.0, 8.0, 4.0, 4.0)
  qkv_bias: bool = True
  linear: bool = False
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: Any = False  # bool or a named policy (layers.remat).
  attention_impl: str = 'einsum'  # Attention kernel: 'einsum' | 'xla' | 'cudnn' (vit_jax.models.attention).

  @property
  def num_features(self) -> int:
    return int(self.embed_dims[-1])

  def setup(self):
    n = len(self.depths)
    if len(self.embed_dims) != n:
      raise ValueError(f'depths {tuple(self.depths)} and embed_dims {tuple(self.embed_dims)} differ in length.')
    heads = layers.per_stage(self.num_heads, n, 'num_heads')
    srs = layers.per_stage(self.sr_ratios, n, 'sr_ratios')
    mlps = layers.per_stage(self.mlp_ratios, n, 'mlp_ratios')
    dpr = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    starts = np.cumsum((0,) + tuple(self.depths))
    self.patch_embed = OverlapPatchEmbed(7, 4, self.embed_dims[0], dtype=self.dtype)
    self.stages = [
        PvtStage(dim=self.embed_dims[i], depth=self.depths[i], num_heads=heads[i], downsample=i > 0,
                 sr_ratio=srs[i], linear=self.linear, mlp_ratio=mlps[i], qkv_bias=self.qkv_bias,
                 drop_rate=self.drop_rate, attn_drop_rate=self.attn_drop_rate,
                 drop_path_rates=tuple(float(r) for r in dpr[starts[i]:starts[i + 1]]), remat=self.remat,
                 dtype=self.dtype, attention_impl=self.attention_impl)
        for i in range(n)]
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes > 0:
      self.head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_trunc_normal,
                           bias_init=nn.initializers.zeros)

  # -- input-size validation ------------------------------------------------------------------------------------

  def stage_resolutions(self, height: int, width: int) -> list[tuple[int, int]]:
    """Per-stage feature-map (H, W); ValueError when a stage's spatial-reduction conv would leave no keys."""
    n = len(self.depths)
    srs = layers.per_stage(self.sr_ratios, n, 'sr_ratios')
    if height < 1 or width < 1:
      raise ValueError(f'Input size {height}x{width} is empty.')
    res, out = (height, width), []
    for i in range(n):
      k, s = (7, 4) if i == 0 else (3, 2)
      res = tuple(_conv_out(r, k, s, k // 2) for r in res)
      if not self.linear and srs[i] > 1 and min(res) < srs[i]:
        need = self._min_side()
        raise ValueError(
            f'Input size {height}x{width} is too small for this PVTv2 model: stage {i} would be {res[0]}x{res[1]}, '
            f'smaller than its spatial-reduction ratio {srs[i]} (sr_ratios={srs}). Fix: use inputs of at least '
            f'{need}x{need} px (e.g. a multiple of 32 such as 224), or smaller sr_ratios.')
      out.append(res)
    return out

  def _min_side(self) -> int:
    srs = layers.per_stage(self.sr_ratios, len(self.depths), 'sr_ratios')
    for side in range(1, 1 << 16):
      r, ok = side, True
      for i, sr in enumerate(srs):
        r = _conv_out(r, 7, 4, 3) if i == 0 else _conv_out(r, 3, 2, 1)
        ok = ok and (sr <= 1 or r >= sr)
      if ok:
        return side
    return -1

  # -- forward ----------------------------------------------------------------------------------------------------

  def stage_modules(self) -> Sequence[nn.Module]:
    return self.stages

  def check_input_size(self, height: int, width: int) -> None:
    self.stage_resolutions(height, width)

  def final_norm(self, x: Array) -> Array:
    """Identity: each PVTv2 stage ends with its own LayerNorm, and there is no final one."""
    return x


# ----------------------------------------------------------------------------------------------------------------
# Registry. drop_path_rate 0.1 is the official PVTv2 ImageNet recipe for b0..b2 (timm's constructor default is 0).
# ----------------------------------------------------------------------------------------------------------------

_B0 = dict(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8))
_B1 = dict(depths=(2, 2, 2, 2), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8))
_B2 = dict(depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8))

registry.register_model('pvt_v2_b0', PyramidVisionTransformerV2, family='pvt_v2', image_size=224,
                        num_params=3_666_760, timm_name='pvt_v2_b0', drop_path_rate=0.1, **_B0)
registry.register_model('pvt_v2_b1', PyramidVisionTransformerV2, family='pvt_v2', image_size=224,
                        num_params=14_009_000, timm_name='pvt_v2_b1', drop_path_rate=0.1, **_B1)
registry.register_model('pvt_v2_b2', PyramidVisionTransformerV2, family='pvt_v2', image_size=224,
                        num_params=25_362_856, timm_name='pvt_v2_b2', drop_path_rate=0.1, **_B2)
registry.register_model('pvt_v2_b2_li', PyramidVisionTransformerV2, family='pvt_v2', image_size=224,
                        num_params=22_553_512, timm_name='pvt_v2_b2_li', drop_path_rate=0.1, linear=True, **_B2)


# --- Family facts (vit_jax/models/facts.py). FLOPs: XLA's cost analysis. --------------------------------------------

_PB = r'stages\.(\d+)\.blocks\.(\d+)\.'
_OPB = r'stages_\1/blocks_\2/'
TIMM_RULES: tuple[facts.Rule, ...] = (
    (r'patch_embed\.proj', 'patch_embed/proj', 'conv'),
    (r'patch_embed\.norm', 'patch_embed/norm', 'norm'),
    (r'stages\.(\d+)\.downsample\.proj', r'stages_\1/downsample/proj', 'conv'),
    (r'stages\.(\d+)\.downsample\.norm', r'stages_\1/downsample/norm', 'norm'),
    (_PB + r'norm([12])', _OPB + r'norm\3', 'norm'),
    (_PB + r'attn\.(q|kv|proj)', _OPB + r'attn/\3', 'linear'),
    (_PB + r'attn\.sr', _OPB + 'attn/sr', 'conv'),
    (_PB + r'attn\.norm', _OPB + 'attn/norm', 'norm'),
    (_PB + r'mlp\.fc([12])', _OPB + r'mlp/fc\3', 'linear'),
    (_PB + r'mlp\.dwconv', _OPB + 'mlp/dwconv', 'conv'),  # Depthwise: (C, 1, 3, 3) -> (3, 3, 1, C).
    (r'stages\.(\d+)\.norm', r'stages_\1/norm', 'norm'),
    (r'head', 'head', 'linear'),
)

FACTS = facts.register_family(facts.FamilyFacts(
    name='pvt_v2', layouts={'timm': facts.ConversionTable(TIMM_RULES)},
    grouping=facts.LayerGrouping(
        blocks=((r'^stages_(\d+)/blocks_(\d+)/', 'block2'),
                (r'^stages_(\d+)/downsample/', 'before'),  # The stage's overlapping patch embedding comes first.
                (r'^stages_(\d+)/', 'after')),  # Stage norms.
        stem=r'^patch_embed(/|$)')))
