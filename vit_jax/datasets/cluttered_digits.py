"""`cluttered_digits`: scikit-learn's 8x8 digits drawn at random positions, scales and colours on a cluttered 32x32
RGB canvas, so that raw pixels classify poorly (k-NN on raw pixels: ~98% on plain digits, 49% here).

Built offline from the bundled digits, deterministically. Each example is one source digit rendered on:
  1. a background: a linear gradient between two random dark colours (channels in [0, 100]) in a random direction,
     plus pixel noise (sd 8);
  2. clutter: 0-1 fragment (a random 4x4 window of a random other digit of the same split, at the digit's scale,
     anywhere on the canvas, partly off it) and 0-1 anti-aliased line stroke, each in its own random colour;
  3. the digit on top: 12-22 px square (from 8 px, bilinear), at a uniform random position inside the canvas, in a
     random bright colour (channels in [155, 255]), so the digit is always brighter than its background while the
     clutter may be brighter or darker.
The class is the source digit's label. Splits follow `digits`: `train` renders each of digits' 1,437 train digits
COPIES['train'] = 8 times (11,496 examples), `test` each of its 360 test digits twice (720), so no source digit is in
both splits. Every split draws from its own `np.random.RandomState` (frozen by NumPy) seeded with SEED and the
split's index, so the data are the same on every machine.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vit_jax.datasets import digits, local_builder

CANVAS = 32
COPIES = {'train': 8, 'test': 2}
SEED = 1234
DIGIT_SIZE = (12.0, 22.0)      # Side of the drawn digit in pixels (the source is 8x8).
NUM_FRAGMENTS = (0, 2)         # [low, high) fragments of other digits.
NUM_STROKES = (0, 2)           # [low, high) line strokes.
FRAGMENT = 4                   # Fragment side in source (8x8) pixels.
BACKGROUND_COLOURS = (0.0, 100.0)  # Range of each channel of the background gradient's two colours.
DIGIT_COLOURS = (155.0, 255.0)     # Range of each channel of the digit's colour: always brighter than the background.
NOISE_SD = 8.0
BLOCK = 512                    # Examples rendered at once (part of the definition: it orders the draws).


def _resample_weights(offset: np.ndarray, size: np.ndarray, n: int) -> np.ndarray:
  """(B, CANVAS, n) bilinear weights along one axis: canvas pixel i of example b samples source coordinate
  (i + 0.5 - offset_b) * n / size_b - 0.5, with zeros beyond the source's edge (its border fades over one pixel)."""
  coords = (np.arange(CANVAS) + 0.5)[None, :] - offset[:, None]
  src = coords * n / size[:, None] - 0.5
  return np.maximum(0.0, 1.0 - np.abs(src[..., None] - np.arange(n)))


def _draw_scaled(sources: np.ndarray, top: np.ndarray, left: np.ndarray, size: np.ndarray) -> np.ndarray:
  """(B, CANVAS, CANVAS) coverage in [0, 1] of square `sources` (B, n, n) in [0, 1], each stretched bilinearly to
  `size` pixels with its top-left corner at (top, left): separable, rows_weights @ source @ cols_weights^T."""
  n = sources.shape[-1]
  rows, cols = _resample_weights(top, size, n), _resample_weights(left, size, n)
  return np.clip(rows @ sources @ cols.transpose(0, 2, 1), 0.0, 1.0)


def _strokes(start: np.ndarray, end: np.ndarray, width: np.ndarray) -> np.ndarray:
  """(B, CANVAS, CANVAS) coverage of line segments start -> end (B, 2) (row, col), `width` (B,) pixels wide,
  anti-aliased over one pixel."""
  grid = np.stack(np.meshgrid(np.arange(CANVAS) + 0.5, np.arange(CANVAS) + 0.5, indexing='ij'), -1)  # (H, W, 2)
  p = (grid[None] - start[:, None, None]).astype(np.float32)
  d = (end - start)[:, None, None].astype(np.float32)
  t = np.clip((p * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-9), 0.0, 1.0)
  dist = np.linalg.norm(p - t[..., None] * d, axis=-1)
  return np.clip(width[:, None, None] / 2 + 0.5 - dist, 0.0, 1.0)


def _composite(canvas: np.ndarray, coverage: np.ndarray, colour: np.ndarray) -> np.ndarray:
  """Paints `colour` (B, 3) over `canvas` (B, H, W, 3) with opacity `coverage` (B, H, W)."""
  a = coverage[..., None].astype(np.float32)
  return canvas + (colour[:, None, None, :].astype(np.float32) - canvas) * a


