"""`landiff-jax bench train --stage S`: time the training step of a stage on random data at the configured shapes.

Builds the stage's task from `configs/train.py:S` (`--tiny`: `:S,tiny`, which runs on a CPU in seconds), places
fresh sharded parameters on every visible device with the stage's mesh (configs/train.py PLANS), and times the
same jitted, donating step the training loop runs, on one fixed random global batch of `--batch` examples per
batch shard. Reports the median step time, samples (and tokens or frames) per second per device, model FLOP
utilisation from the analytic count of `landiff_jax.bench.flops` against the device's dense bf16 peak (XLA's cost
analysis only for the stages that module does not count: vae, theia), the compiled program's memory and the
device's peak memory (GPU/TPU).
"""

from __future__ import annotations

import importlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax import config as config_lib
from landiff_jax import parallel
from landiff_jax.bench import device_peak_bytes, gib, time_calls
from landiff_jax.bench import flops as flops_lib
from landiff_jax.train.loop import _make_init_state, _make_train_step, _state_shardings
from landiff_jax.train.optimizer import learning_rate_schedule, make_optimizer
from landiff_jax.train.plan import analytic_step_flops
from landiff_jax.train.task import count_units


def stage_config(options: Any) -> Any:
  size = ',tiny' if getattr(options, 'tiny', False) else ''
  return config_lib.load_config(f'configs/train.py:{options.stage}{size}', list(getattr(options, 'overrides', [])))


def _int_range(name: str, config: Any) -> int:
  """Exclusive upper bound of random integer inputs of batch key `name`."""
  bounds = {'ids': int(config.lm.codebook_size), 'text_length': int(config.lm.text_max_length) + 1}
  return bounds.get(name, 256)


def random_batch(shapes: dict[str, jax.ShapeDtypeStruct], config: Any, shardings: dict[str, Any]) -> dict:
  """Random arrays of `shapes`, each placed in its batch sharding: normal floats, uint8 pixels, integer ids in
  range (text lengths at least 1)."""
  batch = {}
  for i, (name, shape) in enumerate(sorted(shapes.items())):
    key = jax.random.key(i)
    if jnp.issubdtype(shape.dtype, jnp.floating):
      make = lambda key, s=shape: jax.random.normal(key, s.shape, s.dtype)
    else:
      low, high = (1 if name == 'text_length' else 0), _int_range(name, config)
      make = lambda key, s=shape, low=low, high=high: jax.random.randint(key, s.shape, low, high).astype(s.dtype)
    batch[name] = jax.jit(make, out_shardings=shardings[name])(key)
  return batch


def run(config: Any, options: Any) -> dict:
  from landiff_jax.cli import DEFAULT_CONFIG, TRAIN_TASKS  # pylint: disable=import-outside-toplevel
  stage = getattr(options, 'stage', '')
  if not stage:
    raise ValueError(f'bench train needs --stage, one of {sorted(TRAIN_TASKS)}.')
  if getattr(options, 'config', DEFAULT_CONFIG) == DEFAULT_CONFIG:  # the stage's own training config
    config = stage_config(options)
  config.compute_dtype = options.dtype
  module_name, class_name = TRAIN_TASKS[stage].split(':')
  task = getattr(importlib.import_module(module_name), class_name)(config)
  mesh = parallel.make_mesh(config.parallel.mesh)
  rules = parallel.logical_rules(config.parallel)
  shards = parallel.batch_shards(mesh, rules)
  global_batch = options.batch * shards
  config.train.batch_size = global_batch
  tx, schedule = make_optimizer(config.train), learning_rate_schedule(config.train)
  rng = jax.random.key(0)
  shapes = task.example_shapes(global_batch)
  with parallel.mesh_context(mesh, rules):
    batch_shardings = {k: parallel.batch_sharding(mesh, rules, len(v.shape)) for k, v in shapes.items()}
    batch = random_batch(shapes, config, batch_shardings)
    shardings = _state_shardings(task, tx, config.train, mesh, rules, rng, batch)
    state = jax.jit(_make_init_state(task, tx, config.train), out_shardings=shardings)(rng, batch)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = jax.jit(_make_train_step(task, tx, schedule, config.train.ema_decay),
                   in_shardings=(shardings, batch_shardings), out_shardings=(shardings, replicated, replicated),
                   donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {'state': state}

    def one_step():
      holder['state'], metrics, units = compiled(holder['state'], batch)
      holder['units'] = units
      return metrics['loss']

    timing = time_calls(one_step, options.repeats)
    loss = float(one_step())
    units = {k: float(v) for k, v in jax.device_get(holder['units']).items()}
  memory = compiled.memory_analysis()
  devices = mesh.devices.size
  seconds = timing['median_s']
  analytic = analytic_step_flops(stage, config, global_batch)
  if analytic is None:  # vae, theia: what XLA counts in the compiled step (per device, so times the devices)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    analytic_source, step_flops = 'xla_cost_analysis', float(cost.get('flops', 0.0)) * devices
  else:
    analytic_source, step_flops = 'analytic', analytic
  peak = flops_lib.peak_flops()
  return {
      'benchmark': 'train', 'stage': stage, 'size': 'tiny' if getattr(options, 'tiny', False) else 'release',
      'device': f'{devices} x {jax.devices()[0].device_kind}', 'mesh': dict(mesh.shape),
      'compute_dtype': config.compute_dtype, 'attention_backend': str(config.attention_backend),
      'remat_policy': str(config.remat_policy),
      'per_device_batch': options.batch, 'global_batch': global_batch,
      'compile_s': round(compile_s, 2), 'step': timing, 'loss_finite': bool(np.isfinite(loss)),
      **{f'{name}_per_sec_per_device': round(value / seconds / devices, 3) for name, value in units.items()},
      'flops_per_step': step_flops, 'flops_source': analytic_source,
      'tflops_per_sec_per_device': round(step_flops / devices / seconds / 1e12, 3),
      'peak_tflops_per_device': None if peak is None else peak / 1e12,
      'mfu': None if peak is None else round(step_flops / devices / seconds / peak, 4),
      'compiled_gib_per_device': {'arguments': gib(memory.argument_size_in_bytes),
                                  'temporaries': gib(memory.temp_size_in_bytes)},
      'peak_gib': gib(device_peak_bytes()),
  }
