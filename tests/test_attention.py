"""The attention entry point: 'xla' and 'blockwise' against a naive numpy softmax, 'cudnn' fallback and plumbing,
errors."""

import functools
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landiff_jax.nn.attention import attention, jax_nn_attention
from landiff_jax.nn.masks import MaskSpec, VideoTokenLayout
from tests.test_masks import _toy_matrices as toy_matrices

# `landiff_jax.nn.attention` the attribute is the function; the module is reached through sys.modules.
attention_module = sys.modules['landiff_jax.nn.attention']
# Tests call the jitted entry point: one compile per case instead of one per eager op (the suite must stay fast).
attention_jit = jax.jit(attention, static_argnames=('mask', 'backend', 'scale'))

LAYOUT = VideoTokenLayout(num_frames=3, tokens_per_frame=4, num_iframe_tokens=3, num_pframe_tokens=2)  # L = 19


def numpy_attention(q, k, v, allowed, scale=None):
  """q [B,Lq,H,D], k/v [B,Lk,Hkv,D], allowed [B,Lq,Lk] bool; kv head of query head h is h // (H/Hkv)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, lq, h, d = q.shape
  group = h // k.shape[2]
  scale = 1 / np.sqrt(d) if scale is None else scale
  out = np.zeros((b, lq, h, v.shape[-1]))
  for bi in range(b):
    for hi in range(h):
      scores = q[bi, :, hi] @ k[bi, :, hi // group].T * scale
      for qi in range(lq):
        keys = allowed[bi, qi]
        if not keys.any():
          continue
        s = scores[qi, keys]
        p = np.exp(s - s.max())
        out[bi, qi, hi] = (p / p.sum()) @ v[bi, keys, hi // group]
  return out


def random_qkv(b, lq, lk, h, hkv, d, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape), dtype)
               for shape in ((b, lq, h, d), (b, lk, hkv, d), (b, lk, hkv, d)))


def dense_rule(kind, lq, lk, q_offset=0):
  """The mask each kind stands for, restated with plain numpy (frame-causal from the §3.6 toy example)."""
  qi = q_offset + np.arange(lq)[:, None]
  ki = np.arange(lk)[None, :]
  if kind == 'full':
    return np.ones((lq, lk), bool)
  if kind == 'causal':
    return ki <= qi
  encoder, decoder = toy_matrices()
  return encoder if kind == 'encoder' else decoder


CASES = {
    # name: (mask, lq, lk, q_offset)
    'full': (MaskSpec.full(), 5, 7, 0),
    'causal': (MaskSpec.causal(), 6, 6, 0),
    'causal_offset': (MaskSpec.causal(), 3, 8, 5),
    'encoder': (MaskSpec.encoder(LAYOUT), 19, 19, 0),
    'decoder': (MaskSpec.decoder(LAYOUT), 19, 19, 0),
}


def _kind(name):
  return name.split('_')[0]


DENSE_AND_BLOCKWISE = ['xla', 'blockwise']


@pytest.mark.parametrize('backend', DENSE_AND_BLOCKWISE)
@pytest.mark.parametrize('name', list(CASES))
def test_matches_numpy_for_every_mask(name, backend):
  mask, lq, lk, q_offset = CASES[name]
  q, k, v = random_qkv(2, lq, lk, 4, 4, 8, seed=1)
  got = attention_jit(q, k, v, mask, q_offset=q_offset, backend=backend)
  allowed = np.broadcast_to(dense_rule(_kind(name), lq, lk, q_offset), (2, lq, lk))
  np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, allowed), atol=2e-5)


@pytest.mark.parametrize('backend', DENSE_AND_BLOCKWISE)
@pytest.mark.parametrize('name', ['full', 'causal_offset', 'encoder'])
def test_kv_padding_and_grouped_heads(name, backend):
  mask, lq, lk, q_offset = CASES[name]
  q, k, v = random_qkv(3, lq, lk, 6, 2, 8, seed=2)
  kv_valid = np.ones((3, lk), bool)
  kv_valid[1, -3:] = False  # right padding
  kv_valid[2, :2] = False  # left padding (batched LM prompts): some causal / frame-causal rows lose every key
  got = attention_jit(q, k, v, mask, kv_valid=jnp.asarray(kv_valid), q_offset=q_offset, scale=0.3, backend=backend)
  allowed = dense_rule(_kind(name), lq, lk, q_offset)[None] & kv_valid[:, None, :]
  np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, allowed, scale=0.3), atol=2e-5)


@pytest.mark.parametrize('backend', DENSE_AND_BLOCKWISE)
def test_rows_without_keys_are_zero_and_have_finite_gradients(backend):
  q, k, v = random_qkv(1, 4, 4, 2, 1, 8, seed=3)
  kv_valid = jnp.array([[False, False, True, True]])
  out = attention_jit(q, k, v, MaskSpec.causal(), kv_valid=kv_valid, backend=backend)
  np.testing.assert_array_equal(np.asarray(out[0, :2]), 0.0)
  assert np.abs(np.asarray(out[0, 2:])).sum() > 0
  loss = lambda q, k, v: attention(q, k, v, MaskSpec.causal(), kv_valid=kv_valid, backend=backend).sum()
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize('backend', DENSE_AND_BLOCKWISE)
def test_single_kv_head_and_bf16(backend):
  q, k, v = random_qkv(2, 5, 5, 4, 1, 16, seed=4, dtype=jnp.bfloat16)
  got = attention_jit(q, k, v, MaskSpec.causal(), backend=backend)
  assert got.dtype == jnp.bfloat16
  allowed = np.broadcast_to(dense_rule('causal', 5, 5), (2, 5, 5))
  np.testing.assert_allclose(np.asarray(got, np.float32), numpy_attention(q, k, v, allowed), atol=3e-2)


@pytest.mark.parametrize('backend', DENSE_AND_BLOCKWISE)
def test_under_jit_with_static_mask_and_traced_offset(backend):
  q, k, v = random_qkv(2, 2, 9, 4, 2, 8, seed=5)
  fn = functools.partial(attention_jit, backend=backend)
  for offset in (0, 4, 7):
    got = fn(q, k, v, MaskSpec.causal(), q_offset=jnp.int32(offset))
    allowed = np.broadcast_to(dense_rule('causal', 2, 9, offset), (2, 2, 9))
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, allowed), atol=2e-5)
  mask = MaskSpec.decoder(LAYOUT)
  q, k, v = random_qkv(1, 19, 19, 2, 2, 8, seed=6)
  allowed = dense_rule('decoder', 19, 19)[None]
  np.testing.assert_allclose(np.asarray(fn(q, k, v, mask)), numpy_attention(q, k, v, allowed), atol=2e-5)


@pytest.mark.parametrize('backend', DENSE_AND_BLOCKWISE)
def test_under_vmap(backend):
  q, k, v = random_qkv(6, 19, 19, 2, 1, 8, seed=7)
  stacked = [a.reshape(3, 2, *a.shape[1:]) for a in (q, k, v)]
  mask = MaskSpec.encoder(LAYOUT)
  got = jax.jit(jax.vmap(lambda q, k, v: attention(q, k, v, mask, backend=backend)))(*stacked).reshape(6, 19, 2, 8)
  allowed = np.broadcast_to(dense_rule('encoder', 19, 19), (6, 19, 19))
  np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, allowed), atol=2e-5)


@pytest.mark.parametrize('name,padded', [(name, False) for name in CASES] + [('causal_offset', True),
                                                                             ('encoder', True)])
def test_jax_nn_path_mask_plumbing_matches_xla(name, padded):
  """The 'cudnn' backend's mask handling, run through jax.nn's XLA implementation (no GPU needed)."""
  mask, lq, lk, q_offset = CASES[name]
  q, k, v = random_qkv(2, lq, lk, 4, 2, 8, seed=8)
  kv_valid = None
  if padded:
    kv_valid = jnp.ones((2, lk), bool).at[1, :2].set(False)
  want = attention_jit(q, k, v, mask, kv_valid=kv_valid, q_offset=q_offset, backend='xla')
  got = jax.jit(jax_nn_attention, static_argnames=('mask', 'scale', 'implementation'))(
      q, k, v, mask, kv_valid=kv_valid, q_offset=q_offset, scale=1 / np.sqrt(8), implementation='xla')
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='checks the CPU fallback')
def test_cudnn_on_cpu_warns_once_and_falls_back(monkeypatch):
  monkeypatch.setattr(attention_module, '_warned', set())
  q, k, v = random_qkv(2, 19, 19, 4, 2, 8, seed=9)
  mask = MaskSpec.encoder(LAYOUT)
  with pytest.warns(UserWarning, match=r"'cudnn' is unavailable .*CUDA GPU.*falling back to 'blockwise'"):
    got = attention_jit(q, k, v, mask, backend='cudnn')
  np.testing.assert_allclose(np.asarray(got), np.asarray(attention_jit(q, k, v, mask, backend='xla')), atol=1e-5)
  assert np.abs(np.asarray(got)).sum() > 0
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    attention_jit(q, k, v, MaskSpec.causal(), backend='cudnn')


def test_unknown_backend_and_bad_shapes_rejected():
  q, k, v = random_qkv(1, 4, 4, 4, 2, 8)
  with pytest.raises(ValueError, match=r"'flash'.*'auto', 'blockwise', 'cudnn', 'pallas', 'splash', 'xla'"):
    attention(q, k, v, MaskSpec.full(), backend='flash')
  with pytest.raises(ValueError, match='multiple'):
    attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), MaskSpec.full())
  with pytest.raises(ValueError, match='kv_valid'):
    attention(q, k, v, MaskSpec.full(), kv_valid=jnp.ones((1, 5), bool))
  with pytest.raises(ValueError, match='19'):
    attention(q, k, v, MaskSpec.encoder(LAYOUT))
