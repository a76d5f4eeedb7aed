"""`landiff-jax bench train`: the training step timed on random data, with model FLOPs from the analytic count."""

import json

from landiff_jax import config as config_lib
from landiff_jax.cli import main
from landiff_jax.train.plan import analytic_step_flops
from landiff_jax.train.tasks.lm import LMTask


def test_bench_train_reports_step_time_throughput_and_analytic_flops(capsys, tmp_path):
  out = tmp_path / 'lm.json'
  assert main(['bench', 'train', '--stage', 'lm', '--tiny', '--batch', '2', '--repeats', '1', '--dtype', 'float32',
               '--out', str(out)]) == 0
  result = json.loads(capsys.readouterr().out)
  assert json.loads(out.read_text()) == result
  config = config_lib.load_config('configs/train.py:lm,tiny')
  assert result['stage'] == 'lm' and result['global_batch'] == 2 * 8 and result['loss_finite']
  assert result['flops_source'] == 'analytic'
  assert result['flops_per_step'] == analytic_step_flops('lm', config, 16)
  seconds = result['step']['median_s']
  assert result['samples_per_sec_per_device'] == round(16 / seconds / 8, 3)
  ids_per_example = LMTask(config).layout.tokens_per_group  # the task counts semantic ids as its tokens
  assert result['tokens_per_sec_per_device'] == round(16 * ids_per_example / seconds / 8, 3)
  assert result['mfu'] is None and result['peak_tflops_per_device'] is None  # a CPU has no listed bf16 peak


def test_bench_train_needs_a_stage(capsys):
  assert main(['bench', 'train', '--tiny']) == 2
  assert 'needs --stage' in capsys.readouterr().err
