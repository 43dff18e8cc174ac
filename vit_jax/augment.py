"""Per-example image augmentations for the tf.data train pipeline: RandAugment and random erasing.

Everything is stateless (explicit seeds), so the pipeline stays deterministic given its seed.

RandAugment (Cubuk et al. 2019, https://arxiv.org/abs/1909.13719) as in the reference TF implementation that
big_vision / AugReg use (tensorflow/tpu EfficientNet `distort_image_with_randaugment`): for each of N layers one op
is drawn uniformly from the 16 `OPS` and applied at the shared magnitude M, mapped by `op_value` with level M / 10:
  Rotate 30 * level degrees, ShearX/Y 0.3 * level, TranslateX/Y 100 * level px (at 224 px: scaled to the image
  side), each with a random sign; Posterize int(4 * level) bits; Solarize threshold int(256 * level); SolarizeAdd
  int(110 * level) added below 128; Color/Contrast/Brightness/Sharpness blend factor 1.8 * level + 0.1; Cutout a
  square of half-side int(40 * level) px (at 224 px) filled with grey 128; AutoContrast, Equalize, Invert take
  no magnitude. Geometric ops use nearest sampling and fill with grey 128. One difference from the reference:
  Contrast blends towards the true grey-level mean (as PIL does), not the reference's histogram-sum bug.

Random erasing (Zhong et al. 2017) as timm's `RandomErasing(mode='pixel')` that DeiT uses: with probability p one
box of area 2%..33.3% of the image and aspect ratio log-uniform in [0.3, 3.33] (up to 10 tries to fit) is filled
with per-pixel standard-normal noise; applied to the normalised image.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import tensorflow as tf

OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color', 'Contrast', 'Brightness',
       'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd')
SIGNED_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')
_MAX_LEVEL = 10.0
_REFERENCE_SIZE = 224  # The reference's translate (100 px) and cutout (40 px) constants are for 224 px images.
_FILL = 128

ERASE_AREA = (0.02, 1 / 3)
ERASE_ASPECT = (0.3, 1 / 0.3)
ERASE_ATTEMPTS = 10


def op_value(name: str, magnitude: float, image_size: int = _REFERENCE_SIZE) -> float:
  """The (unsigned) argument op `name` gets at RandAugment magnitude `magnitude` on `image_size` px images."""
  level = magnitude / _MAX_LEVEL
  scale = image_size / _REFERENCE_SIZE
  table = {
      'Rotate': 30.0 * level, 'ShearX': 0.3 * level, 'ShearY': 0.3 * level,
      'TranslateX': 100.0 * level * scale, 'TranslateY': 100.0 * level * scale,
      'Posterize': int(4 * level), 'Solarize': int(256 * level), 'SolarizeAdd': int(110 * level),
      'Cutout': int(40 * level * scale),
      'Color': 1.8 * level + 0.1, 'Contrast': 1.8 * level + 0.1, 'Brightness': 1.8 * level + 0.1,
      'Sharpness': 1.8 * level + 0.1,
      'AutoContrast': 0.0, 'Equalize': 0.0, 'Invert': 0.0,
  }
  if name not in table:
    raise ValueError(f'Unknown RandAugment op {name!r}; the ops are {OPS}.')
  return table[name]


# ---------------------------------------------------------------------------------------------------------------------
# Ops on uint8 (H, W, 3) images.


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: Any) -> tf.Tensor:
  """degenerate + factor * (image - degenerate), clipped to [0, 255] (factor 0: degenerate, 1: image)."""
  d, x = tf.cast(degenerate, tf.float32), tf.cast(image, tf.float32)
  return tf.cast(tf.clip_by_value(d + factor * (x - d), 0.0, 255.0), tf.uint8)


def _projective(image: tf.Tensor, transform: list[Any]) -> tf.Tensor:
  """Output pixel (x, y) samples input ((a0 x + a1 y + a2), (b0 x + b1 y + b2)); nearest, grey outside."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  transform = tf.cast(tf.stack([tf.cast(t, tf.float32) for t in transform])[None], tf.float32)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform, output_shape=tf.stack([h, w]), fill_value=float(_FILL),
      interpolation='NEAREST', fill_mode='CONSTANT')
  return tf.ensure_shape(out[0], image.shape)


