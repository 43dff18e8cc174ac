"""Masked autoencoder (He et al. 2022, https://arxiv.org/abs/2111.06377): a ViT encoder that sees a random 25% of
the patches, and a light decoder that reconstructs the pixels of the others (facebookresearch/mae, models_mae.py).

    out = model.apply({'params': p}, images_nhwc, noise=noise)        # or rngs={'mask': key} without noise
    out['loss'], out['pred'], out['mask']     # scalar, (B, L, p*p*3), (B, L) with 1 = removed

The encoder is vit.py's `Encoder` (same parameter names as the ViT classifier: `embedding`, `cls`,
`Transformer/encoderblock_i/...`, `Transformer/encoder_norm`), so its weights fine-tune a `vit_*` model directly
(`backbone_params` adds the position table). The decoder is `decoder_embed`, `mask_token`, `Decoder` (blocks
`Decoder/decoderblock_i`, named apart from the encoder's so that layer groupings never count them as encoder
blocks, and its final norm `Decoder/encoder_norm`) and `decoder_pred`. Both fixed 2-D sin-cos position tables
(`posemb_sincos_2d_mae`, MAE's get_2d_sincos_pos_embed) are constants recomputed from the geometry, not
parameters: they are frozen in the official code, and the registered counts are the official trainable counts.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import facts
from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models import vit

Array = jax.Array


def posemb_sincos_2d_mae(grid_h: int, grid_w: int, width: int, *, cls_token: bool = True) -> np.ndarray:
  """MAE's fixed position table (util/pos_embed.py get_2d_sincos_pos_embed), shape (1, [1 +] h*w, width), float32.

  Per axis, D/2 channels [sin(pos * w_i), cos(pos * w_i)] with w_i = 10000^(-i / (D/4)), i < D/4; the first D/2
  channels encode the column index (MAE builds the grid with meshgrid(grid_w, grid_h)), the last D/2 the row.
  With `cls_token`, a zero row comes first. big_vision's sincos2d uses 10000^(-i / (D/4 - 1)) instead.
  """
  if width % 4:
    raise ValueError(f'MAE sin-cos position embeddings need a width divisible by 4, got {width}.')
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                           indexing='ij')
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))

  def encode(pos):
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  table = np.concatenate([encode(cols), encode(rows)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, width)), table], axis=0)
  return table[None].astype(np.float32)


def patchify(images: Array, patch_size: int) -> Array:
  """(B, H, W, C) -> (B, h*w, p*p*C), patches in raster order and channel fastest inside a patch (MAE's
  'nchpwq->nhwpqc' on NCHW images)."""
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f'Image size {h}x{w} is not divisible by patch_size={p}.')
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Array, patch_size: int, grid: tuple[int, int]) -> Array:
  """Inverse of `patchify`: (B, h*w, p*p*C) -> (B, h*p, w*p, C)."""
  b, _, d = patches.shape
  p, (h, w) = patch_size, grid
  c = d // (p * p)
  x = patches.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c)


def random_masking(noise: Array, mask_ratio: float) -> tuple[Array, Array, Array]:
  """MAE's per-example random masking from uniform `noise` (B, L): the int(L * (1 - mask_ratio)) patches with the
  smallest noise are kept.

  Returns (ids_keep (B, keep): kept patch indices in order of increasing noise; mask (B, L) float32 in the original
  patch order, 1 = removed; ids_restore (B, L): the permutation that puts [kept, removed] back in patch order).
  """
  length = noise.shape[1]
  keep = int(length * (1 - mask_ratio))
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  mask = (ids_restore >= keep).astype(jnp.float32)
  return ids_shuffle[:, :keep], mask, ids_restore


def reconstruction_loss(images: Array, pred: Array, mask: Array, *, patch_size: int, norm_pix_loss: bool,
                        per_example: bool = False) -> Array:
  """MAE's loss: squared error averaged over each patch's pixels, then over the removed patches (mask 1).

  norm_pix_loss: each target patch is normalised by its own mean and unbiased variance, (t - mean) /
  sqrt(var + 1e-6). per_example=True gives (B,) losses over each example's removed patches (every example removes
  the same number, so their mean is the batch loss). Computed in float32.
  """
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  loss = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  if per_example:
    return (loss * mask).sum(axis=1) / mask.sum(axis=1)
  return (loss * mask).sum() / mask.sum()


class MaskedAutoencoderViT(nn.Module):
  """MAE: encoder on the visible patches + class token, decoder on all tokens, pixel reconstruction loss.

  The ViT options (patch_size, hidden_size, num_layers, num_heads, mlp_dim, dropout and drop-path rates,
  gelu_approximate, layer_norm_eps, dtype, remat, scan_layers, attention_impl) shape the encoder; the decoder_*
  options the decoder (same block, its own width). `num_classes` is accepted for the registry's API and unused:
  MAE has no classifier. `mask_ratio` is the fraction of patches removed; `norm_pix_loss` normalises the targets
  per patch (MAE's published recipe turns it on; the model class defaults to off, as the official one).
  """
  num_classes: int = 0
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  decoder_hidden_size: int = 512
  decoder_num_layers: int = 8
  decoder_num_heads: int = 16
  decoder_mlp_dim: int = 2048
  mask_ratio: float = 0.75
  norm_pix_loss: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  gelu_approximate: bool = False  # The official code uses timm's Block: exact GELU.
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False
  scan_layers: bool = False
  attention_impl: str = 'einsum'

  def setup(self):
    if not 0.0 < self.mask_ratio < 1.0:
      raise ValueError(f'mask_ratio={self.mask_ratio} must be in (0, 1) (MAE: 0.75); set config.model.mask_ratio.')
    p = self.patch_size
    xavier = nn.initializers.xavier_uniform
    self.embedding = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                             param_dtype=jnp.float32, name='embedding',
                             kernel_init=layers.logical(xavier(in_axis=(0, 1, 2), out_axis=-1),
                                                        (None, None, None, 'embed')),
                             bias_init=layers.logical(nn.initializers.zeros, ('embed',)))
    token = layers.logical(nn.initializers.normal(stddev=0.02), (None, None, 'embed'))
    self.cls = self.param('cls', token, (1, 1, self.hidden_size), jnp.float32)
    blocks = dict(dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
                  drop_path_rate=self.drop_path_rate, posemb='none', gelu_approximate=self.gelu_approximate,
                  layer_norm_eps=self.layer_norm_eps, dtype=self.dtype, remat=self.remat,
                  scan_layers=self.scan_layers, attention_impl=self.attention_impl)
    self.encoder = vit.Encoder(num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                               name='Transformer', **blocks)
    dense = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=xavier())
    self.decoder_embed = nn.Dense(self.decoder_hidden_size, name='decoder_embed',
                                  **{**dense, 'kernel_init': layers.logical(xavier(), (None, 'embed'))},
                                  bias_init=layers.logical(nn.initializers.zeros, ('embed',)))
    self.mask_token = self.param('mask_token', token, (1, 1, self.decoder_hidden_size), jnp.float32)
    self.decoder = vit.Encoder(num_layers=self.decoder_num_layers, mlp_dim=self.decoder_mlp_dim,
                               num_heads=self.decoder_num_heads, block_name='decoderblock', name='Decoder', **blocks)
    self.decoder_pred = nn.Dense(p * p * 3, name='decoder_pred',
                                 **{**dense, 'kernel_init': layers.logical(xavier(), ('embed', None))},
                                 bias_init=layers.logical(nn.initializers.zeros, (None,)))

  @property
  def num_features(self) -> int:
    """Width of the encoder's pooled features (the class token after the final norm)."""
    return self.hidden_size

  def _patches(self, images: Array) -> tuple[Array, tuple[int, int]]:
    """Patch embeddings plus their position rows, (B, h*w, hidden_size), and the grid (h, w)."""
    b, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f'Image size {h}x{w} is not divisible by patch_size={p}. Resize or crop the images to a '
                       f'multiple of {p} (e.g. {h - h % p or p}x{w - w % p or p}).')
    x = self.embedding(images.astype(self.dtype))
    _, gh, gw, d = x.shape
    table = posemb_sincos_2d_mae(gh, gw, d, cls_token=False)
    return x.reshape(b, gh * gw, d) + jnp.asarray(table, x.dtype), (gh, gw)

  def _with_cls(self, x: Array) -> Array:
    """Prepends the class token (its position row is MAE's zero row)."""
    cls = jnp.broadcast_to(self.cls.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    return jnp.concatenate([cls, x], axis=1)

  def _noise(self, batch: int, length: int) -> Array:
    """Uniform masking noise from the 'mask' rng (the 'params' rng while initialising)."""
    if self.is_initializing() and not self.has_rng('mask'):
      return jax.random.uniform(self.make_rng('params'), (batch, length))
    if not self.has_rng('mask'):
      raise ValueError("MaskedAutoencoderViT needs masking noise: pass noise=(B, num_patches) uniform values or "
                       "rngs={'mask': key} to apply.")
    return jax.random.uniform(self.make_rng('mask'), (batch, length))

  def forward_encoder(self, images: Array, noise: Optional[Array] = None, *,
                      train: bool = False) -> tuple[Array, Array, Array, tuple[int, int]]:
    """Encodes the visible patches: (latent (B, 1 + keep, hidden_size) final-normed, mask (B, L), ids_restore
    (B, L), grid)."""
    x, grid = self._patches(images)
    b, length, _ = x.shape
    if noise is None:
      noise = self._noise(b, length)
    elif noise.shape != (b, length):
      raise ValueError(f'noise has shape {noise.shape}; expected (batch, num_patches) = {(b, length)}.')
    ids_keep, mask, ids_restore = random_masking(noise, self.mask_ratio)
    x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
    return self.encoder(self._with_cls(x), grid=grid, train=train), mask, ids_restore, grid

  def forward_decoder(self, latent: Array, ids_restore: Array, grid: tuple[int, int], *,
                      train: bool = False) -> Array:
    """Predicted pixels of every patch, (B, L, p*p*3) float32, from the encoder's latent."""
    x = self.decoder_embed(latent)
    b, visible, d = x.shape
    length = ids_restore.shape[1]
    mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype), (b, length + 1 - visible, d))
    patches = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
    patches = jnp.take_along_axis(patches, ids_restore[..., None], axis=1)  # Back in patch order.
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = x + jnp.asarray(posemb_sincos_2d_mae(grid[0], grid[1], d), x.dtype)
    x = self.decoder(x, grid=grid, train=train)
    return self.decoder_pred(x)[:, 1:].astype(jnp.float32)

  def __call__(self, images: Array, *, noise: Optional[Array] = None, train: bool = False) -> dict[str, Array]:
    """{'loss': scalar float32, 'pred': (B, L, p*p*3), 'mask': (B, L), 1 = removed} for NHWC `images`.

    `noise` (B, L) decides the masking as in the official random_masking; without it the noise is drawn from the
    'mask' rng.
    """
    latent, mask, ids_restore, grid = self.forward_encoder(images, noise, train=train)
    pred = self.forward_decoder(latent, ids_restore, grid, train=train)
    loss = reconstruction_loss(images, pred, mask, patch_size=self.patch_size, norm_pix_loss=self.norm_pix_loss)
    return {'loss': loss, 'pred': pred, 'mask': mask}

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """The encoder on every patch (no masking): the final-normed sequence (B, 1 + h*w, hidden_size), as the
    fine-tuned / linear-probed encoder sees images."""
    x, grid = self._patches(images)
    return self.encoder(self._with_cls(x), grid=grid, train=train)

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False) -> Array:
    """The class token of `forward_features` (MAE's linear-probe feature); MAE has no classifier, so
    `pre_logits` changes nothing."""
    del pre_logits, train
    return features[:, 0]

  def backbone_params(self, params: Any, image_size: int) -> dict[str, Any]:
    """The encoder's weights as a `vit_*` classifier's params at `image_size`: the decoder dropped and the fixed
    sin-cos table written as `Transformer/posembed_input/pos_embedding` (a learned table from there on, as in the
    official fine-tuning). Used by init_from on an MAE workdir."""
    grid = image_size // self.patch_size
    out = {k: v for k, v in params.items() if k in ('embedding', 'cls')}
    out['Transformer'] = dict(params['Transformer'])
    out['Transformer']['posembed_input'] = {
        'pos_embedding': posemb_sincos_2d_mae(grid, grid, self.hidden_size)}
    return out


