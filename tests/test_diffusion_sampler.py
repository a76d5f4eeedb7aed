"""Diffusion sampler: schedule, snapping, dynamic CFG and updates against a float64 numpy restatement written from the
reference, the values printed in the reference, and diffusers' CogVideoXDPMScheduler update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landiff_jax.config import load_config
from landiff_jax.sampling import diffusion

# reference landiff-official.md §5.8: dynamic CFG scale per step (t = 999, 979, …, 19)
GOLDEN_CFG = [2.291, 2.544, 6.974, 6.420, 2.788, 4.272, 1.038, 4.170, 1.618, 6.983, 1.005, 2.872, 6.977, 1.633, 4.330,
              2.437, 6.377, 6.007, 3.448, 3.198, 1.655, 6.610, 1.195, 4.295, 6.985, 1.521, 1.762, 1.058, 4.128, 1.482,
              2.003, 5.948, 4.143, 6.531, 6.140, 7.000, 6.168, 1.120, 2.098, 6.685, 6.999, 2.343, 6.213, 1.251, 7.000,
              6.864, 1.064, 1.000, 1.000, 1.123]


@pytest.fixture(scope='module')
def cfg():
  return load_config('configs/landiff_official.py').diffusion


# --- numpy float64 restatement (reference §5.6–5.8) -------------------------------------------------------------


def np_alphas(timesteps):
  betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000)**2
  cumprod = np.cumprod(1 - betas)
  shifted = cumprod / (3 - 2 * cumprod)
  a = np.sqrt(shifted[timesteps]).astype(np.float32).astype(np.float64)
  if len(a) == 1:
    return np.zeros(1)
  return (a - a[-1]) * a[0] / (a[0] - a[-1])


def np_schedule(n):
  ts = np.floor(np.linspace(999, 0, n, endpoint=False)).astype(int)[::-1]
  a_steps = np_alphas(ts)[::-1]  # t = 999 first
  table = np_alphas(np.arange(1000))
  quantized = table[[np.argmin(np.abs(table - a)) for a in a_steps]]
  cfg = 1 + 6 * (1 - np.cos(np.pi * ((n - ts[::-1]) / n)**5)) / 2
  return ts[::-1], np.append(a_steps, 1.0), quantized, cfg


def np_lambda(a):
  with np.errstate(divide='ignore'):
    return np.log(a / np.sqrt(1 - a * a)) if a < 1 else np.inf


def np_sample(v_fn, x, noise, n, use_cfg=True):
  ts, alphas, quantized, scales = np_schedule(n)
  prev = None
  for i in range(n):
    t, a, a_n, a_q = ts[i], alphas[i], alphas[i + 1], quantized[i]
    x0 = lambda v: a_q * x - np.sqrt(1 - a_q**2) * v
    if use_cfg:
      d_u, d_c = x0(v_fn(x, t, cond=False)), x0(v_fn(x, t, cond=True))
      d = d_u + scales[i] * (d_c - d_u)
    else:
      d = x0(v_fn(x, t, cond=True))
    if i == n - 1:
      return d
    h = np_lambda(a_n) - np_lambda(a)
    m1 = np.sqrt((1 - a_n**2) / (1 - a**2)) * np.exp(-h)
    m2 = np.expm1(-2 * h) * a_n
    sigma = np.sqrt(1 - a_n**2) * np.sqrt(1 - np.exp(-2 * h))
    if i == 0:
      d2 = d
    else:
      r = (np_lambda(a) - np_lambda(alphas[i - 1])) / h
      d2 = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * prev
    x = m1 * x - m2 * d2 + sigma * noise[i]
    prev = d
  return x


# --- tests ------------------------------------------------------------------------------------------------------


def test_schedule_matches_the_restatement_and_the_reference(cfg):
  s = diffusion.make_schedule(cfg)
  ts, alphas, quantized, scales = np_schedule(50)
  np.testing.assert_array_equal(s.timesteps, ts)
  assert s.timesteps[0] == 999 and s.timesteps[-1] == 19 and np.all(np.diff(s.timesteps) == -20)
  np.testing.assert_allclose(s.alphas, alphas, atol=1e-7, rtol=0)
  np.testing.assert_allclose(s.quantized, quantized, atol=1e-7, rtol=0)
  assert s.alphas[0] == 0.0 and s.alphas[-1] == 1.0
  table = diffusion.zero_snr_alphas(cfg, np.arange(1000))
  assert abs(table[0] - 0.99873) < 1e-5 and table[999] == 0.0  # reference §5.6
  snapped = [int(np.argmin(np.abs(table - a))) for a in s.alphas[:-1]]
  assert snapped == [t - 1 if t <= 159 else t for t in s.timesteps]  # the documented t−1 quirk


def test_dynamic_cfg_is_float64_and_matches_the_printed_table(cfg):
  s = diffusion.make_schedule(cfg)
  assert s.cfg_scales.dtype == np.float64
  np.testing.assert_allclose(s.cfg_scales, np_schedule(50)[3], atol=1e-12, rtol=0)
  np.testing.assert_allclose(s.cfg_scales, GOLDEN_CFG, atol=6e-4)
  in_float32 = 1 + 6 * (1 - np.cos(np.float32(np.pi) * ((50 - s.timesteps.astype(np.float32)) / np.float32(50))**5)) / 2
  assert np.abs(in_float32 - s.cfg_scales).max() > 0.1  # why the table must be computed in float64
  constant = diffusion.make_schedule(cfg, num_steps=8, cfg_scale=4.0, dynamic_cfg=False)
  assert constant.num_steps == 8 and np.all(constant.cfg_scales == 4.0)


def toy_denoiser(channels, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((channels, channels)) * 0.3
  bias = rng.standard_normal(channels) * 0.2

  def np_fn(x, t, cond):
    return x @ w + (t / 1000.0) * bias + (0.5 if cond else 0.0)

  def jax_fn(x, t):
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return x @ jnp.asarray(w, jnp.float32) + (t / 1000.0) * jnp.asarray(bias, jnp.float32)

  return np_fn, jax_fn


@pytest.mark.parametrize('steps', [1, 2, 5])
def test_short_runs_match_the_restatement_step_by_step(cfg, steps):
  channels, batch = 4, 2
  np_fn, base = toy_denoiser(channels)
  jax_fn = lambda x, t: base(x, t) + jnp.concatenate([jnp.zeros(batch), jnp.full(batch, 0.5)])[:, None, None]
  assert np.isfinite(np.asarray(np_sample(np_fn, np.ones((batch, 3, channels)), np.zeros((steps, batch, 3, channels)),
                                          steps))).all()
  rng = np.random.default_rng(steps)
  x = rng.standard_normal((batch, 3, channels))
  noise = rng.standard_normal((steps - 1, batch, 3, channels))
  schedule = diffusion.make_schedule(cfg, num_steps=steps)
  np_schedule_cfg = np_schedule(steps)
  # the restatement hard-codes scale 6 / exponent 5 (the config's values)
  assert np.allclose(schedule.cfg_scales, np_schedule_cfg[3])
  got = jax.jit(lambda x, z: diffusion.sample(jax_fn, schedule, x, noise=z))(jnp.asarray(x, jnp.float32),
                                                                             jnp.asarray(noise, jnp.float32))
  want = np_sample(np_fn, x, noise, steps)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_update_equals_diffusers_cogvideox_dpm_step(cfg):
  """The DPM-Solver++(2M) SDE update of diffusers, fed LanDiff's a-values and the same second noise draw."""
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  s = diffusion.make_schedule(cfg)
  scheduler = diffusers.CogVideoXDPMScheduler(prediction_type='sample', num_train_timesteps=1000)
  scheduler.set_timesteps(50)
  i = 3
  t, t_back = int(s.timesteps[i]), int(s.timesteps[i - 1])
  cumprod = torch.zeros(1000, dtype=torch.float32)
  cumprod[t], cumprod[t - 20], cumprod[t_back] = (float(s.alphas[i])**2, float(s.alphas[i + 1])**2,
                                                    float(s.alphas[i - 1])**2)
  scheduler.alphas_cumprod = cumprod
  rng = np.random.default_rng(0)
  x, d, d_prev = (rng.standard_normal((1, 2, 3, 4)).astype(np.float32) for _ in range(3))
  generator = torch.Generator().manual_seed(5)
  want, _ = scheduler.step(torch.from_numpy(d), torch.from_numpy(d_prev), t, t_back, torch.from_numpy(x),
                           generator=generator)
  replay = torch.Generator().manual_seed(5)
  torch.randn(x.shape, generator=replay)  # the release and diffusers draw twice and use the second draw
  z = torch.randn(x.shape, generator=replay).numpy()
  got = diffusion.dpmpp_2m_sde_step(jnp.asarray(x), jnp.asarray(d), jnp.asarray(d_prev), s.alphas[i],
                                    s.alphas[i + 1], s.alphas[i - 1], jnp.asarray(z))
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5, rtol=1e-5)


