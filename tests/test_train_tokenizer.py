"""Tokenizer stage training: reconstruction through the VQ bottleneck improves, codes stay in use, resume is exact."""

import jax
import numpy as np
import pytest

from landiff_jax.config import load_config
from landiff_jax.train import train
from landiff_jax.train.tasks.tokenizer import TokenizerTask, kmeans

STEPS = 600


class Stop(Exception):
  pass


def tiny(workdir, *overrides):
  return load_config('configs/train.py:tokenizer,tiny', [
      f'train.workdir={workdir}', f'train.num_steps={STEPS}', 'train.learning_rate=3e-3', 'train.warmup_steps=10',
      'train.checkpoint_every=10', 'train.log_every=50', 'tokenizer.feature_grid=(2, 2)', *overrides])


def clips(cfg, count=64):
  """Each frame shows one of 8 patterns: 9 bits per clip that must pass through the codes."""
  t = cfg.tokenizer
  rng = np.random.default_rng(0)
  patterns = rng.standard_normal((8, *t.feature_grid, t.feature_dim)).astype(np.float32)
  return [dict(features=patterns[rng.integers(8, size=t.frames_per_group)]) for _ in range(count)]


def run(cfg, stop_at=None):
  records = []

  def hook(step, state, metrics):
    records.append({k: float(metrics[k]) for k in ('loss', 'reconstruction', 'codes_used', 'dead_codes')})
    if step == stop_at:
      raise Stop()

  try:
    state = train(TokenizerTask(cfg, clips(cfg)), cfg.train, cfg.parallel, hooks=[hook])
  except Stop:
    state = None
  return state, records


@pytest.fixture(scope='module')
def learned(tmp_path_factory):
  return run(tiny(tmp_path_factory.mktemp('tokenizer'), 'train.checkpoint_every=1000'))


def test_reconstruction_improves_5x_and_codes_stay_in_use(learned):
  state, records = learned
  reconstruction = np.array([r['reconstruction'] for r in records])
  assert reconstruction[:10].mean() > 5 * reconstruction[-10:].mean(), reconstruction[::50]
  assert np.mean([r['codes_used'] for r in records[-20:]]) >= 0.5  # of the 16 codes, per batch of 8 clips
  # a code unused for a few batches is re-seeded from the batch; few need it once the codebook has settled
  assert np.mean([r['dead_codes'] for r in records[-20:]]) <= 4, [r['dead_codes'] for r in records[-20:]]
  ema = state.frozen_params['quantizer_ema']
  assert float(ema['initted']) == 1.0 and 'codebook' in state.frozen_params['params']['quantizer']
  assert 'codebook' not in state.params['params']['quantizer']  # no optimizer state for the codebook


def test_resume_continues_the_same_trajectory(learned, tmp_path):
  _, reference = learned
  cfg = tiny(tmp_path / 'run')
  _, before = run(cfg, stop_at=10)  # a crash right after the step-10 checkpoint
  _, after = run(cfg, stop_at=20)
  assert len(before) == 10 and len(after) == 10
  np.testing.assert_allclose([r['loss'] for r in before + after], [r['loss'] for r in reference[:20]], rtol=1e-5)


def test_kmeans_finds_separated_clusters():
  rng = np.random.default_rng(0)
  centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
  x = np.concatenate([c + 0.1 * rng.standard_normal((50, 2)) for c in centers]).astype(np.float32)
  found, counts = kmeans(jax.numpy.asarray(x), 3, 10, jax.random.key(4))
  found = np.asarray(found)
  for c in centers:
    assert np.min(np.linalg.norm(found - c, axis=1)) < 0.5
  assert sorted(np.asarray(counts).tolist()) == [50, 50, 50]


def test_the_codebook_must_be_frozen(tmp_path):
  cfg = tiny(tmp_path, 'train.frozen=[]')
  with pytest.raises(ValueError, match='train.frozen must include'):
    TokenizerTask(cfg)


def test_its_parameters_export_as_a_tokenizer_and_not_as_another_stage(learned, tmp_path):
  from landiff_jax import checkpoints
  from landiff_jax.train.export import check_modules
  from landiff_jax.train.optimizer import merge_params
  state, _ = learned
  params = merge_params(state.params, state.frozen_params)
  cfg = tiny(tmp_path)
  check_modules('tokenizer', 'tokenizer', checkpoints.part_config(cfg, 'tokenizer'), params, 'run')
  for stage, part in (('lm', 'lm'), ('vae', 'vae'), ('backbone', 'dit')):
    with pytest.raises(ValueError, match=f'do not hold {stage} parameters'):
      check_modules(stage, part, checkpoints.part_config(cfg, part), params, 'run')
