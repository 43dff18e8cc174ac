"""Swin Transformer v1 and v2 (Liu et al. 2021, 2022), laid out like timm's implementation.

Parameter names mirror timm's `swin_transformer.py` / `swin_transformer_v2.py` so that a timm state dict maps onto
these modules with a short per-family table:

  patch_embed/{proj,norm}                       timm patch_embed.{proj,norm}
  layers_{i}/downsample/{norm,reduction}        timm layers.{i}.downsample.*  (stages 1..3; patch merging first)
  layers_{i}/blocks_{j}/norm1, norm2            timm layers.{i}.blocks.{j}.norm1 / norm2
  layers_{i}/blocks_{j}/attn/{qkv,proj}         timm ...attn.qkv / attn.proj
     v1: attn/relative_position_bias_table      (2*Wh-1)*(2*Ww-1) x heads
     v2: attn/{q_bias,v_bias,logit_scale}       logit_scale has shape (heads, 1, 1) like timm
     v2: attn/cpb_mlp/{fc1,fc2}                 timm attn.cpb_mlp.0 / attn.cpb_mlp.2
  layers_{i}/blocks_{j}/mlp/{fc1,fc2}           timm ...mlp.fc1 / mlp.fc2
  norm, head                                    timm norm, head.fc

Inputs are NHWC images. Nothing depends on a fixed image size: every stage derives its resolution, window, shift
and attention mask from the input shape, and the parameters are the same for every input size. As in timm, a
stage whose resolution is <= the window uses the whole map as its window without shifting (per axis).

One layout difference: a v1 bias table always has the size of the configured window, (2W-1)**2 rows; a clamped
window w < W uses its centre (2w-1)**2 entries. timm instead builds the table for the clamped window, so for a timm
model constructed at a size that clamps (not the case for any registered model at its image_size), a converter
places timm's table at the centre of ours.
"""
from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import attention
from vit_jax.models import facts
from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models import resize
from vit_jax.models.layers import DropPath, constrain, logical, remat

Array = jax.Array
IntOrSeq = Union[int, Sequence[int]]

_LN_EPS = 1e-5
_MASK_VALUE = -100.0
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
# PyTorch's default Conv2d kernel init (kaiming_uniform with a=sqrt(5)), as timm leaves the patch conv alone.
_torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
_zeros = nn.initializers.zeros
_MAP = ('batch', 'height', 'width', 'embed')  # Logical axes of an NHWC feature map.