def test_key_determinism_prefix_and_no_retrace(cfg):
  schedule = diffusion.make_schedule(cfg, num_steps=4)
  _, base = toy_denoiser(4)
  traces = []

  def run(x, key, prefix):
    traces.append(1)
    return diffusion.sample(base, schedule, x, key=key, prefix=prefix)

  run = jax.jit(run)
  x = jax.random.normal(jax.random.key(0), (1, 3, 5, 4))
  prefix = jnp.ones((1, 1, 5, 4))
  a = run(x, jax.random.key(1), prefix)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(run(x, jax.random.key(1), prefix)))
  assert not np.allclose(np.asarray(a), np.asarray(run(x, jax.random.key(2), prefix)))
  np.testing.assert_array_equal(np.asarray(a[:, :1]), 1.0)  # the clean prefix frame is held
  assert len(traces) == 1


def test_bad_inputs(cfg):
  with pytest.raises(ValueError, match='num_steps'):
    diffusion.make_schedule(cfg, num_steps=0)
  schedule = diffusion.make_schedule(cfg, num_steps=3)
  _, base = toy_denoiser(4)
  x = jnp.zeros((1, 2, 3, 4))
  with pytest.raises(ValueError, match='one draw per update step'):
    diffusion.sample(base, schedule, x, noise=jnp.zeros((3, 1, 2, 3, 4)))
  with pytest.raises(ValueError, match='PRNG'):
    diffusion.sample(base, schedule, x)
  with pytest.raises(ValueError, match='prefix'):
    diffusion.sample(base, schedule, x, key=jax.random.key(0), prefix=jnp.zeros((2, 1, 3, 4)))


