"""`synthetic_sounds`: half-second 8 kHz clips of synthesised sounds in noise; the class lies in how the spectrum
moves over time, so neither the average spectrum nor the loudness alone tells all of them apart.

Classes (8): 0 rising chirp, 1 falling chirp (same frequency range and energy as 0: only the order differs),
2 steady tone, 3 pulsed tone (amplitude-modulated at 6-12 Hz), 4 low then high tone, 5 high then low tone (4 and 5:
the same two tones, swapped), 6 noise burst in the first half, 7 noise burst in the second half. Frequencies are
drawn per clip within 300-3,000 Hz; each clip has a random level and white noise at a random SNR of 0-20 dB.
Built offline with numpy, deterministically: one `np.random.RandomState` per split seeded with SEED and the split's
index; `train` has NUM['train'] clips, `test` NUM['test'], classes drawn uniformly. Waveforms are int16, as TFDS's
speech_commands, so the same input pipeline reads both.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vit_jax.datasets import local_builder

SAMPLE_RATE = 8000
SAMPLES = 4000       # 0.5 s.
NUM = {'train': 3200, 'test': 800}
SEED = 2468
CLASSES = ('rising_chirp', 'falling_chirp', 'steady_tone', 'pulsed_tone', 'low_high', 'high_low',
           'early_burst', 'late_burst')
BAND = (300.0, 3000.0)


def _phase(freq: np.ndarray) -> np.ndarray:
  """Phase (radians) of a tone whose instantaneous frequency per sample is `freq` (Hz)."""
  return 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE


def synthesise(label: int, rng: np.random.RandomState) -> np.ndarray:
  """One clip (SAMPLES,) int16 of class `label` (module docstring), every random choice drawn from `rng`."""
  t = np.arange(SAMPLES) / SAMPLES  # 0..1 over the clip.
  lo = rng.uniform(BAND[0], 1000.0)
  hi = rng.uniform(1500.0, BAND[1])
  half = t < 0.5
  if label in (0, 1):
    freq = lo * (hi / lo) ** (t if label == 0 else 1 - t)  # Exponential sweep.
    x = np.sin(_phase(freq))
  elif label in (2, 3):
    x = np.sin(_phase(np.full(SAMPLES, rng.uniform(*BAND))))
    if label == 3:
      x *= 0.5 * (1 - np.cos(2 * np.pi * rng.uniform(6, 12) * t * SAMPLES / SAMPLE_RATE))
  elif label in (4, 5):
    first, second = (lo, hi) if label == 4 else (hi, lo)
    x = np.sin(_phase(np.where(half, first, second)))
  else:
    burst = np.convolve(rng.normal(size=SAMPLES), np.ones(4) / 4, mode='same')  # Low-passed noise.
    x = burst * np.where(half == (label == 6), 1.0, 0.0) * 2
  x = x * rng.uniform(0.2, 0.8)
  snr_db = rng.uniform(0, 20)
  noise = rng.normal(size=SAMPLES) * np.sqrt(np.mean(x ** 2) / 10 ** (snr_db / 10))
  return np.round(np.clip(x + noise, -1, 1) * 32767).astype(np.int16)


def generate_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(waveforms int16 (N, SAMPLES), labels int64 (N,)) of `split`, exactly as the builder writes them."""
  rng = np.random.RandomState([SEED, sorted(NUM).index(split)])
  labels = rng.randint(len(CLASSES), size=NUM[split])
  return np.stack([synthesise(int(y), rng) for y in labels]), labels.astype(np.int64)


class SyntheticSounds(local_builder.LocalCodePath, local_builder.ArrayRecordFormat,
                      tfds.core.GeneratorBasedBuilder):
  """Synthesised sounds in noise (8 classes), 3,200 train / 800 test, 0.5 s at 8 kHz, prepared offline."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: 8 classes, 0.5 s at 8 kHz, seed 2468.',
                   '1.1.0': 'Stored as ArrayRecord (read by index); the same examples.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'audio': tfds.features.Audio(shape=(SAMPLES,), dtype=np.int16, sample_rate=SAMPLE_RATE),
            'label': tfds.features.ClassLabel(names=list(CLASSES)),
        }),
        supervised_keys=('audio', 'label'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager
    return {split: self._generate_examples(split) for split in NUM}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    waves, labels = generate_split(split)
    for i, (wave, label) in enumerate(zip(waves, labels)):
      yield i, {'audio': wave, 'label': int(label)}
