"""Sinusoidal embeddings: diffusion timesteps / micro-conditions, and CogVideoX's 3D sin-cos position table."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax.nn.layers import Dense, Dtype, LogicalAxes


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0.0) -> jax.Array:
  """t [...] → float32 [..., dim] = [cos(t·ω), sin(t·ω)] ([sin, cos] when not flip_sin_to_cos).

  ω_k = exp(−ln(max_period)·k/(dim//2 − downscale_freq_shift)); an odd `dim` gets one zero column at the end.
  """
  half = dim // 2
  k = jnp.arange(half, dtype=jnp.float32)
  omega = jnp.exp(-math.log(max_period) * k / (half - downscale_freq_shift))
  angles = jnp.asarray(t).astype(jnp.float32)[..., None] * omega
  parts = [jnp.cos(angles), jnp.sin(angles)] if flip_sin_to_cos else [jnp.sin(angles), jnp.cos(angles)]
  emb = jnp.concatenate(parts, axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
  return emb


def sincos_1d(positions: np.ndarray, dim: int) -> np.ndarray:
  """float64 numpy [..., dim] = [sin(p·ω_j), cos(p·ω_j)], ω_j = 10000^(−j/(dim/2)), j < dim/2."""
  if dim % 2:
    raise ValueError(f'sincos_1d needs an even dim, got {dim}.')
  omega = 10000.0 ** (-np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.asarray(positions, dtype=np.float64)[..., None] * omega
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def cogvideox_3d_sincos_table(embed_dim: int, num_frames: int, height: int, width: int,
                              spatial_interpolation: float = 1.875, temporal_interpolation: float = 1.0,
                              text_length: int = 0) -> np.ndarray:
  """CogVideoX absolute position table, float32 numpy [text_length + T·H·W, embed_dim].

  Video rows are ordered (t, h, w) with h major; each row is
  `[sincos_1d(t/ti, D/4), sincos_1d(w/si, 3D/8), sincos_1d(h/si, 3D/8)]` — w before h, the order CogVideoX's
  meshgrid produces. The first `text_length` rows (text tokens) are zero. Computed in float64, then cast.
  """
  if embed_dim % 16:
    raise ValueError(f'cogvideox_3d_sincos_table needs embed_dim divisible by 16, got {embed_dim}.')
  t, h, w = np.meshgrid(np.arange(num_frames), np.arange(height), np.arange(width), indexing='ij')
  t, h, w = (a.reshape(-1).astype(np.float64) for a in (t, h, w))
  spatial_dim = 3 * embed_dim // 8
  video = np.concatenate([
      sincos_1d(t / temporal_interpolation, embed_dim // 4),
      sincos_1d(w / spatial_interpolation, spatial_dim),
      sincos_1d(h / spatial_interpolation, spatial_dim),
  ], axis=-1)
  text = np.zeros((text_length, embed_dim), np.float64)
  return np.concatenate([text, video], axis=0).astype(np.float32)


class TimestepMLP(nn.Module):
  """Dense(in → hidden) → SiLU → Dense(hidden → out): DiT time embedding, LM micro-condition tokens."""
  hidden_features: int
  out_features: int
  kernel_axes_in: LogicalAxes = (None, 'mlp')
  kernel_axes_out: LogicalAxes = ('mlp', 'embed')
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Dense(self.hidden_features, kernel_axes=self.kernel_axes_in, dtype=self.dtype,
              param_dtype=self.param_dtype, name='fc1')(x)
    x = nn.silu(x)
    return Dense(self.out_features, kernel_axes=self.kernel_axes_out, dtype=self.dtype,
                 param_dtype=self.param_dtype, name='fc2')(x)
