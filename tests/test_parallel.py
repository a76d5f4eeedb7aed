"""Mesh construction, logical-axis rules, parameter and batch shardings, distributed start-up."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from landiff_jax import parallel
from toy_task import toy_parallel_config


def mesh_of(data, fsdp, tensor, devices=None):
  return parallel.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor), devices=devices)


@pytest.mark.parametrize('sizes, expected', [
    ((8, 1, 1), (8, 1, 1)),
    ((2, 4, 1), (2, 4, 1)),
    ((1, 2, 4), (1, 2, 4)),
    ((-1, 1, 1), (8, 1, 1)),
    ((2, -1, 2), (2, 2, 2)),
    ((1, 1, -1), (1, 1, 8)),
])
def test_make_mesh_shapes(sizes, expected):
  mesh = mesh_of(*sizes)
  assert mesh.axis_names == ('data', 'fsdp', 'tensor')
  assert tuple(mesh.shape.values()) == expected
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_on_given_devices():
  mesh = mesh_of(-1, 1, 1, devices=jax.devices()[:1])
  assert tuple(mesh.shape.values()) == (1, 1, 1) and mesh.devices.flat[0] == jax.devices()[0]


@pytest.mark.parametrize('sizes, message', [
    ((3, 1, 1), r'data=3, fsdp=1, tensor=1 needs 3 devices but 8 are available.*product is 8.*-1'),
    ((4, 4, 1), r'needs 16 devices but 8 are available'),
    ((-1, 3, 1), r'multiply to 3, which does not divide the 8 devices'),
    ((-1, -1, 1), r'at most one axis may be -1'),
    ((0, 1, 1), r'must be positive or -1'),
])
def test_bad_mesh_is_rejected_with_a_clear_message(sizes, message):
  with pytest.raises(ValueError, match=message):
    mesh_of(*sizes)


def test_logical_rules_from_config():
  rules = parallel.logical_rules(toy_parallel_config())
  assert isinstance(rules, tuple) and all(isinstance(rule, tuple) and len(rule) == 2 for rule in rules)
  assert dict(rules)['batch'] == ('data', 'fsdp')
  assert dict(rules)['embed'] == 'fsdp' and dict(rules)['length'] is None
  bad = ml_collections.ConfigDict(dict(logical_axis_rules=[('embed', 'model')]))
  with pytest.raises(ValueError, match="maps 'embed' to unknown mesh axes \\['model'\\]"):
    parallel.logical_rules(bad)


class Block(nn.Module):
  width: int = 8

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.with_logical_partitioning(nn.initializers.ones, ('embed', 'mlp')),
                        (x.shape[-1], self.width))
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)), (self.width,))
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)), (self.width,))
    plain = self.param('plain', nn.initializers.zeros, (3,))
    return (x @ kernel + bias) * scale + plain.sum()


def test_param_shardings_follow_the_rules():
  mesh = mesh_of(1, 2, 4)
  rules = parallel.logical_rules(toy_parallel_config())
  x = jnp.ones((2, 4))
  for params in (jax.eval_shape(Block().init, jax.random.key(0), x), Block().init(jax.random.key(0), x)):
    shardings = parallel.param_shardings(params, mesh, rules)['params']
    assert shardings['kernel'].spec == P('fsdp', 'tensor')
    assert shardings['bias'].spec == P('tensor')
    assert shardings['scale'].spec == P(None)
    assert shardings['plain'].spec == P()
    assert shardings['kernel'].mesh is mesh


def test_param_shardings_reject_an_indivisible_parameter():
  mesh = mesh_of(1, 2, 4)
  rules = parallel.logical_rules(toy_parallel_config())
  params = jax.eval_shape(Block(width=6).init, jax.random.key(0), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"'params/bias' axis 0 \(logical 'mlp', size 6\) cannot be split over mesh axes 'tensor' of size 4"):
    parallel.param_shardings(params, mesh, rules)
  # inference places what it can: the indivisible dimension stays whole, the others keep their axes
  shardings = parallel.param_shardings(params, mesh, rules, uneven='replicate')['params']
  assert shardings['kernel'].spec == P('fsdp', None) and shardings['bias'].spec == P(None)


@pytest.mark.parametrize('sizes', [(2, 4, 1), (1, 2, 4), (8, 1, 1)])
def test_shard_batch_places_rows(sizes):
  mesh = mesh_of(*sizes)
  rules = parallel.logical_rules(toy_parallel_config())
  batch = {'x': np.arange(8 * 3, dtype=np.float32).reshape(8, 3), 'id': np.arange(8)}
  sharded = parallel.shard_batch(batch, mesh, rules)
  data, fsdp, _ = sizes
  rows_per_shard = 8 // (data * fsdp)
  assert sharded['x'].sharding.spec == P(('data', 'fsdp'), None)
  for shard in sharded['id'].addressable_shards:
    d, f, _ = np.argwhere(mesh.devices == shard.device)[0]
    first = (d * fsdp + f) * rows_per_shard
    np.testing.assert_array_equal(np.asarray(shard.data), np.arange(first, first + rows_per_shard))
  np.testing.assert_array_equal(np.asarray(sharded['x']), batch['x'])


def test_mesh_context_applies_logical_constraints():
  mesh = mesh_of(2, 4, 1)
  rules = parallel.logical_rules(toy_parallel_config())
  with parallel.mesh_context(mesh, rules):
    y = jax.jit(lambda x: nn.with_logical_constraint(x * 2, ('batch', None)))(jnp.ones((8, 4)))
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(('data', 'fsdp'), None)), 2)
  assert {shard.data.shape for shard in y.addressable_shards} == {(1, 4)}


def test_initialize_distributed(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  config = toy_parallel_config()
  assert parallel.initialize_distributed(config) is False
  assert calls == []
  config.update(dict(distributed=True, coordinator_address='10.0.0.1:1234', num_processes=4, process_id=2))
  assert parallel.initialize_distributed(config) is True
  assert calls == [dict(coordinator_address='10.0.0.1:1234', num_processes=4, process_id=2)]
