"""Classifier-free guidance across devices: on 8 simulated devices, the renderer's [uncond, cond] rows and the LM's
CFG rows split over 2 devices (and over 2 groups of 4) give the same outputs as on one device (the same tokens; the
same latents up to float32 rounding), and the compiled renderer really runs one row per device."""

import jax
import numpy as np
import pytest

from landiff_jax import checkpoints
from landiff_jax.bench import random_params
from landiff_jax.config import load_config
from landiff_jax.sampling import devices as devices_lib
from landiff_jax.sampling import diffusion
from landiff_jax.sampling import lm as lm_sampling
from landiff_jax.sampling.render import Renderer


@pytest.fixture(scope='module')
def config():
  return load_config('configs/tiny.py')


def test_rows_mesh_groups_devices_by_the_row_count():
  devices = jax.devices()
  assert len(devices) == 8
  assert devices_lib.rows_mesh(devices[:1], 2) is None
  assert devices_lib.rows_mesh(devices, 3) is None  # no even split
  assert dict(devices_lib.rows_mesh(devices[:2], 2).shape) == {'rows': 2, 'replica': 1}
  assert dict(devices_lib.rows_mesh(devices, 2).shape) == {'rows': 2, 'replica': 4}
  assert dict(devices_lib.rows_mesh(devices, 4).shape) == {'rows': 4, 'replica': 2}


def test_lm_cfg_rows_on_two_devices_give_the_same_tokens(config):
  model = checkpoints.build_model('lm', config.lm)
  params = random_params(model.init_params, np.float32)
  layout = lm_sampling.Layout.from_config(config)
  text = np.random.default_rng(0).standard_normal((5, config.lm.text_feature_dim)).astype(np.float32)
  run = lambda devices: np.asarray(lm_sampling.generate(model, params, [text], layout=layout, key=jax.random.key(3),
                                                        num_frames=layout.frames_per_group, cfg_scale=4.0,
                                                        devices=devices))
  one = run(None)
  np.testing.assert_array_equal(run(jax.devices()[:2]), one)
  np.testing.assert_array_equal(run(jax.devices()), one)  # 2 groups of 4 devices


def test_renderer_cfg_rows_on_two_devices_give_the_same_latents(config):
  model = checkpoints.build_model('dit', config)
  params = random_params(model.init_params, np.float32)
  schedule = diffusion.make_schedule(config.diffusion, num_steps=3)
  c = config.dit
  rng = np.random.default_rng(1)
  text = rng.standard_normal((1, c.text_length, c.text_dim)).astype(np.float32)
  condition = rng.standard_normal((c.latent_frames, c.latent_height, c.latent_width, c.in_channels)).astype(np.float32)
  noise = rng.standard_normal((1, c.latent_frames, c.latent_height, c.latent_width, c.in_channels)).astype(np.float32)
  one = np.asarray(Renderer(model, schedule)(params, text, condition, noise, key=jax.random.key(4)))
  split = Renderer(model, schedule, devices=jax.devices()[:2])
  two = np.asarray(split(params, text, condition, noise, key=jax.random.key(4)))
  # Equal up to float32 rounding: each device multiplies half the rows, for which XLA:CPU may pick another matmul
  # kernel (another summation order); guidance then scales the difference by up to the CFG scale.
  np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)
  # The compiled step runs the DiT on one row per device: its hidden states [rows, tokens, width] hold one row.
  mesh = devices_lib.rows_mesh(jax.devices()[:2], 2)
  placed = devices_lib.on_mesh_devices((params, text, condition, noise, jax.random.key(4), None, None), mesh)
  hlo = split._render.lower(mesh, *placed).compile().as_text()  # pylint: disable=protected-access
  tokens = c.text_length + c.latent_frames * (c.latent_height // c.patch_size) * (c.latent_width // c.patch_size)
  hidden = f'[1,{tokens},{c.num_heads * c.head_dim}]'
  assert hidden in hlo and hidden.replace('[1,', '[2,') not in hlo
