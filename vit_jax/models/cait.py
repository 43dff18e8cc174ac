"""CaiT (Touvron et al. 2021, "Going deeper with Image Transformers"), laid out like timm's `cait.py`.

Parameter names mirror timm so that a timm state dict maps onto these modules with a short table:

  patch_embed/proj                              timm patch_embed.proj (patch conv)
  cls_token, pos_embed                          timm cls_token (1, 1, D), pos_embed (1, patches, D): no class row
  blocks_{i}/norm1, norm2                       timm blocks.{i}.norm1 / norm2
  blocks_{i}/attn/{qkv,proj}                    timm ...attn.qkv / attn.proj
  blocks_{i}/attn/{proj_l,proj_w}               timm ...attn.proj_l / attn.proj_w (talking heads, (H, H) mixes)
  blocks_{i}/mlp/Dense_{0,1}                    timm ...mlp.fc1 / mlp.fc2
  blocks_{i}/gamma_1, gamma_2                   timm ...gamma_1 / gamma_2 (layer scale)
  blocks_token_only_{j}/...                     timm blocks_token_only.{j}: the same with attn/{q,k,v,proj}
  norm, head                                    timm norm, head

The self-attention blocks see only the patch tokens (the position embedding has no class row); the class token
enters in the `depth_token_only` class-attention blocks, where it alone is updated by attending to [cls, patches].
Self-attention is talking-heads attention: the (H, H) maps `proj_l` and `proj_w` mix the heads' logits before and
their weights after the softmax, so it always materialises the weights (einsum path); `attention_impl` picks the
kernel of the class attention. Every LayerNorm has epsilon 1e-6; layer scale starts at `layer_scale_init`; the
drop-path rate is the same for every self-attention block (CaiT's constant rule) and 0 in the class-attention blocks.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import attention
from vit_jax.models import facts
from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models import resize
from vit_jax.models.layers import DropPath, constrain, logical

Array = jax.Array

LN_EPS = 1e-6
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
_zeros = nn.initializers.zeros
_TOKENS = layers.BATCH_LENGTH_EMBED


def _dense(features: int, names: tuple[Optional[str], Optional[str]], *, use_bias: bool = True, dtype: Any,
           name: str) -> nn.Dense:
  """timm-initialised Linear (trunc-normal 0.02, zero bias) whose kernel carries logical axis names."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=logical(_trunc_normal, names),
                  bias_init=logical(_zeros, names[1:]), name=name)


def _layer_scale(module: nn.Module, name: str, dim: int, init: float) -> Array:
  return module.param(name, logical(nn.initializers.constant(init), ('embed',)), (dim,))


class PatchEmbed(nn.Module):
  """Non-overlapping patch conv: NHWC images -> (B, h*w, D) tokens and the (h, w) grid."""
  patch_size: int
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> tuple[Array, tuple[int, int]]:
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                kernel_init=logical(_trunc_normal, (None, None, None, 'embed')),
                bias_init=logical(_zeros, ('embed',)), name='proj')(images)
    b, h, w, d = x.shape
    return x.reshape(b, h * w, d), (h, w)


class PositionEmbedding(nn.Module):
  """Adds the learned `pos_embed` (1, h*w, D) to the patch tokens; its shape follows the input grid."""

  @nn.compact
  def __call__(self, x: Array, grid: tuple[int, int]) -> Array:
    shape = (1,) + x.shape[1:]
    if self.has_variable('params', 'pos_embed'):
      have = tuple(self.get_variable('params', 'pos_embed').shape)
      if have != shape:
        raise ValueError(f'The input gives a {grid[0]}x{grid[1]} patch grid, but pos_embed has shape {have} '
                         f'(model expects {shape}). Use the image size the parameters were made for, or resize '
                         'pos_embed to the new grid (convert / load_pretrained at the new image size).')
    pos = self.param('pos_embed', logical(_trunc_normal, (None, None, 'embed')), shape)
    return x + pos.astype(x.dtype)


