"""Test-session set-up: 8 simulated CPU devices, fast CPU compiles, one compilation cache per session, quiet
TensorFlow, shared fixtures."""
import os
import shutil
import tempfile

from tests import xla_env

# Must be set before jax initialises its backends: sharding tests need 8 devices; see xla_env for the compile flags.
os.environ.setdefault('XLA_FLAGS', xla_env.xla_flags(device_count=8))
# One persistent compilation cache for the session: xdist workers inherit the directory the controller made here, and
# so do the subprocesses tests start. A JAX_COMPILATION_CACHE_DIR set by the caller is used as is (and kept).
_SESSION_CACHE_DIR = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _SESSION_CACHE_DIR = os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='vit_jax_tests_jax_cache_')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import jax  # noqa: E402

jax.config.update('jax_platforms', 'cpu')

import pytest  # noqa: E402


def pytest_unconfigure(config) -> None:
  """The process that made the session's compilation cache removes it (xdist workers inherit it; they do not)."""
  del config
  if _SESSION_CACHE_DIR is not None:
    shutil.rmtree(_SESSION_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir with the offline `digits` dataset prepared once per test session."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vit_jax import datasets  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('digits', data_dir=data_dir).download_and_prepare()
  return data_dir