def test_renderer_on_a_tiny_dit_matches_the_restated_loop():
  """Three steps of the jitted renderer (CFG, zeros as unconditional text, a semantic condition) equal the
  restatement driven by the same model's v-predictions."""
  from landiff_jax.models import dit as dit_model
  from landiff_jax.parallel import strip_partitioning
  from landiff_jax.sampling.render import Renderer
  config = load_config('configs/tiny.py')
  model = dit_model.build_dit(config)
  # random values for every parameter (the zero-initialised projections too), shapes from eval_shape: no init compile
  shapes = strip_partitioning(jax.eval_shape(model.init_params, jax.random.key(0)))
  values = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(values.standard_normal(s.shape) * 0.2 + (
      1.0 if len(s.shape) == 1 else 0.0), jnp.float32), shapes)
  c = config.dit
  rng = np.random.default_rng(0)
  shape = (1, c.latent_frames, c.latent_height, c.latent_width, c.in_channels)
  x = rng.standard_normal(shape).astype(np.float32)
  text = rng.standard_normal((1, c.text_length, c.text_dim)).astype(np.float32)
  condition = rng.standard_normal(shape[1:]).astype(np.float32)
  noise = rng.standard_normal((2,) + shape).astype(np.float32)
  schedule = diffusion.make_schedule(config.diffusion, num_steps=3)
  got = Renderer(model, schedule)(params, jnp.asarray(text), jnp.asarray(condition), jnp.asarray(x),
                                  noise=jnp.asarray(noise))

  apply = jax.jit(lambda latents, t, txt: model.apply(params, latents, t, txt, jnp.asarray(condition)))

  def v_fn(latents, t, cond):
    txt = text if cond else np.zeros_like(text)
    out = apply(jnp.asarray(latents, jnp.float32), jnp.full((1,), float(t)), jnp.asarray(txt))
    return np.asarray(out, np.float64)

  want = np_sample(v_fn, x.astype(np.float64), noise.astype(np.float64), 3)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize('steps', [20, 50])
def test_exact_denoiser_of_the_training_convention_samples_land_on_the_data(cfg, steps):
  """Training and sampling agree: with the exact posterior-mean denoiser of a few points, written in the training
  task's convention (x_t = a·x + √(1−a²)·ε with a from its table at t, v = (a·x_t − x̂0)/√(1−a²)), every sample of
  the release's sampler ends on one of the points, and different seeds reach different points."""
  from landiff_jax.train.tasks.diffusion import training_alphas
  table = jnp.asarray(training_alphas(cfg))
  points = jax.random.normal(jax.random.key(0), (6, 3 * 4 * 4 * 8)) * jnp.linspace(0.5, 1.5, 6)[:, None]

  def exact_v(x, timesteps):
    a = table[jnp.round(timesteps).astype(jnp.int32)][:, None]
    sigma = jnp.sqrt(1.0 - a**2)
    flat = x.reshape(x.shape[0], -1)
    distance = jnp.sum((flat[:, None] - a[:, :, None] * points[None])**2, axis=-1)
    x0 = jax.nn.softmax(-distance / (2.0 * sigma**2), axis=-1) @ points
    return ((a * flat - x0) / sigma).reshape(x.shape)

  schedule = diffusion.make_schedule(cfg, num_steps=steps)
  reached = set()
  for seed in range(8):
    noise = jax.random.normal(jax.random.key(seed + 1), (1, 3, 4, 4, 8))
    x = diffusion.sample(exact_v, schedule, noise, key=jax.random.key(100 + seed), use_cfg=False)
    error = jnp.mean((x.reshape(1, -1) - points)**2, axis=-1) / jnp.var(points)
    assert float(error.min()) < 1e-3, (seed, np.asarray(error))
    reached.add(int(error.argmin()))
  assert len(reached) >= 3, reached
