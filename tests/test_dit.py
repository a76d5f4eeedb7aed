"""CogVideoX-2B DiT and LanDiff's control branch: parity with diffusers through SAT checkpoints, conversion, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landiff_jax import checkpoints
from landiff_jax.cli import main
from landiff_jax.config import load_config
from landiff_jax.convert import ConversionError, io
from landiff_jax.convert.dit import convert_dit
from landiff_jax.models import dit as dit_model
from landiff_jax.parallel import strip_partitioning

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

BATCH = 2


@pytest.fixture(scope='module')
def cfg():
  return load_config('configs/tiny.py')


def make_reference(cfg, num_layers, seed):
  """A tiny diffusers CogVideoX transformer at SAT numerics (final norm eps 1e-6), every parameter randomised."""
  c = cfg.dit
  torch.manual_seed(seed)
  model = diffusers.CogVideoXTransformer3DModel(
      num_attention_heads=c.num_heads, attention_head_dim=c.head_dim, in_channels=c.in_channels,
      out_channels=c.out_channels, flip_sin_to_cos=True, freq_shift=0, time_embed_dim=c.time_embed_dim,
      text_embed_dim=c.text_dim, num_layers=num_layers, sample_width=c.latent_width, sample_height=c.latent_height,
      sample_frames=1 + 4 * (c.latent_frames - 1), patch_size=c.patch_size, temporal_compression_ratio=4,
      max_text_seq_length=c.text_length, activation_fn='gelu-approximate', timestep_activation_fn='silu',
      norm_elementwise_affine=True, norm_eps=c.layer_norm_eps, spatial_interpolation_scale=c.spatial_interpolation,
      temporal_interpolation_scale=c.temporal_interpolation, use_rotary_positional_embeddings=False).eval()
  model.norm_out.norm.eps = c.final_norm_eps
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith(('norm.weight', 'norm_q.weight', 'norm_k.weight'))
                                             else 0.0))
  return model


def to_sat(model, prefix):
  """diffusers names → SAT names (inverse of cogvideox-theia-t5.md §1.5), with the 12-way adaLN re-interleaved."""
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  out = {}
  simple = {
      'time_embedding.linear_1': 'time_embed.0', 'time_embedding.linear_2': 'time_embed.2',
      'patch_embed.proj': 'mixins.patch_embed.proj', 'patch_embed.text_proj': 'mixins.patch_embed.text_proj',
      'norm_final': 'transformer.final_layernorm', 'norm_out.norm': 'mixins.final_layer.norm_final',
      'norm_out.linear': 'mixins.final_layer.adaLN_modulation.1', 'proj_out': 'mixins.final_layer.linear',
  }
  for name, sat in simple.items():
    for kind in ('weight', 'bias'):
      if f'{name}.{kind}' in sd:
        out[f'{sat}.{kind}'] = sd[f'{name}.{kind}']
  for l in range(len(model.transformer_blocks)):
    b, t = f'transformer_blocks.{l}.', f'transformer.layers.{l}.'
    for kind in ('weight', 'bias'):
      n1, n2 = sd[f'{b}norm1.linear.{kind}'].chunk(6), sd[f'{b}norm2.linear.{kind}'].chunk(6)
      out[f'mixins.adaln_layer.adaLN_modulations.{l}.1.{kind}'] = torch.cat(n1[:3] + n2[:3] + n1[3:] + n2[3:])
      out[f'{t}input_layernorm.{kind}'] = sd[f'{b}norm1.norm.{kind}']
      out[f'{t}post_attention_layernorm.{kind}'] = sd[f'{b}norm2.norm.{kind}']
      out[f'{t}attention.query_key_value.{kind}'] = torch.cat([sd[f'{b}attn1.to_{x}.{kind}'] for x in 'qkv'])
      out[f'{t}attention.dense.{kind}'] = sd[f'{b}attn1.to_out.0.{kind}']
      out[f'mixins.adaln_layer.query_layernorm_list.{l}.{kind}'] = sd[f'{b}attn1.norm_q.{kind}']
      out[f'mixins.adaln_layer.key_layernorm_list.{l}.{kind}'] = sd[f'{b}attn1.norm_k.{kind}']
      out[f'{t}mlp.dense_h_to_4h.{kind}'] = sd[f'{b}ff.net.0.proj.{kind}']
      out[f'{t}mlp.dense_4h_to_h.{kind}'] = sd[f'{b}ff.net.2.{kind}']
  out['mixins.pos_embed.pos_embedding'] = model.patch_embed.pos_embedding.detach().clone()
  return {prefix + k: v for k, v in out.items()}


class TorchResnetBlock(torch.nn.Module):
  def __init__(self, cin, cout, groups, eps):
    super().__init__()
    self.norm1, self.conv1 = torch.nn.GroupNorm(groups, cin, eps), torch.nn.Conv2d(cin, cout, 3, padding=1)
    self.norm2, self.conv2 = torch.nn.GroupNorm(groups, cout, eps), torch.nn.Conv2d(cout, cout, 3, padding=1)
    self.nin_shortcut = torch.nn.Conv2d(cin, cout, 1) if cin != cout else torch.nn.Identity()

  def forward(self, x):
    h = self.conv1(torch.nn.functional.silu(self.norm1(x)))
    h = self.conv2(torch.nn.functional.silu(self.norm2(h)))
    return self.nin_shortcut(x) + h


class TorchSemanticCond(torch.nn.Module):
  """The release's upsampler + conv_out (reference §5.5) restated with torch.nn layers, SAT parameter names."""

  def __init__(self, c):
    super().__init__()
    widths = [int(c.channels * m) for m in c.channel_mult]
    block = lambda cin, cout: TorchResnetBlock(cin, cout, c.num_groups, c.norm_eps)
    model = torch.nn.Module()
    model.conv_in = torch.nn.Conv2d(c.in_channels, widths[-1], 3, padding=1)
    model.mid = torch.nn.Module()
    model.mid.block_1, model.mid.block_2 = block(widths[-1], widths[-1]), block(widths[-1], widths[-1])
    model.up = torch.nn.ModuleList()
    for level, width in enumerate(widths):
      up = torch.nn.Module()
      cin = widths[level + 1] if level + 1 < len(widths) else widths[-1]
      up.block = torch.nn.ModuleList([block(cin if j == 0 else width, width) for j in range(c.num_res_blocks + 1)])
      if level:
        up.upsample = torch.nn.Module()
        up.upsample.conv = torch.nn.Conv2d(width // 4, width, 3, padding=1)
      model.up.append(up)
    model.norm_out = torch.nn.GroupNorm(c.num_groups, widths[0], c.norm_eps)
    model.conv_out = torch.nn.Conv2d(widths[0], c.out_channels, 3, padding=1)
    self.upsample_model = model
    self.conv_out = torch.nn.Conv2d(c.out_channels, c.target_channels, 3, padding=1)

  def forward(self, x):
    m = self.upsample_model
    h = m.mid.block_2(m.mid.block_1(m.conv_in(x)))
    for level in reversed(range(len(m.up))):
      for blk in m.up[level].block:
        h = blk(h)
      if level:
        h = m.up[level].upsample.conv(torch.nn.functional.pixel_shuffle(h, 2))
    return self.conv_out(m.conv_out(torch.nn.functional.silu(m.norm_out(h))))


@pytest.fixture(scope='module')
def semantic_reference(cfg):
  torch.manual_seed(3)
  model = TorchSemanticCond(cfg.upsampler).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if 'norm' in name and name.endswith('weight') else 0.0))
  return model


