"""Ahead-of-time plan of a training step on a mesh: per-device memory and FLOPs from the compiled program, with
abstract shapes only (no weights, no data), so a mesh can be chosen before the hardware is rented.

`plan_step` compiles one step for a given global batch. `plan_target` plans a stage for a named machine in
`TARGETS`: it compiles the step at 1 and 2 examples per batch shard, splits the per-device bytes into what every
step holds (parameters, optimizer state, gradients and other batch-independent temporaries) and what each example
adds (activations kept for the backward pass and their temporaries), and from that line reports whether the
requested batch fits and the largest per-device batch that does. FLOPs are the analytic model FLOPs of
`landiff_jax.bench.flops` where that module counts the stage, else XLA's cost analysis of the compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from landiff_jax import parallel
from landiff_jax.bench import flops as flops_lib
from landiff_jax.train import checkpoint
from landiff_jax.train.loop import _make_init_state, _make_train_step, _state_shardings
from landiff_jax.train.optimizer import learning_rate_schedule, make_optimizer


@dataclasses.dataclass(frozen=True)
class Target:
  """A machine to plan for: `devices` accelerators of `memory_bytes` each. The dense bf16 peak comes from
  `landiff_jax.bench.flops.PEAK_BF16_FLOPS` by `device_kind` (the one table of peaks)."""
  devices: int
  memory_bytes: int
  device_kind: str
  description: str

  @property
  def peak_flops(self) -> float:
    return flops_lib.peak_flops(self.device_kind)


# Memory is the datasheet's, in decimal GB (the allocators report a little more, e.g. 79.6 GiB on an H100 80GB).
TARGETS = {
    'h100x8': Target(8, 80 * 10**9, 'NVIDIA H100 80GB HBM3', 'one host of 8 H100 SXM 80 GB'),
    'h200x8': Target(8, 141 * 10**9, 'NVIDIA H200', 'one host of 8 H200 141 GB'),
    'v5p-64': Target(64, 95 * 10**9, 'TPU v5p', 'a TPU v5p slice of 64 chips of 95 GB HBM'),
    'v6e-64': Target(64, 32 * 10**9, 'TPU v6e', 'a TPU v6e slice of 64 chips of 32 GB HBM'),
}
# Of a device's memory, what a training step may plan to use: the rest is for the runtime (allocator
# fragmentation, collectives' buffers, the framework's own). On GPUs run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95.
USABLE_FRACTION = 0.9


def per_device_bytes(abstract: Any, shardings: Any) -> int:
  """Bytes one device holds of a tree placed with `shardings` (the largest shard of each leaf)."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    if leaf is None or not hasattr(leaf, 'shape'):
      continue
    shard = sharding.shard_shape(leaf.shape) if hasattr(sharding, 'shard_shape') else leaf.shape
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def _count(tree: Any) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree) if hasattr(x, 'shape')))


def compile_step(task: Any, train_config: Any, parallel_config: Any, mesh: Mesh, batch: dict[str, Any]) -> dict:
  """Compiles one train step for `batch` ({name: ShapeDtypeStruct} of the global batch); raw per-device bytes."""
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
  return {
      'trainable': _count(abstract_state.params), 'frozen': _count(abstract_state.frozen_params),
      'trainable_params': per_device_bytes(abstract_state.params, shardings.params),
      'frozen_params': per_device_bytes(abstract_state.frozen_params, shardings.frozen_params),
      'ema_params': per_device_bytes(abstract_state.ema_params, shardings.ema_params),
      'optimizer_state': per_device_bytes(abstract_state.opt_state, shardings.opt_state),
      'batch': per_device_bytes(abstract_batch, batch_shardings),
      'arguments': memory.argument_size_in_bytes, 'outputs': memory.output_size_in_bytes,
      'temporaries': memory.temp_size_in_bytes,
      'total': (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                - memory.alias_size_in_bytes),
      'xla_flops_per_device': float(cost.get('flops', 0.0)),
  }


def _mib(num_bytes: float) -> float:
  return round(num_bytes / 2**20, 3)


