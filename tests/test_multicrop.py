"""DINO's multi-crop input: each op on known inputs, the per-view probabilities, and the pipeline's shapes."""
import math

import numpy as np
import pytest
import tensorflow as tf

from vit_jax import augment, input_pipeline
from vit_jax.config_schema import base_config


def _const(rgb, size=4):
  return tf.constant(np.broadcast_to(np.asarray(rgb, np.float32), (size, size, 3)))


def test_solarize_and_grayscale_on_known_pixels():
  x = tf.constant([[[0.0, 127.0, 128.0], [255.0, 200.0, 10.0]]])
  np.testing.assert_allclose(augment.solarize_float(x).numpy(), [[[0, 127, 127], [0, 55, 10]]])
  grey = augment.grayscale(_const([255.0, 0.0, 0.0])).numpy()
  np.testing.assert_allclose(grey, 0.299 * 255, rtol=1e-6)


def test_colour_adjustments_on_known_inputs():
  red = _const([200.0, 50.0, 0.0])
  np.testing.assert_allclose(augment.adjust_brightness(red, 1.5).numpy()[0, 0], [255, 75, 0])
  # Contrast blends towards the mean grey level: a flat grey image does not change, a flat colour turns grey.
  np.testing.assert_allclose(augment.adjust_contrast(_const([90.0] * 3), 0.3).numpy(), 90.0, rtol=1e-6)
  np.testing.assert_allclose(augment.adjust_contrast(red, 0.0).numpy(), augment.grayscale(red).numpy(), rtol=1e-6)
  two = tf.constant([[[0.0, 0.0, 0.0], [100.0, 100.0, 100.0]]])
  np.testing.assert_allclose(augment.adjust_contrast(two, 0.5).numpy(), [[[25] * 3, [75] * 3]], rtol=1e-6)
  np.testing.assert_allclose(augment.adjust_saturation(red, 0.0).numpy(), augment.grayscale(red).numpy(), rtol=1e-6)
  np.testing.assert_allclose(augment.adjust_hue(red, 0.0).numpy(), red.numpy(), atol=1e-3)
  green = augment.adjust_hue(_const([255.0, 0.0, 0.0]), 1 / 3).numpy()[0, 0]
  np.testing.assert_allclose(green, [0, 255, 0], atol=1e-3)


def test_color_jitter_stays_in_range_and_is_seeded():
  image = tf.constant(np.random.RandomState(0).uniform(0, 255, (8, 8, 3)).astype(np.float32))
  a = augment.color_jitter(image, tf.constant([3, 4], tf.int64)).numpy()
  b = augment.color_jitter(image, tf.constant([3, 4], tf.int64)).numpy()
  np.testing.assert_array_equal(a, b)
  assert a.min() >= 0 and a.max() <= 255 and np.abs(a - image.numpy()).max() > 1


def test_gaussian_blur_is_a_normalised_gaussian():
  flat = _const([10.0, 20.0, 30.0], size=9)
  np.testing.assert_allclose(augment.gaussian_blur(flat, 1.5).numpy(), flat.numpy(), rtol=1e-5)
  impulse = np.zeros((15, 15, 3), np.float32)
  impulse[7, 7] = 1.0
  out = augment.gaussian_blur(tf.constant(impulse), 1.0).numpy()
  taps = np.exp(-0.5 * np.arange(-6, 7) ** 2)
  kernel = np.outer(taps, taps) / taps.sum() ** 2
  np.testing.assert_allclose(out[1:14, 1:14, 0], kernel, atol=1e-6)
  assert out.sum() == pytest.approx(3.0, rel=1e-5)


