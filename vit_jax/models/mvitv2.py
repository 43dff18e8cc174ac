"""Multiscale Vision Transformer v2 (Li et al. 2022, "MViTv2"), laid out like timm's `mvitv2.py`.

Covers timm's classification configs without a class token (mvitv2_tiny / small / base): pooling attention with
mode 'conv' (depthwise 3x3 conv per head, shared across heads, then LayerNorm over the head dim) on q, k and v,
stride_q (2, 2) at each stage's first block (stage 0: (1, 1)), adaptive stride_kv starting at (4, 4) and divided
by stride_q at every stage that downsamples (so (4,4), (2,2), (1,1), (1,1)), residual pooling (x = attn @ v + q),
decomposed relative position embeddings (`rel_pos_h`, `rel_pos_w`), expand_attn=True (the attention widens
dim -> dim_out at each stage's first block, with a Linear shortcut), no absolute position embedding, exact GELU MLP
(ratio 4), LayerNorm eps 1e-6 everywhere, a final LayerNorm and average pooling over all tokens.

Parameter names mirror timm so that a timm state dict maps onto these modules with a short table:

  patch_embed/proj                                     timm patch_embed.proj (conv k7 s4 p3, with bias, no norm)
  stages_{i}/blocks_{j}/norm1, norm2                   timm stages.{i}.blocks.{j}.norm1 / norm2
  stages_{i}/blocks_{j}/shortcut_proj_attn             timm ...shortcut_proj_attn (block 0 of stages 1..3)
  stages_{i}/blocks_{j}/attn/{qkv,proj}                timm ...attn.qkv / attn.proj
  stages_{i}/blocks_{j}/attn/{pool,norm}_{q,k,v}       timm ...attn.pool_q / norm_q / ... (pool: no bias)
  stages_{i}/blocks_{j}/attn/rel_pos_h, rel_pos_w      timm ...attn.rel_pos_h / rel_pos_w (copied as is)
  stages_{i}/blocks_{j}/mlp/{fc1,fc2}                  timm ...mlp.fc1 / mlp.fc2
  norm                                                 timm norm
  head                                                 timm head.fc

(Linear weights transpose, conv weights OIHW -> HWIO, LayerNorm weight -> scale.)

The relative-position tables are sized from `img_size` exactly as timm sizes them (2 * max(q, kv) - 1 rows per
block, with q = size // stride_q and kv = size // stride_kv at the block's input size), so `img_size` must be the
resolution the weights were made for (224 for the published ones). Other input sizes run as in timm (the
distance indices are recomputed from the actual q / k maps) as long as every index stays inside its table; sizes
for which PyTorch would index out of range raise a ValueError here (see `stage_geometry`).
"""
from __future__ import annotations

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
IntOrSeq = Union[int, Sequence[int]]

_LN_EPS = 1e-6  # timm MultiScaleVitCfg.norm_eps: every LayerNorm.
_POOL_KERNEL = 3  # kernel_qkv (3, 3); padding kernel // 2.
_PATCH = (7, 4, 3)  # patch_kernel, patch_stride, patch_padding.
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - kernel) // stride + 1


