"""TimeSformer (Bertasius et al. 2021, "Is Space-Time Attention All You Need for Video Understanding?"): divided
space-time attention.

Input: NTHWC float videos (B, T, H, W, 3). Each frame is cut into p x p patches by the 2-D `embedding` conv; the
class token `cls` and the spatial position embedding (`Transformer/posembed_input/pos_embedding`, 1 + h*w rows) are
the image ViT's, and `time_embedding` (1, T, D) is added to the patch tokens. Each block (divided attention):

1. temporal: each patch attends over its T frames (patch tokens only): x + temporal_fc(attn_t(LN_t(x)));
2. spatial: the class token is copied to every frame, each frame attends over [cls, its h*w patches]; the T class
   outputs are averaged back into one class token: x + attn_s(LN(x));
3. the MLP: x + MLP(LN(x)).

The final norm and the head read the class token. `temporal_fc` and `time_embedding` start at zero, so a fresh
model, or one started from an image checkpoint, computes the image ViT frame by frame (on a still clip, the image
ViT's logits). Tokens are kept as (B, h*w, T, D) (the reference's (h w t) order, time fastest).

Parameter names inside a block are the ViT's (`LayerNorm_0`, `MultiHeadDotProductAttention_0`, `LayerNorm_1`,
`MlpBlock_0`) plus `TemporalLayerNorm`, `TemporalAttention` and `temporal_fc`, so an image ViT/DeiT checkpoint
loads by name (`adapt_from_image`: temporal attention and its norm copied from the spatial ones, as the official
code does; `temporal_fc` and `time_embedding` zero). Hugging Face's TimesformerForVideoClassification converts with
layout 'hf'.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

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

POSEMB_PATH = vit.POSEMB_PATH


class DividedSpaceTimeBlock(nn.Module):
  """One TimeSformer block on (cls (B, 1, D), patches (B, N, T, D)) (module docstring)."""
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  gelu_approximate: bool = False
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, tokens: tuple[Array, Array], deterministic: bool = True) -> tuple[Array, Array]:
    cls, x = tokens
    b, n, t, d = x.shape
    ln = dict(epsilon=self.layer_norm_eps, dtype=self.dtype)
    attn = dict(num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
                attention_impl=self.attention_impl)
    drop_path = lambda y: layers.DropPath(self.drop_path_rate)(y, deterministic=deterministic)
    dropout = lambda y: nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)

    xt = x.reshape(b * n, t, d)
    y = layers.MultiHeadAttention(name='TemporalAttention', **attn)(
        layers.layer_norm('TemporalLayerNorm', **ln)(xt), deterministic=deterministic)
    y = nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32, name='temporal_fc',
                 kernel_init=layers.logical(nn.initializers.zeros, ('mlp', 'embed')),
                 bias_init=layers.logical(nn.initializers.zeros, ('embed',)))(dropout(y))
    x = x + drop_path(y.reshape(b, n, t, d))

    xs = x.transpose(0, 2, 1, 3).reshape(b * t, n, d)  # (B*T, N, D): each frame's patches.
    frame_cls = jnp.broadcast_to(cls[:, None], (b, t, 1, d)).reshape(b * t, 1, d)
    y = layers.MultiHeadAttention(name='MultiHeadDotProductAttention_0', **attn)(
        layers.layer_norm('LayerNorm_0', **ln)(jnp.concatenate([frame_cls, xs], axis=1)),
        deterministic=deterministic)
    y = drop_path(dropout(y)).reshape(b, t, 1 + n, d)
    cls = cls + jnp.mean(y[:, :, :1], axis=1)
    x = x + y[:, :, 1:].transpose(0, 2, 1, 3)

    mlp = layers.MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                          gelu_approximate=self.gelu_approximate, dtype=self.dtype, name='MlpBlock_0')
    norm = layers.layer_norm('LayerNorm_1', **ln)
    seq = jnp.concatenate([cls, x.reshape(b, n * t, d)], axis=1)
    seq = seq + drop_path(mlp(norm(seq), deterministic=deterministic))
    return seq[:, :1], seq[:, 1:].reshape(b, n, t, d)


class _PositionEmbedding(nn.Module):
  """The spatial table `pos_embedding` (1, 1 + N, D) under the ViT's name (`posembed_input`)."""
  width: int

  @nn.compact
  def __call__(self, rows: int) -> Array:
    return self.param('pos_embedding', layers.logical(nn.initializers.normal(stddev=0.02), (None, None, 'embed')),
                      (1, rows, self.width), jnp.float32)


