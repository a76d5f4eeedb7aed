"""The one generic training loop: sharded init or restore, a jitted step, EMA, logging, checkpoints, hooks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
import sys
import time
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import optax

from landiff_jax import parallel
from landiff_jax.data.pipeline import make_batch_iterator
from landiff_jax.nn.precision import gradient_reduce_dtype
from landiff_jax.train import checkpoint
from landiff_jax.train.metrics import MetricsWriter, scalar_metrics
from landiff_jax.train.optimizer import (flatten_params, learning_rate_schedule, make_optimizer, merge_params,
                                        split_frozen, unflatten_params)
from landiff_jax.train.state import TrainState
from landiff_jax.train.task import Task, count_units

Hook = Callable[[int, TrainState, dict[str, jax.Array]], None]
# A loss_fn metric under this key is not logged: it goes to `task.update_frozen` (see `Task`).
STATE_UPDATE_KEY = 'frozen_update_inputs'
GRAD_REDUCE_DTYPES = ('float32', 'bfloat16')


def validate_train_config(train_config) -> None:
  if not train_config.workdir:
    raise ValueError('train.workdir is empty; set it (e.g. --config.train.workdir=/tmp/run) so checkpoints '
                     'and metrics have somewhere to go.')
  for field in ('num_steps', 'batch_size', 'log_every', 'checkpoint_every'):
    if train_config[field] < 1:
      raise ValueError(f'train.{field}={train_config[field]} must be at least 1.')
  if not 0 <= train_config.ema_decay < 1:
    raise ValueError(f'train.ema_decay={train_config.ema_decay} must be in [0, 1) (0 turns EMA off).')
  if train_config.get('grad_reduce_dtype', 'float32') not in GRAD_REDUCE_DTYPES:
    raise ValueError(f'train.grad_reduce_dtype={train_config.grad_reduce_dtype!r} must be one of '
                     f'{GRAD_REDUCE_DTYPES} (the dtype gradients are summed across devices in).')


def _out_of_time(elapsed: float, max_seconds: float) -> bool:
  """Whether `train.max_seconds` has passed, as process 0 sees it (every process stops at the same step)."""
  stop = elapsed > max_seconds
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    stop = bool(multihost_utils.broadcast_one_to_all(np.asarray(stop)))
  return stop


def _check_batch_divisible(batch_size: int, mesh: Mesh, rules: parallel.sharding.Rules) -> None:
  shards = parallel.batch_shards(mesh, rules)
  if batch_size % shards:
    raise ValueError(f'train.batch_size={batch_size} cannot be split over the {shards} batch shards of mesh '
                     f'{dict(mesh.shape)}; choose a multiple of {shards} or change the mesh.')


def overlay_params(params: Any, pretrained: Any) -> Any:
  """`params` with every leaf that `pretrained` (a nested dict, possibly partial) also has replaced by its value."""
  flat, given = flatten_params(params), flatten_params(pretrained)
  unknown = [path for path in given if path not in flat]
  if unknown:
    raise ValueError(f'pretrained parameters {unknown[:5]} are not parameters of this model (paths look like '
                     f'{list(flat)[:3]}); the model directory was made for another config.')
  for path, value in given.items():
    if tuple(value.shape) != tuple(flat[path].shape):
      raise ValueError(f'pretrained parameter {path} has shape {tuple(value.shape)}, the model expects '
                       f'{tuple(flat[path].shape)}; the model directory was made for another config.')
    flat[path] = value.astype(flat[path].dtype)
  return unflatten_params(flat)


def master_dtype(task: Task) -> jnp.dtype:
  """The dtype of the master parameters and the optimizer state: the task's `param_dtype` (float32 by default)."""
  return jnp.dtype(getattr(task, 'param_dtype', 'float32'))