def stage_strides(num_stages: int, stride_kv_start: int = 4) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """timm's (stride_q, stride_kv) per stage: q strides (1, 2, 2, ...); kv adaptive from `stride_kv_start`."""
  stride_q = tuple(1 if i == 0 else 2 for i in range(num_stages))
  kv, stride_kv = stride_kv_start, []
  for s in stride_q:
    if s > 1:
      kv = max(kv // s, 1)
    stride_kv.append(kv)
  return stride_q, tuple(stride_kv)


def rel_pos_index(q_size: int, k_size: int) -> np.ndarray:
  """timm's `cal_rel_pos_type` distance indices (q_size, k_size) along one axis (float32 maths, truncated)."""
  q_ratio = np.float32(max(k_size / q_size, 1.0))
  k_ratio = np.float32(max(q_size / k_size, 1.0))
  dist = (np.arange(q_size, dtype=np.float32)[:, None] * q_ratio
          - np.arange(k_size, dtype=np.float32)[None, :] * k_ratio)
  dist = dist + np.float32(k_size - 1) * k_ratio
  return dist.astype(np.int64)


def rel_pos_bias(q: Array, q_size: tuple[int, int], k_size: tuple[int, int], rel_pos_h: Array,
                 rel_pos_w: Array) -> Array:
  """MViTv2's decomposed relative-position logit terms <q, R_h[dist_h]> + <q, R_w[dist_w]>, (B, heads, Lq, Lk).

  q: (B, heads, q_h*q_w, head_dim) (pooled and normed, unscaled); rel_pos_h / rel_pos_w: (rows, head_dim).
  """
  (qh, qw), (kh, kw) = q_size, k_size
  rh = rel_pos_h[jnp.asarray(rel_pos_index(qh, kh))].astype(q.dtype)  # (qh, kh, d)
  rw = rel_pos_w[jnp.asarray(rel_pos_index(qw, kw))].astype(q.dtype)  # (qw, kw, d)
  b, heads, _, d = q.shape
  r_q = q.reshape(b, heads, qh, qw, d)
  bias_h = jnp.einsum('byhwc,hkc->byhwk', r_q, rh)
  bias_w = jnp.einsum('byhwc,wkc->byhwk', r_q, rw)
  return (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, heads, qh * qw, kh * kw)


# ----------------------------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------------------------

class _PatchEmbed(nn.Module):
  """timm `PatchEmbed`: conv k7 s4, symmetric padding 3, with bias, no norm. NHWC in and out."""
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, s, p = _PATCH
    return Conv(self.embed_dim, (k, k), strides=(s, s), padding=((p, p), (p, p)), dtype=self.dtype,
                name='proj')(x)


class MultiScaleAttention(nn.Module):
  """timm `MultiScaleAttention` (mode 'conv', no class token) on an NHWC map; returns the pooled NHWC map."""
  dim_out: int
  num_heads: int
  stride_q: int
  stride_kv: int
  rel_pos_rows: int  # 2 * max(q, kv) - 1 at the configured img_size.
  qkv_bias: bool = True
  residual_pooling: bool = True
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'  # Attention kernel (vit_jax.models.attention); the rel-pos terms are its bias.

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, _ = x.shape
    heads = self.num_heads
    if self.dim_out % heads:
      raise ValueError(f'Width {self.dim_out} is not divisible by num_heads={heads}.')
    hd = self.dim_out // heads
    dense = dict(dtype=self.dtype, kernel_init=_trunc_normal, bias_init=nn.initializers.zeros)
    qkv = nn.Dense(3 * self.dim_out, use_bias=self.qkv_bias, name='qkv', **dense)(x)
    qkv = qkv.reshape(b, h, w, 3, heads, hd).transpose(3, 0, 4, 1, 2, 5)  # (3, B, heads, H, W, hd)

    def pool(t, stride, name):
      # Depthwise conv over head_dim channels, weights shared by all heads, then LayerNorm(head_dim).
      t = t.reshape(b * heads, h, w, hd)
      p = _POOL_KERNEL // 2
      t = Conv(hd, (_POOL_KERNEL, _POOL_KERNEL), strides=(stride, stride), padding=((p, p), (p, p)),
               feature_group_count=hd, use_bias=False, dtype=self.dtype, name=f'pool_{name}')(t)
      size = t.shape[1:3]
      t = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name=f'norm_{name}')(t)
      return t.reshape(b, heads, size[0] * size[1], hd), size

    q, q_size = pool(qkv[0], self.stride_q, 'q')
    k, k_size = pool(qkv[1], self.stride_kv, 'k')
    v, _ = pool(qkv[2], self.stride_kv, 'v')

    rel_h = self.param('rel_pos_h', _trunc_normal, (self.rel_pos_rows, hd))
    rel_w = self.param('rel_pos_w', _trunc_normal, (self.rel_pos_rows, hd))
    bias = rel_pos_bias(q, q_size, k_size, rel_h, rel_w)
    heads_last = lambda t: t.transpose(0, 2, 1, 3)  # (B, heads, L, hd) -> (B, L, heads, hd).
    out = attention.dot_product_attention(heads_last(q), heads_last(k), heads_last(v), bias=bias,
                                          scale=hd ** -0.5, implementation=self.attention_impl)
    if self.residual_pooling:
      out = out + heads_last(q)
    out = out.reshape(b, q_size[0], q_size[1], self.dim_out)
    return nn.Dense(self.dim_out, name='proj', **dense)(out)


