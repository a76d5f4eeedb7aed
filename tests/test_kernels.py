"""Pallas flash attention and the splash wrapper (interpret mode on CPU) equal the xla backend; block
classification equals the materialised mask; bad inputs fail before lowering."""

import functools
import importlib
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from landiff_jax.kernels import block_mask
from landiff_jax.kernels.flash_attention import flash_attention
from landiff_jax.nn.masks import MaskSpec, VideoTokenLayout

TOY = VideoTokenLayout(num_frames=3, tokens_per_frame=4, num_iframe_tokens=3, num_pframe_tokens=2)  # L = 19
MID = VideoTokenLayout(num_frames=4, tokens_per_frame=21, num_iframe_tokens=9, num_pframe_tokens=5)  # L = 108
OFFICIAL = VideoTokenLayout(num_frames=13, tokens_per_frame=1350, num_iframe_tokens=330, num_pframe_tokens=74)

# `landiff_jax.nn.attention` the module (the package re-exports the function under the same name).
attention_lib = importlib.import_module('landiff_jax.nn.attention')
flash = functools.partial(flash_attention, block_q=16, block_k=16, interpret=True)


def _block_truth(spec, q_len, kv_len, block_q, block_k, q_offset=0):
  dense = spec.materialize(q_len, kv_len, q_offset)
  num_q, num_k = -(-q_len // block_q), -(-kv_len // block_k)
  padded = np.zeros((num_q * block_q, num_k * block_k), bool)
  padded[:q_len, :kv_len] = dense
  classes = np.zeros((num_q, num_k), np.int8)
  for i, j in itertools.product(range(num_q), range(num_k)):
    tile = padded[i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k][:min(block_q, q_len - i * block_q)]
    classes[i, j] = block_mask.FULL if tile.all() else block_mask.PARTIAL if tile.any() else block_mask.EMPTY
  return classes


@pytest.mark.parametrize('layout', [TOY, MID, VideoTokenLayout(5, 7, 5, 0), VideoTokenLayout(2, 16, 8, 8)])
@pytest.mark.parametrize('kind', ['encoder', 'decoder'])
def test_block_classification_matches_materialised_mask(layout, kind):
  spec = getattr(MaskSpec, kind)(layout)
  for block_q, block_k in itertools.product((1, 3, 4, 16, 32), repeat=2):
    got = block_mask.classify_blocks(spec, layout.length, layout.length, block_q, block_k)
    np.testing.assert_array_equal(got, _block_truth(spec, layout.length, layout.length, block_q, block_k),
                                  err_msg=f'{kind} {layout} blocks {block_q}x{block_k}')


@pytest.mark.parametrize('spec', [MaskSpec.causal(), MaskSpec.full()])
def test_block_classification_causal_and_full(spec):
  for (q_len, kv_len, q_offset), (block_q, block_k) in itertools.product(
      [(37, 37, 0), (5, 40, 35), (33, 50, 10)], itertools.product((1, 4, 16), repeat=2)):
    got = block_mask.classify_blocks(spec, q_len, kv_len, block_q, block_k, q_offset)
    np.testing.assert_array_equal(got, _block_truth(spec, q_len, kv_len, block_q, block_k, q_offset))


def test_official_tokenizer_masks_skip_most_blocks():
  """At the release's shape (18,768 tokens) the classification is cheap and skips ~45 % of the tiles."""
  for spec in (MaskSpec.encoder(OFFICIAL), MaskSpec.decoder(OFFICIAL)):
    classes = block_mask.classify_blocks(spec, OFFICIAL.length, OFFICIAL.length, 128, 64)
    assert classes.shape == (147, 294)
    assert 0.4 < block_mask.skipped_fraction(classes) < 0.5
    assert np.mean(classes == block_mask.PARTIAL) < 0.03
  # Spot-check rows of the full-size classification against the dense rule.
  spec = MaskSpec.encoder(OFFICIAL)
  classes = block_mask.classify_blocks(spec, OFFICIAL.length, OFFICIAL.length, 128, 64)
  for row in (0, 10, 137, 146):
    q = np.arange(row * 128, min((row + 1) * 128, OFFICIAL.length))[:, None]
    allowed = spec.allowed(q, np.arange(OFFICIAL.length)[None, :])
    allowed = np.pad(allowed, ((0, 0), (0, 294 * 64 - OFFICIAL.length))).reshape(len(q), 294, 64)
    truth = np.where(allowed.all((0, 2)), block_mask.FULL, np.where(allowed.any((0, 2)), block_mask.PARTIAL, 0))
    np.testing.assert_array_equal(classes[row], truth)


def _inputs(batch, q_len, kv_len, heads, kv_heads, dim, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, q_len, heads, dim), dtype)
  k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, dim), dtype)
  v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, dim), dtype)
  cotangent = jax.random.normal(keys[3], (batch, q_len, heads, dim), jnp.float32)
  return q, k, v, cotangent


