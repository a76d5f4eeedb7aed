"""Video tokenizer: a random checkpoint in the official VideoVQ layout converts and matches a numpy restatement of
the release's encoder, quantizer and decoder written from the reference (masks, RoPE, blocks); grouping; errors."""

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from landiff_jax import checkpoints
from landiff_jax.cli import main
from landiff_jax.config import load_config
from landiff_jax.convert import ConversionError, io, notices
from landiff_jax.convert.tokenizer import convert_tokenizer
from landiff_jax.models import tokenizer as tok
from landiff_jax.parallel import strip_partitioning


@pytest.fixture(scope='module')
def cfg():
  return load_config('configs/tiny.py').tokenizer


def official_state_dict(cfg, seed=0):
  """Random tensors under the official names and shapes (reference §3.8), EMA buffers and normalisation included."""
  rng = np.random.default_rng(seed)
  w, c, ffn = cfg.width, cfg.feature_dim, cfg.decoder_ffn_dim
  mlp = int(w * cfg.mlp_ratio)
  k, d = cfg.quantizer.codebook_size, cfg.quantizer.codebook_dim
  r = lambda *shape, scale=0.3: (rng.standard_normal(shape) * scale).astype(np.float32)
  sd = {
      'encoder.patch_embed.weight': r(w, c, 1, 1), 'encoder.patch_embed.bias': r(w),
      'encoder.IFrame_latent_tokens': r(cfg.num_iframe_tokens, w, scale=1.0),
      'encoder.PFrame_latent_tokens': r(cfg.num_pframe_tokens, w, scale=1.0),
      'encoder.proj_out.weight': r(cfg.token_size, w), 'encoder.proj_out.bias': r(cfg.token_size),
      'decoder.decoder_embed.weight': r(w, cfg.token_size), 'decoder.decoder_embed.bias': r(w),
      'decoder.mask_token': r(1, 1, w, scale=1.0),
      'decoder.ffn.0.weight': r(ffn, w), 'decoder.ffn.0.bias': r(ffn),
      'decoder.ffn.2.weight': r(c, ffn), 'decoder.ffn.2.bias': r(c),
      'quantizer.project_in.weight': r(d, cfg.token_size), 'quantizer.project_in.bias': r(d),
      'quantizer.project_out.weight': r(cfg.token_size, d), 'quantizer.project_out.bias': r(cfg.token_size),
      'quantizer._codebook.embed': r(1, k, d, scale=1.0), 'quantizer._codebook.embed_avg': r(1, k, d),
      'quantizer._codebook.cluster_size': np.abs(r(1, k)), 'quantizer._codebook.initted': np.ones(1, np.float32),
      'mean': np.zeros(c, np.float32), 'std': np.ones(c, np.float32),
      'feature_extractor.model.backbone.model.embeddings.cls_token': r(1, 1, 8),
  }
  for part in ('encoder', 'decoder'):
    for name in ('ln_pre', 'ln_post'):
      sd[f'{part}.{name}.weight'], sd[f'{part}.{name}.bias'] = 1 + r(w), r(w)
    for i in range(cfg.num_layers):
      p = f'{part}.transformer.{i}.'
      for name in ('ln_1', 'ln_2'):
        sd[p + f'{name}.weight'], sd[p + f'{name}.bias'] = 1 + r(w), r(w)
      for name in ('wq', 'wk', 'wv', 'wo'):
        sd[p + f'attn.{name}.weight'] = r(w, w)
      sd[p + 'mlp.c_fc.weight'], sd[p + 'mlp.c_fc.bias'] = r(mlp, w), r(mlp)
      sd[p + 'mlp.c_proj.weight'], sd[p + 'mlp.c_proj.bias'] = r(w, mlp), r(w)
  return sd


# --- numpy restatement of the release (reference §3.3–3.6), reading the official names -------------------------


