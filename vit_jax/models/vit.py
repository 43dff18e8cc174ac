"""Vision Transformer (Dosovitskiy et al. 2020) with the official flax parameter names.

Parameter paths match google-research/vision_transformer, so the published .npz files load through
`vit_jax.pretrained.load_pretrained`; `classifier='map'` and `posemb='sincos2d'` follow big_vision.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, ClassVar, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import facts
from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models import resize
from vit_jax.models import resnet_stem

Array = jax.Array

# Widths of big_vision's variant letters (Table 2 of https://arxiv.org/abs/2106.04560).
_VARIANTS = {
    # name: (hidden_size, num_layers, mlp_dim, num_heads)
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'So400m': (1152, 27, 4304, 16),
    'H': (1280, 32, 5120, 16),
    'g': (1408, 40, 6144, 16),
    'G': (1664, 48, 8192, 16),
    'e': (1792, 56, 15360, 16),
}


def parse_variant(variant: str) -> dict[str, int]:
  """Decodes a big_vision variant string such as 'B/16' (or just 'B') into VisionTransformer fields."""
  name, _, patch = variant.partition('/')
  if name not in _VARIANTS:
    raise ValueError(f'Unknown ViT variant {variant!r}; expected one of {sorted(_VARIANTS)} optionally '
                     'followed by /<patch size>, e.g. "B/16".')
  hidden, depth, mlp, heads = _VARIANTS[name]
  out = dict(hidden_size=hidden, num_layers=depth, mlp_dim=mlp, num_heads=heads)
  if patch:
    if not patch.isdigit() or int(patch) <= 0:
      raise ValueError(f'Bad patch size in ViT variant {variant!r}; expected e.g. "B/16".')
    out['patch_size'] = int(patch)
  return out


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.) -> np.ndarray:
  """Fixed 2-D sin-cos position table (MoCo v3 / big_vision layout), shape (1, h*w, width)."""
  if width % 4:
    raise ValueError(f'posemb="sincos2d" needs hidden_size divisible by 4, got {width}.')
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / max(width // 4 - 1, 1)
  omega = 1. / (temperature ** omega)
  y = np.einsum('m,d->md', y.reshape(-1), omega)
  x = np.einsum('m,d->md', x.reshape(-1), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


class AddPositionEmbs(nn.Module):
  """Adds position embeddings to a (B, [cls +] h*w, D) sequence.

  'learn': param `pos_embedding` (1, tokens, D), normal(0.02) init, including a slot for the class token. With
  `resize` (table, has_cls, grid) -> table, a table built for another grid is fitted to the input's grid on the
  fly (e.g. DINO's multi-crop: one table for 224 and 96 px crops); without it the grids must match.
  'sincos2d': a fixed table (no parameter); the class token gets a zero row, which matches big_vision
  (posemb added before the class token is concatenated).
  'none': adds nothing, for callers that add their own embeddings first (MAE adds its table before masking).
  """
  posemb: str = 'learn'
  has_cls: bool = True
  resize: Optional[Callable[[Array, bool, tuple[int, int]], Array]] = None

  @nn.compact
  def __call__(self, x: Array, *, grid: tuple[int, int]) -> Array:
    _, length, width = x.shape
    if self.posemb == 'none':
      return x
    if self.posemb == 'learn':
      shape = (1, length, width)
      if self.has_variable('params', 'pos_embedding'):
        have = self.get_variable('params', 'pos_embedding').shape
        if tuple(have) != shape and self.resize is not None:
          pe = self.param('pos_embedding', layers.logical(nn.initializers.normal(stddev=0.02),
                                                          (None, None, 'embed')), tuple(have), jnp.float32)
          return x + self.resize(pe, self.has_cls, grid).astype(x.dtype)
        if tuple(have) != shape:
          raise ValueError(
              f'Input image gives a {grid[0]}x{grid[1]} patch grid, i.e. position embedding shape {shape}, but '
              f'the parameters hold pos_embedding of shape {tuple(have)}. Use the image size the model was '
              'initialised with, or resize the position embeddings (vit_jax.checkpoint / '
              'vit_jax.pretrained.resize_posemb, position-embedding interpolation).')
      pe = self.param('pos_embedding', layers.logical(nn.initializers.normal(stddev=0.02), (None, None, 'embed')),
                      shape, jnp.float32)
    elif self.posemb == 'sincos2d':
      pe = posemb_sincos_2d(grid[0], grid[1], width)
      if self.has_cls:
        pe = np.concatenate([np.zeros((1, 1, width), pe.dtype), pe], axis=1)
    else:
      raise ValueError(f"Unknown posemb {self.posemb!r}; expected 'learn', 'sincos2d' or 'none'.")
    return x + jnp.asarray(pe).astype(x.dtype)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block: x + DropPath(attn(LN(x))), then x + DropPath(MLP(LN(x))).

  `__call__` uses the `drop_path_rate` field; `block` takes the rate as an argument (a traced per-layer scalar when
  the blocks are scanned).
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    # `deterministic` is positional so that nn.remat can mark it static.
    return self.block(x, deterministic, self.drop_path_rate)

  @nn.compact
  def block(self, x: Array, deterministic: bool, drop_path_rate: Any) -> Array:
    ln = dict(epsilon=self.layer_norm_eps, dtype=self.dtype)
    x = layers.constrain(x, layers.BATCH_LENGTH_EMBED)
    y = layers.layer_norm('LayerNorm_0', **ln)(x)
    y = layers.MultiHeadAttention(num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate,
                                  dtype=self.dtype, attention_impl=self.attention_impl,
                                  name='MultiHeadDotProductAttention_0')(
                                      y, deterministic=deterministic)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
    x = x + layers.DropPath(drop_path_rate)(y, deterministic=deterministic)
    y = layers.layer_norm('LayerNorm_1', **ln)(x)
    y = layers.MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                        gelu_approximate=self.gelu_approximate, dtype=self.dtype, name='MlpBlock_0')(
                            y, deterministic=deterministic)
    x = x + layers.DropPath(drop_path_rate)(y, deterministic=deterministic)
    return layers.constrain(x, layers.BATCH_LENGTH_EMBED)


class _ScannedEncoder1DBlock(Encoder1DBlock):
  """Encoder1DBlock as an nn.scan body: (carry, per-layer drop-path rate) -> (carry, None)."""

  def __call__(self, x: Array, deterministic: bool, drop_path_rate: Array) -> tuple[Array, None]:
    return self.block(x, deterministic, drop_path_rate), None


class Encoder(nn.Module):
  """Position embeddings, dropout, `num_layers` blocks and the final `encoder_norm` (unless not `final_norm`)."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  posemb: str = 'learn'
  has_cls: bool = True
  posemb_resize: Optional[Callable[[Array, bool, tuple[int, int]], Array]] = None  # AddPositionEmbs.resize
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False
  scan_layers: bool = False
  attention_impl: str = 'einsum'
  final_norm: bool = True
  block_name: str = 'encoderblock'  # Blocks are `{block_name}_{i}` (MAE's decoder: 'decoderblock').

  @nn.compact
  def __call__(self, x: Array, *, grid: tuple[int, int], train: bool = False, intermediates: bool = False):
    """The final-normed sequence; with `intermediates`, also the list of every block's (un-normed) output."""
    x = AddPositionEmbs(posemb=self.posemb, has_cls=self.has_cls, resize=self.posemb_resize,
                        name='posembed_input')(x, grid=grid)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    dpr = np.linspace(0.0, self.drop_path_rate, self.num_layers)  # Stochastic depth grows with depth.
    block = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
                 attention_dropout_rate=self.attention_dropout_rate, gelu_approximate=self.gelu_approximate,
                 layer_norm_eps=self.layer_norm_eps, dtype=self.dtype, attention_impl=self.attention_impl)
    outs = []
    if self.scan_layers:  # One compiled block; params stacked on a leading 'layers' axis (big_vision layout).
      if intermediates:
        raise ValueError('Per-block intermediates need scan_layers=False (scanned blocks run as one op).')
      scanned = nn.scan(layers.remat(_ScannedEncoder1DBlock, self.remat, static_argnums=(2,)),
                        variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                        in_axes=(nn.broadcast, 0), length=self.num_layers,
                        metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = scanned(name=self.block_name, **block)(x, not train, jnp.asarray(dpr, jnp.float32))
    else:
      block_cls = layers.remat(Encoder1DBlock, self.remat, static_argnums=(2,))
      for i in range(self.num_layers):
        x = block_cls(drop_path_rate=float(dpr[i]), name=f'{self.block_name}_{i}', **block)(x, not train)
        outs.append(x)
    if self.final_norm:
      x = layers.layer_norm('encoder_norm', epsilon=self.layer_norm_eps, dtype=self.dtype)(x)
    return (x, outs) if intermediates else x


CLASSIFIERS = ('token', 'gap', 'map', 'gap_fc_norm')


class VisionTransformer(nn.Module):
  """ViT classifier. Images are NHWC floats; logits come back as float32 whatever `dtype` is.

  classifier: 'token' (class token), 'gap' (mean over patch tokens) or 'map' (attention pooling, `MAPHead_0`);
    'gap_fc_norm' is MAE's fine-tuning head (timm global_pool='avg', fc_norm=True): the sequence keeps the class
    token but has no final `encoder_norm`; the mean over the patch tokens goes through the LayerNorm `fc_norm`, and
    the head starts from trunc-normal(2e-5) as in the official MAE fine-tuning.
  num_classes == 0 drops the head; the outputs are then the pooled (pre-logits) features.
  Hybrids (R+ViT): `resnet` = units per BiT ResNet stage (() = root only, None = no stem) and `resnet_width`
  = its width factor (root width 64 * resnet_width); the patch embedding then runs on the stem's feature map.
  The stem's parameters (`conv_root`, `gn_root`, `block{i}/unit{j}/...`) sit at the top level, as officially.
  """
  num_classes: int
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  classifier: str = 'token'
  representation_size: Optional[int] = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  posemb: str = 'learn'
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False  # False/'none', True/'full', or a jax.checkpoint_policies name (layers.remat).
  scan_layers: bool = False  # nn.scan over the encoder blocks: params `Transformer/encoderblock/*` (stacked).
  resnet: Optional[tuple[int, ...]] = None
  resnet_width: float = 1
  resnet_norm_style: str = 'official'  # 'timm': timm's ResNetV2 eps (resnet_stem.NORM_STYLES), for timm parity.
  attention_impl: str = 'einsum'  # Attention kernel: 'einsum' | 'xla' | 'cudnn' (vit_jax.models.attention).
  num_distill_tokens: ClassVar[int] = 0  # Tokens between the class token and the patches (DeiT: 1).
  # Fits the learned posemb to another patch grid (AddPositionEmbs.resize); None: the grid must match.
  posemb_resize: Optional[Callable[[Array, bool, tuple[int, int]], Array]] = None
  # BatchNorm without affine parameters between the pooled features and the head (MAE's linear probe:
  # BatchNorm1d(affine=False, eps=1e-6)); its statistics live in the `batch_stats` collection.
  head_batchnorm: bool = False

  def setup(self):
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'Unknown classifier {self.classifier!r}; expected one of {CLASSIFIERS}.')
    if self.resnet is not None:
      self.stem = resnet_stem.ResNetStem(num_layers=tuple(self.resnet), width_factor=self.resnet_width,
                                         norm_style=self.resnet_norm_style, dtype=self.dtype)
      nn.share_scope(self, self.stem)  # Official names: conv_root, gn_root, block1/... at the top level.
    p = self.patch_size
    self.embedding = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                             param_dtype=jnp.float32, name='embedding',
                             kernel_init=layers.logical(nn.initializers.lecun_normal(), (None, None, None, 'embed')),
                             bias_init=layers.logical(nn.initializers.zeros, ('embed',)))
    if self.has_class_token:
      self.cls = self.param('cls', layers.logical(nn.initializers.zeros, (None, None, 'embed')),
                            (1, 1, self.hidden_size), jnp.float32)
    self.encoder = Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        drop_path_rate=self.drop_path_rate, posemb=self.posemb, has_cls=self.has_class_token,
        posemb_resize=self.posemb_resize, gelu_approximate=self.gelu_approximate,
        layer_norm_eps=self.layer_norm_eps, dtype=self.dtype, remat=self.remat, scan_layers=self.scan_layers,
        attention_impl=self.attention_impl, final_norm=self.classifier != 'gap_fc_norm', name='Transformer')
    if self.classifier == 'gap_fc_norm':
      self.fc_norm = layers.layer_norm('fc_norm', epsilon=self.layer_norm_eps, dtype=self.dtype)
    if self.classifier == 'map':
      self.map_head = layers.MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                                     gelu_approximate=self.gelu_approximate,
                                     layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                                     attention_impl=self.attention_impl, name='MAPHead_0')
    if self.representation_size:
      self.pre_logits_dense = nn.Dense(
          self.representation_size, dtype=self.dtype, param_dtype=jnp.float32, name='pre_logits',
          kernel_init=layers.logical(nn.initializers.lecun_normal(), ('embed', 'mlp')),
          bias_init=layers.logical(nn.initializers.zeros, ('mlp',)))
    if self.head_batchnorm:
      self.head_norm = nn.BatchNorm(momentum=0.9, epsilon=1e-6, use_scale=False, use_bias=False, axis_name=None,
                                    dtype=jnp.float32, name='head_norm')
    if self.num_classes:
      head_init = nn.initializers.truncated_normal(2e-5) if self.classifier == 'gap_fc_norm' else nn.initializers.zeros
      self.head = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=layers.logical(head_init, ('embed', 'classes')),
                           bias_init=layers.logical(nn.initializers.zeros, ('classes',)), name='head')

  @property
  def num_features(self) -> int:
    """Width of the pooled pre-logits features."""
    return self.representation_size or self.hidden_size

  @property
  def has_class_token(self) -> bool:
    """Whether the sequence starts with the class token `cls` (read by 'token'; kept by MAE's 'gap_fc_norm')."""
    return self.classifier in ('token', 'gap_fc_norm')

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch tokens in the sequence (the class token)."""
    return int(self.has_class_token)

  def _tokens(self, images: Array) -> tuple[Array, tuple[int, int]]:
    """Embedded sequence (B, prefix + h*w, hidden_size) before the encoder, and the patch grid (h, w)."""
    b, h, w, _ = images.shape
    p = self.patch_size
    x = images.astype(self.dtype)
    if self.resnet is not None:
      step = p * self.stem.stride
      if h % step or w % step:
        raise ValueError(f'Image size {h}x{w} is not divisible by {step} (ResNet stem stride {self.stem.stride} '
                         f'x patch_size={p}). Resize or crop the images to a multiple of {step} '
                         f'(e.g. {h - h % step or step}x{w - w % step or step}).')
      x = self.stem(x)
    elif h % p or w % p:
      raise ValueError(f'Image size {h}x{w} is not divisible by patch_size={p}. Resize or crop the images to a '
                       f'multiple of {p} (e.g. {h - h % p or p}x{w - w % p or p}) or pick a model with a '
                       'patch size that divides the image size.')
    x = self.embedding(x)
    _, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    if self.has_class_token:
      cls = jnp.broadcast_to(self.cls.astype(x.dtype), (b, 1, d))
      x = jnp.concatenate([cls, x], axis=1)
    return x, (gh, gw)

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """Final-normed, unpooled token sequence (B, num_prefix_tokens + h*w, hidden_size); un-normed with
    classifier='gap_fc_norm', whose norm comes after the pooling."""
    x, grid = self._tokens(images)
    return self.encoder(x, grid=grid, train=train)

  def forward_intermediates(self, images: Array, *, train: bool = False, norm: bool = False) -> list[Array]:
    """Every block's patch tokens as an NHWC map (B, h, w, hidden_size), prefix tokens dropped.

    ViT is isotropic: all maps share one stride, patch_size (times the stem's stride for hybrids), unlike the
    4/8/16/32 pyramid of the hierarchical families. norm=True applies the final norm to the last map.
    """
    x, (gh, gw) = self._tokens(images)
    normed, outs = self.encoder(x, grid=(gh, gw), train=train, intermediates=True)
    if norm:
      outs[-1] = normed
    n = self.num_prefix_tokens
    return [o[:, n:].reshape(o.shape[0], gh, gw, o.shape[-1]) for o in outs]

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False) -> Array:
    """Pools `forward_features` output; returns the pre-logits (B, num_features) or the float32 logits.

    `train` switches `head_batchnorm` to batch statistics (the head has no dropout).
    """
    if self.classifier == 'token':
      x = features[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(features, axis=1)
    elif self.classifier == 'gap_fc_norm':
      x = self.fc_norm(jnp.mean(features[:, self.num_prefix_tokens:], axis=1))
    else:
      x = self.map_head(features)
    if self.representation_size:
      x = jnp.tanh(self.pre_logits_dense(x))
    if pre_logits or not self.num_classes:
      return x
    if self.head_batchnorm:
      x = self.head_norm(x.astype(jnp.float32), use_running_average=not train)
    return self.head(x).astype(jnp.float32)

  def __call__(self, images: Array, *, train: bool = False) -> Array:
    """Logits (B, num_classes) for NHWC `images` (pooled features when num_classes == 0)."""
    return self.forward_head(self.forward_features(images, train=train), train=train)


# --- Registered variants. Counts: official vision_transformer tests (224 px, 1000 classes, token, no rep).
_TIMM = 'vit_{}_patch{}_224.{}'
_OFFICIAL = [
    # name, variant, num_params, timm_name
    ('vit_ti16', 'Ti/16', 5_717_416, _TIMM.format('tiny', 16, 'augreg_in21k_ft_in1k')),
    ('vit_s16', 'S/16', 22_050_664, _TIMM.format('small', 16, 'augreg_in21k_ft_in1k')),
    ('vit_s32', 'S/32', 22_878_952, _TIMM.format('small', 32, 'augreg_in21k_ft_in1k')),
    ('vit_b8', 'B/8', 86_576_872, _TIMM.format('base', 8, 'augreg_in21k_ft_in1k')),
    ('vit_b16', 'B/16', 86_567_656, _TIMM.format('base', 16, 'augreg_in21k_ft_in1k')),
    ('vit_b32', 'B/32', 88_224_232, _TIMM.format('base', 32, 'augreg_in21k_ft_in1k')),
    ('vit_l16', 'L/16', 304_326_632, _TIMM.format('large', 16, 'augreg_in21k_ft_in1k')),
    ('vit_l32', 'L/32', 306_535_400, _TIMM.format('large', 32, 'orig_in21k')),
    ('vit_h14', 'H/14', 632_045_800, _TIMM.format('huge', 14, 'orig_in21k')),
]
for _name, _variant, _count, _timm in _OFFICIAL:
  registry.register_model(_name, VisionTransformer, family='vit', image_size=224, num_params=_count,
                          timm_name=_timm, classifier='token', **parse_variant(_variant))

# Hybrids (official `resnet` configs): BiT ResNet stem, then the ViT on its feature map.
_HYBRIDS = [
    # name, variant, patch on the stem's map, resnet units per stage, num_params, timm_name
    ('r_vit_ti16', 'Ti', 8, (), 6_337_704, 'vit_tiny_r_s16_p8_224.augreg_in21k_ft_in1k'),
    ('r26_vit_s32', 'S', 1, (2, 2, 2, 2), 36_431_912, 'vit_small_r26_s32_224.augreg_in21k_ft_in1k'),
    ('r26_vit_b32', 'B', 1, (2, 2, 2, 2), 101_383_976, 'vit_base_r26_s32_224'),  # timm has no weights for it.
    ('r50_vit_b16', 'B', 1, (3, 4, 9), 98_659_112, 'vit_base_r50_s16_224.orig_in21k'),
    ('r50_vit_l32', 'L', 1, (3, 4, 6, 3), 328_994_856, 'vit_large_r50_s32_224.augreg_in21k_ft_in1k'),
]
for _name, _variant, _patch, _units, _count, _timm in _HYBRIDS:
  registry.register_model(_name, VisionTransformer, family='vit', image_size=224, num_params=_count,
                          timm_name=_timm, classifier='token', patch_size=_patch, resnet=_units, resnet_width=1,
                          **parse_variant(_variant))

# Tiny model for the 8x8 digits default config and for tests.
registry.register_model('vit_pico', VisionTransformer, family='vit', image_size=8, num_params=None,
                        patch_size=2, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128, classifier='token')


# --- Family facts (vit_jax/models/facts.py): conversion from timm, layer grouping, FLOPs, resizing. --------------

POSEMB_PATH = 'Transformer/posembed_input/pos_embedding'


def _one_based(fmt: str, count: int = 2) -> Callable[[re.Match], str]:
  """Path builder for timm's 0-based indices that our names count from 1: the first `count` groups get + 1."""
  def expand(m):
    return fmt.format(*[int(g) + 1 if i < count else g for i, g in enumerate(m.groups())])
  return expand


_B = r'blocks\.(\d+)\.'
_RB = r'patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.'
_VB = r'Transformer/encoderblock_\1/'
# timm VisionTransformer; hybrids (timm HybridEmbed over a ResNetV2 stem) map onto our BiT stem names, which sit at
# the top level and count from 1.
TIMM_RULES: tuple[facts.Rule, ...] = (
    (r'cls_token', 'cls', 'raw'),
    (r'pos_embed', POSEMB_PATH, 'raw'),
    (r'patch_embed\.proj', 'embedding', 'conv'),
    (_B + r'norm1', _VB + 'LayerNorm_0', 'norm'),
    (_B + r'attn\.qkv', _VB + 'MultiHeadDotProductAttention_0', 'qkv'),
    (_B + r'attn\.proj', _VB + 'MultiHeadDotProductAttention_0/out', 'mha_out'),
    (_B + r'norm2', _VB + 'LayerNorm_1', 'norm'),
    (_B + r'mlp\.fc1', _VB + 'MlpBlock_0/Dense_0', 'linear'),
    (_B + r'mlp\.fc2', _VB + 'MlpBlock_0/Dense_1', 'linear'),
    (r'norm', 'Transformer/encoder_norm', 'norm'),
    (r'fc_norm', 'fc_norm', 'norm'),  # timm global_pool='avg', fc_norm=True: our classifier='gap_fc_norm'.
    (r'head', 'head', 'linear'),
    (r'patch_embed\.backbone\.(?:stem\.)?conv', 'conv_root', 'conv'),
    (r'patch_embed\.backbone\.(?:stem\.)?norm', 'gn_root', 'norm'),
    (_RB + r'conv([123])', _one_based('block{}/unit{}/conv{}'), 'conv'),
    (_RB + r'norm([123])', _one_based('block{}/unit{}/gn{}'), 'norm'),
    (_RB + r'downsample\.conv', _one_based('block{}/unit{}/conv_proj'), 'conv'),
    (_RB + r'downsample\.norm', _one_based('block{}/unit{}/gn_proj'), 'norm'),
)

GROUPING = facts.LayerGrouping(
    blocks=((r'^Transformer/encoderblock_(\d+)/', 'block1'),),
    stem=r'^(embedding|cls|dist|Transformer/posembed_input|conv_root|gn_root|block\d+/unit\d+)(/|$)')


def vit_forward_macs(*, image_size: int, patch_size: int, hidden_size: int, num_layers: int, mlp_dim: int,
                     num_classes: int = 1000, has_cls: bool = True, extra_tokens: Optional[int] = None,
                     heads: int = 1) -> float:
  """Multiply-adds of one ViT forward pass on one image: patch embedding, encoder blocks and `heads` heads.

  Per block: 4*N*D^2 (qkv and output projections) + 2*N*D*M (MLP) + 2*N^2*D (scores and weighted sum), with
  N = patches + extra tokens (class; class + distillation for DeiT: `extra_tokens`, which overrides `has_cls`).
  """
  if image_size % patch_size:
    raise ValueError(f'image_size={image_size} is not divisible by patch_size={patch_size}.')
  patches = (image_size // patch_size) ** 2
  n, d = patches + (int(has_cls) if extra_tokens is None else extra_tokens), hidden_size
  embed = patches * patch_size * patch_size * 3 * d
  block = 4 * n * d * d + 2 * n * d * mlp_dim + 2 * n * n * d
  return float(embed + num_layers * block + heads * d * num_classes)


def num_prefix_tokens(model: VisionTransformer) -> int:
  """Tokens before the patches: the class token, and DeiT's distillation token (`num_distill_tokens`)."""
  return int(model.has_class_token) + model.num_distill_tokens


def forward_macs(model: Any, image_size: int) -> Optional[float]:
  """Analytic MACs of a plain ViT/DeiT (no ResNet stem, no representation layer, no MAP head), else None (also
  for subclasses that take another input than one image, e.g. the frame-averaged video baseline)."""
  if not isinstance(model, VisionTransformer) or model.resnet is not None or model.representation_size or (
      model.classifier not in ('token', 'gap', 'gap_fc_norm')) or callable(getattr(model, 'input_shape', None)):
    return None
  distill = model.num_distill_tokens
  return vit_forward_macs(image_size=image_size, patch_size=model.patch_size, hidden_size=model.hidden_size,
                          num_layers=model.num_layers, mlp_dim=model.mlp_dim, extra_tokens=num_prefix_tokens(model),
                          heads=1 + distill, num_classes=model.num_classes)


def _prefix_from_sizes(old_tokens: int, new_tokens: int) -> Optional[int]:
  """The prefix-token count (0 to 2) that leaves square patch grids on both sides, if exactly one does."""
  def square(n):
    return n > 0 and int(round(math.sqrt(n))) ** 2 == n
  fits = [p for p in range(3) if square(old_tokens - p) and square(new_tokens - p)]
  return fits[0] if len(fits) == 1 else None


def resize_pos_embedding(path: str, value: np.ndarray, shape: tuple, context: facts.ResizeContext
                         ) -> Optional[np.ndarray]:
  """The learned position embedding resized to the model's patch grid (prefix-token rows kept as they are)."""
  if path != POSEMB_PATH or value.ndim != 3 or len(shape) != 3 or value.shape[2] != shape[2]:
    return None
  if context.model is not None:
    prefix = num_prefix_tokens(context.model)
  else:
    prefix = _prefix_from_sizes(value.shape[1], shape[1])
    if prefix is None:
      return None  # Reported as a shape mismatch.
  return resize.resize_posemb(value, shape[1], num_prefix_tokens=prefix, method=context.method)


def infer_image_size(state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]) -> Optional[int]:
  """The input size a timm ViT/DeiT/hybrid checkpoint was built for, from its pos_embed rows."""
  if 'pos_embed' not in state_dict:
    return None
  tokens = state_dict['pos_embed'].shape[1] - sum(k in state_dict for k in ('cls_token', 'dist_token'))
  stride = options.get('patch_size', 16)
  if options.get('resnet') is not None:  # Hybrids: the patches are cut from the stem's feature map.
    stride *= 4 * 2 ** max(len(options['resnet']) - 1, 0)
  grid = int(round(math.sqrt(tokens)))
  return grid * stride if tokens > 0 and grid * grid == tokens else None


def timm_numerics(options: Mapping[str, Any]) -> dict[str, Any]:
  """timm's ViT uses exact GELU; its ResNetV2 stem standardises the weights its own way (hybrids)."""
  out: dict[str, Any] = {'gelu_approximate': False}
  if options.get('resnet') is not None:
    out['resnet_norm_style'] = 'timm'
  return out


FACTS = facts.register_family(facts.FamilyFacts(
    name='vit', layouts={'timm': facts.ConversionTable(TIMM_RULES)}, grouping=GROUPING, forward_macs=forward_macs,
    resize=resize_pos_embedding, infer_image_size=infer_image_size, timm_numerics=timm_numerics))
