"""Device mesh from the `mesh` config, and the shardings of train state and batches."""
from __future__ import annotations

import collections
import math
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Mesh axes in order from outermost (across hosts) to innermost; batches are split over BATCH_AXES.
MESH_AXES = ('data',)
BATCH_AXES = ('data',)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Axis sizes with at most one -1 filled in; raises if they cannot cover exactly `num_devices`."""
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise ValueError(f'At most one mesh axis may be -1, got {sizes}. Set the others to explicit sizes.')
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f'Mesh axis sizes must be positive or -1, got {sizes}.')
  known = math.prod(s for s in sizes.values() if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(f'Mesh {sizes} cannot be filled: {num_devices} devices are not divisible by {known}. '
                       'Choose axis sizes whose product divides the device count.')
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f'Mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} are available. '
                     'Make the product of config.mesh.* equal the device count, or set one axis to -1.')
  return sizes


def create_mesh(mesh_config: ml_collections.ConfigDict, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh over `devices` (default: all) laid out by jax.make_mesh to follow the physical topology."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape, names = tuple(sizes.values()), tuple(sizes)
  # Auto axes: XLA propagates shardings from the jit boundaries (jax.make_mesh defaults to Explicit axes).
  axis_types = (jax.sharding.AxisType.Auto,) * len(shape)
  if len(devices) == jax.device_count():
    return jax.make_mesh(shape, names, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), names, axis_types=axis_types)


def batch_partitions(mesh: Mesh) -> int:
  """How many ways a global batch is split: the product of the batch axes' sizes."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_global_batch(batch_size: int, mesh: Mesh) -> None:
  """Raises unless the global batch splits evenly over the batch axes and over the processes."""
  parts, processes = batch_partitions(mesh), jax.process_count()
  for divisor, what in ((parts, f'the {parts} devices on mesh axes {BATCH_AXES}'),
                        (processes, f'the {processes} processes')):
    if batch_size <= 0 or batch_size % divisor:
      raise ValueError(f'config.batch_size={batch_size} cannot be split evenly over {what}. '
                       f'Use a positive multiple of {divisor}, e.g. {max(divisor, batch_size // divisor * divisor)}.')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full value on every device."""
  return NamedSharding(mesh, P())


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's part of the batch into global jax.Arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def state_sharding(mesh: Mesh, abstract_state: Any) -> Any:
  """Sharding for every leaf of the train state: replicated (pure data parallel)."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def prefetch_to_device(batches: Iterator[Mapping[str, np.ndarray]], mesh: Mesh,
                       size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Yields `shard_batch(b, mesh)` for each local batch, keeping `size` batches already sent to the devices.

  Transfers are asynchronous, so the copy of the next batches overlaps the current step instead of preceding it.
  size 0 shards on demand (no read-ahead).
  """
  queue: collections.deque[dict[str, jax.Array]] = collections.deque()
  for batch in batches:
    queue.append(shard_batch(batch, mesh))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