def test_blur_sigma_range_sets_the_kernel():
  impulse = np.zeros((15, 15, 3), np.float32)
  impulse[7, 7] = 1.0
  # A small max_sigma shrinks the kernel to 3 max_sigma each side: sigma 0.3 reaches 1 pixel, not 6.
  out = augment.gaussian_blur(tf.constant(impulse), 0.3, max_sigma=0.3).numpy()[..., 0]
  taps = np.exp(-0.5 * (np.arange(-1, 2) / 0.3) ** 2)
  np.testing.assert_allclose(out[6:9, 6:9], np.outer(taps, taps) / taps.sum() ** 2, atol=1e-6)
  assert out.sum() == pytest.approx(1.0, rel=1e-5) and out[5].max() == 0
  # Through the views: a tiny sigma range barely blurs the always-blurred first global view; DINO's range does.
  image = tf.constant(np.random.RandomState(0).uniform(0, 255, (16, 16, 3)).astype(np.float32))
  seed = tf.constant([5, 0], tf.int64)
  kwargs = dict(global_size=16, local_size=8, num_local=0, global_scale=(1.0, 1.0))
  sharp = augment.dino_multicrop(image, seed, blur_sigma=(0.01, 0.02), **kwargs)[0][0].numpy()
  blurred = augment.dino_multicrop(image, seed, **kwargs)[0][0].numpy()
  roughness = lambda x: np.abs(np.diff(x, axis=0)).mean()
  assert roughness(blurred) < 0.8 * roughness(sharp)


def test_random_resized_crop_shape_and_area():
  # A ramp image: a crop's value range shows how much of each axis it spans.
  ramp = tf.constant(np.broadcast_to(np.arange(100, dtype=np.float32)[:, None, None], (100, 100, 3)))
  spans = []
  for i in range(30):
    out = augment.random_resized_crop(ramp, 12, (0.05, 0.4), tf.constant([i, 0], tf.int64))
    assert out.shape == (12, 12, 3)
    spans.append(float(tf.reduce_max(out) - tf.reduce_min(out)))
  # Height fraction of a crop with area <= 0.4 and aspect <= 4/3 is at most sqrt(0.4 * 4/3) = 0.73.
  assert max(spans) < 0.75 * 100 and min(spans) > 0.1 * 100


@pytest.fixture(scope='module')
def views():
  """60 seeds of DINO's views of a colourful 24 px image (global 12 px, 4 local views of 6 px)."""
  image = tf.constant(np.random.RandomState(1).uniform(0, 255, (24, 24, 3)).astype(np.float32))

  @tf.function
  def make(seed):
    return augment.dino_multicrop(image, seed, global_size=12, local_size=6, num_local=4)
  seeds = tf.stack([tf.range(60, dtype=tf.int64), tf.zeros(60, tf.int64)], axis=1)
  return tf.map_fn(make, seeds, fn_output_signature=(tf.float32, tf.float32))


@pytest.mark.slow  # The 60 traced multi-crop draws take ~20-50 s on the shared 2-core CPU.
def test_multicrop_shapes_range_and_grey_probability(views):
  glob, local = views
  assert glob.shape == (60, 2, 12, 12, 3) and local.shape == (60, 4, 6, 6, 3)
  assert float(tf.reduce_min(glob)) >= 0 and float(tf.reduce_max(local)) <= 255
  local = local.numpy().reshape(-1, 6, 6, 3)
  grey = np.mean(np.all(np.abs(local - local[..., :1]) < 1e-3, axis=(1, 2, 3)))
  assert abs(grey - 0.2) < 4 * math.sqrt(0.2 * 0.8 / len(local)), grey


def test_multicrop_pipeline_batches(digits_data_dir):
  config = base_config().dataset
  config.update(name='digits', data_dir=digits_data_dir, image_size=16, train_crop='multicrop', local_crops=3,
                local_image_size=8, shuffle_buffer=0)
  a = next(input_pipeline.create_train_iterator(config, global_batch_size=8, seed=0))
  assert a['image'].shape == (8, 2, 16, 16, 3) and a['local_image'].shape == (8, 3, 8, 8, 3)
  assert a['label'].shape == (8,) and a['image'].min() >= -1 and a['image'].max() <= 1
  assert np.abs(a['image'][:, 0] - a['image'][:, 1]).max() > 0.1  # Two different global views.
  config.blur_sigma = (0.1, 9.0)
  with pytest.raises(ValueError, match=r'blur_sigma=\(0.1, 9.0\) must be a sigma range'):
    input_pipeline.create_train_iterator(config, global_batch_size=8, seed=0)
  config.blur_sigma = (0.1, 2.0)
  config.local_crop_scale = (0.5, 0.2)
  with pytest.raises(ValueError, match='local_crop_scale'):
    input_pipeline.create_train_iterator(config, global_batch_size=8, seed=0)
