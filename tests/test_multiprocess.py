"""Training with several JAX processes (the multi-controller runtime) on simulated CPU devices.

For the tiny LM (and, with LANDIFF_SLOW_TESTS=1, the tiny control branch of the diffusion stage),
`launch/local_multiprocess.sh` starts 2 processes x 4 devices of `landiff-jax train` (through
tests/multiprocess_worker.py, which records the rows each process reads).
They must train exactly like 1 process x 8 devices on the same mesh, read disjoint rows that together make up
each global batch, and leave a checkpoint that one process on another mesh resumes, continuing as the
uninterrupted run did. The learning rate is constant after warm-up (end_learning_rate_ratio=1), so a
10-step run is the start of a 15-step one.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from landiff_jax.config import load_config
from landiff_jax.data import make_batch_iterator
from landiff_jax.parallel import logical_rules, make_mesh, process_batch_rows
from landiff_jax.sampling.lm import Layout

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO_ROOT, 'tests', 'multiprocess_worker.py')
LAUNCHER = os.path.join(REPO_ROOT, 'launch', 'local_multiprocess.sh')
STEPS, MORE_STEPS = 10, 15  # the two-process run, and the uninterrupted run its checkpoint is resumed to
PROCESSES, DEVICES_PER_PROCESS = 2, 4
MESH = dict(data=2, fsdp=4, tensor=1)  # parameters sharded over fsdp within each process
RESUME_MESH = dict(data=8, fsdp=1, tensor=1)  # parameters replicated (fsdp=8 is much slower to compile on CPU)
TIMEOUT_S = 300
# LLVM's lowest optimisation level: compiles these tiny models 1.5-2x faster on CPU (compiling is most of each run)
# and runs their steps as fast; every run here uses it, so the comparisons are like for like.
FAST_COMPILE = '--xla_backend_optimization_level=0'


def lm_examples(cfg, rng, count):
  tokens, c = Layout.from_config(cfg).tokens_per_group, cfg.lm
  out = []
  for i in range(count):
    length = 2 + i % 5
    text = np.zeros((6, c.text_feature_dim), np.float32)
    text[:length] = rng.standard_normal((length, c.text_feature_dim))
    out.append(dict(ids=rng.integers(0, c.codebook_size, tokens).astype(np.int32), text=text,
                    text_length=np.int32(length), motion_score=np.float32(rng.uniform())))
  return out


def diffusion_examples(cfg, rng, count):
  c = cfg.dit
  grid = (c.latent_frames, c.latent_height, c.latent_width)
  return [dict(latents=rng.standard_normal((*grid, c.in_channels)).astype(np.float32),
               text=rng.standard_normal((c.text_length, c.text_dim)).astype(np.float32),
               features=rng.standard_normal((grid[0], grid[1] // 2, grid[2] // 2,
                                             cfg.upsampler.in_channels)).astype(np.float32))
          for _ in range(count)]


# The control-branch stage (a frozen backbone across processes) doubles this module's time, so it runs only with
# LANDIFF_SLOW_TESTS=1; the multi-process machinery it exercises is the LM stage's.
EXAMPLES = {'lm': lm_examples}
if os.environ.get('LANDIFF_SLOW_TESTS') == '1':
  EXAMPLES['diffusion'] = diffusion_examples


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def train_args(stage, workdir, data_dir, num_steps, mesh):
  return ['train', stage, f'--config=configs/train.py:{stage},tiny', f'--config.train.workdir={workdir}',
          f'--config.train.data_dir={data_dir}', f'--config.train.num_steps={num_steps}',
          '--config.train.end_learning_rate_ratio=1.0', '--config.train.checkpoint_every=1000',
          '--config.train.log_every=1', *(f'--config.parallel.mesh.{axis}={size}' for axis, size in mesh.items())]


def start(command, log, record, **env):
  """Starts `command` in its own process group, its output going to `log`."""
  env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', JAX_PLATFORMS='cpu',
             MULTIPROCESS_RECORD=str(record), **env)
  with open(log, 'w', encoding='utf-8') as out:
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True), log


def one_process(stage, root, name, num_steps, mesh):
  """`landiff-jax train` in one process with 8 devices, in `root / name`."""
  return start([sys.executable, WORKER, *train_args(stage, root / name, root / 'data', num_steps, mesh)],
               root / f'{name}.log', root / f'rows-{name}',
               XLA_FLAGS=f'{FAST_COMPILE} --xla_force_host_platform_device_count=8')


def two_processes(stage, root, name, num_steps, mesh):
  """`landiff-jax train` in PROCESSES processes with DEVICES_PER_PROCESS devices each, by the launch script."""
  return start(['bash', LAUNCHER, str(PROCESSES), '--', *train_args(stage, root / name, root / 'data', num_steps,
                                                                     mesh)],
               root / f'{name}.log', root / f'rows-{name}', LANDIFF_JAX=f'{sys.executable} {WORKER}',
               PYTHON=sys.executable, XLA_FLAGS=FAST_COMPILE, DEVICES_PER_PROCESS=str(DEVICES_PER_PROCESS),
               COORDINATOR_PORT=str(free_port()))


def finish(*started):
  """Waits for runs started together; on a failure or a timeout stops them all and fails with the output."""
  try:
    for process, log in started:
      try:
        process.wait(timeout=TIMEOUT_S)
      except subprocess.TimeoutExpired:
        pytest.fail(f'{log} ran past {TIMEOUT_S} s:\n{tail(log)}')
      assert process.returncode == 0, f'{log}: exit status {process.returncode}:\n{tail(log)}'
  finally:
    for process, _ in started:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def tail(log, lines=60):
  with open(log, encoding='utf-8', errors='replace') as f:
    return '\n'.join([line.rstrip() for line in f if 'Gloo' not in line][-lines:])


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records] == list(range(1, len(records) + 1))
  return np.array([r['loss'] for r in records])


def rows_read(record, process, resumed=False):
  """The example rows `process` read at each step. The loop first peeks at the first batch (before restoring the
  data position), which a fresh run then reads again at step 1."""
  with open(f'{record}.{process}', encoding='utf-8') as f:
    batches = [json.loads(line)['rows'] for line in f]
  assert resumed or batches[0] == batches[1]
  return batches[1:]


def test_pipeline_reads_the_rows_of_each_global_batch_it_is_given():
  source = [{'index': np.int32(i)} for i in range(20)]  # batches of 8 cross the epochs

  def take(**kwargs):
    iterator = make_batch_iterator(source, 8, seed=1, shuffle=True, **kwargs)
    return [next(iterator)['index'].tolist() for _ in range(6)]

  whole = take(process_index=0, process_count=1)
  first, second = take(rows=range(0, 4)), take(rows=range(4, 8))
  assert [a + b for a, b in zip(first, second)] == whole
  assert take(rows=[1, 2, 6]) == [[batch[r] for r in (1, 2, 6)] for batch in whole]
  assert take(process_index=1, process_count=2) == [batch[1::2] for batch in whole]
  with pytest.raises(ValueError, match='distinct ascending'):
    make_batch_iterator(source, 8, seed=1, shuffle=True, rows=[3, 1])


def test_one_process_reads_every_row():
  rules = logical_rules(load_config('configs/train.py:lm,tiny').parallel)
  assert process_batch_rows(make_mesh(MESH), rules, 8) == list(range(8))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{stage: folder of its runs}: 'single' (1 process, MORE_STEPS), 'multi' (2 processes, STEPS) and 'resumed'
  (a copy of 'multi' continued to MORE_STEPS in 1 process on RESUME_MESH). Two runs at a time, one per core."""
  roots = {}
  for stage, make_examples in EXAMPLES.items():
    roots[stage] = tmp_path_factory.mktemp(stage)
    (roots[stage] / 'data').mkdir()
    cfg = load_config(f'configs/train.py:{stage},tiny')
    for i, example in enumerate(make_examples(cfg, np.random.default_rng(0), 32)):
      np.savez(roots[stage] / 'data' / f'{i:04d}.npz', **example)
  finish(*(one_process(stage, root, 'single', MORE_STEPS, MESH) for stage, root in roots.items()))
  for stage, root in roots.items():
    finish(two_processes(stage, root, 'multi', STEPS, MESH))
    shutil.copytree(root / 'multi', root / 'resumed')
  finish(*(one_process(stage, root, 'resumed', MORE_STEPS, RESUME_MESH) for stage, root in roots.items()))
  return roots