def as_master(params: Any, dtype: Any) -> Any:
  """Every floating leaf in the master dtype (the model computes in its own compute dtype from these)."""
  return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def _make_init_state(task: Task, tx: optax.GradientTransformation, train_config) -> Callable[..., TrainState]:
  frozen, ema_on = list(train_config.frozen), train_config.ema_decay > 0

  def init_state(rng: jax.Array, example_batch: Any, pretrained: Any = None) -> TrainState:
    init_rng, step_rng = jax.random.split(rng)
    params = nn.meta.unbox(task.init_params(init_rng, example_batch))
    if pretrained is not None:
      params = overlay_params(params, pretrained)
    trainable, frozen_params = split_frozen(as_master(params, master_dtype(task)), frozen)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen_params=frozen_params,
                      opt_state=tx.init(trainable),
                      ema_params=jax.tree.map(jnp.copy, trainable) if ema_on else None,
                      rng=jax.random.key_data(step_rng))

  return init_state


def _state_shardings(task: Task, tx: optax.GradientTransformation, train_config, mesh: Mesh,
                     rules: parallel.sharding.Rules, rng: jax.Array, example_batch: Any) -> TrainState:
  boxed = jax.eval_shape(task.init_params, rng, example_batch)
  trainable, frozen = split_frozen(parallel.param_shardings(boxed, mesh, rules), list(train_config.frozen))
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_trainable, _ = split_frozen(parallel.strip_partitioning(boxed), list(train_config.frozen))
  opt_state = optax.tree_map_params(tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, abstract_trainable),
                                    trainable, transform_non_params=lambda _: replicated,
                                    is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(step=replicated, params=trainable, frozen_params=frozen, opt_state=opt_state,
                    ema_params=trainable if train_config.ema_decay > 0 else None, rng=replicated)


class NonFiniteError(ValueError):
  """A training step's loss or gradient was not finite (with `train.nonfinite='stop'`)."""


def _keep_if_not_finite(finite: jax.Array, new_state: TrainState, state: TrainState) -> TrainState:
  """`new_state` when `finite`, else `state` with only the step advanced: a non-finite loss or gradient never
  reaches the parameters, the optimizer state or the EMA, so no checkpoint can hold it."""
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  return kept.replace(step=new_state.step)


def _make_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                     ema_decay: float, grad_reduce_dtype: Any = 'float32') -> Callable[..., Any]:

  def train_step(state: TrainState, batch: Any):
    rng = jax.random.fold_in(state.key(), state.step)

    def loss_of(trainable):
      return task.loss_fn(merge_params(trainable, state.frozen_params), batch, rng)

    # mixed precision: the task computes in its compute dtype from the fp32 masters; parameter gradients are
    # accumulated and reduced across devices in `train.grad_reduce_dtype`, then handed to the optimizer in the
    # masters' dtype
    with gradient_reduce_dtype(grad_reduce_dtype):
      (loss, task_metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    frozen_params = state.frozen_params
    if STATE_UPDATE_KEY in task_metrics:
      task_metrics = dict(task_metrics)
      inputs = task_metrics.pop(STATE_UPDATE_KEY)
      frozen_params = task.update_frozen(merge_params(params, frozen_params), inputs, rng)
    ema = state.ema_params
    if ema_decay > 0:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = dict(task_metrics, loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step),
                   nonfinite=(~finite).astype(jnp.float32))
    new_state = state.replace(step=state.step + 1, params=params, frozen_params=frozen_params, opt_state=opt_state,
                              ema_params=ema)
    return _keep_if_not_finite(finite, new_state, state), metrics, count_units(task, batch)

  return train_step


def _throughput(window_units: list[dict[str, Any]], seconds: float) -> dict[str, float]:
  totals: dict[str, float] = {}
  for units in jax.device_get(window_units):
    for name, value in units.items():
      totals[name] = totals.get(name, 0.0) + float(value)
  return {f'{name}_per_sec': total / seconds for name, total in totals.items()}


