"""Rotary position embeddings in the interleaved-pair layout (dims (2k, 2k+1) form one complex number).

This is the layout of LanDiff's `apply_rope` (complex view of the last axis), not the HF "rotate_half" layout.
Angles are produced as real arrays [..., D/2]; `apply_rope` rotates pair k by angle k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _inverse_frequencies(num_dims: int, theta: float) -> np.ndarray:
  """theta^(−2k/num_dims) for k < num_dims/2, as float32 (LanDiff builds these tables in float32)."""
  k = np.arange(num_dims // 2, dtype=np.float64)
  return (theta ** (-2.0 * k / num_dims)).astype(np.float32)


def rope_1d_frequencies(positions: jax.Array, dim: int, theta: float = 10000.0) -> jax.Array:
  """positions [...] → angles [..., dim/2] float32, angle_k = p · theta^(−2k/dim)."""
  if dim % 2:
    raise ValueError(f'RoPE dim must be even, got {dim}.')
  positions = jnp.asarray(positions).astype(jnp.float32)
  return positions[..., None] * _inverse_frequencies(dim, theta)


def rope_3d_band_sizes(head_dim: int, multiple: int = 16) -> tuple[int, int, int]:
  """Number of dims in the (t, h, w) bands: (head_dim/4, 3·head_dim/8, 3·head_dim/8)."""
  if multiple != 16:
    raise ValueError(
        f'rope_3d_frequencies supports multiple=16 (the LanDiff tokenizer band layout), got multiple={multiple}.')
  if head_dim <= 0 or head_dim % 16:
    raise ValueError(
        f'3D RoPE needs head_dim divisible by 16 (bands of head_dim/4 and 3·head_dim/8 dims, each an even '
        f'number), got head_dim={head_dim}.')
  return head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8


def rope_3d_frequencies(t: jax.Array, h: jax.Array, w: jax.Array, head_dim: int, theta: float = 10000.0,
                        multiple: int = 16) -> jax.Array:
  """(t, h, w) positions [...] → angles [..., head_dim/2] float32 laid out as [t pairs, h pairs, w pairs].

  The t band uses frequencies theta^(−2k/(head_dim/4)); the h and w bands share theta^(−2k/(3·head_dim/8)).
  For head_dim 64: pairs 0–7 rotate by t, 8–19 by h, 20–31 by w.
  """
  t_dims, hw_dims, _ = rope_3d_band_sizes(head_dim, multiple)
  return jnp.concatenate([
      rope_1d_frequencies(t, t_dims, theta),
      rope_1d_frequencies(h, hw_dims, theta),
      rope_1d_frequencies(w, hw_dims, theta),
  ], axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates x [..., L, H, D] by angles [..., L, D/2] (shared over heads); float32 math, result in x.dtype.

  Angles with fewer dims than x get a head axis inserted; angles of x's rank ([..., L, 1 or H, D/2]) are used as
  given.
  """
  half = x.shape[-1] // 2
  if x.shape[-1] % 2 or angles.shape[-1] != half:
    raise ValueError(f'apply_rope: x last dim {x.shape[-1]} must be even and twice angles last dim '
                     f'{angles.shape[-1]}.')
  if angles.ndim < x.ndim:
    angles = angles[..., None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], half, 2)
  real, imag = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


def video_token_positions(num_frames: int, height: int, width: int, num_latent_tokens: int) -> np.ndarray:
  """int32 [T·H·W + N, 3] (t, h, w) indices for `[visual tokens in (t, h, w) raster order ; N latent queries]`.

  Latent query n gets (n, n, n).
  """
  t, h, w = np.meshgrid(np.arange(num_frames), np.arange(height), np.arange(width), indexing='ij')
  visual = np.stack([t, h, w], axis=-1).reshape(-1, 3)
  latent = np.repeat(np.arange(num_latent_tokens)[:, None], 3, axis=1)
  return np.concatenate([visual, latent], axis=0).astype(np.int32)
