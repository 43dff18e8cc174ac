"""Convolutional vision Transformer (Wu et al. 2021, "CvT"), laid out like Hugging Face's `modeling_cvt.py`.

CvT is not in timm; the reference is transformers' `CvtForImageClassification` (hub ids microsoft/cvt-13,
microsoft/cvt-21, microsoft/cvt-w24-384-22k). Parameter names follow its state dict, so the conversion table
(layout 'hf') is short:

  stages_{i}/embedding/{projection,normalization}     cvt.encoder.stages.{i}.embedding.convolution_embeddings.*
  stages_{i}/cls_token                                cvt.encoder.stages.{i}.cls_token  (last stage only)
  stages_{i}/layers_{j}/layernorm_before, _after      ...layers.{j}.layernorm_before / layernorm_after
  stages_{i}/layers_{j}/attention/conv_proj_{q,k,v}/  ...attention.attention.convolution_projection_{query,key,value}
      {convolution,normalization}                        .convolution_projection.{convolution,normalization}
  stages_{i}/layers_{j}/attention/projection_{q,k,v}  ...attention.attention.projection_{query,key,value}
  stages_{i}/layers_{j}/attention/output              ...attention.output.dense
  stages_{i}/layers_{j}/{fc1,fc2}                     ...intermediate.dense / output.dense
  norm, head                                          layernorm, classifier

Each stage: a convolutional token embedding (overlapping conv, kernel 7 stride 4 (`patch_size`) padding 2 in
stage 0, else 3 / 2 / 1, then LayerNorm), then pre-norm transformer blocks whose queries, keys and values come from
a depthwise 3x3 conv (no bias) + BatchNorm on the token map (stride 1 for queries, 2 for keys and values) followed
by a linear projection. There is no position embedding. The last stage prepends a class token after its
embedding; it bypasses the convolutional projections (it joins q, k and v before the linear projections). The
classifier sees the LayerNorm of the final class token.

As in the reference (and the official code), the attention scale is 1/sqrt(stage width), not 1/sqrt(head width).
LayerNorm epsilon 1e-5, BatchNorm eps 1e-5 / momentum 0.1 (torch defaults), GELU exact.

Stochastic depth follows the official recipe ([0, 0, r] per stage, ramping from 0 to r over the last stage's
blocks) and drops each residual branch; Hugging Face's port uses only the first rate of each stage's ramp and also
drops the MLP residual sum, which only matters in training (evaluation is identical).

Inputs are NHWC images of any size (the maps shrink as PyTorch convs round); nothing depends on the image size.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import attention
from vit_jax.models import facts
from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models.conv import Conv
from vit_jax.models.layers import DropPath

Array = jax.Array

_LN_EPS = 1e-5
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
# (kernel, padding) of stage 0's convolutional token embedding (its stride is `patch_size`, 4 in the reference),
# and (kernel, stride, padding) of the later stages' embeddings.
_STEM_KERNEL, _STEM_PAD = 7, 2
_LATER_EMBED_CONV = (3, 2, 1)
_NUM_STAGES = 3
_QKV_KERNEL, _Q_STRIDE, _KV_STRIDE = 3, 1, 2


def _dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=_trunc_normal,
                  bias_init=nn.initializers.zeros, name=name)


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=_LN_EPS, dtype=dtype, name=name)


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - kernel) // stride + 1


# ----------------------------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------------------------

class ConvEmbedding(nn.Module):
  """Overlapping conv (symmetric PyTorch padding) + LayerNorm over channels: NHWC in and out."""
  embed_dim: int
  kernel: int
  stride: int
  padding: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.padding
    x = Conv(self.embed_dim, (self.kernel, self.kernel), strides=(self.stride, self.stride),
             padding=((p, p), (p, p)), dtype=self.dtype, kernel_init=_trunc_normal, name='projection')(x)
    return _layer_norm('normalization', self.dtype)(x)


class ConvProjection(nn.Module):
  """Depthwise 3x3 conv (padding 1, no bias) + BatchNorm on an NHWC map, flattened to tokens (B, h*w, C)."""
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    c = x.shape[-1]
    p = _QKV_KERNEL // 2
    x = Conv(c, (_QKV_KERNEL, _QKV_KERNEL), strides=(self.stride, self.stride), padding=((p, p), (p, p)),
             feature_group_count=c, use_bias=False, dtype=self.dtype, kernel_init=_trunc_normal,
             name='convolution')(x)
    x = layers.torch_batch_norm('normalization', train=train, dtype=self.dtype)(x)
    return x.reshape(x.shape[0], -1, c)


class ConvAttention(nn.Module):
  """Multi-head attention whose q, k, v come from `ConvProjection`s of the token map (k, v at stride 2), then
  linear projections; the optional class token skips the convs. Tokens (B, [1 +] h*w, C) in and out."""
  num_heads: int
  with_cls_token: bool = False
  qkv_bias: bool = True
  attn_drop_rate: float = 0.0
  drop_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, grid: tuple[int, int], train: bool = False) -> Array:
    b, _, c = x.shape
    heads = self.num_heads
    if c % heads:
      raise ValueError(f'CvT stage width {c} is not divisible by num_heads={heads}.')
    n_prefix = 1 if self.with_cls_token else 0
    prefix, tokens = x[:, :n_prefix], x[:, n_prefix:]
    fmap = tokens.reshape(b, grid[0], grid[1], c)

    def project(short: str, stride: int) -> Array:
      y = ConvProjection(stride, dtype=self.dtype, name=f'conv_proj_{short}')(fmap, train)
      y = jnp.concatenate([prefix, y], axis=1)
      y = _dense(c, f'projection_{short}', self.dtype, self.qkv_bias)(y)
      return y.reshape(b, y.shape[1], heads, c // heads)

    q, k, v = project('q', _Q_STRIDE), project('k', _KV_STRIDE), project('v', _KV_STRIDE)
    dropout = None
    if self.attn_drop_rate > 0 and train:
      dropout = lambda w: nn.Dropout(self.attn_drop_rate)(w, deterministic=False)
    out = attention.dot_product_attention(q, k, v, scale=c ** -0.5, implementation=self.attention_impl,
                                          dropout=dropout).reshape(b, q.shape[1], c)
    out = _dense(c, 'output', self.dtype)(out)
    return nn.Dropout(self.drop_rate)(out, deterministic=not train)


class CvtBlock(nn.Module):
  """x + DropPath(ConvAttention(LN(x))); x + DropPath(MLP(LN(x))) with MLP fc1 -> GELU -> fc2 -> dropout."""
  num_heads: int
  mlp_ratio: float = 4.0
  with_cls_token: bool = False
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, grid: tuple[int, int], train: bool = False) -> Array:
    c = x.shape[-1]
    drop_path = lambda y: DropPath(self.drop_path_rate)(y, deterministic=not train)
    y = ConvAttention(self.num_heads, with_cls_token=self.with_cls_token, qkv_bias=self.qkv_bias,
                      attn_drop_rate=self.attn_drop_rate, drop_rate=self.drop_rate, dtype=self.dtype,
                      attention_impl=self.attention_impl, name='attention')(
                          _layer_norm('layernorm_before', self.dtype)(x), grid, train)
    x = x + drop_path(y)
    y = _layer_norm('layernorm_after', self.dtype)(x)
    y = layers.gelu(_dense(int(c * self.mlp_ratio), 'fc1', self.dtype)(y), approximate=False)
    y = _dense(c, 'fc2', self.dtype)(y)
    y = nn.Dropout(self.drop_rate)(y, deterministic=not train)
    return x + drop_path(y)


class CvtStage(nn.Module):
  """Token embedding, (class token), blocks. Returns the NHWC map and the class token (B, 1, C) or None."""
  embed_dim: int
  depth: int
  num_heads: int
  embed_conv: tuple[int, int, int]
  with_cls_token: bool = False
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rates: tuple[float, ...] = ()
  remat: Any = False
  dtype: Any = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> tuple[Array, Any]:
    x = ConvEmbedding(self.embed_dim, *self.embed_conv, dtype=self.dtype, name='embedding')(x)
    x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if self.with_cls_token:
      cls = self.param('cls_token', _trunc_normal, (1, 1, c), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c)), x], axis=1)
    block_cls = layers.remat(CvtBlock, self.remat, static_argnums=(2, 3))
    for j in range(self.depth):
      x = block_cls(self.num_heads, mlp_ratio=self.mlp_ratio, with_cls_token=self.with_cls_token,
                    qkv_bias=self.qkv_bias, drop_rate=self.drop_rate, attn_drop_rate=self.attn_drop_rate,
                    drop_path_rate=self.drop_path_rates[j] if self.drop_path_rates else 0.0, dtype=self.dtype,
                    attention_impl=self.attention_impl, name=f'layers_{j}')(x, (h, w), train)
    cls = x[:, :1] if self.with_cls_token else None
    tokens = x[:, 1:] if self.with_cls_token else x
    return tokens.reshape(b, h, w, c), cls


# ----------------------------------------------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------------------------------------------

class CvT(nn.Module):
  """CvT on NHWC images (Hugging Face `CvtForImageClassification`); three stages at strides 4, 8, 16 (patch_size,
  2 x, 4 x patch_size), a class token in the last stage and a LayerNorm + linear classifier on it.

  drop_path_rate is the last stage's stochastic-depth rate (ramping from 0 over its blocks; the first two stages
  have none, as the official configs [0, 0, r]); drop_rate is the embedding / attention-output / MLP dropout.
  num_classes=0 returns the pre-logits.
  """
  num_classes: int = 1000
  patch_size: int = 4  # Stride of stage 0's token embedding (HF patch_stride[0]); kernel 7, padding 2 as the reference.
  embed_dims: Sequence[int] = (64, 192, 384)
  depths: Sequence[int] = (1, 2, 10)
  num_heads: Sequence[int] = (1, 3, 6)
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: Any = False  # bool or a named policy (layers.remat), per block.
  attention_impl: str = 'einsum'  # 'einsum' | 'xla' | 'cudnn' (vit_jax.models.attention).

  @property
  def num_features(self) -> int:
    return int(self.embed_dims[-1])

  def embed_convs(self) -> list[tuple[int, int, int]]:
    """(kernel, stride, padding) of each stage's token embedding."""
    return [(_STEM_KERNEL, self.patch_size, _STEM_PAD)] + [_LATER_EMBED_CONV] * (len(self.depths) - 1)

  def setup(self):
    n = _NUM_STAGES
    if self.patch_size < 1:
      raise ValueError(f'CvT patch_size (the first token embedding\'s stride) must be >= 1, got {self.patch_size}.')
    if not len(self.embed_dims) == len(self.depths) == len(self.num_heads) == n:
      raise ValueError(f'CvT has {n} stages: embed_dims {tuple(self.embed_dims)}, depths {tuple(self.depths)} and '
                       f'num_heads {tuple(self.num_heads)} need {n} entries each.')
    ramp = tuple(float(r) for r in np.linspace(0.0, self.drop_path_rate, self.depths[-1]))
    self.stages = [
        CvtStage(self.embed_dims[i], self.depths[i], self.num_heads[i], self.embed_convs()[i],
                 with_cls_token=i == n - 1,
                 mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, drop_rate=self.drop_rate,
                 attn_drop_rate=self.attn_drop_rate, drop_path_rates=ramp if i == n - 1 else (),
                 remat=self.remat, dtype=self.dtype, attention_impl=self.attention_impl, name=f'stages_{i}')
        for i in range(n)]
    self.norm = _layer_norm('norm', self.dtype)
    if self.num_classes > 0:
      self.head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_trunc_normal,
                           bias_init=nn.initializers.zeros)

  def _check_input(self, images: Array) -> None:
    if images.ndim != 4:
      raise ValueError(f'Expected NHWC images, got shape {images.shape}.')
    sizes = images.shape[1:3]
    for kernel, stride, pad in self.embed_convs():
      sizes = tuple(_conv_out(s, kernel, stride, pad) for s in sizes)
      if min(sizes) < 1:
        raise ValueError(f'Input {images.shape[1]}x{images.shape[2]} is too small for CvT (a stage map would be '
                         'empty); use at least 16x16 px (224 for the registered models).')

  def _run(self, images: Array, train: bool) -> tuple[list[Array], Array]:
    self._check_input(images)
    x, outs, cls = images, [], None
    for stage in self.stages:
      x, cls = stage(x, train)
      outs.append(x)
    return outs, cls

  def forward_intermediates(self, images: Array, *, train: bool = False, norm: bool = False) -> list[Array]:
    """Per-stage NHWC maps (strides 4, 8, 16; class token excluded); norm=True applies the final norm to the
    last one."""
    outs, _ = self._run(images, train)
    if norm:
      outs[-1] = self.norm(outs[-1])
    return outs

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """(B, 1 + h*w, C): the class token then the last stage's tokens, after the final LayerNorm."""
    outs, cls = self._run(images, train)
    b, _, _, c = outs[-1].shape
    return self.norm(jnp.concatenate([cls, outs[-1].reshape(b, -1, c)], axis=1))

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False) -> Array:
    """The normed class token (pre-logits), then the classifier (the reference has no head dropout)."""
    del train
    x = features[:, 0]
    if pre_logits or self.num_classes == 0:
      return x
    return self.head(x)

  def __call__(self, images: Array, *, train: bool = False) -> Array:
    return self.forward_head(self.forward_features(images, train=train), train=train)


