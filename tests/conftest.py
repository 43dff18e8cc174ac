"""Test-session set-up: 8 simulated CPU devices, quiet TensorFlow, shared fixtures."""
import os

# Must be set before jax initialises its backends: sharding tests need 8 devices.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import jax  # noqa: E402

jax.config.update('jax_platforms', 'cpu')

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir with the offline `digits` dataset prepared once per test session."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vit_jax import datasets  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('digits', data_dir=data_dir).download_and_prepare()
  return data_dir
