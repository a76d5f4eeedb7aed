"""What every stage's task shares: examples from memory or a directory, and an optional pretrained start."""

from __future__ import annotations

from typing import Any

import grain
import jax

from landiff_jax import checkpoints
from landiff_jax.data import shards


class StageTask:
  """Base of the stage tasks. `examples` (a list of example dicts) replaces `train.data_dir` when given."""
  example_keys: tuple[str, ...] = ()
  # the stage whose fields a shard store (`landiff-jax prepare dataset`) holds for this task; None: `.npz` only
  data_stage: str | None = None

  def __init__(self, config: Any, examples: Any = None):
    self.config = config
    self.examples = examples
    # master parameters and optimizer state (the loop casts to it); the models compute in `config.compute_dtype`
    self.param_dtype = config.get('param_dtype', 'float32')

  def dataset(self) -> grain.MapDataset:
    """The examples given, else `train.data_dir`: a shard store of `data_stage`'s fields, or `.npz` files."""
    if self.examples is not None:
      return grain.MapDataset.source(self.examples)
    if self.data_stage:
      return shards.stage_source(self.config.train.data_dir, self.data_stage, self.example_keys)
    return shards.npz_source(self.config.train.data_dir, self.example_keys)

  def pretrained_params(self) -> Any:
    """The parameters of the model directory `train.init_from`, if set."""
    if not self.config.train.init_from:
      return None
    return jax.device_get(checkpoints.load_params(self.config.train.init_from))
