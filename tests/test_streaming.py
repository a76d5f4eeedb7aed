"""Chunk-wise rendering of long videos: windows cover the stream, prefixes come from the previous window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landiff_jax.sampling.streaming import render_stream, window_starts


def test_windows_cover_every_frame():
  assert window_starts(13, 13, 7) == [0]
  assert window_starts(26, 13, 7) == [0, 6, 12, 18]
  assert window_starts(39, 13, 0) == [0, 13, 26]
  for total in (14, 26, 39, 50):
    starts = window_starts(total, 13, 4)
    assert starts[-1] + 13 >= total and all(b - a == 9 for a, b in zip(starts, starts[1:]))
  with pytest.raises(ValueError, match='overlap'):
    window_starts(26, 13, 13)


def test_stream_is_continuous_and_prefixes_are_the_previous_latents():
  conditions = jnp.arange(2 * 26 * 3, dtype=jnp.float32).reshape(2, 26, 3)
  calls = []

  def render(condition, prefix, key):
    calls.append((condition, prefix))
    out = condition * 10.0  # a renderer that follows its condition exactly
    if prefix is not None:
      np.testing.assert_array_equal(np.asarray(prefix), np.asarray(out[:, :prefix.shape[1]]))
      out = out.at[:, :prefix.shape[1]].set(prefix)
    return out

  latents = render_stream(render, conditions, jax.random.key(0), window=13, overlap=7)
  assert latents.shape == (2, 26, 3)
  np.testing.assert_array_equal(np.asarray(latents), np.asarray(conditions) * 10.0)
  assert len(calls) == 4 and calls[0][1] is None and calls[1][1].shape == (2, 7, 3)
  np.testing.assert_array_equal(np.asarray(calls[3][0][:, -1]), np.asarray(conditions[:, -1]))  # padded tail
