"""The generic train loop on a toy task: learning, mesh independence, kill/resume, frozen params, EMA, metrics.

Also the grain input pipeline it reads from.
"""

import glob
import json
import math
import os
import signal
import shutil
import subprocess
import sys

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from landiff_jax.data import make_batch_iterator
from landiff_jax.parallel import make_mesh
from landiff_jax.train import split_frozen, merge_params, train, validate_train_config
from landiff_jax.train.checkpoint import checkpoint_dir
from landiff_jax.train.loop import NonFiniteError
from toy_task import NUM_EXAMPLES, ToyTask, fixed_projection, make_examples, toy_parallel_config, toy_train_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMA_DECAY = 0.9


def host_copy(tree):
  return jax.tree.map(lambda x: np.array(x), jax.device_get(tree))


class Recorder:
  """A hook keeping each step's loss, example ids and (optionally) host copies of params and EMA."""

  def __init__(self, keep_params=False):
    self.keep_params = keep_params
    self.steps, self.losses, self.ids, self.params, self.ema = [], [], [], [], []

  def __call__(self, step, state, metrics):
    self.steps.append(step)
    self.losses.append(float(metrics['loss']))
    self.ids.append([int(i) for i in metrics['example_ids']])
    if self.keep_params:
      self.params.append(host_copy(state.params))
      self.ema.append(host_copy(state.ema_params))


def run_toy(workdir, parallel_config=None, mesh=None, keep_params=False, **overrides):
  recorder = Recorder(keep_params)
  state = train(ToyTask(), toy_train_config(workdir, **overrides), parallel_config or toy_parallel_config(),
                mesh=mesh, hooks=[recorder])
  return state, recorder


@pytest.fixture(scope='module')
def baseline(tmp_path_factory):
  """20 steps on the default (8, 1, 1) mesh with EMA on and 'frozen_proj' frozen."""
  workdir = tmp_path_factory.mktemp('baseline')
  state, recorder = run_toy(workdir, keep_params=True, ema_decay=EMA_DECAY)
  return workdir, state, recorder


# --- learning ---------------------------------------------------------------------------------------------------


def test_loss_falls(baseline):
  _, _, recorder = baseline
  assert recorder.steps == list(range(1, 21))
  first, last = np.mean(recorder.losses[:5]), np.mean(recorder.losses[-5:])
  assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize('mesh_shape', [(1, 1, 1), (2, 4, 1), (1, 2, 4)])
def test_losses_match_across_meshes(baseline, tmp_path, mesh_shape):
  _, _, reference = baseline
  data, fsdp, tensor = mesh_shape
  devices = jax.devices()[:data * fsdp * tensor]
  mesh = make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor), devices=devices)
  state, recorder = run_toy(tmp_path, mesh=mesh, ema_decay=EMA_DECAY)
  assert recorder.ids == reference.ids
  np.testing.assert_allclose(recorder.losses, reference.losses, atol=1e-5, rtol=0)
  assert state.params['params']['w1'].sharding.mesh.shape == dict(data=data, fsdp=fsdp, tensor=tensor)


# --- kill and resume ---------------------------------------------------------------------------------------------


