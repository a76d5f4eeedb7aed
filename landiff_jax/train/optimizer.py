"""AdamW with warm-up + cosine decay, global-norm clipping, and frozen parameter sub-trees."""

from __future__ import annotations

from collections.abc import Sequence
import re
from typing import Any

from flax import traverse_util
import optax

PATH_SEPARATOR = '/'


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then cosine decay to `learning_rate * end_learning_rate_ratio`.

  Indexed by the optimizer's update count: update k (0-based) uses the value at k + 1, so the first update
  is not wasted at learning rate 0 and the last one (k = num_steps - 1) uses the end value.
  """
  peak = train_config.learning_rate
  if not 0 <= train_config.warmup_steps < train_config.num_steps:
    raise ValueError(f'train.warmup_steps={train_config.warmup_steps} must be in [0, train.num_steps='
                     f'{train_config.num_steps}); lower warmup_steps or raise num_steps.')
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=train_config.warmup_steps,
      decay_steps=train_config.num_steps, end_value=peak * train_config.end_learning_rate_ratio)
  return lambda count: schedule(count + 1)


def make_optimizer(train_config) -> optax.GradientTransformation:
  clip = train_config.grad_clip_norm
  if clip < 0:
    raise ValueError(f'train.grad_clip_norm={clip} must be >= 0 (0 turns clipping off).')
  adamw = optax.adamw(learning_rate_schedule(train_config), b1=train_config.b1, b2=train_config.b2,
                      eps=train_config.eps, weight_decay=train_config.weight_decay)
  if clip == 0:
    return adamw
  return optax.chain(optax.clip_by_global_norm(clip), adamw)


def flatten_params(params: Any) -> dict[str, Any]:
  return traverse_util.flatten_dict(params, sep=PATH_SEPARATOR)


def unflatten_params(flat: dict[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(flat, sep=PATH_SEPARATOR)


def split_frozen(params: Any, frozen_regexes: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(trainable, frozen) nested dicts: a leaf whose '/'-joined path matches any regex (`re.search`) is frozen.

  Frozen leaves are removed from the trainable tree, so they get no gradient and no optimizer state.
  Works on any nested-dict tree with the parameters' structure (values, shardings, shapes).
  """
  flat = flatten_params(params)
  patterns = [re.compile(regex) for regex in frozen_regexes]
  for pattern in patterns:
    if not any(pattern.search(path) for path in flat):
      examples = ', '.join(list(flat)[:3])
      raise ValueError(f'train.frozen pattern {pattern.pattern!r} matches no parameter; paths look like '
                       f'{examples}. Fix or remove the pattern.')
  is_frozen = lambda path: any(pattern.search(path) for pattern in patterns)
  trainable = {path: value for path, value in flat.items() if not is_frozen(path)}
  frozen = {path: value for path, value in flat.items() if is_frozen(path)}
  if not trainable:
    raise ValueError('train.frozen freezes every parameter; nothing is left to train.')
  return unflatten_params(trainable), unflatten_params(frozen)


def merge_params(trainable: Any, frozen: Any) -> dict[str, Any]:
  """The full parameter tree again (inverse of `split_frozen`)."""
  return unflatten_params({**flatten_params(trainable), **flatten_params(frozen)})
