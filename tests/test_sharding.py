"""Mesh construction and batch placement on 8 simulated CPU devices."""
import jax
import ml_collections
import numpy as np
import pytest

from vit_jax import sharding


def _mesh_cfg(data):
  return ml_collections.ConfigDict({'data': data})


def test_eight_devices_available():
  assert jax.device_count() == 8, 'tests/conftest.py should force 8 CPU devices'


@pytest.mark.parametrize('data,expected', [(-1, 8), (8, 8)])
def test_mesh_fills_devices(data, expected):
  mesh = sharding.create_mesh(_mesh_cfg(data))
  assert dict(mesh.shape) == {'data': expected}


def test_mesh_on_device_subset():
  mesh = sharding.create_mesh(_mesh_cfg(-1), devices=jax.devices()[:1])
  assert dict(mesh.shape) == {'data': 1}


@pytest.mark.parametrize('data', [3, 16, 0, -2])
def test_impossible_mesh_is_rejected(data):
  with pytest.raises(ValueError, match='[Mm]esh'):
    sharding.create_mesh(_mesh_cfg(data))


def test_batch_must_divide_devices():
  mesh = sharding.create_mesh(_mesh_cfg(-1))
  sharding.check_global_batch(16, mesh)
  with pytest.raises(ValueError, match='batch_size=12.*8 devices'):
    sharding.check_global_batch(12, mesh)


def test_shard_batch_places_global_array():
  mesh = sharding.create_mesh(_mesh_cfg(-1))
  batch = {'image': np.arange(16 * 2, dtype=np.float32).reshape(16, 2), 'label': np.arange(16)}
  placed = sharding.shard_batch(batch, mesh)
  assert placed['image'].shape == (16, 2)
  assert len(placed['image'].addressable_shards) == 8
  assert placed['image'].addressable_shards[1].data.shape == (2, 2)
  np.testing.assert_array_equal(np.asarray(placed['label']), batch['label'])
