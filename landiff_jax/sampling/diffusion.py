"""LanDiff's diffusion sampler (reference landiff-official.md §5.6–5.9, cogvideox-theia-t5.md §2).

Schedule (host, float64 → float32 as the release): scaled-linear betas, ᾱ' = ᾱ / (s − (s−1)ᾱ) with SNR shift s,
a = √ᾱ'. The sampler's a-values use the selected timesteps 19, 39, …, 999 (for 50 steps) and are rescaled to zero
terminal SNR with *those* endpoints; the denoiser snaps each a to the nearest entry of the 1000-step table
(rescaled with the endpoints t=0 and t=999) for its c_skip = a_q, c_out = −√(1 − a_q²) (v-prediction), while the
network sees the integer timestep.

Update: VP-SDE DPM-Solver++(2M) with λ(a) = log(a / √(1 − a²)): the first step (a = 0, λ = −∞) and the second
(r = ∞) reduce to first-order updates through IEEE infinities, every update adds fresh noise, the last step returns
the x0 prediction. Guidance: D = D_u + s·(D_c − D_u) with the "dynamic CFG" scale s(t) of the release computed in
float64 on the host (it uses the DDPM timestep, so it is effectively pseudo-random), or a constant scale.
`prefix` holds clean latent frames fixed (the release's `fixed_frames`), reset before every step and at the end.

`sample` is traceable (no Python loop over steps): wrap it in `jax.jit` together with the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def alphas_cumprod(config: Any) -> np.ndarray:
  """ᾱ'_t, t = 0..T−1, float64: scaled-linear betas, then the SNR shift."""
  betas = np.linspace(np.sqrt(config.beta_start), np.sqrt(config.beta_end), int(config.num_train_timesteps),
                      dtype=np.float64)**2
  cumprod = np.cumprod(1.0 - betas)
  shift = float(config.snr_shift_scale)
  return cumprod / (shift - (shift - 1.0) * cumprod)


def zero_snr_alphas(config: Any, timesteps: np.ndarray) -> np.ndarray:
  """a = √ᾱ' at ascending `timesteps`, rescaled so a(last) = 0 and a(first) is unchanged; float32."""
  a = np.sqrt(alphas_cumprod(config)[timesteps]).astype(np.float32)
  if len(a) == 1:  # a lone step sits at the terminal timestep: zero SNR
    return np.zeros(1, np.float32)
  first, last = a[0], a[-1]
  return ((a - last) * first / (first - last)).astype(np.float32)


def sampling_timesteps(config: Any, num_steps: int) -> np.ndarray:
  """Ascending DDPM timesteps of an n-step schedule: 19, 39, …, 999 for n = 50."""
  total = int(config.num_train_timesteps)
  if not 1 <= num_steps <= total:
    raise ValueError(f'num_steps must be in [1, {total}], got {num_steps}.')
  if num_steps == total:
    return np.arange(total)
  return np.floor(np.linspace(total - 1, 0, num_steps, endpoint=False)).astype(np.int64)[::-1].copy()


def dynamic_cfg_scales(timesteps: np.ndarray, scale: float, exponent: float, num_steps: int) -> np.ndarray:
  """s(t) = 1 + scale·(1 − cos(π·((n − t)/n)^exponent))/2 with the DDPM timestep t, in float64."""
  step = (num_steps - np.asarray(timesteps, np.float64)) / num_steps
  return 1.0 + scale * (1.0 - np.cos(np.pi * step**exponent)) / 2.0


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Per-step arrays (step i = 0 first, at t = 999): timesteps [n] (network input), alphas [n+1] (a_i, then
  a after the last step = 1), quantized [n] (a_q for c_skip/c_out), cfg_scales [n] (float64)."""
  timesteps: np.ndarray
  alphas: np.ndarray
  quantized: np.ndarray
  cfg_scales: np.ndarray

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)


def make_schedule(config: Any, num_steps: int | None = None, cfg_scale: float | None = None,
                  dynamic_cfg: bool | None = None) -> Schedule:
  """The release's schedule from a `diffusion` config section (overrides for steps and guidance)."""
  n = int(config.num_steps if num_steps is None else num_steps)
  scale = float(config.cfg_scale if cfg_scale is None else cfg_scale)
  dynamic = bool(config.dynamic_cfg if dynamic_cfg is None else dynamic_cfg)
  ascending = sampling_timesteps(config, n)
  a = zero_snr_alphas(config, ascending)[::-1]  # step order: t = 999 first
  table = zero_snr_alphas(config, np.arange(int(config.num_train_timesteps)))
  quantized = table[np.argmin(np.abs(table[None, :] - a[:, None]), axis=1)]
  timesteps = ascending[::-1].astype(np.int32)
  scales = (dynamic_cfg_scales(timesteps, scale, float(config.cfg_exponent), n) if dynamic else
            np.full(n, scale, np.float64))
  return Schedule(timesteps, np.concatenate([a, [1.0]]).astype(np.float32), quantized.astype(np.float32), scales)


def log_snr(a: Array) -> Array:
  """λ(a) = log(a / √(1 − a²)); −∞ at a = 0."""
  return jnp.log(a) - 0.5 * jnp.log1p(-a * a)


