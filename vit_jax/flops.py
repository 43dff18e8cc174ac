"""Analytic FLOP accounting (REFERENCE.md section 4): multiply-adds per image, FLOPs = 2 x MACs, training = 3 x fwd.

Imports only jax/flax-free code so the benchmark and the scaling-law ledger can use it anywhere.
"""
from __future__ import annotations

TRAIN_TO_FORWARD = 3  # Backward costs about twice the forward pass.


def vit_forward_macs(*, image_size: int, patch_size: int, hidden_size: int, num_layers: int, mlp_dim: int,
                     num_classes: int = 1000, has_cls: bool = True) -> float:
  """Multiply-adds of one ViT forward pass on one image: patch embedding, encoder blocks and head.

  Per block: 4*N*D^2 (qkv and output projections) + 2*N*D*M (MLP) + 2*N^2*D (scores and weighted sum).
  """
  if image_size % patch_size:
    raise ValueError(f'image_size={image_size} is not divisible by patch_size={patch_size}.')
  patches = (image_size // patch_size) ** 2
  n, d = patches + int(has_cls), hidden_size
  embed = patches * patch_size * patch_size * 3 * d
  block = 4 * n * d * d + 2 * n * d * mlp_dim + 2 * n * n * d
  return float(embed + num_layers * block + d * num_classes)


def forward_flops(macs: float) -> float:
  """FLOPs of a forward pass from its multiply-adds."""
  return 2.0 * macs


def train_flops(macs: float) -> float:
  """FLOPs of one training step on one image (forward + backward) from the forward multiply-adds."""
  return TRAIN_TO_FORWARD * forward_flops(macs)