@pytest.fixture(scope='module')
def backbone(cfg):
  return make_reference(cfg, cfg.dit.num_layers, seed=0)


@pytest.fixture(scope='module')
def control_reference(cfg):
  model = make_reference(cfg, cfg.control.num_layers, seed=1)
  torch.manual_seed(2)
  d = cfg.dit.hidden_size
  zero_linears = [torch.randn(d, d) * 0.2 for _ in range(cfg.control.num_layers)]
  return model, zero_linears


@pytest.fixture(scope='module')
def files(backbone, control_reference, semantic_reference, cfg, tmp_path_factory):
  root = tmp_path_factory.mktemp('dit')
  base = root / 'cogvideox-2b.pt'
  torch.save({'module': to_sat(backbone, 'model.diffusion_model.')}, base)
  control, zero_linears = control_reference
  engine = {**to_sat(backbone, 'model.main_model.diffusion_model.'),
            **to_sat(control, 'model.control_model.diffusion_model.')}
  engine.pop('model.control_model.diffusion_model.mixins.final_layer.linear.weight')  # control has no final layer
  engine = {k: v for k, v in engine.items() if 'control_model' not in k or 'final_layer' not in k}
  for l, z in enumerate(zero_linears):
    engine[f'model.control_model.diffusion_model.mixins.adaln_layer.zero_linears.{l}.weight'] = z
  for name, value in semantic_reference.state_dict().items():
    engine[f'model.control_model.diffusion_model.semantic_conditioner.{name}'] = value
  engine['model.control_model.diffusion_model.semantic_conditioner.semantic_model.model.encoder.x'] = torch.zeros(1)
  engine['model.first_stage_model.decoder.conv_in.conv.weight'] = torch.zeros(1)
  landiff = root / 'landiff.pt'
  torch.save({'module': engine}, landiff)
  return str(base), str(landiff)