def train(task: Task, train_config, parallel_config, *, mesh: Mesh | None = None, hooks: Sequence[Hook] = (),
          config: Any = None) -> TrainState:
  """Trains `task` to `train_config.num_steps`, resuming from the latest checkpoint in `train_config.workdir`.

  `mesh` defaults to `parallel.make_mesh(parallel_config.mesh)`. Each hook is called as
  `hook(step, state, metrics)` after every step (and after that step's checkpoint has been started), with the
  step's metrics still on the devices; `state` is donated to the next step, so copy what you keep.
  `config` (default: the train and parallel sections) is stored as JSON with every checkpoint.
  """
  validate_train_config(train_config)
  parallel.initialize_distributed(parallel_config)
  mesh = parallel.make_mesh(parallel_config.mesh) if mesh is None else mesh
  rules = parallel.logical_rules(parallel_config)
  _check_batch_divisible(train_config.batch_size, mesh, rules)
  tx, schedule = make_optimizer(train_config), learning_rate_schedule(train_config)
  saved_config = checkpoint.config_as_json(
      config if config is not None else {'train': train_config.to_dict(), 'parallel': parallel_config.to_dict()})
  # each process reads the rows of every global batch that its devices hold, so the global batch (and with it
  # the per-row randomness of the loss) does not depend on the number of processes
  dataset = task.dataset()
  data = make_batch_iterator(dataset, train_config.batch_size, seed=train_config.data_seed,
                             shuffle=train_config.shuffle,
                             rows=parallel.process_batch_rows(mesh, rules, train_config.batch_size))
  manager = checkpoint.make_manager(train_config.workdir, train_config.keep_checkpoints)
  try:
    with parallel.mesh_context(mesh, rules):
      example_batch = _peek_batch(data, mesh, rules)
      state = _init_or_restore(task, tx, train_config, mesh, rules, example_batch, data, manager)
      step_fn = _jit_train_step(task, tx, schedule, train_config, mesh, state, example_batch)
      watch = _NonFiniteWatch(train_config, len(dataset), data)
      return _run(step_fn, state, data, train_config, mesh, rules, manager, hooks, saved_config, watch)
  finally:
    manager.wait_until_finished()
    manager.close()


def _peek_batch(data, mesh: Mesh, rules: parallel.sharding.Rules) -> Any:
  """The first batch, as global arrays, without moving the iterator."""
  start_position = data.get_state()
  batch = parallel.shard_batch(next(data), mesh, rules)
  data.set_state(start_position)
  return batch


def _init_or_restore(task, tx, train_config, mesh, rules, example_batch, data, manager) -> TrainState:
  """The latest checkpoint (moving `data` to its saved position) or, without one, a fresh sharded init."""
  rng = jax.random.key(train_config.seed)
  shardings = _state_shardings(task, tx, train_config, mesh, rules, rng, example_batch)
  init_state = _make_init_state(task, tx, train_config)
  abstract_state = checkpoint.abstract_tree(jax.eval_shape(init_state, rng, example_batch), shardings)
  restored = checkpoint.restore(manager, abstract_state)
  if restored is None:
    pretrained = _place_pretrained(task, shardings)
    return jax.jit(init_state, out_shardings=shardings)(rng, example_batch, pretrained)
  state, data_position = restored
  data.set_state(data_position)
  return state


def _place_pretrained(task: Task, shardings: TrainState) -> Any:
  """The task's `pretrained_params()` (if it has one), each leaf placed in its parameter's sharding."""
  loader = getattr(task, 'pretrained_params', None)
  pretrained = loader() if loader is not None else None
  if pretrained is None:
    return None
  param_shardings = flatten_params(merge_params(shardings.params, shardings.frozen_params))
  placed = {}
  for path, value in flatten_params(pretrained).items():
    if path not in param_shardings:
      raise ValueError(f'pretrained parameter {path} is not a parameter of this model (paths look like '
                       f'{list(param_shardings)[:3]}); the model directory was made for another config.')
    placed[path] = jax.device_put(value, param_shardings[path])
  return unflatten_params(placed)


def _jit_train_step(task, tx, schedule, train_config, mesh, state, example_batch):
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_shardings = jax.tree.map(lambda x: x.sharding, example_batch)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(_make_train_step(task, tx, schedule, train_config.ema_decay,
                                  train_config.get('grad_reduce_dtype', 'float32')),
                 in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, replicated, replicated), donate_argnums=(0,))


def batch_examples(num_examples: int, batch_size: int, seed: int, shuffle: bool, batch_number: int) -> list[int]:
  """Indices into the task's dataset of the examples of global batch `batch_number`: the same order as
  `make_batch_iterator` draws them (shuffled anew every epoch, then cut into global batches)."""
  indices = grain.MapDataset.range(num_examples)
  if shuffle:
    indices = indices.shuffle(seed=seed)
  indices = indices.repeat()
  return [int(indices[batch_number * batch_size + row]) for row in range(batch_size)]