class DividedSpaceTimeEncoder(nn.Module):
  """`Transformer`: position and time embeddings, the divided space-time blocks and the final norm; returns the
  normed class token (B, D)."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  gelu_approximate: bool = False
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, cls: Array, x: Array, *, train: bool) -> Array:
    """`cls` (1, 1, D) parameter, `x` (B, T, N, D) patch embeddings."""
    b, t, n, d = x.shape
    pe = _PositionEmbedding(d, name='posembed_input')(1 + n).astype(x.dtype)
    time = self.param('time_embedding', layers.logical(nn.initializers.zeros, (None, None, 'embed')), (1, t, d),
                      jnp.float32).astype(x.dtype)
    cls = jnp.broadcast_to(cls.astype(x.dtype) + pe[:, :1], (b, 1, d))
    x = (x + pe[:, None, 1:]).transpose(0, 2, 1, 3) + time[:, None]  # (B, N, T, D)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    block = layers.remat(DividedSpaceTimeBlock, self.remat, static_argnums=(2,))
    dpr = np.linspace(0.0, self.drop_path_rate, self.num_layers)
    tokens = (cls, x)
    for i in range(self.num_layers):
      tokens = block(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
                     attention_dropout_rate=self.attention_dropout_rate, drop_path_rate=float(dpr[i]),
                     gelu_approximate=self.gelu_approximate, layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                     attention_impl=self.attention_impl, name=f'encoderblock_{i}')(tokens, not train)
    return layers.layer_norm('encoder_norm', epsilon=self.layer_norm_eps, dtype=self.dtype)(tokens[0][:, 0])


class TimeSformer(nn.Module):
  """TimeSformer video classifier (module docstring). Videos are NTHWC floats; logits come back as float32."""
  num_classes: int
  num_frames: int = 8
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  gelu_approximate: bool = False  # timm's (and transformers') exact GELU.
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False
  attention_impl: str = 'einsum'

  def input_shape(self, image_size: int) -> tuple[int, ...]:
    """One example's shape at frame size `image_size`: (num_frames, image_size, image_size, 3)."""
    return (self.num_frames, image_size, image_size, 3)

  @property
  def num_features(self) -> int:
    return self.hidden_size

  @nn.compact
  def __call__(self, video: Array, *, train: bool = False) -> Array:
    """Logits (B, num_classes) for NTHWC `video` (pooled features when num_classes == 0)."""
    if video.ndim != 5:
      raise ValueError(f'TimeSformer takes NTHWC videos (batch, frames, height, width, channels), got shape '
                       f'{video.shape}.')
    b, t, h, w, _ = video.shape
    p, d = self.patch_size, self.hidden_size
    if t != self.num_frames:
      raise ValueError(f'The model was built for num_frames={self.num_frames}, got clips of {t} frames. Set '
                       'config.model.num_frames to the clip length (config.dataset.video.num_frames).')
    if h % p or w % p:
      raise ValueError(f'Frame size {h}x{w} is not divisible by patch_size={p}.')
    x = nn.Conv(d, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=layers.logical(nn.initializers.lecun_normal(), (None, None, None, 'embed')),
                bias_init=layers.logical(nn.initializers.zeros, ('embed',)), name='embedding')(
                    video.reshape(b * t, h, w, -1).astype(self.dtype))
    x = x.reshape(b, t, -1, d)
    cls = self.param('cls', layers.logical(nn.initializers.zeros, (None, None, 'embed')), (1, 1, d), jnp.float32)
    feats = DividedSpaceTimeEncoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate, drop_path_rate=self.drop_path_rate,
        gelu_approximate=self.gelu_approximate, layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
        remat=self.remat, attention_impl=self.attention_impl, name='Transformer')(cls, x, train=train)
    if not self.num_classes:
      return feats
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=layers.logical(nn.initializers.zeros, ('embed', 'classes')),
                    bias_init=layers.logical(nn.initializers.zeros, ('classes',)), name='head')(
                        feats).astype(jnp.float32)


# --- Registered variants. Count: transformers' TimesformerForVideoClassification(TimesformerConfig(num_labels=1000))
# (8 frames at 224 px, divided space-time attention).
registry.register_model('timesformer_b16', TimeSformer, family='timesformer', image_size=224,
                        num_params=122_027_752, num_frames=8, patch_size=16, hidden_size=768, num_layers=12,
                        num_heads=12, mlp_dim=3072)
# Tiny model for tests: 16 px frames, 4x4 patches, 8 frames.
registry.register_model('timesformer_pico', TimeSformer, family='timesformer', image_size=16, num_params=None,
                        num_frames=8, patch_size=4, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128)


