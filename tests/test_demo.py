"""The demo recipe (`launch/train_demo.sh`) runs from nothing at toy size, every stage learns, and the pipeline it
assembles generates a video; the shipped demo (`models/shapes-demo`) draws what the README's first command asks."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from landiff_jax import cli
from landiff_jax.cli import DEMO_CKPT, main
from landiff_jax.data.shapes import detect
from landiff_jax.data.video import read_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ('theia', 'vae_frames', 'vae', 'tokenizer', 'lm', 'backbone', 'diffusion')


def losses(run: str) -> np.ndarray:
  with open(os.path.join(run, 'metrics.jsonl')) as f:
    return np.array([row['loss'] for row in map(json.loads, f) if 'loss' in row])


def test_recipe_runs_from_nothing_and_every_stage_learns(tmp_path):
  out = tmp_path / 'demo'
  env = dict(os.environ, SIZE='tiny', VIDEOS='16', LANDIFF_JAX=f'{sys.executable} -m landiff_jax',
             XLA_FLAGS='--xla_backend_optimization_level=0', JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1')
  done = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'train_demo.sh'), str(out)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  for stage in STAGES:
    curve = losses(out / 'runs' / stage)
    assert len(curve) == 20, (stage, curve)
    assert curve[-10:].mean() < 0.85 * curve[:3].mean(), (stage, curve)
  assert (out / 'pipeline' / 'landiff.json').is_file()
  video = out / 'video.mp4'
  assert main(['generate', '--ckpt', str(out / 'pipeline'), '--prompt', 'a red circle moving right', '--steps', '2',
               '--out', str(video)]) == 0
  assert video.stat().st_size > 0
  # a rerun finds every step done and only assembles the pipeline again
  again = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'train_demo.sh'), str(out)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and 'train diffusion: done already' in again.stdout, again.stdout + again.stderr


def test_recipe_steps_name_what_is_missing(tmp_path, capsys):
  """Each step refuses to run without its inputs and says which step makes them; nothing is left half-written."""
  assert main(['prepare', 'encode', '--config=tiny', '--src', str(tmp_path / 'videos'), '--models',
               str(tmp_path / 'models'), '--dst', str(tmp_path / 'data')]) == 1
  assert 'run the earlier `landiff-jax prepare` step first' in capsys.readouterr().err
  assert main(['prepare', 'videos', '--config=tiny', '--dst', str(tmp_path / 'videos'), '--num', '1',
               '--workers', '1']) == 0
  assert main(['prepare', 'encode', '--config=tiny', '--src', str(tmp_path / 'videos'), '--models',
               str(tmp_path / 'models'), '--dst', str(tmp_path / 'data')]) == 1
  assert 'lacks vae, theia, t5_lm, t5_dit' in capsys.readouterr().err
  shutil.rmtree(tmp_path / 'videos')
  assert main(['prepare', 'assemble', '--config=tiny', '--models', str(tmp_path), '--dst', str(tmp_path / 'p')]) == 1
  assert 'lacks t5_lm, t5_dit, lm, tokenizer, dit, vae' in capsys.readouterr().err
  assert main(['export', 'lm', '--workdir', str(tmp_path / 'run'), '--dst', str(tmp_path / 'lm')]) == 1
  assert 'holds no training checkpoints' in capsys.readouterr().err
  assert main(['export', 'lm', '--decoder-only', '--workdir', str(tmp_path), '--dst', str(tmp_path / 'lm')]) == 1
  assert '--decoder-only applies to the vae only' in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == []


def test_the_shipped_demo_draws_the_colour_it_is_asked_for(tmp_path, capsys):
  """The README's first command: `generate` without --ckpt runs the committed demo offline and writes a video in
  which the detector finds the requested colour (read back from the mp4, as a user would see it)."""
  assert os.path.isfile(os.path.join(DEMO_CKPT, 'landiff.json')), 'models/shapes-demo is missing from the checkout'
  video = tmp_path / 'video.mp4'
  assert main(['generate', '--prompt', 'a red circle moving right', '--out', str(video)]) == 0
  assert f'loaded {DEMO_CKPT}' in capsys.readouterr().out
  frames = read_video(str(video))
  assert frames.shape == (49, 64, 64, 3)
  assert detect(frames)['color'] == 'red'


def test_without_ckpt_or_shipped_demo_generate_says_how_to_get_one(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(cli, 'DEMO_CKPT', str(tmp_path / 'shapes-demo'))
  assert main(['generate', '--prompt', 'a red circle moving right', '--out', str(tmp_path / 'v.mp4')]) == 1
  err = capsys.readouterr().err
  assert 'no --ckpt given' in err and 'launch/train_demo.sh' in err
  assert not (tmp_path / 'v.mp4').exists()


def test_the_shipped_demo_encodes_a_video_whose_ids_carry_its_colour(tmp_path):
  """`encode` with the shipped demo (its Theia ViT and tokenizer) turns a ground-truth shapes video into ids; rendered
  without the caption, so that only the ids can say what to draw, the video has the original's colour."""
  import jax
  from landiff_jax import pipeline
  from landiff_jax.data import shapes
  from landiff_jax.data.video import write_video
  from landiff_jax.eval.shapes import ground_truth_video
  pipe = pipeline.load(DEMO_CKPT)
  for index, color in enumerate(('red', 'blue')):
    truth = ground_truth_video({'color': color, 'shape': 'circle', 'direction': 'right'}, index, 49, 64, 64)
    write_video(str(tmp_path / f'{color}.mp4'), truth)
    ids_file = tmp_path / f'{color}.npy'
    assert main(['encode', '--video', str(tmp_path / f'{color}.mp4'), '--ckpt', DEMO_CKPT, '--out', str(ids_file)]) == 0
    ids = np.load(ids_file)
    assert ids.shape == (pipe.layout.tokens_per_group,)
    video = pipe.render_ids(ids, 'a green star staying still', jax.random.key(index), dit_caption=False)
    assert shapes.detect(video)['color'] == color