class _NonFiniteWatch:
  """Checks each step's `nonfinite` flag one step late (so the host never waits on the step it just started),
  and before every checkpoint. `train.nonfinite='stop'` raises `NonFiniteError` naming the step and its batch;
  'skip' reports the skipped step and goes on (the step itself already kept the state unchanged)."""

  def __init__(self, train_config, num_examples: int, data):
    self.mode = str(train_config.get('nonfinite', 'stop'))
    if self.mode not in ('stop', 'skip'):
      raise ValueError(f"train.nonfinite={self.mode!r} must be 'stop' or 'skip'.")
    self.config, self.num_examples = train_config, num_examples
    position = data.get_state()
    self.first_batch = int(position.get('next_index', 0)) if isinstance(position, dict) else 0
    self.first_step = None
    self.pending: list[tuple[int, Any]] = []
    self.skipped = 0

  def add(self, step: int, metrics: dict[str, Any]) -> None:
    if self.first_step is None:
      self.first_step = step
    self.pending.append((step, metrics))

  def describe(self, step: int) -> str:
    batch = self.first_batch + step - self.first_step
    c = self.config
    examples = batch_examples(self.num_examples, c.batch_size, c.data_seed, c.shuffle, batch)
    return (f'global batch {batch} of the data stream (train.data_seed={c.data_seed}), examples {examples} of the '
            f'dataset')

  def check(self, keep_last: bool) -> None:
    """Looks at every pending step (but the newest, when `keep_last`)."""
    ready = self.pending[:-1] if keep_last else self.pending
    self.pending = self.pending[len(ready):]
    for step, metrics in ready:
      if float(metrics['nonfinite']) == 0:
        continue
      values = f'loss {float(metrics["loss"])}, gradient norm {float(metrics["grad_norm"])}'
      if self.mode == 'stop':
        raise NonFiniteError(
            f'step {step}: the loss or a gradient is not finite ({values}) on {self.describe(step)}; the run stops '
            'here, its parameters untouched by that step and no checkpoint written after it. Look at those examples, '
            'lower train.learning_rate, or set train.nonfinite=skip to skip such steps.')
      self.skipped += 1
      if jax.process_index() == 0:
        print(f'landiff-jax: step {step} skipped: the loss or a gradient is not finite ({values}) on '
              f'{self.describe(step)}.', file=sys.stderr, flush=True)


def _run(step_fn, state, data, train_config, mesh, rules, manager, hooks, saved_config,
         watch: _NonFiniteWatch) -> TrainState:
  first_step, num_steps = int(state.step), train_config.num_steps
  writer = MetricsWriter(train_config.workdir, total_steps=num_steps, initial_step=min(first_step, num_steps),
                         progress=train_config.progress, enabled=jax.process_index() == 0)
  window_units, window_start = [], time.perf_counter()
  started = time.perf_counter()
  max_seconds = float(train_config.get('max_seconds', 0) or 0)
  try:
    for step in range(first_step + 1, num_steps + 1):
      state, metrics, units = step_fn(state, parallel.shard_batch(next(data), mesh, rules))
      watch.add(step, metrics)
      watch.check(keep_last=True)
      window_units.append(units)
      writer.advance()
      last = step == num_steps
      if step % train_config.log_every == 0 or last:
        host_metrics = scalar_metrics(jax.device_get(metrics))  # waits for this step, so the timing is real
        elapsed = time.perf_counter() - window_start
        throughput = {'steps_per_sec': len(window_units) / elapsed, **_throughput(window_units, elapsed)}
        if not last and max_seconds and _out_of_time(time.perf_counter() - started, max_seconds):
          last = True
          host_metrics['stopped_by_max_seconds'] = 1.0
        writer.write(step, {**host_metrics, **throughput})
        window_units, window_start = [], time.perf_counter()
      if step % train_config.checkpoint_every == 0 or last:
        watch.check(keep_last=False)
        checkpoint.save(manager, step, state, data.get_state(), saved_config)
      for hook in hooks:
        hook(step, state, metrics)
      if last:
        break
  finally:
    writer.close()
  return state