def dpmpp_2m_sde_step(x: Array, denoised: Array, denoised_prev: Array, a: Array, a_next: Array, a_prev: Array,
                      noise: Array, first: Array | bool = False) -> Array:
  """One VP-SDE DPM-Solver++(2M) update in float32. `first` (no previous prediction) takes the first-order
  update; the second step's r = ∞ reduces to it through the infinities, as in the release."""
  lam, lam_next, lam_prev = log_snr(a), log_snr(a_next), log_snr(a_prev)
  h = lam_next - lam
  m1 = jnp.sqrt((1.0 - a_next**2) / (1.0 - a**2)) * jnp.exp(-h)
  m2 = jnp.expm1(-2.0 * h) * a_next
  sigma = jnp.sqrt(1.0 - a_next**2) * jnp.sqrt(-jnp.expm1(-2.0 * h))
  r = (lam - lam_prev) / h
  half_inverse_r = 1.0 / (2.0 * r)  # 0 when r = ∞ (step 1) — the first-order update
  second_order = (1.0 + half_inverse_r) * denoised - half_inverse_r * denoised_prev
  return m1 * x - m2 * jnp.where(first, denoised, second_order) + sigma * noise


def guided_denoise(denoise_fn: Callable[[Array, Array], Array], x: Array, timestep: Array, a_q: Array,
                   scale: Array, use_cfg: bool, shard_rows: Callable[[Array], Array] | None = None) -> Array:
  """x0 prediction from v-predictions: rows [uncond; cond] when `use_cfg`, combined D_u + s·(D_c − D_u).
  `shard_rows` (e.g. `devices.constrain_rows`) places the rows on their devices (CFG across devices)."""
  batch = x.shape[0]
  shard_rows = shard_rows or (lambda rows: rows)
  inputs = shard_rows(jnp.concatenate([x, x]) if use_cfg else x)
  v = shard_rows(denoise_fn(inputs, jnp.full((inputs.shape[0],), timestep, jnp.float32)).astype(jnp.float32))
  x0 = a_q * inputs - jnp.sqrt(1.0 - a_q**2) * v
  if not use_cfg:
    return x0
  return x0[:batch] + scale * (x0[batch:] - x0[:batch])


def sample(denoise_fn: Callable[[Array, Array], Array], schedule: Schedule, initial_noise: Array, *,
           noise: Array | None = None, key: Array | None = None, use_cfg: bool = True,
           prefix: Array | None = None, progress: Callable[[Any], None] | None = None,
           shard_rows: Callable[[Array], Array] | None = None) -> Array:
  """Runs the whole schedule; returns the final x0 prediction (float32, shape of `initial_noise`).

  denoise_fn(x [R, …], timesteps [R]) → v [R, …]; with `use_cfg` the rows are [uncond (zero text); cond] and
  R = 2·batch. Step noise: `noise` [num_steps − 1, …] (explicit; step i uses noise[i]) or drawn from `key`.
  `prefix` [batch, k, …] clean latent frames held fixed along axis 1.
  """
  n = schedule.num_steps
  x = initial_noise.astype(jnp.float32)
  if noise is not None and noise.shape != (max(n - 1, 0),) + x.shape:
    raise ValueError(f'noise must have shape {(max(n - 1, 0),) + x.shape} (one draw per update step), got '
                     f'{noise.shape}.')
  if noise is None and key is None and n > 1:
    raise ValueError('give either explicit `noise` or a PRNG `key`.')
  if prefix is not None and (prefix.shape[0] != x.shape[0] or prefix.shape[2:] != x.shape[2:]):
    raise ValueError(f'prefix {prefix.shape} does not match the latents {x.shape} outside the frame axis.')
  timesteps = jnp.asarray(schedule.timesteps, jnp.float32)
  alphas, quantized = jnp.asarray(schedule.alphas), jnp.asarray(schedule.quantized)
  scales = jnp.asarray(schedule.cfg_scales.astype(np.float32))

  def hold_prefix(x):
    if prefix is None:
      return x
    return x.at[:, :prefix.shape[1]].set(prefix.astype(x.dtype))

  def step(i, carry):
    x, denoised_prev = carry
    x = hold_prefix(x)
    if progress is not None:
      jax.debug.callback(progress, i)
    denoised = guided_denoise(denoise_fn, x, timesteps[i], quantized[i], scales[i], use_cfg, shard_rows)
    a, a_next = alphas[i], alphas[i + 1]
    a_prev = jnp.where(i > 0, alphas[jnp.maximum(i - 1, 0)], 0.0)
    if noise is None:
      z = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
    elif noise.shape[0]:
      z = noise[jnp.minimum(i, noise.shape[0] - 1)].astype(jnp.float32)
    else:
      z = jnp.zeros_like(x)
    updated = dpmpp_2m_sde_step(x, denoised, denoised_prev, a, a_next, a_prev, z, first=i == 0)
    return jnp.where(i == n - 1, denoised, updated), denoised

  x, _ = jax.lax.fori_loop(0, n, step, (x, jnp.zeros_like(x)))
  return hold_prefix(x)
