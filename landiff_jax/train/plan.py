"""Ahead-of-time plan of a training step on a mesh: per-device memory and FLOPs from the compiled program, with
abstract shapes only (no weights, no data), so a mesh can be chosen before the hardware is rented."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from landiff_jax import parallel
from landiff_jax.train import checkpoint
from landiff_jax.train.loop import _make_init_state, _make_train_step, _state_shardings
from landiff_jax.train.optimizer import learning_rate_schedule, make_optimizer


def per_device_bytes(abstract: Any, shardings: Any) -> int:
  """Bytes one device holds of a tree placed with `shardings` (the largest shard of each leaf)."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    if leaf is None or not hasattr(leaf, 'shape'):
      continue
    shard = sharding.shard_shape(leaf.shape) if hasattr(sharding, 'shard_shape') else leaf.shape
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def plan_step(task: Any, train_config: Any, parallel_config: Any, mesh: Mesh, batch: dict[str, Any]) -> dict:
  """Compiles one train step for `batch` ({name: ShapeDtypeStruct} of the global batch) and reports per device."""
  rules = parallel.logical_rules(parallel_config)
  tx, schedule = make_optimizer(train_config), learning_rate_schedule(train_config)
  rng = jax.random.key(0)
  with parallel.mesh_context(mesh, rules):
    batch_shardings = {k: parallel.batch_sharding(mesh, rules, len(v.shape)) for k, v in batch.items()}
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k]) for k, v in batch.items()}
    shardings = _state_shardings(task, tx, train_config, mesh, rules, rng, abstract_batch)
    init_state = _make_init_state(task, tx, train_config)
    abstract_state = checkpoint.abstract_tree(jax.eval_shape(init_state, rng, abstract_batch), shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(_make_train_step(task, tx, schedule, train_config.ema_decay),
                   in_shardings=(shardings, batch_shardings), out_shardings=(shardings, replicated, replicated),
                   donate_argnums=(0,))
    compiled = step.lower(abstract_state, abstract_batch).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  params = per_device_bytes(abstract_state.params, shardings.params)
  frozen = per_device_bytes(abstract_state.frozen_params, shardings.frozen_params)
  optimizer = per_device_bytes(abstract_state.opt_state, shardings.opt_state)
  count = lambda tree: int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree) if hasattr(x, 'shape')))
  mib = lambda b: round(b / 2**20, 3)
  return {
      'mesh': dict(mesh.shape),
      'global_batch': {k: list(v.shape) for k, v in batch.items()},
      'parameters': {'trainable': count(abstract_state.params), 'frozen': count(abstract_state.frozen_params)},
      'per_device_mib': {
          'trainable_params': mib(params), 'frozen_params': mib(frozen), 'optimizer_state': mib(optimizer),
          'compiled_arguments': mib(memory.argument_size_in_bytes), 'compiled_outputs': mib(memory.output_size_in_bytes),
          'compiled_temporaries': mib(memory.temp_size_in_bytes),
          'compiled_total': mib(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                                - memory.alias_size_in_bytes),
      },
      'gflops_per_step_per_device': round(float(cost.get('flops', 0.0)) / 1e9, 3),
  }
