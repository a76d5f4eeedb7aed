"""Long videos, chunk by chunk (the release has only the hooks: `fixed_frames` and a prefix; reference §5.9).

Design: semantic frame i conditions latent frame i, so the semantic conditions of G groups form one stream of 13·G
frames. The renderer works on windows of `window` (13) latent frames that slide with stride `window − overlap`:
window 0 is rendered from noise; window c > 0 starts with the last `overlap` latent frames of window c − 1 held
clean and fixed (the release's `fixed_frames` mechanism, trained with `diffusion.prefix_frames`) and renders the
rest, each window conditioned on its own slice of the semantic stream. The last window is padded by repeating
the last semantic frame and trimmed. The latents of all windows, without the repeated prefixes, are one sequence
of 13·G frames that the VAE decodes in its usual causal chunks, so the video is continuous across windows.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def window_starts(total: int, window: int, overlap: int) -> list[int]:
  """Start frames of the windows covering `total` frames (stride window − overlap)."""
  if window < 1 or not 0 <= overlap < window:
    raise ValueError(f'overlap must be in [0, window={window}), got {overlap}.')
  if total <= window:
    return [0]
  stride = window - overlap
  count = math.ceil((total - window) / stride) + 1
  return [i * stride for i in range(count)]


def render_stream(render_window: Callable[[Array, Array | None, Array], Array], conditions: Array, key: Array, *,
                  window: int = 13, overlap: int = 7, progress: Callable[[int, int], Any] | None = None) -> Array:
  """Latents [B, total, …] for semantic conditions [B, total, …].

  render_window(condition [B, window, …], prefix [B, overlap, …] or None, key) → latents [B, window, …] renders one
  window (with the prefix frames held fixed when given).
  """
  total = conditions.shape[1]
  starts = window_starts(total, window, overlap)
  pad = starts[-1] + window - total
  if pad > 0:
    conditions = jnp.concatenate([conditions, jnp.repeat(conditions[:, -1:], pad, axis=1)], axis=1)
  pieces, previous = [], None
  for index, start in enumerate(starts):
    if progress is not None:
      progress(index, len(starts))
    prefix = None if previous is None or overlap == 0 else previous[:, -overlap:]
    latents = render_window(conditions[:, start:start + window], prefix, jax.random.fold_in(key, index))
    pieces.append(latents if previous is None else latents[:, overlap:])
    previous = latents
  return jnp.concatenate(pieces, axis=1)[:, :total]
