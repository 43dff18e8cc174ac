"""A video baseline: an image ViT applied to every frame, its logits (or pooled features) averaged over time.

Its parameters are exactly an image ViT's (`vit.VisionTransformer`, registry family 'vit'), so image checkpoints
load unchanged. It cannot see the order of the frames: the control that tells whether a video dataset needs time
(experiments/video_digits.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vit_jax.models import registry
from vit_jax.models import vit

Array = jax.Array


class FrameAveragedViT(vit.VisionTransformer):
  """`vit.VisionTransformer` on NTHWC clips: each frame classified on its own, the outputs averaged over frames."""
  num_frames: int = 8

  def input_shape(self, image_size: int) -> tuple[int, ...]:
    """One example's shape at frame size `image_size`: (num_frames, image_size, image_size, 3)."""
    return (self.num_frames, image_size, image_size, 3)

  def __call__(self, video: Array, *, train: bool = False) -> Array:
    """Mean over frames of the image ViT's float32 logits (pooled features when num_classes == 0)."""
    if video.ndim != 5:
      raise ValueError(f'FrameAveragedViT takes NTHWC videos (batch, frames, height, width, channels), got shape '
                       f'{video.shape}.')
    b, t = video.shape[:2]
    out = super().__call__(video.reshape((b * t,) + video.shape[2:]), train=train)
    return jnp.mean(out.reshape((b, t) + out.shape[1:]), axis=1)


# The image ViT of vivit_pico's and timesformer_pico's width and depth (16 px frames, 4x4 patches).
registry.register_model('vit_frames_pico', FrameAveragedViT, family='vit', image_size=16, num_params=None,
                        num_frames=8, patch_size=4, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128,
                        classifier='token')