def _background(rng: np.random.RandomState, b: int) -> np.ndarray:
  """(b, CANVAS, CANVAS, 3): a gradient between two random colours in a random direction, plus pixel noise."""
  c0, c1 = rng.uniform(*BACKGROUND_COLOURS, size=(2, b, 3))
  angle = rng.uniform(0, 2 * np.pi, size=b)
  yy, xx = np.meshgrid(np.linspace(0, 1, CANVAS), np.linspace(0, 1, CANVAS), indexing='ij')
  proj = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy
  low, high = proj.min((1, 2), keepdims=True), proj.max((1, 2), keepdims=True)
  ramp = (proj - low) / (high - low)
  canvas = c0[:, None, None] + (c1 - c0)[:, None, None] * np.clip(ramp, 0, 1)[..., None]
  return (canvas + rng.normal(0, NOISE_SD, size=canvas.shape)).astype(np.float32)


def render(targets: np.ndarray, pool: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
  """Cluttered examples (B, CANVAS, CANVAS, 3) uint8 of the digits `targets` (B, 8, 8) in [0, 1], with clutter cut
  from `pool` (M, 8, 8) in [0, 1]; every random choice is drawn from `rng` in a fixed order (module docstring)."""
  b = len(targets)
  canvas = _background(rng, b)
  size = rng.uniform(*DIGIT_SIZE, size=b)
  num_fragments = rng.randint(*NUM_FRAGMENTS, size=b)
  for f in range(NUM_FRAGMENTS[1] - 1):  # Fragment f is drawn on the examples that have more than f of them.
    pieces = pool[rng.randint(len(pool), size=b)]
    r, c = rng.randint(0, 8 - FRAGMENT + 1, size=(2, b))
    windows = np.stack([p[i:i + FRAGMENT, j:j + FRAGMENT] for p, i, j in zip(pieces, r, c)])
    piece_size = size * FRAGMENT / 8
    top, left = rng.uniform(0, 1, size=(2, b)) * CANVAS - piece_size / 2  # May hang off the canvas.
    coverage = _draw_scaled(windows, top, left, piece_size) * (f < num_fragments)[:, None, None]
    canvas = _composite(canvas, coverage, rng.uniform(0, 255, size=(b, 3)))
  num_strokes = rng.randint(*NUM_STROKES, size=b)
  for s in range(NUM_STROKES[1] - 1):
    start, end = rng.uniform(0, CANVAS, size=(2, b, 2))
    coverage = _strokes(start, end, rng.uniform(1.0, 2.0, size=b)) * (s < num_strokes)[:, None, None]
    canvas = _composite(canvas, coverage, rng.uniform(0, 255, size=(b, 3)))
  colour = rng.uniform(*DIGIT_COLOURS, size=(b, 3))
  top, left = rng.uniform(0, 1, size=(2, b)) * (CANVAS - size)
  canvas = _composite(canvas, _draw_scaled(targets, top, left, size), colour)
  return np.round(np.clip(canvas, 0, 255)).astype(np.uint8)


def generate_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, CANVAS, CANVAS, 3), labels int64 (N,)) of `split`, exactly as the builder writes them:
  the split's source digits repeated COPIES[split] times, rendered in blocks of BLOCK with one RandomState."""
  images8, labels = digits._load_digits()  # pylint: disable=protected-access  (the same bundled source)
  sources = np.tile(digits.split_indices()[split], COPIES[split])
  pool = images8[digits.split_indices()[split], ..., 0].astype(np.float64) / 255.0
  all_digits = images8[sources, ..., 0].astype(np.float64) / 255.0
  rng = np.random.RandomState([SEED, sorted(COPIES).index(split)])
  images = np.concatenate([render(all_digits[i:i + BLOCK], pool, rng) for i in range(0, len(sources), BLOCK)])
  return images, labels[sources].astype(np.int64)


class ClutteredDigits(local_builder.LocalCodePath, local_builder.ArrayRecordFormat,
                      tfds.core.GeneratorBasedBuilder):
  """Digits on a cluttered 32x32 RGB canvas (10 classes), 11,496 train / 720 test, prepared without a download."""

  VERSION = tfds.core.Version('3.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: 4 train / 2 test renderings per digit, seed 1234.',
                   '2.0.0': 'Less clutter (2-4 fragments, 1-2 strokes) and larger digits (14-22 px), so that a tiny '
                            'ViT learns it in a few hundred steps; raw pixels still fail.',
                   '3.0.0': 'Easier and larger, because a tiny ViT from scratch stayed at chance on 2.0.0 within the '
                            'SSL study budget: 0-1 fragment, 0-1 stroke, 12-22 px digits, contrast 150, noise sd 8, '
                            '8 train renderings per digit (11,496); a dark background and a bright digit of random '
                            'hues.',
                   '3.1.0': 'Stored as ArrayRecord (read by index); the same examples as 3.0.0.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(CANVAS, CANVAS, 3), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # Nothing to download: the digits ship with scikit-learn.
    return {split: self._generate_examples(split) for split in COPIES}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    images, labels = generate_split(split)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image, 'label': int(label)}