def np_layer_norm(x, sd, name, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * sd[f'{name}.weight'] + sd[f'{name}.bias']


def np_masks(frames, per_frame, num_i, num_p):
  """(encoder, decoder) boolean masks from the rules of reference §3.6."""
  v = frames * per_frame
  length = v + num_i + (frames - 1) * num_p
  enc = np.zeros((length, length), bool)
  dec = np.zeros((length, length), bool)
  k = np.arange(length)
  k_frame_visual = np.where(k < v, k // per_frame, 10**9)
  for q in range(length):
    if q < v:
      f = q // per_frame
      enc[q] = k_frame_visual <= f
      dec[q] = (k_frame_visual <= f) | ((k >= v) & (k < v + num_i + f * num_p))
    elif q < v + num_i:
      enc[q] = (k_frame_visual == 0) | ((k >= v) & (k < v + num_i) & (k <= q))
      dec[q] = (k_frame_visual == 0) | ((k >= v) & (k < v + num_i))
    else:
      g = 1 + (q - v - num_i) // num_p
      enc[q] = (k_frame_visual <= g) | ((k >= v) & (k <= q))
      dec[q] = (k_frame_visual <= g) | ((k >= v) & (k < v + num_i + g * num_p))
  return enc, dec


def np_rope(x, positions, theta):
  """Interleaved-pair rotation: pairs [t band D/8, h band 3D/16, w band 3D/16] complex numbers."""
  d = x.shape[-1]
  bands = [(0, d // 4), (1, 3 * d // 8), (2, 3 * d // 8)]
  angles = np.concatenate([positions[:, axis:axis + 1] * theta**(-np.arange(0, dims, 2) / dims)
                           for axis, dims in bands], axis=-1)
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)[:, None, :]
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = z.real, z.imag
  return out


def np_blocks(x, sd, prefix, cfg, mask, positions):
  heads, eps = cfg.num_heads, cfg.layer_norm_eps
  hd = cfg.width // heads
  for i in range(cfg.num_layers):
    p = f'{prefix}.transformer.{i}.'
    h = np_layer_norm(x, sd, p + 'ln_1', eps)
    q, k, v = (np.einsum('lc,oc->lo', h, sd[p + f'attn.{n}.weight']).reshape(-1, heads, hd) for n in ('wq', 'wk', 'wv'))
    q, k = np_rope(q, positions, cfg.rope.theta), np_rope(k, positions, cfg.rope.theta)
    scores = np.einsum('qhd,khd->hqk', q, k) / np.sqrt(hd)
    scores = np.where(mask[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum('hqk,khd->qhd', probs, v).reshape(-1, cfg.width)
    x = x + out @ sd[p + 'attn.wo.weight'].T
    h = np_layer_norm(x, sd, p + 'ln_2', eps) @ sd[p + 'mlp.c_fc.weight'].T + sd[p + 'mlp.c_fc.bias']
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    x = x + h @ sd[p + 'mlp.c_proj.weight'].T + sd[p + 'mlp.c_proj.bias']
  return x


def np_positions(frames, grid, num_latent):
  t, h, w = np.meshgrid(np.arange(frames), np.arange(grid[0]), np.arange(grid[1]), indexing='ij')
  visual = np.stack([t, h, w], -1).reshape(-1, 3)
  return np.concatenate([visual, np.repeat(np.arange(num_latent)[:, None], 3, 1)]).astype(np.float64)


def np_encode(sd, cfg, features):
  """One clip [T, h, w, C] → ids [N] as the release computes them."""
  frames = features.shape[0]
  per_frame = cfg.feature_grid[0] * cfg.feature_grid[1]
  num_i, num_p = cfg.num_iframe_tokens, cfg.num_pframe_tokens
  visual = features.reshape(-1, cfg.feature_dim) @ sd['encoder.patch_embed.weight'][:, :, 0, 0].T
  visual = visual + sd['encoder.patch_embed.bias']
  latents = np.concatenate([sd['encoder.IFrame_latent_tokens']] + [sd['encoder.PFrame_latent_tokens']] * (frames - 1))
  x = np_layer_norm(np.concatenate([visual, latents]), sd, 'encoder.ln_pre', cfg.layer_norm_eps)
  enc, _ = np_masks(frames, per_frame, num_i, num_p)
  x = np_blocks(x, sd, 'encoder', cfg, enc, np_positions(frames, cfg.feature_grid, len(latents)))
  z = np_layer_norm(x[frames * per_frame:], sd, 'encoder.ln_post', cfg.layer_norm_eps)
  z = z @ sd['encoder.proj_out.weight'].T + sd['encoder.proj_out.bias']
  projected = z @ sd['quantizer.project_in.weight'].T + sd['quantizer.project_in.bias']
  codebook = sd['quantizer._codebook.embed'][0]
  distances = ((projected[:, None, :] - codebook[None])**2).sum(-1)  # brute force
  return distances.argmin(-1)


def np_decode(sd, cfg, ids):
  per_frame = cfg.feature_grid[0] * cfg.feature_grid[1]
  num_i, num_p = cfg.num_iframe_tokens, cfg.num_pframe_tokens
  frames = 1 + (len(ids) - num_i) // num_p
  latents = sd['quantizer._codebook.embed'][0][ids] @ sd['quantizer.project_out.weight'].T
  latents = latents + sd['quantizer.project_out.bias']
  latents = latents @ sd['decoder.decoder_embed.weight'].T + sd['decoder.decoder_embed.bias']
  visual = np.repeat(sd['decoder.mask_token'].reshape(1, -1), frames * per_frame, 0)
  x = np_layer_norm(np.concatenate([visual, latents]), sd, 'decoder.ln_pre', cfg.layer_norm_eps)
  _, dec = np_masks(frames, per_frame, num_i, num_p)
  x = np_blocks(x, sd, 'decoder', cfg, dec, np_positions(frames, cfg.feature_grid, len(latents)))
  x = np_layer_norm(x[:frames * per_frame], sd, 'decoder.ln_post', cfg.layer_norm_eps)
  x = np.tanh(x @ sd['decoder.ffn.0.weight'].T + sd['decoder.ffn.0.bias'])
  x = x @ sd['decoder.ffn.2.weight'].T + sd['decoder.ffn.2.bias']
  return x.reshape(frames, *cfg.feature_grid, cfg.feature_dim)


# --- tests ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def official(cfg, tmp_path_factory):
  sd = official_state_dict(cfg)
  path = tmp_path_factory.mktemp('tokenizer') / 'model.safetensors'
  save_file(sd, str(path))
  return str(path), {k: v.astype(np.float64) for k, v in sd.items()}


@pytest.fixture(scope='module')
def converted(official, cfg):
  return convert_tokenizer(io.load_state_dict(official[0]), cfg)


@pytest.fixture(scope='module')
def model(cfg):
  return tok.build_tokenizer(cfg)


def random_features(cfg, frames, batch=2, seed=0):
  shape = (batch, frames, *cfg.feature_grid, cfg.feature_dim)
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_the_numpy_restatement_reproduces_the_documented_toy_masks():
  enc, dec = np_masks(3, 4, 3, 2)
  rows = lambda m: [''.join('1' if v else '0' for v in row) for row in m]
  assert rows(enc)[12:] == ['1111000000001000000', '1111000000001100000', '1111000000001110000',
                            '1111111100001111000', '1111111100001111100', '1111111111111111110',
                            '1111111111111111111']
  assert rows(dec)[:5] == ['1111000000001110000'] * 4 + ['1111111100001111100']


@pytest.mark.parametrize('frames', [1, 3])
def test_encode_and_decode_match_the_numpy_restatement(official, converted, model, cfg, frames):
  _, sd = official
  features = random_features(cfg, frames)
  ids = np.asarray(tok.encode_features(model, converted, features))
  assert ids.shape == (2, cfg.num_iframe_tokens + (frames - 1) * cfg.num_pframe_tokens)
  want = np.stack([np_encode(sd, cfg, f.astype(np.float64)) for f in features])
  np.testing.assert_array_equal(ids, want)
  decoded = np.asarray(tok.decode(model, converted, ids))
  assert decoded.shape == features.shape
  np.testing.assert_allclose(decoded, np.stack([np_decode(sd, cfg, row) for row in ids]), atol=1e-4, rtol=1e-4)


def test_masks_inside_the_model_are_frame_causal(converted, model, cfg):
  features = random_features(cfg, 3, batch=1)
  later = features.copy()
  later[:, 2] += 5.0  # change the last frame only
  ids, ids_later = (np.asarray(tok.encode_features(model, converted, f))[0] for f in (features, later))
  i, p = cfg.num_iframe_tokens, cfg.num_pframe_tokens
  np.testing.assert_array_equal(ids[:i + p], ids_later[:i + p])  # I tokens and P group 1 never see frame 2
  z = model.apply(converted, features, method=lambda m, f: m.encoder(f))
  z_later = model.apply(converted, later, method=lambda m, f: m.encoder(f))
  np.testing.assert_allclose(np.asarray(z[:, :i + p]), np.asarray(z_later[:, :i + p]), atol=1e-5)
  assert np.abs(np.asarray(z[:, i + p:]) - np.asarray(z_later[:, i + p:])).max() > 1e-3
  other_ids = ids.copy()
  other_ids[i + p:] = (other_ids[i + p:] + 1) % cfg.quantizer.codebook_size  # change P group 2
  out, out_other = (np.asarray(tok.decode(model, converted, x[None])) for x in (ids, other_ids))
  np.testing.assert_allclose(out[:, :2], out_other[:, :2], atol=1e-5)  # frames 0, 1 never see group 2
  assert np.abs(out[:, 2] - out_other[:, 2]).max() > 1e-3


def test_long_clips_are_split_into_independent_groups(converted, model, cfg):
  g = cfg.frames_per_group
  features = random_features(cfg, 2 * g + 1, batch=1, seed=3)
  ids = np.asarray(tok.encode_features(model, converted, features))
  per_group = cfg.num_iframe_tokens + (g - 1) * cfg.num_pframe_tokens
  assert ids.shape[1] == 2 * per_group + cfg.num_iframe_tokens == tok.num_tokens_for(model, 2 * g + 1)
  np.testing.assert_array_equal(ids[:, per_group:2 * per_group],
                                np.asarray(tok.encode_features(model, converted, features[:, g:2 * g])))
  assert tok.decode(model, converted, ids).shape == features.shape
  single = tok.encode_features(model, converted, features[:, :g + 1], grouping='single')
  assert single.shape[1] == cfg.num_iframe_tokens + g * cfg.num_pframe_tokens


def test_conversion_keeps_ema_state_and_lists_bad_keys(official, converted, cfg):
  assert converted['quantizer_ema']['embed_avg'].shape == (cfg.quantizer.codebook_size, cfg.quantizer.codebook_dim)
  init = jax.eval_shape(tok.build_tokenizer(cfg).init_params, jax.random.key(0))
  assert jax.tree.structure(strip_partitioning(init)['params']) == jax.tree.structure(converted['params'])
  sd = io.load_state_dict(official[0])
  del sd['decoder.transformer.1.attn.wo.weight']
  sd['encoder.extra'] = np.zeros(1, np.float32)
  sd['encoder.proj_out.bias'] = np.zeros(5, np.float32)
  with pytest.raises(ConversionError) as error:
    convert_tokenizer(sd, cfg)
  message = str(error.value)
  assert 'decoder.transformer.1.attn.wo.weight' in message and 'encoder.extra' in message
  assert 'encoder.proj_out.bias' in message
  sd = io.load_state_dict(official[0])
  sd['std'] = np.full_like(sd['std'], 2.0)
  with notices() as notes:  # the release never applies the buffers (issue 25): reported and dropped, not refused
    dropped = convert_tokenizer(sd, cfg)
  assert any('dropped the `std` buffer' in note for note in notes)
  jax.tree.map(np.testing.assert_array_equal, dropped, converted)


def test_bad_inputs_are_rejected(converted, model, cfg):
  with pytest.raises(ValueError, match='Theia output'):
    tok.encode_features(model, converted, np.zeros((1, 3, 5, 5, cfg.feature_dim), np.float32))
  with pytest.raises(ValueError, match='empty time axis'):
    tok.encode_features(model, converted, np.zeros((1, 0, *cfg.feature_grid, cfg.feature_dim), np.float32))
  with pytest.raises(ValueError, match=r'must be in \[0, 16\)'):
    tok.decode(model, converted, np.full((1, cfg.num_iframe_tokens), 16))
  with pytest.raises(ValueError, match='not a whole group'):
    tok.decode(model, converted, np.zeros((1, cfg.num_iframe_tokens + 1), np.int32))
  with pytest.raises(ValueError, match='integers'):
    tok.decode(model, converted, np.zeros((1, cfg.num_iframe_tokens), np.float32))


def test_cli_converts_the_official_file(official, converted, tmp_path):
  dst = tmp_path / 'tokenizer'
  assert main(['convert', 'tokenizer', '--config=configs/tiny.py', '--src', official[0], '--dst', str(dst)]) == 0
  model, params = checkpoints.load(str(dst))
  jax.tree.map(np.testing.assert_array_equal, params, converted)
  assert isinstance(model, tok.VideoTokenizer)


def test_bench_tokenizer_reports_every_backend(tmp_path):
  import json
  out = tmp_path / 'bench.json'
  assert main(['bench', 'tokenizer', '--config=configs/tiny.py', '--repeats', '1', '--dtype', 'float32', '--out',
               str(out)]) == 0
  backends = json.loads(out.read_text())['backends']
  assert backends['xla']['encode']['median_s'] > 0 and backends['xla']['tokens'] == 7
  assert set(backends) == {'xla', 'blockwise', 'cudnn', 'pallas', 'splash'}


def test_encode_and_decode_sharded_under_a_mesh_match_one_device(converted, model, cfg):
  """Parameters sharded by the logical rules over a (2, 2, 2) mesh and a batch split over data x fsdp give the
  same ids and features as one device."""
  from landiff_jax import parallel
  config = load_config('configs/tiny.py', ['parallel.mesh.data=2', 'parallel.mesh.fsdp=2', 'parallel.mesh.tensor=2'])
  mesh, rules = parallel.make_mesh(config.parallel.mesh), parallel.logical_rules(config.parallel)
  features = random_features(cfg, cfg.frames_per_group, batch=4, seed=9)
  want_ids = np.asarray(tok.encode_features(model, converted, features))
  want_features = np.asarray(tok.decode(model, converted, want_ids))
  with parallel.mesh_context(mesh, rules):
    boxed = jax.eval_shape(model.init_params, jax.random.key(0))
    shardings = parallel.param_shardings(boxed, mesh, rules)
    sharded = {'params': jax.device_put(converted['params'], shardings['params'])}
    assert len(sharded['params']['encoder']['transformer']['wq']['kernel'].sharding.device_set) == 8
    batch = jax.device_put(features, parallel.batch_sharding(mesh, rules, features.ndim))
    ids = tok.encode_features(model, sharded, batch)
    decoded = tok.decode(model, sharded, ids)
  np.testing.assert_array_equal(np.asarray(ids), want_ids)
  np.testing.assert_allclose(np.asarray(decoded), want_features, atol=1e-5)
