"""Dense / Embed / LayerNorm / RMSNorm / Mlp / GatedMlp against numpy restatements, plus logical axis names."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from landiff_jax.nn.layers import Dense, Embed, LayerNorm, RMSNorm
from landiff_jax.nn.mlp import GatedMlp, Mlp


def init_perturbed(module, *args, seed=0):
  """Random params in the module's structure (no init compile); no zero biases / unit scales to hide mistakes."""
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), shapes)


def as_np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def gelu_exact(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_dense_vs_numpy():
  x = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
  layer = Dense(7, kernel_axes=('embed', 'mlp'))
  params = init_perturbed(layer, x)
  p = as_np(params)['params']
  np.testing.assert_allclose(np.asarray(jax.jit(layer.apply)(params, x)), x @ p['kernel'] + p['bias'], rtol=1e-5,
                             atol=1e-5)


def test_dense_general_contracts_several_axes_into_several_features():
  # [B, L, H, D] → contract (H, D) → [B, L, E]: an attention output projection.
  x = np.random.default_rng(1).standard_normal((2, 3, 4, 6)).astype(np.float32)
  layer = Dense(5, axis=(-2, -1), use_bias=False, kernel_axes=('heads', 'kv', 'embed'))
  params = init_perturbed(layer, x)
  kernel = as_np(params)['params']['kernel']
  assert kernel.shape == (4, 6, 5) and 'bias' not in params['params']
  np.testing.assert_allclose(np.asarray(jax.jit(layer.apply)(params, x)), np.einsum('blhd,hde->ble', x, kernel),
                             rtol=1e-5, atol=1e-5)
  # and the reverse: [B, L, E] → [B, L, H, D]
  layer = Dense((4, 6), kernel_axes=('embed', 'heads', 'kv'))
  params = init_perturbed(layer, x[..., 0, :5])
  p = as_np(params)['params']
  np.testing.assert_allclose(np.asarray(jax.jit(layer.apply)(params, x[..., 0, :5])),
                             np.einsum('ble,ehd->blhd', x[..., 0, :5], p['kernel']) + p['bias'], rtol=1e-5,
                             atol=1e-5)


def test_dense_computes_in_dtype_and_keeps_fp32_params():
  layer = Dense(4, dtype=jnp.bfloat16, kernel_axes=('embed', 'mlp'))
  variables = init_perturbed(layer, jnp.ones((2, 3)))
  assert variables['params']['kernel'].dtype == jnp.float32
  assert jax.eval_shape(layer.apply, variables, jnp.ones((2, 3))).dtype == jnp.bfloat16


def test_dense_kernel_init_uses_full_fan_in():
  layer = Dense(64, axis=(-2, -1), use_bias=False, kernel_axes=('heads', 'kv', 'embed'))
  kernel = nn.meta.unbox(layer.init(jax.random.key(0), jnp.ones((1, 16, 64))))['params']['kernel']
  # lecun normal (truncated): std ≈ 1/sqrt(fan_in) with fan_in = 16·64.
  assert abs(float(jnp.std(kernel)) * math.sqrt(16 * 64) - 1.0) < 0.05


def test_dense_rejects_wrong_axes_count():
  with pytest.raises(ValueError, match='kernel_axes'):
    Dense(4, kernel_axes=('embed',)).init(jax.random.key(0), jnp.ones((2, 3)))


def test_embed_lookup_and_attend():
  embed = Embed(num_embeddings=11, features=6)
  ids = jnp.array([[0, 3, 10], [5, 5, 1]])
  params = init_perturbed(embed, ids)
  table = as_np(params)['params']['embedding']
  np.testing.assert_allclose(np.asarray(jax.jit(embed.apply)(params, ids)), table[np.asarray(ids)], rtol=1e-6)
  query = np.random.default_rng(2).standard_normal((2, 6)).astype(np.float32)
  logits = jax.jit(lambda v, q: embed.apply(v, q, method=Embed.attend))(params, query)
  np.testing.assert_allclose(np.asarray(logits), query @ table.T, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='integer'):
    jax.jit(embed.apply)(params, jnp.zeros((2,), jnp.float32))


@pytest.mark.parametrize('use_scale,use_bias', [(True, True), (True, False), (False, False)])
def test_layernorm_vs_numpy(use_scale, use_bias):
  x = (np.random.default_rng(3).standard_normal((2, 5, 8)) * 3 + 1).astype(np.float32)
  ln = LayerNorm(epsilon=1e-5, use_scale=use_scale, use_bias=use_bias)
  params = init_perturbed(ln, x)
  p = as_np(params).get('params', {})
  x64 = x.astype(np.float64)
  expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
  if use_scale:
    expected = expected * p['scale']
  if use_bias:
    expected = expected + p['bias']
  assert set(p) == {'scale', 'bias'} - ({'scale'} if not use_scale else set()) - ({'bias'} if not use_bias else set())
  np.testing.assert_allclose(np.asarray(jax.jit(ln.apply)(params, x)), expected, rtol=1e-5, atol=1e-5)


def test_layernorm_bf16_input_uses_fp32_statistics():
  # A large mean makes bf16 statistics visibly wrong; fp32 statistics then one bf16 rounding are not.
  x = (1000.0 + np.random.default_rng(4).standard_normal((4, 32))).astype(np.float32)
  xb = jnp.asarray(x, jnp.bfloat16)
  ln = LayerNorm()
  params = ln.init(jax.random.key(0), xb)
  out = jax.jit(ln.apply)(params, xb)
  assert out.dtype == jnp.bfloat16
  xr = np.asarray(xb, np.float64)
  expected = (xr - xr.mean(-1, keepdims=True)) / np.sqrt(xr.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=2e-2)


def test_rmsnorm_vs_numpy_fp32_and_bf16():
  x = (np.random.default_rng(5).standard_normal((3, 16)) * 4).astype(np.float32)
  norm = RMSNorm(epsilon=1e-5)
  params = init_perturbed(norm, x)
  w = as_np(params)['params']['scale']
  assert set(as_np(params)['params']) == {'scale'}

  def expected(inp):
    inp = np.asarray(inp, np.float64)
    return inp / np.sqrt(np.mean(inp ** 2, -1, keepdims=True) + 1e-5) * w

  np.testing.assert_allclose(np.asarray(jax.jit(norm.apply)(params, x)), expected(x), rtol=1e-5, atol=1e-6)
  xb = jnp.asarray(x, jnp.bfloat16)
  out = jax.jit(norm.apply)(params, xb)
  assert out.dtype == jnp.bfloat16
  # fp32 math then a single rounding to bf16: exactly the bf16 rounding of the float64 result (up to 1 ulp).
  want = np.asarray(jnp.asarray(expected(xb), jnp.bfloat16), np.float64)
  np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2 ** -7)