class MultiScaleBlock(nn.Module):
  """timm `MultiScaleBlock` (expand_attn=True) on an NHWC map.

  x = pool(shortcut) + DropPath(attn(LN(x))), shortcut = x, or Linear(LN(x)) when the width changes;
  pool = max-pool (kernel s + 1, stride s, padding (s + 1) // 2) when stride_q > 1. Then x + DropPath(MLP(LN(x))).
  """
  dim_out: int
  num_heads: int
  stride_q: int
  stride_kv: int
  rel_pos_rows: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  residual_pooling: bool = True
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    deterministic = not train
    dense = dict(dtype=self.dtype, kernel_init=_trunc_normal, bias_init=nn.initializers.zeros)
    x_norm = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name='norm1')(x)
    # As the original implementation: the shortcut is the un-normalised input unless it needs a projection.
    shortcut = x
    if x.shape[-1] != self.dim_out:
      shortcut = nn.Dense(self.dim_out, name='shortcut_proj_attn', **dense)(x_norm)
    if self.stride_q > 1:
      s = self.stride_q
      k = s + 1
      shortcut = nn.max_pool(shortcut, (k, k), strides=(s, s), padding=((k // 2, k // 2), (k // 2, k // 2)))
    y = MultiScaleAttention(
        self.dim_out, self.num_heads, self.stride_q, self.stride_kv, self.rel_pos_rows, qkv_bias=self.qkv_bias,
        residual_pooling=self.residual_pooling, dtype=self.dtype, attention_impl=self.attention_impl,
        name='attn')(x_norm)
    x = shortcut + DropPath(self.drop_path_rate)(y, deterministic=deterministic)
    y = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name='norm2')(x)
    y = _Mlp(int(self.dim_out * self.mlp_ratio), dtype=self.dtype, name='mlp')(y)
    return x + DropPath(self.drop_path_rate)(y, deterministic=deterministic)


class _Mlp(nn.Module):
  """timm `Mlp`: fc1 -> exact GELU -> fc2 (dropout 0, as timm's MViTv2 blocks)."""
  hidden_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = dict(dtype=self.dtype, kernel_init=_trunc_normal, bias_init=nn.initializers.zeros)
    dim = x.shape[-1]
    x = nn.Dense(self.hidden_dim, name='fc1', **dense)(x)
    x = layers.gelu(x, approximate=False)
    return nn.Dense(dim, name='fc2', **dense)(x)


class MultiScaleVitStage(nn.Module):
  """timm `MultiScaleVitStage`: `depth` blocks; the first widens to dim_out and applies stride_q."""
  dim_out: int
  depth: int
  num_heads: int
  stride_q: int
  stride_kv: int
  rel_pos_rows: tuple[int, ...]
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  residual_pooling: bool = True
  drop_path_rates: tuple[float, ...] = ()
  remat: Any = False  # bool or a named policy (layers.remat).
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    block_cls = layers.remat(MultiScaleBlock, self.remat, static_argnums=(2,))
    for j in range(self.depth):
      x = block_cls(
          self.dim_out, self.num_heads, stride_q=self.stride_q if j == 0 else 1, stride_kv=self.stride_kv,
          rel_pos_rows=self.rel_pos_rows[j], mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
          residual_pooling=self.residual_pooling,
          drop_path_rate=self.drop_path_rates[j] if self.drop_path_rates else 0.0, dtype=self.dtype,
          attention_impl=self.attention_impl, name=f'blocks_{j}')(x, train)
    return x


# ----------------------------------------------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------------------------------------------

class MultiScaleVisionTransformerV2(layers.HierarchicalBackbone):
  """MViTv2 on NHWC images (timm `MultiScaleVit`, configs without class token, mode 'conv').

  embed_dim / num_heads may be one value (doubled at every stage, as timm) or one per stage. img_size sizes the
  relative-position tables (timm's img_size). drop_rate is the dropout before the classifier.
  num_classes=0 gives a model whose logits are the pooled pre-logits (as timm's Identity head).
  """
  num_classes: int = 1000
  depths: Sequence[int] = (2, 3, 16, 3)
  embed_dim: IntOrSeq = 96
  num_heads: IntOrSeq = 1
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  residual_pooling: bool = True
  stride_kv_start: int = 4
  img_size: int = 224
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: Any = False  # bool or a named policy (layers.remat).
  attention_impl: str = 'einsum'  # Attention kernel: 'einsum' | 'xla' | 'cudnn' (vit_jax.models.attention).

  def _dims(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n = len(self.depths)
    dims = self.embed_dim if not isinstance(self.embed_dim, int) else tuple(self.embed_dim * 2 ** i for i in range(n))
    heads = self.num_heads if not isinstance(self.num_heads, int) else tuple(self.num_heads * 2 ** i for i in range(n))
    return layers.per_stage(dims, n, 'embed_dim'), layers.per_stage(heads, n, 'num_heads')

  @property
  def num_features(self) -> int:
    return int(self._dims()[0][-1])

  def rel_pos_rows(self) -> list[tuple[int, ...]]:
    """Per stage, per block: timm's table rows 2 * max(size // stride_q, size // stride_kv) - 1 at img_size."""
    stride_q, stride_kv = stage_strides(len(self.depths), self.stride_kv_start)
    size = self.img_size // _PATCH[1]
    out = []
    for i, depth in enumerate(self.depths):
      rows = []
      for j in range(depth):
        sq = stride_q[i] if j == 0 else 1
        rows.append(2 * max(size // sq, size // stride_kv[i]) - 1)
        if j == 0:
          size //= stride_q[i]
      out.append(tuple(rows))
    return out

  def setup(self):
    n = len(self.depths)
    dims, heads = self._dims()
    stride_q, stride_kv = stage_strides(n, self.stride_kv_start)
    rows = self.rel_pos_rows()
    dpr = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    starts = np.cumsum((0,) + tuple(self.depths))
    self.patch_embed = _PatchEmbed(dims[0], dtype=self.dtype)
    self.stages = [
        MultiScaleVitStage(
            dim_out=dims[i], depth=self.depths[i], num_heads=heads[i], stride_q=stride_q[i], stride_kv=stride_kv[i],
            rel_pos_rows=rows[i], mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
            residual_pooling=self.residual_pooling,
            drop_path_rates=tuple(float(r) for r in dpr[starts[i]:starts[i + 1]]), remat=self.remat,
            dtype=self.dtype, attention_impl=self.attention_impl)
        for i in range(n)]
    self.norm = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype)
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes > 0:
      self.head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_trunc_normal,
                           bias_init=nn.initializers.zeros)

  # -- input-size validation ------------------------------------------------------------------------------------

  def stage_geometry(self, height: int, width: int) -> list[tuple[int, int]]:
    """Per-stage output (H, W). ValueError where timm would fail: an empty map, or a relative-position index
    outside a block's table (tables are sized for img_size)."""
    if height < 1 or width < 1:
      raise ValueError(f'Input size {height}x{width} is empty.')
    stride_q, stride_kv = stage_strides(len(self.depths), self.stride_kv_start)
    rows = self.rel_pos_rows()
    k, s, p = _PATCH
    size = (_conv_out(height, k, s, p), _conv_out(width, k, s, p))
    out = []
    for i, depth in enumerate(self.depths):
      for j in range(depth):
        if min(size) < 1:
          raise ValueError(f'Input size {height}x{width} is too small for this MViTv2 model (stage {i} is empty).')
        sq = stride_q[i] if j == 0 else 1
        q = tuple(_conv_out(r, _POOL_KERNEL, sq, _POOL_KERNEL // 2) for r in size)
        kv = tuple(_conv_out(r, _POOL_KERNEL, stride_kv[i], _POOL_KERNEL // 2) for r in size)
        need = max(int(rel_pos_index(q[a], kv[a]).max()) + 1 for a in (0, 1))
        if need > rows[i][j]:
          raise ValueError(
              f'Input size {height}x{width} does not fit this MViTv2 model: stage {i} block {j} needs '
              f'{need} relative-position rows but its tables (sized for img_size={self.img_size}) have '
              f'{rows[i][j]}. Fix: feed {self.img_size}x{self.img_size} images, or build the model with '
              f'img_size set to your resolution (pretrained tables then need resizing, as timm does).')
        size = q
      out.append(size)
    return out

  # -- forward ----------------------------------------------------------------------------------------------------

  def stage_modules(self) -> Sequence[nn.Module]:
    return self.stages

  def check_input_size(self, height: int, width: int) -> None:
    self.stage_geometry(height, width)


# ----------------------------------------------------------------------------------------------------------------
# Registry (timm model_cfgs: embed_dim 96 doubling, heads 1 doubling; counts measured with timm 1.0.31).
# drop_path_rate 0.1 is the official MViTv2-T/S ImageNet recipe (timm's constructor default is 0).
# ----------------------------------------------------------------------------------------------------------------

registry.register_model('mvitv2_t', MultiScaleVisionTransformerV2, family='mvitv2', image_size=224,
                        num_params=24_173_320, timm_name='mvitv2_tiny.fb_in1k', drop_path_rate=0.1,
                        depths=(1, 2, 5, 2))
registry.register_model('mvitv2_s', MultiScaleVisionTransformerV2, family='mvitv2', image_size=224,
                        num_params=34_870_216, timm_name='mvitv2_small.fb_in1k', drop_path_rate=0.1,
                        depths=(1, 2, 11, 2))
# MViTv2-B: drop_path_rate 0.3 in the ImageNet-1k recipe (MViTv2 paper; mmpretrain's mvitv2-base config).
registry.register_model('mvitv2_b', MultiScaleVisionTransformerV2, family='mvitv2', image_size=224,
                        num_params=51_472_744, timm_name='mvitv2_base.fb_in1k', drop_path_rate=0.3,
                        depths=(2, 3, 16, 3))


# --- Family facts (vit_jax/models/facts.py). FLOPs: XLA's cost analysis. --------------------------------------------

_PB = r'stages\.(\d+)\.blocks\.(\d+)\.'
_OPB = r'stages_\1/blocks_\2/'
TIMM_RULES: tuple[facts.Rule, ...] = (
    (r'patch_embed\.proj', 'patch_embed/proj', 'conv'),
    (_PB + r'norm([12])', _OPB + r'norm\3', 'norm'),
    (_PB + r'shortcut_proj_attn', _OPB + 'shortcut_proj_attn', 'linear'),
    (_PB + r'attn\.(qkv|proj)', _OPB + r'attn/\3', 'linear'),
    (_PB + r'attn\.pool_([qkv])', _OPB + r'attn/pool_\3', 'conv'),
    (_PB + r'attn\.norm_([qkv])', _OPB + r'attn/norm_\3', 'norm'),
    (_PB + r'attn\.(rel_pos_[hw])', _OPB + r'attn/\3', 'raw'),
    (_PB + r'mlp\.fc([12])', _OPB + r'mlp/fc\3', 'linear'),
    (r'norm', 'norm', 'norm'),
    (r'head\.fc', 'head', 'linear'),
)

FACTS = facts.register_family(facts.FamilyFacts(
    name='mvitv2', layouts={'timm': facts.ConversionTable(TIMM_RULES, source_heads=('head.fc',))},
    grouping=facts.LayerGrouping(blocks=((r'^stages_(\d+)/blocks_(\d+)/', 'block2'), (r'^stages_(\d+)/', 'after')),
                                 stem=r'^patch_embed(/|$)'),
    # The relative-position tables are sized for the img_size option: only that input size is sure to fit them.
    infer_image_size=lambda state_dict, options: options.get('img_size')))
