"""The training state: one pytree that the train step donates, the checkpoint saves and restore rebuilds."""

from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
  """`step` counts finished steps. `params` holds only the trainable parameters; the optimizer never sees
  `frozen_params`. `ema_params` is None when EMA is off. `rng` is raw key data (uint32), so checkpoints
  hold a plain array; `key()` wraps it back. Every floating leaf of `params`, `frozen_params`, `opt_state` and
  `ema_params` is in the task's master dtype (`config.param_dtype`, fp32); the models compute from it in their own
  compute dtype."""
  step: jax.Array
  params: Any
  frozen_params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array

  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)
