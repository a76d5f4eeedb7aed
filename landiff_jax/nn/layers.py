"""Linear, embedding and normalisation layers whose parameters carry logical axis names."""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any, Callable

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from landiff_jax.nn.precision import dense_general

Dtype = Any
Initializer = Callable[..., jax.Array]
LogicalAxes = tuple[str | None, ...]


def as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
  return tuple(x) if isinstance(x, Sequence) else (x,)


def constrain(x: jax.Array, axes: LogicalAxes | None) -> jax.Array:
  """Logical sharding constraint on an activation; skipped when `axes` does not match its rank.

  The same layer runs on [B, L, D] and [B, D] inputs, so a rank mismatch means "no constraint" rather than an error.
  Outside an `axis_rules` context this is a no-op.
  """
  if axes is None or len(axes) != x.ndim:
    return x
  return nn.with_logical_constraint(x, axes)


class Dense(nn.Module):
  """A general dense layer: contracts `axis` of the input with the leading axes of the kernel.

  `kernel_axes` names every kernel axis (contracted axes first, then output axes); the bias takes the output names.
  """
  features: int | Sequence[int]
  axis: int | Sequence[int] = -1
  use_bias: bool = True
  kernel_axes: LogicalAxes | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  precision: lax.PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = as_tuple(self.features)
    axis = tuple(a % x.ndim for a in as_tuple(self.axis))
    in_shape = tuple(x.shape[a] for a in axis)
    kernel_shape = in_shape + features
    kernel_axes = self.kernel_axes if self.kernel_axes is not None else (None,) * len(kernel_shape)
    if len(kernel_axes) != len(kernel_shape):
      raise ValueError(
          f'Dense {self.name!r}: kernel_axes {kernel_axes} must name {len(kernel_shape)} axes '
          f'(kernel shape {kernel_shape}).')

    def init_kernel(key, shape, dtype):
      # Initialise as a 2-D (fan_in, fan_out) matrix so fan-in scaling counts all contracted axes.
      flat = self.kernel_init(key, (math.prod(in_shape), math.prod(features)), dtype)
      return flat.reshape(shape)

    kernel = self.param('kernel', nn.with_logical_partitioning(init_kernel, kernel_axes), kernel_shape,
                        self.param_dtype)
    bias = None
    if self.use_bias:
      bias_axes = kernel_axes[len(axis):]
      bias = self.param('bias', nn.with_logical_partitioning(self.bias_init, bias_axes), features,
                        self.param_dtype)
    return dense_general(jnp.asarray(x), kernel, bias, axis, self.dtype, self.precision)


