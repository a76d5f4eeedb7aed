"""LM stage training: the loss falls far below the unigram entropy, identically on another mesh."""

import numpy as np
import pytest

from landiff_jax.config import load_config
from landiff_jax.sampling.lm import Layout
from landiff_jax.train import train
from landiff_jax.train.tasks.lm import LMTask

STEPS = 120
CLASSES = 4


def tiny(workdir, *overrides):
  return load_config('configs/train.py:lm,tiny', [
      f'train.workdir={workdir}', f'train.num_steps={STEPS}', 'train.learning_rate=1e-2', 'train.warmup_steps=5',
      'train.log_every=20', 'train.checkpoint_every=1000', *overrides])


def examples(cfg, count=32):
  """The ids of a clip are one of CLASSES fixed sequences, chosen by the prompt (text of 2 to 6 tokens)."""
  layout = Layout.from_config(cfg)
  rng = np.random.default_rng(0)
  sequences = rng.integers(0, cfg.lm.codebook_size, (CLASSES, layout.tokens_per_group))
  prompts = rng.standard_normal((CLASSES, cfg.lm.text_feature_dim)).astype(np.float32)
  max_text = 6
  out = []
  for i in range(count):
    c, length = i % CLASSES, 2 + i % 5
    text = np.zeros((max_text, cfg.lm.text_feature_dim), np.float32)
    text[:length] = prompts[c] + 0.1 * rng.standard_normal((length, cfg.lm.text_feature_dim))
    out.append(dict(ids=sequences[c].astype(np.int32), text=text, text_length=np.int32(length),
                    motion_score=np.float32(rng.uniform())))
  return out, sequences


def run(cfg):
  records = []
  data, sequences = examples(cfg)
  hook = lambda step, state, metrics: records.append((float(metrics['loss']), float(metrics['visual_nll'])))
  train(LMTask(cfg, data), cfg.train, cfg.parallel, hooks=[hook])
  return np.array(records), sequences


@pytest.fixture(scope='module')
def baseline(tmp_path_factory):
  return run(tiny(tmp_path_factory.mktemp('lm'), 'lm.text_dropout=0.0'))


def test_loss_falls_well_below_the_unigram_entropy(baseline):
  records, sequences = baseline
  _, counts = np.unique(sequences, return_counts=True)
  p = counts / counts.sum()
  unigram = -(p * np.log(p)).sum()
  assert records[-10:, 1].mean() < 0.25 * unigram, (unigram, records[::10, 1])


def test_same_losses_on_another_mesh(baseline, tmp_path):
  records, _ = run(tiny(tmp_path, 'lm.text_dropout=0.0', 'parallel.mesh.data=4', 'parallel.mesh.fsdp=2'))
  np.testing.assert_allclose(records[:10, 0], baseline[0][:10, 0], rtol=1e-4)


def test_examples_must_hold_whole_groups(tmp_path):
  cfg = tiny(tmp_path)
  task = LMTask(cfg)
  with pytest.raises(ValueError, match='whole number'):
    task.groups({'ids': np.zeros((2, 5))})