# --- Family facts: the official models_mae.py state dict, and layer ids for layer-wise lr decay.
_B = r'blocks\.(\d+)\.'
_D = r'decoder_blocks\.(\d+)\.'


def _block_rules(source: str, ours: str) -> list[tuple[str, str, str]]:
  """timm Block keys (models_mae.py builds its blocks from timm's Block) under `source` -> our Encoder1DBlock."""
  return [(source + r'norm1', ours + 'LayerNorm_0', 'norm'),
          (source + r'attn\.qkv', ours + 'MultiHeadDotProductAttention_0', 'qkv'),
          (source + r'attn\.proj', ours + 'MultiHeadDotProductAttention_0/out', 'mha_out'),
          (source + r'norm2', ours + 'LayerNorm_1', 'norm'),
          (source + r'mlp\.fc1', ours + 'MlpBlock_0/Dense_0', 'linear'),
          (source + r'mlp\.fc2', ours + 'MlpBlock_0/Dense_1', 'linear')]


OFFICIAL_LAYOUT = facts.ConversionTable(
    rules=[(r'cls_token', 'cls', 'raw'),
           (r'mask_token', 'mask_token', 'raw'),
           (r'patch_embed\.proj', 'embedding', 'conv'),
           *_block_rules(_B, r'Transformer/encoderblock_\1/'),
           (r'norm', 'Transformer/encoder_norm', 'norm'),
           (r'decoder_embed', 'decoder_embed', 'linear'),
           *_block_rules(_D, r'Decoder/decoderblock_\1/'),
           (r'decoder_norm', 'Decoder/encoder_norm', 'norm'),
           (r'decoder_pred', 'decoder_pred', 'linear')],
    # The fixed sin-cos tables: our model recomputes them (`posemb_sincos_2d_mae`).
    ignore=(r'pos_embed', r'decoder_pos_embed'),
    source_heads=())

