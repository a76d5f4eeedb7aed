"""One generic sharded training loop; each stage supplies a `Task`."""

from landiff_jax.train.loop import train, validate_train_config
from landiff_jax.train.optimizer import learning_rate_schedule, make_optimizer, merge_params, split_frozen
from landiff_jax.train.state import TrainState
from landiff_jax.train.task import Task, count_units

__all__ = [
    'Task', 'TrainState', 'count_units', 'learning_rate_schedule', 'make_optimizer', 'merge_params',
    'split_frozen', 'train', 'validate_train_config'
]
