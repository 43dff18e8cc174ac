"""Mixup and CutMix on a device batch (jax, inside the jitted step), with soft targets.

Follows timm's `Mixup` in 'batch' mode, the one DeiT uses: one lambda per batch; each example is mixed with the
example at the mirrored batch position (`x[::-1]`). With probability `prob` the batch is mixed at all; if both
alphas are positive, CutMix is chosen with probability `switch_prob`, else Mixup. Mixup: lam ~ Beta(a_m, a_m),
x = lam * x + (1 - lam) * x[::-1]. CutMix: lam ~ Beta(a_c, a_c), a box of side int(H * sqrt(1 - lam)) (and W
alike) centred uniformly, clipped to the image, is pasted from x[::-1], and lam is corrected to the exact unpasted
area (timm's correct_lam). Targets mix with the same lam. DeiT: mixup 0.8, cutmix 1.0, switch 0.5, prob 1.0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """(H, W) float mask, 1 inside the box to paste, and the corrected lam = 1 - box area / (H * W)."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  box = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).astype(jnp.float32)
  area = (y1 - y0) * (x1 - x0)
  return box, 1.0 - area.astype(jnp.float32) / (height * width)


def mix_batch(rng: jax.Array, images: jax.Array, targets: jax.Array, *, mixup_alpha: float, cutmix_alpha: float,
              switch_prob: float = 0.5, prob: float = 1.0) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Mixes NHWC `images` and (B, K) soft `targets` with their mirrored batch; returns them and {'lam', 'cutmix'}.

  Videos (B, T, H, W, C) mix clip with clip (cutmix: the same box in every frame); spectrograms (B, F, T, 1) as images.

  With both alphas 0 the batch is returned unchanged (lam 1).
  """
  if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= switch_prob <= 1 or not 0 <= prob <= 1:
    raise ValueError(f'Bad mixup settings: mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha} must be >= 0, '
                     f'switch_prob={switch_prob} and prob={prob} in [0, 1].')
  if mixup_alpha == 0 and cutmix_alpha == 0:
    return images, targets, {'lam': jnp.float32(1.0), 'cutmix': jnp.bool_(False)}
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.bool_(cutmix_alpha > 0)
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
  apply = jax.random.uniform(k_apply) < prob
  height, width = images.shape[-3:-1]
  box, lam_box = cutmix_box(k_box, lam_cut, height, width)
  lam = jnp.where(use_cutmix, lam_box, lam_mix).astype(jnp.float32)
  lam = jnp.where(apply, lam, 1.0)
  partner = images[::-1]
  pasted = images + (partner - images) * box[None, :, :, None].astype(images.dtype)
  blended = images * lam.astype(images.dtype) + partner * (1 - lam).astype(images.dtype)
  mixed = jnp.where(apply & use_cutmix, pasted, jnp.where(apply, blended, images))
  mixed_targets = targets * lam + targets[::-1] * (1.0 - lam)
  return mixed, mixed_targets, {'lam': lam, 'cutmix': apply & use_cutmix}