GROUPING = facts.LayerGrouping(
    blocks=[(r'^Transformer/encoderblock_(\d+)/', 'block1')],
    stem=r'^(embedding|cls)/?')



def _infer_image_size(state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]) -> Optional[int]:
  """The image size of an official checkpoint, from its (fixed) pos_embed: (1, 1 + grid**2, D)."""
  if 'pos_embed' not in state_dict:
    return None
  grid = int(round(math.sqrt(state_dict['pos_embed'].shape[1] - 1)))
  return grid * options.get('patch_size', 16) if grid * grid == state_dict['pos_embed'].shape[1] - 1 else None


# timm has no full MAE model (only the encoders, as vit_*.mae), so the official layout is also the default one.
FACTS = facts.register_family(facts.FamilyFacts(
    name='mae', layouts={'timm': OFFICIAL_LAYOUT, 'mae': OFFICIAL_LAYOUT}, grouping=GROUPING,
    infer_image_size=_infer_image_size, heads=()))

# --- Registered variants (models_mae.py: mae_vit_{base_patch16,large_patch16,huge_patch14}_dec512d8b). Counts are
# the official trainable parameters (the fixed position tables excluded): encoder + decoder.
_DECODER = dict(decoder_hidden_size=512, decoder_num_layers=8, decoder_num_heads=16, decoder_mlp_dim=2048)
_VARIANTS = [
    # name, ViT variant, num_params, timm's encoder-only weights
    ('mae_vit_b16', 'B/16', 85_647_360 + 26_008_320, 'vit_base_patch16_224.mae'),
    ('mae_vit_l16', 'L/16', 303_099_904 + 26_139_392, 'vit_large_patch16_224.mae'),
    ('mae_vit_h14', 'H/14', 630_435_840 + 26_178_124, 'vit_huge_patch14_224.mae'),
]
for _name, _variant, _count, _timm in _VARIANTS:
  registry.register_model(_name, MaskedAutoencoderViT, family='mae', image_size=224, num_params=_count,
                          timm_name=_timm, **_DECODER, **vit.parse_variant(_variant))