def rotate(image: tf.Tensor, degrees: Any) -> tf.Tensor:
  """Counter-clockwise rotation about the image centre."""
  rad = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cos, sin = tf.cos(rad), tf.sin(rad)
  x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
  y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
  return _projective(image, [cos, -sin, x_off, sin, cos, y_off, 0.0, 0.0])


def shear_x(image: tf.Tensor, level: Any) -> tf.Tensor:
  return _projective(image, [1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image: tf.Tensor, level: Any) -> tf.Tensor:
  return _projective(image, [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0])


def translate_x(image: tf.Tensor, pixels: Any) -> tf.Tensor:
  """Output column x shows input column x + pixels (content moves left for positive pixels)."""
  return _projective(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image: tf.Tensor, pixels: Any) -> tf.Tensor:
  return _projective(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0])


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Per channel, stretch [min, max] to [0, 255] (channels with max == min are left alone)."""
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-6), 1.0)
  offset = tf.where(hi > lo, -lo * scale, 0.0)
  return tf.cast(tf.clip_by_value(x * scale + offset, 0.0, 255.0), tf.uint8)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  hist = tf.histogram_fixed_width(tf.cast(channel, tf.int32), [0, 255], nbins=256)
  nonzero = tf.boolean_mask(hist, hist != 0)
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
  lut = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
  lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
  return tf.where(step == 0, channel, tf.cast(tf.gather(lut, tf.cast(channel, tf.int32)), tf.uint8))


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Per-channel histogram equalisation (PIL ImageOps.equalize)."""
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  """Keep the top `bits` bits of every value (0 bits: black)."""
  shift = 8 - max(0, min(8, int(bits)))
  if shift == 8:
    return tf.zeros_like(image)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image: tf.Tensor, threshold: int) -> tf.Tensor:
  """Invert every value >= threshold."""
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)  # int32: thresholds reach 256.


def solarize_add(image: tf.Tensor, addition: int, threshold: int = 128) -> tf.Tensor:
  """Add `addition` (clipped to 255) to every value below threshold."""
  added = tf.cast(tf.clip_by_value(tf.cast(image, tf.int32) + addition, 0, 255), tf.uint8)
  return tf.where(tf.cast(image, tf.int32) < threshold, added, image)


def _grey(image: tf.Tensor) -> tf.Tensor:
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def color(image: tf.Tensor, factor: Any) -> tf.Tensor:
  return _blend(_grey(image), image, factor)


def contrast(image: tf.Tensor, factor: Any) -> tf.Tensor:
  mean = tf.reduce_mean(tf.cast(tf.image.rgb_to_grayscale(image), tf.float32))
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: Any) -> tf.Tensor:
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: Any) -> tf.Tensor:
  """Blend with a 3x3 smoothed image (PIL's SMOOTH kernel; the one-pixel border keeps the original)."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding='VALID')[0]
  smooth = tf.cast(tf.clip_by_value(smooth, 0.0, 255.0), tf.uint8)
  inner = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(inner, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
  return _blend(degenerate, image, factor)


def cutout(image: tf.Tensor, pad: int, seed: tf.Tensor) -> tf.Tensor:
  """Fill the square [cy - pad, cy + pad) x [cx - pad, cx + pad) (clipped), centre uniform, with grey 128."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  cy = tf.random.stateless_uniform([], seed, 0, h, dtype=tf.int32)
  cx = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, 1), 0, w, dtype=tf.int32)
  rows, cols = tf.range(h)[:, None], tf.range(w)[None, :]
  inside = (rows >= cy - pad) & (rows < cy + pad) & (cols >= cx - pad) & (cols < cx + pad)
  return tf.where(inside[:, :, None], tf.cast(_FILL, image.dtype), image)


