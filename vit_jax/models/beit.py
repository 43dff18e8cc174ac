"""BEiT (Bao et al. 2022), the fine-tuning architecture, laid out like timm's `beit.py` (`Beit` with
use_abs_pos_emb=False, use_rel_pos_bias=True, global_pool='avg').

Parameter names mirror timm so that a timm state dict maps onto these modules with a short table:

  patch_embed/proj                              timm patch_embed.proj (patch conv)
  cls_token                                     timm cls_token (1, 1, D); there is no absolute position embedding
  blocks_{i}/norm1, norm2                       timm blocks.{i}.norm1 / norm2
  blocks_{i}/attn/qkv                           timm ...attn.qkv (no bias)
  blocks_{i}/attn/q_bias, v_bias                timm ...attn.q_bias / v_bias (the key has no bias)
  blocks_{i}/attn/relative_position_bias_table  timm ...attn.relative_position_bias_table
  blocks_{i}/attn/proj                          timm ...attn.proj
  blocks_{i}/mlp/Dense_{0,1}                    timm ...mlp.fc1 / mlp.fc2
  blocks_{i}/gamma_1, gamma_2                   timm ...gamma_1 / gamma_2 (layer scale)
  fc_norm, head                                 timm fc_norm, head

Every block has its own relative position bias over the h x w patch grid: a ((2h-1)(2w-1) + 3, heads) table whose
last three rows are the class token attending to a patch, a patch attending to the class token, and the class token
attending to itself (`relative_position_index`). The table's size follows the input grid, so the parameters are
tied to the image size; `resize_table` fits a table to another grid (the offsets resized bicubically per head as
Swin's, the three class rows kept). The head mean-pools the patch tokens, then `fc_norm`; every LayerNorm has
epsilon 1e-6.
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
CLASS_ROWS = 3  # Table rows for cls -> patch, patch -> cls and cls -> cls.
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
_zeros = nn.initializers.zeros
_TOKENS = layers.BATCH_LENGTH_EMBED


def table_rows(grid: tuple[int, int]) -> int:
  """Rows of the bias table for an (h, w) patch grid: (2h-1)(2w-1) offsets + the 3 class-token rows."""
  return (2 * grid[0] - 1) * (2 * grid[1] - 1) + CLASS_ROWS


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
  """(h*w + 1, h*w + 1) indices into the bias table, the class token first (BEiT / timm layout).

  Patch pairs index their offset (dy + h - 1) * (2w - 1) + (dx + w - 1); row 0 (cls -> patch) uses R, column 0
  (patch -> cls) R + 1 and (0, 0) R + 2, with R = (2h-1)(2w-1).
  """
  h, w = grid
  coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing='ij')).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N): query minus key
  patches = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
  offsets = (2 * h - 1) * (2 * w - 1)
  index = np.zeros((h * w + 1,) * 2, np.int32)
  index[1:, 1:] = patches
  index[0, :] = offsets
  index[:, 0] = offsets + 1
  index[0, 0] = offsets + 2
  return index


def resize_table(table: np.ndarray, new_rows: int) -> np.ndarray:
  """Fits a (R + 3, heads) bias table to new_rows = R' + 3 rows (square grids, R = (2g-1)^2): the offset part is
  resized per head with PyTorch's bicubic (as Swin's tables, `resize.resize_rel_pos_bias_table`), the three
  class-token rows are kept."""
  table = np.asarray(table)
  if table.ndim != 2 or table.shape[0] <= CLASS_ROWS or new_rows <= CLASS_ROWS:
    raise ValueError(f'Expected BEiT bias tables of (2g-1)^2 + {CLASS_ROWS} rows, got shape {table.shape} and '
                     f'{new_rows} target rows.')
  offsets = resize.resize_rel_pos_bias_table(table[:-CLASS_ROWS], new_rows - CLASS_ROWS)
  return np.concatenate([offsets, table[-CLASS_ROWS:]], axis=0).astype(table.dtype)


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


class Attention(nn.Module):
  """Self-attention over [cls, patches] with q and v biases (no k bias) and a per-block relative position bias
  over the (h, w) patch `grid`."""
  num_heads: int
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, grid: tuple[int, int], deterministic: bool = True) -> Array:
    b, n, dim = x.shape
    heads = self.num_heads
    if dim % heads:
      raise ValueError(f'BEiT width {dim} is not divisible by num_heads={heads}.')
    qkv = nn.Dense(3 * dim, use_bias=False, dtype=self.dtype, kernel_init=logical(_trunc_normal, ('embed', 'heads')),
                   name='qkv')(x)
    q_bias = self.param('q_bias', logical(_zeros, ('heads',)), (dim,))
    v_bias = self.param('v_bias', logical(_zeros, ('heads',)), (dim,))
    qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    qkv = qkv.reshape(b, n, 3, heads, dim // heads)
    per_head = ('batch', 'length', 'heads', 'kv')
    q, k, v = (constrain(qkv[:, :, i], per_head) for i in range(3))

    rows = table_rows(grid)
    if self.has_variable('params', 'relative_position_bias_table'):
      have = tuple(self.get_variable('params', 'relative_position_bias_table').shape)
      if have != (rows, heads):
        raise ValueError(
            f'The input gives a {grid[0]}x{grid[1]} patch grid, i.e. relative_position_bias_table of '
            f'shape {(rows, heads)}, but the parameters hold {have}. Use the image size the parameters were made '
            'for, or resize the tables to the new grid (vit_jax.models.beit.resize_table, applied by convert / '
            'load_pretrained at the new image size).')
    table = self.param('relative_position_bias_table', logical(_zeros, (None, 'heads')), (rows, heads))
    bias = table[relative_position_index(grid).reshape(-1)].reshape(n, n, heads).transpose(2, 0, 1)[None]

    dropout = None
    if self.attn_drop_rate > 0 and not deterministic:
      dropout = lambda w: nn.Dropout(self.attn_drop_rate)(w, deterministic=False)
    out = attention.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), implementation=self.attention_impl,
                                          dropout=dropout)
    out = constrain(out, per_head).reshape(b, n, dim)
    out = nn.Dense(dim, dtype=self.dtype, kernel_init=logical(_trunc_normal, ('heads', 'embed')),
                   bias_init=logical(_zeros, ('embed',)), name='proj')(out)
    return nn.Dropout(self.proj_drop_rate)(out, deterministic=deterministic)


class Block(nn.Module):
  """x + DropPath(gamma_1 * Attention(LN(x))), then x + DropPath(gamma_2 * MLP(LN(x)))."""
  num_heads: int
  mlp_ratio: float = 4.0
  layer_scale_init: float = 0.1
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, grid: tuple[int, int], train: bool = False) -> Array:
    deterministic, dim = not train, x.shape[-1]
    scale = lambda name: self.param(name, logical(nn.initializers.constant(self.layer_scale_init), ('embed',)),
                                    (dim,))
    x = constrain(x, _TOKENS)
    y = layers.layer_norm('norm1', epsilon=LN_EPS, dtype=self.dtype)(x)
    y = Attention(self.num_heads, attn_drop_rate=self.attn_drop_rate, proj_drop_rate=self.proj_drop_rate,
                  dtype=self.dtype, attention_impl=self.attention_impl, name='attn')(y, grid, deterministic)
    x = x + DropPath(self.drop_path_rate)(y * scale('gamma_1'), deterministic=deterministic)
    y = layers.layer_norm('norm2', epsilon=LN_EPS, dtype=self.dtype)(x)
    y = layers.MlpBlock(mlp_dim=int(dim * self.mlp_ratio), dropout_rate=self.proj_drop_rate, gelu_approximate=False,
                        dtype=self.dtype, kernel_init=_trunc_normal, bias_init=_zeros, name='mlp')(
                            y, deterministic=deterministic)
    x = x + DropPath(self.drop_path_rate)(y * scale('gamma_2'), deterministic=deterministic)
    return constrain(x, _TOKENS)


class Beit(nn.Module):
  """BEiT classifier on NHWC images: mean of the patch tokens, fc_norm, linear head (float32 logits).

  dropout_rate: after the patch embedding (timm's pos_drop_rate); proj_drop_rate: after the attention projection
  and in the MLP; attn_drop_rate: on the attention weights; drop_rate: before the head. drop_path_rate grows linearly
  over the blocks (timm). num_classes=0 gives a model whose logits are the pre-logits.
  """
  num_classes: int = 1000
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  layer_scale_init: float = 0.1
  head_init_scale: float = 0.001  # timm scales the trunc-normal head init by this.
  dropout_rate: float = 0.0
  proj_drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False  # Per block (layers.remat).
  attention_impl: str = 'einsum'  # Attention kernel: 'einsum' | 'xla' | 'cudnn' (vit_jax.models.attention).

  def setup(self):
    self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype)
    self.cls_token = self.param('cls_token', logical(_trunc_normal, (None, None, 'embed')), (1, 1, self.embed_dim))
    self.pos_drop = nn.Dropout(self.dropout_rate)
    block_cls = layers.remat(Block, self.remat, static_argnums=(2, 3))
    dpr = np.linspace(0.0, self.drop_path_rate, self.depth)  # Stochastic depth grows with depth.
    self.blocks = [
        block_cls(self.num_heads, mlp_ratio=self.mlp_ratio, layer_scale_init=self.layer_scale_init,
                  attn_drop_rate=self.attn_drop_rate, proj_drop_rate=self.proj_drop_rate,
                  drop_path_rate=float(dpr[i]), dtype=self.dtype, attention_impl=self.attention_impl)
        for i in range(self.depth)]
    self.fc_norm = layers.layer_norm('fc_norm', epsilon=LN_EPS, dtype=self.dtype)
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes > 0:
      head_init = lambda *a, **k: _trunc_normal(*a, **k) * self.head_init_scale
      self.head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=logical(head_init, ('embed', 'classes')),
                           bias_init=logical(_zeros, ('classes',)), name='head')

  @property
  def num_features(self) -> int:
    return self.embed_dim

  def check_input_size(self, height: int, width: int) -> None:
    """ValueError unless the image is a whole number of patches."""
    if height % self.patch_size or width % self.patch_size or min(height, width) < self.patch_size:
      raise ValueError(f'Input size {height}x{width} is not a positive multiple of patch_size={self.patch_size}. '
                       'Fix: resize/crop the images to a multiple of the patch size.')

  def _run(self, images: Array, train: bool) -> tuple[Array, tuple[int, int], list[Array]]:
    """The token sequence after the last block, the grid and every block's output."""
    if images.ndim != 4:
      raise ValueError(f'Expected NHWC images, got shape {images.shape}.')
    self.check_input_size(images.shape[1], images.shape[2])
    x, grid = self.patch_embed(images)
    cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, self.embed_dim))
    x = self.pos_drop(jnp.concatenate([cls, x], axis=1), deterministic=not train)
    outs = []
    for block in self.blocks:
      x = block(x, grid, train)
      outs.append(x)
    return x, grid, outs

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """[class token, patch tokens] (B, 1 + h*w, D) after the last block; unnormalised, as timm (whose `norm` is
    the identity when the head pools with fc_norm)."""
    return self._run(images, train)[0]

  def forward_intermediates(self, images: Array, *, train: bool = False, norm: bool = False) -> list[Array]:
    """Every block's patch tokens as an NHWC map (B, h, w, D), at the patch stride (class token dropped). `norm`
    is accepted as every family's forward_intermediates takes it; BEiT has no final norm (fc_norm acts on the
    pooled features), so the maps are the same either way."""
    del norm
    _, (h, w), outs = self._run(images, train)
    return [o[:, 1:].reshape(o.shape[0], h, w, o.shape[-1]) for o in outs]

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False) -> Array:
    """fc_norm of the mean patch token; then (unless pre_logits) dropout and the classifier."""
    x = self.fc_norm(jnp.mean(features[:, 1:], axis=1))
    if pre_logits:
      return x
    x = self.head_drop(x, deterministic=not train)
    return self.head(x).astype(jnp.float32) if self.num_classes > 0 else x

  def __call__(self, images: Array, *, train: bool = False) -> Array:
    return self.forward_head(self.forward_features(images, train=train), train=train)


