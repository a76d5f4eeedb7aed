"""CogVideoX VAE: parity with diffusers `AutoencoderKLCogVideoX` through a SAT `3d-vae.pt`, chunking, memory, errors."""

import re

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from landiff_jax import checkpoints
from landiff_jax.cli import main
from landiff_jax.config import load_config
from landiff_jax.convert import ConversionError, io
from landiff_jax.convert.vae import convert_vae
from landiff_jax.models import vae as vae_model
from landiff_jax.parallel import strip_partitioning

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

LATENT_H, LATENT_W = 4, 6


@pytest.fixture(scope='module')
def cfg():
  return load_config('configs/tiny.py').vae


@pytest.fixture(scope='module')
def reference(cfg):
  """A tiny diffusers VAE with every parameter (norm affines included) randomised."""
  torch.manual_seed(0)
  model = diffusers.AutoencoderKLCogVideoX(
      in_channels=cfg.in_channels, out_channels=cfg.in_channels, latent_channels=cfg.latent_channels,
      block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult), layers_per_block=cfg.num_res_blocks,
      norm_num_groups=cfg.num_groups, scaling_factor=cfg.scaling_factor).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith('norm_layer.weight') else 0.0))
  return model


def diffusers_to_sat_name(name: str, num_levels: int) -> str:
  """Inverse of the release's SAT → diffusers VAE renames (cogvideox-theia-t5.md §3.4)."""
  name = re.sub(r'mid_block\.resnets\.(\d+)\.', lambda m: f'mid.block_{int(m.group(1)) + 1}.', name)
  name = re.sub(r'decoder\.up_blocks\.(\d+)\.', lambda m: f'decoder.up.{num_levels - 1 - int(m.group(1))}.', name)
  name = name.replace('down_blocks.', 'down.').replace('resnets.', 'block.')
  name = name.replace('downsamplers.0', 'downsample').replace('upsamplers.0', 'upsample')
  return name.replace('conv_shortcut', 'nin_shortcut')


@pytest.fixture(scope='module')
def sat_checkpoint(reference, cfg, tmp_path_factory):
  state = {diffusers_to_sat_name(k, len(cfg.channel_mult)): v.detach().clone()
           for k, v in reference.state_dict().items()}
  assert 'decoder.up.3.upsample.conv.weight' in state and 'decoder.mid.block_1.norm1.conv_y.conv.weight' in state
  state['loss.logvar'] = torch.zeros(())
  state['loss.discriminator.conv.weight'] = torch.ones(2, 2)
  path = tmp_path_factory.mktemp('sat') / '3d-vae.pt'
  torch.save({'state_dict': state}, path)
  return str(path)


@pytest.fixture(scope='module')
def converted(sat_checkpoint, cfg):
  return convert_vae(io.load_state_dict(sat_checkpoint), cfg)


@pytest.fixture(scope='module')
def model(cfg):
  return vae_model.build_vae(cfg)


def to_torch(x):  # channels last → PyTorch's channels first
  return torch.from_numpy(np.asarray(x)).permute(0, 4, 1, 2, 3)


def from_torch(x):
  return x.permute(0, 2, 3, 4, 1).numpy()


def random_latents(frames, seed=0, channels=4):
  return np.random.default_rng(seed).standard_normal((1, frames, LATENT_H, LATENT_W, channels)).astype(np.float32)