def apply_op(image: tf.Tensor, name: str, value: Any, seed: tf.Tensor) -> tf.Tensor:
  """Applies op `name` with argument `value` (signed where it has a direction) to a uint8 image."""
  ops: dict[str, Callable[[], tf.Tensor]] = {
      'AutoContrast': lambda: autocontrast(image), 'Equalize': lambda: equalize(image),
      'Invert': lambda: invert(image), 'Rotate': lambda: rotate(image, value),
      'Posterize': lambda: posterize(image, value), 'Solarize': lambda: solarize(image, value),
      'Color': lambda: color(image, value), 'Contrast': lambda: contrast(image, value),
      'Brightness': lambda: brightness(image, value), 'Sharpness': lambda: sharpness(image, value),
      'ShearX': lambda: shear_x(image, value), 'ShearY': lambda: shear_y(image, value),
      'TranslateX': lambda: translate_x(image, value), 'TranslateY': lambda: translate_y(image, value),
      'Cutout': lambda: cutout(image, value, seed), 'SolarizeAdd': lambda: solarize_add(image, value),
  }
  if name not in ops:
    raise ValueError(f'Unknown RandAugment op {name!r}; the ops are {OPS}.')
  return ops[name]()


def randaugment(image: tf.Tensor, num_layers: int, magnitude: float, seed: tf.Tensor, *,
                return_trace: bool = False) -> tf.Tensor | tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """RandAugment(N=num_layers, M=magnitude) of a uint8 (H, W, 3) image with a static size.

  With `return_trace`, also returns the chosen op indices into `OPS` (N,) and their signed values (N,).
  """
  if image.dtype != tf.uint8:
    raise ValueError(f'randaugment works on uint8 images, got {image.dtype}.')
  size = image.shape[0]
  if size is None:
    raise ValueError('randaugment needs a static image height (crop/resize before augmenting).')
  indices, values = [], []
  for layer in range(num_layers):
    layer_seed = tf.random.experimental.stateless_fold_in(seed, layer)
    op_seed, sign_seed, cut_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 3))
    index = tf.random.stateless_uniform([], op_seed, 0, len(OPS), dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    branch_values = [sign * op_value(n, magnitude, size) if n in SIGNED_OPS else op_value(n, magnitude, size)
                     for n in OPS]
    branches = [lambda n=n, v=v: apply_op(image, n, v, cut_seed) for n, v in zip(OPS, branch_values)]
    image = tf.ensure_shape(tf.switch_case(index, branches), image.shape)
    indices.append(index)
    values.append(tf.gather(tf.stack([tf.cast(v, tf.float32) for v in branch_values]), index))
  if return_trace:
    return image, tf.stack(indices) if indices else tf.zeros([0], tf.int32), (
        tf.stack(values) if values else tf.zeros([0], tf.float32))
  return image


def randaugment_float(image: tf.Tensor, num_layers: int, magnitude: float, seed: tf.Tensor) -> tf.Tensor:
  """RandAugment of a float32 image in [0, 255] (rounded to uint8 for the ops); returns float32 in [0, 255]."""
  pixels = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
  return tf.cast(randaugment(pixels, num_layers, magnitude, seed), tf.float32)


def random_erasing(image: tf.Tensor, prob: float, seed: tf.Tensor) -> tf.Tensor:
  """timm RandomErasing(probability=prob, mode='pixel', max_count=1) of a float (H, W, C) normalised image."""
  h, w, c = image.shape
  if h is None or w is None:
    raise ValueError('random_erasing needs a static image size.')
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 6))
  apply = tf.random.stateless_uniform([], seeds[0]) < prob
  area = tf.random.stateless_uniform([ERASE_ATTEMPTS], seeds[1], *ERASE_AREA) * (h * w)
  log_aspect = tf.random.stateless_uniform([ERASE_ATTEMPTS], seeds[2], math.log(ERASE_ASPECT[0]),
                                           math.log(ERASE_ASPECT[1]))
  aspect = tf.exp(log_aspect)
  eh = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  ew = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (eh < h) & (ew < w)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # First attempt that fits, as timm's loop.
  apply &= tf.reduce_any(fits)
  eh, ew = eh[first], ew[first]
  u = tf.random.stateless_uniform([2], seeds[3])
  top = tf.minimum(tf.cast(u[0] * tf.cast(h - eh + 1, tf.float32), tf.int32), h - eh)
  left = tf.minimum(tf.cast(u[1] * tf.cast(w - ew + 1, tf.float32), tf.int32), w - ew)
  rows, cols = tf.range(h)[:, None], tf.range(w)[None, :]
  box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew) & apply
  noise = tf.random.stateless_normal(tf.shape(image), seeds[4], dtype=image.dtype)
  return tf.where(box[:, :, None], noise, image)


