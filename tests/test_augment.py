"""Statistics of the in-pipeline augmentations: RandAugment's ops and magnitudes, random erasing's area range."""
import collections
import math

import numpy as np
import pytest
import tensorflow as tf

from vit_jax import augment, input_pipeline
from vit_jax.config_schema import base_config

SIZE = 32


def _image(seed=0):
  return tf.constant(np.random.RandomState(seed).randint(0, 256, (SIZE, SIZE, 3)).astype(np.uint8))


def test_magnitude_table_is_the_published_one():
  # Level M / 10 of the reference implementation; translate 100 px and cutout 40 px are for 224 px images.
  expect = {'Rotate': 30.0, 'ShearX': 0.3, 'ShearY': 0.3, 'TranslateX': 100.0, 'TranslateY': 100.0,
            'Posterize': 4, 'Solarize': 256, 'SolarizeAdd': 110, 'Cutout': 40, 'Color': 1.9, 'Contrast': 1.9,
            'Brightness': 1.9, 'Sharpness': 1.9, 'AutoContrast': 0, 'Equalize': 0, 'Invert': 0}
  assert set(expect) == set(augment.OPS) and len(augment.OPS) == 16
  for name, value in expect.items():
    np.testing.assert_allclose(augment.op_value(name, 10, 224), value, rtol=1e-6, err_msg=name)
  assert augment.op_value('Rotate', 9) == pytest.approx(27.0)
  assert augment.op_value('Posterize', 9) == 3 and augment.op_value('Solarize', 5) == 128
  assert augment.op_value('Color', 0) == pytest.approx(0.1)
  assert augment.op_value('TranslateX', 10, 112) == pytest.approx(50.0)  # Scaled with the image side.


def test_op_semantics_against_numpy():
  img = _image()
  x = img.numpy().astype(np.int32)
  seed = tf.constant([0, 0], tf.int64)
  np.testing.assert_array_equal(augment.apply_op(img, 'Invert', 0, seed), 255 - x)
  np.testing.assert_array_equal(augment.apply_op(img, 'Solarize', 100, seed), np.where(x < 100, x, 255 - x))
  np.testing.assert_array_equal(augment.apply_op(img, 'Solarize', 256, seed), x)  # Threshold 256: unchanged.
  np.testing.assert_array_equal(augment.apply_op(img, 'Posterize', 3, seed), x & 0b11100000)
  np.testing.assert_array_equal(augment.apply_op(img, 'SolarizeAdd', 50, seed),
                                np.where(x < 128, np.minimum(x + 50, 255), x))
  np.testing.assert_array_equal(augment.apply_op(img, 'Brightness', 0.5, seed), (x * 0.5).astype(np.uint8))
  shifted = augment.apply_op(img, 'TranslateX', 5, seed).numpy()
  np.testing.assert_array_equal(shifted[:, :-5], x[:, 5:])
  assert (shifted[:, -5:] == 128).all()
  np.testing.assert_array_equal(augment.apply_op(img, 'Rotate', 90, seed), np.rot90(x))  # Counter-clockwise.
  np.testing.assert_array_equal(augment.apply_op(img, 'Color', 1.0, seed), x)  # Factor 1: identity.
  cut = augment.apply_op(img, 'Cutout', 4, seed).numpy()
  grey = (cut == 128).all(-1) & (x != 128).any(-1)
  rows, cols = np.nonzero(grey)
  assert rows.max() - rows.min() < 8 and cols.max() - cols.min() < 8 and grey.sum() > 0


