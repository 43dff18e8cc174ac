"""Mesh construction and batch placement on 8 simulated CPU devices."""
import jax
import ml_collections
import numpy as np
import pytest

from vit_jax import sharding


def _mesh_cfg(data, fsdp=1, tensor=1):
  return ml_collections.ConfigDict({'data': data, 'fsdp': fsdp, 'tensor': tensor, 'dcn_data': -1, 'dcn_fsdp': 1,
                                    'dcn_tensor': 1})


def test_eight_devices_available():
  assert jax.device_count() == 8, 'tests/conftest.py should force 8 CPU devices'


@pytest.mark.parametrize('data,expected', [(-1, 8), (8, 8)])
def test_mesh_fills_devices(data, expected):
  mesh = sharding.create_mesh(_mesh_cfg(data))
  assert dict(mesh.shape) == {'data': expected, 'fsdp': 1, 'tensor': 1}


@pytest.mark.parametrize('sizes,expected', [((1, -1, 1), (1, 8, 1)), ((2, 2, -1), (2, 2, 2)), ((-1, 1, 4), (2, 1, 4))])
def test_mesh_axes_fill(sizes, expected):
  mesh = sharding.create_mesh(_mesh_cfg(*sizes))
  assert tuple(mesh.shape.values()) == expected and mesh.axis_names == sharding.MESH_AXES


def test_mesh_on_device_subset():
  mesh = sharding.create_mesh(_mesh_cfg(-1), devices=jax.devices()[:1])
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 1, 'tensor': 1}


def test_two_unknown_axes_rejected():
  with pytest.raises(ValueError, match='At most one'):
    sharding.create_mesh(_mesh_cfg(-1, -1))


def test_fit_replicates_dims_the_mesh_does_not_divide():
  mesh = sharding.create_mesh(_mesh_cfg(1, 4, 2))
  fit = sharding._fit  # pylint: disable=protected-access
  assert fit(sharding.P('fsdp', None), (10, 3), mesh) == sharding.P(None, None)
  assert fit(sharding.P(('fsdp', 'tensor'),), (16,), mesh) == sharding.P(('fsdp', 'tensor'),)
  assert fit(sharding.P(('fsdp', 'tensor'),), (4,), mesh) == sharding.P('fsdp',)


@pytest.mark.parametrize('data', [3, 16, 0, -2])
def test_impossible_mesh_is_rejected(data):
  with pytest.raises(ValueError, match='[Mm]esh'):
    sharding.create_mesh(_mesh_cfg(data))


def test_batch_must_divide_devices():
  mesh = sharding.create_mesh(_mesh_cfg(-1))
  sharding.check_global_batch(16, mesh)
  with pytest.raises(ValueError, match='batch_size=12.*8 devices'):
    sharding.check_global_batch(12, mesh)
  mesh = sharding.create_mesh(_mesh_cfg(2, 2, 2))  # Only data x fsdp split the batch.
  sharding.check_global_batch(4, mesh)
  with pytest.raises(ValueError, match='batch_size=6'):
    sharding.check_global_batch(6, mesh)


def test_shard_batch_places_global_array():
  mesh = sharding.create_mesh(_mesh_cfg(-1))
  batch = {'image': np.arange(16 * 2, dtype=np.float32).reshape(16, 2), 'label': np.arange(16)}
  placed = sharding.shard_batch(batch, mesh)
  assert placed['image'].shape == (16, 2)
  assert len(placed['image'].addressable_shards) == 8
  assert placed['image'].addressable_shards[1].data.shape == (2, 2)
  np.testing.assert_array_equal(np.asarray(placed['label']), batch['label'])