# ----------------------------------------------------------------------------------------------------------------
# Family facts: timm key table, layer grouping, bias-table resizing.
# ----------------------------------------------------------------------------------------------------------------

_TB = r'blocks\.(\d+)\.'
_OB = r'blocks_\1/'
TIMM_RULES: tuple[facts.Rule, ...] = (
    (r'patch_embed\.proj', 'patch_embed/proj', 'conv'),
    (r'cls_token', 'cls_token', 'raw'),
    (_TB + r'norm([12])', _OB + r'norm\2', 'norm'),
    (_TB + r'attn\.(qkv|proj)', _OB + r'attn/\2', 'linear'),
    (_TB + r'attn\.(q_bias|v_bias)', _OB + r'attn/\2', 'raw'),
    (_TB + r'attn\.relative_position_bias_table', _OB + 'attn/relative_position_bias_table', 'rel_table'),
    (_TB + r'mlp\.fc1', _OB + 'mlp/Dense_0', 'linear'),
    (_TB + r'mlp\.fc2', _OB + 'mlp/Dense_1', 'linear'),
    (_TB + r'gamma_([12])', _OB + r'gamma_\2', 'raw'),
    (r'fc_norm', 'fc_norm', 'norm'),
    (r'head', 'head', 'linear'),
)
# timm buffers our model recomputes: the index into the table, and the zero key bias (non-persistent in timm).
TIMM_IGNORED = (r'.*\.relative_position_index', r'.*\.attn\.k_bias')