def run_script(workdir, record, kill_at_step=0):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]))
  command = [sys.executable, os.path.join(REPO_ROOT, 'tests', 'toy_train_script.py'), '--workdir', str(workdir),
             '--record', str(record), '--kill-at-step', str(kill_at_step), '--ema-decay', str(EMA_DECAY)]
  return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def read_record(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_kill_and_resume_continues_the_same_trajectory(baseline, tmp_path):
  _, _, reference = baseline
  workdir, record = tmp_path / 'run', tmp_path / 'record.jsonl'

  killed = run_script(workdir, record, kill_at_step=10)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  before = read_record(record)
  assert [r['step'] for r in before] == list(range(1, 11))

  # A save cut off mid-write leaves only orbax's temporary directory; it must never be restored.
  partial = os.path.join(checkpoint_dir(workdir), '15.orbax-checkpoint-tmp-1700000000000000')
  os.makedirs(os.path.join(partial, 'state'))

  resumed = run_script(workdir, record)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  records = read_record(record)
  assert [r['step'] for r in records] == list(range(1, 21))
  assert [r['ids'] for r in records] == reference.ids  # no batch repeated or skipped
  np.testing.assert_allclose([r['loss'] for r in records[10:]], reference.losses[10:], atol=1e-6, rtol=0)
  assert not os.path.exists(partial)
  assert sorted(os.listdir(checkpoint_dir(workdir))) == ['10', '20']


def test_resume_onto_a_different_mesh(baseline, tmp_path):
  """Step 10 saved on the (8, 1, 1) mesh restores straight into (1, 2, 4) shardings and continues the run."""
  source, _, reference = baseline
  shutil.copytree(os.path.join(checkpoint_dir(source), '10'), os.path.join(checkpoint_dir(tmp_path), '10'))
  state, recorder = run_toy(tmp_path, parallel_config=toy_parallel_config(1, 2, 4), ema_decay=EMA_DECAY)
  assert recorder.steps == list(range(11, 21))
  assert recorder.ids == reference.ids[10:]
  np.testing.assert_allclose(recorder.losses, reference.losses[10:], atol=1e-5, rtol=0)
  assert state.opt_state[1][0].mu['params']['w1'].sharding.spec == P('fsdp', 'tensor')


# --- frozen parameters, EMA ------------------------------------------------------------------------------------


def test_frozen_subtree_is_unchanged_and_has_no_optimizer_state(baseline):
  _, state, _ = baseline
  np.testing.assert_array_equal(np.asarray(state.frozen_params['params']['frozen_proj']), fixed_projection())
  assert set(state.params['params']) == {'w1', 'b1', 'w2'}
  opt_paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
  assert not [path for path in opt_paths if 'frozen_proj' in path]
  trainable_size = sum(x.size for x in jax.tree.leaves(state.params))
  moment_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert moment_size == 2 * trainable_size  # Adam's mu and nu, for the trainable leaves only


def test_frozen_subtree_would_get_a_gradient():
  """Guards the test above: 'frozen_proj' is on the loss path, so only freezing keeps it fixed."""
  task = ToyTask()
  batch = jax.tree.map(lambda *x: np.stack(x), *make_examples()[:8])
  params = nn.meta.unbox(task.init_params(jax.random.key(0), batch))
  grads = jax.jit(jax.grad(lambda p: task.loss_fn(p, batch, None)[0]))(params)
  assert float(jnp.abs(grads['params']['frozen_proj']).max()) > 1e-4


def test_split_and_merge_params_round_trip():
  params = {'params': {'a': {'kernel': 1, 'bias': 2}, 'frozen_b': {'kernel': 3}}}
  trainable, frozen = split_frozen(params, ['frozen_'])
  assert trainable == {'params': {'a': {'kernel': 1, 'bias': 2}}}
  assert frozen == {'params': {'frozen_b': {'kernel': 3}}}
  assert merge_params(trainable, frozen) == params
  with pytest.raises(ValueError, match="'nothing_here' matches no parameter"):
    split_frozen(params, ['nothing_here'])


def test_ema_follows_its_update_rule(baseline):
  _, state, recorder = baseline
  for step in range(1, len(recorder.steps)):
    expected = jax.tree.map(lambda e, p: EMA_DECAY * e + (1 - EMA_DECAY) * p, recorder.ema[step - 1],
                            recorder.params[step])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), recorder.ema[step], expected)
  gap = max(float(np.abs(e - p).max()) for e, p in zip(jax.tree.leaves(host_copy(state.ema_params)),
                                                       jax.tree.leaves(host_copy(state.params))))
  assert gap > 1e-3


# --- metrics ---------------------------------------------------------------------------------------------------


def expected_learning_rate(update, config):
  count = update + 1  # the schedule is read one step ahead so the first update is not at learning rate 0
  peak, end = config.learning_rate, config.learning_rate * config.end_learning_rate_ratio
  if count < config.warmup_steps:
    return peak * count / config.warmup_steps
  progress = (count - config.warmup_steps) / (config.num_steps - config.warmup_steps)
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def test_metrics_file_and_tensorboard(baseline):
  workdir, _, recorder = baseline
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  assert [row['step'] for row in rows] == list(range(1, 21))
  expected_fields = {'step', 'loss', 'grad_norm', 'learning_rate', 'steps_per_sec', 'samples_per_sec', 'mae',
                     'nonfinite'}
  assert all(set(row) == expected_fields for row in rows), rows[0]
  assert all(row['nonfinite'] == 0 for row in rows)
  np.testing.assert_allclose([row['loss'] for row in rows], recorder.losses, rtol=1e-7)
  config = toy_train_config(workdir)
  np.testing.assert_allclose([row['learning_rate'] for row in rows],
                             [expected_learning_rate(step - 1, config) for step in range(1, 21)], rtol=1e-5)
  assert rows[-1]['learning_rate'] == pytest.approx(config.learning_rate * config.end_learning_rate_ratio)
  for row in rows:
    assert row['samples_per_sec'] == pytest.approx(8 * row['steps_per_sec'])
    assert row['grad_norm'] > 0
  events = glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))
  assert events and os.path.getsize(events[0]) > 100


