"""Device mesh construction and multi-host start-up."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math

import jax
from jax.sharding import AxisType, Mesh
import numpy as np

MESH_AXES = ('data', 'fsdp', 'tensor')


def _describe(sizes: Mapping[str, int]) -> str:
  return ', '.join(f'{axis}={sizes[axis]}' for axis in MESH_AXES)


def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Axis sizes in `MESH_AXES` order, with the one -1 entry (if any) filled by the remaining devices."""
  unknown = sorted(set(mesh_config) - set(MESH_AXES))
  if unknown:
    raise ValueError(f'parallel.mesh has unknown axes {unknown}; the mesh axes are {list(MESH_AXES)}.')
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  bad = [axis for axis, size in sizes.items() if size == 0 or size < -1]
  if bad:
    raise ValueError(f'parallel.mesh sizes must be positive or -1 (fill); got {_describe(sizes)}.')
  fill = [axis for axis, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f'parallel.mesh sets {fill} to -1 ({_describe(sizes)}); at most one axis may be -1.')
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if num_devices % fixed:
      raise ValueError(
          f'parallel.mesh {_describe(sizes)}: the fixed axes multiply to {fixed}, which does not divide the '
          f'{num_devices} devices; choose fixed sizes whose product divides {num_devices}, e.g. '
          f'--config.parallel.mesh.{max((a for a in sizes if sizes[a] > 1), key=sizes.get)}=1.')
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f'parallel.mesh {_describe(sizes)} needs {fixed} devices but {num_devices} are available; choose sizes '
        f'whose product is {num_devices}, or set one axis to -1 to use all remaining devices.')
  return tuple(sizes[axis] for axis in MESH_AXES)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all), every axis `AxisType.Auto`.

  `mesh_config` is `parallel_config.mesh`: axis -> size, where -1 means "all remaining devices".
  Auto axes are required: flax logical constraints do not work on Explicit axes (`jax.make_mesh`'s default).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_config, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  try:  # topology-aware device order on TPU/GPU
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):  # a shape the topology helper cannot place
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=axis_types)


def initialize_distributed(parallel_config) -> bool:
  """Starts JAX's multi-controller runtime when `parallel_config.distributed` is True; returns whether it did.

  An empty `coordinator_address` lets JAX detect the cluster itself (TPU pods, SLURM, ...).
  """
  if not parallel_config.distributed:
    return False
  if jax.distributed.is_initialized():
    return False
  if parallel_config.coordinator_address:
    jax.distributed.initialize(coordinator_address=parallel_config.coordinator_address,
                               num_processes=parallel_config.num_processes,
                               process_id=parallel_config.process_id)
  else:
    jax.distributed.initialize()
  return True
