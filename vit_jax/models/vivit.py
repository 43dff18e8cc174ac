"""ViViT (Arnab et al. 2021, "ViViT: A Video Vision Transformer"; scenic projects/vivit): video as tubelets.

Input: NTHWC float videos (B, frames, H, W, 3). The tubelet embedding is a 3-D convolution `embedding` with kernel
(tubelet_size, patch_size, patch_size, 3, D) and the same stride, giving T' = frames / tubelet_size token maps of
(H / p) x (W / p). Three of the paper's models:

- 'st', model 1 (spatio-temporal attention): one ViT over [cls, all T' x h x w tokens] (ordered t, h, w), class
  token classifier. Parameter names are the ViT's (`cls`, `Transformer/...`, `head`), so Hugging Face's
  VivitForVideoClassification (the same model) converts with layout 'hf'.
- 'fe', model 2 (factorised encoder): a spatial ViT (`Transformer`, with its own class token `cls`) runs on each
  tubelet slice; the T' class-token outputs, after `temporal_cls`, go through a temporal ViT
  (`TemporalTransformer`, `temporal_layers` blocks); its class token is classified.
- 'fsa', model 3 (factorised self-attention): each block attends over time (per patch: `TemporalLayerNorm`,
  `TemporalAttention`) and then over space (per tubelet slice: `LayerNorm_0`, `MultiHeadDotProductAttention_0`),
  then the MLP; no class token: the head reads the mean token ('gap', as scenic's model 3).

Starting from an image ViT/DeiT checkpoint (`adapt_from_image`, the family's `adapt_checkpoint` fact): the 2-D patch
kernel is inflated to the tubelet ('central_frame': at t = tubelet_size // 2, zeros elsewhere; 'average': tiled and
divided by tubelet_size: the model's `image_init`), the position embedding is fitted to the frame's patch grid and
tiled over time ('st', 'fsa'); the factorised encoder's temporal transformer keeps its initialisation, and model 3's
temporal attention starts as a copy of the spatial one with a zero output projection (so each block starts as the
image block).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import facts
from vit_jax.models import hf_rules
from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models import resize
from vit_jax.models import vit

Array = jax.Array

VARIANTS = ('st', 'fe', 'fsa')
IMAGE_INITS = ('central_frame', 'average')
POSEMB_PATH = vit.POSEMB_PATH


class FactorisedSelfAttentionBlock(nn.Module):
  """ViViT model 3 block on (B, T', N, D): x + attn_t(LN_t(x)) over time per patch, then x + attn_s(LN(x)) over
  space per slice, then x + MLP(LN(x)); stochastic depth on each branch."""
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    b, t, n, d = x.shape
    ln = dict(epsilon=self.layer_norm_eps, dtype=self.dtype)
    attn = dict(num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
                attention_impl=self.attention_impl)
    drop = lambda y: layers.DropPath(self.drop_path_rate)(
        nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic), deterministic=deterministic)
    xt = x.transpose(0, 2, 1, 3).reshape(b * n, t, d)
    y = layers.MultiHeadAttention(name='TemporalAttention', **attn)(
        layers.layer_norm('TemporalLayerNorm', **ln)(xt), deterministic=deterministic)
    x = x + drop(y.reshape(b, n, t, d).transpose(0, 2, 1, 3))
    xs = x.reshape(b * t, n, d)
    y = layers.MultiHeadAttention(name='MultiHeadDotProductAttention_0', **attn)(
        layers.layer_norm('LayerNorm_0', **ln)(xs), deterministic=deterministic)
    x = x + drop(y.reshape(b, t, n, d))
    y = layers.MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate, gelu_approximate=self.gelu_approximate,
                        dtype=self.dtype, name='MlpBlock_0')(layers.layer_norm('LayerNorm_1', **ln)(x),
                                                             deterministic=deterministic)
    return x + layers.DropPath(self.drop_path_rate)(y, deterministic=deterministic)


class ViViT(nn.Module):
  """ViViT video classifier (module docstring). Videos are NTHWC floats; logits come back as float32."""
  num_classes: int
  variant: str = 'st'  # 'st' (model 1), 'fe' (model 2), 'fsa' (model 3).
  num_frames: int = 32
  tubelet_size: int = 2
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  temporal_layers: int = 4  # 'fe': blocks of the temporal transformer.
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  gelu_approximate: bool = True  # scenic (nn.gelu) and transformers' 'gelu_fast' are the tanh form.
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False
  attention_impl: str = 'einsum'
  image_init: str = 'central_frame'  # How an image checkpoint's patch kernel fills the tubelet (IMAGE_INITS).

  def input_shape(self, image_size: int) -> tuple[int, ...]:
    """One example's shape at frame size `image_size`: (num_frames, image_size, image_size, 3)."""
    return (self.num_frames, image_size, image_size, 3)

  @property
  def num_features(self) -> int:
    return self.hidden_size

  def _check(self, video: Array) -> None:
    if self.variant not in VARIANTS:
      raise ValueError(f'Unknown ViViT variant {self.variant!r}; expected one of {VARIANTS}.')
    if self.image_init not in IMAGE_INITS:
      raise ValueError(f'Unknown image_init {self.image_init!r}; expected one of {IMAGE_INITS}.')
    if video.ndim != 5:
      raise ValueError(f'ViViT takes NTHWC videos (batch, frames, height, width, channels), got shape '
                       f'{video.shape}. Use a video dataset (config.dataset.video) or add a time axis.')
    _, t, h, w, _ = video.shape
    if t != self.num_frames or t % self.tubelet_size:
      raise ValueError(f'The model was built for num_frames={self.num_frames} (a multiple of tubelet_size='
                       f'{self.tubelet_size}); got clips of {t} frames. Set config.model.num_frames to the clip '
                       'length (config.dataset.video.num_frames).')
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f'Frame size {h}x{w} is not divisible by patch_size={self.patch_size}.')

  def _encoder(self, name: str, num_layers: int, has_cls: bool) -> vit.Encoder:
    return vit.Encoder(num_layers=num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                       dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
                       drop_path_rate=self.drop_path_rate, has_cls=has_cls, gelu_approximate=self.gelu_approximate,
                       layer_norm_eps=self.layer_norm_eps, dtype=self.dtype, remat=self.remat,
                       attention_impl=self.attention_impl, name=name)

  def _cls(self, name: str, batch: int, dtype: Any) -> Array:
    cls = self.param(name, layers.logical(nn.initializers.zeros, (None, None, 'embed')), (1, 1, self.hidden_size),
                     jnp.float32)
    return jnp.broadcast_to(cls.astype(dtype), (batch, 1, self.hidden_size))

  def _features(self, video: Array, train: bool) -> Array:
    """The pooled, final-normed features (B, hidden_size) before the head (called from `__call__`)."""
    self._check(video)
    t, p, d = self.tubelet_size, self.patch_size, self.hidden_size
    x = nn.Conv(d, (t, p, p), strides=(t, p, p), padding='VALID', dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=layers.logical(nn.initializers.lecun_normal(), (None, None, None, None, 'embed')),
                bias_init=layers.logical(nn.initializers.zeros, ('embed',)), name='embedding')(
                    video.astype(self.dtype))
    b, nt, gh, gw, _ = x.shape
    if self.variant == 'st':
      x = jnp.concatenate([self._cls('cls', b, x.dtype), x.reshape(b, nt * gh * gw, d)], axis=1)
      return self._encoder('Transformer', self.num_layers, True)(x, grid=(nt * gh, gw), train=train)[:, 0]
    if self.variant == 'fe':
      x = x.reshape(b * nt, gh * gw, d)
      x = jnp.concatenate([self._cls('cls', b * nt, x.dtype), x], axis=1)
      x = self._encoder('Transformer', self.num_layers, True)(x, grid=(gh, gw), train=train)[:, 0]
      x = jnp.concatenate([self._cls('temporal_cls', b, x.dtype), x.reshape(b, nt, d)], axis=1)
      return self._encoder('TemporalTransformer', self.temporal_layers, True)(x, grid=(nt, 1), train=train)[:, 0]
    # 'fsa': position embedding over all tokens, factorised blocks, mean token.
    pe = self.param('pos_embedding', layers.logical(nn.initializers.normal(stddev=0.02), (None, None, 'embed')),
                    (1, nt * gh * gw, d), jnp.float32)
    x = x.reshape(b, nt, gh * gw, d) + pe.reshape(1, nt, gh * gw, d).astype(x.dtype)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    block = layers.remat(FactorisedSelfAttentionBlock, self.remat, static_argnums=(2,))
    dpr = np.linspace(0.0, self.drop_path_rate, self.num_layers)
    for i in range(self.num_layers):
      x = block(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate, drop_path_rate=float(dpr[i]),
                gelu_approximate=self.gelu_approximate, layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                attention_impl=self.attention_impl, name=f'encoderblock_{i}')(x, not train)
    x = layers.layer_norm('encoder_norm', epsilon=self.layer_norm_eps, dtype=self.dtype)(x)
    return jnp.mean(x, axis=(1, 2))

  @nn.compact
  def __call__(self, video: Array, *, train: bool = False) -> Array:
    """Logits (B, num_classes) for NTHWC `video` (pooled features when num_classes == 0)."""
    x = self._features(video, train)
    if not self.num_classes:
      return x
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=layers.logical(nn.initializers.zeros, ('embed', 'classes')),
                    bias_init=layers.logical(nn.initializers.zeros, ('classes',)), name='head')(x).astype(jnp.float32)


