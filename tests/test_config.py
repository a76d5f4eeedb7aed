import subprocess
import sys

import ml_collections
import pytest

from landiff_jax import cli
from landiff_jax import config as config_lib

CONFIGS = ['landiff_official', 'tiny', 'shapes_demo']


def key_paths(config, prefix=''):
  paths = set()
  for key, value in config.items():
    path = f'{prefix}{key}'
    paths.add(path)
    if isinstance(value, ml_collections.ConfigDict):
      paths |= key_paths(value, path + '.')
  return paths


@pytest.mark.parametrize('name', ['tiny', 'shapes_demo'])
def test_small_configs_have_exactly_the_official_structure(name):
  official = config_lib.load_config('landiff_official')
  small = config_lib.load_config(name)
  assert key_paths(official) == key_paths(small)
  assert small.lm.hidden_size < official.lm.hidden_size


def test_demo_stages_apply_their_settings():
  vae = config_lib.load_config('configs/train.py:vae,demo')
  assert vae.video.num_frames == 9 and vae.train.batch_size == 2 and vae.vae.channels == 8
  lm = config_lib.load_config('configs/train.py:lm,demo')
  assert lm.video.num_frames == 49 and lm.train.num_steps == 1500 and lm.name == 'train_lm_demo'
  # a phase of a task's training (TASK_PHASE) takes that task's frozen set and the phase's own settings
  frames = config_lib.load_config('configs/train.py:vae_frames,demo')
  assert frames.video.num_frames == 1 and frames.train.batch_size == 8 and frames.train.frozen == []
  assert config_lib.load_config('configs/train.py:vae_frames,tiny').video.num_frames == 1
  for bad in ('vae_clips,demo', 'vae_frames', 'unet,demo'):
    with pytest.raises(config_lib.ConfigError, match='STAGES are|STAGE one of'):
      config_lib.load_config(f'configs/train.py:{bad}')


