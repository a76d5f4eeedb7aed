"""Conversion streams tensor by tensor: its peak memory follows the largest tensor, not the checkpoint's size."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from landiff_jax import checkpoints
from landiff_jax.config import load_config
from landiff_jax.convert import common, io
from landiff_jax.convert.lm import convert_lm
from landiff_jax.convert.vae import convert_vae

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
safetensors_torch = pytest.importorskip('safetensors.torch')

from test_lm import official_state_dict as lm_state_dict  # noqa: E402  (tests dir is on sys.path)
from test_vae import diffusers_to_sat_name  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO_ROOT, 'configs', 'landiff_official.py')
# The release's VAE at 3/4 width: 436 tensors, 463 MiB of float32, the largest 15 MiB.
WIDTH = 'vae.channels=96'

# Runs one `landiff-jax convert` in a fresh process and prints its peak resident memory above the baseline taken
# after everything the conversion uses is imported (torch, jax with its backend, flax models, orbax).
MEASURE = r'''
import json, sys
import jax, torch
from landiff_jax import checkpoints
from landiff_jax.cli import main
from landiff_jax.convert import io, vae
jax.numpy.zeros(1).block_until_ready()

def status(key):
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ':'))

try:
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # VmHWM := VmRSS, so the peak below is the conversion's own
  baseline = status('VmRSS')
except OSError:
  baseline = status('VmHWM')
code = main(sys.argv[1:])
print(json.dumps({'code': code, 'increase': status('VmHWM') - baseline}))
'''


def _vae_tensors(cfg):
  """Diffusers-named random tensors of the VAE `cfg` describes (the module is built on the meta device)."""
  with torch.device('meta'):
    model = diffusers.AutoencoderKLCogVideoX(
        latent_channels=cfg.latent_channels, layers_per_block=cfg.num_res_blocks, norm_num_groups=cfg.num_groups,
        block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult))
  generator = torch.Generator().manual_seed(0)
  return {name: torch.randn(t.shape, generator=generator) for name, t in model.state_dict().items()}


@pytest.fixture(scope='module')
def big_vae(tmp_path_factory):
  """The same VAE as SAT `3d-vae.pt` and as diffusers safetensors; (paths, total bytes, largest tensor bytes)."""
  cfg = load_config(CONFIG, [WIDTH]).vae
  root = tmp_path_factory.mktemp('big_vae')
  tensors = _vae_tensors(cfg)
  sizes = [t.numel() * t.element_size() for t in tensors.values()]
  paths = {'pt': str(root / '3d-vae.pt'), 'safetensors': str(root / 'diffusion_pytorch_model.safetensors')}
  torch.save({'state_dict': {diffusers_to_sat_name(k, len(cfg.channel_mult)): v for k, v in tensors.items()}},
             paths['pt'])
  safetensors_torch.save_file(tensors, paths['safetensors'])
  return paths, sum(sizes), max(sizes)


@pytest.mark.parametrize('kind', ['pt', 'safetensors'])
def test_conversion_peak_memory_stays_far_below_the_checkpoint_size(big_vae, kind, tmp_path):
  if not os.path.exists('/proc/self/status'):
    pytest.skip('needs /proc to read the resident memory')
  paths, total, largest = big_vae
  assert largest * 25 < total
  dst = tmp_path / 'vae'
  result = subprocess.run(
      [sys.executable, '-c', MEASURE, 'convert', 'vae', f'--config={CONFIG}', f'--config.{WIDTH}', '--src',
       paths[kind], '--dst', str(dst)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['code'] == 0, result.stderr[-3000:]
  # Holding the checkpoint (or the converted tree) whole would take about the total or more (the conversion used to
  # peak at 3x); streaming needs a few tensors plus orbax's bounded buffers.
  assert report['increase'] < 0.4 * total, (report['increase'] >> 20, total >> 20)
  assert not [name for name in os.listdir(tmp_path) if name != 'vae']  # spill files cleaned up
  metadata = ocp.StandardCheckpointer().metadata(str(dst / checkpoints.PARAMS_DIR)).item_metadata.tree
  assert sum(np.prod(m.shape) for m in jax.tree.leaves(metadata)) * 4 == total


def _tiny_vae_file(tmp_path, cfg):
  tensors = _vae_tensors(cfg)
  path = str(tmp_path / '3d-vae.pt')
  torch.save({'state_dict': {diffusers_to_sat_name(k, len(cfg.channel_mult)): v for k, v in tensors.items()}}, path)
  return path


def test_spilled_conversion_writes_the_same_checkpoint(tmp_path):
  """Converting with spilling and saving equals converting in memory and saving: values, tree and orbax metadata."""
  cfg = load_config('configs/tiny.py')
  lm_file = str(tmp_path / 'lm.safetensors')
  safetensors_torch.save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in lm_state_dict(cfg.lm).items()},
                              lm_file)
  vae_file = _tiny_vae_file(tmp_path, cfg.vae)
  for part, section, convert, src in (('lm', cfg.lm, convert_lm, lm_file), ('vae', cfg.vae, convert_vae, vae_file)):
    in_memory = convert(io.load_state_dict(src), section)
    spill = tmp_path / f'spill_{part}'
    spill.mkdir()
    with common.spilling(str(spill)):
      spilled = convert(io.load_state_dict(src), section)
    leaves = jax.tree.leaves(spilled)
    assert leaves and all(isinstance(leaf, checkpoints.SpilledArray) for leaf in leaves)
    assert jax.tree.structure(spilled) == jax.tree.structure(in_memory)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), spilled, in_memory)
    plain = checkpoints.save(str(tmp_path / f'{part}_plain'), part=part, config=section, params=in_memory)
    streamed = checkpoints.save(str(tmp_path / f'{part}_streamed'), part=part, config=section, params=spilled)
    with open(os.path.join(plain, checkpoints.PARAMS_DIR, '_METADATA')) as f, \
         open(os.path.join(streamed, checkpoints.PARAMS_DIR, '_METADATA')) as g:
      assert json.load(f)['tree_metadata'] == json.load(g)['tree_metadata']
    restored = checkpoints.load_params(streamed)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, in_memory)
