"""DINO (Caron et al. 2021, https://arxiv.org/abs/2104.14294): a ViT backbone plus the DINO projection head.

The backbone is the plain ViT (class token after the final norm, exact GELU, LayerNorm eps 1e-6, as the official
facebookresearch/dino `vision_transformer.py`); the head is the official `DINOHead`: a 3-layer MLP (2048 hidden,
GELU) to a 256-wide bottleneck, L2 normalisation, and a weight-normalised linear layer without bias to `out_dim`
(65536) prototypes whose norm g is frozen at 1 (so it is not a parameter at all unless norm_last_layer=False).

Multi-crop: the learned position table is kept at the initialisation grid (224 px -> 14x14) and interpolated to
the grid of any other crop (96 px local crops -> 6x6) the way DINO's `interpolate_pos_encoding` does: torch's
bicubic with scale_factor (w0 + 0.1) / sqrt(N), not with the output size. `torch_bicubic_resize` reproduces
torch's `F.interpolate(mode='bicubic', scale_factor=..., align_corners=False)`; jax.image.resize gives other values.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import facts
from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models import resize
from vit_jax.models import vit

Array = jax.Array

def bicubic_matrix(in_size: int, scale_factor: float) -> np.ndarray:
  """(out_size, in_size) matrix of torch's 1-D bicubic resampling by `scale_factor` (align_corners=False)."""
  return resize.torch_bicubic_matrix_by_scale(in_size, scale_factor)


def torch_bicubic_resize(x: Array, scale_factor: tuple[float, float]) -> Array:
  """Resizes the leading two (spatial) axes of `x` (H, W, ...) as torch's bicubic interpolate by scale factor."""
  rows = bicubic_matrix(x.shape[0], scale_factor[0])
  cols = bicubic_matrix(x.shape[1], scale_factor[1])
  x = jnp.asarray(x)
  out = jnp.einsum('ih,hw...->iw...', jnp.asarray(rows, x.dtype), x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum('jw,iw...->ij...', jnp.asarray(cols, x.dtype), out, precision=jax.lax.Precision.HIGHEST)


def interpolate_posemb(table: Array, has_cls: bool, grid: tuple[int, int]) -> Array:
  """DINO's `interpolate_pos_encoding`: fits a (1, [cls +] N, D) learned table to a `grid` patch grid.

  The class-token row is kept; the square N-patch table is resized bicubically with scale factor
  (grid + 0.1) / sqrt(N) per axis (the +0.1 guards the floor in torch's output size). Unchanged if the grid is
  the table's own.
  """
  prefix = int(has_cls)
  n = table.shape[1] - prefix
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f'Position table of {n} patch rows is not a square grid; DINO interpolation needs one.')
  if tuple(grid) == (side, side):
    return table
  scale = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
  patches = torch_bicubic_resize(table[0, prefix:].reshape(side, side, -1), scale)
  if patches.shape[:2] != tuple(grid):
    raise ValueError(f'Interpolating a {side}x{side} position table gave {patches.shape[:2]}, not {grid}.')
  patches = patches.reshape(1, grid[0] * grid[1], -1).astype(table.dtype)
  return jnp.concatenate([table[:, :prefix], patches], axis=1)


class DINOHead(nn.Module):
  """The official DINOHead: MLP -> L2 normalise -> weight-normalised linear (no bias) to `out_dim`.

  Params: `Dense_0..Dense_{L-1}` (trunc-normal 0.02, zero bias, as DINO's `_init_weights`), `last_layer/kernel`
  (bottleneck, out_dim) = weight_v transposed; with norm_last_layer=False also `last_layer/scale` (out_dim,) =
  weight_g (init 1, trainable). Each prototype's weight is v / ||v|| (* g).
  """
  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  norm_last_layer: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.num_layers < 1:
      raise ValueError(f'DINOHead needs num_layers >= 1, got {self.num_layers}.')
    init = nn.initializers.truncated_normal(stddev=0.02)
    widths = [self.hidden_dim] * (self.num_layers - 1) + [self.bottleneck_dim]
    axes = [('embed', 'mlp')] + [(None, 'mlp')] * (self.num_layers - 2) + [(None, None)]
    if self.num_layers == 1:
      axes = [('embed', None)]
    for i, (width, names) in enumerate(zip(widths, axes)):
      x = nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, name=f'Dense_{i}',
                   kernel_init=layers.logical(init, names), bias_init=layers.logical(nn.initializers.zeros,
                                                                                      names[1:]))(x)
      if i < self.num_layers - 1:
        x = layers.gelu(x, approximate=False)
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize(eps=1e-12)
    return WeightNormDense(self.out_dim, learn_scale=not self.norm_last_layer, dtype=self.dtype,
                           name='last_layer')(x)


