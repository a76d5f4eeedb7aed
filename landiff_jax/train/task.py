"""The `Task` protocol: what a training stage (tokenizer, LM, control branch) gives the generic loop."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import grain
import jax

Params = Any
Batch = Any
Metrics = dict[str, jax.Array]


@runtime_checkable
class Task(Protocol):
  """A training stage. The loop calls these inside `jax.jit`, under the mesh and the logical-axis rules.

  Optionally a task also defines `count_units(batch) -> dict[str, scalar]` (traced inside the train step on the
  global batch) to report throughput in its own units, e.g. {'tokens': ...} gives `tokens_per_sec`.
  The default counts samples: the leading dimension of the batch.

  Optionally `pretrained_params() -> nested dict | None` (called on the host, before a fresh start, not on resume)
  gives parameter values — all or some, e.g. a frozen backbone from a converted model directory — that replace
  the random initialisation at the same paths.

  Optionally `param_dtype` (default 'float32'): the dtype the loop keeps the master parameters (trainable and
  frozen) and so the optimizer state and EMA in; the task's models compute in their own compute dtype from them.

  Optionally `update_frozen(params, inputs, rng) -> frozen tree`: state that learns without gradients (e.g. a VQ
  codebook updated by EMA). When `loss_fn`'s metrics hold `inputs` under the key 'frozen_update_inputs', the step
  calls it after the optimizer update with the merged parameters and returns the new frozen sub-tree (same
  structure), which becomes the next step's frozen parameters.
  """

  def init_params(self, rng: jax.Array, example_batch: Batch) -> Params:
    """Parameters boxed with flax logical partitioning metadata (`nn.with_logical_partitioning`)."""

  def loss_fn(self, params: Params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
    """Scalar loss and a dict of metrics. `params` is the full unboxed tree, trainable and frozen merged.

    Scalar metrics are logged; other arrays only reach the hooks.
    """

  def dataset(self) -> grain.MapDataset:
    """Random-access examples: dicts of numpy arrays, one example each (the loop batches them)."""


def count_units(task: Task, batch: Batch) -> Metrics:
  """Throughput units of one global batch: the task's own `count_units`, else {'samples': leading dim}."""
  counter = getattr(task, 'count_units', None)
  if counter is not None:
    return dict(counter(batch))
  return {'samples': jax.tree.leaves(batch)[0].shape[0]}
