"""`digits`: scikit-learn's bundled 8x8 handwritten digits as a TFDS dataset.

A tiny, download-free dataset for smoke tests and CPU experiments. The 1,797 images (0..16 grey levels) ship with
scikit-learn, so `tfds.builder('digits', data_dir=...).download_and_prepare()` works offline.

Split (fixed forever; changing it is a new version): `np.random.RandomState(0).permutation(1797)`; the first 360
permuted indices form `test`, the other 1,437 form `train`. RandomState's stream is frozen by NumPy, so the split is
the same on every machine and NumPy version.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vit_jax.datasets import local_builder

NUM_EXAMPLES = 1797
NUM_TEST = 360
NUM_TRAIN = NUM_EXAMPLES - NUM_TEST  # 1437
SPLIT_SEED = 0


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 (N, 8, 8, 1) scaled 0..16 -> 0..255 with rounding, labels int64 (N,))."""
  from sklearn import datasets as sk_datasets  # Imported lazily: only needed to generate the data.
  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int64)


def split_indices() -> dict[str, np.ndarray]:
  """The fixed train/test indices into sklearn's `load_digits()` arrays (documented in the module docstring)."""
  perm = np.random.RandomState(SPLIT_SEED).permutation(NUM_EXAMPLES)
  return {'train': np.sort(perm[NUM_TEST:]), 'test': np.sort(perm[:NUM_TEST])}


class Digits(local_builder.LocalCodePath, local_builder.ArrayRecordFormat, tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits (10 classes), 1,437 train / 360 test, prepared without a download."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: seeded 1,437/360 train/test split.',
                   '1.1.0': 'Stored as ArrayRecord (read by index); the same examples.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage=('https://scikit-learn.org/stable/datasets/toy_dataset.html'
                  '#optical-recognition-of-handwritten-digits-dataset'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    images, labels = _load_digits()
    if len(images) != NUM_EXAMPLES:
      raise ValueError(f'Expected {NUM_EXAMPLES} digits from scikit-learn, got {len(images)}.')
    return {name: self._generate_examples(images, labels, idx) for name, idx in split_indices().items()}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                         indices: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
    for i in indices:
      yield int(i), {'image': images[i], 'label': int(labels[i])}
