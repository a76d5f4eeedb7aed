"""The renderer: the DiT (with its control branch) driven by the diffusion sampler, jit-compiled once per model."""

from __future__ import annotations

from typing import Any, Callable

import functools

import jax
import jax.numpy as jnp

from landiff_jax.models.dit import ControlledDiT
from landiff_jax.sampling import devices as devices_lib
from landiff_jax.sampling.diffusion import Schedule, sample

Array = jax.Array


def denoiser(model: ControlledDiT, params: Any, text: Array, condition: Array | None) -> Callable[[Array, Array],
                                                                                                    Array]:
  """v-prediction for rows [uncond; cond] (unconditional text = zeros, as the release) or cond rows only."""
  batch = text.shape[0]

  def fn(x: Array, timesteps: Array) -> Array:
    rows_text = jnp.concatenate([jnp.zeros_like(text), text]) if x.shape[0] == 2 * batch else text
    rows_condition = condition
    if condition is not None and condition.ndim == x.ndim and x.shape[0] == 2 * batch:
      rows_condition = jnp.concatenate([condition, condition])
    return model.apply(params, x.astype(model.dtype), timesteps, rows_text, rows_condition)

  return fn


class Renderer:
  """`renderer(params, text, condition, initial_noise, key=..., prefix=...)` → latents (float32).

  text [B, 226, 4096] T5 features; condition the semantic condition [T, H, W, C] (shared) or [B, T, H, W, C], or
  None for the plain CogVideoX-2B; initial_noise [B, T, H, W, C]; prefix [B, k, H, W, C] clean frames held fixed.

  `devices` (a list or a mesh; default: one device): with two or more, the CFG rows [uncond; cond] of each step
  run on different devices (`sampling.devices`), with the same results as on one.
  """

  def __init__(self, model: ControlledDiT, schedule: Schedule, use_cfg: bool = True,
               progress: Callable[[Any], None] | None = None, devices: Any = None):
    self.model, self.schedule, self.use_cfg, self.progress = model, schedule, use_cfg, progress
    self.devices = devices
    self._render = jax.jit(self._run, static_argnums=(0,))

  def _run(self, mesh, params, text, condition, initial_noise, key, noise, prefix):
    fn = denoiser(self.model, params, text, condition)
    return sample(fn, self.schedule, initial_noise, key=key, noise=noise, use_cfg=self.use_cfg, prefix=prefix,
                  progress=self.progress, shard_rows=functools.partial(devices_lib.constrain_rows, mesh=mesh))

  def __call__(self, params: Any, text: Array, condition: Array | None, initial_noise: Array, *,
               key: Array | None = None, noise: Array | None = None, prefix: Array | None = None) -> Array:
    rows = initial_noise.shape[0] * (2 if self.use_cfg else 1)
    mesh = devices_lib.rows_mesh(self.devices, rows)
    params, text, condition, initial_noise, key, noise, prefix = devices_lib.on_mesh_devices(
        (params, text, condition, initial_noise, key, noise, prefix), mesh)
    return self._render(mesh, params, text, condition, initial_noise, key, noise, prefix)
