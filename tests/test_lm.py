"""Semantic LM: official-layout conversion, a numpy restatement of the forward pass, KV-cache decoding, the jitted
sampler (layout, CFG, keys, batching of different prompt lengths), bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from landiff_jax import checkpoints
from landiff_jax.cli import main
from landiff_jax.config import load_config
from landiff_jax.convert import ConversionError, io
from landiff_jax.convert.lm import convert_lm
from landiff_jax.models import lm as lm_model
from landiff_jax.parallel import strip_partitioning
from landiff_jax.sampling import lm as lm_sampling


@pytest.fixture(scope='module')
def config():
  return load_config('configs/tiny.py')


def official_state_dict(c, seed=0):
  rng = np.random.default_rng(seed)
  r = lambda *shape, scale=0.2: (rng.standard_normal(shape) * scale).astype(np.float32)
  d, f, v = c.hidden_size, c.mlp_dim, c.vocab_size
  sd = {
      'transformer.layer_norm.weight': 1 + r(d), 'transformer.layer_norm.bias': r(d),
      'transformer.head.weight': r(v, d), 'visual_embedding_model.tok_emb_code.weight': r(v, d, scale=1.0),
      'cond_model.embeddings.fc0.weight': r(d, c.text_feature_dim), 'cond_model.embeddings.fc0.bias': r(d),
      'cond_model.embeddings.fc1.weight': r(d, d), 'cond_model.embeddings.fc1.bias': r(d),
      'cond_model.null_text_embedding': r(d, scale=1.0),
  }
  for key in c.micro_conditions:
    sd[f'micro_condition.mlps.{key}.0.weight'] = r(c.micro_hidden, c.micro_freq_dim)
    sd[f'micro_condition.mlps.{key}.0.bias'] = r(c.micro_hidden)
    sd[f'micro_condition.mlps.{key}.2.weight'] = r(d, c.micro_hidden)
    sd[f'micro_condition.mlps.{key}.2.bias'] = r(d)
  for i in range(c.num_layers):
    p = f'transformer.blocks.{i}.'
    sd[p + 'norm0.weight'], sd[p + 'norm1.weight'] = 1 + r(d), 1 + r(d)
    sd[p + 'wqkv.weight'], sd[p + 'wo.weight'] = r(3 * d, d), r(d, d)
    sd[p + 'mlp.w1.weight'], sd[p + 'mlp.w3.weight'], sd[p + 'mlp.w2.weight'] = r(f, d), r(f, d), r(d, f)
  return sd


@pytest.fixture(scope='module')
def official(config, tmp_path_factory):
  sd = official_state_dict(config.lm)
  path = tmp_path_factory.mktemp('lm') / 'model.safetensors'
  save_file(sd, str(path))
  return str(path), {k: v.astype(np.float64) for k, v in sd.items()}


@pytest.fixture(scope='module')
def params(official, config):
  return convert_lm(io.load_state_dict(official[0]), config.lm)


@pytest.fixture(scope='module')
def model(config):
  return lm_model.build_lm(config.lm)


@pytest.fixture(scope='module')
def layout(config):
  return lm_sampling.Layout.from_config(config)


# --- numpy restatement (reference §4.1–4.5) ------------------------------------------------------------------


def np_gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_forward(sd, c, embeds):
  """Logits [L, V] of one unpadded sequence of input features [L, D], positions 0..L−1."""
  heads, hd = c.num_heads, c.head_dim
  length = embeds.shape[0]
  inv = c.rope_theta**(-np.arange(0, hd, 2) / hd)
  rotation = np.exp(1j * np.arange(length)[:, None] * inv)[:, None, :]
  rope = lambda x: (lambda z: np.stack([z.real, z.imag], -1).reshape(x.shape))((x[..., 0::2] + 1j * x[..., 1::2]) *
                                                                                 rotation)
  rms = lambda x, w: x / np.sqrt((x**2).mean(-1, keepdims=True) + c.norm_eps) * w
  x = embeds
  causal = np.tril(np.ones((length, length), bool))
  for i in range(c.num_layers):
    p = f'transformer.blocks.{i}.'
    qkv = rms(x, sd[p + 'norm0.weight']) @ sd[p + 'wqkv.weight'].T
    q, k, v = (qkv[:, j * c.hidden_size:(j + 1) * c.hidden_size].reshape(length, heads, hd) for j in range(3))
    q, k = rope(q), rope(k)
    s = np.where(causal[None], np.einsum('qhd,khd->hqk', q, k) / np.sqrt(hd), -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + np.einsum('hqk,khd->qhd', a, v).reshape(length, -1) @ sd[p + 'wo.weight'].T
    h = rms(x, sd[p + 'norm1.weight'])
    x = x + (np_gelu_tanh(h @ sd[p + 'mlp.w1.weight'].T) * (h @ sd[p + 'mlp.w3.weight'].T)) @ sd[p + 'mlp.w2.weight'].T
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  x = (x - mean) / np.sqrt(var + c.final_norm_eps) * sd['transformer.layer_norm.weight'] + sd['transformer.layer_norm.bias']
  return x @ sd['transformer.head.weight'].T


def np_prefix(sd, c, layout, text, frames, motion, null=False):
  """[BOS, micro(frames), micro(motion), text MLP (or null vectors), SOI] as the release builds it."""
  emb = sd['visual_embedding_model.tok_emb_code.weight']
  if null:
    text_part = np.repeat(sd['cond_model.null_text_embedding'][None], len(text), 0)
  else:
    h = text @ sd['cond_model.embeddings.fc0.weight'].T + sd['cond_model.embeddings.fc0.bias']
    text_part = np_gelu_tanh(h) @ sd['cond_model.embeddings.fc1.weight'].T + sd['cond_model.embeddings.fc1.bias']
  micro = []
  for key, value in zip(c.micro_conditions, (frames, motion)):
    half = c.micro_freq_dim // 2
    angles = value * np.exp(-np.log(10000.0) * np.arange(half) / half)
    e = np.concatenate([np.cos(angles), np.sin(angles)])
    h = e @ sd[f'micro_condition.mlps.{key}.0.weight'].T + sd[f'micro_condition.mlps.{key}.0.bias']
    h = h / (1 + np.exp(-h))
    micro.append(h @ sd[f'micro_condition.mlps.{key}.2.weight'].T + sd[f'micro_condition.mlps.{key}.2.bias'])
  return np.concatenate([emb[[layout.bos]], np.stack(micro), text_part, emb[[layout.soi]]])


def prompt(config, length, seed):
  return np.random.default_rng(seed).standard_normal((length, config.lm.text_feature_dim)).astype(np.float32)


# --- tests ----------------------------------------------------------------------------------------------------


def test_converted_tree_matches_init_and_bad_keys_are_listed(official, params, config):
  init = strip_partitioning(jax.eval_shape(lm_model.build_lm(config.lm).init_params, jax.random.key(0)))
  assert jax.tree.structure(init) == jax.tree.structure(params)
  sd = io.load_state_dict(official[0])
  del sd['transformer.blocks.1.mlp.w2.weight']
  sd['transformer.extra'] = np.zeros(1, np.float32)
  sd['transformer.head.weight'] = np.zeros((3, 3), np.float32)
  sd['cond_model.text_encoder.encoder.block.0.x'] = np.zeros(1, np.float32)  # frozen T5: ignored
  with pytest.raises(ConversionError) as error:
    convert_lm(sd, config.lm)
  message = str(error.value)
  assert 'transformer.blocks.1.mlp.w2.weight' in message and 'transformer.extra' in message
  assert 'transformer.head.weight' in message and 'text_encoder' not in message


def test_forward_matches_the_numpy_restatement(official, params, model, config):
  _, sd = official
  embeds = np.random.default_rng(1).standard_normal((7, config.lm.hidden_size))
  want = np_forward(sd, config.lm, embeds)
  got = model.apply(params, jnp.asarray(embeds[None], jnp.float32), jnp.arange(7)[None], jnp.ones((1, 7), bool))
  np.testing.assert_allclose(np.asarray(got[0]), want, atol=1e-4, rtol=1e-4)


def test_kv_cache_decoding_equals_the_full_forward_at_every_position(params, model, config):
  length = 9
  embeds = jax.random.normal(jax.random.key(2), (2, length, config.lm.hidden_size))
  positions = jnp.broadcast_to(jnp.arange(length), (2, length))
  full = model.apply(params, embeds, positions, jnp.ones((2, length), bool))
  cache = lm_model.empty_cache(model.settings, 2, 12, jnp.float32)
  valid = jnp.ones((2, 12), bool)
  logits, cache = model.apply(params, embeds[:, :4], positions[:, :4], valid, cache, 0, method=model.extend)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, 3]), atol=1e-5)
  for i in range(4, length):
    logits, cache = model.apply(params, embeds[:, i:i + 1], positions[:, i:i + 1], valid, cache, i,
                                method=model.extend)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, i]), atol=1e-5)


def test_unrolled_decode_over_split_layers_equals_the_full_forward(params, model, config):
  length = 7
  embeds = jax.random.normal(jax.random.key(3), (2, length, config.lm.hidden_size))
  positions = jnp.broadcast_to(jnp.arange(length), (2, length))
  full = model.apply(params, embeds, positions, jnp.ones((2, length), bool))
  valid = jnp.ones((2, 10), bool)
  _, cache = model.apply(params, embeds[:, :4], positions[:, :4], valid,
                         lm_model.empty_cache(model.settings, 2, 10, jnp.float32), 0, method=model.extend)
  layers, caches = lm_model.layer_params(params), lm_model.split_cache(cache)
  decode = jax.jit(lm_model.decode, static_argnums=0)
  for i in range(4, length):
    got, caches = decode(model, params, layers, embeds[:, i:i + 1], positions[:, i:i + 1], valid, caches, i)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full[:, i]), atol=1e-5)
  assert not np.any(np.asarray(caches[0][0])[:, length:])  # slots past the last token stay unwritten


def _release_decode_step(dtype):
  """The sampler's decode step (CFG, one group) at the release's sizes on abstract shapes: (function, arguments,
  parameter bytes, KV-cache bytes)."""
  S = jax.ShapeDtypeStruct
  c = load_config('configs/landiff_official.py')
  model = lm_model.build_lm(c.lm, dtype=dtype)
  params = jax.eval_shape(lambda: jax.tree.map(lambda p: p.astype(dtype),
                                               strip_partitioning(model.init_params(jax.random.key(0)))))
  layers = jax.eval_shape(lm_model.layer_params, params)
  layout = lm_sampling.Layout.from_config(c)
  steps, width, rows = len(layout.plan(1)), 3 + lm_sampling.TEXT_BUCKET + 1, 2
  max_len = width + steps
  cache = S((rows, max_len, c.lm.num_heads, c.lm.head_dim), dtype)
  caches = tuple((cache, cache) for _ in range(c.lm.num_layers))

  def step(params, layers, i, logits, caches, tokens, keys, plan, valid, next_position):
    return lm_sampling.decode_step(model, params, layers, i, logits, caches, tokens, keys=keys,
                                   cfg_scale=jnp.float32(7.5), temperature=jnp.float32(1.0), plan=plan, valid=valid,
                                   next_position=next_position, width=width, use_cfg=True, top_k=0, top_p=1.0)

  args = (params, layers, S((), jnp.int32), S((rows, c.lm.vocab_size), jnp.float32), caches,
          S((1, steps), jnp.int32), jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 1)),
          S((steps,), jnp.int32), S((rows, max_len), bool), S((rows,), jnp.int32))
  param_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
  kv_bytes = 2 * c.lm.num_layers * rows * max_len * c.lm.num_heads * c.lm.head_dim * jnp.dtype(dtype).itemsize
  return step, args, param_bytes, kv_bytes


def test_release_decode_step_moves_little_more_than_its_weights_and_cache():
  """Roofline proxy for the decode step (2.0 B parameters, CFG rows, one group: a 1,312-slot cache), from the
  compiled program's cost analysis on CPU, abstract shapes, nothing allocated.

  Measured in float32, because XLA:CPU computes bfloat16 by converting every weight to float32 first, which would
  hide what the step itself moves; the bfloat16 half checks on the traced program that no weight is converted.

  Before (2026-12-04: the step ran `extend`, a `lax.scan` over the stacked layers; counted with the scan unrolled,
  since cost analysis counts a loop body once): 36.8 GB accessed per step against 8.20 GB of parameters + 1.03 GB of
  KV cache (3.99×), and 9.67 GB of temporaries: every layer's weights sliced out of the stack into a copy, the stacked
  cache rebuilt. Now (layers unrolled over per-layer weights and caches): 11.3 GB (1.22×; of the excess, 2.1 GB is
  XLA charging each in-place one-slot cache write as a read and a write of that layer's whole cache) and 43 MB of
  temporaries.
  """
  step, args, param_bytes, kv_bytes = _release_decode_step(jnp.float32)
  compiled = jax.jit(step, donate_argnums=(4,)).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert cost['bytes accessed'] <= 1.3 * (param_bytes + kv_bytes), (cost['bytes accessed'], param_bytes, kv_bytes)
  assert compiled.memory_analysis().temp_size_in_bytes <= 0.02 * param_bytes

  step, args, param_bytes, _ = _release_decode_step(jnp.bfloat16)
  converted = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'convert_element_type' and eqn.invars[0].aval.size > 2**20:
        converted.append(eqn.invars[0].aval.size * eqn.invars[0].aval.dtype.itemsize)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, 'eqns'):
            walk(sub)
          elif hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns'):
            walk(sub.jaxpr)

  walk(jax.make_jaxpr(step)(*args).jaxpr)
  assert sum(converted) <= 0.01 * param_bytes, converted  # (the float32 head's 8 MB kernel is the one allowed)


def test_layout_of_one_group_matches_the_release():
  full = load_config('configs/landiff_official.py')
  layout = lm_sampling.Layout.from_config(full)
  plan = layout.plan(1)
  assert len(plan) == 1244 - 1 + 1  # SOI is in the prefix; EOS last
  assert (plan < 0).sum() == 1218 and plan[330] == layout.eoi and plan[331] == layout.sop
  assert plan[331 + 75] == layout.eop and plan[-1] == layout.eos
  two = layout.plan(2)
  assert two[1243] == layout.soi and (two < 0).sum() == 2 * 1218


def test_first_tokens_follow_cfg_of_the_release_prefix(official, params, model, config, layout):
  """Greedy (top_k=1): the first two visual tokens are the argmax of u + g·(c − u) computed by the numpy
  restatement on the release's prefix."""
  _, sd = official
  text = prompt(config, 5, seed=3)
  frames = config.tokenizer.frames_per_group
  ids = lm_sampling.generate(model, params, [text], layout=layout, key=jax.random.key(0), num_frames=frames,
                             motion_score=0.3, cfg_scale=2.5, top_k=1)
  assert ids.shape == (1, layout.tokens_per_group)
  cond = np_prefix(sd, config.lm, layout, text.astype(np.float64), frames, 0.3)
  uncond = np_prefix(sd, config.lm, layout, text.astype(np.float64), frames, 0.3, null=True)
  emb = sd['visual_embedding_model.tok_emb_code.weight']
  tokens = []
  for _ in range(2):
    c, u = (np_forward(sd, config.lm, np.concatenate([x] + [emb[tokens]]))[-1] for x in (cond, uncond))
    tokens.append(int(np.argmax(u + 2.5 * (c - u))))
  assert np.asarray(ids[0, :2]).tolist() == [min(t, layout.codebook_size - 1) for t in tokens]


def test_sampling_is_deterministic_per_key_and_batch_independent(params, model, config, layout):
  frames = config.tokenizer.frames_per_group
  texts = [prompt(config, 3, 4), prompt(config, 11, 5)]
  keys = jax.random.split(jax.random.key(7), 2)
  run = lambda t, k: np.asarray(lm_sampling.generate(model, params, t, layout=layout, key=k, num_frames=frames,
                                                     cfg_scale=3.0))
  batch = run(texts, keys)
  assert batch.shape == (2, layout.tokens_per_group)
  assert batch.min() >= 0 and batch.max() < layout.codebook_size
  np.testing.assert_array_equal(batch, run(texts, keys))
  np.testing.assert_array_equal(batch[0], run([texts[0]], keys[:1])[0])
  np.testing.assert_array_equal(batch[1], run([texts[1]], keys[1:])[0])
  assert not np.array_equal(batch[0], run([texts[0]], jax.random.split(jax.random.key(8), 1))[0])
  two_groups = np.asarray(lm_sampling.generate(model, params, [texts[0]], layout=layout, key=keys[:1],
                                               num_frames=2 * frames, cfg_scale=3.0))
  assert two_groups.shape == (1, 2 * layout.tokens_per_group)


def test_bad_inputs(params, model, config, layout):
  frames = config.tokenizer.frames_per_group
  run = lambda t, **kw: lm_sampling.generate(model, params, t, layout=layout, key=jax.random.key(0),
                                             **{'num_frames': frames, **kw})
  with pytest.raises(ValueError, match='empty prompt'):
    run([np.zeros((0, config.lm.text_feature_dim), np.float32)])
  with pytest.raises(ValueError, match=r'motion_score must be in \[0, 1\]'):
    run([prompt(config, 3, 0)], motion_score=1.5)
  with pytest.raises(ValueError, match='whole number'):
    run([prompt(config, 3, 0)], num_frames=frames + 1)
  with pytest.warns(UserWarning, match='truncated'):
    out = run([prompt(config, 20, 0)], max_text_length=16)
  assert out.shape == (1, layout.tokens_per_group)


def test_cli_converts_the_official_file(official, params, tmp_path):
  dst = tmp_path / 'lm'
  assert main(['convert', 'lm', '--config=configs/tiny.py', '--src', official[0], '--dst', str(dst)]) == 0
  model, loaded = checkpoints.load(str(dst))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert isinstance(model, lm_model.SemanticLM)


def test_bench_lm_runs_next_to_a_pytorch_kv_loop(tmp_path):
  import json
  out = tmp_path / 'bench.json'
  assert main(['bench', 'lm', '--config=configs/tiny.py', '--repeats', '1', '--dtype', 'float32', '--out',
               str(out)]) == 0
  result = json.loads(out.read_text())
  assert result['landiff_jax']['positions'] == 13 and result['landiff_jax']['per_token_ms'] > 0
  assert result['landiff_jax']['tflop'] > 0
  assert result['pytorch_kv_loop']['per_token_ms'] > 0 and result['per_token_speedup_vs_pytorch'] > 0
