"""Diffusion stage training: the control branch learns on a frozen backbone, on any mesh."""

import jax
import numpy as np
import pytest

from landiff_jax import checkpoints
from landiff_jax.config import load_config
from landiff_jax.parallel import strip_partitioning
from landiff_jax.train import train
from landiff_jax.train.tasks.diffusion import DiffusionTask, training_alphas


def examples(cfg, count=16):
  """Latents that follow the semantic features (so the control branch has something to learn)."""
  rng = np.random.default_rng(0)
  c = cfg.dit
  out = []
  for _ in range(count):
    features = rng.standard_normal((c.latent_frames, c.latent_height // 2, c.latent_width // 2,
                                    cfg.upsampler.in_channels)).astype(np.float32)
    latents = np.repeat(np.repeat(features[..., :c.in_channels], 2, 1), 2, 2)
    latents = latents + 0.1 * rng.standard_normal(latents.shape).astype(np.float32)
    out.append(dict(latents=latents, text=rng.standard_normal((c.text_length, c.text_dim)).astype(np.float32),
                    features=features))
  return out


def tiny(workdir, *overrides):
  return load_config('configs/tiny.py', [f'train.workdir={workdir}', 'train.frozen=["^params/dit/"]',
                                         'train.learning_rate=3e-3', *overrides])


@pytest.fixture(scope='module')
def backbone_dir(tmp_path_factory):
  """A renderer model directory (standing in for a converted CogVideoX-2B) to start from."""
  task = DiffusionTask(tiny('unused'))
  params = jax.device_get(jax.jit(lambda key: strip_partitioning(task.model.init_params(key)))(jax.random.key(7)))
  path = tmp_path_factory.mktemp('renderer') / 'dit'
  part_config = checkpoints.part_config(load_config('configs/tiny.py'), 'dit')
  checkpoints.save(str(path), part='dit', config=part_config, params=params)
  return str(path), params


def run(cfg, steps):
  losses = []
  state = train(DiffusionTask(cfg, examples(cfg)), cfg.train, cfg.parallel,
                hooks=[lambda step, state, metrics: losses.append(float(metrics['loss']))])
  assert len(losses) == steps
  return state, np.array(losses)


STEPS = 40


@pytest.fixture(scope='module')
def baseline(tmp_path_factory, backbone_dir):
  path, _ = backbone_dir
  cfg = tiny(tmp_path_factory.mktemp('baseline'), f'train.num_steps={STEPS}', f'train.init_from={path}')
  return run(cfg, STEPS)


def test_control_branch_learns_and_the_backbone_stays_bit_identical(baseline, backbone_dir):
  state, losses = baseline
  _, start = backbone_dir
  assert losses[-8:].mean() < 0.6 * losses[:3].mean(), losses
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen_params['params']['dit']),
               start['params']['dit'])
  assert set(state.params['params']) == {'control', 'upsampler'}
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params['params']['control'],
                       start['params']['control'])
  assert max(jax.tree.leaves(moved)) > 0


def test_same_losses_on_another_mesh(baseline, backbone_dir, tmp_path):
  path, _ = backbone_dir
  cfg = tiny(tmp_path / 'other', f'train.num_steps={STEPS}', f'train.init_from={path}', 'parallel.mesh.data=2',
             'parallel.mesh.fsdp=2', 'parallel.mesh.tensor=2')
  _, losses = run(cfg, STEPS)
  np.testing.assert_allclose(losses[:10], baseline[1][:10], rtol=1e-4)


def test_training_schedule_is_zero_snr_with_shift():
  a = training_alphas(load_config('configs/landiff_official.py').diffusion)
  assert a.shape == (1000,) and a[-1] == 0.0
  assert abs(a[0] - 0.99873) < 1e-5  # reference §5.6: full[0] = 0.99873
  assert np.all(np.diff(a) < 0)


def test_missing_data_directory_is_reported(tmp_path):
  cfg = tiny(tmp_path / 'run', f'train.data_dir={tmp_path / "nowhere"}')
  with pytest.raises(FileNotFoundError, match='train.data_dir'):
    DiffusionTask(cfg).dataset()


def test_backbone_trains_alone_then_carries_the_control_stage(tmp_path):
  """`train backbone`: the DiT alone learns (no features needed); its parameters, saved as a model directory,
  start the control stage as its frozen backbone."""
  from landiff_jax.train.tasks.diffusion import BackboneTask
  cfg = load_config('configs/train.py:backbone,tiny', [f'train.workdir={tmp_path / "backbone"}', 'train.num_steps=30',
                                                       'train.learning_rate=3e-3', 'train.warmup_steps=3'])
  data = [{k: v for k, v in e.items() if k != 'features'} for e in examples(cfg)]
  losses = []
  state = train(BackboneTask(cfg, data), cfg.train, cfg.parallel,
                hooks=[lambda step, state, metrics: losses.append(float(metrics['loss']))])
  losses = np.array(losses)
  assert losses[-8:].mean() < 0.6 * losses[:3].mean(), losses
  assert set(state.params['params']) == {'dit'}
  part_config = checkpoints.part_config(load_config('configs/tiny.py'), 'dit')
  path = tmp_path / 'dit'
  checkpoints.save(str(path), part='dit', config=part_config, params=jax.device_get(state.params))
  control = tiny(tmp_path / 'control', 'train.num_steps=1', 'train.warmup_steps=0', f'train.init_from={path}')
  control_state = train(DiffusionTask(control, examples(control)), control.train, control.parallel)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(control_state.frozen_params['params']['dit']),
               jax.device_get(state.params['params']['dit']))
