"""Semantic ViT stage: a tiny Theia-architecture ViT learns which coloured shape covers each cell of a frame, and
its export is a plain `theia` model directory."""

import jax
import numpy as np
import pytest

from landiff_jax import checkpoints
from landiff_jax.cli import main
from landiff_jax.config import load_config
from landiff_jax.data import prepare
from landiff_jax.data.shapes import NUM_SEMANTIC_CLASSES
from landiff_jax.models import theia
from landiff_jax.train import train
from landiff_jax.train.tasks.theia import CELLS_PER_PATCH, TheiaTask, cell_size

STEPS = 150


def tiny(workdir, *overrides):
  return load_config('configs/train.py:theia,tiny', [f'train.workdir={workdir}', f'train.num_steps={STEPS}',
                                                     'train.learning_rate=1e-2', 'train.warmup_steps=3',
                                                     'train.batch_size=16', 'train.checkpoint_every=60', 'video.height=64', 'video.width=64', *overrides])


def test_the_vit_learns_to_see_the_shapes_and_exports_without_its_head(tmp_path):
  cfg = tiny(tmp_path / 'run')
  data = prepare.write_semantics(str(tmp_path / 'semantics'), num=64, seed=0, frames=9, height=cfg.video.height,
                                 width=cfg.video.width, cell=cell_size(cfg.theia), workers=1)
  cfg.train.data_dir = data
  metrics = []
  task = TheiaTask(cfg)
  train(task, cfg.train, cfg.parallel, config=cfg.to_dict(), hooks=[lambda step, state, m: metrics.append(
      {'loss': float(m['loss'])})])
  assert len(metrics) == STEPS
  # the cross-entropy of predicting every cell from the classes' overall frequencies, without looking at the frame
  targets = np.stack([np.load(f'{data}/{i:06d}.npz')['semantics'] for i in range(64)])
  blind = -np.mean(np.sum(targets * np.log(np.maximum(targets.mean(axis=(0, 1, 2)), 1e-9)), axis=-1))
  last = np.mean([m['loss'] for m in metrics[-10:]])
  assert last < 0.75 * blind, (blind, [m['loss'] for m in metrics])

  dst = tmp_path / 'theia'
  assert main(['export', 'theia', '--workdir', str(tmp_path / 'run'), '--dst', str(dst)]) == 0
  assert checkpoints.read_meta(str(dst))['part'] == 'theia'
  model, params = checkpoints.load(str(dst))
  frame = np.load(f'{data}/000000.npz')['frame']
  features = theia.features(model, params, frame[None], micro_batch=1)
  grid = cfg.video.height // cfg.theia.patch_size, cfg.video.width // cfg.theia.patch_size
  assert features.shape == (1, *grid, cfg.theia.hidden_size)
  # the exported ViT is the trained one: its features predict the semantics through the trained head
  from landiff_jax.train.export import latest_state
  _, state, _ = latest_state(str(tmp_path / 'run'))
  logits = task.model.apply(jax.tree.map(np.asarray, state['params']), frame[None])
  head = state['params']['params']['head']
  c = CELLS_PER_PATCH
  expected = (np.asarray(features) @ head['kernel'] + head['bias']).reshape(1, *grid, c, c, -1)
  expected = expected.transpose(0, 1, 3, 2, 4, 5).reshape(logits.shape)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_semantic_maps_of_another_cell_size_are_refused(tmp_path):
  cfg = tiny(tmp_path / 'run')
  task = TheiaTask(cfg)
  v = cfg.video
  batch = {'frame': np.zeros((2, v.height, v.width, 3), np.uint8),
           'semantics': np.zeros((2, v.height // 4, v.width // 4, NUM_SEMANTIC_CLASSES), np.float32)}
  params = task.init_params(jax.random.key(0), batch)
  with pytest.raises(ValueError, match='landiff-jax prepare semantics'):
    task.loss_fn(params, batch, jax.random.key(1))


def test_a_run_of_another_stage_is_not_exported_as_a_vit():
  from landiff_jax.train.tasks.theia import vit_params
  with pytest.raises(ValueError, match='landiff-jax train theia'):
    vit_params({'params': {'encoder': {}}})
