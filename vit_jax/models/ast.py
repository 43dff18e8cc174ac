"""AST (Gong et al. 2021, "AST: Audio Spectrogram Transformer"): a DeiT on log-mel spectrograms.

Input: float spectrograms (B, mel_bins, frames) or (B, mel_bins, frames, 1): frequency is the height, time the
width (128 x 1024 for AudioSet's 10 s clips). A 1-channel `embedding` conv cuts overlapping 16 x 16 patches with
strides (frequency_stride, time_stride) = (10, 10): 12 x 101 = 1212 patches, ordered frequency-major. Tokens are
[cls, dist, patches] plus a learned position embedding; after the encoder (`Transformer`, the ViT's) the class and
distillation outputs are averaged and classified by LayerNorm `head_norm` + Dense `head`.

From an image ViT/DeiT checkpoint (`adapt_from_image`, the family's `adapt_checkpoint` fact, as the AST code):
the RGB patch kernel summed over its channels (so a spectrogram sees what the image model saw on that spectrogram
repeated over three channels), the position grid cut around its middle rows to the frequency grid (or
interpolated when the grid is smaller) and bilinearly interpolated to the time grid (or cut when larger); DeiT's
two prefix rows kept (a ViT's class row serves both, and its class token initialises `dist`). Hugging Face's
ASTForAudioClassification converts with layout 'hf' (its LayerNorm eps is 1e-12: build with layer_norm_eps=1e-12
for its logits).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import facts
from vit_jax.models import hf_rules
from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models import vit

Array = jax.Array

POSEMB_PATH = vit.POSEMB_PATH


def grid_size(length: int, patch: int, stride: int) -> int:
  """Patches along an axis of `length` with `patch`-wide windows every `stride` (no padding)."""
  if length < patch:
    raise ValueError(f'A spectrogram axis of {length} is shorter than the patch size {patch}.')
  return (length - patch) // stride + 1


class AudioSpectrogramTransformer(nn.Module):
  """AST classifier (module docstring). Logits come back as float32."""
  num_classes: int
  time_frames: int = 1024  # Spectrogram width the model is built for (its height is the config's image_size).
  patch_size: int = 16
  frequency_stride: int = 10
  time_stride: int = 10
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  gelu_approximate: bool = False  # timm's DeiT (the AST code's backbone): exact GELU.
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False
  scan_layers: bool = False
  attention_impl: str = 'einsum'

  def input_shape(self, image_size: int) -> tuple[int, ...]:
    """One example's shape: (mel_bins = image_size, time_frames, 1)."""
    return (image_size, self.time_frames, 1)

  @property
  def num_features(self) -> int:
    return self.hidden_size

  @nn.compact
  def __call__(self, spectrogram: Array, *, train: bool = False) -> Array:
    """Logits (B, num_classes) for (B, mel_bins, frames[, 1]) spectrograms (pooled features if num_classes == 0)."""
    x = spectrogram
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4 or x.shape[-1] != 1:
      raise ValueError(f'AST takes spectrograms (batch, mel_bins, frames) or (batch, mel_bins, frames, 1), got '
                       f'shape {spectrogram.shape}. Use an audio dataset (config.dataset.audio).')
    if x.shape[2] != self.time_frames:
      raise ValueError(f'The model was built for time_frames={self.time_frames}, got spectrograms of {x.shape[2]} '
                       'frames. Set config.model.time_frames to the spectrogram length.')
    b, d, p = x.shape[0], self.hidden_size, self.patch_size
    grid = (grid_size(x.shape[1], p, self.frequency_stride), grid_size(x.shape[2], p, self.time_stride))
    x = nn.Conv(d, (p, p), strides=(self.frequency_stride, self.time_stride), padding='VALID', dtype=self.dtype,
                param_dtype=jnp.float32, name='embedding',
                kernel_init=layers.logical(nn.initializers.lecun_normal(), (None, None, None, 'embed')),
                bias_init=layers.logical(nn.initializers.zeros, ('embed',)))(x.astype(self.dtype))
    x = x.reshape(b, grid[0] * grid[1], d)
    token = lambda name: jnp.broadcast_to(self.param(
        name, layers.logical(nn.initializers.truncated_normal(0.02), (None, None, 'embed')), (1, 1, d),
        jnp.float32).astype(x.dtype), (b, 1, d))
    x = jnp.concatenate([token('cls'), token('dist'), x], axis=1)
    x = vit.Encoder(num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                    dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
                    drop_path_rate=self.drop_path_rate, gelu_approximate=self.gelu_approximate,
                    layer_norm_eps=self.layer_norm_eps, dtype=self.dtype, remat=self.remat,
                    scan_layers=self.scan_layers, attention_impl=self.attention_impl, name='Transformer')(
                        x, grid=grid, train=train)
    x = (x[:, 0] + x[:, 1]) / 2
    if not self.num_classes:
      return x
    x = layers.layer_norm('head_norm', epsilon=self.layer_norm_eps, dtype=self.dtype)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head',
                    kernel_init=layers.logical(nn.initializers.zeros, ('embed', 'classes')),
                    bias_init=layers.logical(nn.initializers.zeros, ('classes',)))(x).astype(jnp.float32)


# --- Registered variants. Count: transformers' ASTForAudioClassification(ASTConfig(num_labels=1000)) (128 mel x
# 1024 frames, 1212 patches + 2 tokens).
registry.register_model('ast_b16', AudioSpectrogramTransformer, family='ast', image_size=128,
                        num_params=86_957_800, time_frames=1024, patch_size=16, frequency_stride=10, time_stride=10,
                        hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072)