def _dense(features: int, names: tuple[Optional[str], str], *, use_bias: bool = True, dtype: Any = jnp.float32,
           name: Optional[str] = None) -> nn.Dense:
  """timm-initialised nn.Dense whose kernel (and bias) carry logical axis names."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=logical(_trunc_normal, names),
                  bias_init=logical(_zeros, names[1:]), name=name)


def _layer_norm(dim_name: str = 'embed', *, dtype: Any, scale_init=nn.initializers.ones,
                name: Optional[str] = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=_LN_EPS, dtype=dtype, scale_init=logical(scale_init, (dim_name,)),
                      bias_init=logical(_zeros, (dim_name,)), name=name)


# ----------------------------------------------------------------------------------------------------------------
# Geometry helpers (pure numpy, evaluated at trace time).
# ----------------------------------------------------------------------------------------------------------------

def relative_position_index(win_h: int, win_w: int) -> np.ndarray:
  """(Wh*Ww, Wh*Ww) index into the (2*Wh-1)*(2*Ww-1) relative-position table (timm/official layout)."""
  coords = np.stack(np.meshgrid(np.arange(win_h), np.arange(win_w), indexing='ij')).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)  # N, N, 2
  rel[:, :, 0] += win_h - 1
  rel[:, :, 1] += win_w - 1
  rel[:, :, 0] *= 2 * win_w - 1
  return rel.sum(-1)


def relative_coords_table(window: tuple[int, int], pretrained_window: tuple[int, int] = (0, 0)) -> np.ndarray:
  """SwinV2 log-spaced continuous coordinates, shape (2*Wh-1, 2*Ww-1, 2), float32.

  Coordinates arange(-(w-1), w) are normalised by (pretrained_window - 1) when a pretrained window is given, else by
  (w - 1); scaled to [-8, 8]; then mapped to sign(t) * log2(|t| + 1) / log2(8). (A 1-wide window, where timm divides
  0 by 0, yields 0 instead of NaN.)
  """
  axes = []
  for w, pw in zip(window, pretrained_window):
    t = np.arange(-(w - 1), w, dtype=np.float32)
    denom = (pw - 1) if pw > 0 else (w - 1)
    axes.append(t / max(denom, 1))
  table = np.stack(np.meshgrid(*axes, indexing='ij'), axis=-1) * 8.0
  table = np.sign(table) * np.log2(np.abs(table) + 1.0) / math.log2(8)
  return table.astype(np.float32)


def window_and_shift(resolution: tuple[int, int], window: tuple[int, int],
                     shifted: bool) -> tuple[tuple[int, int], tuple[int, int]]:
  """timm's clamping, per axis: an axis whose resolution is <= the window uses the whole axis and no shift."""
  win = tuple(r if r <= w else w for r, w in zip(resolution, window))
  shift = tuple(0 if (r <= w or not shifted) else w // 2 for r, w in zip(resolution, window))
  return win, shift  # type: ignore[return-value]


def window_partition(x: Array, window: tuple[int, int]) -> Array:
  """(B, H, W, C) -> (B, num_windows, Wh*Ww, C), windows in row-major order (timm order)."""
  b, h, w, c = x.shape
  wh, ww = window
  x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(windows: Array, window: tuple[int, int], h: int, w: int) -> Array:
  """Inverse of `window_partition`: (B, num_windows, Wh*Ww, C) -> (B, H, W, C)."""
  b, _, _, c = windows.shape
  wh, ww = window
  x = windows.reshape(b, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def shifted_window_mask(resolution: tuple[int, int], window: tuple[int, int],
                        shift: tuple[int, int]) -> Optional[np.ndarray]:
  """(num_windows, N, N) additive mask: -100 between tokens of different pre-roll regions, else 0; None if no shift.

  Each axis is cut into [0, L-w), [L-w, L-s), [L-s, L) (an unshifted axis is one region), as in timm.
  """
  if not any(shift):
    return None
  labels = []
  for length, w, s in zip(resolution, window, shift):
    lab = np.zeros(length, np.int32)
    if s > 0:
      lab[length - w:length - s] = 1
      lab[length - s:] = 2
    labels.append(lab)
  img = (labels[0][:, None] * 3 + labels[1][None, :]).astype(np.float32)
  win = np.asarray(window_partition(img[None, :, :, None], window))[0, :, :, 0]  # nW, N
  diff = win[:, None, :] - win[:, :, None]
  return np.where(diff != 0, _MASK_VALUE, 0.0).astype(np.float32)


def merge_patches(x: Array) -> Array:
  """2x2 patch merging gather: (B, H, W, C) -> (B, H/2, W/2, 4C) = cat[x00, x10, x01, x11] (row offset fastest)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
  return x.reshape(b, h // 2, w // 2, 4 * c)


# ----------------------------------------------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------------------------------------------

class Mlp(nn.Module):
  hidden_dim: int
  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    dim = x.shape[-1]
    x = _dense(self.hidden_dim, ('embed', 'mlp'), dtype=self.dtype, name='fc1')(x)
    x = constrain(layers.gelu(x, approximate=False), _MAP[:-1] + ('mlp',))
    x = nn.Dropout(self.drop_rate)(x, deterministic=deterministic)
    x = _dense(dim, ('mlp', 'embed'), dtype=self.dtype, name='fc2')(x)
    return nn.Dropout(self.drop_rate)(x, deterministic=deterministic)


class CpbMlp(nn.Module):
  """SwinV2 continuous position bias MLP: 2 -> hidden (ReLU) -> heads, no output bias."""
  num_heads: int
  hidden_dim: int = 512

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.relu(nn.Dense(self.hidden_dim, kernel_init=_trunc_normal, name='fc1')(x))
    return nn.Dense(self.num_heads, use_bias=False, kernel_init=_trunc_normal, name='fc2')(x)


class WindowAttention(nn.Module):
  """Window multi-head self-attention on (B, num_windows, N, C) tokens with a relative position bias.

  version 1: scaled dot product + learned bias table. version 2: cosine attention times a clamped learned
  per-head temperature + 16*sigmoid(CPB MLP) bias, qkv without bias plus q_bias / v_bias.
  `window` is the (possibly clamped) window in use; the v1 table is sized for `table_window`.
  """
  num_heads: int
  window: tuple[int, int]
  version: int = 1
  table_window: Optional[tuple[int, int]] = None  # v1 bias-table size (the unclamped window); None: `window`.
  pretrained_window: tuple[int, int] = (0, 0)
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, mask: Optional[np.ndarray], deterministic: bool = True) -> Array:
    b, nw, n, dim = x.shape
    heads = self.num_heads
    if dim % heads:
      raise ValueError(f'Width {dim} is not divisible by num_heads {heads}.')
    wh, ww = self.window
    index = relative_position_index(wh, ww).reshape(-1)

    # timm's fused qkv kernel (C, 3C) keeps its layout; its output axis is split over 'heads' (tensor parallel)
    # and the per-head activations below are constrained to whole heads.
    qkv = _dense(3 * dim, ('embed', 'heads'), use_bias=self.version == 1, dtype=self.dtype, name='qkv')(x)
    if self.version == 2:
      q_bias = self.param('q_bias', logical(_zeros, ('heads',)), (dim,))
      v_bias = self.param('v_bias', logical(_zeros, ('heads',)), (dim,))
      qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    qkv = qkv.reshape(b, nw, n, 3, heads, dim // heads)
    per_head = ('batch', 'windows', 'length', 'heads', 'kv')
    q, k, v = (constrain(qkv[..., i, :, :], per_head) for i in range(3))  # (B, nW, N, heads, hd)

    if self.version == 1:
      th, tw = self.table_window or self.window
      table = self.param('relative_position_bias_table', logical(_trunc_normal, (None, 'heads')),
                         ((2 * th - 1) * (2 * tw - 1), heads))
      if (th, tw) != (wh, ww):  # Clamped window: its offsets are the centre of the full table.
        table = table.reshape(2 * th - 1, 2 * tw - 1, heads)[th - wh:th + wh - 1, tw - ww:tw + ww - 1]
        table = table.reshape(-1, heads)
      bias = table[index]
      scale = None  # head_dim ** -0.5
    else:
      def l2norm(t):
        t = t.astype(jnp.float32)
        return t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
      scale_init = logical(nn.initializers.constant(math.log(10.0)), ('heads', None, None))
      logit_scale = self.param('logit_scale', scale_init, (heads, 1, 1))
      temperature = jnp.exp(jnp.minimum(logit_scale, math.log(100.0))).reshape(heads, 1)  # Per head.
      q, k, scale = l2norm(q) * temperature, l2norm(k), 1.0  # Cosine logits in float32 on the einsum path.
      if self.attention_impl != 'einsum':  # The fused kernels need one dtype for q, k and v.
        q, k = q.astype(v.dtype), k.astype(v.dtype)
      coords = jnp.asarray(relative_coords_table(self.window, self.pretrained_window))
      table = CpbMlp(heads, name='cpb_mlp')(coords).reshape(-1, heads)
      bias = 16.0 * jax.nn.sigmoid(table[index])
    bias = bias.reshape(n, n, heads).transpose(2, 0, 1)[None]  # (1, heads, N, N)
    if mask is not None:
      bias = bias + jnp.asarray(mask)[:, None]  # (nW, heads, N, N), added after the bias
    dropout = None
    if self.attn_drop_rate > 0 and not deterministic:
      dropout = lambda w: nn.Dropout(self.attn_drop_rate)(w, deterministic=False)
    # Windows become batch entries of one (B * nW, N, heads, hd) attention; a per-window bias is broadcast over B.
    if mask is not None:
      bias = jnp.broadcast_to(bias[None], (b,) + bias.shape).reshape((b * nw,) + bias.shape[1:])
    fold = lambda t: t.reshape((b * nw, n, heads, dim // heads))
    out = attention.dot_product_attention(fold(q), fold(k), fold(v), bias=bias, scale=scale,
                                          implementation=self.attention_impl, dropout=dropout)
    out = constrain(out.reshape(b, nw, n, heads, dim // heads), per_head).reshape(b, nw, n, dim)
    out = _dense(dim, ('heads', 'embed'), dtype=self.dtype, name='proj')(out)
    return nn.Dropout(self.proj_drop_rate)(out, deterministic=deterministic)


class SwinBlock(nn.Module):
  """One (shifted-)window block on an NHWC map. v1: pre-norm residuals; v2: res-post-norm (x + LN(f(x)))."""
  num_heads: int
  window: tuple[int, int]  # Already clamped to the map (see `window_and_shift`).
  shift: tuple[int, int]
  version: int = 1
  table_window: Optional[tuple[int, int]] = None  # The unclamped window (v1 bias-table size); None: `window`.
  pretrained_window: tuple[int, int] = (0, 0)
  mlp_ratio: float = 4.0
  proj_drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  def _attention(self, x: Array, deterministic: bool) -> Array:
    _, h, w, _ = x.shape
    if h % self.window[0] or w % self.window[1]:
      raise ValueError(f'Feature map {h}x{w} is not divisible by window {self.window}.')
    sh, sw = self.shift
    if sh or sw:
      x = jnp.roll(x, (-sh, -sw), axis=(1, 2))
    mask = shifted_window_mask((h, w), self.window, self.shift)
    windows = window_partition(x, self.window)
    windows = WindowAttention(
        self.num_heads, self.window, version=self.version, table_window=self.table_window,
        pretrained_window=self.pretrained_window,
        attn_drop_rate=self.attn_drop_rate, proj_drop_rate=self.proj_drop_rate, dtype=self.dtype,
        attention_impl=self.attention_impl, name='attn')(windows, mask, deterministic)
    x = window_reverse(windows, self.window, h, w)
    if sh or sw:
      x = jnp.roll(x, (sh, sw), axis=(1, 2))
    return x

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    deterministic = not train
    dim = x.shape[-1]
    mlp = Mlp(int(dim * self.mlp_ratio), drop_rate=self.proj_drop_rate, dtype=self.dtype, name='mlp')
    x = constrain(x, _MAP)
    if self.version == 1:
      norm1 = _layer_norm(dtype=self.dtype, name='norm1')
      norm2 = _layer_norm(dtype=self.dtype, name='norm2')
      x = x + DropPath(self.drop_path_rate)(self._attention(norm1(x), deterministic), deterministic=deterministic)
      x = x + DropPath(self.drop_path_rate)(mlp(norm2(x), deterministic), deterministic=deterministic)
    else:
      norm1 = _layer_norm(dtype=self.dtype, scale_init=_zeros, name='norm1')
      norm2 = _layer_norm(dtype=self.dtype, scale_init=_zeros, name='norm2')
      x = x + DropPath(self.drop_path_rate)(norm1(self._attention(x, deterministic)), deterministic=deterministic)
      x = x + DropPath(self.drop_path_rate)(norm2(mlp(x, deterministic)), deterministic=deterministic)
    return constrain(x, _MAP)


class PatchMerging(nn.Module):
  """2x2 merge to twice the width. v1: LayerNorm(4C) then Linear(4C->2C, no bias); v2: Linear then LayerNorm(2C)."""
  out_dim: int
  version: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = merge_patches(x)
    reduction = _dense(self.out_dim, ('embed', None), use_bias=False, dtype=self.dtype, name='reduction')
    if self.version == 1:
      return reduction(_layer_norm(dtype=self.dtype, name='norm')(x))
    return _layer_norm(dtype=self.dtype, name='norm')(reduction(x))


class PatchEmbed(nn.Module):
  """Non-overlapping patch conv (HWIO kernel, stride = patch) followed by LayerNorm; NHWC in and out."""
  patch_size: int
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                kernel_init=logical(_torch_conv_init, (None, None, None, 'embed')),
                bias_init=logical(_zeros, ('embed',)), name='proj')(x)
    return _layer_norm(dtype=self.dtype, name='norm')(x)


class SwinStage(nn.Module):
  """timm's stage: optional patch merging first (stages 1..3), then blocks alternating plain / shifted windows."""
  out_dim: int
  depth: int
  num_heads: int
  window_size: int
  downsample: bool
  version: int = 1
  pretrained_window_size: int = 0
  mlp_ratio: float = 4.0
  proj_drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rates: tuple[float, ...] = ()
  remat: Union[bool, str] = False
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.downsample:
      x = PatchMerging(self.out_dim, version=self.version, dtype=self.dtype, name='downsample')(x)
    resolution = (x.shape[1], x.shape[2])
    target = (self.window_size, self.window_size)
    block_cls = remat(SwinBlock, self.remat, static_argnums=(2,))
    for j in range(self.depth):
      window, shift = window_and_shift(resolution, target, shifted=(j % 2 == 1))
      x = block_cls(
          self.num_heads, window, shift, version=self.version, table_window=target,
          pretrained_window=(self.pretrained_window_size,) * 2, mlp_ratio=self.mlp_ratio,
          proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate,
          drop_path_rate=self.drop_path_rates[j] if self.drop_path_rates else 0.0, dtype=self.dtype,
          attention_impl=self.attention_impl, name=f'blocks_{j}')(x, train)
    return x


# ----------------------------------------------------------------------------------------------------------------
# Models.
# ----------------------------------------------------------------------------------------------------------------

class SwinTransformer(layers.HierarchicalBackbone):
  """Swin Transformer v1 on NHWC images (timm `SwinTransformer`).

  drop_rate is the dropout before the classifier (timm's `drop_rate`); proj_drop_rate is the dropout after the
  attention projection and in the MLP (timm's `proj_drop_rate`). window_size may be one int or one per stage.
  num_classes=0 gives a model whose logits are the pooled pre-logits (as timm's Identity head).
  """
  num_classes: int = 1000
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: IntOrSeq = 7
  mlp_ratio: float = 4.0
  drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.1
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False  # False/'none', True/'full', or a jax.checkpoint_policies name (layers.remat).
  attention_impl: str = 'einsum'  # Attention kernel: 'einsum' | 'xla' | 'cudnn' (vit_jax.models.attention).

  _version: ClassVar[int] = 1

  @property
  def num_features(self) -> int:
    return int(self.embed_dim * 2 ** (len(self.depths) - 1))

  def _pretrained_windows(self) -> tuple[int, ...]:
    return (0,) * len(self.depths)

  def setup(self):
    n = len(self.depths)
    if len(self.num_heads) != n:
      raise ValueError(f'depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} differ in length.')
    windows = layers.per_stage(self.window_size, n, 'window_size')
    pretrained = self._pretrained_windows()
    dpr = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    starts = np.cumsum((0,) + tuple(self.depths))
    self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype)
    self.layers = [
        SwinStage(out_dim=int(self.embed_dim * 2 ** i), depth=self.depths[i], num_heads=self.num_heads[i],
                  window_size=windows[i], downsample=i > 0, version=self._version,
                  pretrained_window_size=pretrained[i], mlp_ratio=self.mlp_ratio,
                  proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate,
                  drop_path_rates=tuple(float(r) for r in dpr[starts[i]:starts[i + 1]]), remat=self.remat,
                  dtype=self.dtype, attention_impl=self.attention_impl)
        for i in range(n)]
    self.norm = _layer_norm(dtype=self.dtype)
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes > 0:
      self.head = _dense(self.num_classes, ('embed', 'classes'), dtype=self.dtype)

  # -- input-size validation ------------------------------------------------------------------------------------

  def stage_geometry(self, height: int, width: int) -> list[dict[str, tuple[int, int]]]:
    """Per stage: feature `resolution`, clamped `window` and odd-block `shift`; ValueError for unusable sizes."""
    per_axis = [self._axis_geometry(s) for s in (height, width)]
    for axis, (side, geo) in enumerate(zip((height, width), per_axis)):
      if isinstance(geo, str):
        near = self._valid_sides_near(side)
        raise ValueError(
            f'Input size {height}x{width} cannot be used by this Swin model: {geo} '
            f'Fix: resize/crop the {("height", "width")[axis]} to a valid size such as {near}, or change '
            f'window_size/patch_size (window_size={self.window_size}, patch_size={self.patch_size}).')
    return [dict(resolution=(h[0], w[0]), window=(h[1], w[1]), shift=(h[2], w[2]))
            for h, w in zip(*per_axis)]

  def _axis_geometry(self, side: int):
    """[(resolution, window, shift)] per stage for one axis, or a string describing the first problem."""
    p, n = self.patch_size, len(self.depths)
    windows = layers.per_stage(self.window_size, n, 'window_size')
    if side % p:
      return f'{side} is not divisible by patch_size {p}.'
    res, out = side // p, []
    for i in range(n):
      if i > 0:
        if res % 2:
          return (f'stage {i} patch merging needs an even resolution, but stage {i - 1} is {res} wide '
                  f'(from {side} px).')
        res //= 2
      (win,), (shift,) = window_and_shift((res,), (windows[i],), shifted=True)
      if res % win:
        return (f'stage {i} has resolution {res} (from {side} px), which is not divisible by its window '
                f'{win}.')
      out.append((res, win, shift))
    return out

  def _valid_sides_near(self, side: int) -> str:
    below = next((s for s in range(side - 1, 0, -1) if not isinstance(self._axis_geometry(s), str)), None)
    above = next((s for s in range(side + 1, 64 * side + 64) if not isinstance(self._axis_geometry(s), str)), None)
    return ' or '.join(str(s) for s in (below, above) if s is not None)

  # -- forward ----------------------------------------------------------------------------------------------------

  def stage_modules(self) -> Sequence[nn.Module]:
    return self.layers

  def check_input_size(self, height: int, width: int) -> None:
    self.stage_geometry(height, width)


class SwinTransformerV2(SwinTransformer):
  """Swin Transformer v2 (timm `SwinTransformerV2`): res-post-norm, cosine attention, continuous position bias.

  pretrained_window_size: the window the weights were pretrained with (one int or one per stage; 0 = the current
  window), used to normalise the CPB coordinates as in timm's `pretrained_window_sizes`.
  """
  pretrained_window_size: IntOrSeq = 0

  _version: ClassVar[int] = 2

  def _pretrained_windows(self) -> tuple[int, ...]:
    return layers.per_stage(self.pretrained_window_size, len(self.depths), 'pretrained_window_size')


# ----------------------------------------------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------------------------------------------

_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))

