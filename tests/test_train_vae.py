"""VAE stage: a tiny CogVideoX-architecture VAE learns to reconstruct shapes videos."""

import numpy as np
import pytest

from landiff_jax.cli import main
from landiff_jax.config import load_config
from landiff_jax.data.shapes import ShapesSource
from landiff_jax.train import train
from landiff_jax.train.tasks.vae import VAETask

STEPS = 20


def tiny(workdir, *overrides):
  return load_config('configs/train.py:vae,tiny', [f'train.workdir={workdir}', f'train.num_steps={STEPS}',
                                                   'train.learning_rate=3e-3', 'train.warmup_steps=3',
                                                   'train.batch_size=8', 'train.end_learning_rate_ratio=1.0',
                                                   'video.num_frames=9', 'video.height=16', 'video.width=24', *overrides])


def examples(cfg, count=16):
  v = cfg.video
  source = ShapesSource(count, seed=0, num_frames=v.num_frames, height=v.height, width=v.width)
  return [{'video': source[i]['video']} for i in range(count)]


def run(cfg):
  metrics = []
  train(VAETask(cfg, examples(cfg)), cfg.train, cfg.parallel,
        hooks=[lambda step, state, m: metrics.append({k: float(m[k]) for k in ('loss', 'l1', 'psnr')})])
  return metrics


def test_vae_reconstruction_improves_on_a_data_x_fsdp_mesh(tmp_path):
  """20 steps on a data x fsdp mesh (the VAE's parameters are whole on every device: FSDP splits no convolution
  axis; its maps split by rows over 'tensor', tested below), on single frames: a 9-frame VAE step takes ~45 s more to compile on 2 cores, and the demo recipe's test
  (tests/test_demo.py) trains the tiny VAE on 9-frame clips. Losses equal across meshes is the loop's property,
  tested on the LM and diffusion stages."""
  metrics = run(tiny(tmp_path, 'video.num_frames=1', 'parallel.mesh.data=2', 'parallel.mesh.fsdp=4',
                     'parallel.mesh.tensor=1'))
  assert len(metrics) == STEPS
  first, last = np.mean([m['l1'] for m in metrics[:3]]), np.mean([m['l1'] for m in metrics[-3:]])
  assert last < 0.6 * first, (first, last)
  assert metrics[-1]['psnr'] > metrics[0]['psnr'] + 3


def test_frame_counts_that_do_not_round_trip_are_refused(tmp_path):
  with pytest.raises(ValueError, match='video.num_frames=5'):
    VAETask(tiny(tmp_path, 'video.num_frames=5'))


def test_train_vae_command_needs_data(tmp_path, capsys):
  # batch 8 splits over the 8 simulated devices (the tiny clip phase's own batch of 2 is for the one-device recipe)
  assert main(['train', 'vae', '--config=configs/train.py:vae,tiny', f'--config.train.workdir={tmp_path}',
               '--config.train.batch_size=8', f'--config.train.data_dir={tmp_path / "missing"}']) == 1
  assert 'missing' in capsys.readouterr().err


def test_an_unknown_remat_policy_is_refused_when_the_task_is_built(tmp_path):
  with pytest.raises(ValueError, match="remat_policy 'everything'"):
    VAETask(tiny(tmp_path, 'video.num_frames=1', 'remat_policy=everything'))



def test_remat_and_context_parallelism_keep_the_gradients_and_shrink_each_device_s_memory(tmp_path):
  """The full-size vae plan (configs/train.py PLANS): `remat_policy='nothing_saveable'` recomputes each chunk and
  each ResnetBlock3D in the backward pass, and context parallelism splits each clip's rows over 'tensor' (the
  'act_height' rule; kernels whole: 'vae_conv_out' is unmapped). The loss and every gradient of that step on a (data=1, fsdp=2, tensor=4) mesh
  equal those of the data-parallel step on 2 devices (a whole clip each) with and without remat. Per device, remat
  cuts the compiled temporaries, on CPU too (a plain `nn.remat` outside a scan is merged back by XLA:CPU's CSE), and
  context parallelism (4 ways) cuts them to under 0.3x: a quarter plus the rows exchanged at the splits (gathering
  a whole tensor anywhere, e.g. in a GroupNorm reshape, fails this)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  from landiff_jax import parallel

  def step_on(policy, mesh_shape, devices):
    cfg = tiny(tmp_path, 'video.num_frames=9', 'video.height=64', 'video.width=96', f'remat_policy={policy}')
    task = VAETask(cfg)
    batch = {'video': np.stack([e['video'] for e in examples(cfg, 2)])}
    params = parallel.strip_partitioning(task.init_params(jax.random.key(0), batch))
    grad_fn = jax.value_and_grad(lambda p, b: task.loss_fn(p, b, jax.random.key(1))[0])
    mesh = parallel.make_mesh(dict(zip(('data', 'fsdp', 'tensor'), mesh_shape)), devices=devices)
    rules = parallel.logical_rules(cfg.parallel)
    with parallel.mesh_context(mesh, rules):
      replicated = NamedSharding(mesh, PartitionSpec())
      step = jax.jit(grad_fn, in_shardings=(replicated, {'video': parallel.batch_sharding(mesh, rules, 5)}),
                     out_shardings=replicated)
      compiled = step.lower(params, batch).compile()
      return compiled(params, batch), compiled.memory_analysis().temp_size_in_bytes

  (loss, grads), plain_bytes = step_on('none', (1, 2, 1), jax.devices()[:2])
  (remat_loss, remat_grads), remat_bytes = step_on('nothing_saveable', (1, 2, 1), jax.devices()[:2])
  (cp_loss, cp_grads), cp_bytes = step_on('nothing_saveable', (1, 2, 4), jax.devices()[:8])
  print('temporaries per device: plain', plain_bytes, 'remat', remat_bytes, 'remat + context parallel', cp_bytes)
  assert remat_bytes < 0.6 * plain_bytes, (remat_bytes, plain_bytes)
  assert cp_bytes < 0.3 * remat_bytes, (cp_bytes, remat_bytes)  # 4 ways: a quarter, plus the halo rows
  for other_loss, other_grads in ((remat_loss, remat_grads), (cp_loss, cp_grads)):
    np.testing.assert_allclose(other_loss, loss, rtol=1e-5)
    # fp32 round-off of sums taken in another order (across devices), relative to each gradient's scale
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * np.abs(b).max()), other_grads,
                 grads)