def inputs(cfg, seed=0):
  c = cfg.dit
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((BATCH, c.latent_frames, c.latent_height, c.latent_width, c.in_channels))
  text = rng.standard_normal((BATCH, c.text_length, c.text_dim))
  condition = rng.standard_normal(latents.shape[1:])
  return (latents.astype(np.float32), np.array([3.0, 812.0], np.float32), text.astype(np.float32),
          condition.astype(np.float32))


def torch_latents(x):  # [B, T, H, W, C] → diffusers' [B, T, C, H, W]
  return torch.from_numpy(np.asarray(x)).permute(0, 1, 4, 2, 3)


def from_torch_latents(x):
  return x.permute(0, 1, 3, 4, 2).numpy()


def torch_controlled_forward(main_model, control_model, zero_linears, latents, t, text, condition):
  """LanDiff's control composition (reference §5.4) written with diffusers blocks."""
  n = text.shape[1]

  def embed(model, x):
    emb = model.time_embedding(model.time_proj(t))
    h = model.patch_embed(text, x)
    return h[:, :n], h[:, n:], emb

  residuals = []
  txt, vid, emb = embed(control_model, latents + condition)
  for block, z in zip(control_model.transformer_blocks, zero_linears):
    vid, txt = block(hidden_states=vid, encoder_hidden_states=txt, temb=emb)
    full = torch.cat([txt, vid], dim=1) @ z.T
    residuals.append(full)
    txt, vid = full[:, :n], full[:, n:]
  txt, vid, emb = embed(main_model, latents)
  for l, block in enumerate(main_model.transformer_blocks):
    vid, txt = block(hidden_states=vid, encoder_hidden_states=txt, temb=emb)
    if l < len(residuals):
      full = torch.cat([txt, vid], dim=1) + residuals[l]
      txt, vid = full[:, :n], full[:, n:]
  vid = main_model.proj_out(main_model.norm_out(main_model.norm_final(vid), temb=emb))
  b, f, c, height, width = latents.shape
  p = main_model.config.patch_size
  out = vid.reshape(b, f, height // p, width // p, -1, p, p)
  return out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)


def test_backbone_from_sat_checkpoint_matches_diffusers(backbone, files, cfg):
  params = convert_dit(io.load_state_dict(files[0]), cfg)
  model = dit_model.build_dit(cfg)
  latents, t, text, _ = inputs(cfg)
  with torch.no_grad():
    want = from_torch_latents(backbone(torch_latents(latents), torch.from_numpy(text), torch.from_numpy(t)).sample)
  got = np.asarray(model.apply(params, latents, t, text))
  assert got.shape == latents.shape
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_control_branch_matches_the_composition_of_diffusers_blocks(backbone, control_reference, files, cfg):
  params = convert_dit(io.load_state_dict(files[1]), cfg)
  model = dit_model.build_dit(cfg)
  latents, t, text, condition = inputs(cfg, seed=1)
  control, zero_linears = control_reference
  with torch.no_grad():
    want = from_torch_latents(torch_controlled_forward(
        backbone, control, zero_linears, torch_latents(latents), torch.from_numpy(t), torch.from_numpy(text),
        torch_latents(condition[None])))
  got = np.asarray(model.apply(params, latents, t, text, condition))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  without = np.asarray(model.apply(params, latents, t, text))
  assert np.abs(got - without).max() > 1e-2  # the control residuals matter


