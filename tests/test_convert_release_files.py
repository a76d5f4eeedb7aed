"""Converting files saved the way the release's tools save them (issue 25): bf16/fp16 SAT engines with DeepSpeed
client state, DeepSpeed `latest` folders, bf16 and sharded safetensors, tokenizer buffers and the engine's tokenizer
copy, extra keys where the release is lenient or strict; each compared with the same model converted from the clean
file. Damaged and unsafe files and config mismatches fail with one line."""

import argparse
import collections
import json
import os
import random

import jax
import ml_dtypes
import numpy as np
import pytest

from landiff_jax import checkpoints
from landiff_jax.cli import main
from landiff_jax.config import load_config
from landiff_jax.convert import ConversionError, common, io, notices, release
from landiff_jax.convert.dit import convert_dit
from landiff_jax.convert.lm import convert_lm
from landiff_jax.convert.tokenizer import convert_tokenizer
from landiff_jax.convert.vae import convert_vae
from landiff_jax.models import tokenizer as tok

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
safetensors_torch = pytest.importorskip('safetensors.torch')

from test_convert_io import _Exploit  # noqa: E402  (tests dir is on sys.path)
from test_convert_memory import _vae_tensors  # noqa: E402
from test_dit import TorchSemanticCond, make_reference, to_sat  # noqa: E402
from test_lm import official_state_dict as lm_state_dict  # noqa: E402
from test_tokenizer import official_state_dict as tokenizer_state_dict  # noqa: E402
from test_vae import diffusers_to_sat_name  # noqa: E402

CONTROL = 'model.control_model.diffusion_model.'
COPY = CONTROL + 'semantic_conditioner.semantic_model.model.'
TINY = '--config=configs/tiny.py'


@pytest.fixture(scope='module')
def cfg():
  return load_config('configs/tiny.py')


@pytest.fixture(scope='module')
def engine(cfg):
  """The LanDiff engine's `module` dict (fp32 torch tensors) without a tokenizer copy."""
  backbone = make_reference(cfg, cfg.dit.num_layers, seed=0)
  control = make_reference(cfg, cfg.control.num_layers, seed=1)
  module = {**to_sat(backbone, 'model.main_model.diffusion_model.'),
            **{k: v for k, v in to_sat(control, CONTROL).items() if 'final_layer' not in k}}
  torch.manual_seed(2)
  for l in range(cfg.control.num_layers):
    module[f'{CONTROL}mixins.adaln_layer.zero_linears.{l}.weight'] = torch.randn(cfg.dit.hidden_size,
                                                                                  cfg.dit.hidden_size) * 0.2
  for name, value in TorchSemanticCond(cfg.upsampler).state_dict().items():
    module[f'{CONTROL}semantic_conditioner.{name}'] = value
  return module


@pytest.fixture(scope='module')
def tokenizer_file(cfg, tmp_path_factory):
  """(path, tensors) of a clean tokenizer/model.safetensors (identity mean/std)."""
  sd = tokenizer_state_dict(cfg.tokenizer)
  path = str(tmp_path_factory.mktemp('tokenizer') / 'model.safetensors')
  safetensors_torch.save_file({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  return path, sd


@pytest.fixture(scope='module')
def clean(engine, cfg, tmp_path_factory):
  """(path, params) of the engine saved plainly in fp32, converted."""
  path = str(tmp_path_factory.mktemp('clean') / 'engine.pt')
  torch.save({'module': engine}, path)
  return path, convert_dit(io.load_state_dict(path), cfg)


def deepspeed_payload(module, dtype):
  """What SAT's DeepSpeed engine saves: the module in the training dtype next to optimizer and client state."""
  names = list(module)
  return {
      'module': {k: v.to(dtype) for k, v in module.items()},
      'buffer_names': [], 'param_shapes': [collections.OrderedDict((k, module[k].shape) for k in names[:3])],
      'optimizer': {'state': {0: {'step': torch.tensor(1000.0), 'exp_avg': torch.zeros(4)}},
                    'param_groups': [{'lr': 1e-4, 'betas': (0.9, 0.95), 'params': [0]}]},
      'lr_scheduler': {'last_epoch': 1000, '_last_lr': [1e-4]}, 'global_steps': 1000, 'ds_version': '0.14.4',
      'iteration': 1000, 'args': argparse.Namespace(lr=1e-4, mode='finetune', load=None),
      'np_rng_state': np.random.RandomState(0).get_state(), 'rng_state': random.Random(0).getstate(),
      'torch_rng_state': torch.get_rng_state(), 'numpy_generator': np.random.default_rng(0),
      'client_state': collections.defaultdict(list, losses=[np.float32(0.5)]), 'np_array': np.arange(3.0),
  }


def rounded(tree, dtype):
  return jax.tree.map(lambda a: np.asarray(a).astype(dtype).astype(np.float32), tree)


def assert_same(got, expected):
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b), got, expected)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_deepspeed_engine_in_training_dtype_converts_to_the_clean_model_rounded(engine, clean, cfg, tmp_path, dtype):
  path = str(tmp_path / 'mp_rank_00_model_states.pt')
  torch.save(deepspeed_payload(engine, getattr(torch, dtype)), path)
  with notices() as notes:
    params = convert_dit(io.load_state_dict(path), cfg)
  assert not [n for n in notes if 'pos_embedding' in n]  # a table rounded to its dtype is not even reported
  assert_same(params, rounded(clean[1], ml_dtypes.bfloat16 if dtype == 'bfloat16' else np.float16))


