"""Start-up and memory at full size: options checked before anything loads, the persistent compilation cache, the
stored bytes of the release's pipeline, and no large constant in the DiT's program."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landiff_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli_without_jax(args: list[str], cwd: str) -> tuple[int, str, list[str]]:
  """Runs `landiff-jax ARGS` in a fresh interpreter; (exit code, stderr, the heavy modules it imported)."""
  code = ('import sys\nfrom landiff_jax.cli import main\nrc = main(sys.argv[1:])\n'
          'heavy = [m for m in ("jax", "flax", "orbax", "landiff_jax.pipeline") if m in sys.modules]\n'
          'print("HEAVY=" + ",".join(heavy))\nsys.exit(rc)\n')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH', '')])))
  done = subprocess.run([sys.executable, '-c', code] + args, capture_output=True, text=True, cwd=cwd, env=env,
                        timeout=60, check=False)
  heavy = done.stdout.strip().rsplit('HEAVY=', 1)[-1].split(',') if 'HEAVY=' in done.stdout else ['?']
  return done.returncode, done.stderr.strip(), [h for h in heavy if h]


@pytest.fixture(scope='module')
def fake_pipeline(tmp_path_factory):
  """A pipeline directory whose files pass the checks made before loading (no parameters inside)."""
  from landiff_jax import runtime
  root = tmp_path_factory.mktemp('fake') / 'pipe'
  for name in runtime.PARTS:
    (root / name / 'params').mkdir(parents=True)
    (root / name / 'config.json').write_text(json.dumps({'format': 'landiff-jax-model', 'part': name, 'config': {}}))
  for sub in runtime.TEXT_TOKENIZERS.values():
    (root / sub).mkdir()
  (root / 'landiff.json').write_text(load_config('configs/tiny.py').to_json_best_effort())
  return root


@pytest.mark.parametrize('options, message', [
    (['--groups', '0'], '--groups must be at least 1'),
    (['--steps', '0'], '--steps must be at least 1'),
    (['--motion', '3'], '--motion must be in [0, 1]'),
    (['--lm-cfg', '-1'], '--lm-cfg must be 0 or more'),
    (['--offload', 'gpu'], '--offload must be one of none, stage'),
    (['--prompts', 'missing.txt'], '--prompts missing.txt cannot be read'),
    (['--config.runtime.offload=disk'], 'config.runtime.offload must be one of'),
    (['--out', 'exists.mp4'], 'exists.mp4 already exists; pass --overwrite'),
    (['--save-ids', '--out', 'new.mp4'], 'new.ids.npy already exists; pass --overwrite'),
])
def test_bad_generate_options_fail_in_one_line_before_jax_is_imported(fake_pipeline, tmp_path, options, message):
  (tmp_path / 'exists.mp4').write_bytes(b'x')
  (tmp_path / 'new.ids.npy').write_bytes(b'x')
  prompt = [] if '--prompts' in options else ['--prompt', 'a red circle']
  code, err, heavy = run_cli_without_jax(['generate', '--ckpt', str(fake_pipeline)] + prompt + options,
                                         cwd=str(tmp_path))
  assert code == 1 and message in err and len(err.splitlines()) == 1, err
  assert heavy == []  # nothing of JAX, so no model either
  assert sorted(os.listdir(tmp_path)) == ['exists.mp4', 'new.ids.npy']  # no partial outputs


def test_a_part_of_another_kind_or_a_missing_config_is_named(fake_pipeline, tmp_path):
  import shutil
  pipe = tmp_path / 'pipe'
  shutil.copytree(fake_pipeline, pipe)
  meta = json.loads((pipe / 'lm' / 'config.json').read_text())
  (pipe / 'lm' / 'config.json').write_text(json.dumps(dict(meta, part='vae')))
  code, err, heavy = run_cli_without_jax(['generate', '--ckpt', str(pipe), '--prompt', 'x'], cwd=str(tmp_path))
  assert code == 1 and 'holds a vae model, not the lm' in err and len(err.splitlines()) == 1 and heavy == []
  (pipe / 'lm' / 'config.json').unlink()
  code, err, _ = run_cli_without_jax(['generate', '--ckpt', str(pipe), '--prompt', 'x'], cwd=str(tmp_path))
  assert code == 1 and f'{pipe / "lm"} is not a landiff-jax model directory (no config.json)' in err


def test_prompts_without_out_default_to_a_folder_named_after_the_file(tmp_path):
  from types import SimpleNamespace

  from landiff_jax.cli import default_out, output_paths
  args = SimpleNamespace(out='', prompts=str(tmp_path / 'my prompts.txt'), save_ids=True, save_frames=True,
                         overwrite=False)
  args.out = default_out(args)
  assert args.out == 'my prompts-videos'
  os.chdir(tmp_path)
  assert output_paths(args, 2) == [os.path.join(args.out, '000.mp4'), os.path.join(args.out, '001.mp4')]
  assert not os.path.exists(args.out)  # created only when the first video is written
  assert default_out(SimpleNamespace(out='', prompts='')) == 'video.mp4'


def test_the_compilation_cache_folder_is_per_user_and_overridable(monkeypatch, tmp_path):
  from landiff_jax import runtime
  monkeypatch.delenv(runtime.CACHE_ENV, raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert runtime.default_cache_dir() == str(tmp_path / 'xdg' / 'landiff-jax' / 'xla')
  monkeypatch.delenv('XDG_CACHE_HOME')
  assert runtime.default_cache_dir() == os.path.join(os.path.expanduser('~'), '.cache', 'landiff-jax', 'xla')
  with pytest.raises(runtime.SettingError, match='--no-compile-cache'):
    (tmp_path / 'file').write_text('')
    runtime.enable_compilation_cache(str(tmp_path / 'file' / 'cache'))


def test_the_release_pipeline_stores_at_most_27_5_gib_in_bf16():
  """14.6 B parameters × 2 bytes, from shapes alone (jax.eval_shape of every part at full size)."""
  from landiff_jax.bench import memory
  config = load_config('configs/landiff_official.py')
  assert config.storage_dtype == 'bfloat16'
  stored = memory.stored_bytes(config)
  total = sum(stored.values())
  assert 27.0 * 2**30 < total <= 27.5 * 2**30, total / 2**30
  assert 8.5 * 2**30 < stored['t5_lm'] < 9.0 * 2**30 and 8.5 * 2**30 < stored['t5_dit'] < 9.0 * 2**30
  config.storage_dtype = 'float32'
  assert sum(memory.stored_bytes(config).values()) == pytest.approx(2 * total, rel=0.01)


def test_one_full_size_video_peaks_under_the_40_and_24_gib_goals():
  """`bench generate --estimate` at the release's size, from shapes: the stored bf16 parts plus each stage's
  temporaries compiled ahead of time (float32 upper bounds). The VAE decode sets the all-resident peak: 14.2 GiB of
  temporaries before its upsampled maps were made lazy and it was compiled with the GPU's 3D convolutions, 11.3 now
  (5.2 of them the causal caches carried between chunks)."""
  from landiff_jax.bench import memory
  result = memory.estimate(load_config('configs/landiff_official.py'), log=lambda line: None)
  temporaries, peak = result['temporaries_gib'], result['peak_gib']
  assert set(temporaries) == {'lm_text', 'semantic_ids', 'dit_text', 'condition', 'latents', 'frames'}
  assert temporaries['frames'] < 11.5 and temporaries['latents'] < 8, temporaries
  assert peak['none'] == pytest.approx(result['stored_gib']['total'] + max(temporaries.values()), abs=0.01)
  assert peak['none'] <= 40 and peak['stage'] <= 24, peak


def test_no_large_constant_in_the_full_size_dit_program():
  """The 3D sin-cos table (17,776 × 1920 floats, 136 MB) is computed in the program, not baked into it."""
  from landiff_jax.bench import memory
  config = load_config('configs/landiff_official.py')
  model = memory.build_part(config, 'dit')
  params = memory.abstract_params(config, 'dit', model)
  c = config.dit
  sds = jax.ShapeDtypeStruct
  latents = sds((1, c.latent_frames, c.latent_height, c.latent_width, c.in_channels), jnp.bfloat16)
  text = sds((1, c.text_length, c.text_dim), jnp.bfloat16)
  lowered = jax.jit(lambda p, x, t, y: model.apply(p, x, t, y)).lower(params, latents, sds((1,), jnp.float32), text)
  hlo = lowered.as_text()
  sizes = [int(np.prod([int(n) for n in dims.split('x')[:-1]] or [1]))
           for dims in re.findall(r'constant dense<[^>]*>\s*:\s*tensor<([0-9x]+[a-z0-9]+)>', hlo)]
  assert sizes and max(sizes) < 2**16, max(sizes)  # per-axis frequencies at most


@pytest.mark.parametrize('command, message', [
    (['encode', '--video', 'missing.mp4', '--ckpt', '{pipe}'], '--video missing.mp4 is not a readable file'),
    (['reconstruct', '--video', 'clip.mp4', '--ckpt', '{pipe}', '--frames', '-1'], '--frames must be 0'),
    (['encode', '--video', 'clip.mp4', '--ckpt', '{pipe}'], 'has no theia/ model directory'),
    (['eval', 'shapes', '--ckpt', '{pipe}', '--num-prompts', '0'], '--num-prompts must be at least 1'),
    (['eval', 'shapes', '--ckpt', '{pipe}', '--steps', '0'], '--steps must be at least 1'),
])
def test_bad_encode_and_eval_options_fail_before_jax_is_imported(fake_pipeline, tmp_path, command, message):
  (tmp_path / 'clip.mp4').write_bytes(b'x')
  code, err, heavy = run_cli_without_jax([a.format(pipe=fake_pipeline) for a in command], cwd=str(tmp_path))
  assert code == 1 and message in err and len(err.splitlines()) == 1, err
  assert heavy == []