class TalkingHeadAttention(nn.Module):
  """Self-attention whose per-head logits are mixed across heads by `proj_l` before the softmax and whose weights
  are mixed by `proj_w` after it (Shazeer et al. 2020)."""
  num_heads: int
  qkv_bias: bool = True
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    b, n, dim = x.shape
    heads = self.num_heads
    if dim % heads:
      raise ValueError(f'CaiT width {dim} is not divisible by num_heads={heads}.')
    qkv = _dense(3 * dim, ('embed', 'heads'), use_bias=self.qkv_bias, dtype=self.dtype, name='qkv')(x)
    qkv = qkv.reshape(b, n, 3, heads, dim // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, Dh)
    q = q * jnp.asarray((dim // heads) ** -0.5, q.dtype)
    # Heads last, so that proj_l / proj_w (small (H, H) maps) mix that axis; the mixing and the softmax run in
    # float32 whatever the compute dtype.
    logits = jnp.einsum('bqhd,bkhd->bqkh', q, k).astype(jnp.float32)
    logits = _dense(heads, (None, None), dtype=jnp.float32, name='proj_l')(logits)
    weights = _dense(heads, (None, None), dtype=jnp.float32, name='proj_w')(jax.nn.softmax(logits, axis=2))
    weights = nn.Dropout(self.attn_drop_rate)(weights.astype(self.dtype), deterministic=deterministic)
    out = jnp.einsum('bqkh,bkhd->bqhd', weights, v).reshape(b, n, dim)
    out = _dense(dim, ('heads', 'embed'), dtype=self.dtype, name='proj')(out)
    return nn.Dropout(self.proj_drop_rate)(out, deterministic=deterministic)


class ClassAttention(nn.Module):
  """The class token (first of `u`) attends over all of `u` = [cls, patches]; returns its update (B, 1, D)."""
  num_heads: int
  qkv_bias: bool = True
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, u: Array, deterministic: bool = True) -> Array:
    b, n, dim = u.shape
    heads = self.num_heads
    if dim % heads:
      raise ValueError(f'CaiT width {dim} is not divisible by num_heads={heads}.')
    split = lambda t: t.reshape(b, t.shape[1], heads, dim // heads)
    q = split(_dense(dim, ('embed', 'heads'), use_bias=self.qkv_bias, dtype=self.dtype, name='q')(u[:, :1]))
    k = split(_dense(dim, ('embed', 'heads'), use_bias=self.qkv_bias, dtype=self.dtype, name='k')(u))
    v = split(_dense(dim, ('embed', 'heads'), use_bias=self.qkv_bias, dtype=self.dtype, name='v')(u))
    dropout = None
    if self.attn_drop_rate > 0 and not deterministic:
      dropout = lambda w: nn.Dropout(self.attn_drop_rate)(w, deterministic=False)
    out = attention.dot_product_attention(q, k, v, implementation=self.attention_impl, dropout=dropout)
    out = _dense(dim, ('heads', 'embed'), dtype=self.dtype, name='proj')(out.reshape(b, 1, dim))
    return nn.Dropout(self.proj_drop_rate)(out, deterministic=deterministic)


def _mlp(dim: int, mlp_ratio: float, drop_rate: float, dtype: Any) -> layers.MlpBlock:
  return layers.MlpBlock(mlp_dim=int(dim * mlp_ratio), dropout_rate=drop_rate, gelu_approximate=False, dtype=dtype,
                         kernel_init=_trunc_normal, bias_init=_zeros, name='mlp')


class LayerScaleBlock(nn.Module):
  """x + DropPath(gamma_1 * TalkingHeads(LN(x))), then x + DropPath(gamma_2 * MLP(LN(x)))."""
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  layer_scale_init: float = 1e-5
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    deterministic, dim = not train, x.shape[-1]
    x = constrain(x, _TOKENS)
    y = layers.layer_norm('norm1', epsilon=LN_EPS, dtype=self.dtype)(x)
    y = TalkingHeadAttention(self.num_heads, qkv_bias=self.qkv_bias, attn_drop_rate=self.attn_drop_rate,
                             proj_drop_rate=self.proj_drop_rate, dtype=self.dtype, name='attn')(y, deterministic)
    x = x + DropPath(self.drop_path_rate)(y * _layer_scale(self, 'gamma_1', dim, self.layer_scale_init),
                                          deterministic=deterministic)
    y = layers.layer_norm('norm2', epsilon=LN_EPS, dtype=self.dtype)(x)
    y = _mlp(dim, self.mlp_ratio, self.proj_drop_rate, self.dtype)(y, deterministic=deterministic)
    x = x + DropPath(self.drop_path_rate)(y * _layer_scale(self, 'gamma_2', dim, self.layer_scale_init),
                                          deterministic=deterministic)
    return constrain(x, _TOKENS)


class ClassAttentionBlock(nn.Module):
  """cls + gamma_1 * ClassAttention(LN([cls, x])), then cls + gamma_2 * MLP(LN(cls)); the patches are unchanged."""
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  layer_scale_init: float = 1e-5
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, cls: Array, train: bool = False) -> Array:
    deterministic, dim = not train, x.shape[-1]
    u = layers.layer_norm('norm1', epsilon=LN_EPS, dtype=self.dtype)(jnp.concatenate([cls, x], axis=1))
    y = ClassAttention(self.num_heads, qkv_bias=self.qkv_bias, dtype=self.dtype, attention_impl=self.attention_impl,
                       name='attn')(u, deterministic)
    cls = cls + y * _layer_scale(self, 'gamma_1', dim, self.layer_scale_init)
    y = layers.layer_norm('norm2', epsilon=LN_EPS, dtype=self.dtype)(cls)
    y = _mlp(dim, self.mlp_ratio, 0.0, self.dtype)(y, deterministic=deterministic)
    return cls + y * _layer_scale(self, 'gamma_2', dim, self.layer_scale_init)


class CaiT(nn.Module):
  """CaiT classifier on NHWC images (timm `Cait`, global_pool='token'): logits from the final-normed class token.

  dropout_rate: dropout after adding the position embedding (timm's pos_drop_rate); proj_drop_rate: after the
  attention projections and in the MLPs; attn_drop_rate: on the self-attention weights; drop_rate: before the head.
  num_classes=0 gives a model whose logits are the pre-logits (the class token).
  """
  num_classes: int = 1000
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 24
  num_heads: int = 8
  mlp_ratio: float = 4.0
  depth_token_only: int = 2
  qkv_bias: bool = True
  layer_scale_init: float = 1e-5
  dropout_rate: float = 0.0
  proj_drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False  # Per block (layers.remat).
  attention_impl: str = 'einsum'  # Class attention's kernel (vit_jax.models.attention); talking heads is einsum.

  @property
  def num_features(self) -> int:
    return self.embed_dim

  def setup(self):
    self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype)
    self.position = PositionEmbedding()
    nn.share_scope(self, self.position)  # timm's name `pos_embed` at the top level.
    self.pos_drop = nn.Dropout(self.dropout_rate)
    block_cls = layers.remat(LayerScaleBlock, self.remat, static_argnums=(2,))
    self.blocks = [
        block_cls(self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                  layer_scale_init=self.layer_scale_init, attn_drop_rate=self.attn_drop_rate,
                  proj_drop_rate=self.proj_drop_rate, drop_path_rate=self.drop_path_rate, dtype=self.dtype)
        for _ in range(self.depth)]
    self.cls_token = self.param('cls_token', logical(_trunc_normal, (None, None, 'embed')), (1, 1, self.embed_dim))
    token_cls = layers.remat(ClassAttentionBlock, self.remat, static_argnums=(3,))
    self.blocks_token_only = [
        token_cls(self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                  layer_scale_init=self.layer_scale_init, dtype=self.dtype, attention_impl=self.attention_impl)
        for _ in range(self.depth_token_only)]
    self.norm = layers.layer_norm('norm', epsilon=LN_EPS, dtype=self.dtype)
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes > 0:
      self.head = _dense(self.num_classes, ('embed', 'classes'), dtype=self.dtype, name='head')

  @property
  def num_features(self) -> int:
    return self.embed_dim

  def check_input_size(self, height: int, width: int) -> None:
    """ValueError unless the image is a whole number of patches."""
    if height % self.patch_size or width % self.patch_size or min(height, width) < self.patch_size:
      raise ValueError(f'Input size {height}x{width} is not a positive multiple of patch_size={self.patch_size}. '
                       'Fix: resize/crop the images to a multiple of the patch size.')

  def _patch_tokens(self, images: Array, train: bool) -> tuple[Array, tuple[int, int], list[Array]]:
    """Patch tokens after every self-attention block: (last, grid, [per-block outputs])."""
    if images.ndim != 4:
      raise ValueError(f'Expected NHWC images, got shape {images.shape}.')
    self.check_input_size(images.shape[1], images.shape[2])
    x, grid = self.patch_embed(images)
    x = self.pos_drop(self.position(x, grid), deterministic=not train)
    outs = []
    for block in self.blocks:
      x = block(x, train)
      outs.append(x)
    return x, grid, outs

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """Final-normed [class token, patch tokens] (B, 1 + h*w, D), as timm's forward_features."""
    x, _, _ = self._patch_tokens(images, train)
    cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, self.embed_dim))
    for block in self.blocks_token_only:
      cls = block(x, cls, train)
    return self.norm(jnp.concatenate([cls, x], axis=1))

  def forward_intermediates(self, images: Array, *, train: bool = False, norm: bool = False) -> list[Array]:
    """Every self-attention block's patch tokens as an NHWC map (B, h, w, D), at the patch stride. norm=True
    applies the final norm to the last map (the patch tokens of forward_features)."""
    x, (h, w), outs = self._patch_tokens(images, train)
    if norm:
      outs[-1] = self.forward_features(images, train=train)[:, 1:]
    return [o.reshape(o.shape[0], h, w, o.shape[-1]) for o in outs]

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False) -> Array:
    """The class token; then (unless pre_logits) dropout and the classifier (float32 logits)."""
    x = features[:, 0]
    if pre_logits:
      return x
    x = self.head_drop(x, deterministic=not train)
    return self.head(x).astype(jnp.float32) if self.num_classes > 0 else x

  def __call__(self, images: Array, *, train: bool = False) -> Array:
    return self.forward_head(self.forward_features(images, train=train), train=train)


