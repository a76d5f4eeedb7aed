"""orbax checkpoints of the training state, the data iterator position and the config.

One composite item per step: 'state' (the TrainState, sharded arrays), 'data' (the grain iterator state) and
'config' (JSON). orbax writes each step to `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so an
interrupted save is never restored; leftover temporary directories are deleted when the manager opens.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ('state', 'data', 'config')


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  if keep < 1:
    raise ValueError(f'train.keep_checkpoints={keep} must be at least 1.')
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True, create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


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


def restore(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
  """(state, data iterator state) of the latest finished step, placed in `abstract_state`'s shardings.

  None when the directory holds no finished checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return None
  args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
  try:
    restored = manager.restore(step, args=args)
  except (ValueError, KeyError, TypeError) as error:
    raise ValueError(
        f'checkpoint step {step} in {manager.directory} does not fit this task\'s training state ({error}); '
        'point train.workdir at the run it belongs to, or at an empty directory to start afresh.') from error
  return restored.state, restored.data