class WeightNormDense(nn.Module):
  """Linear layer without bias whose output unit j has weight g_j * v_j / ||v_j|| (torch weight_norm, dim=0).

  `kernel` (in, features) holds v; `scale` (features,) holds g only if learn_scale, else g = 1 (frozen).
  v's init is torch's default Linear init, uniform(+-1/sqrt(in)), though only its direction matters.
  """
  features: int
  learn_scale: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
    v = self.param('kernel', layers.logical(init, (None, 'mlp')), (x.shape[-1], self.features), jnp.float32)
    w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
    if self.learn_scale:
      w = w * self.param('scale', layers.logical(nn.initializers.ones, ('mlp',)), (self.features,), jnp.float32)
    y = jnp.dot(x.astype(self.dtype), w.astype(self.dtype))
    return y.astype(jnp.float32)


class DinoVisionTransformer(vit.VisionTransformer):
  """ViT backbone + DINOHead. `__call__(images)` -> (B, out_dim) float32 head outputs for the class token.

  Any crop size divisible by the patch size works: the position table stays at the size the model was
  initialised with and is interpolated as DINO does (`interpolate_posemb`). `forward_head(features,
  pre_logits=True)` is the backbone's class token (the k-NN / linear-probe feature); with num_classes > 0 there is
  also a linear classifier `head` (as VisionTransformer) that forward_head returns otherwise. DINO training builds
  the model with num_classes=0.
  """
  classifier: str = 'token'
  gelu_approximate: bool = False
  posemb_resize: Any = interpolate_posemb
  out_dim: int = 65536
  head_hidden_dim: int = 2048
  head_bottleneck_dim: int = 256
  head_layers: int = 3
  norm_last_layer: bool = True

  def setup(self):
    if self.classifier != 'token' or self.posemb != 'learn' or self.representation_size:
      raise ValueError("DINO reads the class token with a learned position table: classifier must be 'token', "
                       f"posemb 'learn' and representation_size None; got {self.classifier!r}, {self.posemb!r}, "
                       f'{self.representation_size!r}.')
    super().setup()
    self.dino_head = DINOHead(out_dim=self.out_dim, hidden_dim=self.head_hidden_dim,
                              bottleneck_dim=self.head_bottleneck_dim, num_layers=self.head_layers,
                              norm_last_layer=self.norm_last_layer, dtype=self.dtype)

  def project(self, images: Array, *, train: bool = False) -> Array:
    """(B, out_dim) DINO head outputs (float32) for one batch of same-sized crops."""
    features = self.forward_features(images, train=train)
    return self.dino_head(self.forward_head(features, pre_logits=True))

  def forward_crops(self, crops: Sequence[Array], *, train: bool = False) -> Array:
    """(n_crops, B, out_dim) for a list of (B, H_i, W_i, C) crops.

    As DINO's MultiCropWrapper, consecutive crops of one size go through the backbone together (one batch of
    n x B), then the head runs once on all class tokens.
    """
    if not crops:
      raise ValueError('forward_crops needs at least one crop.')
    tokens, start = [], 0
    while start < len(crops):
      end = start
      while end < len(crops) and crops[end].shape == crops[start].shape:
        end += 1
      group = jnp.concatenate(list(crops[start:end]), axis=0)
      tokens.append(self.forward_head(self.forward_features(group, train=train), pre_logits=True))
      start = end
    out = self.dino_head(jnp.concatenate(tokens, axis=0))
    return out.reshape(len(crops), crops[0].shape[0], self.out_dim)

  def __call__(self, images: Array, *, train: bool = False) -> Array:
    """DINO head outputs (B, out_dim); the classifier `head` (num_classes > 0) is reached via forward_head."""
    if self.num_classes and self.is_initializing():
      # Init creates the classifier too (fine-tuning and linear evaluation read it); apply leaves it out.
      features = self.forward_features(images, train=train)
      self.forward_head(features)
      return self.dino_head(self.forward_head(features, pre_logits=True))
    return self.project(images, train=train)


def head_param_count(hidden_size: int, *, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                     num_layers: int = 3, norm_last_layer: bool = True) -> int:
  """Trainable parameters of the official DINOHead (no BatchNorm), from its definition."""
  widths = [hidden_size] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
  mlp = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
  return mlp + bottleneck_dim * out_dim + (0 if norm_last_layer else out_dim)


# --- Family facts (vit_jax/models/facts.py): the official DINO checkpoint layout, layer grouping, FLOPs. ---------

def _last_layer_direction(key: str, value: np.ndarray, path: str, shapes: Mapping[str, Any]) -> dict:
  """weight_v (out_dim, bottleneck) -> last_layer/kernel (bottleneck, out_dim)."""
  del key, shapes
  return {path: np.asarray(value).T}