def plan_step(task: Any, train_config: Any, parallel_config: Any, mesh: Mesh, batch: dict[str, Any]) -> dict:
  """Compiles one train step for `batch` ({name: ShapeDtypeStruct} of the global batch) and reports per device."""
  c = compile_step(task, train_config, parallel_config, mesh, batch)
  return {
      'mesh': dict(mesh.shape),
      'global_batch': {k: list(v.shape) for k, v in batch.items()},
      'parameters': {'trainable': c['trainable'], 'frozen': c['frozen']},
      'per_device_mib': {
          'trainable_params': _mib(c['trainable_params']), 'frozen_params': _mib(c['frozen_params']),
          'optimizer_state': _mib(c['optimizer_state']), 'compiled_arguments': _mib(c['arguments']),
          'compiled_outputs': _mib(c['outputs']), 'compiled_temporaries': _mib(c['temporaries']),
          'compiled_total': _mib(c['total']),
      },
      'gflops_per_step_per_device': round(c['xla_flops_per_device'] / 1e9, 3),
  }


def lm_sequence_length(config: Any) -> int:
  """Positions of one training sequence of the LM task: [BOS, micro-conditions, text, SOI, the plan but its last]."""
  from landiff_jax.sampling.lm import Layout  # pylint: disable=import-outside-toplevel
  return 2 + len(config.lm.micro_conditions) + int(config.lm.text_max_length) + len(Layout.from_config(config).plan(1)) - 1


def analytic_step_flops(stage: str, config: Any, batch: int) -> float | None:
  """Model FLOPs of one training step of `batch` examples (`bench.flops`), or None for a stage it does not count.

  The diffusion stage back-propagates through the frozen backbone (activation gradients) but computes weight
  gradients only for the control branch.
  """
  if stage == 'lm':
    return flops_lib.train_step(flops_lib.lm_forward(config, batch, lm_sequence_length(config),
                                                     text_length=int(config.lm.text_max_length)))
  if stage == 'tokenizer':
    return flops_lib.train_step(flops_lib.tokenizer_forward(config, batch))
  if stage == 'backbone':
    return flops_lib.train_step(flops_lib.dit_forward(config, batch, control=False))
  if stage == 'diffusion':
    total = flops_lib.dit_forward(config, batch, control=True)
    control = total - flops_lib.dit_forward(config, batch, control=False)
    return flops_lib.train_step(total, trained_fraction=control / total)
  return None


