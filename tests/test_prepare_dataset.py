"""`landiff-jax prepare dataset`: video files + captions → shards that the LM and control-branch stages train from.

Twenty small mp4s of the shapes set at the tiny config's size (two corrupt, one too short), tiny random model
directories, one store written once and reused.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from landiff_jax import checkpoints, cli
from landiff_jax.config import load_config
from landiff_jax.data import ingest, pipeline, prepare, shapes, shards
from landiff_jax.data.video import _ffmpeg_subprocess, write_video
from landiff_jax.models import tokenizer as tokenizer_model
from landiff_jax.parallel import make_mesh
from landiff_jax.parallel.sharding import strip_partitioning
from landiff_jax.train import train
from landiff_jax.train.checkpoint import checkpoint_dir
from landiff_jax.train.tasks.diffusion import DiffusionTask
from landiff_jax.train.tasks.lm import LMTask
from landiff_jax.train.tasks.tokenizer import TokenizerTask

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_VIDEOS = 20
BAD = {'corrupt_bytes.mp4': 'cannot be decoded', 'corrupt_cut.mp4': 'cannot be decoded', 'short.mp4': 'too short'}
VIDEOS_PER_SHARD = 5


def tiny_config():
  return load_config('configs/tiny.py', [])


def lm_config(data_dir, workdir, *overrides):
  return load_config('configs/train.py:lm,tiny', [
      f'train.data_dir={data_dir}', f'train.workdir={workdir}', 'train.batch_size=8', 'train.num_steps=6',
      'train.checkpoint_every=3', 'train.warmup_steps=1', *overrides])


def diffusion_config(data_dir, workdir, *overrides):
  return load_config('configs/train.py:diffusion,tiny', [
      f'train.data_dir={data_dir}', f'train.workdir={workdir}', 'train.batch_size=8', 'train.num_steps=6',
      'train.checkpoint_every=3', 'train.warmup_steps=1', 'train.learning_rate=3e-3', *overrides])


@pytest.fixture(scope='module')
def videos(tmp_path_factory):
  """17 good clips (one or two 9-frame groups), 2 corrupt files, 1 clip of 5 frames; captions as jsonl."""
  cfg = tiny_config()
  v = cfg.video
  root = tmp_path_factory.mktemp('videos')
  src = root / 'clips'
  rows = []
  good = NUM_VIDEOS - len(BAD)
  for i in range(good):
    spec = shapes.sample_spec(7, i)
    frames = (1 + i % 2) * int(v.num_frames) + i % 3  # 9..20 frames: one or two groups, a few frames left over
    name = f'clip_{i:02d}.mp4'
    write_video(str(src / name), shapes.render(spec, frames, int(v.height), int(v.width)), fps=8)
    rows.append({'video': name, 'caption': spec.caption, 'motion_score': round(0.05 * i, 2)})
  write_video(str(src / 'short.mp4'), shapes.render(shapes.sample_spec(7, 99), 5, int(v.height), int(v.width)))
  (src / 'corrupt_bytes.mp4').write_bytes(np.random.default_rng(0).bytes(3000))
  whole = (src / 'clip_00.mp4').read_bytes()
  (src / 'corrupt_cut.mp4').write_bytes(whole[:len(whole) // 3])
  rows += [{'video': name, 'caption': 'a red circle'} for name in BAD]
  captions = root / 'captions.jsonl'
  captions.write_text(''.join(json.dumps(row) + '\n' for row in rows))
  expected_groups = sum(1 + i % 2 for i in range(good))
  return str(src), str(captions), expected_groups


def random_params(model, seed, **init):
  """Random parameters of the right shapes without compiling the model's initialiser (seconds saved per model):
  weights with unit fan-in variance, norm scales near one, biases near zero."""
  shapes = jax.eval_shape(lambda key: strip_partitioning(model.init_params(key, **init)), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(path[-1])
    if not np.issubdtype(leaf.dtype, np.floating):
      return np.zeros(leaf.shape, leaf.dtype)
    noise = rng.standard_normal(leaf.shape).astype(leaf.dtype)
    if 'scale' in name:
      return 1 + 0.1 * noise
    if 'bias' in name or len(leaf.shape) < 2:
      return 0.1 * noise
    return noise / np.sqrt(np.prod(leaf.shape[:-1]))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def save_random(directory, part, section, seed, **init):
  model = checkpoints.build_model(part, section)
  checkpoints.save(directory, part=part, config=section, params=random_params(model, seed, **init))


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """(MODELS without a tokenizer, MODELS with one): tiny random theia, vae, T5s with word tokenizers, tokenizer."""
  cfg = tiny_config()
  root = tmp_path_factory.mktemp('models')
  base = str(root / 'base')
  for i, part in enumerate(prepare.FROZEN_PARTS):  # as `prepare frozen` writes them
    save_random(os.path.join(base, part), part, cfg[part], i)
    prepare.save_word_tokenizer(os.path.join(base, f'{part}_tokenizer'), int(cfg[part].vocab_size))
  save_random(os.path.join(base, 'theia'), 'theia', cfg.theia, 3)
  save_random(os.path.join(base, 'vae'), 'vae', cfg.vae, 4)
  with_tokenizer = str(root / 'with_tokenizer')
  os.makedirs(with_tokenizer)
  for name in os.listdir(base):
    os.symlink(os.path.join(base, name), os.path.join(with_tokenizer, name))
  save_random(os.path.join(with_tokenizer, 'tokenizer'), 'tokenizer', cfg.tokenizer, 5)
  return base, with_tokenizer


def prepare_cli(src, captions, models, dst, *extra):
  """Runs `landiff-jax prepare dataset` in this process; (its stdout, its summary)."""
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    code = cli.main(['prepare', 'dataset', '--config=configs/tiny.py', '--src', src, '--captions', captions,
                     '--models', models, '--dst', dst, '--videos-per-shard', str(VIDEOS_PER_SHARD), *extra])
  out = buffer.getvalue()
  assert code == 0, out
  line = [line for line in out.splitlines() if line.startswith('prepare dataset: {')][-1]
  return out, json.loads(line[len('prepare dataset: '):])


def all_records(dst):
  index = shards.read_index(dst)
  out = []
  for shard in range(len(index['shards'])):
    out += [shards.decode_record(record) for record in shards.read_shard(dst, shard)]
  return out


def file_times(dst):
  return {name: os.stat(os.path.join(dst, name)).st_mtime_ns for name in os.listdir(dst)}


@pytest.fixture(scope='module')
def store(videos, models, tmp_path_factory):
  """One store: a run without the tokenizer, then one with it (which adds the ids), then one that does nothing."""
  src, captions, _ = videos
  dst = str(tmp_path_factory.mktemp('store') / 'shards')
  runs = {'first': prepare_cli(src, captions, models[0], dst)}
  runs['first_index'] = shards.read_index(dst)
  with pytest.raises(ValueError) as missing_ids:
    LMTask(lm_config(dst, 'unused')).dataset()
  runs['missing_ids'] = str(missing_ids.value)
  runs['tokenizer'] = prepare_cli(src, captions, models[1], dst, '--workers', '2')
  before = file_times(dst)
  runs['again'] = prepare_cli(src, captions, models[1], dst)
  runs['untouched'] = before == file_times(dst)
  return dst, runs


# --- preparing ---------------------------------------------------------------------------------------------------


def test_writes_the_shards_and_lists_the_three_bad_videos(videos, store):
  _, _, expected_groups = videos
  dst, runs = store
  out, result = runs['first']
  assert result['complete'] and result['groups'] == expected_groups and result['skipped'] == 3
  assert result['written'] == result['shards'] == -(-(NUM_VIDEOS) // VIDEOS_PER_SHARD)
  for name, reason in BAD.items():
    assert any(line.startswith(f'skipped {name}: {reason}') for line in out.splitlines()), out
  with open(os.path.join(dst, ingest.REPORT_FILE)) as f:
    report = json.load(f)
  assert {bad['video']: bad['reason'][:len(BAD[bad['video']])] for bad in report['skipped']} == BAD
  assert 'ids' not in runs['first_index']['fields']

  cfg = tiny_config()
  v, d = cfg.video, cfg.dit
  records = all_records(dst)
  assert len(records) == expected_groups
  arrays, meta = records[0]
  assert arrays['latents'].shape == (d.latent_frames, d.latent_height, d.latent_width, d.in_channels)
  assert arrays['theia_features'].shape == (d.latent_frames, *cfg.theia.output_grid, cfg.theia.hidden_size)
  assert arrays['dit_text'].shape == (cfg.t5_dit.max_length, cfg.t5_dit.d_model)
  assert arrays['lm_text'].shape == (cfg.lm.text_max_length, cfg.t5_lm.d_model)
  groups = {}
  for arrays, meta in records:
    groups.setdefault(meta['video'], []).append(meta['group'])
    index = int(meta['video'][5:7])
    assert meta['caption'] == shapes.sample_spec(7, index).caption
    assert float(arrays['motion_score']) == pytest.approx(0.05 * index)
    assert 0 < int(arrays['lm_text_length']) <= cfg.lm.text_max_length
  assert groups == {f'clip_{i:02d}.mp4': list(range(1 + i % 2)) for i in range(NUM_VIDEOS - len(BAD))}
  assert not np.allclose(records[0][0]['latents'], records[1][0]['latents'])


def test_a_trained_tokenizer_adds_the_ids_and_a_second_run_does_nothing(store, models):
  dst, runs = store
  assert runs['tokenizer'][1]['written'] == runs['tokenizer'][1]['shards']  # every shard gained its ids
  assert {'ids', 'semantic_features'} <= set(shards.read_index(dst)['fields'])
  out, again = runs['again']
  assert again['written'] == 0 and again['complete'] and runs['untouched'], out
  assert 'tokenizer' in runs['missing_ids'] and 'ids' in runs['missing_ids']

  model, params = checkpoints.load(os.path.join(models[1], 'tokenizer'))
  arrays = [a for a, _ in all_records(dst)[:3]]
  features = np.stack([a['theia_features'] for a in arrays])
  ids = np.asarray(tokenizer_model.encode_features(model, params, features))
  np.testing.assert_array_equal(np.stack([a['ids'] for a in arrays]), ids)
  np.testing.assert_allclose(np.stack([a['semantic_features'] for a in arrays]),
                             np.asarray(tokenizer_model.decode(model, params, ids)), rtol=1e-5, atol=1e-6)


def test_a_killed_run_completes_on_rerun_with_the_same_result(videos, models, store, tmp_path):
  src, captions, _ = videos
  dst = str(tmp_path / 'shards')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]))
  command = [sys.executable, '-m', 'landiff_jax', 'prepare', 'dataset', '--config=configs/tiny.py', '--src', src,
             '--captions', captions, '--models', models[1], '--dst', dst,
             '--videos-per-shard', str(VIDEOS_PER_SHARD)]
  process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
  deadline = time.time() + 240
  try:
    while shards.shard_meta(dst, 0) is None and shards.shard_meta(dst, 1) is None and process.poll() is None:
      assert time.time() < deadline, 'no shard was finished in time'
      time.sleep(0.05)
  finally:
    os.killpg(process.pid, signal.SIGKILL)  # the whole run, its worker processes too
    process.wait()
  assert process.returncode == -signal.SIGKILL, process.stdout.read().decode()[-3000:]
  assert not os.path.exists(os.path.join(dst, shards.INDEX_FILE))
  finished = [shard for shard in range(4) if shards.shard_meta(dst, shard) is not None]
  assert 0 < len(finished) < 4

  _, result = prepare_cli(src, captions, models[1], dst)
  assert result['complete'] and result['written'] == 4 - len(finished)
  reference, resumed = all_records(store[0]), all_records(dst)
  assert [meta for _, meta in resumed] == [meta for _, meta in reference]
  for (got, _), (want, _) in zip(resumed, reference):
    assert sorted(got) == sorted(want)
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6, err_msg=key)
  with open(os.path.join(dst, ingest.REPORT_FILE)) as f, open(os.path.join(store[0], ingest.REPORT_FILE)) as g:
    assert json.load(f)['skipped'] == json.load(g)['skipped']


def test_parts_written_by_separate_runs_make_the_same_store(videos, models, store, tmp_path):
  src, captions, _ = videos
  dst = str(tmp_path / 'shards')
  out, first = prepare_cli(src, captions, models[1], dst, '--part', '1/2')
  assert not first['complete'] and first['written'] == 2 and not os.path.exists(os.path.join(dst, 'index.json'))
  _, second = prepare_cli(src, captions, models[1], dst, '--part', '0/2')
  assert second['complete'] and second['written'] == 2
  assert [meta for _, meta in all_records(dst)] == [meta for _, meta in all_records(store[0])]


def test_bad_inputs_name_the_fix(videos, models, store, tmp_path):
  src, captions, _ = videos
  def error(*args):
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer), contextlib.redirect_stdout(io.StringIO()):
      assert cli.main(['prepare', 'dataset', '--config=configs/tiny.py', '--dst', str(tmp_path / 'x'), *args]) == 1
    return buffer.getvalue()
  assert 'captions file' in error('--src', src, '--captions', str(tmp_path / 'none.jsonl'), '--models', models[0])
  bad_captions = tmp_path / 'captions.csv'
  bad_captions.write_text('file,text\na.mp4,hello\n')
  assert 'fields "video"' in error('--src', src, '--captions', str(bad_captions), '--models', models[0])
  assert 'lacks vae' in error('--src', src, '--captions', captions, '--models', str(tmp_path))
  assert 'I/N' in error('--src', src, '--captions', captions, '--models', models[0], '--part', '2/2')
  # a rerun must see the store's options
  assert 'videos_per_shard' in error('--src', src, '--captions', captions, '--models', models[0], '--dst', store[0],
                                     '--videos-per-shard', '3')


# --- training from the shards ------------------------------------------------------------------------------------


def test_each_process_reads_only_its_rows_of_every_global_batch(store):
  source = shards.open_source(store[0], shards.STAGE_FIELDS['lm'])
  whole = pipeline.make_batch_iterator(source, 4, seed=0, shuffle=True, process_index=0, process_count=1)
  parts = [pipeline.make_batch_iterator(source, 4, seed=0, shuffle=True, process_index=p, process_count=2)
           for p in range(2)]
  for _ in range(8):  # past the end of an epoch
    batch, halves = next(whole), [next(part) for part in parts]
    np.testing.assert_array_equal(batch['ids'][0::2], halves[0]['ids'])
    np.testing.assert_array_equal(batch['ids'][1::2], halves[1]['ids'])


def losses_of(task, devices):
  losses = []
  mesh = make_mesh({'data': devices, 'fsdp': 1, 'tensor': 1}, jax.devices()[:devices])
  train(task, task.config.train, task.config.parallel, mesh=mesh,
        hooks=[lambda step, state, metrics: losses.append(float(metrics['loss']))])
  return np.array(losses)


# the control branch's step compiles for long on many simulated devices: it trains on one
@pytest.mark.parametrize('task_class, make_config, devices',
                         [(LMTask, lm_config, 8), (DiffusionTask, diffusion_config, 1)])
def test_training_from_the_shards_resumes_exactly(store, tmp_path, task_class, make_config, devices):
  """Six steps in one go; then a run whose step-3 checkpoint (model, optimizer, data position) is all it has."""
  dst, _ = store
  whole = losses_of(task_class(make_config(dst, str(tmp_path / 'whole'))), devices)
  assert len(whole) == 6 and np.all(np.isfinite(whole))
  if task_class is LMTask:
    assert whole[-1] < whole[0], whole
  shutil.copytree(os.path.join(checkpoint_dir(str(tmp_path / 'whole')), '3'),
                  os.path.join(checkpoint_dir(str(tmp_path / 'stopped')), '3'))
  resumed = losses_of(task_class(make_config(dst, str(tmp_path / 'stopped'))), devices)
  np.testing.assert_allclose(resumed, whole[3:], rtol=1e-6, atol=1e-7)


def test_the_tokenizer_trains_from_the_shards(store, tmp_path):
  """The tokenizer stage reads the stored Theia features of each group, the first stage a real run trains."""
  config = load_config('configs/train.py:tokenizer,tiny', [
      f'train.data_dir={store[0]}', f'train.workdir={tmp_path}', 'train.batch_size=4', 'train.num_steps=4',
      'train.checkpoint_every=4', 'train.warmup_steps=1'])
  task = TokenizerTask(config)
  t = config.tokenizer
  assert task.dataset()[0]['features'].shape == (t.frames_per_group, *t.feature_grid, t.feature_dim)
  losses = losses_of(task, 1)
  assert len(losses) == 4 and np.all(np.isfinite(losses))


def test_npz_directories_still_work(tmp_path):
  for i in range(2):
    np.savez(tmp_path / f'{i}.npz', ids=np.arange(7, dtype=np.int32) + i, text=np.zeros((3, 24), np.float32),
             text_length=np.int32(2), motion_score=np.float32(0.1))
  dataset = LMTask(lm_config(str(tmp_path), 'unused')).dataset()
  assert len(dataset) == 2 and dataset[1]['ids'][0] == 1


def test_gif_and_webm_are_read_and_every_clip_is_resampled_to_the_frame_rate(tmp_path):
  import imageio.v3 as iio
  clip = shapes.render(shapes.sample_spec(1, 0), 20, 32, 48)
  write_video(str(tmp_path / 'a.gif'), clip, fps=8)  # GIFs keep centiseconds: 120 ms a frame, 8.3 fps
  with _ffmpeg_subprocess():
    iio.imwrite(tmp_path / 'a.webm', clip, fps=16, codec='libvpx-vp9', macro_block_size=1)
  write_video(str(tmp_path / 'a.mp4'), clip, fps=24)
  settings = ingest.Settings(num_frames=9, height=32, width=48, fps=8.0, dtype='float32')
  gif = ingest.read_groups(str(tmp_path / 'a.gif'), settings)
  assert gif.shape == (2, 9, 32, 48, 3) and np.abs(gif[0].astype(int) - clip[:9]).mean() < 8
  webm = ingest.read_groups(str(tmp_path / 'a.webm'), settings)  # 20 frames at 16 fps: every other one
  assert webm.shape == (1, 9, 32, 48, 3) and np.abs(webm[0].astype(int) - clip[0:18:2]).mean() < 12
  with pytest.raises(ingest.Skip, match='too short: 7 frames at 8 fps'):  # 20 frames at 24 fps: 0.83 s
    ingest.read_groups(str(tmp_path / 'a.mp4'), settings)
  assert [ingest.frame_times(24, 8, i) for i in range(6)] == [1, 0, 0, 1, 0, 0]
  assert [ingest.frame_times(4, 8, i) for i in range(3)] == [1, 2, 2]  # output k shows frame round_half_up(k/2)