def _value_and_grads(fn, q, k, v, cotangent):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(cotangent.astype(out.dtype)))


def _reference(spec, scale=None, **kwargs):
  return lambda q, k, v: attention_lib.attention(q, k, v, spec, backend='xla', scale=scale, **kwargs)


CASES = {
    'encoder_toy': (MaskSpec.encoder(TOY), TOY.length, 0),
    'decoder_toy': (MaskSpec.decoder(TOY), TOY.length, 0),
    'encoder_mid': (MaskSpec.encoder(MID), MID.length, 0),
    'decoder_mid': (MaskSpec.decoder(MID), MID.length, 0),
    'causal': (MaskSpec.causal(), 45, 0),
    'full': (MaskSpec.full(), 45, 0),
}


@pytest.mark.parametrize('case', list(CASES))
def test_flash_forward_and_gradients_equal_xla_fp32(case):
  spec, length, _ = CASES[case]
  q, k, v, cotangent = _inputs(2, length, length, 4, 2, 16)  # grouped-query: 2 query heads per k/v head
  got = _value_and_grads(lambda *a: flash(*a, spec), q, k, v, cotangent)
  want = _value_and_grads(_reference(spec), q, k, v, cotangent)
  for name, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f'{case} {name}')


def test_flash_bfloat16_within_rounding_of_xla():
  """bf16 inputs: both paths multiply in bf16 with fp32 accumulation but round the probabilities at different
  points (unnormalised per block here, normalised there), so they differ by a few bf16 ulps (2^-8 relative) of
  the O(1) outputs; 3e-2 absolute is ~8 ulps at magnitude 1."""
  spec = MaskSpec.encoder(MID)
  q, k, v, cotangent = _inputs(1, MID.length, MID.length, 2, 2, 32, jnp.bfloat16)
  got = _value_and_grads(lambda *a: flash(*a, spec), q, k, v, cotangent)
  want = _value_and_grads(_reference(spec), q, k, v, cotangent)
  exact = _value_and_grads(_reference(spec), *(x.astype(jnp.float32) for x in (q, k, v)), cotangent)
  for name, g, w, e in zip(('out', 'dq', 'dk', 'dv'), got, want, exact):
    assert g.dtype == jnp.bfloat16
    g, w, e = (np.asarray(x, np.float32) for x in (g, w, e))
    np.testing.assert_allclose(g, w, atol=3e-2, rtol=3e-2, err_msg=name)
    # And the kernel is no further from the fp32 result than the xla path is.
    assert np.abs(g - e).max() <= 1.5 * np.abs(w - e).max() + 1e-3, name


def test_flash_runtime_key_mask_and_empty_rows():
  """kv_valid (left padding) masks keys; a causal row whose keys are all padding gives zeros and zero grads."""
  spec = MaskSpec.causal()
  q, k, v, cotangent = _inputs(2, 40, 40, 2, 2, 16)
  kv_valid = jnp.arange(40)[None, :] >= jnp.array([[0], [7]])  # row 1: first 7 keys are padding
  got = _value_and_grads(lambda *a: flash(*a, spec, kv_valid=kv_valid), q, k, v, cotangent)
  want = _value_and_grads(_reference(spec, kv_valid=kv_valid), q, k, v, cotangent)
  for name, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert np.all(np.isfinite(g)), name
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)
  np.testing.assert_array_equal(got[0][1, :7], 0)


