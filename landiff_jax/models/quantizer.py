"""The tokenizer's vector quantizer (reference landiff-official.md §3.3): project 768 → 16, nearest of 2,048 codes
by Euclidean distance, project back 16 → 768.

The codebook is a parameter here (inference and conversion); training updates it by EMA outside the gradient
(`landiff_jax.train.tasks.tokenizer`), keeping the EMA statistics in the `quantizer_ema` collection.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from landiff_jax.nn import Dense

Array = jax.Array


def squared_distances(x: Array, codebook: Array) -> Array:
  """|x|² + |e|² − 2x·e, clamped at 0, [..., K], in float32 at full matmul precision."""
  x, codebook = x.astype(jnp.float32), codebook.astype(jnp.float32)
  cross = jnp.einsum('...d,kd->...k', x, codebook, precision=lax.Precision.HIGHEST)
  d = jnp.sum(x * x, axis=-1, keepdims=True) + jnp.sum(codebook * codebook, axis=-1) - 2.0 * cross
  return jnp.maximum(d, 0.0)


class VectorQuantizer(nn.Module):
  codebook_size: int
  codebook_dim: int
  dim: int

  def setup(self):
    dense = lambda features, name: Dense(features, kernel_axes=(None, None), precision=lax.Precision.HIGHEST,
                                         name=name)
    self.project_in = dense(self.codebook_dim, 'project_in')
    self.project_out = dense(self.dim, 'project_out')
    self.codebook = self.param('codebook', nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                        ('codebook', None)),
                               (self.codebook_size, self.codebook_dim), jnp.float32)

  def project(self, z: Array) -> Array:
    """Encoder output [..., dim] → code space [..., codebook_dim] (float32)."""
    return self.project_in(z.astype(jnp.float32))

  def nearest(self, projected: Array) -> Array:
    return jnp.argmin(squared_distances(projected, self.codebook), axis=-1).astype(jnp.int32)

  def indices(self, z: Array) -> Array:
    return self.nearest(self.project(z))

  def embed(self, ids: Array) -> Array:
    """Token ids [...] → quantized vectors [..., dim]."""
    return self.project_out(jnp.take(self.codebook, ids, axis=0))

  def __call__(self, z: Array) -> dict[str, Any]:
    """Straight-through quantization of z [..., dim]: the quantized vectors (gradients flow to `project_in` via
    the code-space straight-through), the ids and the code-space values before and after quantization."""
    projected = self.project(z)
    ids = self.nearest(projected)
    codes = jnp.take(self.codebook, ids, axis=0)
    straight_through = projected + lax.stop_gradient(codes - projected)
    return dict(quantized=self.project_out(straight_through), ids=ids, projected=projected, codes=codes)