registry.register_model('swin_t', SwinTransformer, family='swin', image_size=224, num_params=28_288_354,
                        timm_name='swin_tiny_patch4_window7_224', window_size=7, drop_path_rate=0.2, **_T)
registry.register_model('swin_s', SwinTransformer, family='swin', image_size=224, num_params=49_606_258,
                        timm_name='swin_small_patch4_window7_224', window_size=7, drop_path_rate=0.3, **_S)
registry.register_model('swin_b', SwinTransformer, family='swin', image_size=224, num_params=87_768_224,
                        timm_name='swin_base_patch4_window7_224', window_size=7, drop_path_rate=0.5, **_B)
registry.register_model('swin_l', SwinTransformer, family='swin', image_size=224, num_params=196_532_476,
                        timm_name='swin_large_patch4_window7_224', window_size=7, drop_path_rate=0.2, **_L)
registry.register_model('swin_b_384', SwinTransformer, family='swin', image_size=384, num_params=87_903_584,
                        timm_name='swin_base_patch4_window12_384', window_size=12, drop_path_rate=0.5, **_B)

registry.register_model('swinv2_t', SwinTransformerV2, family='swinv2', image_size=256, num_params=28_347_154,
                        timm_name='swinv2_tiny_window8_256', window_size=8, drop_path_rate=0.2, **_T)
