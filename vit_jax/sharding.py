"""Device mesh from the `mesh` config, logical-axis rules, and the shardings of train state and batches.

Mesh axes, outermost first: 'data' (pure data parallel), 'fsdp' (data parallel whose parameters and optimizer
state are split too, ZeRO-3 style) and 'tensor' (Megatron tensor parallel: attention heads and the MLP hidden dim).
Batches are split over ('data', 'fsdp'). Models name their parameter and activation axes logically ('embed', 'mlp',
'heads', ...; see vit_jax/models/layers.py); `config.sharding_rules` maps those names onto mesh axes, so one config
field switches strategy:

  data=-1                 pure data parallel (every parameter replicated)
  fsdp=-1                 FSDP: params + optimizer state split over 'fsdp' on their 'embed' (or 'mlp'/'kv') axis
  tensor=T, data=-1       Megatron: 'heads' and 'mlp' split over 'tensor', batch over 'data'
  data=2, fsdp=2, tensor=2  all three at once
"""
from __future__ import annotations

import collections
import contextlib
import math
from typing import Any, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Mesh axes in order from outermost (across hosts) to innermost; batches are split over BATCH_AXES.
MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# Logical axis -> mesh axes, in priority order (flax semantics: for each array, the first rule whose mesh axes are
# still unused in that array wins; names without a usable rule are replicated). 'batch' comes first so that
# activations spend 'fsdp' on the batch and keep 'embed' whole, while parameters (which have no batch axis) split
# 'embed' over 'fsdp'. Matrices thus get 'fsdp' on 'embed' and 'tensor' on 'heads'/'mlp'; the ('kv', 'fsdp'),
# ('mlp', ('tensor', 'fsdp')) and ('heads', ('tensor', 'fsdp')) rules reach the biases (which have no 'embed'), so
# FSDP splits every parameter, not just the matrices.
DEFAULT_RULES = (
    ('batch', BATCH_AXES),
    ('embed', 'fsdp'),
    ('kv', 'fsdp'),
    ('mlp', ('tensor', 'fsdp')),
    ('mlp', 'tensor'),
    ('heads', ('tensor', 'fsdp')),
    ('heads', 'tensor'),
    ('classes', None),
    ('length', None),
    ('layers', None),
)


# ------------------------------------------------------------------------------------------------- mesh