# ----------------------------------------------------------------------------------------------------------------
# Registry: the Hugging Face configurations (counts from transformers' CvtForImageClassification, 1000 classes).
# drop_path_rate 0.1: transformers' CvtConfig default ([0, 0, 0.1], the microsoft/cvt-13 recipe).
# ----------------------------------------------------------------------------------------------------------------

registry.register_model('cvt_13', CvT, family='cvt', image_size=224, num_params=19_997_480, timm_name=None,
                        embed_dims=(64, 192, 384), depths=(1, 2, 10), num_heads=(1, 3, 6), drop_path_rate=0.1)
registry.register_model('cvt_21', CvT, family='cvt', image_size=224, num_params=31_622_696, timm_name=None,
                        embed_dims=(64, 192, 384), depths=(1, 4, 16), num_heads=(1, 3, 6), drop_path_rate=0.1)
registry.register_model('cvt_w24', CvT, family='cvt', image_size=224, num_params=277_196_392, timm_name=None,
                        embed_dims=(192, 768, 1024), depths=(2, 2, 20), num_heads=(3, 12, 16), drop_path_rate=0.1)


# ----------------------------------------------------------------------------------------------------------------
# Family facts: the Hugging Face conversion table (layout 'hf'; CvT has no timm layout, so convert with
# `timm_to_params(name, sd, layout='hf')` / `python -m vit_jax.convert --layout hf`) and the layer grouping. No
# parameter depends on the image size (no position embedding): nothing to resize. FLOPs: XLA's cost analysis.
# ----------------------------------------------------------------------------------------------------------------

