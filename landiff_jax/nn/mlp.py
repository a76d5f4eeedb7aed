"""Feed-forward blocks: plain two-layer MLP and the gated (GeGLU-style) MLP of the LanDiff LM."""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from landiff_jax.nn.layers import Dense, Dtype, LogicalAxes, constrain

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'tanh': jnp.tanh,
    'silu': jax.nn.silu,
}


def activation_by_name(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f'Unknown activation {name!r}; valid names: {sorted(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


class Mlp(nn.Module):
  """fc2(act(fc1(x))). `out_features=None` keeps the input width."""
  hidden_features: int
  out_features: int | None = None
  activation: str = 'gelu'
  use_bias: bool = True
  hidden_axes: LogicalAxes | None = ('batch', 'length', 'act_mlp')
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = activation_by_name(self.activation)
    dense = functools.partial(Dense, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.hidden_features, kernel_axes=('embed', 'mlp'), name='fc1')(x)
    h = constrain(act(h), self.hidden_axes)
    return dense(self.out_features or x.shape[-1], kernel_axes=('mlp', 'embed'), name='fc2')(h)


class GatedMlp(nn.Module):
  """w2(act(w1 x) ⊙ w3 x), no biases. `out_features=None` keeps the input width."""
  hidden_features: int
  out_features: int | None = None
  activation: str = 'gelu_tanh'
  hidden_axes: LogicalAxes | None = ('batch', 'length', 'act_mlp')
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = activation_by_name(self.activation)
    dense = functools.partial(Dense, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = act(dense(self.hidden_features, kernel_axes=('embed', 'mlp'), name='w1')(x))
    up = dense(self.hidden_features, kernel_axes=('embed', 'mlp'), name='w3')(x)
    h = constrain(gate * up, self.hidden_axes)
    return dense(self.out_features or x.shape[-1], kernel_axes=('mlp', 'embed'), name='w2')(h)