# ---------------------------------------------------------------------------------------------------------------------
# DINO's multi-crop views (facebookresearch/dino main_dino.py `DataAugmentationDINO`), on float (H, W, 3) images in
# [0, 255]. Per view: random resized crop (bicubic), flip p 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) in random
# order p 0.8, grayscale p 0.2, Gaussian blur (sigma 0.1..2) p 1.0 / 0.1 / 0.5 (global 1 / global 2 / locals),
# solarise p 0.2 on global 2 only. Float arithmetic throughout (torchvision's PIL path rounds to uint8 per op).

GLOBAL_CROP_SCALE = (0.4, 1.0)
LOCAL_CROP_SCALE = (0.05, 0.4)
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
BLUR_SIGMA = (0.1, 2.0)  # DINO's, in pixels of 224 px global and 96 px local views (config.dataset.blur_sigma).
MAX_BLUR_SIGMA = 5.0     # The largest sigma a config may ask for (the kernel spans 3 sigma each side).
_GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert('L') and torchvision.


def random_resized_crop(image: tf.Tensor, size: int, scale: tuple[float, float], seed: tf.Tensor) -> tf.Tensor:
  """A random crop of `scale` (fraction of the area) with aspect ratio 3/4..4/3, resized bicubically to size."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.zeros([0, 0, 4], tf.float32), seed=seed, min_object_covered=0.0,
      aspect_ratio_range=(3 / 4, 4 / 3), area_range=scale, use_image_if_no_bounding_boxes=True)
  crop = tf.cast(tf.slice(image, begin, crop_size), tf.float32)
  crop.set_shape([None, None, 3])
  return tf.clip_by_value(tf.image.resize(crop, [size, size], method='bicubic'), 0.0, 255.0)


def grayscale(image: tf.Tensor) -> tf.Tensor:
  """Luma 0.299 R + 0.587 G + 0.114 B, repeated over 3 channels (float in, float out)."""
  grey = tf.tensordot(image, tf.constant(_GREY_WEIGHTS, image.dtype), axes=[[-1], [0]])[..., None]
  return tf.tile(grey, [1, 1, 3])


def adjust_brightness(image: tf.Tensor, factor: Any) -> tf.Tensor:
  """image * factor, clipped to [0, 255] (torchvision: blend with black)."""
  return tf.clip_by_value(image * factor, 0.0, 255.0)


def adjust_contrast(image: tf.Tensor, factor: Any) -> tf.Tensor:
  """Blend with the image's mean grey level: mean + factor * (image - mean), clipped."""
  mean = tf.reduce_mean(grayscale(image)[..., 0])
  return tf.clip_by_value(mean + factor * (image - mean), 0.0, 255.0)


def adjust_saturation(image: tf.Tensor, factor: Any) -> tf.Tensor:
  """Blend with the image's grayscale version: grey + factor * (image - grey), clipped."""
  grey = grayscale(image)
  return tf.clip_by_value(grey + factor * (image - grey), 0.0, 255.0)


def adjust_hue(image: tf.Tensor, delta: Any) -> tf.Tensor:
  """Rotates the hue by `delta` turns (in [-0.5, 0.5]) in HSV space."""
  return tf.clip_by_value(tf.image.adjust_hue(image / 255.0, delta) * 255.0, 0.0, 255.0)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, strength: tuple[float, float, float, float] = JITTER
                 ) -> tf.Tensor:
  """torchvision ColorJitter: brightness/contrast/saturation factors U(1 - s, 1 + s), hue U(-h, h), random order."""
  b, c, s, h = strength
  draws = tf.random.stateless_uniform([5], seed=seed)
  factors = [1 - b + 2 * b * draws[0], 1 - c + 2 * c * draws[1], 1 - s + 2 * s * draws[2], -h + 2 * h * draws[3]]
  order = tf.argsort(tf.random.stateless_uniform([4], seed=tf.random.experimental.stateless_fold_in(seed, 1)))
  ops = [lambda x: adjust_brightness(x, factors[0]), lambda x: adjust_contrast(x, factors[1]),
         lambda x: adjust_saturation(x, factors[2]), lambda x: adjust_hue(x, factors[3])]
  for i in range(4):
    image = tf.switch_case(order[i], [lambda op=op: op(image) for op in ops])
    image.set_shape([None, None, 3])
  return image