# --- Registered variants: base, 16x16 patches, tubelet 2, 32 frames at 224 px (Kinetics). Model 1's count is
# transformers' VivitForVideoClassification(VivitConfig(num_labels=1000)); models 2 and 3 (not in transformers)
# are counted from scenic's layout: model 2 = embedding 1,180,416 + cls 768 + spatial posemb 197*768 + 12 blocks
# of 7,087,872 + norm 1,536 + temporal cls 768 + posemb 17*768 + 4 blocks + norm 1,536 + head 769,000; model 3 =
# embedding + posemb 3136*768 + 12 blocks of 7,087,872 + 1,536 + 2,362,368 (temporal LN, attention) + norm + head.
_B = dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, patch_size=16, tubelet_size=2, num_frames=32)
registry.register_model('vivit_b16x2_st', ViViT, family='vivit', image_size=224, num_params=89_415_400,
                        variant='st', **_B)
registry.register_model('vivit_b16x2_fe', ViViT, family='vivit', image_size=224, num_params=115_524_328,
                        variant='fe', temporal_layers=4, **_B)
registry.register_model('vivit_b16x2_fsa', ViViT, family='vivit', image_size=224, num_params=117_780_712,
                        variant='fsa', **_B)
# Tiny model for the moving-digits config and tests: 16 px frames, 4x4 patches, 8 frames, tubelet 2.
registry.register_model('vivit_pico', ViViT, family='vivit', image_size=16, num_params=None, variant='st',
                        hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128, patch_size=4, tubelet_size=2,
                        num_frames=8)


