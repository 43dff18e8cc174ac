"""Cross-Covariance Image Transformer (El-Nouby et al. 2021, "XCiT"), laid out like timm's `xcit.py`.

Parameter names mirror timm, so a timm state dict maps onto these modules with a short table (`_TIMM_RULES`):

  patch_embed/proj_{k}_conv, proj_{k}_bn    timm patch_embed.proj.{2k}.0 / .1  (conv3x3 s2 + BatchNorm, GELU between)
  pos_embed/token_projection                timm pos_embed.token_projection (1x1 conv of the Fourier features)
  cls_token                                 timm cls_token
  blocks_{i}/norm1, norm3, norm2            timm blocks.{i}.norm1 / norm3 / norm2
  blocks_{i}/attn/{qkv,proj,temperature}    timm blocks.{i}.attn.*  (temperature (heads, 1, 1))
  blocks_{i}/local_mp/{conv1,bn,conv2}      timm blocks.{i}.local_mp.*
  blocks_{i}/mlp/{fc1,fc2}                  timm blocks.{i}.mlp.*
  blocks_{i}/gamma1, gamma3, gamma2         timm blocks.{i}.gamma*  (layer scale)
  cls_attn_blocks_{i}/...                   timm cls_attn_blocks.{i}.{norm1,attn.{q,k,v,proj},norm2,mlp,gamma1,gamma2}
  norm, head                                timm norm, head

BatchNorm (patch embedding and local patch interaction) keeps its running statistics in the `batch_stats`
collection: apply with `train=True, mutable=['batch_stats']` to train, and the running averages are used otherwise.
BatchNorm epsilon 1e-5 and momentum 0.9 (torch's 0.1) as torch's BatchNorm2d; LayerNorm epsilon 1e-6; GELU exact.

Cross-covariance attention (XCA) attends over channels, not tokens: per head, queries and keys are L2-normalised
along the tokens, the (head_dim x head_dim) cross-covariance q k^T times a learnable per-head temperature goes
through a softmax, and the result mixes the value channels. We compute it with the shared
`attention.dot_product_attention` by swapping the roles of the axes (the head's channels become the "sequence",
the tokens the "feature" axis, scale 1 with the temperature folded into the queries), so `attention_impl` selects
the kernel here too ('cudnn' needs the token count <= 128, e.g. 128 px inputs at patch 16). The class-attention
blocks use ordinary softmax attention of the class token over all tokens, through the same function.

The class-attention blocks follow timm's `ClassAttentionBlock` with `tokens_norm=True` (every registered model):
the patch tokens pass through norm1 into the attention branch and norm2 is applied to every token, so the class
blocks also update the patch tokens. Drop path is constant over the XCA blocks (timm) and absent in the class
blocks.

Inputs are NHWC images whose sides are multiples of the patch size (8 or 16); the Fourier position encoding is
computed for any grid, so the parameters do not depend on the image size.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

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

_LN_EPS = 1e-6
_FOURIER_DIM = 32  # Fourier features per axis (timm's hidden_dim).
_FOURIER_TEMPERATURE = 10000.0
_NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's eps.
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
_torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=_trunc_normal,
                  bias_init=nn.initializers.zeros, name=name)


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=_LN_EPS, dtype=dtype, name=name)


def fourier_features(height: int, width: int) -> np.ndarray:
  """timm's PositionalEncodingFourier before its projection: (H, W, 64) sin/cos features of the normalised
  row and column coordinates (rows first, each axis interleaving sin of even and cos of odd frequencies)."""
  eps, scale = 1e-6, 2 * math.pi
  rows = np.arange(1, height + 1, dtype=np.float32)
  cols = np.arange(1, width + 1, dtype=np.float32)
  rows = rows / (rows[-1] + np.float32(eps)) * np.float32(scale)
  cols = cols / (cols[-1] + np.float32(eps)) * np.float32(scale)
  i = np.arange(_FOURIER_DIM, dtype=np.float32)
  dim_t = np.float32(_FOURIER_TEMPERATURE) ** (2 * np.floor(i / 2) / _FOURIER_DIM)

  def encode(coord: np.ndarray) -> np.ndarray:  # (n,) -> (n, 32), [sin f0, cos f1, sin f2, cos f3, ...]
    pos = coord[:, None] / dim_t
    return np.stack([np.sin(pos[:, 0::2]), np.cos(pos[:, 1::2])], axis=-1).reshape(len(coord), _FOURIER_DIM)

  pos_y = np.broadcast_to(encode(rows)[:, None, :], (height, width, _FOURIER_DIM))
  pos_x = np.broadcast_to(encode(cols)[None, :, :], (height, width, _FOURIER_DIM))
  return np.concatenate([pos_y, pos_x], axis=-1).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------------------------

class ConvPatchEmbed(nn.Module):
  """Stride-2 conv3x3 (no bias) + BatchNorm stages with GELU between: log2(patch_size) of them, widths
  dim/8, dim/4, dim/2, dim (patch 16) or dim/4, dim/2, dim (patch 8)."""
  patch_size: int
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.patch_size not in (8, 16):
      raise ValueError(f'XCiT patch_size must be 8 or 16 (its conv stem halves the size per stage), got '
                       f'{self.patch_size}.')
    n = int(math.log2(self.patch_size))
    for k in range(n):
      width = self.embed_dim // 2 ** (n - 1 - k)
      if k:
        x = layers.gelu(x, approximate=False)
      x = Conv(width, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
               kernel_init=_torch_conv_init, name=f'proj_{k}_conv')(x)
      x = layers.torch_batch_norm(f'proj_{k}_bn', train=train, dtype=self.dtype)(x)
    return x


class FourierPositionEncoding(nn.Module):
  """The fixed Fourier features of the (H, W) grid through a learned 1x1 conv (`token_projection`)."""
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, height: int, width: int) -> Array:
    feats = jnp.asarray(fourier_features(height, width))[None]
    return Conv(self.dim, (1, 1), dtype=self.dtype, kernel_init=_torch_conv_init,
                name='token_projection')(feats)  # (1, H, W, dim)


class CrossCovarianceAttention(nn.Module):
  """timm `XCA`: softmax over the (head_dim x head_dim) cross-covariance of L2-normalised q and k. (B, N, C) in
  and out. See the module docstring for how it runs through `attention.dot_product_attention`."""
  num_heads: int
  qkv_bias: bool = True
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    b, n, c = x.shape
    heads = self.num_heads
    if c % heads:
      raise ValueError(f'XCiT width {c} is not divisible by num_heads={heads}.')
    temperature = self.param('temperature', nn.initializers.ones, (heads, 1, 1), jnp.float32)
    qkv = _dense(3 * c, 'qkv', self.dtype, self.qkv_bias)(x).reshape(b, n, 3, heads, c // heads)
    # (B, N, H, Ch) -> (B, Ch, H, N): channels play the sequence, tokens the features.
    q, k, v = (jnp.transpose(qkv[:, :, i], (0, 3, 2, 1)) for i in range(3))
    q = _l2_normalize(q) * temperature[:, 0, 0][None, None, :, None].astype(q.dtype)
    k = _l2_normalize(k)
    dropout = None
    if self.attn_drop_rate > 0 and not deterministic:
      dropout = lambda w: nn.Dropout(self.attn_drop_rate)(w, deterministic=False)
    out = attention.dot_product_attention(q, k, v, scale=1.0, implementation=self.attention_impl,
                                          dropout=dropout)  # (B, Ch, H, N)
    out = jnp.transpose(out, (0, 3, 2, 1)).reshape(b, n, c)
    out = _dense(c, 'proj', self.dtype)(out)
    return nn.Dropout(self.proj_drop_rate)(out, deterministic=deterministic)


def _l2_normalize(x: Array) -> Array:
  """x / max(||x||, 1e-12) along the last axis (torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
  return (x / jnp.maximum(norm, _NORMALIZE_EPS)).astype(x.dtype)


class LocalPatchInteraction(nn.Module):
  """timm `LPI`: depthwise 3x3 conv -> GELU -> BatchNorm -> depthwise 3x3 conv on the token map (NHWC)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    c = x.shape[-1]
    conv = lambda name: Conv(c, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=c, dtype=self.dtype,
                             kernel_init=_torch_conv_init, name=name)
    x = layers.gelu(conv('conv1')(x), approximate=False)
    x = layers.torch_batch_norm('bn', train=train, dtype=self.dtype)(x)
    return conv('conv2')(x)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> dropout -> fc2 -> dropout (timm `Mlp`)."""
  hidden_dim: int
  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    dim = x.shape[-1]
    x = layers.gelu(_dense(self.hidden_dim, 'fc1', self.dtype)(x), approximate=False)
    x = nn.Dropout(self.drop_rate)(x, deterministic=deterministic)
    x = _dense(dim, 'fc2', self.dtype)(x)
    return nn.Dropout(self.drop_rate)(x, deterministic=deterministic)


def _layer_scale(module: nn.Module, name: str, dim: int, eta: float) -> Array:
  return module.param(name, nn.initializers.constant(eta), (dim,), jnp.float32)


class XCABlock(nn.Module):
  """x + gamma1 * XCA(norm1(x)); x + gamma3 * LPI(norm3(x)); x + gamma2 * MLP(norm2(x)) (timm's order 1, 3, 2).

  Operates on (B, H, W, C) token maps (patch tokens only; the class token joins after these blocks).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  eta: float = 1.0
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    deterministic = not train
    b, h, w, c = x.shape
    drop_path = lambda y: DropPath(self.drop_path_rate)(y, deterministic=deterministic)
    gamma = lambda name: _layer_scale(self, name, c, self.eta).astype(x.dtype)
    y = _layer_norm('norm1', self.dtype)(x).reshape(b, h * w, c)
    y = CrossCovarianceAttention(self.num_heads, qkv_bias=self.qkv_bias, attn_drop_rate=self.attn_drop_rate,
                                 proj_drop_rate=self.drop_rate, dtype=self.dtype,
                                 attention_impl=self.attention_impl, name='attn')(y, deterministic)
    x = x + drop_path(gamma('gamma1') * y.reshape(b, h, w, c))
    y = LocalPatchInteraction(dtype=self.dtype, name='local_mp')(_layer_norm('norm3', self.dtype)(x), train)
    x = x + drop_path(gamma('gamma3') * y)
    y = Mlp(int(c * self.mlp_ratio), drop_rate=self.drop_rate, dtype=self.dtype, name='mlp')(
        _layer_norm('norm2', self.dtype)(x), deterministic)
    return x + drop_path(gamma('gamma2') * y)


class ClassAttention(nn.Module):
  """CaiT's class attention (timm `ClassAttn`): the class token (token 0) queries every token.

  (B, N, C) -> (B, 1, C).
  """
  num_heads: int
  qkv_bias: bool = True
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    b, n, c = x.shape
    heads = self.num_heads
    hd = c // heads
    q = _dense(c, 'q', self.dtype, self.qkv_bias)(x[:, :1]).reshape(b, 1, heads, hd)
    k = _dense(c, 'k', self.dtype, self.qkv_bias)(x).reshape(b, n, heads, hd)
    v = _dense(c, 'v', self.dtype, self.qkv_bias)(x).reshape(b, n, heads, hd)
    dropout = None
    if self.attn_drop_rate > 0 and not deterministic:
      dropout = lambda w: nn.Dropout(self.attn_drop_rate)(w, deterministic=False)
    out = attention.dot_product_attention(q, k, v, scale=hd ** -0.5, implementation=self.attention_impl,
                                          dropout=dropout).reshape(b, 1, c)
    out = _dense(c, 'proj', self.dtype)(out)
    return nn.Dropout(self.proj_drop_rate)(out, deterministic=deterministic)


class ClassAttentionBlock(nn.Module):
  """timm `ClassAttentionBlock` with tokens_norm=True: the class token attends (layer-scaled residual), the patch
  tokens gain their own norm1 output; then norm2 on every token, and the class token's MLP output (layer scaled) is
  added while the normed patch tokens are added to themselves (timm's residual over the concatenation)."""
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  eta: float = 1.0
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    deterministic = not train
    c = x.shape[-1]
    y = _layer_norm('norm1', self.dtype)(x)
    cls = ClassAttention(self.num_heads, qkv_bias=self.qkv_bias, attn_drop_rate=self.attn_drop_rate,
                         proj_drop_rate=self.drop_rate, dtype=self.dtype, attention_impl=self.attention_impl,
                         name='attn')(y, deterministic)
    gamma1 = _layer_scale(self, 'gamma1', c, self.eta).astype(x.dtype)
    x = x + gamma1 * jnp.concatenate([cls, y[:, 1:]], axis=1)
    x = _layer_norm('norm2', self.dtype)(x)
    cls = Mlp(int(c * self.mlp_ratio), drop_rate=self.drop_rate, dtype=self.dtype, name='mlp')(
        x[:, :1], deterministic)
    gamma2 = _layer_scale(self, 'gamma2', c, self.eta).astype(x.dtype)
    return x + jnp.concatenate([gamma2 * cls, x[:, 1:]], axis=1)


# ----------------------------------------------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------------------------------------------

class XCiT(nn.Module):
  """XCiT on NHWC images (timm `Xcit`, class-token pooling).

  eta is the layer-scale init (1.0 for the 12-layer models, 1e-5 for the 24-layer ones). drop_rate is one rate
  for timm's separate dropouts (after the position encoding, in the attention projections and MLPs, before the
  classifier; all 0 in the registered models); drop_path_rate is constant over the XCA blocks.
  num_classes=0 returns the pre-logits.
  """
  num_classes: int = 1000
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 8
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  eta: float = 1.0
  cls_attn_layers: int = 2
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: Any = False  # bool or a named policy (layers.remat), per block.
  attention_impl: str = 'einsum'  # 'einsum' | 'xla' | 'cudnn' (vit_jax.models.attention), XCA and class attention.

  @property
  def num_features(self) -> int:
    return int(self.embed_dim)

  def setup(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f'embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}.')
    if self.embed_dim % (self.patch_size // 2):
      raise ValueError(f'embed_dim {self.embed_dim} must be divisible by {self.patch_size // 2} (the conv stem '
                       f'starts at embed_dim / {self.patch_size // 2} channels for patch {self.patch_size}).')
    self.patch_embed = ConvPatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype)
    self.pos_embed = FourierPositionEncoding(self.embed_dim, dtype=self.dtype)
    self.cls_token = self.param('cls_token', _trunc_normal, (1, 1, self.embed_dim), jnp.float32)
    self.pos_drop = nn.Dropout(self.drop_rate)
    block_cls = layers.remat(XCABlock, self.remat, static_argnums=(2,))
    self.blocks = [
        block_cls(self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, eta=self.eta,
                  drop_rate=self.drop_rate, attn_drop_rate=self.attn_drop_rate, drop_path_rate=self.drop_path_rate,
                  dtype=self.dtype, attention_impl=self.attention_impl, name=f'blocks_{i}')
        for i in range(self.depth)]
    cls_block = layers.remat(ClassAttentionBlock, self.remat, static_argnums=(2,))
    self.cls_attn_blocks = [
        cls_block(self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, eta=self.eta,
                  drop_rate=self.drop_rate, attn_drop_rate=self.attn_drop_rate, dtype=self.dtype,
                  attention_impl=self.attention_impl, name=f'cls_attn_blocks_{i}')
        for i in range(self.cls_attn_layers)]
    self.norm = _layer_norm('norm', self.dtype)
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes > 0:
      self.head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_trunc_normal,
                           bias_init=nn.initializers.zeros)

  def _check_input(self, images: Array) -> None:
    if images.ndim != 4:
      raise ValueError(f'Expected NHWC images, got shape {images.shape}.')
    h, w = images.shape[1:3]
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f'XCiT needs image sides divisible by patch_size={self.patch_size}, got {h}x{w}; resize or '
                       'crop the inputs (e.g. to 224).')

  def _patch_tokens(self, images: Array, train: bool) -> list[Array]:
    """The token map (B, h, w, C) after every XCA block."""
    self._check_input(images)
    x = self.patch_embed(images, train)
    x = x + self.pos_embed(x.shape[1], x.shape[2]).astype(x.dtype)
    x = self.pos_drop(x, deterministic=not train)
    outs = []
    for block in self.blocks:
      x = block(x, train)
      outs.append(x)
    return outs

  def forward_intermediates(self, images: Array, *, train: bool = False, norm: bool = False) -> list[Array]:
    """Every XCA block's patch tokens as an NHWC map (B, H/p, W/p, C) (isotropic, as ViT); norm=True applies the
    final norm to the last one (as the other families; timm's `norm` normalises every map)."""
    outs = self._patch_tokens(images, train)
    if norm:
      outs[-1] = self.norm(outs[-1])
    return outs

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """(B, 1 + h*w, C): the class token then the patch tokens, after the class-attention blocks and the norm."""
    x = self._patch_tokens(images, train)[-1]
    b, _, _, c = x.shape
    x = jnp.concatenate([jnp.broadcast_to(self.cls_token.astype(x.dtype), (b, 1, c)), x.reshape(b, -1, c)], axis=1)
    for block in self.cls_attn_blocks:
      x = block(x, train)
    return self.norm(x)

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False) -> Array:
    """The class token (pre-logits), then dropout and the classifier."""
    x = features[:, 0]
    if pre_logits:
      return x
    x = self.head_drop(x, deterministic=not train)
    return self.head(x) if self.num_classes > 0 else x

  def __call__(self, images: Array, *, train: bool = False) -> Array:
    return self.forward_head(self.forward_features(images, train=train), train=train)