def test_deepspeed_folder_with_latest_converts_and_stores_the_asked_dtype(engine, clean, tmp_path, capsys):
  folder = tmp_path / 'diffusion'
  (folder / 'iter_1000').mkdir(parents=True)
  (folder / 'latest').write_text('iter_1000\n')
  torch.save(deepspeed_payload(engine, torch.bfloat16), folder / 'iter_1000' / 'mp_rank_00_model_states.pt')
  dst = tmp_path / 'dit'
  assert main(['convert', 'dit', TINY, '--src', str(folder), '--dst', str(dst), '--dtype', 'bfloat16']) == 0
  assert 'iter_1000/mp_rank_00_model_states.pt' in capsys.readouterr().out
  _, params = checkpoints.load(str(dst))
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
  assert_same(params, rounded(clean[1], ml_dtypes.bfloat16))
  default = tmp_path / 'dit-default'  # the tiny config's storage_dtype is float32: the source's values kept exactly
  assert main(['convert', 'dit', TINY, '--src', str(folder), '--dst', str(default)]) == 0
  _, params = checkpoints.load(str(default))
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  assert_same(params, rounded(clean[1], ml_dtypes.bfloat16))


def test_lm_safetensors_in_bf16_and_sharded_with_an_index(cfg, tmp_path):
  sd = {k: torch.from_numpy(v) for k, v in lm_state_dict(cfg.lm).items()}
  clean = convert_lm({k: v.numpy() for k, v in sd.items()}, cfg.lm)
  safetensors_torch.save_file({k: v.bfloat16() for k, v in sd.items()}, str(tmp_path / 'model.safetensors'))
  assert_same(convert_lm(io.load_state_dict(str(tmp_path / 'model.safetensors')), cfg.lm),
              rounded(clean, ml_dtypes.bfloat16))
  sharded = tmp_path / 'sharded'
  sharded.mkdir()
  names = sorted(sd)
  weight_map = {}
  for i, chunk in enumerate((names[::2], names[1::2])):
    shard = f'model-0000{i + 1}-of-00002.safetensors'
    safetensors_torch.save_file({k: sd[k] for k in chunk}, str(sharded / shard))
    weight_map.update({k: shard for k in chunk})
  (sharded / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  assert_same(convert_lm(io.load_state_dict(str(sharded)), cfg.lm), clean)


def test_tokenizer_buffers_are_reported_and_never_applied(tokenizer_file, cfg, tmp_path):
  path, sd = tokenizer_file
  clean = convert_tokenizer(io.load_state_dict(path), cfg.tokenizer)
  rng = np.random.default_rng(1)
  shifted = {**sd, 'mean': rng.standard_normal(sd['mean'].shape).astype(np.float32),
             'std': rng.uniform(0.5, 2.0, sd['std'].shape).astype(np.float32)}
  safetensors_torch.save_file({k: torch.from_numpy(v) for k, v in shifted.items()}, str(tmp_path / 'm.safetensors'))
  with notices() as notes:
    params = convert_tokenizer(io.load_state_dict(str(tmp_path / 'm.safetensors')), cfg.tokenizer)
  assert sum('dropped the `mean`' in n or 'dropped the `std`' in n for n in notes) == 2
  assert_same(params, clean)
  model = tok.build_tokenizer(cfg.tokenizer)
  features = np.random.default_rng(0).standard_normal((1, 1, *cfg.tokenizer.feature_grid, cfg.tokenizer.feature_dim))
  ids = tok.encode_features(model, params, features.astype(np.float32))
  np.testing.assert_array_equal(ids, tok.encode_features(model, clean, features.astype(np.float32)))
  np.testing.assert_array_equal(tok.decode(model, params, ids), tok.decode(model, clean, ids))


def test_engine_tokenizer_copy_takes_precedence_and_is_compared(engine, tokenizer_file, cfg, tmp_path):
  path, sd = tokenizer_file
  base = io.load_state_dict(path)
  clean = convert_tokenizer(base, cfg.tokenizer)
  without = str(tmp_path / 'without.pt')
  torch.save({'module': engine}, without)
  with notices() as notes:
    assert_same(convert_tokenizer(io.load_state_dict(without), cfg.tokenizer, base_state_dict=base), clean)
  assert any('holds no tokenizer copy' in n for n in notes)
  same = str(tmp_path / 'same.pt')
  torch.save({'module': {**engine, **{COPY + k: torch.from_numpy(v) for k, v in sd.items()}}}, same)
  with notices() as notes:
    assert_same(convert_tokenizer(io.load_state_dict(same), cfg.tokenizer, base_state_dict=base), clean)
  assert any('the engine copy' in n and 'are identical' in n for n in notes)
  bf16 = str(tmp_path / 'bf16.pt')  # a bf16 engine holds the same weights, rounded
  torch.save({'module': {**engine, **{COPY + k: torch.from_numpy(v).bfloat16() for k, v in sd.items()}}}, bf16)
  with notices() as notes:
    assert_same(convert_tokenizer(io.load_state_dict(bf16), cfg.tokenizer, base_state_dict=base),
                rounded(clean, ml_dtypes.bfloat16))
  assert any('same up to the rounding of the copy\'s bfloat16 storage' in n for n in notes), notes
  # the engine was saved in bf16 and was fine-tuned a little: its copy is what the release decodes with
  tuned = {k: torch.from_numpy(v).bfloat16() for k, v in sd.items()}
  tuned['decoder.ffn.2.bias'] = tuned['decoder.ffn.2.bias'] + 0.5
  differing = str(tmp_path / 'differing.pt')
  torch.save({'module': {**engine, **{COPY + k: v for k, v in tuned.items()}}}, differing)
  with notices() as notes:
    params = convert_tokenizer(io.load_state_dict(differing), cfg.tokenizer, base_state_dict=base)
  (note,) = [n for n in notes if 'the engine copy' in n]
  assert 'took' in note and 'differ, by up to' in note and 'decoder.ffn.2.bias' in note
  expected = convert_tokenizer({k: v.float().numpy() for k, v in tuned.items()}, cfg.tokenizer)
  assert_same(params, expected)
  with notices() as notes:  # the DiT conversion of the same engine leaves the copy to the tokenizer, and says so
    convert_dit(io.load_state_dict(differing), cfg)
  assert any('tokenizer copy' in n and 'convert tokenizer' in n for n in notes)


def test_an_engine_copy_of_the_vae_wins_over_3d_vae_pt(cfg, tmp_path, capsys):
  sat = {diffusers_to_sat_name(k, len(cfg.vae.channel_mult)): v for k, v in _vae_tensors(cfg.vae).items()}
  torch.save({'state_dict': sat}, tmp_path / '3d-vae.pt')
  name = 'decoder.conv_out.conv.bias'
  tuned = {**sat, name: sat[name] + 1.0}
  torch.save({'module': {'first_stage_model.' + name: tuned[name].bfloat16()}}, tmp_path / 'engine.pt')
  with notices() as notes:
    params, _ = release.convert_part('vae', {'src': str(tmp_path / '3d-vae.pt'), 'engine': str(tmp_path / 'engine.pt')},
                                     cfg)
  (note,) = notes
  assert 'took 1 tensors from the engine copy' in note and f'differ, by up to 1 ({name})' in note
  expected = convert_vae({k: v.numpy() for k, v in tuned.items()}, cfg.vae)
  expected['params']['decoder']['conv_out']['bias'] = rounded(expected['params']['decoder']['conv_out']['bias'],
                                                              ml_dtypes.bfloat16)
  assert_same(params, expected)
  dst = tmp_path / 'vae'  # the same from the command line: --src the engine, --base the part's own file
  assert main(['convert', 'vae', TINY, '--src', str(tmp_path / 'engine.pt'), '--base', str(tmp_path / '3d-vae.pt'),
               '--dst', str(dst)]) == 0
  assert 'note: vae: took 1 tensors' in capsys.readouterr().out
  assert_same(checkpoints.load_params(str(dst)), expected)


def test_extra_keys_are_listed_where_the_release_is_lenient_and_refused_where_strict(engine, clean, tokenizer_file,
                                                                                      cfg, tmp_path):
  extra = {f'{CONTROL}mixins.lora_layer.{i}.weight': torch.zeros(2) for i in range(2)}
  extra['model.main_model.diffusion_model.mixins.extra.bias'] = torch.zeros(3)
  path = str(tmp_path / 'engine-extra.pt')
  torch.save({'module': {**engine, **extra}}, path)
  with notices() as notes:
    assert_same(convert_dit(io.load_state_dict(path), cfg), clean[1])
  (note,) = [n for n in notes if 'ignored 3 tensor(s)' in n]
  assert all(name in note for name in extra) and 'strict=False' in note
  state = io.load_state_dict(tokenizer_file[0])
  state['encoder.adapter.weight'] = np.zeros(2, np.float32)
  with pytest.raises(ConversionError) as error:
    convert_tokenizer(state, cfg.tokenizer)
  assert '1 unexpected (encoder.adapter.weight)' in str(error.value) and 'strict=True' in str(error.value)
  assert '\n' not in str(error.value)


def test_a_position_table_that_is_merely_close_is_reported_not_fatal(engine, clean, cfg, tmp_path):
  name = 'model.main_model.diffusion_model.mixins.pos_embed.pos_embedding'
  path = str(tmp_path / 'close.pt')
  torch.save({'module': {**engine, name: engine[name] + 0.01}}, path)
  with notices() as notes:
    assert_same(convert_dit(io.load_state_dict(path), cfg), clean[1])
  assert any('pos_embedding' in n and 'close' in n for n in notes)


def test_unsafe_damaged_files_and_config_mismatches_fail_in_one_line(clean, cfg, tmp_path, capsys):
  def convert(*args):
    code = main(['convert', 'dit', TINY, '--dst', str(tmp_path / 'out'), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith('landiff-jax: error: '), err
    assert not (tmp_path / 'out').exists()
    return err[0]

  marker = str(tmp_path / 'executed')
  evil = str(tmp_path / 'evil.pt')
  torch.save({'module': {'w': torch.zeros(2)}, 'payload': _Exploit(marker)}, evil)
  assert 'refusing to load' in convert('--src', evil)
  assert not os.path.exists(marker)
  data = open(clean[0], 'rb').read()
  cut = tmp_path / 'cut.pt'
  cut.write_bytes(data[:len(data) * 2 // 3])
  assert 'truncated' in convert('--src', str(cut))
  tensors = tmp_path / 'cut.safetensors'
  safetensors_torch.save_file({'w': torch.zeros(1000)}, str(tensors))
  tensors.write_bytes(tensors.read_bytes()[:-100])
  assert 'truncated' in convert('--src', str(tensors))
  line = convert('--src', clean[0], '--config.dit.in_channels=8')
  assert 'upsampler.target_channels' in line and 'dit.in_channels' in line
  line = convert('--src', clean[0], '--config.dit.text_dim=12')
  assert '--config.dit.text_dim=24' in line
  assert main(['convert', 'dit', TINY, '--dst', str(tmp_path / 'out'), '--src', clean[0], '--config.dit.text_dim=12',
               '--verbose']) == 1
  err = capsys.readouterr().err
  assert 'wrong shape:' in err and 'Traceback' in err


def test_convert_all_stores_the_asked_dtype_and_reconverts_when_it_changes(cfg, tmp_path, monkeypatch):
  src = str(tmp_path / 'lm.safetensors')
  safetensors_torch.save_file({k: torch.from_numpy(v) for k, v in lm_state_dict(cfg.lm).items()}, src)
  monkeypatch.setattr(release, 'release_sources', lambda *args: {'lm': {'src': src}})
  dst = str(tmp_path / 'pipe')
  log = lambda message: None
  assert release.convert_release('unused', dst, cfg, dtype='bfloat16', log=log) == {'lm': 'converted'}
  params = checkpoints.load_params(os.path.join(dst, 'lm'))
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
  assert release.convert_release('unused', dst, cfg, dtype='bfloat16', log=log) == {'lm': 'unchanged'}
  assert release.convert_release('unused', dst, cfg, log=log) == {'lm': 'converted'}  # tiny: float32
  params = checkpoints.load_params(os.path.join(dst, 'lm'))
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  assert_same(params, convert_lm(io.load_state_dict(src), cfg.lm))


def test_storage_cast_touches_floating_parameters_only(tmp_path):
  spilled_dir = tmp_path / 'spill'
  spilled_dir.mkdir()
  with common.spilling(str(spilled_dir)):
    spilled = common.keep(np.linspace(-1, 1, 6, dtype=np.float32))
  tree = {'params': {'w': np.ones(3, np.float32), 'ids': np.arange(3), 'big': spilled},
          'quantizer_ema': {'cluster_size': np.full(2, 1e5, np.float32)}}
  out = common.cast_params(tree, 'bfloat16')
  assert out['params']['w'].dtype == ml_dtypes.bfloat16 and out['params']['ids'].dtype == np.int64
  assert out['params']['big'].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(np.asarray(out['params']['big']),
                                np.linspace(-1, 1, 6, dtype=np.float32).astype(ml_dtypes.bfloat16))
  assert out['quantizer_ema']['cluster_size'].dtype == np.float32
