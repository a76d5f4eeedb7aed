"""A toy training stage for the train-loop tests: a 2-layer MLP regression on deterministic synthetic data.

The input projection ('frozen_proj') starts from a fixed matrix and is meant to be frozen; the two trained
layers carry the logical axis names 'embed' and 'mlp'.
"""

import importlib.util
import os

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

IN_DIM, EMBED, MLP, OUT_DIM = 8, 16, 32, 4
NUM_EXAMPLES = 64


def fixed_projection() -> np.ndarray:
  return (np.random.default_rng(7).standard_normal((IN_DIM, EMBED)) / np.sqrt(IN_DIM)).astype(np.float32)


def make_examples() -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(0)
  x = rng.standard_normal((NUM_EXAMPLES, IN_DIM)).astype(np.float32)
  mix = rng.standard_normal((IN_DIM, OUT_DIM)).astype(np.float32)
  y = np.tanh(x @ mix) + 0.5 * np.sin(x[:, :OUT_DIM])
  return [{'index': np.int32(i), 'x': x[i], 'y': y[i].astype(np.float32)} for i in range(NUM_EXAMPLES)]


class ToyMlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    proj = self.param('frozen_proj', nn.with_logical_partitioning(lambda *_: jnp.asarray(fixed_projection()),
                                                                  (None, 'embed')), (IN_DIM, EMBED))
    h = x @ proj
    w1 = self.param('w1', nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('embed', 'mlp')),
                    (EMBED, MLP))
    b1 = self.param('b1', nn.with_logical_partitioning(nn.initializers.zeros_init(), ('mlp',)), (MLP,))
    h = nn.gelu(h @ w1 + b1)
    h = nn.with_logical_constraint(h, ('batch', 'act_mlp'))
    w2 = self.param('w2', nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('mlp', 'embed')),
                    (MLP, OUT_DIM))
    return h @ w2


class ToyTask:
  """Implements the `Task` protocol; reports the batch's example ids as a (non-scalar) metric for the hooks."""

  def __init__(self):
    self.model = ToyMlp()

  def init_params(self, rng, example_batch):
    return self.model.init(rng, example_batch['x'])

  def loss_fn(self, params, batch, rng):
    del rng
    pred = self.model.apply(params, batch['x'])
    loss = jnp.mean((pred - batch['y'])**2)
    return loss, {'mae': jnp.mean(jnp.abs(pred - batch['y'])), 'example_ids': batch['index']}

  def dataset(self):
    return grain.MapDataset.source(make_examples())


def _official_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'landiff_official.py')
  spec = importlib.util.spec_from_file_location('_landiff_official_for_toy', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def toy_train_config(workdir, **overrides):
  """The project's `train_config()` with toy values, so the tests exercise the real config fields."""
  config = _official_config().train_config()
  config.update(dict(workdir=str(workdir), seed=0, num_steps=20, batch_size=8, learning_rate=3e-2,
                     warmup_steps=2, weight_decay=1e-4, grad_clip_norm=1.0, ema_decay=0.0, frozen=['frozen_proj'],
                     checkpoint_every=10, keep_checkpoints=3, log_every=1, data_seed=0, progress=False))
  config.update(overrides)
  return config


def toy_parallel_config(data=-1, fsdp=1, tensor=1):
  config = _official_config().parallel_config()
  config.mesh.update(dict(data=data, fsdp=fsdp, tensor=tensor))
  return config