def test_semantic_upsampler_matches_the_torch_restatement(semantic_reference, files, cfg):
  params = convert_dit(io.load_state_dict(files[1]), cfg)
  model = dit_model.build_dit(cfg)
  features = np.random.default_rng(4).standard_normal((cfg.dit.latent_frames, 2, 3, cfg.upsampler.in_channels))
  features = features.astype(np.float32)
  with torch.no_grad():
    want = semantic_reference(torch.from_numpy(features).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  got = np.asarray(model.apply(params, features, method=dit_model.ControlledDiT.semantic_condition))
  assert got.shape == (cfg.dit.latent_frames, 4, 6, cfg.dit.in_channels)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_untrained_control_branch_copies_the_backbone_and_changes_nothing(files, cfg):
  params = convert_dit(io.load_state_dict(files[0]), cfg)
  p = params['params']
  n = cfg.control.num_layers
  jax.tree.map(lambda c, b: np.testing.assert_array_equal(c, b[:n]), p['control']['blocks']['block'],
               p['dit']['blocks']['block'])
  jax.tree.map(np.testing.assert_array_equal, p['control']['embed'], p['dit']['embed'])
  assert not np.any(p['control']['blocks']['zero_linear']['kernel'])
  model = dit_model.build_dit(cfg)
  latents, t, text, condition = inputs(cfg, seed=2)
  np.testing.assert_allclose(np.asarray(model.apply(params, latents, t, text, condition)),
                             np.asarray(model.apply(params, latents, t, text)), atol=1e-6)


def test_landiff_file_without_control_embeddings_falls_back_to_the_base(files, cfg):
  engine = io.load_state_dict(files[1])
  dropped = [k for k in engine if k.startswith('model.control_model.diffusion_model.time_embed.')]
  for k in dropped:
    del engine[k]
  assert dropped
  params = convert_dit(engine, cfg, base_state_dict=io.load_state_dict(files[0]))
  base = convert_dit(io.load_state_dict(files[0]), cfg)
  jax.tree.map(np.testing.assert_array_equal, params['params']['control']['embed']['time_embed'],
               base['params']['dit']['embed']['time_embed'])


def test_converted_tree_equals_the_initialised_tree(files, cfg):
  params = convert_dit(io.load_state_dict(files[1]), cfg)
  init = strip_partitioning(jax.eval_shape(dit_model.build_dit(cfg).init_params, jax.random.key(0)))
  assert jax.tree.structure(init) == jax.tree.structure(params)
  assert jax.tree.map(lambda a: a.shape, init) == jax.tree.map(np.shape, params)


def test_converter_errors_name_the_keys(files, cfg):
  state = io.load_state_dict(files[0])
  del state['model.diffusion_model.transformer.layers.1.mlp.dense_4h_to_h.bias']
  state['model.diffusion_model.mixins.extra.weight'] = np.zeros(2, np.float32)
  with pytest.raises(ConversionError) as error:
    convert_dit(state, cfg)
  assert 'transformer.layers.1.mlp.dense_4h_to_h.bias' in str(error.value)
  assert 'mixins.extra.weight' in str(error.value)
  state = io.load_state_dict(files[0])
  with pytest.raises(ConversionError, match='sin-cos table'):
    convert_dit(state, load_config('configs/tiny.py', ['dit.spatial_interpolation=1.0']))
  with pytest.raises(ConversionError, match='no DiT tensors'):
    convert_dit({'encoder.weight': np.zeros(1)}, cfg)


def test_bad_inputs_are_rejected(files, cfg):
  params = convert_dit(io.load_state_dict(files[0]), cfg)
  model = dit_model.build_dit(cfg)
  latents, t, text, _ = inputs(cfg)
  with pytest.raises(ValueError, match='multiples of the patch size 2'):
    model.apply(params, latents[:, :, :3], t, text)
  with pytest.raises(ValueError, match='padded to 8 tokens'):
    model.apply(params, latents, t, text[:, :5])
  with pytest.raises(ValueError, match='channels last'):
    model.apply(params, np.moveaxis(latents, -1, 2), t, text)


def test_cli_converts_the_landiff_checkpoint(files, cfg, tmp_path):
  dst = tmp_path / 'dit'
  assert main(['convert', 'landiff-diffusion', '--config=configs/tiny.py', '--src', files[1], '--base', files[0],
               '--dst', str(dst)]) == 0
  model, params = checkpoints.load(str(dst))
  expected = convert_dit(io.load_state_dict(files[1]), cfg)
  jax.tree.map(np.testing.assert_array_equal, params, expected)
  latents, t, text, condition = inputs(cfg)
  out = model.apply(params, jnp.asarray(latents), jnp.asarray(t), jnp.asarray(text), jnp.asarray(condition))
  assert out.shape == latents.shape


def test_bench_dit_times_backbone_and_control_next_to_diffusers(tmp_path):
  import json
  out = tmp_path / 'bench.json'
  assert main(['bench', 'dit', '--config=configs/tiny.py', '--repeats', '1', '--dtype', 'float32', '--out',
               str(out)]) == 0
  result = json.loads(out.read_text())
  assert result['tokens'] == 8 + 3 * 2 * 3 and result['batch'] == 2
  assert result['landiff_jax']['backbone_and_control']['median_s'] > 0
  assert result['diffusers']['backbone']['median_s'] > 0 and result['backbone_speedup_vs_diffusers'] > 0