@pytest.mark.parametrize('frames', [1, 3, 5, 13])
def test_decode_from_sat_checkpoint_matches_diffusers(reference, converted, model, cfg, frames):
  latents = random_latents(frames, seed=frames, channels=cfg.latent_channels)
  with torch.no_grad():
    want = from_torch(reference.decode(to_torch(latents) / cfg.scaling_factor).sample)
  got = np.asarray(vae_model.decode(model, converted, latents))
  assert got.shape == (1, 1 + 4 * (frames - 1), 8 * LATENT_H, 8 * LATENT_W, 3) == want.shape
  assert got.shape[1] == vae_model.decoded_frames(frames)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_frame_tiles_give_the_same_video_and_posterior(reference, converted, model, cfg):
  """tile_bytes=1 computes every layer one frame at a time (the path the release's 480×720 takes) at toy size."""
  tiled = model.clone(tile_bytes=1)
  latents = random_latents(13, seed=4, channels=cfg.latent_channels)
  with torch.no_grad():
    want = from_torch(reference.decode(to_torch(latents) / cfg.scaling_factor).sample)
  np.testing.assert_allclose(np.asarray(vae_model.decode(tiled, converted, latents)), want, atol=1e-4, rtol=0)
  video = np.random.default_rng(4).uniform(-1, 1, (1, 9, 8 * LATENT_H, 8 * LATENT_W, 3)).astype(np.float32)
  with torch.no_grad():
    posterior = reference.encode(to_torch(video)).latent_dist
  mean, _ = vae_model.encode_moments(tiled, converted, video)
  np.testing.assert_allclose(np.asarray(mean), from_torch(posterior.mean), atol=1e-4, rtol=0)


def test_native_and_tap_temporal_convolutions_agree(converted, model):
  """The GPU's one 3D convolution and the CPU's sum of 2D convolutions over the time taps (what `bench generate
  --estimate` compiles versus what a CPU runs)."""
  latents = random_latents(5, seed=6, channels=model.latent_channels)
  native = vae_model.decode(model.clone(conv3d='native'), converted, latents)
  taps = vae_model.decode(model.clone(conv3d='taps'), converted, latents)
  np.testing.assert_allclose(np.asarray(native), np.asarray(taps), atol=1e-4, rtol=0)  # as against diffusers
  with pytest.raises(ValueError, match="conv3d 'cudnn' is not one of"):
    vae_model.decode(model.clone(conv3d='cudnn'), converted, latents)


@pytest.mark.parametrize('in_channels', [16, 8])
def test_a_resnet_block_reads_lazy_frames_as_it_reads_an_array(in_channels):
  """LazyFrames input (the decoder's upsampled maps): statistics merged over tiles, the shortcut computed in the same
  pass, frames recomputed for the first convolution; narrowing (16 → 8) and identity (8 → 8) shortcuts."""
  x = jax.random.normal(jax.random.key(0), (1, 6, 4, 5, in_channels)) * 3 + 1
  z = jax.random.normal(jax.random.key(1), (1, 2, 2, 3, 4))
  block = vae_model.ResnetBlock3D(8, num_groups=4, spatial_norm=True, tile_bytes=1)
  params = block.init(jax.random.key(2), x, z, None)
  lazy = vae_model.LazyFrames(x.shape, x.dtype, lambda start, count: lax.dynamic_slice_in_dim(x * 1, start, count, 1),
                              frame_bytes=1)
  want, want_cache = block.apply(params, x, z, None)
  got, got_cache = block.apply(params, lazy, z, None)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), got_cache, want_cache)