# Tiny model for the synthetic-audio config and tests: 32 mel bins x 64 frames, 8x8 patches, stride 8 (4 x 8 grid).
registry.register_model('ast_pico', AudioSpectrogramTransformer, family='ast', image_size=32, num_params=None,
                        time_frames=64, patch_size=8, frequency_stride=8, time_stride=8, hidden_size=64,
                        num_layers=4, num_heads=4, mlp_dim=128)


# --- Family facts: Hugging Face layout, layer grouping, starting from image checkpoints. ------------------------

_P = r'audio_spectrogram_transformer\.'
_L = _P + r'layers\.(\d+)\.'
_VB = r'Transformer/encoderblock_\1/'
_MHA = _VB + 'MultiHeadDotProductAttention_0/'
HF_RULES: tuple[facts.Rule, ...] = (
    (_P + r'embeddings\.cls_token', 'cls', 'raw'),
    (_P + r'embeddings\.distillation_token', 'dist', 'raw'),
    (_P + r'embeddings\.position_embeddings', POSEMB_PATH, 'raw'),
    (_P + r'embeddings\.patch_embeddings\.projection', 'embedding', 'conv'),
    (_L + r'attention\.q_proj\.(weight|bias)', _MHA + 'query', hf_rules.head_projection),
    (_L + r'attention\.k_proj\.(weight|bias)', _MHA + 'key', hf_rules.head_projection),
    (_L + r'attention\.v_proj\.(weight|bias)', _MHA + 'value', hf_rules.head_projection),
    (_L + r'attention\.o_proj\.(weight|bias)', _MHA + 'out', hf_rules.head_projection),
    (_L + r'layernorm_before', _VB + 'LayerNorm_0', 'norm'),
    (_L + r'layernorm_after', _VB + 'LayerNorm_1', 'norm'),
    (_L + r'mlp\.fc1', _VB + 'MlpBlock_0/Dense_0', 'linear'),
    (_L + r'mlp\.fc2', _VB + 'MlpBlock_0/Dense_1', 'linear'),
    (_P + r'layernorm', 'Transformer/encoder_norm', 'norm'),
    (r'classifier\.layernorm', 'head_norm', 'norm'),
    (r'classifier\.dense', 'head', 'linear'),
)

GROUPING = facts.LayerGrouping(blocks=((r'^Transformer/encoderblock_(\d+)/', 'block1'),),
                               stem=r'^(embedding|cls|dist|Transformer/posembed_input)(/|$)')


def torch_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) matrix of PyTorch's F.interpolate(mode='bilinear', align_corners=False) along one axis
  (source x = (i + 0.5) * in / out - 0.5, clamped at 0), the AST code's position-embedding resize."""
  src = np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(int), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size))
  m[np.arange(out_size), lo] += 1.0 - frac
  m[np.arange(out_size), hi] += frac
  return m


def _fit_axis(grid: np.ndarray, axis: int, size: int) -> np.ndarray:
  """The AST code's fit of one axis of an (H, W, D) position grid: cut `size` rows around the middle when the
  grid is larger, bilinear interpolation when it is smaller."""
  have = grid.shape[axis]
  if have == size:
    return grid
  if have > size:
    start = have // 2 - size // 2
    return np.take(grid, np.arange(start, start + size), axis=axis)
  m = torch_bilinear_matrix(have, size)
  return np.einsum('oi,ijd->ojd', m, grid) if axis == 0 else np.einsum('oj,ijd->iod', m, grid)


def adapt_from_image(ckpt: dict[str, np.ndarray], shapes: Mapping[str, Any], context: facts.ResizeContext
                     ) -> Optional[tuple[dict[str, np.ndarray], set[str]]]:
  """An image ViT/DeiT checkpoint (3-channel `embedding/kernel`) refitted to an AST (module docstring); None for a
  checkpoint with a 1-channel kernel (already an AST)."""
  kernel = ckpt.get('embedding/kernel')
  if kernel is None or kernel.shape[2] == 1:
    return None
  model = context.model
  if not isinstance(model, AudioSpectrogramTransformer):
    raise ValueError('Starting an AST from an image checkpoint needs the model (load_pretrained(..., model=...)) '
                     'to know its time grid.')
  out = {k: v for k, v in ckpt.items() if k not in ('head_dist/kernel', 'head_dist/bias')}
  out['embedding/kernel'] = kernel.sum(axis=2, keepdims=True)
  prefix = int('cls' in ckpt) + int('dist' in ckpt)
  if 'dist' not in ckpt:
    out['dist'] = ckpt['cls']
  pe = ckpt[POSEMB_PATH]
  g = int(round(math.sqrt(pe.shape[1] - prefix)))
  if g * g != pe.shape[1] - prefix:
    raise ValueError(f'{POSEMB_PATH}: {pe.shape[1] - prefix} patch rows are not a square image grid.')
  t_dim = grid_size(model.time_frames, model.patch_size, model.time_stride)
  f_dim = (shapes[POSEMB_PATH].shape[1] - 2) // t_dim
  patches = pe[0, prefix:].reshape(g, g, -1)
  patches = _fit_axis(_fit_axis(patches, 0, f_dim), 1, t_dim).reshape(1, f_dim * t_dim, -1)
  rows = pe[:, :2] if prefix == 2 else np.concatenate([pe[:, :1], pe[:, :1]], axis=1)
  out[POSEMB_PATH] = np.concatenate([rows, patches], axis=1).astype(pe.dtype)
  return out, set()


FACTS = facts.register_family(facts.FamilyFacts(
    name='ast', layouts={'hf': facts.ConversionTable(HF_RULES, source_heads=('classifier.dense',))},
    grouping=GROUPING, heads=('head', 'head_norm'), adapt_checkpoint=adapt_from_image))