def test_tensorboard_logging_does_not_load_torch_and_leaves_it_importable(tmp_path):
  """tensorboardX would import torch (seconds) at its import when installed; a fresh process logs without it."""
  script = f"""
import glob, sys
from landiff_jax.train import metrics
writer = metrics.MetricsWriter({str(tmp_path)!r}, total_steps=2, initial_step=0, progress=False)
writer.write(1, {{'loss': 0.5}})
writer.close()
assert 'torch' not in sys.modules, 'tensorboardX loaded torch'
from tensorboardX.proto import event_pb2
data = open(glob.glob({str(tmp_path / 'tensorboard' / '*')!r})[0], 'rb').read()
events, at = [], 0
while at < len(data):
  size = int.from_bytes(data[at:at + 8], 'little')
  events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + size]))
  at += size + 16
assert [(v.tag, v.simple_value) for e in events for v in e.summary.value] == [('train/loss', 0.5)]
import torch
assert float(torch.ones(3).sum()) == 3.0
"""
  done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]


def test_resume_after_a_crash_logs_each_step_once(tmp_path):
  _, first = run_toy(tmp_path, num_steps=13)  # checkpoints at 10 and 13
  shutil.rmtree(os.path.join(checkpoint_dir(tmp_path), '13'))  # as if it crashed before saving step 13
  _, resumed = run_toy(tmp_path)
  assert resumed.steps == list(range(11, 21))
  with open(os.path.join(tmp_path, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  assert [row['step'] for row in rows] == list(range(1, 21))
  logged = [row['loss'] for row in rows]
  np.testing.assert_allclose(logged[:10], first.losses[:10], rtol=1e-7)
  np.testing.assert_allclose(logged[10:], resumed.losses, rtol=1e-7)  # the resumed values, not the stale 11-13
  assert not np.allclose(first.losses[10:13], resumed.losses[:3], rtol=1e-4)


def test_bad_train_config_is_rejected_with_the_field_named(tmp_path):
  with pytest.raises(ValueError, match='train.workdir is empty'):
    validate_train_config(toy_train_config(''))
  with pytest.raises(ValueError, match='train.log_every=0'):
    validate_train_config(toy_train_config(tmp_path, log_every=0))
  with pytest.raises(ValueError, match='train.batch_size=6 cannot be split over the 8 batch shards'):
    train(ToyTask(), toy_train_config(tmp_path, batch_size=6), toy_parallel_config())


# --- input pipeline --------------------------------------------------------------------------------------------


def take_ids(iterator, num_batches):
  return [next(iterator)['index'].tolist() for _ in range(num_batches)]


def test_pipeline_reshuffles_every_epoch_and_restores_its_position():
  source = make_examples()
  iterator = make_batch_iterator(source, 8, seed=3, shuffle=True, process_index=0, process_count=1)
  epochs = np.array(take_ids(iterator, 16)).reshape(2, NUM_EXAMPLES)
  for epoch in epochs:
    assert sorted(epoch) == list(range(NUM_EXAMPLES))
  assert list(epochs[0]) != list(epochs[1]) and list(epochs[0]) != list(range(NUM_EXAMPLES))

  position = iterator.get_state()
  following = take_ids(iterator, 3)
  fresh = make_batch_iterator(source, 8, seed=3, shuffle=True, process_index=0, process_count=1)
  fresh.set_state(json.loads(json.dumps(position)))
  assert take_ids(fresh, 3) == following


def test_pipeline_shards_each_global_batch_over_processes():
  source = make_examples()
  whole = take_ids(make_batch_iterator(source, 8, seed=1, shuffle=True, process_index=0, process_count=1), 10)
  parts = [take_ids(make_batch_iterator(source, 8, seed=1, shuffle=True, process_index=p, process_count=2), 10)
           for p in range(2)]
  for step in range(10):
    assert len(parts[0][step]) == 4
    assert parts[0][step] + parts[1][step] != whole[step]  # interleaved, not halves
    assert sorted(parts[0][step] + parts[1][step]) == sorted(whole[step])
    assert parts[0][step] == whole[step][0::2] and parts[1][step] == whole[step][1::2]


def test_pipeline_without_shuffle_and_bad_batch_size():
  iterator = make_batch_iterator(make_examples(), 8, seed=0, shuffle=False, process_index=0, process_count=1)
  assert take_ids(iterator, 9)[8] == list(range(8))  # the ninth batch starts the second epoch
  with pytest.raises(ValueError, match='multiple of the process count 3'):
    make_batch_iterator(make_examples(), 8, seed=0, shuffle=False, process_index=0, process_count=3)


class PretrainedToyTask(ToyTask):
  """Starts w2 from given values (trained on) and frozen_proj from others (frozen)."""

  def __init__(self, w2, proj):
    super().__init__()
    self.w2, self.proj = w2, proj

  def pretrained_params(self):
    return {'params': {'w2': self.w2, 'frozen_proj': self.proj}}


def test_pretrained_params_replace_the_initialisation(tmp_path):
  from toy_task import EMBED, IN_DIM, MLP, OUT_DIM
  rng = np.random.default_rng(5)
  w2 = rng.standard_normal((MLP, OUT_DIM)).astype(np.float32)
  proj = rng.standard_normal((IN_DIM, EMBED)).astype(np.float32)
  first = {}
  hook = lambda step, state, metrics: first.setdefault('w2', np.asarray(state.params['params']['w2']))
  state = train(PretrainedToyTask(w2, proj), toy_train_config(tmp_path / 'a', num_steps=1, warmup_steps=0),
                toy_parallel_config(),
                hooks=[hook])
  np.testing.assert_array_equal(np.asarray(state.frozen_params['params']['frozen_proj']), proj)
  # one AdamW step moves each weight by about the learning rate, so w2 started from the given values
  assert np.abs(first['w2'] - w2).max() < 0.1
  with pytest.raises(ValueError, match='has shape'):
    train(PretrainedToyTask(w2[:2], proj), toy_train_config(tmp_path / 'b'), toy_parallel_config())


def test_max_seconds_stops_at_a_logging_step_with_a_checkpoint_and_resumes(tmp_path):
  """`train.max_seconds` (job time limits): the run stops at the first logging step past the limit, saves there,
  and a second start continues from that step to num_steps."""
  state, recorder = run_toy(tmp_path, max_seconds=1e-9, log_every=4)
  assert recorder.steps == [1, 2, 3, 4] and int(state.step) == 4
  with open(tmp_path / 'metrics.jsonl') as f:
    assert json.loads(f.readlines()[-1])['stopped_by_max_seconds'] == 1.0
  state, recorder = run_toy(tmp_path, log_every=4)
  assert recorder.steps == list(range(5, 21)) and int(state.step) == 20


# --- restoring onto other meshes -------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def run_on_2_4_1(tmp_path_factory):
  """20 uninterrupted steps on a (2, 4, 1) mesh, checkpoints at 10 and 20, parameters kept per step."""
  workdir = tmp_path_factory.mktemp('mesh241')
  mesh = make_mesh(dict(data=2, fsdp=4, tensor=1))
  _, recorder = run_toy(workdir, mesh=mesh, keep_params=True, ema_decay=EMA_DECAY)
  return workdir, recorder


@pytest.mark.parametrize('mesh_shape', [(1, 2, 4), (1, 1, 1)])
def test_checkpoint_restores_onto_another_mesh_with_identical_parameters(run_on_2_4_1, tmp_path, mesh_shape):
  source, reference = run_on_2_4_1
  shutil.copytree(os.path.join(checkpoint_dir(source), '10'), os.path.join(checkpoint_dir(tmp_path), '10'))
  data, fsdp, tensor = mesh_shape
  mesh = make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor), devices=jax.devices()[:data * fsdp * tensor])
  restored, none_run = run_toy(tmp_path, mesh=mesh, ema_decay=EMA_DECAY, num_steps=10)  # restores, trains nothing
  assert none_run.steps == [] and int(restored.step) == 10
  assert restored.params['params']['w1'].sharding.mesh.shape == dict(data=data, fsdp=fsdp, tensor=tensor)
  jax.tree.map(np.testing.assert_array_equal, host_copy(restored.params), reference.params[9])
  jax.tree.map(np.testing.assert_array_equal, host_copy(restored.ema_params), reference.ema[9])
  _, resumed = run_toy(tmp_path, mesh=mesh, ema_decay=EMA_DECAY)
  assert resumed.steps == list(range(11, 21))
  assert resumed.ids == reference.ids[10:]  # the data iterator's position came back with the state
  np.testing.assert_allclose(resumed.losses, reference.losses[10:], atol=1e-5, rtol=0)