# --- Family facts: Hugging Face layout (model 1), layer grouping, starting from image checkpoints. -------------

_L = r'vivit\.layers\.(\d+)\.'
_VB = r'Transformer/encoderblock_\1/'
_MHA = _VB + 'MultiHeadDotProductAttention_0/'
HF_RULES: tuple[facts.Rule, ...] = (
    (r'vivit\.embeddings\.cls_token', 'cls', 'raw'),
    (r'vivit\.embeddings\.position_embeddings', POSEMB_PATH, 'raw'),
    (r'vivit\.embeddings\.patch_embeddings\.projection\.(weight|bias)', 'embedding', hf_rules.conv3d),
    (_L + r'attention\.q_proj\.(weight|bias)', _MHA + 'query', hf_rules.head_projection),
    (_L + r'attention\.k_proj\.(weight|bias)', _MHA + 'key', hf_rules.head_projection),
    (_L + r'attention\.v_proj\.(weight|bias)', _MHA + 'value', hf_rules.head_projection),
    (_L + r'attention\.o_proj\.(weight|bias)', _MHA + 'out', hf_rules.head_projection),
    (_L + r'layernorm_before', _VB + 'LayerNorm_0', 'norm'),
    (_L + r'layernorm_after', _VB + 'LayerNorm_1', 'norm'),
    (_L + r'mlp\.fc1', _VB + 'MlpBlock_0/Dense_0', 'linear'),
    (_L + r'mlp\.fc2', _VB + 'MlpBlock_0/Dense_1', 'linear'),
    (r'vivit\.layernorm', 'Transformer/encoder_norm', 'norm'),
    (r'classifier', 'head', 'linear'),
)

GROUPING = facts.LayerGrouping(
    blocks=((r'^Transformer/encoderblock_(\d+)/', 'block1'), (r'^encoderblock_(\d+)/', 'block1')),
    stem=r'^(embedding|cls|pos_embedding|Transformer/posembed_input)(/|$)')


