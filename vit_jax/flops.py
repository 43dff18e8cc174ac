"""FLOP accounting (REFERENCE.md section 4): multiply-adds per image, FLOPs = 2 x MACs, training = 3 x forward.

Analytic counts (matmuls and convolutions only, as the published "GFLOPs") come from each family's facts
(`FamilyFacts.forward_macs`, vit_jax/models/facts.py); every other model falls back to XLA's cost analysis of its lowered forward pass (`xla_forward_flops`), which also counts
elementwise work (a few % more). The analytic helpers need no jax; jax and the models are imported lazily.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

TRAIN_TO_FORWARD = 3  # Backward costs about twice the forward pass.


def vit_forward_macs(*, image_size: int, patch_size: int, hidden_size: int, num_layers: int, mlp_dim: int,
                     num_classes: int = 1000, has_cls: bool = True) -> float:
  """Multiply-adds of one ViT forward pass on one image: patch embedding, encoder blocks and head.

  Per block: 4*N*D^2 (qkv and output projections) + 2*N*D*M (MLP) + 2*N^2*D (scores and weighted sum).
  """
  return _vit_macs(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_layers=num_layers,
                   mlp_dim=mlp_dim, extra_tokens=int(has_cls), heads=1, num_classes=num_classes)


def _vit_macs(*, image_size: int, patch_size: int, hidden_size: int, num_layers: int, mlp_dim: int,
              extra_tokens: int, heads: int, num_classes: int) -> float:
  """ViT MACs with `extra_tokens` (class, distillation) added to the patches and `heads` classifier heads."""
  if image_size % patch_size:
    raise ValueError(f'image_size={image_size} is not divisible by patch_size={patch_size}.')
  patches = (image_size // patch_size) ** 2
  n, d = patches + extra_tokens, hidden_size
  embed = patches * patch_size * patch_size * 3 * d
  block = 4 * n * d * d + 2 * n * d * mlp_dim + 2 * n * n * d
  return float(embed + num_layers * block + heads * d * num_classes)


def forward_flops(macs: float) -> float:
  """FLOPs of a forward pass from its multiply-adds."""
  return 2.0 * macs


def train_flops(macs: float) -> float:
  """FLOPs of one training step on one image (forward + backward) from the forward multiply-adds."""
  return TRAIN_TO_FORWARD * forward_flops(macs)


def swin_forward_macs(*, image_size: int, patch_size: int = 4, embed_dim: int = 96,
                      depths: Sequence[int] = (2, 2, 6, 2), window_size: Union[int, Sequence[int]] = 7,
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


def xla_forward_flops(model: Any, image_size: int) -> float:
  """FLOPs of one forward pass on one image, from XLA's cost analysis of the lowered (uncompiled) computation.

  Counts 2 per multiply-add plus one per elementwise op; needs no parameters in memory (abstract shapes only).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost or 'flops' not in cost:
    raise RuntimeError(f'XLA cost analysis reported no flops for {type(model).__name__}.')
  return float(cost['flops'])


def _legacy_macs(model: Any, image_size: int) -> Optional[float]:
  """Analytic MACs of plain ViT/DeiT and Swin v1 models (families that have not registered `forward_macs`)."""
  from vit_jax.models import deit, swin, vit  # pylint: disable=g-import-not-at-top

  cls = type(model)
  if cls in (vit.VisionTransformer, deit.DistilledVisionTransformer) and model.resnet is None and (
      model.classifier in ('token', 'gap') and not model.representation_size):
    distilled = int(cls is deit.DistilledVisionTransformer)
    return _vit_macs(image_size=image_size, patch_size=model.patch_size, hidden_size=model.hidden_size,
                     num_layers=model.num_layers, mlp_dim=model.mlp_dim,
                     extra_tokens=int(model.classifier == 'token') + distilled, heads=1 + distilled,
                     num_classes=model.num_classes)
  if cls is swin.SwinTransformer:
    return swin_forward_macs(image_size=image_size, patch_size=model.patch_size, embed_dim=model.embed_dim,
                             depths=tuple(model.depths), window_size=model.window_size, mlp_ratio=model.mlp_ratio,
                             num_classes=model.num_classes)
  return None


def model_families(model: Any) -> list[str]:
  """Registry families whose models are built by `model`'s class (usually one; e.g. ViT and DeiT share one)."""
  from vit_jax.models import registry  # pylint: disable=g-import-not-at-top

  specs = (registry.get_model_spec(n) for n in registry.list_models())
  return sorted({s.family for s in specs if s.builder is type(model)})


def model_forward_flops(model: Any, image_size: int, family: Optional[str] = None) -> tuple[float, str]:
  """(forward FLOPs per image, method) for a registry model: 'analytic' where the model's family gives a
  `forward_macs` count that applies to this configuration, 'xla' (cost analysis) otherwise.

  `family`: the model's registry family; None looks it up by the model's class.
  """
  from vit_jax.models import facts  # pylint: disable=g-import-not-at-top

  for name in [family] if family else model_families(model):
    count = facts.get_family(name).forward_macs if facts.has_family(name) else _legacy_macs
    macs = count(model, image_size) if count else None
    if macs is not None:
      return forward_flops(macs), 'analytic'
  return xla_forward_flops(model, image_size), 'xla'