# ----------------------------------------------------------------------------------------------------------------
# Registry: timm's xcit_{tiny,small}_12 (eta 1.0) and xcit_medium_24 (eta 1e-5), tokens_norm=True, at 224 px.
# Counts are timm's (parameters only; the BatchNorm running statistics are buffers).
# ----------------------------------------------------------------------------------------------------------------

_T12 = dict(embed_dim=192, depth=12, num_heads=4, eta=1.0)
_S12 = dict(embed_dim=384, depth=12, num_heads=8, eta=1.0)
_M24 = dict(embed_dim=512, depth=24, num_heads=8, eta=1e-5)
NUM_PARAMS = {
    'xcit_t12_p16': 6_716_272, 'xcit_s12_p16': 26_253_304, 'xcit_m24_p16': 84_395_752,
    'xcit_t12_p8': 6_706_504, 'xcit_s12_p8': 26_213_032, 'xcit_m24_p8': 84_323_624,
}
for _size, _cfg in (('t12', _T12), ('s12', _S12), ('m24', _M24)):
  for _patch in (16, 8):
    _name = f'xcit_{_size}_p{_patch}'
    _timm = {'t12': 'tiny_12', 's12': 'small_12', 'm24': 'medium_24'}[_size]
    registry.register_model(_name, XCiT, family='xcit', image_size=224, num_params=NUM_PARAMS[_name],
                            timm_name=f'xcit_{_timm}_p{_patch}_224', patch_size=_patch, **_cfg)