_S = r'cvt\.encoder\.stages\.(\d+)\.'
_L = _S + r'layers\.(\d+)\.'
_OUR_L = r'stages_\1/layers_\2/'


def _qkv_path(leaf: str):
  """Path builder for HF's ...convolution_projection_{query,key,value} / projection_{...} (named q, k, v here)."""
  return lambda m: f'stages_{m[1]}/layers_{m[2]}/attention/{leaf.format(m[3][0])}'


_HF_RULES = (
    (_S + r'embedding\.convolution_embeddings\.projection', r'stages_\1/embedding/projection', 'conv'),
    (_S + r'embedding\.convolution_embeddings\.normalization', r'stages_\1/embedding/normalization', 'norm'),
    (_S + r'cls_token', r'stages_\1/cls_token', 'raw'),
    (_L + r'attention\.attention\.convolution_projection_(query|key|value)\.convolution_projection\.convolution',
     _qkv_path('conv_proj_{}/convolution'), 'conv'),
    (_L + r'attention\.attention\.convolution_projection_(query|key|value)\.convolution_projection\.normalization',
     _qkv_path('conv_proj_{}/normalization'), 'batchnorm'),
    (_L + r'attention\.attention\.projection_(query|key|value)', _qkv_path('projection_{}'), 'linear'),
    (_L + r'attention\.output\.dense', _OUR_L + 'attention/output', 'linear'),
    (_L + r'intermediate\.dense', _OUR_L + 'fc1', 'linear'),
    (_L + r'output\.dense', _OUR_L + 'fc2', 'linear'),
    (_L + r'(layernorm_before|layernorm_after)', _OUR_L + r'\3', 'norm'),
    (r'layernorm', 'norm', 'norm'),
    (r'classifier', 'head', 'linear'),
)

FACTS = facts.register_family(facts.FamilyFacts(
    name='cvt',
    layouts={'hf': facts.ConversionTable(_HF_RULES, source_heads=('classifier',))},
    # Layer 0: the first token embedding. Blocks 1..L in order over the stages; a later stage's token embedding
    # and class token belong to its first block. The final norm and head are L + 1.
    grouping=facts.LayerGrouping(blocks=((r'^stages_(\d+)/layers_(\d+)/', 'block2'),
                                         (r'^stages_([1-9]\d*)/(embedding|cls_token)', 'before')),
                                 stem=r'^stages_0/embedding/'),
))
