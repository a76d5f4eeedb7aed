"""Reading official checkpoint files safely, and writing/reading landiff-jax model directories."""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from landiff_jax import checkpoints
from landiff_jax.convert import ConversionError, io


def _tensors():
  rng = np.random.default_rng(0)
  return {
      'a.weight': rng.standard_normal((3, 4)).astype(np.float32),
      'b.bias': rng.standard_normal((5,)).astype(np.float16),
      'c.count': np.arange(6, dtype=np.int64).reshape(2, 3),
  }


def _assert_same(got, expected):
  assert sorted(got) == sorted(expected)
  for name, value in expected.items():
    assert got[name].dtype == value.dtype, name
    np.testing.assert_array_equal(np.asarray(got[name]), value)


def test_safetensors_file_is_read_exactly(tmp_path):
  path = str(tmp_path / 'model.safetensors')
  safetensors.numpy.save_file(_tensors(), path)
  _assert_same(io.load_state_dict(path), _tensors())


def test_bf16_safetensors_stay_bf16_without_torch_at_read_time(tmp_path):
  path = str(tmp_path / 'model.safetensors')
  values = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
  safetensors.torch.save_file({'w': values}, path)
  got = io.load_state_dict(path)['w']
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), values.float().numpy())


def test_sharded_directory_follows_its_index(tmp_path):
  tensors = _tensors()
  safetensors.numpy.save_file({'a.weight': tensors['a.weight']}, str(tmp_path / 'model-00001-of-00002.safetensors'))
  safetensors.numpy.save_file({k: tensors[k] for k in ('b.bias', 'c.count')},
                              str(tmp_path / 'model-00002-of-00002.safetensors'))
  index = {'weight_map': {'a.weight': 'model-00001-of-00002.safetensors', 'b.bias': 'model-00002-of-00002.safetensors',
                          'c.count': 'model-00002-of-00002.safetensors'}}
  (tmp_path / 'model.safetensors.index.json').write_text(json.dumps(index))
  _assert_same(io.load_state_dict(str(tmp_path)), tensors)


def test_directory_without_weights_and_corrupt_files_are_rejected(tmp_path):
  with pytest.raises(ConversionError, match='0 .safetensors files and no index json'):
    io.load_state_dict(str(tmp_path))
  bad = tmp_path / 'bad.safetensors'
  bad.write_bytes(b'\xff' * 16)
  with pytest.raises(ConversionError, match='not a safetensors file'):
    io.load_state_dict(str(bad))
  with pytest.raises(ConversionError, match='does not exist'):
    io.load_state_dict(str(tmp_path / 'missing.pt'))
  with pytest.raises(ConversionError, match='unknown file type'):
    (tmp_path / 'weights.npz').write_bytes(b'')
    io.load_state_dict(str(tmp_path / 'weights.npz'))


@pytest.mark.parametrize('wrapper', ['state_dict', 'module', None])
def test_torch_checkpoints_are_unwrapped(tmp_path, wrapper):
  tensors = {name: torch.from_numpy(value) for name, value in _tensors().items()}
  tensors['d.bf16'] = torch.linspace(-2, 2, 6).to(torch.bfloat16)
  payload = tensors if wrapper is None else {wrapper: tensors, 'args': argparse.Namespace(lr=1e-4), 'step': 3}
  path = str(tmp_path / 'ckpt.pt')
  torch.save(payload, path)
  got = io.load_state_dict(path)
  assert got['d.bf16'].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got['d.bf16'].astype(np.float32), tensors['d.bf16'].float().numpy())
  _assert_same({k: v for k, v in got.items() if k != 'd.bf16'}, _tensors())