# ----------------------------------------------------------------------------------------------------------------
# Family facts: timm conversion table and layer grouping. No table depends on the image size (the Fourier encoding
# is computed for any grid), so there is nothing to resize; FLOPs come from XLA's cost analysis.
# ----------------------------------------------------------------------------------------------------------------

_B, _CB = r'blocks\.(\d+)\.', r'cls_attn_blocks\.(\d+)\.'
_TIMM_RULES = (
    (r'patch_embed\.proj\.(\d+)\.0', lambda m: f'patch_embed/proj_{int(m[1]) // 2}_conv', 'conv'),
    (r'patch_embed\.proj\.(\d+)\.1', lambda m: f'patch_embed/proj_{int(m[1]) // 2}_bn', 'batchnorm'),
    (r'pos_embed\.token_projection', 'pos_embed/token_projection', 'conv'),
    (r'cls_token', 'cls_token', 'raw'),
    (_B + r'(norm[123])', r'blocks_\1/\2', 'norm'),
    (_B + r'attn\.(qkv|proj)', r'blocks_\1/attn/\2', 'linear'),
    (_B + r'attn\.temperature', r'blocks_\1/attn/temperature', 'raw'),
    (_B + r'local_mp\.(conv[12])', r'blocks_\1/local_mp/\2', 'conv'),
    (_B + r'local_mp\.bn', r'blocks_\1/local_mp/bn', 'batchnorm'),
    (_B + r'mlp\.(fc[12])', r'blocks_\1/mlp/\2', 'linear'),
    (_B + r'(gamma[123])', r'blocks_\1/\2', 'raw'),
    (_CB + r'(norm[12])', r'cls_attn_blocks_\1/\2', 'norm'),
    (_CB + r'attn\.(q|k|v|proj)', r'cls_attn_blocks_\1/attn/\2', 'linear'),
    (_CB + r'mlp\.(fc[12])', r'cls_attn_blocks_\1/mlp/\2', 'linear'),
    (_CB + r'(gamma[12])', r'cls_attn_blocks_\1/\2', 'raw'),
    (r'norm', 'norm', 'norm'),
    (r'head', 'head', 'linear'),
)

FACTS = facts.register_family(facts.FamilyFacts(
    name='xcit',
    layouts={'timm': facts.ConversionTable(_TIMM_RULES, source_heads=('head',))},
    # timm's group_matcher: the stem (conv patch embedding, position encoding, class token) is layer 0, the XCA
    # blocks 1..L, and the class-attention blocks, final norm and head L + 1.
    grouping=facts.LayerGrouping(blocks=((r'^blocks_(\d+)/', 'block1'),),
                                 stem=r'^(patch_embed|pos_embed|cls_token)(/|$)'),
))