def test_flash_causal_with_query_offset():
  """A chunk of queries continuing a cached prefix (static offset) matches the reference."""
  spec = MaskSpec.causal()
  q, k, v, cotangent = _inputs(1, 20, 52, 2, 1, 16)
  got = _value_and_grads(lambda *a: flash(*a, spec, q_offset=32), q, k, v, cotangent)
  want = _value_and_grads(_reference(spec, q_offset=32), q, k, v, cotangent)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_flash_under_jit_vmap_and_shard_map():
  spec = MaskSpec.decoder(TOY)
  q, k, v, _ = _inputs(4, TOY.length, TOY.length, 4, 4, 16)
  want = _reference(spec)(q, k, v)
  jitted = jax.jit(lambda *a: flash(*a, spec))
  np.testing.assert_allclose(jitted(q, k, v), want, atol=1e-5)
  per_example = jax.vmap(lambda *a: flash(*(x[None] for x in a), spec)[0])
  np.testing.assert_allclose(per_example(q, k, v), want, atol=1e-5)
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ('data', 'tensor'))
  spec_bh = P('data', None, 'tensor', None)
  sharded = jax.shard_map(lambda *a: flash(*a, spec), mesh=mesh, in_specs=(spec_bh,) * 3, out_specs=spec_bh)
  np.testing.assert_allclose(jax.jit(sharded)(q, k, v), want, atol=1e-5)
  # Gradients through the sharded kernel (batch over 'data', heads over 'tensor').
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(sharded(*a) ** 2), argnums=(0, 1, 2)))(q, k, v)
  want_grads = jax.grad(lambda *a: jnp.sum(_reference(spec)(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('spec', [MaskSpec.encoder(MID), MaskSpec.causal()], ids=['encoder', 'causal'])
def test_splash_backend_equals_xla_in_interpret_mode(spec, monkeypatch):
  monkeypatch.setenv(attention_lib.INTERPRET_ENV, '1')
  length = MID.length
  q, k, v, cotangent = _inputs(2, length, length, 2, 1, 64)
  splash = lambda *a: attention_lib.attention(*a, spec, backend='splash')
  got = _value_and_grads(splash, q, k, v, cotangent)
  want = _value_and_grads(_reference(spec), q, k, v, cotangent)
  for name, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5, err_msg=name)


def test_pallas_backend_through_the_attention_entry_point(monkeypatch):
  spec = MaskSpec.encoder(TOY)
  q, k, v, _ = _inputs(1, TOY.length, TOY.length, 2, 2, 16)
  want = _reference(spec)(q, k, v)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    attention_lib._warned.clear()
    fallback = attention_lib.attention(q, k, v, spec, backend='pallas')
  assert any("falling back to 'blockwise'" in str(w.message) for w in caught)
  np.testing.assert_allclose(fallback, want, atol=1e-6)
  monkeypatch.setenv(attention_lib.INTERPRET_ENV, '1')
  np.testing.assert_allclose(attention_lib.attention(q, k, v, spec, backend='pallas'), want, atol=1e-5)


def test_bad_inputs_fail_with_clear_errors():
  spec = MaskSpec.full()
  q, k, v, _ = _inputs(1, 32, 32, 4, 4, 16)
  with pytest.raises(ValueError, match='head dim 24 is not supported'):
    flash(q[..., :12].repeat(2, -1), k[..., :12].repeat(2, -1), v[..., :12].repeat(2, -1), spec)
  with pytest.raises(ValueError, match='multiple of key/value heads'):
    flash(q, k[:, :, :3], v[:, :, :3], spec)
  with pytest.raises(ValueError, match='block_q=24 must be a power of two'):
    flash_attention(q, k, v, spec, block_q=24, interpret=True)
  with pytest.raises(ValueError, match='share one dtype'):
    flash(q.astype(jnp.bfloat16), k, v, spec)
  with pytest.raises(ValueError, match='layout length'):
    flash(q, k, v, MaskSpec.encoder(TOY))


def test_kernel_memory_grows_linearly_with_length():
  """The compiled forward+backward holds O(L) temporaries (no L×L buffer); the dense reference holds O(L²)."""
  def temp_bytes(fn, length):
    x = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)
    grad = jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2))
    return jax.jit(grad).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

  spec = MaskSpec.causal()
  kernel = lambda q, k, v: flash_attention(q, k, v, spec, block_q=64, block_k=64, interpret=True)
  dense = _reference(spec)
  kernel_growth = temp_bytes(kernel, 2048) / temp_bytes(kernel, 512)
  dense_growth = temp_bytes(dense, 2048) / temp_bytes(dense, 512)
  assert kernel_growth < 4.5, kernel_growth  # 4x the length → ~4x the memory
  assert dense_growth > 12, dense_growth