# Layer ids for layer-wise lr decay / freezing (BEiT's own recipe): patch embedding and class token are layer 0,
# blocks 1..L, fc_norm and head L + 1.
GROUPING = facts.LayerGrouping(blocks=((r'^blocks_(\d+)/', 'block1'),), stem=r'^(patch_embed|cls_token)(/|$)')


def resize_params(path: str, value: np.ndarray, shape: tuple, context: facts.ResizeContext) -> Optional[np.ndarray]:
  """A bias table of another patch grid, fitted to `shape` by `resize_table`; None for every other parameter."""
  del context  # Always PyTorch's bicubic, as the official BEiT / Swin fine-tuning.
  if not path.endswith('/relative_position_bias_table') or value.ndim != 2 or len(shape) != 2:
    return None
  if not (_is_beit_rows(value.shape[0]) and _is_beit_rows(shape[0])):
    return None  # Not BEiT's (2g-1)^2 + 3 layout (e.g. a Swin table of the same name, tried by a family-less load).
  return resize_table(value, shape[0])


def _is_beit_rows(rows: int) -> bool:
  """Whether `rows` = (2g-1)^2 + CLASS_ROWS for some g >= 1. (An odd square is never also an odd square plus 3, so
  this tells BEiT's tables from Swin's.)"""
  side = int(round(np.sqrt(max(rows - CLASS_ROWS, 0))))
  return rows > CLASS_ROWS and side * side == rows - CLASS_ROWS and side % 2 == 1