def inflate_kernel(kernel: np.ndarray, tubelet: int, method: str) -> np.ndarray:
  """An image patch kernel (p, p, C, D) as a tubelet kernel (tubelet, p, p, C, D): 'central_frame' puts it at
  t = tubelet // 2 (zeros elsewhere), 'average' tiles it divided by tubelet; on a still clip both give the image
  embedding."""
  if method == 'central_frame':
    out = np.zeros((tubelet,) + kernel.shape, kernel.dtype)
    out[tubelet // 2] = kernel
    return out
  if method == 'average':
    return np.repeat(kernel[None], tubelet, axis=0) / tubelet
  raise ValueError(f'Unknown tubelet inflation {method!r}; expected one of {IMAGE_INITS}.')


def image_prefix_tokens(ckpt: Mapping[str, np.ndarray]) -> int:
  """Rows before the patches in an image checkpoint's position embedding: class, and DeiT's distillation token."""
  return int('cls' in ckpt) + int('dist' in ckpt)


def fit_image_posemb(value: np.ndarray, prefix: int, grid_tokens: int, method: str) -> np.ndarray:
  """The patch rows (1, grid_tokens, D) of an image posemb (1, prefix + g*g, D), resized to the frame's grid."""
  patches = value[:, prefix:]
  if patches.shape[1] != grid_tokens:
    patches = resize.resize_posemb(patches, grid_tokens, num_prefix_tokens=0, method=method)
  return patches


def adapt_from_image(ckpt: dict[str, np.ndarray], shapes: Mapping[str, Any], context: facts.ResizeContext
                     ) -> Optional[tuple[dict[str, np.ndarray], set[str]]]:
  """An image ViT/DeiT checkpoint (2-D `embedding/kernel`) refitted to a ViViT (module docstring); None for a
  checkpoint that already has a tubelet kernel."""
  kernel = ckpt.get('embedding/kernel')
  if kernel is None or kernel.ndim != 4 or len(shapes['embedding/kernel'].shape) != 5:
    return None
  model = context.model
  if not isinstance(model, ViViT):
    raise ValueError('Starting a ViViT from an image checkpoint needs the model (load_pretrained(..., model=...)) '
                     'to know its frames and grid.')
  out = dict(ckpt)
  prefix = image_prefix_tokens(ckpt)
  for key in ('dist', 'head_dist/kernel', 'head_dist/bias'):  # DeiT's distillation token and head.
    out.pop(key, None)
  out['embedding/kernel'] = inflate_kernel(kernel, model.tubelet_size, model.image_init)
  frames = model.num_frames // model.tubelet_size
  method = 'linear' if context.method is None else context.method
  keep: set[str] = set()
  if model.variant == 'st':
    want = shapes[POSEMB_PATH].shape[1] - 1
    patches = fit_image_posemb(ckpt[POSEMB_PATH], prefix, want // frames, method)
    out[POSEMB_PATH] = np.concatenate([ckpt[POSEMB_PATH][:, :1], np.tile(patches, (1, frames, 1))], axis=1)
  elif model.variant == 'fe':
    patches = fit_image_posemb(ckpt[POSEMB_PATH], prefix, shapes[POSEMB_PATH].shape[1] - 1, method)
    out[POSEMB_PATH] = np.concatenate([ckpt[POSEMB_PATH][:, :1], patches], axis=1)
    keep = {k for k in shapes if k.startswith('TemporalTransformer/') or k == 'temporal_cls'}
  else:  # 'fsa': no class token; blocks at the top level; temporal attention = spatial with a zero output.
    want = shapes['pos_embedding'].shape[1]
    out['pos_embedding'] = np.tile(fit_image_posemb(out.pop(POSEMB_PATH), prefix, want // frames, method),
                                   (1, frames, 1))
    out.pop('cls', None)
    for key in list(out):
      if key.startswith('Transformer/'):
        out[key[len('Transformer/'):]] = out.pop(key)
    for key in [k for k in out if k.startswith('encoderblock_')]:
      block, rest = key.split('/', 1)
      if rest.startswith('LayerNorm_0/'):
        out[f'{block}/TemporalLayerNorm/{rest.split("/", 1)[1]}'] = out[key]
      elif rest.startswith('MultiHeadDotProductAttention_0/'):
        sub = rest.split('/', 1)[1]
        value = np.zeros_like(out[key]) if sub.startswith('out/') else out[key]
        out[f'{block}/TemporalAttention/{sub}'] = value
  return out, keep


FACTS = facts.register_family(facts.FamilyFacts(
    name='vivit', layouts={'hf': facts.ConversionTable(HF_RULES, source_heads=('classifier',))}, grouping=GROUPING,
    adapt_checkpoint=adapt_from_image))