def test_bench_attention_reports_every_path(tmp_path, monkeypatch):
  import json
  from landiff_jax.cli import main
  from landiff_jax.bench import attention as bench_attention
  monkeypatch.setenv(attention_lib.INTERPRET_ENV, '1')
  monkeypatch.setattr(bench_attention, 'JAX_PATHS', ('pallas', 'xla', 'jax_nn'))  # splash: tested above, slow here
  out = tmp_path / 'bench.json'
  assert main(['bench', 'attention', '--config=configs/tiny.py', '--repeats', '1', '--dtype', 'float32',
               '--tokens', '40', '--no-reference', '--out', str(out)]) == 0
  cases = json.loads(out.read_text())['cases']
  assert set(cases) == {'tokenizer_encoder_b1', 'tokenizer_encoder_b4', 'tokenizer_decoder_b1',
                        'tokenizer_decoder_b4', 'lm_causal_b2'}
  for entry in cases.values():
    assert set(entry['paths']) == {'pallas', 'xla', 'jax_nn'}
    assert entry['paths']['pallas']['forward_backward']['median_s'] > 0
    assert entry['paths']['xla']['time_vs_pallas']['forward'] > 0
  assert cases['lm_causal_b2']['blocks_skipped'] == 0  # 40 tokens fit one 128-row block


def test_tiles_come_from_the_table_and_other_tiles_and_launch_orders_equal_xla():
  from landiff_jax.kernels import flash_attention as fa
  assert fa.tiles_for(64, 'frame_causal_decoder') == fa.TUNED_TILES[(64, 'frame_causal_decoder')]
  assert fa.tiles_for(128, 'full') == fa.Tiles(64, 64, 8, 2)  # not in the table: the head dim's default
  spec = MaskSpec.decoder(MID)
  q, k, v = (jax.random.normal(key, (1, MID.length, 2, 16)) for key in jax.random.split(jax.random.key(5), 3))
  want = attention_lib.xla_attention(q, k, v, spec, scale=0.25)
  cotangent = jax.random.normal(jax.random.key(6), q.shape)
  grads = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent), (0, 1, 2))(q, k, v)
  want_grads = grads(lambda q, k, v: attention_lib.xla_attention(q, k, v, spec, scale=0.25))
  for tiles in (fa.Tiles(16, 32, 8, 3, heavy_first=True),):  # another tile shape, launched last row first
    kernel = lambda q, k, v, tiles=tiles: fa.flash_attention(q, k, v, spec, scale=0.25, tiles=tiles, interpret=True)
    np.testing.assert_allclose(np.asarray(kernel(q, k, v)), np.asarray(want), atol=1e-5)
    for got, expected in zip(grads(kernel), want_grads):
      np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_bench_attention_sweep_times_each_candidate_and_prints_the_table(tmp_path, monkeypatch):
  import json
  from landiff_jax.bench import attention as bench_attention
  from landiff_jax.cli import main
  from landiff_jax.kernels import flash_attention as fa
  monkeypatch.setenv(attention_lib.INTERPRET_ENV, '1')
  monkeypatch.setitem(fa.SWEEP_TILES, 16, (fa.Tiles(32, 16, 4, 3, True), fa.Tiles(16, 32, 8, 2)))
  monkeypatch.setattr(fa, 'TUNED_TILES', {(16, 'causal'): fa.Tiles(16, 16, 4, 2)})  # tuned first, then candidates
  every_case = bench_attention.cases
  monkeypatch.setattr(bench_attention, 'cases', lambda *a: [c for c in every_case(*a)
                                                            if c['name'] in ('tokenizer_decoder_b1', 'lm_causal_b2')])
  out = tmp_path / 'sweep.json'
  assert main(['bench', 'attention', '--config=configs/tiny.py', '--repeats', '1', '--dtype', 'float32',
               '--tokens', '40', '--no-reference', '--sweep', '2', '--out', str(out)]) == 0
  result = json.loads(out.read_text())
  for name, entry in result['cases'].items():
    tuned = 'pallas_16x16_w4_s2' if name == 'lm_causal_b2' else 'pallas_128x64_w4_s2'  # (the default for d 16)
    assert set(entry['paths']) == {tuned, 'pallas_32x16_w4_s3_heavy_first', 'cudnn'}  # tuned + 1 candidate
    assert entry['paths'][tuned]['forward_backward']['median_s'] > 0
    assert 'skipped' in entry['paths']['cudnn']
  assert set(result['best_tiles']) == {'16/frame_causal_decoder', '16/causal'}
  assert result['best_tiles']['16/causal']['line'].startswith("(16, 'causal'): Tiles(")
  assert result['table'].count('\n') == 2 + 2 * 3 - 1  # header, separator, 2 cases × (2 candidates + cudnn)