# ----------------------------------------------------------------------------------------------------------------
# Family facts: timm key table, layer grouping, position-embedding resizing.
# ----------------------------------------------------------------------------------------------------------------

_SA = r'blocks\.(\d+)\.'
_CA = r'blocks_token_only\.(\d+)\.'
TIMM_RULES: tuple[facts.Rule, ...] = (
    (r'patch_embed\.proj', 'patch_embed/proj', 'conv'),
    (r'cls_token', 'cls_token', 'raw'),
    (r'pos_embed', 'pos_embed', 'raw'),
    (_SA + r'norm([12])', r'blocks_\1/norm\2', 'norm'),
    (_SA + r'attn\.(qkv|proj|proj_l|proj_w)', r'blocks_\1/attn/\2', 'linear'),
    (_SA + r'mlp\.fc1', r'blocks_\1/mlp/Dense_0', 'linear'),
    (_SA + r'mlp\.fc2', r'blocks_\1/mlp/Dense_1', 'linear'),
    (_SA + r'gamma_([12])', r'blocks_\1/gamma_\2', 'raw'),
    (_CA + r'norm([12])', r'blocks_token_only_\1/norm\2', 'norm'),
    (_CA + r'attn\.(q|k|v|proj)', r'blocks_token_only_\1/attn/\2', 'linear'),
    (_CA + r'mlp\.fc1', r'blocks_token_only_\1/mlp/Dense_0', 'linear'),
    (_CA + r'mlp\.fc2', r'blocks_token_only_\1/mlp/Dense_1', 'linear'),
    (_CA + r'gamma_([12])', r'blocks_token_only_\1/gamma_\2', 'raw'),
    (r'norm', 'norm', 'norm'),
    (r'head', 'head', 'linear'),
)

