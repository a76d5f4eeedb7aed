"""Theia (DeiT ViT) features: parity with transformers' ViTModel on non-square padded frames, PyTorch's bicubic
position interpolation, both key layouts, bad inputs."""

import re

import jax
import numpy as np
import pytest

from landiff_jax.config import load_config
from landiff_jax.convert import ConversionError
from landiff_jax.convert.theia import convert_theia
from landiff_jax.models import theia as theia_model
from landiff_jax.parallel import strip_partitioning

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


@pytest.fixture(scope='module')
def cfg():
  return load_config('configs/tiny.py').theia


@pytest.fixture(scope='module')
def reference(cfg):
  torch.manual_seed(0)
  config = transformers.ViTConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                                  num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
                                  image_size=cfg.patch_size * cfg.pretrained_grid, patch_size=cfg.patch_size,
                                  layer_norm_eps=cfg.layer_norm_eps, qkv_bias=True, hidden_act='gelu')
  model = transformers.ViTModel(config, add_pooling_layer=False).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if 'layernorm' in name and name.endswith('weight') else 0.0))
  return model


@pytest.fixture(scope='module')
def params(reference, cfg):
  return convert_theia({k: v.numpy() for k, v in reference.state_dict().items()}, cfg)


def to_4x_names(state_dict):
  """transformers 5.x ViT names → the 4.x names of LanDiff's checkpoint (reference §4)."""
  renames = [(r'layers\.(\d+)\.attention\.q_proj\.', r'encoder.layer.\1.attention.attention.query.'),
             (r'layers\.(\d+)\.attention\.k_proj\.', r'encoder.layer.\1.attention.attention.key.'),
             (r'layers\.(\d+)\.attention\.v_proj\.', r'encoder.layer.\1.attention.attention.value.'),
             (r'layers\.(\d+)\.attention\.o_proj\.', r'encoder.layer.\1.attention.output.dense.'),
             (r'layers\.(\d+)\.mlp\.fc1\.', r'encoder.layer.\1.intermediate.dense.'),
             (r'layers\.(\d+)\.mlp\.fc2\.', r'encoder.layer.\1.output.dense.'),
             (r'^layers\.(\d+)\.', r'encoder.layer.\1.')]
  out = {}
  for name, value in state_dict.items():
    for pattern, replacement in renames:
      name = re.sub(pattern, replacement, name)
    out[name] = value
  return out


@pytest.mark.parametrize('grid', [(2, 3), (3, 2), (2, 5)])
def test_features_match_vit_on_padded_non_square_frames(reference, params, cfg, grid):
  height, width = grid[0] * cfg.patch_size, grid[1] * cfg.patch_size
  frames = np.random.default_rng(height).integers(0, 256, (2, height, width, 3)).astype(np.uint8)
  side = max(height, width)
  padded = np.full((2, side, side, 3), 127, np.float32)
  padded[:, :height, :width] = frames
  pixels = torch.from_numpy((padded - 127.5) / 127.5).permute(0, 3, 1, 2)
  with torch.no_grad():
    hidden = reference(pixels, interpolate_pos_encoding=True).last_hidden_state[:, 1:].numpy()
  grid = side // cfg.patch_size
  want = hidden.reshape(2, grid, grid, -1)[:, :height // cfg.patch_size, :width // cfg.patch_size]
  got = np.asarray(theia_model.features(theia_model.build_theia(cfg), params, frames, micro_batch=4))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize('sizes', [(14, 45), (14, 30), (4, 3), (5, 9)])
def test_bicubic_matrix_equals_torch_interpolate(sizes):
  in_size, out_size = sizes
  table = np.random.default_rng(in_size).standard_normal((in_size, in_size, 3)).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.from_numpy(table).permute(2, 0, 1)[None], size=(out_size, out_size),
                                         mode='bicubic', align_corners=False)[0].permute(1, 2, 0).numpy()
  got = np.asarray(theia_model.resize_position_table(jax.numpy.asarray(table), out_size))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_4x_names_under_theias_prefix_convert_identically(reference, params, cfg):
  sd = {k: v.numpy() for k, v in reference.state_dict().items()}
  wrapped = {f'feature_extractor.model.backbone.model.{k}': v for k, v in to_4x_names(sd).items()}
  wrapped['feature_extractor.translator.x.weight'] = np.zeros(2, np.float32)  # outside the backbone: left alone
  wrapped['encoder.transformer.0.ln_1.weight'] = np.zeros(2, np.float32)  # the tokenizer's own tensors
  jax.tree.map(np.testing.assert_array_equal, convert_theia(wrapped, cfg), params)
  init = strip_partitioning(jax.eval_shape(theia_model.build_theia(cfg).init_params, jax.random.key(0)))
  assert jax.tree.structure(init) == jax.tree.structure(params)


def test_bad_keys_and_inputs(reference, params, cfg):
  sd = {k: v.numpy() for k, v in reference.state_dict().items()}
  del sd['layers.1.mlp.fc2.bias']
  sd['layers.0.mlp.fc1.weight'] = np.zeros((3, 3), np.float32)
  with pytest.raises(ConversionError) as error:
    convert_theia(sd, cfg)
  assert 'layers.1.mlp.fc2.bias' in str(error.value) and 'layers.0.mlp.fc1.weight' in str(error.value)
  model = theia_model.build_theia(cfg)
  with pytest.raises(ValueError, match='not a multiple of the patch size'):
    theia_model.features(model, params, np.zeros((1, cfg.patch_size + 2, cfg.patch_size, 3), np.uint8))
  with pytest.raises(ValueError, match='RGB'):
    theia_model.features(model, params, np.zeros((1, cfg.patch_size, cfg.patch_size, 4), np.uint8))
  with pytest.raises(ValueError, match='uint8'):
    theia_model.features(model, params, np.zeros((1, cfg.patch_size, cfg.patch_size, 3), np.int64))