@pytest.mark.parametrize('frames', [9, 17])
def test_encode_matches_diffusers(reference, converted, model, cfg, frames):
  video = np.random.default_rng(frames).uniform(-1, 1, (1, frames, 8 * LATENT_H, 8 * LATENT_W, 3)).astype(np.float32)
  with torch.no_grad():
    posterior = reference.encode(to_torch(video)).latent_dist
  mean, logvar = vae_model.encode_moments(model, converted, video)
  np.testing.assert_allclose(np.asarray(mean), from_torch(posterior.mean), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(logvar), from_torch(posterior.logvar), atol=1e-4, rtol=0)
  latents = vae_model.encode(model, converted, video)
  assert latents.shape == (1, 1 + (frames - 1) // 4, LATENT_H, LATENT_W, cfg.latent_channels)
  np.testing.assert_allclose(np.asarray(latents), cfg.scaling_factor * np.asarray(mean), rtol=1e-6)
  key = jax.random.key(3)
  sampled = vae_model.encode(model, converted, video, key=key)
  noise = jax.random.normal(key, mean.shape)
  np.testing.assert_allclose(np.asarray(sampled), cfg.scaling_factor * np.asarray(mean + jnp.exp(0.5 * logvar) * noise),
                             rtol=1e-5, atol=1e-6)


def test_diffusers_layout_converts_to_the_same_parameters(reference, converted, cfg):
  from_diffusers = convert_vae({k: v.numpy() for k, v in reference.state_dict().items()}, cfg)
  assert jax.tree.structure(from_diffusers) == jax.tree.structure(converted)
  jax.tree.map(np.testing.assert_array_equal, from_diffusers, converted)
  init = strip_partitioning(jax.eval_shape(vae_model.build_vae(cfg).init_params, jax.random.key(0)))
  assert jax.tree.structure(init) == jax.tree.structure(converted)
  assert jax.tree.map(lambda a: a.shape, init) == jax.tree.map(np.shape, converted)


def test_decode_uses_the_official_chunks_and_they_matter(converted, model, cfg):
  latents = random_latents(13, seed=1, channels=cfg.latent_channels)
  official = [(0, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]
  assert vae_model.latent_chunks(13, cfg.decode_chunk_frames) == official
  chunked = np.asarray(vae_model.decode(model, converted, latents))
  explicit = np.asarray(vae_model.decode_with_chunks(model, converted, latents, official))
  np.testing.assert_allclose(chunked, explicit, atol=1e-4, rtol=0)  # same math, differently fused
  one_shot = np.asarray(vae_model.decode_with_chunks(model, converted, latents, [(0, 13)]))
  assert one_shot.shape == chunked.shape
  assert np.abs(one_shot - chunked).max() > 1e-2  # GroupNorm statistics are per chunk


def test_latent_chunks_fold_the_remainder_into_the_first():
  assert vae_model.latent_chunks(1, 2) == [(0, 1)]
  assert vae_model.latent_chunks(4, 2) == [(0, 2), (2, 4)]
  assert vae_model.latent_chunks(49, 8) == [(0, 9), (9, 17), (17, 25), (25, 33), (33, 41), (41, 49)]
  assert [vae_model.decoded_frames(t) for t in (1, 2, 3, 13)] == [1, 8, 9, 49]


def test_decode_memory_does_not_grow_with_length(cfg):
  model = vae_model.build_vae(cfg, with_encoder=False)
  params = strip_partitioning(jax.eval_shape(model.init_params, jax.random.key(0)))

  def peak_bytes(frames):
    latents = jax.ShapeDtypeStruct((1, frames, 8, 8, cfg.latent_channels), jnp.float32)
    memory = vae_model._decode.lower(model, params, latents).compile().memory_analysis()
    return memory.temp_size_in_bytes + memory.output_size_in_bytes

  short, long = peak_bytes(13), peak_bytes(25)
  assert long < 1.5 * short, (short, long)


def test_bfloat16_decode_is_close_to_float32(converted, cfg):
  latents = random_latents(3, seed=2, channels=cfg.latent_channels)
  full = np.asarray(vae_model.decode(vae_model.build_vae(cfg), converted, latents))
  half = np.asarray(vae_model.decode(vae_model.build_vae(cfg, dtype=jnp.bfloat16), converted, latents))
  assert half.dtype == np.float32
  assert np.abs(half - full).max() < 5e-2 * np.abs(full).max()


def test_bad_inputs_are_rejected_with_clear_errors(converted, model, cfg):
  with pytest.raises(ValueError, match='channels but this VAE takes 4'):
    vae_model.decode(model, converted, np.zeros((1, 3, 4, 6, 16), np.float32))
  with pytest.raises(ValueError, match='channels-first'):
    vae_model.decode(model, converted, np.zeros((1, 4, 3, 4, 6), np.float32))
  with pytest.raises(ValueError, match='empty time axis'):
    vae_model.decode(model, converted, np.zeros((1, 0, 4, 6, 4), np.float32))
  with pytest.raises(ValueError, match=r'\[batch, frames, height, width, 4\]'):
    vae_model.decode(model, converted, np.zeros((3, 4, 6, 4), np.float32))
  with pytest.raises(ValueError, match='multiples of 8'):
    vae_model.encode(model, converted, np.zeros((1, 9, 30, 48, 3), np.float32))
  with pytest.raises(ValueError, match='empty time axis'):
    vae_model.encode(model, converted, np.zeros((1, 0, 32, 48, 3), np.float32))
  decoder_only = vae_model.build_vae(cfg, with_encoder=False)
  with pytest.raises(ValueError, match='--decoder-only'):
    vae_model.encode(decoder_only, {'params': {'decoder': converted['params']['decoder']}},
                     np.zeros((1, 1, 32, 48, 3), np.float32))


def test_converter_lists_every_bad_key(reference, cfg):
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  del state['decoder.conv_in.conv.weight']
  state['decoder.norm_out.conv_y.conv.weight'] = np.zeros((3, 3, 1, 1, 1), np.float32)
  state['decoder.extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError) as error:
    convert_vae(state, cfg)
  message = str(error.value)
  assert 'decoder/conv_in/kernel' in message and 'decoder.extra.weight' in message
  assert 'decoder.norm_out.conv_y.conv.weight' in message and 'diffusers layout' in message
  wrong_config = load_config('configs/tiny.py', ['vae.channels=16']).vae
  with pytest.raises(ConversionError, match='wrong shape'):
    convert_vae(state, wrong_config)


def test_cli_converts_a_sat_checkpoint_into_a_model_directory(sat_checkpoint, converted, tmp_path, capsys):
  dst = tmp_path / 'vae'
  assert main(['convert', 'vae', '--config=configs/tiny.py', '--src', sat_checkpoint, '--dst', str(dst)]) == 0
  assert 'wrote vae' in capsys.readouterr().out
  model, params = checkpoints.load(str(dst))
  assert isinstance(model, vae_model.CogVideoXVAE)
  jax.tree.map(np.testing.assert_array_equal, params, converted)
  assert main(['convert', 'vae', '--config=configs/tiny.py', '--src', sat_checkpoint, '--dst', str(dst)]) == 2
  assert 'already exists' in capsys.readouterr().err
  decoder_dir = tmp_path / 'vae-decoder'
  assert main(['convert', 'vae', '--config=configs/tiny.py', '--src', sat_checkpoint, '--dst', str(decoder_dir),
               '--decoder-only']) == 0
  model, params = checkpoints.load(str(decoder_dir))
  assert not model.with_encoder and set(params['params']) == {'decoder'}
  latents = random_latents(3, channels=4)
  np.testing.assert_allclose(np.asarray(vae_model.decode(model, params, latents)),
                             np.asarray(vae_model.decode(vae_model.build_vae(load_config('configs/tiny.py').vae),
                                                         converted, latents)), atol=1e-6)


def test_cli_reports_a_checkpoint_that_does_not_fit(sat_checkpoint, tmp_path, capsys):
  code = main(['convert', 'vae', '--config=configs/tiny.py', '--config.vae.num_res_blocks=2', '--src',
               sat_checkpoint, '--dst', str(tmp_path / 'bad')])
  assert code == 1
  assert 'missing' in capsys.readouterr().err
  assert not (tmp_path / 'bad').exists()


def test_bench_vae_runs_next_to_diffusers(tmp_path, capsys):
  import json
  out = tmp_path / 'bench.json'
  assert main(['bench', 'vae', '--config=configs/tiny.py', '--config.video.height=32', '--config.video.width=48',
               '--latent-frames', '3', '--repeats', '1', '--dtype', 'float32', '--out', str(out)]) == 0
  result = json.loads(out.read_text())
  assert result['landiff_jax']['output_shape'] == [1, 9, 32, 48, 3]
  assert result['diffusers']['median_s'] > 0 and result['speedup_vs_diffusers'] > 0
  assert json.loads(capsys.readouterr().out) == result