def test_official_numbers_match_the_reference():
  c = config_lib.load_config('configs/landiff_official.py')
  # reference §3.1, §3.7: 330 I-frame + 12 x 74 P-frame tokens = 1218 for a 13-frame group
  assert c.tokenizer.num_iframe_tokens + 12 * c.tokenizer.num_pframe_tokens == 1218
  assert c.tokenizer.feature_grid == (30, 45)
  assert c.tokenizer.quantizer.codebook_size == 2048 and c.tokenizer.quantizer.codebook_dim == 16
  assert c.tokenizer.quantizer.ema_decay == 0.8
  # §4.1, §4.2
  assert (c.lm.num_layers, c.lm.hidden_size, c.lm.num_heads, c.lm.mlp_dim) == (24, 2048, 16, 11008)
  assert c.lm.special_ids.to_dict() == dict(eos=2048, bos=2049, soi=2050, eoi=2051, sop=2052, eop=2053, pad=2054)
  assert c.lm.sampling.cfg_scale == 7.5 and c.lm.sampling.motion_score == 0.1
  # §5.3, §5.4, §5.6-5.8, §6
  assert (c.dit.num_layers, c.dit.hidden_size, c.dit.num_heads, c.dit.text_length) == (30, 1920, 30, 226)
  assert (c.dit.layer_norm_eps, c.dit.qk_norm_eps, c.dit.final_norm_eps) == (1e-5, 1e-6, 1e-6)
  assert c.dit.spatial_interpolation == 1.875
  assert c.control.num_layers == 15
  assert (c.diffusion.num_steps, c.diffusion.snr_shift_scale, c.diffusion.cfg_scale) == (50, 3.0, 6.0)
  assert c.vae.scaling_factor == 1.15258426 and c.vae.channel_mult == (1, 2, 2, 4)
  assert (c.video.height, c.video.width, c.video.num_frames, c.video.fps) == (480, 720, 49, 8)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_is_internally_consistent(name):
  c = config_lib.load_config(name)
  assert c.lm.vocab_size == c.lm.codebook_size + 7
  assert sorted(c.lm.special_ids.values()) == list(range(c.lm.codebook_size, c.lm.vocab_size))
  assert c.lm.hidden_size == c.lm.num_heads * c.lm.head_dim
  assert c.dit.hidden_size == c.dit.num_heads * c.dit.head_dim
  assert c.tokenizer.width % c.tokenizer.num_heads == 0
  assert c.lm.text_mlp_dims[0] == c.lm.text_feature_dim and c.lm.text_mlp_dims[-1] == c.lm.hidden_size
  assert c.dit.text_dim == c.t5_dit.d_model and c.lm.text_feature_dim == c.t5_lm.d_model
  assert c.control.num_layers <= c.dit.num_layers
  assert c.upsampler.target_channels == c.dit.in_channels == c.vae.latent_channels
  assert c.upsampler.in_channels == c.tokenizer.feature_dim
  assert c.video.num_frames == 1 + c.vae.temporal_compression * (c.dit.latent_frames - 1)
  # semantic frame i conditions latent frame i, upsampled 2x in space to the latent grid
  assert c.tokenizer.frames_per_group == c.dit.latent_frames
  assert tuple(2 * g for g in c.tokenizer.feature_grid) == (c.dit.latent_height, c.dit.latent_width)
  assert (c.dit.latent_height * c.vae.spatial_compression, c.dit.latent_width * c.vae.spatial_compression) == (
      c.video.height, c.video.width)
  assert c.t5_dit.max_length == c.dit.text_length
  assert (c.video.height // c.theia.patch_size, c.video.width // c.theia.patch_size) == tuple(c.tokenizer.feature_grid)
  assert tuple(c.theia.output_grid) == tuple(c.tokenizer.feature_grid) and c.theia.hidden_size == c.tokenizer.feature_dim


def test_overrides_are_parsed_as_the_type_they_replace():
  c = config_lib.load_config('tiny', [
      'lm.num_layers=5', 'train.learning_rate=3e-4', 'train.shuffle=false', 'tokenizer.feature_grid=(4, 6)',
      'train.frozen=["backbone/.*"]', 'name=other', 'parallel.mesh.data=2', 'lm.sampling.top_p=0.9'
  ])
  assert c.lm.num_layers == 5 and isinstance(c.lm.num_layers, int)
  assert c.train.learning_rate == 3e-4
  assert c.train.shuffle is False
  assert c.tokenizer.feature_grid == (4, 6)
  assert list(c.train.frozen) == ['backbone/.*']
  assert c.name == 'other'
  assert c.parallel.mesh.data == 2
  assert c.lm.sampling.top_p == 0.9


@pytest.mark.parametrize(
    'override, message',
    [
        ('lm.num_layer=2', "'num_layer' is not a key of lm. Did you mean 'lm.num_layers'? Valid keys there:"),
        ('nosuch.x=1', "'nosuch' is not a key of (top level)"),
        ('lm=3', "'lm' is a section, not a value"),
        ('lm.num_layers=two', 'expected an integer'),
        ('train.shuffle=maybe', 'expected a boolean'),
        ('lm.num_layers', 'has no value'),
        ('lm.num_layers.x=1', 'lm.num_layers is a value, not a section'),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
  with pytest.raises(config_lib.ConfigError, match=None) as info:
    config_lib.load_config('tiny', [override])
  assert message in str(info.value)


def test_unknown_key_error_lists_every_valid_key():
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.load_config('tiny', ['vae.chanels=3'])
  for key in config_lib.load_config('tiny').vae.keys():
    assert key in str(info.value)


def test_missing_config_file_lists_bundled_configs():
  with pytest.raises(config_lib.ConfigError, match='landiff_official.py, shapes_demo.py, tiny.py'):
    config_lib.load_config('configs/does_not_exist.py')


def test_cli_applies_overrides_and_reports_errors(capsys):
  assert cli.main(['config', '--config=configs/tiny.py', '--config.lm.num_layers=7', '--json']) == 0
  assert '"num_layers": 7' in capsys.readouterr().out
  assert cli.main(['config', '--config=tiny', '--config.lm.num_layers', '9']) == 0
  assert 'num_layers: 9' in capsys.readouterr().out
  assert cli.main(['config', '--config=tiny', '--config.lm.numlayers=7']) == 2
  assert "Did you mean 'lm.num_layers'" in capsys.readouterr().err


def test_cli_devices_builds_the_configured_mesh(capsys):
  assert cli.main(['devices', '--config=tiny', '--config.parallel.mesh.fsdp=2', '--config.parallel.mesh.tensor=2']) == 0
  out = capsys.readouterr().out
  assert '8 device(s)' in out and '"data": 2, "fsdp": 2, "tensor": 2' in out


def test_module_entry_point_runs():
  result = subprocess.run([sys.executable, '-m', 'landiff_jax', '--help'], capture_output=True, text=True, check=True)
  assert 'landiff-jax' in result.stdout and 'config' in result.stdout


def test_full_size_stages_carry_their_sharding_plan():
  for stage in ('tokenizer', 'lm', 'diffusion'):
    config = config_lib.load_config(f'configs/train.py:{stage}')
    assert dict(config.parallel.mesh) == {'data': 1, 'fsdp': -1, 'tensor': 1}
    assert config.remat_policy == 'nothing_saveable'
  tiny = config_lib.load_config('configs/train.py:lm,tiny')
  assert dict(tiny.parallel.mesh) == dict(config_lib.load_config('configs/tiny.py').parallel.mesh)
