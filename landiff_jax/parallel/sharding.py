"""Logical-axis rules and the shardings they give parameters and batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from landiff_jax.parallel.mesh import MESH_AXES

Rules = tuple[tuple[str, Any], ...]


def _as_mesh_axes(logical: str, axes: Any) -> Any:
  if axes is None:
    return None
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  unknown = [name for name in names if name not in MESH_AXES]
  if unknown:
    raise ValueError(f'logical_axis_rules maps {logical!r} to unknown mesh axes {unknown}; '
                     f'use names from {list(MESH_AXES)} or None.')
  return names[0] if isinstance(axes, str) else names


def logical_rules(parallel_config) -> Rules:
  """`parallel_config.logical_axis_rules` as a tuple of (logical name, mesh axis | axes | None) pairs."""
  rules = []
  for rule in parallel_config.logical_axis_rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f'logical_axis_rules entry {rule!r} must be a (logical name, mesh axes) pair.')
    rules.append((rule[0], _as_mesh_axes(rule[0], rule[1])))
  return tuple(rules)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Makes `mesh` current and `rules` the logical-axis rules, so flax logical constraints take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _mesh_axes_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  names = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[name] for name in names)


def _check_divisible(path: str, shape: Sequence[int], spec: PartitionSpec, logical: PartitionSpec,
                     mesh: Mesh) -> None:
  for dim, (size, axes) in enumerate(zip(shape, spec)):
    shards = _mesh_axes_size(mesh, axes)
    if size % shards:
      raise ValueError(
          f'parameter {path!r} axis {dim} (logical {logical[dim]!r}, size {size}) cannot be split over mesh '
          f'axes {axes!r} of size {shards}; change the mesh sizes or map {logical[dim]!r} elsewhere in '
          f'logical_axis_rules.')


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def strip_partitioning(params: Any) -> Any:
  """The values of a boxed tree, without the sharding constraint `nn.meta.unbox` adds under a mesh context
  (which fails on `jax.eval_shape` output)."""

  def value_of(x):
    if isinstance(x, nn.Partitioned):
      return x.unbox(apply_constraint=False)
    return x.unbox() if _is_box(x) else x

  return jax.tree.map(value_of, params, is_leaf=_is_box)


def param_shardings(params: Any, mesh: Mesh, rules: Rules, *, uneven: str = 'error') -> Any:
  """NamedShardings for a boxed (or `jax.eval_shape`-abstract boxed) parameter tree; unboxed structure.

  Leaves without logical metadata are replicated. A mesh axis that does not divide its dimension raises
  (`uneven='error'`, training: the plan is wrong) or is dropped for that dimension (`uneven='replicate'`,
  inference: place what can be placed, e.g. a vocabulary of 2,055 rows on 2-way tensor parallelism).
  """
  if uneven not in ('error', 'replicate'):
    raise ValueError(f"uneven must be 'error' or 'replicate', got {uneven!r}.")
  logical_specs = nn.get_partition_spec(params)
  shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
  values = strip_partitioning(params)
  is_spec = lambda x: isinstance(x, PartitionSpec)

  def checked(path, logical, value, sharding):
    if not hasattr(value, 'shape'):
      return sharding
    if uneven == 'error':
      _check_divisible(jax.tree_util.keystr(path, simple=True, separator='/'), value.shape, sharding.spec,
                       logical, mesh)
      return sharding
    spec = tuple(sharding.spec) + (None,) * (len(value.shape) - len(sharding.spec))
    even = [axes if size % _mesh_axes_size(mesh, axes) == 0 else None for size, axes in zip(value.shape, spec)]
    return NamedSharding(mesh, PartitionSpec(*even))

  flat_specs, _ = jax.tree_util.tree_flatten_with_path(logical_specs, is_leaf=is_spec)
  flat_shardings, treedef = jax.tree.flatten(shardings)
  return jax.tree.unflatten(treedef, [checked(path, logical, value, sharding) for (path, logical), value, sharding
                                      in zip(flat_specs, jax.tree.leaves(values), flat_shardings)])


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Sharding of an `ndim`-dimensional batch array: leading axis 'batch', the rest replicated."""
  logical = ('batch',) + (None,) * (ndim - 1)
  return NamedSharding(mesh, nn.logical_to_mesh_axes(logical, rules))


def batch_shards(mesh: Mesh, rules: Rules) -> int:
  """How many ways the leading batch axis is split."""
  return _mesh_axes_size(mesh, batch_sharding(mesh, rules, 1).spec[0])


def process_batch_rows(mesh: Mesh, rules: Rules, batch_size: int) -> list[int]:
  """The rows of a global batch of `batch_size` that this process's devices hold, ascending.

  What this process must read of each global batch, in the order `shard_batch` expects them; with several
  processes these are, for the usual meshes, one contiguous block per process.
  """
  rows = set()
  for device, index in batch_sharding(mesh, rules, 1).devices_indices_map((batch_size,)).items():
    if device.process_index == jax.process_index():
      rows.update(range(batch_size)[index[0]])
  return sorted(rows)


def shard_batch(local_batch: Any, mesh: Mesh, rules: Rules) -> Any:
  """Global arrays from this process's rows of the batch (a pytree of numpy arrays, leading axis = batch):
  the rows `process_batch_rows` names, in that order."""

  def to_global(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, rules, x.ndim), x)

  return jax.tree.map(to_global, local_batch)