STAGES = pytest.mark.parametrize('stage', sorted(EXAMPLES))


@STAGES
def test_two_processes_train_like_one(runs, stage):
  root = runs[stage]
  single, multi = losses(root / 'single'), losses(root / 'multi')
  assert len(single) == MORE_STEPS and len(multi) == STEPS
  np.testing.assert_allclose(multi, single[:STEPS], rtol=1e-5, atol=1e-5)
  assert multi[-1] < multi[0]


@STAGES
def test_processes_read_disjoint_rows_that_make_up_each_global_batch(runs, stage):
  root = runs[stage]
  single = rows_read(root / 'rows-single', 0)
  parts = [rows_read(root / 'rows-multi', p) for p in range(PROCESSES)]
  batch = len(single[0])
  for step in range(STEPS):
    assert all(len(part[step]) == batch // PROCESSES for part in parts)
    assert not set(parts[0][step]) & set(parts[1][step])
    # each process reads the block of the global batch its devices hold: process 0 the first half
    assert parts[0][step] + parts[1][step] == single[step]
  assert all(len(part) == STEPS for part in parts)


@STAGES
def test_two_process_checkpoint_resumes_in_one_process_on_another_mesh(runs, stage):
  root = runs[stage]
  assert os.path.isdir(root / 'multi' / 'checkpoints' / str(STEPS))
  with open(root / 'multi' / 'checkpoints' / str(STEPS) / 'config' / 'metadata', encoding='utf-8') as f:
    assert json.load(f)['parallel']['num_processes'] == PROCESSES
  resumed, single = losses(root / 'resumed'), losses(root / 'single')
  assert len(resumed) == MORE_STEPS
  np.testing.assert_allclose(resumed[STEPS:], single[STEPS:], rtol=1e-5, atol=1e-5)
  # the data position came back too: the resumed run read what the uninterrupted one read at those steps
  assert rows_read(root / 'rows-resumed', 0, resumed=True) == rows_read(root / 'rows-single', 0)[STEPS:]
