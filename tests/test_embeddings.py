"""Timestep embeddings and the CogVideoX 3D sin-cos position table."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_3d_sincos_pos_embed, get_timestep_embedding

from landiff_jax.nn.embeddings import (TimestepMLP, cogvideox_3d_sincos_table, sincos_1d, timestep_embedding)


def numpy_timestep_embedding(t, dim, max_period=10000.0, flip=True, shift=0.0):
  half = dim // 2
  omega = np.exp(-np.log(max_period) * np.arange(half) / (half - shift))
  angles = np.asarray(t, np.float64)[:, None] * omega
  sin, cos = np.sin(angles), np.cos(angles)
  emb = np.concatenate([cos, sin] if flip else [sin, cos], axis=-1)
  return np.pad(emb, [(0, 0), (0, dim % 2)])


@pytest.mark.parametrize('flip', [True, False])
@pytest.mark.parametrize('dim', [256, 15])
def test_timestep_embedding_vs_numpy(flip, dim):
  t = np.array([0.0, 1.0, 13.0, 0.1, 999.0])
  got = timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip)
  assert got.dtype == jnp.float32 and got.shape == (5, dim)
  np.testing.assert_allclose(np.asarray(got), numpy_timestep_embedding(t, dim, flip=flip), atol=2e-4)
  if dim % 2:
    np.testing.assert_array_equal(np.asarray(got[:, -1]), 0.0)


def test_timestep_embedding_matches_diffusers_with_shift():
  t = torch.tensor([0.0, 3.0, 500.0, 999.0])
  ref = get_timestep_embedding(t, 64, flip_sin_to_cos=False, downscale_freq_shift=1).numpy()
  got = timestep_embedding(jnp.asarray(t.numpy()), 64, flip_sin_to_cos=False, downscale_freq_shift=1)
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4)


def test_sincos_1d():
  emb = sincos_1d(np.array([0.0, 2.0]), 8)
  omega = 10000.0 ** (-np.arange(4) / 4)
  assert emb.dtype == np.float64
  np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_allclose(emb[1], np.concatenate([np.sin(2 * omega), np.cos(2 * omega)]))


def test_3d_table_hand_checked_entries():
  d, t_n, h_n, w_n = 64, 3, 2, 4
  table = cogvideox_3d_sincos_table(d, t_n, h_n, w_n, spatial_interpolation=1.875, temporal_interpolation=1.0,
                                    text_length=5)
  assert table.shape == (5 + t_n * h_n * w_n, d) and table.dtype == np.float32
  np.testing.assert_array_equal(table[:5], 0.0)
  video = table[5:]
  # (t=0, h=0, w=0): temporal block D/4 = [sin 0]*D/8 + [cos 0]*D/8.
  np.testing.assert_array_equal(video[0, :d // 4], [0.0] * (d // 8) + [1.0] * (d // 8))
  omega_s = 10000.0 ** (-np.arange(12) / 12)  # spatial 1-D blocks: 3D/8 = 24 dims
  # (t=0, h=0, w=1) is row 1: the second block (first spatial block) is the w part.
  np.testing.assert_allclose(video[1, 16:28], np.sin(1 / 1.875 * omega_s), rtol=1e-6)
  np.testing.assert_allclose(video[1, 28:40], np.cos(1 / 1.875 * omega_s), rtol=1e-6)
  np.testing.assert_allclose(video[1, 40:64], [0.0] * 12 + [1.0] * 12)  # h = 0
  # (t=2, h=1, w=3): row (2·2 + 1)·4 + 3 = 23.
  omega_t = 10000.0 ** (-np.arange(8) / 8)
  np.testing.assert_allclose(video[23, :8], np.sin(2 * omega_t), rtol=1e-6)
  np.testing.assert_allclose(video[23, 16:28], np.sin(3 / 1.875 * omega_s), rtol=1e-6)
  np.testing.assert_allclose(video[23, 40:52], np.sin(1 / 1.875 * omega_s), rtol=1e-6)


def test_3d_table_matches_diffusers():
  d, t_n, h_n, w_n = 64, 3, 5, 7
  # diffusers takes spatial_size as (width, height) and returns (T, H·W, D), rows h-major.
  ref = get_3d_sincos_pos_embed(d, (w_n, h_n), t_n, spatial_interpolation_scale=1.875,
                                temporal_interpolation_scale=1.0, output_type='pt').numpy()
  assert ref.shape == (t_n, h_n * w_n, d)
  got = cogvideox_3d_sincos_table(d, t_n, h_n, w_n, 1.875, 1.0, text_length=4)
  np.testing.assert_array_equal(got[:4], 0.0)
  np.testing.assert_allclose(got[4:], ref.reshape(-1, d), atol=1e-6)


def test_3d_table_rejects_bad_dim():
  with pytest.raises(ValueError, match='embed_dim'):
    cogvideox_3d_sincos_table(40, 1, 1, 1)


def test_timestep_mlp_vs_numpy():
  mlp = TimestepMLP(hidden_features=12, out_features=6)
  x = jnp.asarray(numpy_timestep_embedding([1.0, 50.0], 8), jnp.float32)
  shapes = nn.meta.unbox(jax.eval_shape(mlp.init, jax.random.key(0), x))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), shapes)
  p = jax.tree.map(np.asarray, params)['params']
  h = np.asarray(x) @ p['fc1']['kernel'] + p['fc1']['bias']
  h = h / (1 + np.exp(-h))
  expected = h @ p['fc2']['kernel'] + p['fc2']['bias']
  np.testing.assert_allclose(np.asarray(jax.jit(mlp.apply)(params, x)), expected, rtol=1e-5, atol=1e-6)

