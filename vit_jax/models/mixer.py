"""MLP-Mixer (Tolstikhin et al. 2021, https://arxiv.org/abs/2105.01601) with the official flax parameter names.

Names match google-research/vision_transformer `models_mixer.py` (`stem`, `MixerBlock_{i}/{LayerNorm_0,
token_mixing, LayerNorm_1, channel_mixing}` with `Dense_0`/`Dense_1`, `pre_head_layer_norm`, `head`), so the
published Mixer .npz files load without renaming. The official code uses the tanh GELU; timm's port uses the
exact one (`gelu_approximate=False`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import facts
from vit_jax.models import layers
from vit_jax.models import registry

Array = jax.Array


class MixerBlock(nn.Module):
  """x + DropPath(token-mixing MLP over patches), then x + DropPath(channel-mixing MLP over channels)."""
  tokens_mlp_dim: int
  channels_mlp_dim: int
  drop_path_rate: float = 0.0
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    # `deterministic` is positional so that nn.remat can mark it static.
    ln = dict(epsilon=self.layer_norm_eps, dtype=self.dtype)
    mlp = dict(gelu_approximate=self.gelu_approximate, dtype=self.dtype)
    y = nn.LayerNorm(name='LayerNorm_0', **ln)(x)
    y = jnp.swapaxes(y, 1, 2)  # (B, D, N): mix along the patches.
    y = layers.MlpBlock(mlp_dim=self.tokens_mlp_dim, name='token_mixing', **mlp)(y)
    y = jnp.swapaxes(y, 1, 2)
    x = x + layers.DropPath(self.drop_path_rate)(y, deterministic=deterministic)
    y = nn.LayerNorm(name='LayerNorm_1', **ln)(x)
    y = layers.MlpBlock(mlp_dim=self.channels_mlp_dim, name='channel_mixing', **mlp)(y)
    return x + layers.DropPath(self.drop_path_rate)(y, deterministic=deterministic)


class MlpMixer(nn.Module):
  """MLP-Mixer classifier on NHWC images; logits are float32 whatever `dtype` is.

  `drop_path_rate` is applied uniformly to every block (as timm's Mixer). num_classes == 0 drops the head; the
  outputs are then the pooled (B, hidden_dim) features.
  """
  num_classes: int
  patch_size: int = 16
  hidden_dim: int = 768
  num_blocks: int = 12
  tokens_mlp_dim: int = 384
  channels_mlp_dim: int = 3072
  drop_path_rate: float = 0.0
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  remat: Any = False  # bool or a named policy (layers.remat).

  def setup(self):
    p = self.patch_size
    self.stem = nn.Conv(self.hidden_dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                        param_dtype=jnp.float32, name='stem')
    block_cls = layers.remat(MixerBlock, self.remat, static_argnums=(2,))
    self.blocks = [
        block_cls(tokens_mlp_dim=self.tokens_mlp_dim, channels_mlp_dim=self.channels_mlp_dim,
                  drop_path_rate=self.drop_path_rate, gelu_approximate=self.gelu_approximate,
                  layer_norm_eps=self.layer_norm_eps, dtype=self.dtype, name=f'MixerBlock_{i}')
        for i in range(self.num_blocks)]
    self.pre_head_layer_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                            name='pre_head_layer_norm')
    if self.num_classes:
      self.head = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros, name='head')

  @property
  def num_features(self) -> int:
    """Width of the pooled pre-logits features."""
    return self.hidden_dim

  def _blocks(self, images: Array, train: bool) -> tuple[list[Array], tuple[int, int]]:
    b, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f'Image size {h}x{w} is not divisible by patch_size={p}. Resize or crop the images to a '
                       f'multiple of {p} (e.g. {h - h % p or p}x{w - w % p or p}).')
    x = self.stem(images.astype(self.dtype))
    grid = x.shape[1:3]
    x = x.reshape(b, -1, x.shape[-1])
    outs = []
    for block in self.blocks:
      x = block(x, not train)
      outs.append(x)
    return outs, grid

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """Final-normed token sequence (B, h*w, hidden_dim)."""
    return self.pre_head_layer_norm(self._blocks(images, train)[0][-1])

  def forward_intermediates(self, images: Array, *, train: bool = False, norm: bool = False) -> list[Array]:
    """Every block's output as an NHWC map (B, h, w, hidden_dim), all at stride patch_size (Mixer is isotropic).
    norm=True applies the final norm to the last one."""
    outs, (gh, gw) = self._blocks(images, train)
    if norm:
      outs[-1] = self.pre_head_layer_norm(outs[-1])
    return [o.reshape(o.shape[0], gh, gw, o.shape[-1]) for o in outs]

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False) -> Array:
    """Mean-pools the tokens; returns the pre-logits (B, hidden_dim) or the float32 logits (`train` is accepted
    as every family's forward_head takes it; this head has no dropout)."""
    del train
    x = jnp.mean(features, axis=1)
    if pre_logits or not self.num_classes:
      return x
    return self.head(x).astype(jnp.float32)

  def __call__(self, images: Array, *, train: bool = False) -> Array:
    """Logits (B, num_classes) for NHWC `images` (pooled features when num_classes == 0)."""
    return self.forward_head(self.forward_features(images, train=train))


# --- Registered variants (official configs; counts at 224 px, 1000 classes).
_WIDTHS = {
    # name: (hidden_dim, num_blocks, tokens_mlp_dim, channels_mlp_dim)
    'S': (512, 8, 256, 2048),
    'B': (768, 12, 384, 3072),
    'L': (1024, 24, 512, 4096),
}
_OFFICIAL = [
    # name, width, patch, num_params, timm_name
    ('mixer_s16', 'S', 16, 18_528_264, 'mixer_s16_224'),
    ('mixer_s32', 'S', 32, 19_104_624, 'mixer_s32_224'),
    ('mixer_b16', 'B', 16, 59_880_472, 'mixer_b16_224.goog_in21k_ft_in1k'),
    ('mixer_b32', 'B', 32, 60_293_428, 'mixer_b32_224'),
    ('mixer_l16', 'L', 16, 208_196_168, 'mixer_l16_224.goog_in21k_ft_in1k'),
]
for _name, _width, _patch, _count, _timm in _OFFICIAL:
  _d, _n, _t, _c = _WIDTHS[_width]
  registry.register_model(_name, MlpMixer, family='mixer', image_size=224, num_params=_count, timm_name=_timm,
                          patch_size=_patch, hidden_dim=_d, num_blocks=_n, tokens_mlp_dim=_t, channels_mlp_dim=_c)


# --- Family facts (vit_jax/models/facts.py). FLOPs: XLA's cost analysis. --------------------------------------------

_MB = r'blocks\.(\d+)\.'
_OMB = r'MixerBlock_\1/'
TIMM_RULES: tuple[facts.Rule, ...] = (
    (r'stem\.proj', 'stem', 'conv'),
    (_MB + r'norm1', _OMB + 'LayerNorm_0', 'norm'),
    (_MB + r'mlp_tokens\.fc1', _OMB + 'token_mixing/Dense_0', 'linear'),
    (_MB + r'mlp_tokens\.fc2', _OMB + 'token_mixing/Dense_1', 'linear'),
    (_MB + r'norm2', _OMB + 'LayerNorm_1', 'norm'),
    (_MB + r'mlp_channels\.fc1', _OMB + 'channel_mixing/Dense_0', 'linear'),
    (_MB + r'mlp_channels\.fc2', _OMB + 'channel_mixing/Dense_1', 'linear'),
    (r'norm', 'pre_head_layer_norm', 'norm'),
    (r'head', 'head', 'linear'),
)


def infer_image_size(state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]) -> Optional[int]:
  """The input size a timm Mixer checkpoint was built for: its token-mixing MLP reads one row per patch."""
  weight = state_dict.get('blocks.0.mlp_tokens.fc1.weight')
  if weight is None:
    return None
  tokens = weight.shape[1]
  grid = int(round(math.sqrt(tokens)))
  return grid * options.get('patch_size', 16) if grid * grid == tokens else None


FACTS = facts.register_family(facts.FamilyFacts(
    name='mixer', layouts={'timm': facts.ConversionTable(TIMM_RULES)},
    grouping=facts.LayerGrouping(blocks=((r'^MixerBlock_(\d+)/', 'block1'),), stem=r'^stem(/|$)'),
    infer_image_size=infer_image_size,
    timm_numerics=lambda options: {'gelu_approximate': False}))  # timm's Mixer uses exact GELU.