# --- faults: unreadable checkpoints, non-finite steps -------------------------------------------------------------


def truncate_arrays(step_dir):
  """Cuts every array data file of a saved step to 10 bytes (a full disk, a copy cut short)."""
  cut = 0
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    if os.path.basename(root) == 'd':
      for name in files:
        os.truncate(os.path.join(root, name), 10)
        cut += 1
  assert cut, f'no array files under {step_dir}'


def test_truncated_newest_checkpoint_is_reported_and_the_one_before_resumed(baseline, tmp_path, capfd):
  source, _, reference = baseline
  for step in ('10', '20'):
    shutil.copytree(os.path.join(checkpoint_dir(source), step), os.path.join(checkpoint_dir(tmp_path), step))
  truncate_arrays(os.path.join(checkpoint_dir(tmp_path), '20'))
  state, resumed = run_toy(tmp_path, ema_decay=EMA_DECAY)
  err = capfd.readouterr().err
  assert 'checkpoint step 20' in err and 'unreadable' in err and 'resuming from step 10' in err, err[-2000:]
  assert resumed.steps == list(range(11, 21)) and resumed.ids == reference.ids[10:]
  np.testing.assert_allclose(resumed.losses, reference.losses[10:], atol=1e-6, rtol=0)
  names = os.listdir(checkpoint_dir(tmp_path))
  assert [n for n in names if n.startswith('20.unreadable-')], names  # kept aside for inspection, not deleted
  assert {'10', '20'} <= set(names)


