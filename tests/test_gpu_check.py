"""launch/gpu_check.sh, the one command for a lent GPU, runs end to end on CPU at the tiny config: every step gets
an entry in summary.json (its figures, or why it was skipped), raw results and tables are written, and a step that
runs past its limit is ended and reported without losing the others."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def gpu_check():
  spec = importlib.util.spec_from_file_location('gpu_check', os.path.join(ROOT, 'launch', 'gpu_check.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tiny_run_writes_a_complete_summary(tmp_path, gpu_check):
  # The kernel check, the LM benchmark and the probe run for real (the other benchmarks have their own tests and
  # take minutes together on two shared cores); every other step must still be accounted for.
  selected = ('environment', 'kernel_check', 'lm')
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS='cpu', LANDIFF_PALLAS_INTERPRET='1')
  done = subprocess.run(['bash', 'launch/gpu_check.sh', '--tiny', '--out', str(tmp_path), '--only', ','.join(selected)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert sorted(os.listdir(tmp_path)) == ['gpu_check.log', 'raw.json', 'summary.json', 'tables.md']
  summary = json.loads((tmp_path / 'summary.json').read_text())
  names = [step['name'] for step in gpu_check.steps(tiny=True)]
  assert list(summary['steps']) == names and 'finished' in summary
  for name, entry in summary['steps'].items():
    if name in selected:
      assert entry['status'] == 'ok', (name, entry)
    else:
      assert entry['status'] == 'skipped' and entry['reason'], (name, entry)
  assert summary['steps']['environment']['figures']['backend'] == 'cpu'
  kernel = summary['steps']['kernel_check']['figures']
  assert kernel['passed'] is True and len(kernel['cases']) == 4  # 2 masks × (bf16, fp32)
  assert summary['steps']['lm']['figures']['landiff_jax']['per_token_ms'] > 0
  raw = json.loads((tmp_path / 'raw.json').read_text())
  assert raw['environment']['backend'] == 'cpu' and raw['lm']['landiff_jax']['positions'] > 0
  assert '| kernel check |' in (tmp_path / 'tables.md').read_text()


def test_a_step_past_its_limit_is_ended_and_reported(tmp_path, gpu_check):
  step = dict(name='sleeper', command=['-c', 'import time; print("started", flush=True); time.sleep(60)'])
  with open(tmp_path / 'log', 'w') as log:
    entry, raw = gpu_check.run_step(step, 2, str(tmp_path), log)
  assert entry['status'] == 'timeout' and entry['seconds'] < 30 and raw is None
  assert 'started' in (tmp_path / 'log').read_text()
  failing = dict(name='failing', command=['-c', 'raise SystemExit("no GPU here")'])
  with open(tmp_path / 'log', 'a') as log:
    entry, _ = gpu_check.run_step(failing, 20, str(tmp_path), log)
  assert entry['status'] == 'failed' and 'no GPU here' in entry['reason']


@pytest.mark.parametrize('bare, message', [
    (False, "no GPU here (JAX's backend is 'cpu')"),  # the release-size run on a CPU
    (True, 'cannot import the package here'),  # an interpreter without jax (the standard library alone)
])
def test_a_machine_that_cannot_run_the_benchmarks_is_said_once(tmp_path, bare, message):
  python = sys.executable
  if bare:
    python = str(tmp_path / 'bare-python')
    with open(python, 'w') as f:
      f.write(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    os.chmod(python, 0o755)
  env = dict(os.environ, PYTHON=python, JAX_PLATFORMS='cpu')
  done = subprocess.run(['bash', 'launch/gpu_check.sh', '--out', str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2 and message in done.stderr.strip().splitlines()[-1]
  summary = json.loads((tmp_path / 'summary.json').read_text())
  others = {name: entry for name, entry in summary['steps'].items() if name != 'environment'}
  assert others and all(entry['status'] == 'skipped' and message in entry['reason'] for entry in others.values())