@pytest.mark.parametrize('activation,fn', [('gelu', gelu_exact), ('gelu_tanh', gelu_tanh), ('tanh', np.tanh),
                                           ('silu', lambda h: h / (1 + np.exp(-h)))])
def test_mlp_vs_numpy(activation, fn):
  x = np.random.default_rng(6).standard_normal((2, 3, 8)).astype(np.float32)
  mlp = Mlp(hidden_features=16, activation=activation)
  params = init_perturbed(mlp, x)
  p = as_np(params)['params']
  h = fn(x @ p['fc1']['kernel'] + p['fc1']['bias'])
  np.testing.assert_allclose(np.asarray(jax.jit(mlp.apply)(params, x)), h @ p['fc2']['kernel'] + p['fc2']['bias'],
                             rtol=1e-5, atol=1e-5)


def test_mlp_without_bias_and_other_out_features():
  mlp = Mlp(hidden_features=16, out_features=3, use_bias=False, activation='tanh')
  params = nn.meta.unbox(jax.eval_shape(mlp.init, jax.random.key(0), jnp.ones((2, 8))))['params']
  assert set(params['fc1']) == {'kernel'} and params['fc2']['kernel'].shape == (16, 3)


def test_gated_mlp_vs_numpy():
  x = np.random.default_rng(7).standard_normal((2, 3, 8)).astype(np.float32)
  mlp = GatedMlp(hidden_features=12)
  params = init_perturbed(mlp, x)
  p = as_np(params)['params']
  assert set(p) == {'w1', 'w2', 'w3'} and all(set(p[n]) == {'kernel'} for n in p)
  h = gelu_tanh(x @ p['w1']['kernel']) * (x @ p['w3']['kernel'])
  np.testing.assert_allclose(np.asarray(jax.jit(mlp.apply)(params, x)), h @ p['w2']['kernel'], rtol=1e-5, atol=1e-5)


def test_unknown_activation_rejected():
  with pytest.raises(ValueError, match='gelu_tanh'):
    Mlp(hidden_features=4, activation='swish').init(jax.random.key(0), jnp.ones((1, 2)))


def test_logical_axis_names_in_param_metadata():
  x = jnp.ones((2, 3, 8))
  spec = lambda module, inp: nn.get_partition_spec(jax.eval_shape(module.init, jax.random.key(0), inp))
  specs = {
      'dense': spec(Dense(4, kernel_axes=('embed', 'mlp')), x),
      'embed': spec(Embed(10, 8), jnp.zeros((2,), jnp.int32)),
      'ln': spec(LayerNorm(), x),
      'rms': spec(RMSNorm(), x),
      'mlp': spec(Mlp(16), x),
      'gated': spec(GatedMlp(16), x),
  }
  assert specs['dense']['params'] == {'kernel': P('embed', 'mlp'), 'bias': P('mlp')}
  assert specs['embed']['params'] == {'embedding': P('vocab', 'embed')}
  assert specs['ln']['params'] == {'scale': P('norm'), 'bias': P('norm')}
  assert specs['rms']['params'] == {'scale': P('norm')}
  assert specs['mlp']['params'] == {'fc1': {'kernel': P('embed', 'mlp'), 'bias': P('mlp')},
                                    'fc2': {'kernel': P('mlp', 'embed'), 'bias': P('embed')}}
  assert specs['gated']['params'] == {'w1': {'kernel': P('embed', 'mlp')}, 'w3': {'kernel': P('embed', 'mlp')},
                                      'w2': {'kernel': P('mlp', 'embed')}}


def test_hidden_activation_constraint_shards_under_rules():
  """With axis rules and a mesh, the MLP hidden activation is constrained to the 'act_mlp' mapping."""
  mesh = jax.make_mesh((2, 4), ('data', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (('batch', 'data'), ('length', None), ('act_mlp', 'tensor'), ('embed', None), ('mlp', 'tensor'))
  mlp = Mlp(16)
  x = jnp.ones((2, 3, 8))
  params = jax.eval_shape(mlp.init, jax.random.key(0), x)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    text = jax.jit(mlp.apply).lower(params, x).as_text()
  hidden = [line for line in text.splitlines() if 'sharding_constraint' in line and 'tensor<2x3x16xf32>' in line]
  assert hidden and '[{"data"}, {}, {"tensor"}]' in hidden[0], hidden