def test_randaugment_applies_only_listed_ops_at_stated_magnitudes():
  img, magnitude, layers, n = _image(), 9, 2, 400
  seeds = tf.constant(np.stack([np.arange(n), np.arange(n) * 7 + 1], 1), tf.int64)
  run = tf.function(lambda s: augment.randaugment(img, layers, magnitude, s, return_trace=True))
  ops, values = [], []
  for s in seeds:
    _, idx, val = run(s)
    ops.extend(idx.numpy().tolist())
    values.extend(val.numpy().tolist())
  counts = collections.Counter(ops)
  assert set(counts) == set(range(len(augment.OPS))), 'every listed op is drawn, nothing else'
  expected = len(ops) / len(augment.OPS)
  chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(len(augment.OPS)))
  assert chi2 < 40, f'op choice is not uniform: {counts}'  # 15 dof: P(chi2 > 40) ~ 5e-4.
  signs = collections.defaultdict(set)
  for i, v in zip(ops, values):
    name = augment.OPS[i]
    stated = augment.op_value(name, magnitude, SIZE)
    assert abs(abs(v) - stated) < 1e-5, (name, v, stated)
    signs[name].add(np.sign(v) if stated else 0)
  for name in augment.SIGNED_OPS:
    assert signs[name] == {-1.0, 1.0}, name
  for name in set(augment.OPS) - set(augment.SIGNED_OPS) - {'AutoContrast', 'Equalize', 'Invert'}:
    assert signs[name] == {1.0}, name


def test_randaugment_output_is_the_traced_op():
  img = _image(1)
  for k in range(40):
    seed = tf.constant([k, 3], tf.int64)
    out, idx, val = augment.randaugment(img, 1, 10, seed, return_trace=True)
    name = augment.OPS[int(idx[0])]
    if name == 'Cutout':  # Its box position is random; checked in test_op_semantics_against_numpy.
      continue
    arg = int(val[0]) if name in ('Posterize', 'Solarize', 'SolarizeAdd') else float(val[0])
    np.testing.assert_array_equal(out, augment.apply_op(img, name, arg, seed), err_msg=name)


def test_random_erasing_covers_the_stated_area_range():
  n, prob = 1500, 0.25
  image = tf.fill([SIZE, SIZE, 3], 5.0)  # Noise never equals 5.0 exactly, so erased pixels are the changed ones.
  erase = tf.function(lambda s: augment.random_erasing(image, prob, s))
  fractions, aspects = [], []
  for k in range(n):
    out = erase(tf.constant([k, 11], tf.int64)).numpy()
    changed = (out != 5.0).any(-1)
    if not changed.any():
      continue
    rows, cols = np.nonzero(changed)
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert changed.sum() == h * w, 'the erased region is one box'
    assert (out[changed] != 5.0).all(), 'every channel of the box is noise'
    fractions.append(h * w / SIZE ** 2)
    aspects.append(h / w)
  rate = len(fractions) / n
  assert abs(rate - prob) < 4 * math.sqrt(prob * (1 - prob) / n), rate
  lo, hi = augment.ERASE_AREA
  # Side lengths are rounded to whole pixels: allow one pixel of slack on each side.
  slack_lo = (math.sqrt(lo) * SIZE - 1) ** 2 / SIZE ** 2
  slack_hi = (math.sqrt(hi) * SIZE + 1) ** 2 / SIZE ** 2
  assert min(fractions) >= slack_lo and max(fractions) <= slack_hi, (min(fractions), max(fractions))
  assert min(fractions) < 0.05 and max(fractions) > 0.25, 'the whole stated range is used'
  assert min(aspects) < 0.5 and max(aspects) > 2.0 and min(aspects) > 0.2 and max(aspects) < 5.0


def test_train_pipeline_applies_configured_augmentation(digits_data_dir):
  config = base_config().dataset
  config.update(name='digits', data_dir=digits_data_dir, image_size=16, train_crop='resize', flip=False,
                shuffle_buffer=0)
  plain = next(input_pipeline.create_train_iterator(config, global_batch_size=64, seed=0))
  config.randaugment_layers, config.randaugment_magnitude, config.random_erasing = 2, 9.0, 0.5
  a = next(input_pipeline.create_train_iterator(config, global_batch_size=64, seed=0))
  b = next(input_pipeline.create_train_iterator(config, global_batch_size=64, seed=0))
  np.testing.assert_array_equal(a['image'], b['image'])  # Deterministic given the seed.
  np.testing.assert_array_equal(a['label'], plain['label'])
  assert a['image'].shape == plain['image'].shape and a['image'].dtype == np.float32
  changed = np.abs(a['image'] - plain['image']).reshape(64, -1).max(-1) > 1e-3
  assert changed.mean() > 0.5
