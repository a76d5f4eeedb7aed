"""Classifier-free guidance across devices: the [uncond, cond] rows of a sampler placed on different devices.

`rows_mesh(devices, rows)` arranges the devices as ('rows', 'replica') with gcd(rows, #devices) entries on
'rows'; `constrain_rows` pins an array's leading (row) axis to it, so XLA runs each device group on its own rows
(the rest of a group computes the same rows redundantly) and exchanges only what guidance combines. Every row is
computed exactly as on one device: no reduction runs across rows.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

Array = jax.Array


def rows_mesh(devices: Sequence[jax.Device] | Mesh | None, rows: int) -> Mesh | None:
  """A ('rows', 'replica') mesh over `devices` (or a mesh's devices) splitting `rows`, or None when fewer than
  two groups would result (one device, or an odd row count on an even device count...)."""
  if devices is None:
    return None
  flat = np.asarray(devices.devices if isinstance(devices, Mesh) else devices, dtype=object).reshape(-1)
  groups = math.gcd(int(rows), flat.size)
  if groups < 2:
    return None
  return Mesh(flat.reshape(groups, -1), ('rows', 'replica'), axis_types=(AxisType.Auto,) * 2)


def constrain_rows(x: Array, mesh: Mesh | None) -> Array:
  """`x` with its leading axis split over the mesh's 'rows' (a no-op without a mesh)."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P('rows', *(None,) * (x.ndim - 1))))


def on_mesh_devices(tree: Any, mesh: Mesh | None) -> Any:
  """Leaves not already spread over exactly the mesh's devices are replicated there (parameters loaded on one
  device); leaves already on them (replicated or split by the logical rules) are left as they are."""
  if mesh is None:
    return tree
  devices = set(mesh.devices.flat)
  replicated = NamedSharding(mesh, P())

  def place(leaf):
    sharding = getattr(leaf, 'sharding', None)
    if sharding is not None and set(sharding.device_set) == devices:
      return leaf
    return jax.device_put(leaf, replicated)

  return jax.tree.map(place, tree)