# Layer ids for layer-wise lr decay / freezing: patch embedding, class token and position embedding are layer 0,
# the self-attention blocks 1..L; the class-attention blocks, the final norm and the head form layer L + 1.
GROUPING = facts.LayerGrouping(blocks=((r'^blocks_(\d+)/', 'block1'),),
                               stem=r'^(patch_embed|cls_token|pos_embed)(/|$)')


def resize_params(path: str, value: np.ndarray, shape: tuple, context: facts.ResizeContext) -> Optional[np.ndarray]:
  """pos_embed of another patch grid, resized to `shape` on its square grid (no class row); None otherwise."""
  if path != 'pos_embed':
    return None
  return resize.resize_posemb(value, shape[1], num_prefix_tokens=0, method=context.method)


def infer_image_size(state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]) -> Optional[int]:
  """The square image size a timm state dict was made for: its pos_embed holds one row per patch."""
  if 'pos_embed' not in state_dict:
    return None
  grid = math.isqrt(state_dict['pos_embed'].shape[1])
  if grid * grid != state_dict['pos_embed'].shape[1]:
    return None
  return grid * options.get('patch_size', CaiT.patch_size)


facts.register_family(facts.FamilyFacts(
    name='cait', layouts={'timm': facts.ConversionTable(TIMM_RULES)}, grouping=GROUPING, resize=resize_params,
    infer_image_size=infer_image_size))


# ----------------------------------------------------------------------------------------------------------------
# Registry (timm counts at 224 px, 1000 classes: REFERENCE.md section 7). drop_path_rate: timm's default 0; set the
# recipe's rate (e.g. --config.model.drop_path_rate=0.1) for training from scratch.
# ----------------------------------------------------------------------------------------------------------------

registry.register_model('cait_xxs24', CaiT, family='cait', num_params=11_956_264, timm_name='cait_xxs24_224',
                        patch_size=16, embed_dim=192, depth=24, num_heads=4, layer_scale_init=1e-5)
registry.register_model('cait_xxs36', CaiT, family='cait', num_params=17_299_720, timm_name='cait_xxs36_224',
                        patch_size=16, embed_dim=192, depth=36, num_heads=4, layer_scale_init=1e-5)
registry.register_model('cait_s24', CaiT, family='cait', num_params=46_916_200, timm_name='cait_s24_224',
                        patch_size=16, embed_dim=384, depth=24, num_heads=8, layer_scale_init=1e-5)
