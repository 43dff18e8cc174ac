"""DeiT (Touvron et al. 2020, https://arxiv.org/abs/2012.12877): data-efficient image transformers.

Undistilled DeiTs are plain ViTs (registered with `vit.VisionTransformer`, exact GELU and LayerNorm eps 1e-6 as
in timm). The distilled variants add a distillation token and a second head (`DistilledVisionTransformer`);
parameter names follow the official flax ViT, plus `dist` (1, 1, D) next to `cls` and `head_dist` next to `head`.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import facts
from vit_jax.models import registry
from vit_jax.models import vit

Array = jax.Array


class DistilledVisionTransformer(vit.VisionTransformer):
  """ViT with a distillation token: tokens are [cls, dist, patches] and the learned posemb has N + 2 rows.

  `__call__(images, train=True)` returns `(logits_cls, logits_dist)` for the distillation loss (unless
  `distilled_training=False`, e.g. for plain fine-tuning); otherwise it returns their average
  `(head(cls) + head_dist(dist)) / 2`, as timm and the official DeiT do at inference.
  Only `classifier='token'`, `posemb='learn'` and no representation layer are supported.
  """
  distilled_training: bool = True
  num_distill_tokens: ClassVar[int] = 1

  def setup(self):
    if self.classifier != 'token':
      raise ValueError(f"DistilledVisionTransformer reads the class and distillation tokens: classifier must be "
                       f"'token', got {self.classifier!r}.")
    if self.posemb != 'learn':
      raise ValueError(f"DistilledVisionTransformer supports only posemb='learn', got {self.posemb!r}.")
    if self.representation_size:
      raise ValueError('DistilledVisionTransformer has no representation (pre_logits) layer; '
                       f'got representation_size={self.representation_size}.')
    super().setup()
    # DeiT initialises the distillation token with trunc_normal(0.02) (the class token stays zero, as in ViT).
    self.dist = self.param('dist', nn.initializers.truncated_normal(stddev=0.02), (1, 1, self.hidden_size),
                           jnp.float32)
    if self.num_classes:
      self.head_dist = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                                kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                                name='head_dist')

  @property
  def num_prefix_tokens(self) -> int:
    return 2

  def _tokens(self, images: Array) -> tuple[Array, tuple[int, int]]:
    """[cls, dist, patches] (B, 2 + h*w, hidden_size) and the patch grid; forward_features gives them normed."""
    b, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f'Image size {h}x{w} is not divisible by patch_size={p}. Resize or crop the images to a '
                       f'multiple of {p} (e.g. {h - h % p or p}x{w - w % p or p}).')
    x = self.embedding(images.astype(self.dtype))
    _, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    cls = jnp.broadcast_to(self.cls.astype(x.dtype), (b, 1, d))
    dist = jnp.broadcast_to(self.dist.astype(x.dtype), (b, 1, d))
    return jnp.concatenate([cls, dist, x], axis=1), (gh, gw)

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False):
    """Mean of the two heads' float32 logits; `(logits_cls, logits_dist)` when training in distilled mode.

    `pre_logits=True` (or `num_classes == 0`) returns the mean of the cls and dist features (B, hidden_size),
    as timm's VisionTransformerDistilled.
    """
    x, x_dist = features[:, 0], features[:, 1]
    if pre_logits or not self.num_classes:
      return (x + x_dist) / 2
    logits = self.head(x).astype(jnp.float32)
    logits_dist = self.head_dist(x_dist).astype(jnp.float32)
    if train and self.distilled_training:
      return logits, logits_dist
    return (logits + logits_dist) / 2

  def __call__(self, images: Array, *, train: bool = False):
    """Averaged logits (B, num_classes); `(logits_cls, logits_dist)` with `train=True` (distilled training)."""
    return self.forward_head(self.forward_features(images, train=train), train=train)


# --- Registered variants. Counts at 1000 classes: undistilled = ViT-Ti/S/B (+ the 384 px posemb).
_DEIT = dict(classifier='token', gelu_approximate=False, layer_norm_eps=1e-6)
_VARIANTS = [
    # name, builder, variant, image_size, num_params, timm_name
    ('deit_ti16', vit.VisionTransformer, 'Ti/16', 224, 5_717_416, 'deit_tiny_patch16_224.fb_in1k'),
    ('deit_s16', vit.VisionTransformer, 'S/16', 224, 22_050_664, 'deit_small_patch16_224.fb_in1k'),
    ('deit_b16', vit.VisionTransformer, 'B/16', 224, 86_567_656, 'deit_base_patch16_224.fb_in1k'),
    ('deit_b16_384', vit.VisionTransformer, 'B/16', 384, 86_859_496, 'deit_base_patch16_384.fb_in1k'),
    ('deit_ti16_distilled', DistilledVisionTransformer, 'Ti/16', 224, 5_910_800,
     'deit_tiny_distilled_patch16_224.fb_in1k'),
    ('deit_s16_distilled', DistilledVisionTransformer, 'S/16', 224, 22_436_432,
     'deit_small_distilled_patch16_224.fb_in1k'),
    ('deit_b16_distilled', DistilledVisionTransformer, 'B/16', 224, 87_338_192,
     'deit_base_distilled_patch16_224.fb_in1k'),
    ('deit_b16_384_distilled', DistilledVisionTransformer, 'B/16', 384, 87_630_032,
     'deit_base_distilled_patch16_384.fb_in1k'),
]
for _name, _builder, _variant, _size, _count, _timm in _VARIANTS:
  registry.register_model(_name, _builder, family='deit', image_size=_size, num_params=_count, timm_name=_timm,
                          **_DEIT, **vit.parse_variant(_variant))


# --- Family facts: timm's VisionTransformerDistilled is ViT plus the distillation token and head. ------------------

FACTS = facts.register_family(facts.FamilyFacts(
    name='deit',
    layouts={'timm': facts.ConversionTable(vit.TIMM_RULES + ((r'dist_token', 'dist', 'raw'),
                                                             (r'head_dist', 'head_dist', 'linear')),
                                           source_heads=('head', 'head_dist'))},
    grouping=vit.GROUPING, forward_macs=vit.forward_macs, resize=vit.resize_pos_embedding,
    infer_image_size=vit.infer_image_size, heads=('head', 'head_dist')))  # Exact GELU already (registry default).