class Embed(nn.Module):
  """Lookup table [num_embeddings, features]; `attend` multiplies by its transpose (tied output head)."""
  num_embeddings: int
  features: int
  axes: LogicalAxes = ('vocab', 'embed')
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  embedding_init: Initializer = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal', out_axis=0)

  def setup(self):
    self.embedding = self.param('embedding', nn.with_logical_partitioning(self.embedding_init, self.axes),
                                (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f'Embed expects integer ids, got dtype {ids.dtype}.')
    return jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)

  def attend(self, query: jax.Array) -> jax.Array:
    """query [..., features] → logits [..., num_embeddings]."""
    return jnp.dot(jnp.asarray(query, self.dtype), jnp.asarray(self.embedding, self.dtype).T)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis; statistics and affine in float32, result cast to the input dtype."""
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  param_axes: LogicalAxes = ('norm',)
  dtype: Dtype | None = None  # output dtype; None keeps the input dtype
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    y = x.astype(jnp.float32)
    mean = jnp.mean(y, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(y - mean), axis=-1, keepdims=True)
    y = (y - mean) * lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(), self.param_axes),
                         (features,), self.param_dtype)
      y = y * scale.astype(jnp.float32)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(), self.param_axes),
                        (features,), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype or x.dtype)


class RMSNorm(nn.Module):
  """`x * rsqrt(mean(x²) + eps) * w` over the last axis, in float32, result cast to the input dtype."""
  epsilon: float = 1e-5
  param_axes: LogicalAxes = ('norm',)
  dtype: Dtype | None = None  # output dtype; None keeps the input dtype
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(), self.param_axes),
                       (x.shape[-1],), self.param_dtype)
    y = x.astype(jnp.float32)
    y = y * lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale.astype(jnp.float32)).astype(self.dtype or x.dtype)


GroupMoments = tuple[jax.Array, jax.Array, jax.Array]  # (count, mean, sum of squared deviations), fp32


def _grouped(x: jax.Array, num_groups: int) -> jax.Array:
  """x [B, ..., C] as [B, ..., G, C/G] in fp32. The position axes stay apart: merging them would lose a split of
  any but the first (the VAE's rows under context parallelism) and make GSPMD gather the whole tensor."""
  return x.astype(jnp.float32).reshape(x.shape[:-1] + (num_groups, x.shape[-1] // num_groups))


def _statistics_axes(grouped: jax.Array) -> tuple[int, ...]:
  """Every axis of a `_grouped` tensor but the batch and the group."""
  return tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)


def group_statistics(x: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
  """GroupNorm's (mean, biased variance) over every non-batch position and each group's channels, in fp32."""
  grouped = _grouped(x, num_groups)
  axes = _statistics_axes(grouped)
  mean = grouped.mean(axis=axes, keepdims=True)
  return mean, jnp.square(grouped - mean).mean(axis=axes, keepdims=True)


def group_moments(part: jax.Array, num_groups: int) -> GroupMoments:
  """The moments of one part of a tensor (e.g. a few frames), to merge with `merge_group_moments`."""
  grouped = _grouped(part, num_groups)
  axes = _statistics_axes(grouped)
  mean = grouped.mean(axis=axes, keepdims=True)
  m2 = jnp.square(grouped - mean).sum(axis=axes, keepdims=True)
  return jnp.float32(math.prod(grouped.shape[a] for a in axes)), mean, m2


def merge_group_moments(a: GroupMoments | None, b: GroupMoments) -> GroupMoments:
  """The moments of two disjoint parts together (Chan et al.'s pairwise update: no cancellation)."""
  if a is None:
    return b
  (na, mean_a, m2_a), (nb, mean_b, m2_b) = a, b
  n = na + nb
  delta = mean_b - mean_a
  return n, mean_a + delta * (nb / n), m2_a + m2_b + jnp.square(delta) * (na * nb / n)


def moments_statistics(moments: GroupMoments) -> tuple[jax.Array, jax.Array]:
  count, mean, m2 = moments
  return mean, m2 / count


class GroupNorm(nn.Module):
  """GroupNorm over every non-batch position and the group's channels ([B, ..., C]); fp32 statistics with PyTorch's
  biased variance, result in `dtype`."""
  num_groups: int
  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.normalizer(x)(x)

  @nn.compact
  def normalizer(self, x: Any, statistics: tuple[jax.Array, jax.Array] | None = None
                 ) -> Callable[[jax.Array], jax.Array]:
    """The normalisation with `x`'s statistics, to apply to `x` or to any part of it along its non-batch axes (the
    VAE applies a whole chunk's statistics one frame tile at a time). With `statistics` ((mean, variance) from
    `group_statistics`, or merged `group_moments`), `x` only gives the shape and may be any object with one."""
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f'GroupNorm {self.name!r}: {channels} channels are not divisible into {self.num_groups} groups.')
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(), ('norm',)), (channels,),
                       jnp.float32)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(), ('norm',)), (channels,),
                      jnp.float32)
    mean, variance = group_statistics(x, self.num_groups) if statistics is None else statistics
    inv_std = lax.rsqrt(variance + self.eps)

    def normalize(part: jax.Array) -> jax.Array:
      normed = ((_grouped(part, self.num_groups) - mean) * inv_std).reshape(part.shape)
      return (normed * scale + bias).astype(self.dtype)

    return normalize
