"""Interleaved-pair RoPE (1D for the LM, 3D for the tokenizer) against a complex-number restatement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landiff_jax.nn import rope
from landiff_jax.nn.rope import video_token_positions

# Jitted entry points: one compile per call site rather than one per eager op keeps the suite fast.
apply_rope = jax.jit(rope.apply_rope)
rope_1d_frequencies = jax.jit(rope.rope_1d_frequencies, static_argnames=('dim', 'theta'))
rope_3d_frequencies = jax.jit(rope.rope_3d_frequencies, static_argnames=('head_dim', 'theta', 'multiple'))


def complex_rope(x, angles):
  """x [..., L, H, D], angles [..., L, D/2]: pair k is the complex number x[2k] + i·x[2k+1], times exp(i·angle_k)."""
  z = x[..., 0::2] + 1j * x[..., 1::2]
  z = z * np.exp(1j * angles)[..., None, :]
  out = np.empty(x.shape, np.float64)
  out[..., 0::2], out[..., 1::2] = z.real, z.imag
  return out


def numpy_3d_angles(t, h, w, head_dim, theta=10000.0):
  dt, dhw = head_dim // 4, 3 * head_dim // 8
  ft = theta ** (-2.0 * np.arange(dt // 2) / dt)
  fhw = theta ** (-2.0 * np.arange(dhw // 2) / dhw)
  t, h, w = (np.asarray(a, np.float64)[..., None] for a in (t, h, w))
  return np.concatenate([t * ft, h * fhw, w * fhw], axis=-1)


def test_1d_rope_matches_complex_rotation():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 3, 16)).astype(np.float32)
  positions = np.array([0, 1, 2, 5, 100, 1000, 4000])
  angles = rope_1d_frequencies(positions, dim=16, theta=10000.0)
  expected_angles = positions[:, None] * 10000.0 ** (-2.0 * np.arange(8) / 16)
  np.testing.assert_allclose(np.asarray(angles), expected_angles, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(x), angles)), complex_rope(x, expected_angles),
                             atol=2e-4, rtol=1e-5)


def test_1d_rope_is_not_rotate_half():
  x = np.zeros((1, 1, 1, 4), np.float32)
  x[..., 0] = 1.0  # first pair = 1 + 0i
  out = np.asarray(apply_rope(jnp.asarray(x), jnp.array([[np.pi / 2, 0.0]])))
  np.testing.assert_allclose(out[0, 0, 0], [0.0, 1.0, 0.0, 0.0], atol=1e-6)


def test_3d_rope_matches_complex_rotation_incl_latent_positions():
  head_dim = 64
  positions = video_token_positions(num_frames=2, height=3, width=4, num_latent_tokens=5)
  t, h, w = positions[:, 0], positions[:, 1], positions[:, 2]
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, positions.shape[0], 2, head_dim)).astype(np.float32)
  angles = rope_3d_frequencies(t, h, w, head_dim=head_dim)
  expected_angles = numpy_3d_angles(t, h, w, head_dim)
  assert angles.shape == (29, 32)
  np.testing.assert_allclose(np.asarray(angles), expected_angles, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(x), angles)), complex_rope(x, expected_angles),
                             atol=1e-5)


def test_3d_band_boundaries_head_dim_64():
  # t=3, h=5, w=7: pair 7 is the last t pair, 8 the first h pair, 19 the last h pair, 20 the first w pair.
  angles = np.asarray(rope_3d_frequencies(jnp.array(3), jnp.array(5), jnp.array(7), head_dim=64))
  np.testing.assert_allclose(angles[0], 3.0)
  np.testing.assert_allclose(angles[7], 3.0 * 10000.0 ** (-14 / 16), rtol=1e-6)
  np.testing.assert_allclose(angles[8], 5.0)
  np.testing.assert_allclose(angles[19], 5.0 * 10000.0 ** (-22 / 24), rtol=1e-6)
  np.testing.assert_allclose(angles[20], 7.0)
  np.testing.assert_allclose(angles[31], 7.0 * 10000.0 ** (-22 / 24), rtol=1e-6)


def test_3d_band_boundaries_rotate_the_right_dims():
  """Moving only h changes exactly pairs 8..19 of a rotated vector."""
  x = jnp.ones((1, 1, 64))
  a = apply_rope(x[None], rope_3d_frequencies(jnp.array([2]), jnp.array([1]), jnp.array([4]), head_dim=64))
  b = apply_rope(x[None], rope_3d_frequencies(jnp.array([2]), jnp.array([6]), jnp.array([4]), head_dim=64))
  changed_pairs = np.nonzero(np.abs(np.asarray(a - b)).reshape(32, 2).max(-1) > 1e-6)[0]
  np.testing.assert_array_equal(changed_pairs, np.arange(8, 20))


def test_video_token_positions():
  pos = video_token_positions(2, 2, 3, 4)
  assert pos.dtype == np.int32 and pos.shape == (16, 3)
  np.testing.assert_array_equal(pos[:7], [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2],
                                          [1, 0, 0]])
  np.testing.assert_array_equal(pos[11], [1, 1, 2])
  np.testing.assert_array_equal(pos[12:], [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]])


def test_rotation_preserves_norms_and_dtype():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 9, 4, 32)), jnp.bfloat16)
  angles = rope_1d_frequencies(np.arange(9) * 37, dim=32)
  out = apply_rope(x, angles)
  assert out.dtype == jnp.bfloat16
  norm = lambda a: np.linalg.norm(np.asarray(a, np.float32), axis=-1)
  np.testing.assert_allclose(norm(out), norm(x), rtol=1e-2)
  x32 = x.astype(jnp.float32)
  np.testing.assert_allclose(norm(apply_rope(x32, angles)), norm(x32), rtol=1e-5)


def test_angles_broadcast_over_batch_and_heads():
  x = np.random.default_rng(3).standard_normal((3, 5, 2, 16)).astype(np.float32)
  shared = rope_1d_frequencies(np.arange(5), dim=16)
  per_batch = np.broadcast_to(np.asarray(shared), (3, 5, 8))
  want = complex_rope(x, np.asarray(shared, np.float64))
  np.testing.assert_allclose(np.asarray(apply_rope(x, per_batch)), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(apply_rope(x, shared)), want, atol=1e-5)


@pytest.mark.parametrize('head_dim', [24, 40, 63])
def test_bad_head_dim_rejected(head_dim):
  with pytest.raises(ValueError, match='head_dim'):
    rope.rope_3d_frequencies(np.zeros(2), np.zeros(2), np.zeros(2), head_dim)


def test_bad_multiple_and_mismatch_rejected():
  with pytest.raises(ValueError, match='multiple'):
    rope.rope_3d_frequencies(np.zeros(2), np.zeros(2), np.zeros(2), 48, multiple=6)
  with pytest.raises(ValueError, match='twice'):
    rope.apply_rope(jnp.zeros((1, 2, 1, 8)), jnp.zeros((2, 3)))
