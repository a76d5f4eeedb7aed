"""orbax checkpoints of the training state, the data iterator position and the config.

One composite item per step: 'state' (the TrainState, sharded arrays), 'data' (the grain iterator state) and
'config' (JSON). orbax writes each step to `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so an
interrupted save is never restored; leftover temporary directories are deleted when the manager opens. A finished
step that cannot be read back (files truncated by a full disk, a copy cut short, a bucket without atomic renames) is
reported, moved aside to `<step>.unreadable-<time>` and the next older step is restored instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

ITEMS = ('state', 'data', 'config')


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  if keep < 1:
    raise ValueError(f'train.keep_checkpoints={keep} must be at least 1.')
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True, create=True)
  # handlers named up front, so a step's metadata can be read before anything is restored
  handlers = {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
              'config': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def config_as_json(config: Any) -> dict[str, Any]:
  """A ConfigDict (or plain mapping) as JSON-safe data."""
  if hasattr(config, 'to_json_best_effort'):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=repr))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict[str, Any],
         config: dict[str, Any]) -> None:
  """Starts saving `step` (asynchronously once the arrays are copied off the devices)."""
  args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                            config=ocp.args.JsonSave(config))
  manager.save(step, args=args)


def abstract_tree(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: what `restore` fills."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _key_name(key: Any) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """'/'-joined path → shape of every array of `tree` (a state, or orbax's metadata of one)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  return {'/'.join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in flat
          if leaf is not None and hasattr(leaf, 'shape')}


def _mismatch(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> str | None:
  """How `step`'s saved state differs from `abstract_state` (other arrays or shapes), or None when it fits; raises
  when the step's metadata cannot be read."""
  saved = manager.item_metadata(step)['state']
  if saved is None:
    raise ValueError('it holds no readable state metadata')
  saved, wanted = _shapes(getattr(saved, 'tree', saved)), _shapes(abstract_state)
  missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
  if missing or extra:
    return f'arrays missing from it: {missing[:3]}, arrays it has in excess: {extra[:3]}'
  shapes = [f'{path} {saved[path]} ≠ {wanted[path]}' for path in sorted(wanted) if saved[path] != wanted[path]]
  return f'shapes differ: {shapes[:3]}' if shapes else None


def set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves an unreadable `step` out of the manager's way (kept for inspection); returns where it went."""
  source = os.path.join(str(manager.directory), str(step))
  destination = f'{source}.unreadable-{time.strftime("%Y%m%d-%H%M%S")}'
  if jax.process_index() == 0 and os.path.isdir(source):
    os.replace(source, destination)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(f'landiff-set-aside-{step}')
  manager.reload()
  return destination


def _report(message: str) -> None:
  if jax.process_index() == 0:
    print(f'landiff-jax: {message}', file=sys.stderr, flush=True)


def restore(manager: ocp.CheckpointManager, abstract_state: Any,
            report: Callable[[str], None] = _report) -> tuple[Any, dict[str, Any]] | None:
  """(state, data iterator state) of the newest readable finished step, placed in `abstract_state`'s shardings
  (orbax reads each array straight into its target sharding, so the mesh may differ from the one that saved it).

  None when the directory holds no readable checkpoint. A step whose files cannot be read is reported through
  `report`, moved aside (`set_aside`) and the next older one tried; a step that reads but holds another task's
  arrays is an error (the workdir belongs to another run).
  """
  args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      mismatch = _mismatch(manager, step, abstract_state)
    except Exception as error:  # pylint: disable=broad-except  (any failure to read it: unreadable)
      mismatch, failure = None, error
    else:
      failure = None
    if mismatch:
      raise ValueError(
          f'checkpoint step {step} in {manager.directory} does not fit this task\'s training state ({mismatch}); '
          'point train.workdir at the run it belongs to, or at an empty directory to start afresh.')
    if failure is None:
      try:
        restored = manager.restore(step, args=args)
        return restored.state, restored.data
      except Exception as error:  # pylint: disable=broad-except
        failure = error
    destination = set_aside(manager, step)
    older = [s for s in manager.all_steps() if s < step]
    report(f'checkpoint step {step} in {manager.directory} is unreadable ({type(failure).__name__}: '
           f'{str(failure).splitlines()[0][:300] if str(failure) else ""}); moved it to {destination} and '
           + (f'resuming from step {max(older)}.' if older else 'starting afresh (no older checkpoint).'))
  return None