def largest_batch(compile_at: Any, usable: float, totals: dict[int, int], max_compiles: int = 4
                  ) -> tuple[int, dict[int, int]]:
  """The largest per-device batch whose compiled step needs at most `usable` bytes, by secant steps on the
  compiled totals (`totals`: batch → bytes, at least two batches): memory is nearly, not exactly, linear in the
  batch (XLA's buffer assignment changes with it), so each guess is compiled and checked. Returns the largest
  batch known to fit (0: not even 1) and every batch compiled with its bytes."""
  totals = dict(totals)

  def bounds():
    fitting = [b for b, t in totals.items() if t <= usable]
    failing = [b for b, t in totals.items() if t > usable]
    return max(fitting, default=0), min(failing, default=None)

  for _ in range(max_compiles):
    low, high = bounds()
    if high is not None and high <= low + 1:
      break
    # the line through the two compiled batches nearest the boundary
    near = sorted(totals, key=lambda b: (abs(b - low), b))[:2] if high is None else [b for b in (low, high) if b]
    if len(near) < 2:
      near = sorted(totals)[:2]
    (b0, t0), (b1, t1) = sorted((b, totals[b]) for b in near)
    slope = (t1 - t0) / (b1 - b0)
    if slope <= 0:
      break
    guess = int(b0 + (usable - t0) // slope)
    guess = max(low + 1, guess if high is None else min(guess, high - 1))
    if guess in totals:
      break
    totals[guess] = compile_at(guess)['total']
  return bounds()[0], totals


def plan_target(stage: str, task: Any, config: Any, target_name: str, per_device_batch: int | None = None,
                devices: list[Any] | None = None) -> dict:
  """The plan of `stage` (its `task`, built from `config`) on the named target, on `devices` (default: the first
  `target.devices` visible ones, e.g. simulated CPU devices). Without `per_device_batch` the step is compiled at 1
  and 2 examples per batch shard; with it, once at that batch (then the largest batch is not searched)."""
  if target_name not in TARGETS:
    raise ValueError(f'unknown --target {target_name!r}; known targets: {sorted(TARGETS)}.')
  target = TARGETS[target_name]
  devices = list(jax.devices()[:target.devices] if devices is None else devices)
  if len(devices) < target.devices:
    raise ValueError(f'--target {target_name} needs {target.devices} devices, {len(devices)} are visible; on CPU '
                     f'set XLA_FLAGS=--xla_force_host_platform_device_count={target.devices} before starting.')
  mesh = parallel.make_mesh(config.parallel.mesh, devices=devices)
  shards = parallel.batch_shards(mesh, parallel.logical_rules(config.parallel))
  # examples per device: a tensor- (not batch-) sharded axis shares each example between its devices
  compile_at = lambda b: compile_step(task, config.train, config.parallel, mesh, task.example_shapes(b * shards))
  usable = USABLE_FRACTION * target.memory_bytes
  searched = None
  if per_device_batch:
    batch, first = per_device_batch, compile_at(per_device_batch)
    per_example, max_batch = None, None
  else:
    batch, first = 1, compile_at(1)
    second = compile_at(2)
    per_example = second['total'] - first['total']
    max_batch, searched = largest_batch(compile_at, usable, {1: first['total'], 2: second['total']})
  params = first['trainable_params'] + first['frozen_params'] + first['ema_params']
  state = params + first['optimizer_state']
  activations = None if per_example is None else per_example * batch
  temporaries = first['total'] - state - first['batch'] - (activations or 0)
  global_batch = batch * shards
  analytic = analytic_step_flops(stage, config, global_batch)
  step_flops = analytic if analytic is not None else first['xla_flops_per_device'] * len(devices)
  per_device_flops = step_flops / len(devices)
  gib = lambda b: None if b is None else round(b / 2**30, 3)
  parts = {'parameters': params, 'optimizer_state': first['optimizer_state'], 'batch': first['batch'],
           'activations': activations, 'temporaries': temporaries, 'total': first['total'],
           'per_extra_example': per_example}
  return {
      'stage': stage, 'target': target_name, 'target_devices': target.devices,
      'target_memory_gib': gib(target.memory_bytes), 'usable_gib': gib(usable),
      'planned_on': f'{len(devices)} x {devices[0].device_kind}',
      'mesh': dict(mesh.shape), 'attention_backend': str(config.get('attention_backend', '')),
      'remat_policy': str(config.get('remat_policy', '')),
      'parameters': {'trainable': first['trainable'], 'frozen': first['frozen']},
      'per_device_batch': batch, 'global_batch': global_batch,
      # activations: what each example adds (kept for the backward pass, and their temporaries); temporaries:
      # batch-independent working memory (gradients, gathered FSDP weights, the optimizer update), plus the
      # activations when only one batch was compiled (--per-device-batch)
      'per_device_gib': {name: gib(value) for name, value in parts.items()},
      'per_device_bytes': {name: None if value is None else int(value) for name, value in parts.items()},
      'fits': bool(first['total'] <= usable),
      'max_per_device_batch': max_batch,
      # every batch compiled in the search and its per-device bytes (the answer is exact when max + 1 is among them)
      'batches_compiled': None if searched is None else {b: int(v) for b, v in sorted(searched.items())},
      'flops_per_step': step_flops, 'flops_source': 'analytic' if analytic is not None else 'xla_cost_analysis',
      'tflops_per_step_per_device': round(per_device_flops / 1e12, 3),
      'step_seconds_at_peak': round(per_device_flops / target.peak_flops, 4) if target.peak_flops else None,
  }