class _Exploit:
  """Unpickling this would create a marker file; a safe loader must refuse instead."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_unsafe_pickles_are_refused_not_executed(tmp_path):
  marker = str(tmp_path / 'executed')
  path = str(tmp_path / 'evil.pt')
  torch.save({'state_dict': {'w': torch.zeros(2)}, 'payload': _Exploit(marker)}, path)
  with pytest.raises(ConversionError, match='refusing to load'):
    io.load_state_dict(path)
  assert not os.path.exists(marker)


# --- model directories -------------------------------------------------------------------------------------


def build_toy(config, **kwargs):
  return ('toy-model', config.width, kwargs)


@pytest.fixture
def toy_part(monkeypatch):
  monkeypatch.setitem(checkpoints.MODEL_BUILDERS, 'toy', f'{__name__}:build_toy')
  return ml_collections.ConfigDict(dict(width=4, mult=(1, 2)))


def _params():
  return {'dense': {'kernel': jnp.arange(8.0).reshape(2, 4), 'bias': jnp.ones(4, jnp.bfloat16)}}


def test_part_config_is_the_sections_a_model_directory_stores():
  config = ml_collections.ConfigDict({name: {'width': i} for i, name in enumerate(('vae', 'dit', 'control', 'upsampler'))})
  renderer = checkpoints.part_config(config, 'dit')
  assert renderer.to_dict() == {'dit': {'width': 1}, 'control': {'width': 2}, 'upsampler': {'width': 3}}
  vae = checkpoints.part_config(config, 'vae')
  vae.width = 9  # a copy: the full config keeps its value
  assert config.vae.width == 0
  del config['upsampler']
  with pytest.raises(checkpoints.CheckpointError, match='no upsampler section, which a dit model directory needs'):
    checkpoints.part_config(config, 'dit')


def test_model_directory_round_trip(tmp_path, toy_part):
  dst = checkpoints.save(str(tmp_path / 'toy'), part='toy', config=toy_part, params=_params(), source='/x.pt')
  assert sorted(os.listdir(tmp_path)) == ['toy']  # no temporary directory left behind
  model, params = checkpoints.load(dst, dtype='bfloat16')
  assert model == ('toy-model', 4, {'dtype': 'bfloat16'})
  assert params['dense']['bias'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(params['dense']['kernel'], _params()['dense']['kernel'])
  assert checkpoints.read_meta(dst)['source'] == '/x.pt'


def test_model_directory_restores_into_requested_shardings(tmp_path, toy_part):
  dst = checkpoints.save(str(tmp_path / 'toy'), part='toy', config=toy_part, params=_params())
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ('fsdp',))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('fsdp'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = checkpoints.load_params(dst, shardings={'dense': {'kernel': split, 'bias': replicated}})
  assert params['dense']['kernel'].sharding == split
  np.testing.assert_array_equal(params['dense']['kernel'], _params()['dense']['kernel'])


def test_model_directory_is_never_overwritten_by_accident(tmp_path, toy_part):
  dst = str(tmp_path / 'toy')
  checkpoints.save(dst, part='toy', config=toy_part, params=_params())
  with pytest.raises(checkpoints.CheckpointError, match='already exists'):
    checkpoints.save(dst, part='toy', config=toy_part, params=_params())
  new = {'dense': {'kernel': jnp.zeros((2, 4)), 'bias': jnp.zeros(4, jnp.bfloat16)}}
  checkpoints.save(dst, part='toy', config=toy_part, params=new, overwrite=True)
  np.testing.assert_array_equal(checkpoints.load_params(dst)['dense']['kernel'], 0)
  assert sorted(os.listdir(tmp_path)) == ['toy']


def test_failed_save_leaves_nothing_that_looks_finished(tmp_path, toy_part):
  with pytest.raises(Exception):
    checkpoints.save(str(tmp_path / 'toy'), part='toy', config=toy_part, params={'bad': object()})
  assert os.listdir(tmp_path) == []


def test_reading_something_that_is_not_a_model_directory(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match='not a landiff-jax model directory'):
    checkpoints.load(str(tmp_path))
  with pytest.raises(checkpoints.CheckpointError, match='unknown model part'):
    checkpoints.save(str(tmp_path / 'x'), part='nope', config=ml_collections.ConfigDict(), params={})


def test_legacy_format_numpy_1x_names_and_damage(tmp_path):
  """torch's pre-zip format is read whole; globals numpy 1.x wrote (`numpy.core.…`) are the same allowlisted
  constructors; a file cut short is reported as truncated, not as unsafe."""
  path = tmp_path / 'legacy.pt'
  torch.save({'module': {'w': torch.ones(2)}, 'steps': np.arange(3), 'rng': np.random.RandomState(0).get_state(),
              'args': argparse.Namespace(lr=1e-4)}, path, _use_new_zipfile_serialization=False)
  data = path.read_bytes()
  assert b'numpy._core.multiarray' in data
  path.write_bytes(data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray'))  # as numpy 1.x pickles
  np.testing.assert_array_equal(io.load_state_dict(str(path))['w'], np.ones(2, np.float32))
  cut = tmp_path / 'cut.pt'
  cut.write_bytes(data[:-20])
  with pytest.raises(ConversionError, match='truncated or corrupt'):
    io.load_state_dict(str(cut))
  (tmp_path / 'cut.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"w"')
  with pytest.raises(ConversionError, match='truncated or corrupt'):
    io.load_state_dict(str(tmp_path / 'cut.safetensors'))


def test_deepspeed_folders_resolve_through_latest(tmp_path):
  (tmp_path / 'run' / 'global_step7').mkdir(parents=True)
  (tmp_path / 'run' / 'latest').write_text('global_step7')
  torch.save({'module': {'w': torch.zeros(2)}}, tmp_path / 'run' / 'global_step7' / 'mp_rank_00_model_states.pt')
  assert io.load_state_dict(str(tmp_path / 'run')).source.endswith('global_step7/mp_rank_00_model_states.pt')
  (tmp_path / 'run' / 'latest').write_text('global_step9')
  with pytest.raises(ConversionError, match='names the checkpoint'):
    io.load_state_dict(str(tmp_path / 'run'))
  torch.save({'module': {}}, tmp_path / 'run' / 'global_step7' / 'mp_rank_01_model_states.pt')
  with pytest.raises(ConversionError, match='2 model-parallel ranks'):
    io.load_state_dict(str(tmp_path / 'run' / 'global_step7'))