def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Axis sizes with at most one -1 filled in; raises if they cannot cover exactly `num_devices`."""
  return _fill({axis: int(mesh_config[axis]) for axis in MESH_AXES}, num_devices, 'config.mesh', 'devices')


def _fill(sizes: dict[str, int], total: int, what: str, unit: str) -> dict[str, int]:
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise ValueError(f'At most one {what} axis may be -1, got {sizes}. Set the others to explicit sizes.')
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f'{what} axis sizes must be positive or -1, got {sizes}.')
  known = math.prod(s for s in sizes.values() if s != -1)
  if unknown:
    if total % known:
      raise ValueError(f'Mesh {sizes} ({what}) cannot be filled: {total} {unit} are not divisible by {known}. '
                       f'Choose axis sizes whose product divides the {unit} count.')
    sizes[unknown[0]] = total // known
  if math.prod(sizes.values()) != total:
    raise ValueError(f'Mesh {sizes} ({what}) has {math.prod(sizes.values())} {unit} but {total} are available. '
                     f'Make the product of {what}.* equal the {unit} count, or set one axis to -1.')
  return sizes


def _granules(devices: Sequence[jax.Device]) -> tuple[int, bool]:
  """(number of slices or hosts, whether they are processes): TPU slices if several, else processes."""
  slices = {getattr(d, 'slice_index', None) for d in devices}
  if None not in slices and len(slices) > 1:
    return len(slices), False
  return len({d.process_index for d in devices}), True


def create_mesh(mesh_config: ml_collections.ConfigDict, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all) that follows the physical topology.

  One host or slice: jax.make_mesh. Several (processes, or TPU slices): a hybrid mesh
  (mesh_utils.create_hybrid_device_mesh) whose slow DCN links carry the `mesh.dcn_*` factor of each axis (by default
  all of them on 'data', so only gradients cross hosts) and whose fast ICI/NVLink links carry the rest.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  names = tuple(sizes)
  # Auto axes: XLA propagates shardings from the jit boundaries (jax.make_mesh defaults to Explicit axes).
  axis_types = (jax.sharding.AxisType.Auto,) * len(names)
  granules, process_is_granule = _granules(devices)
  if granules > 1:
    dcn = _fill({a: int(mesh_config[f'dcn_{a}']) for a in MESH_AXES}, granules, 'config.mesh.dcn',
                'hosts/slices')
    for axis in MESH_AXES:
      if sizes[axis] % dcn[axis]:
        raise ValueError(f'config.mesh.{axis}={sizes[axis]} cannot span {dcn[axis]} hosts/slices '
                         f'(config.mesh.dcn_{axis}). Make mesh.{axis} a multiple of dcn_{axis}, or put the hosts on '
                         'another axis (e.g. mesh.dcn_data=1 and mesh.dcn_fsdp=-1 for FSDP across hosts).')
    ici = [sizes[a] // dcn[a] for a in MESH_AXES]
    grid = mesh_utils.create_hybrid_device_mesh(ici, [dcn[a] for a in MESH_AXES], devices,
                                                process_is_granule=process_is_granule)
    logging.info('Hybrid mesh: %s per host/slice x %s across %d of them.', ici, dcn, granules)
    return Mesh(grid, names, axis_types=axis_types)
  if len(devices) == jax.device_count():
    return jax.make_mesh(tuple(sizes.values()), names, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), names, axis_types=axis_types)


# ------------------------------------------------------------------------------------------------- rules

Rules = tuple[tuple[str, Any], ...]


def logical_rules(config_rules: Optional[Sequence[Sequence[Any]]] = None) -> Rules:
  """Validated (logical name, mesh axes) pairs; None gives DEFAULT_RULES."""
  if config_rules is None:
    return DEFAULT_RULES
  rules = []
  for rule in config_rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f'Bad sharding rule {rule!r}: each rule is (logical_name, mesh_axes), e.g. '
                       "('embed', 'fsdp') or ('batch', ('data', 'fsdp')) or ('classes', None).")
    name, axes = rule
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f'Sharding rule {rule!r} names mesh axis {axis!r}; the mesh axes are {MESH_AXES}.')
    rules.append((name, axes))
  return tuple(rules)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Context (entered inside a jitted function) under which models' logical constraints apply to `mesh`."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


def with_activation_sharding(fn: Any, mesh: Mesh, rules: Rules) -> Any:
  """`fn` traced under `activation_sharding(mesh, rules)`; wrap a step with it before jax.jit."""
  def wrapped(*args, **kwargs):
    with activation_sharding(mesh, rules):
      return fn(*args, **kwargs)
  # Keep the step's name (also through functools.partial) so compile logs and profiles say which step it is.
  wrapped.__name__ = wrapped.__qualname__ = getattr(fn, '__name__', getattr(getattr(fn, 'func', None), '__name__',
                                                                           'wrapped'))
  return wrapped


def _fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes (innermost first) from any dimension whose size they do not divide: such dims replicate."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = list(axes) if isinstance(axes, tuple) else ([] if axes is None else [axes])
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes.pop()
    out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*out)


def state_sharding(mesh: Mesh, abstract_state: Any, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedSharding for every leaf of an abstract state whose parameters carry logical names (nn.Partitioned).

  Optimizer moments inherit their parameter's boxes through optax, so they are split exactly like it; leaves with
  no names (step, counts, unannotated parameters) are replicated. Mesh axes that do not divide a dimension are
  dropped for that dimension. Returns the tree of the *unboxed* state.
  """
  specs = nn.get_partition_spec(abstract_state)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = nn.meta.unbox(abstract_state)
  return jax.tree.map(lambda s, x: NamedSharding(mesh, _fit(s.spec, x.shape, mesh)), shardings, shapes)


def describe(shardings: Any, abstract: Any) -> dict[str, str]:
  """{'path': 'shape -> spec'} for logging and tests."""
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  shapes = jax.tree.leaves(abstract)
  return {jax.tree_util.keystr(path): f'{tuple(x.shape)} -> {s.spec}' for (path, s), x in zip(flat, shapes)}


# ------------------------------------------------------------------------------------------------- batches

def batch_partitions(mesh: Mesh) -> int:
  """How many ways a global batch is split: the product of the batch axes' sizes."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_global_batch(batch_size: int, mesh: Mesh, accum_steps: int = 1) -> None:
  """Raises unless the global batch (each of its `accum_steps` micro-batches) splits evenly over the batch axes
  and over the processes."""
  parts, processes = batch_partitions(mesh), jax.process_count()
  for divisor, what in ((parts * accum_steps, f'{accum_steps} micro-batch(es) x the {parts} devices on mesh axes '
                         f'{BATCH_AXES}' if accum_steps > 1 else f'the {parts} devices on mesh axes {BATCH_AXES}'),
                        (processes * accum_steps, f'{accum_steps} micro-batch(es) x the {processes} processes'
                         if accum_steps > 1 else f'the {processes} processes')):
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


def to_host(tree: Any) -> Any:
  """The global value of every array in `tree` as host numpy, on every process.

  Unlike jax.device_get, this also works when shards live on other hosts (FSDP or tensor parallel across hosts).
  A collective: every process must call it.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


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