registry.register_model('swinv2_s', SwinTransformerV2, family='swinv2', image_size=256, num_params=49_728_418,
                        timm_name='swinv2_small_window8_256', window_size=8, drop_path_rate=0.3, **_S)
registry.register_model('swinv2_b', SwinTransformerV2, family='swinv2', image_size=256, num_params=87_918_816,
                        timm_name='swinv2_base_window8_256', window_size=8, drop_path_rate=0.5, **_B)
# timm has no window-8 Swin-V2-L; its 256 px large model is swinv2_large_window12to16_192to256 (window 16,
# pretrained_window_size=(12, 12, 12, 6)) with the same parameter count.
registry.register_model('swinv2_l', SwinTransformerV2, family='swinv2', image_size=256, num_params=196_739_932,
                        timm_name=None, window_size=8, drop_path_rate=0.2, **_L)


# --- Family facts (vit_jax/models/facts.py): swin (v1: analytic FLOPs, resizable bias tables) and swinv2. --------

_SB = r'layers\.(\d+)\.blocks\.(\d+)\.'
_OB = r'layers_\1/blocks_\2/'
TIMM_RULES: tuple[facts.Rule, ...] = (
    (r'patch_embed\.proj', 'patch_embed/proj', 'conv'),
    (r'patch_embed\.norm', 'patch_embed/norm', 'norm'),
    (r'layers\.(\d+)\.downsample\.norm', r'layers_\1/downsample/norm', 'norm'),
    (r'layers\.(\d+)\.downsample\.reduction', r'layers_\1/downsample/reduction', 'linear'),
    (_SB + r'norm([12])', _OB + r'norm\3', 'norm'),
    (_SB + r'attn\.(qkv|proj)', _OB + r'attn/\3', 'linear'),
    (_SB + r'attn\.relative_position_bias_table', _OB + 'attn/relative_position_bias_table', 'rel_table'),
    (_SB + r'attn\.(q_bias|v_bias|logit_scale)', _OB + r'attn/\3', 'raw'),
    (_SB + r'attn\.cpb_mlp\.0', _OB + 'attn/cpb_mlp/fc1', 'linear'),
    (_SB + r'attn\.cpb_mlp\.2', _OB + 'attn/cpb_mlp/fc2', 'linear'),
    (_SB + r'mlp\.fc([12])', _OB + r'mlp/fc\3', 'linear'),
    (r'norm', 'norm', 'norm'),
    (r'head\.fc', 'head', 'linear'),
    (r'head', 'head', 'linear'),  # Older timm Swin checkpoints.
)
# timm buffers that our modules recompute from the geometry (present in older checkpoints).
TIMM_IGNORED = (r'.*\.relative_position_index', r'.*\.attn_mask', r'.*\.relative_coords_table')
_SOURCE_HEADS = ('head', 'head.fc')