def infer_image_size(state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]) -> Optional[int]:
  """The square image size a timm state dict was made for, read off its first bias table: (2g-1)^2 + 3 rows."""
  table = state_dict.get('blocks.0.attn.relative_position_bias_table')
  if table is None:
    return None
  side = math.isqrt(table.shape[0] - CLASS_ROWS)
  if side * side != table.shape[0] - CLASS_ROWS or side % 2 == 0:
    return None
  return (side + 1) // 2 * options.get('patch_size', Beit.patch_size)


facts.register_family(facts.FamilyFacts(
    name='beit', layouts={'timm': facts.ConversionTable(TIMM_RULES, ignore=TIMM_IGNORED)}, grouping=GROUPING,
    resize=resize_params, infer_image_size=infer_image_size))


# ----------------------------------------------------------------------------------------------------------------
# Registry (timm counts at 224 px, 1000 classes: REFERENCE.md section 7). drop_path_rate: timm's default 0; BEiT's
# ImageNet fine-tuning sets its own (e.g. --config.model.drop_path_rate=0.1).
# ----------------------------------------------------------------------------------------------------------------

registry.register_model('beit_b16', Beit, family='beit', num_params=86_530_984, timm_name='beit_base_patch16_224',
                        patch_size=16, embed_dim=768, depth=12, num_heads=12, layer_scale_init=0.1)
registry.register_model('beit_l16', Beit, family='beit', num_params=304_430_568, timm_name='beit_large_patch16_224',
                        patch_size=16, embed_dim=1024, depth=24, num_heads=16, layer_scale_init=1e-5)