def gaussian_blur(image: tf.Tensor, sigma: Any, max_sigma: float = BLUR_SIGMA[1]) -> tf.Tensor:
  """Separable Gaussian blur with standard deviation `sigma` px (<= max_sigma, which sizes the kernel to 3 max_sigma
  each side), reflect padding at the edges."""
  radius = int(math.ceil(3 * max_sigma))
  taps = tf.range(-radius, radius + 1, dtype=tf.float32)
  weights = tf.exp(-0.5 * tf.square(taps / tf.cast(sigma, tf.float32)))
  weights = weights / tf.reduce_sum(weights)
  x = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode='SYMMETRIC')
  kernel = tf.tile(weights[:, None, None, None], [1, 1, 3, 1])  # (taps, 1, channels, 1)
  x = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], 'VALID')
  x = tf.nn.depthwise_conv2d(x, tf.transpose(kernel, [1, 0, 2, 3]), [1, 1, 1, 1], 'VALID')
  return x[0]


def solarize_float(image: tf.Tensor, threshold: float = 128.0) -> tf.Tensor:
  """PIL ImageOps.solarize on [0, 255] floats: values >= threshold become 255 - value."""
  return tf.where(image < threshold, image, 255.0 - image)


def _maybe(image: tf.Tensor, prob: float, fn: Callable[[tf.Tensor], tf.Tensor], seed: tf.Tensor) -> tf.Tensor:
  """fn(image) with probability prob (decided by `seed`), else image."""
  if prob <= 0:
    return image
  if prob >= 1:
    return fn(image)
  apply = tf.random.stateless_uniform([], seed=seed) < prob
  return tf.cond(apply, lambda: fn(image), lambda: image)


def dino_view(image: tf.Tensor, size: int, scale: tuple[float, float], seed: tf.Tensor, *, blur_prob: float,
              solarize_prob: float, blur_sigma: tuple[float, float] = BLUR_SIGMA) -> tf.Tensor:
  """One DINO view of a [0, 255] image: crop, flip, jitter p 0.8, grey p 0.2, blur (sigma uniform in blur_sigma
  px), solarise; float [0, 255]."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 8))
  x = random_resized_crop(image, size, scale, seeds[0])
  x = tf.image.stateless_random_flip_left_right(x, seed=seeds[1])
  x = _maybe(x, 0.8, lambda y: color_jitter(y, seeds[2]), seeds[3])
  x = _maybe(x, 0.2, grayscale, seeds[4])
  lo, hi = blur_sigma
  sigma = lo + (hi - lo) * tf.random.stateless_uniform([], seed=tf.random.experimental.stateless_fold_in(seeds[5], 1))
  x = _maybe(x, blur_prob, lambda y: gaussian_blur(y, sigma, max_sigma=hi), seeds[5])
  x = _maybe(x, solarize_prob, solarize_float, seeds[6])
  x.set_shape([size, size, 3])
  return x


def dino_multicrop(image: tf.Tensor, seed: tf.Tensor, *, global_size: int, local_size: int, num_local: int,
                   global_scale: tuple[float, float] = GLOBAL_CROP_SCALE,
                   local_scale: tuple[float, float] = LOCAL_CROP_SCALE,
                   blur_sigma: tuple[float, float] = BLUR_SIGMA) -> tuple[tf.Tensor, tf.Tensor]:
  """(2, global_size, global_size, 3) and (num_local, local_size, local_size, 3) DINO views, [0, 255] floats.

  Global view 1: blur p 1.0; global view 2: blur p 0.1 and solarise p 0.2; local views: blur p 0.5; the blur's sigma
  is uniform in `blur_sigma` pixels.
  """
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 2 + max(num_local, 1)))
  globals_ = tf.stack([dino_view(image, global_size, global_scale, seeds[0], blur_prob=1.0, solarize_prob=0.0,
                                 blur_sigma=blur_sigma),
                       dino_view(image, global_size, global_scale, seeds[1], blur_prob=0.1, solarize_prob=0.2,
                                 blur_sigma=blur_sigma)])
  if num_local:
    locals_ = tf.stack([dino_view(image, local_size, local_scale, seeds[2 + i], blur_prob=0.5, solarize_prob=0.0,
                                  blur_sigma=blur_sigma) for i in range(num_local)])
  else:
    locals_ = tf.zeros([0, local_size, local_size, 3], tf.float32)
  return globals_, locals_