GROUPING = facts.LayerGrouping(
    blocks=((r'^layers_(\d+)/blocks_(\d+)/', 'block2'),
            (r'^layers_(\d+)/', 'after')),  # The stage's downsample (official layout) follows its blocks.
    stem=r'^patch_embed(/|$)')


def swin_forward_macs(*, image_size: int, patch_size: int = 4, embed_dim: int = 96,
                      depths: Sequence[int] = (2, 2, 6, 2), window_size: IntOrSeq = 7,
                      mlp_ratio: float = 4.0, num_classes: int = 1000) -> float:
  """Multiply-adds of one Swin v1 forward pass on one image (the official `flops()` without its norm terms).

  Per block at resolution r, width C, window w (clamped to r), N = w*w tokens per window, (r/w)^2 windows:
  windows * (4*N*C^2 + 2*N^2*C) + 2*r^2*C^2*mlp_ratio. Patch merging: (r/2)^2 * 4C * 2C.
  """
  if image_size % patch_size:
    raise ValueError(f'image_size={image_size} is not divisible by patch_size={patch_size}.')
  windows = (window_size,) * len(depths) if isinstance(window_size, int) else tuple(window_size)
  r = image_size // patch_size
  macs = r * r * patch_size * patch_size * 3 * embed_dim
  dim = embed_dim
  for i, depth in enumerate(depths):
    if i > 0:
      r //= 2
      macs += r * r * (4 * dim) * (2 * dim)  # Patch merging: 2x2 tokens of width C -> one of width 2C.
      dim *= 2
    w = min(windows[i], r)
    n, num_windows = w * w, (r // w) ** 2
    macs += depth * (num_windows * (4 * n * dim * dim + 2 * n * n * dim) + 2 * r * r * dim * dim * mlp_ratio)
  return float(macs + dim * num_classes)


def forward_macs(model: Any, image_size: int) -> Optional[float]:
  """Analytic MACs of a Swin v1 model (not v2, whose continuous bias MLP and cosine attention add work)."""
  if type(model) is not SwinTransformer:  # pylint: disable=unidiomatic-typecheck
    return None
  return swin_forward_macs(image_size=image_size, patch_size=model.patch_size, embed_dim=model.embed_dim,
                           depths=tuple(model.depths), window_size=model.window_size, mlp_ratio=model.mlp_ratio,
                           num_classes=model.num_classes)


def resize_bias_table(path: str, value: np.ndarray, shape: tuple, context: facts.ResizeContext
                      ) -> Optional[np.ndarray]:
  """A v1 relative-position bias table of another window fitted to the model's.

  A table for the stage's clamped window (timm built at a size where the window covers the whole map) is placed
  at the centre of ours; any other size is resized bicubically per head (official Swin / timm fine-tuning).
  """
  m = re.match(r'layers_(\d+)/.*/relative_position_bias_table$', path)
  if not m or value.ndim != 2 or len(shape) != 2 or value.shape[1] != shape[1]:
    return None
  if context.model is not None and context.image_size:
    wh, ww = context.model.stage_geometry(context.image_size, context.image_size)[int(m.group(1))]['window']
    if value.shape[0] == (2 * wh - 1) * (2 * ww - 1) and value.shape[0] < shape[0]:
      return resize.centre_table(value, shape[0], path)
  return resize.resize_rel_pos_bias_table(value, shape[0])


FACTS = facts.register_family(facts.FamilyFacts(
    name='swin', layouts={'timm': facts.ConversionTable(TIMM_RULES, TIMM_IGNORED, _SOURCE_HEADS)},
    grouping=GROUPING, forward_macs=forward_macs, resize=resize_bias_table))
# SwinV2 has no tables to resize (its continuous bias works at any window: set pretrained_window_size); timm's
# k_bias buffer is a constant zero. FLOPs: XLA's cost analysis.
V2_FACTS = facts.register_family(facts.FamilyFacts(
    name='swinv2',
    layouts={'timm': facts.ConversionTable(TIMM_RULES, TIMM_IGNORED + (r'.*\.attn\.k_bias',), _SOURCE_HEADS)},
    grouping=GROUPING))