# --- Family facts: Hugging Face layout, layer grouping, starting from image checkpoints. ------------------------

_L = r'timesformer\.encoder\.layer\.(\d+)\.'
_TB = r'Transformer/encoderblock_\1/'
HF_RULES: tuple[facts.Rule, ...] = (
    (r'timesformer\.embeddings\.cls_token', 'cls', 'raw'),
    (r'timesformer\.embeddings\.position_embeddings', POSEMB_PATH, 'raw'),
    (r'timesformer\.embeddings\.time_embeddings', 'Transformer/time_embedding', 'raw'),
    (r'timesformer\.embeddings\.patch_embeddings\.projection', 'embedding', 'conv'),
    (_L + r'attention\.attention\.qkv', _TB + 'MultiHeadDotProductAttention_0', 'qkv'),
    (_L + r'attention\.output\.dense', _TB + 'MultiHeadDotProductAttention_0/out', 'mha_out'),
    (_L + r'temporal_attention\.attention\.qkv', _TB + 'TemporalAttention', 'qkv'),
    (_L + r'temporal_attention\.output\.dense', _TB + 'TemporalAttention/out', 'mha_out'),
    (_L + r'temporal_layernorm', _TB + 'TemporalLayerNorm', 'norm'),
    (_L + r'temporal_dense', _TB + 'temporal_fc', 'linear'),
    (_L + r'layernorm_before', _TB + 'LayerNorm_0', 'norm'),
    (_L + r'layernorm_after', _TB + 'LayerNorm_1', 'norm'),
    (_L + r'intermediate\.dense', _TB + 'MlpBlock_0/Dense_0', 'linear'),
    (_L + r'output\.dense', _TB + 'MlpBlock_0/Dense_1', 'linear'),
    (r'timesformer\.layernorm', 'Transformer/encoder_norm', 'norm'),
    (r'classifier', 'head', 'linear'),
)

GROUPING = facts.LayerGrouping(blocks=((r'^Transformer/encoderblock_(\d+)/', 'block1'),),
                               stem=r'^(embedding|cls|Transformer/posembed_input|Transformer/time_embedding)(/|$)')


def adapt_from_image(ckpt: dict[str, np.ndarray], shapes: Mapping[str, Any], context: facts.ResizeContext
                     ) -> Optional[tuple[dict[str, np.ndarray], set[str]]]:
  """An image ViT/DeiT checkpoint (no `Transformer/time_embedding`) refitted to a TimeSformer (module docstring):
  spatial weights by name, temporal attention and norm copied from the spatial ones, `temporal_fc` and
  `time_embedding` zero, the position embedding fitted to the frame's grid; None for a TimeSformer checkpoint."""
  if 'Transformer/time_embedding' in ckpt or 'embedding/kernel' not in ckpt:
    return None
  out = {k: v for k, v in ckpt.items() if k not in ('dist', 'head_dist/kernel', 'head_dist/bias')}
  prefix = int('cls' in ckpt) + int('dist' in ckpt)
  want = shapes[POSEMB_PATH].shape[1]
  pe = ckpt[POSEMB_PATH]
  if pe.shape[1] != want or prefix != 1:
    method = context.method or 'linear'
    patches = pe[:, prefix:]
    if patches.shape[1] != want - 1:
      patches = resize.resize_posemb(patches, want - 1, num_prefix_tokens=0, method=method)
    out[POSEMB_PATH] = np.concatenate([pe[:, :1], patches], axis=1)
  out['Transformer/time_embedding'] = np.zeros(shapes['Transformer/time_embedding'].shape, np.float32)
  for key in [k for k in ckpt if k.startswith('Transformer/encoderblock_')]:
    block, part, rest = key.split('/', 3)[1], key.split('/', 3)[2], key.split('/', 3)[3:]
    tail = '/'.join(rest)
    if part == 'LayerNorm_0':
      out[f'Transformer/{block}/TemporalLayerNorm/{tail}'] = ckpt[key]
    elif part == 'MultiHeadDotProductAttention_0':
      out[f'Transformer/{block}/TemporalAttention/{tail}'] = ckpt[key]
  for key in [k for k in shapes if '/temporal_fc/' in k]:
    out[key] = np.zeros(shapes[key].shape, np.float32)
  return out, set()


FACTS = facts.register_family(facts.FamilyFacts(
    name='timesformer', layouts={'hf': facts.ConversionTable(HF_RULES, source_heads=('classifier',))},
    grouping=GROUPING, adapt_checkpoint=adapt_from_image))