def _last_layer_norm(key: str, value: np.ndarray, path: str, shapes: Mapping[str, Any]) -> dict:
  """weight_g (out_dim, 1): last_layer/scale for norm_last_layer=False models; otherwise it must be 1 (frozen)."""
  g = np.asarray(value).reshape(-1)
  if path in shapes:
    return {path: g}
  if not np.allclose(g, 1.0):
    raise ValueError(f'{key} is not 1 everywhere: the checkpoint was trained with norm_last_layer=False. Convert '
                     'it with model_overrides={"norm_last_layer": False} (a learned last_layer/scale).')
  return {}


_BB = r'backbone\.blocks\.(\d+)\.'
_OB = r'Transformer/encoderblock_\1/'
# facebookresearch/dino's MultiCropWrapper state dict (a full checkpoint's 'teacher' or 'student', without DDP's
# 'module.' prefix): the ViT under 'backbone.', DINOHead under 'head.' (mlp.0/2/4 Linear, last_layer weight_g/_v).
DINO_RULES: tuple[facts.Rule, ...] = (
    (r'backbone\.cls_token', 'cls', 'raw'),
    (r'backbone\.pos_embed', vit.POSEMB_PATH, 'raw'),
    (r'backbone\.patch_embed\.proj', 'embedding', 'conv'),
    (_BB + r'norm1', _OB + 'LayerNorm_0', 'norm'),
    (_BB + r'attn\.qkv', _OB + 'MultiHeadDotProductAttention_0', 'qkv'),
    (_BB + r'attn\.proj', _OB + 'MultiHeadDotProductAttention_0/out', 'mha_out'),
    (_BB + r'norm2', _OB + 'LayerNorm_1', 'norm'),
    (_BB + r'mlp\.fc1', _OB + 'MlpBlock_0/Dense_0', 'linear'),
    (_BB + r'mlp\.fc2', _OB + 'MlpBlock_0/Dense_1', 'linear'),
    (r'backbone\.norm', 'Transformer/encoder_norm', 'norm'),
    (r'head\.mlp\.(\d+)', lambda m: f'dino_head/Dense_{int(m.group(1)) // 2}', 'linear'),  # GELUs between
    (r'head\.last_layer\.weight_v', 'dino_head/last_layer/kernel', _last_layer_direction),
    (r'head\.last_layer\.weight_g', 'dino_head/last_layer/scale', _last_layer_norm),
)


def infer_image_size(state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]) -> Optional[int]:
  """The input size of a DINO checkpoint, from its backbone.pos_embed rows (class token + a square grid)."""
  if 'backbone.pos_embed' not in state_dict:
    return None
  tokens = state_dict['backbone.pos_embed'].shape[1] - 1
  grid = math.isqrt(max(tokens, 0))
  return grid * options.get('patch_size', 16) if tokens > 0 and grid * grid == tokens else None


def forward_macs(model: Any, image_size: int) -> Optional[float]:
  """Multiply-adds of `__call__` on one image: the ViT backbone (no classifier) plus the DINO head's matmuls."""
  if not isinstance(model, DinoVisionTransformer):
    return None
  backbone = vit.vit_forward_macs(image_size=image_size, patch_size=model.patch_size, hidden_size=model.hidden_size,
                                  num_layers=model.num_layers, mlp_dim=model.mlp_dim, num_classes=0)
  widths = ([model.hidden_size] + [model.head_hidden_dim] * (model.head_layers - 1) + [model.head_bottleneck_dim]
            + [model.out_dim])
  return backbone + float(sum(a * b for a, b in zip(widths[:-1], widths[1:])))


FACTS = facts.register_family(facts.FamilyFacts(
    name='dino', layouts={'dino': facts.ConversionTable(DINO_RULES, source_heads=())}, grouping=vit.GROUPING,
    forward_macs=forward_macs, resize=vit.resize_pos_embedding, infer_image_size=infer_image_size,
    heads=('head',)))


# --- Registered variants: the official DINO ViTs (vit_small / vit_base, patch 16 and 8, 224 px).
# num_params follows ModelSpec (1000 classes: a linear classifier next to the DINO head). DINO's own trainable
# count (num_classes=0) is backbone + head: ViT-S/16 21,665,664 + 5,509,376 + 16,777,216 (REFERENCE section 6).
_DINO = [
    # name, ViT variant
    ('dino_vit_s16', 'S/16'),
    ('dino_vit_b16', 'B/16'),
    ('dino_vit_s8', 'S/8'),
    ('dino_vit_b8', 'B/8'),
]
_COUNTS = {'dino_vit_s16': 44_337_256, 'dino_vit_b16': 109_640_680, 'dino_vit_s8': 44_341_864,
           'dino_vit_b8': 109_649_896}
for _name, _variant in _DINO:
  registry.register_model(_name, DinoVisionTransformer, family='dino', image_size=224,
                          num_params=_COUNTS[_name], timm_name=None, **vit.parse_variant(_variant))
