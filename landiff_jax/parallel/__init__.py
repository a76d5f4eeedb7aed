"""Mesh construction, logical-axis rules and multi-host initialisation."""

from landiff_jax.parallel.mesh import MESH_AXES, initialize_distributed, make_mesh, resolve_mesh_shape
from landiff_jax.parallel.sharding import (batch_shards, batch_sharding, logical_rules, mesh_context,
                                           param_shardings, process_batch_rows, shard_batch,
                                           strip_partitioning)

__all__ = [
    'MESH_AXES', 'batch_shards', 'batch_sharding', 'initialize_distributed', 'logical_rules', 'make_mesh',
    'mesh_context', 'param_shardings', 'process_batch_rows', 'resolve_mesh_shape', 'shard_batch',
    'strip_partitioning'
]
