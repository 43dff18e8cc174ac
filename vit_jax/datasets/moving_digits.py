"""`moving_digits`: short clips of one of scikit-learn's 8x8 digits gliding across a noisy 16x16 RGB canvas; the
label is the direction of motion (0 right, 1 left, 2 down, 3 up), so no single frame, and no order-free summary of
the frames, can tell it: a clip moving right is, frame for frame, one moving left played backwards. A model that
averages per-frame predictions can at best tell horizontal from vertical (50%); a video model can reach 100%.

Built offline from the bundled digits, deterministically. Each clip: FRAMES frames; the digit (8x8, a random
colour contrasting with the background grey level by at least MIN_CONTRAST per channel where the range allows)
starts within [0, 0.5) px of the canvas edge it leaves from, at a uniform random position across the motion axis,
and moves SPEED px per frame (bilinear, so sub-pixel steps blur as real motion does); background grey level
random, pixel noise sd NOISE_SD. Splits follow
`digits`: `train` renders each of its 1,437 train digits COPIES['train'] times, `test` each of its 360 test digits
COPIES['test'] times, so no source digit is in both; one `np.random.RandomState` per split, seeded by SEED and the
split's index.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vit_jax.datasets import digits, local_builder

CANVAS = 16
FRAMES = 16
SPEED = 0.5          # Pixels per frame: 7.5 px over the clip.
NOISE_SD = 20.0
MIN_CONTRAST = 100.0
COPIES = {'train': 2, 'test': 2}
SEED = 4321
DIRECTIONS = ('right', 'left', 'down', 'up')


def _weights(offset: np.ndarray) -> np.ndarray:
  """(B, CANVAS, 8) bilinear weights placing an 8-pixel source at float `offset` (B,) along one canvas axis."""
  src = (np.arange(CANVAS) + 0.5)[None, :] - offset[:, None] - 0.5
  return np.maximum(0.0, 1.0 - np.abs(src[..., None] - np.arange(8)))


def render(sources: np.ndarray, direction: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
  """Clips (B, FRAMES, CANVAS, CANVAS, 3) uint8 of digits `sources` (B, 8, 8) in [0, 1] moving in `direction`
  (B,) (indices into DIRECTIONS); the other random choices are drawn from `rng` in a fixed order."""
  b = len(sources)
  travel = SPEED * (FRAMES - 1)
  start = rng.uniform(0, CANVAS - 8 - travel, size=b)
  across = rng.uniform(0, CANVAS - 8, size=b)
  grey = rng.uniform(0, 255, size=b)
  sign = np.where(grey > 127.5, -1.0, 1.0)[:, None]  # The digit is darker than a light background, and so on.
  colour = np.clip(grey[:, None] + sign * rng.uniform(MIN_CONTRAST, 255, size=(b, 3)), 0, 255)
  clips = np.empty((b, FRAMES, CANVAS, CANVAS, 3), np.float32)
  forward = (direction == 0) | (direction == 2)
  horizontal = direction < 2
  for f in range(FRAMES):
    along = np.where(forward, start + SPEED * f, CANVAS - 8 - start - SPEED * f)
    rows = _weights(np.where(horizontal, across, along))
    cols = _weights(np.where(horizontal, along, across))
    cover = np.clip(rows @ sources @ cols.transpose(0, 2, 1), 0, 1)[..., None]
    frame = grey[:, None, None, None] + (colour[:, None, None, :] - grey[:, None, None, None]) * cover
    clips[:, f] = frame + rng.normal(0, NOISE_SD, size=frame.shape)
  return np.round(np.clip(clips, 0, 255)).astype(np.uint8)


def generate_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(clips uint8 (N, FRAMES, CANVAS, CANVAS, 3), labels int64 (N,)) of `split`, exactly as the builder writes."""
  images8, _ = digits._load_digits()  # pylint: disable=protected-access  (the same bundled source)
  sources = np.tile(digits.split_indices()[split], COPIES[split])
  rng = np.random.RandomState([SEED, sorted(COPIES).index(split)])
  direction = rng.randint(len(DIRECTIONS), size=len(sources))
  clips = render(images8[sources, ..., 0].astype(np.float64) / 255.0, direction, rng)
  return clips, direction.astype(np.int64)


class MovingDigits(local_builder.LocalCodePath, local_builder.ArrayRecordFormat,
                   tfds.core.GeneratorBasedBuilder):
  """Clips of a moving digit (4 classes: direction), 2,874 train / 720 test, prepared without a download."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: 16 frames of 16x16, 0.5 px per frame, seed 4321.',
                   '1.1.0': 'Stored as ArrayRecord (read by index); the same examples.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'video': tfds.features.Video(shape=(FRAMES, CANVAS, CANVAS, 3)),
            'label': tfds.features.ClassLabel(names=list(DIRECTIONS)),
        }),
        supervised_keys=('video', 'label'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # Nothing to download: the digits ship with scikit-learn.
    return {split: self._generate_examples(split) for split in COPIES}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    clips, labels = generate_split(split)
    for i, (clip, label) in enumerate(zip(clips, labels)):
      yield i, {'video': clip, 'label': int(label)}