class NanToyTask(ToyTask):
  """The toy task with a NaN in the input of example `bad`."""

  def __init__(self, bad):
    super().__init__()
    self.bad = bad

  def dataset(self):
    examples = make_examples()
    examples[self.bad] = dict(examples[self.bad], x=np.full_like(examples[self.bad]['x'], np.nan))
    return grain.MapDataset.source(examples)


def saved_states_are_finite(workdir):
  import orbax.checkpoint as ocp
  steps = sorted(int(name) for name in os.listdir(checkpoint_dir(workdir)) if name.isdigit())
  for step in steps:
    saved = ocp.StandardCheckpointer().restore(os.path.join(checkpoint_dir(workdir), str(step), 'state'))
    for leaf in jax.tree.leaves(saved):
      assert np.all(np.isfinite(np.asarray(leaf))), f'checkpoint {step} holds a non-finite value'
  return steps


def test_nonfinite_loss_stops_the_run_naming_step_and_batch(baseline, tmp_path):
  _, _, reference = baseline
  bad = reference.ids[4][0]  # first seen at step 5
  recorder = Recorder()
  with pytest.raises(NonFiniteError) as error:
    train(NanToyTask(bad), toy_train_config(tmp_path, checkpoint_every=2), toy_parallel_config(), hooks=[recorder])
  message = str(error.value)
  assert message.startswith('step 5:') and f'examples {reference.ids[4]}' in message, message
  assert 'train.nonfinite=skip' in message
  assert saved_states_are_finite(tmp_path) == [2, 4]
  np.testing.assert_allclose(recorder.losses[:4], reference.losses[:4], atol=1e-6, rtol=0)


def test_nonfinite_loss_skips_the_update_when_configured(baseline, tmp_path, capfd):
  _, _, reference = baseline
  bad = reference.ids[4][0]
  bad_steps = [i + 1 for i, ids in enumerate(reference.ids) if bad in ids]
  assert len(bad_steps) >= 2 and bad_steps[0] == 5
  recorder = Recorder(keep_params=True)
  state = train(NanToyTask(bad), toy_train_config(tmp_path, nonfinite='skip', checkpoint_every=5),
                toy_parallel_config(), hooks=[recorder])
  assert int(state.step) == 20 and recorder.ids == reference.ids
  err = capfd.readouterr().err
  for step in bad_steps:
    assert f'step {step} skipped' in err
    assert not np.isfinite(recorder.losses[step - 1])
    jax.tree.map(np.testing.assert_array_equal, recorder.params[step - 1], recorder.params[step - 2])
  good = [s for s in range(1, 21) if s not in bad_steps]
  assert np.all(np.isfinite([recorder.losses[s - 1] for s in good]))
  np.testing.assert_allclose(recorder.losses[:4], reference.losses[:4], atol=1e-6, rtol=0)
  assert saved_states_are_finite(tmp_path) == [10, 15, 20]
  with open(os.path.join(tmp_path, 'metrics.jsonl'), encoding='utf-8') as f:
    flagged = [row['step'] for row in map(json.loads, f) if row['nonfinite']]
  assert flagged == bad_steps
