"""The 'blockwise' backend equals 'xla' (forward and gradients, every mask, lengths that are not block multiples) in
O(L) memory; 'auto' resolves per platform; explicit choices above the scores limit are refused; every entry point
builds its models with the configured backend."""

import functools
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landiff_jax.attention_limit import max_scores_gib, scores_limit
from landiff_jax.kernels.blockwise import blockwise_attention
from landiff_jax.nn.masks import MaskSpec, VideoTokenLayout

attention_lib = importlib.import_module('landiff_jax.nn.attention')

LAYOUT = VideoTokenLayout(num_frames=3, tokens_per_frame=5, num_iframe_tokens=3, num_pframe_tokens=2)  # L = 22
OFFICIAL_TOKENIZER = VideoTokenLayout(num_frames=13, tokens_per_frame=1350, num_iframe_tokens=330,
                                      num_pframe_tokens=74)  # L = 18,768

CASES = {
    # name: (mask, lq, lk, q_offset, padded keys); blocks of 4 queries x 5 keys divide none of these lengths
    'full': (MaskSpec.full(), 13, 11, 0, False),
    'full_padded': (MaskSpec.full(), 9, 12, 0, True),
    'causal': (MaskSpec.causal(), 13, 13, 0, True),
    'causal_offset': (MaskSpec.causal(), 6, 13, 7, True),
    'causal_traced_offset': (MaskSpec.causal(), 1, 13, 'traced', True),
    'encoder': (MaskSpec.encoder(LAYOUT), 22, 22, 0, True),
    'decoder': (MaskSpec.decoder(LAYOUT), 22, 22, 0, False),
}


def _inputs(b, lq, lk, h, hkv, d, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((b, lq, h, d), (b, lk, hkv, d), (b, lk, hkv, d), (b, lq, h, d)))


@functools.partial(jax.jit, static_argnames=('fn',))
def _value_and_grads(fn, q, k, v, cotangent, kv_valid, offset):
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, kv_valid, offset), q, k, v)
  return (out, *vjp(cotangent))


@pytest.mark.parametrize('name', list(CASES))
def test_blockwise_equals_xla_forward_and_gradients(name):
  mask, lq, lk, q_offset, padded = CASES[name]
  q, k, v, cotangent = _inputs(2, lq, lk, 6, 2, 8, seed=len(name))  # grouped-query: 3 query heads per kv head
  kv_valid = None
  if padded:  # batch row 1 loses its first keys (left padding): some causal / frame-causal rows lose every key
    kv_valid = jnp.ones((2, lk), bool).at[1, :3].set(False)
  traced = q_offset == 'traced'
  offset = jnp.int32(lk - lq) if traced else q_offset  # jit argument: traced inside

  def static(fn):  # a Python-int offset stays static; the traced one arrives as a jit argument
    return fn if traced else (lambda q, k, v, kv_valid, _: fn(q, k, v, kv_valid, q_offset))

  blockwise = static(lambda q, k, v, kv_valid, off: blockwise_attention(
      q, k, v, mask, kv_valid=kv_valid, q_offset=off, scale=0.4, block_q=4, block_k=5))
  xla = static(lambda q, k, v, kv_valid, off: attention_lib.xla_attention(
      q, k, v, mask, kv_valid=kv_valid, q_offset=off, scale=0.4))
  got = _value_and_grads(blockwise, q, k, v, cotangent, kv_valid, offset)
  want = _value_and_grads(xla, q, k, v, cotangent, kv_valid, offset)
  for label, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert np.all(np.isfinite(np.asarray(g))), label
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5, err_msg=label)
  if padded and mask.kind != 'full':
    empty = ~np.asarray(attention_lib._allowed_keys(mask, lq, lk, offset, kv_valid)).any(-1)[:, 0]  # [B, Lq]
    assert empty.any() or name != 'causal'  # left padding empties the first causal rows
    np.testing.assert_array_equal(np.asarray(got[0])[empty], 0.0)


def test_blockwise_in_bf16_and_under_vmap():
  q, k, v, _ = _inputs(4, 22, 22, 4, 4, 16, seed=3)
  mask = MaskSpec.encoder(LAYOUT)
  stacked = [a.reshape(2, 2, *a.shape[1:]) for a in (q, k, v)]
  got = jax.jit(jax.vmap(lambda q, k, v: attention_lib.attention(q, k, v, mask, backend='blockwise')))(*stacked)
  want = attention_lib.attention(q, k, v, mask, backend='xla')
  np.testing.assert_allclose(np.asarray(got).reshape(want.shape), np.asarray(want), atol=1e-5)
  low = attention_lib.attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), mask, backend='blockwise')
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(want), atol=3e-2)


def _temp_bytes(fn, length, heads=2, head_dim=32):
  x = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)
  grad = jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2))
  return jax.jit(grad).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_temporary_memory_grows_linearly_with_length():
  """Forward + backward compiled at three lengths: blockwise's temporaries double with L, xla's quadruple."""
  spec = MaskSpec.causal()
  blockwise = lambda q, k, v: blockwise_attention(q, k, v, spec, block_q=128, block_k=128)
  dense = lambda q, k, v: attention_lib.xla_attention(q, k, v, spec, scale=0.2)
  lengths = (1000, 2000, 4000)  # not block multiples
  blocked = [_temp_bytes(blockwise, n) for n in lengths]
  reference = [_temp_bytes(dense, n) for n in lengths]
  for small, large in zip(blocked, blocked[1:]):
    assert 1.5 < large / small < 2.5, blocked  # linear: 2x the length, ~2x the memory
  for small, large in zip(reference, reference[1:]):
    assert large / small > 3.5, reference  # quadratic
  assert reference[-1] > 10 * blocked[-1]


def test_blockwise_fits_the_tokenizer_group_at_release_size():
  """One 18,768-token group, 12 heads of 64, forward + backward on abstract shapes: the dense reference would hold
  15.7 GiB of float32 scores; blockwise holds under 1 GiB of temporaries."""
  spec = MaskSpec.encoder(OFFICIAL_TOKENIZER)
  temp = _temp_bytes(lambda q, k, v: attention_lib.attention(q, k, v, spec, backend='blockwise'),
                     OFFICIAL_TOKENIZER.length, heads=12, head_dim=64)
  assert temp < 2**30, temp / 2**30
  q = jax.ShapeDtypeStruct((1, OFFICIAL_TOKENIZER.length, 12, 64), jnp.float32)
  assert attention_lib.materialised_bytes('xla', q, q, spec) / 2**30 == pytest.approx(15.74, abs=0.01)


# --- choosing the backend ----------------------------------------------------------------------------------------


def _struct(b, lq, lk, h, d, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct((b, lq, h, d), dtype), jax.ShapeDtypeStruct((b, lk, h, d), dtype)


@pytest.mark.parametrize('name', ['full_padded', 'causal_traced_offset', 'encoder'])
def test_auto_is_blockwise_on_cpu_and_equals_xla(name):
  """(A KV-cache step, the traced offset, runs the dense einsum: its scores are one row per query.)"""
  mask, lq, lk, q_offset, padded = CASES[name]
  q, k, v, _ = _inputs(2, lq, lk, 4, 2, 8, seed=1)
  offset = jnp.int32(lk - lq) if q_offset == 'traced' else q_offset
  kv_valid = jnp.ones((2, lk), bool).at[0, -2:].set(False) if padded else None
  expected = 'xla' if q_offset == 'traced' else 'blockwise'
  assert attention_lib.resolve_backend('auto', q, k, v, mask, kv_valid=kv_valid, q_offset=offset) == expected
  run = jax.jit(lambda q, k, v, kv_valid, offset, backend: attention_lib.attention(
      q, k, v, mask, kv_valid=kv_valid, q_offset=offset if q_offset == 'traced' else q_offset, backend=backend),
                static_argnames='backend')
  got = run(q, k, v, kv_valid, offset, backend='auto')
  want = run(q, k, v, kv_valid, offset, backend='xla')
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_auto_rules_per_platform():
  resolve = attention_lib.resolve_backend
  encoder = MaskSpec.encoder(OFFICIAL_TOKENIZER)
  n = OFFICIAL_TOKENIZER.length
  dit_q, dit_k = _struct(2, 17776, 17776, 30, 64)
  tok_q, tok_k = _struct(1, n, n, 12, 64)
  lm_q, lm_k = _struct(2, 1244, 1244, 16, 128)
  step_q, step_k = _struct(2, 1, 1244, 16, 128)
  padding = jax.ShapeDtypeStruct((2, 1244), bool)
  traced = jnp.int32(1243)  # not a Python int: what a decode step's offset is under jit
  f32 = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)
  gpu = functools.partial(resolve, 'auto', platform='gpu')
  # decode steps (a few queries, small scores): one dense einsum everywhere, unless the limit forbids even that
  for platform in ('gpu', 'tpu', 'cpu'):
    assert resolve('auto', step_q, step_k, step_k, MaskSpec.causal(), kv_valid=padding, q_offset=traced,
                   platform=platform) == 'xla'
  # GPU: cuDNN for full / aligned causal, the Pallas kernel for frame-causal masks and padded prefill, blockwise
  # where neither fits
  assert gpu(dit_q, dit_k, dit_k, MaskSpec.full()) == 'cudnn'
  assert gpu(lm_q, lm_k, lm_k, MaskSpec.causal()) == 'cudnn'
  assert gpu(lm_q, lm_k, lm_k, MaskSpec.causal(), kv_valid=padding) == 'pallas'
  assert gpu(tok_q, tok_k, tok_k, encoder) == 'pallas'
  assert gpu(tok_q, tok_k, tok_k, MaskSpec.decoder(OFFICIAL_TOKENIZER)) == 'pallas'
  assert gpu(f32(dit_q), f32(dit_k), f32(dit_k), MaskSpec.full()) == 'pallas'  # cuDNN takes bf16/fp16 only
  assert gpu(step_q, step_k, step_k, MaskSpec.causal(), q_offset=traced, max_gib=1e-9) == 'blockwise'
  odd_q, odd_k = _struct(2, 300, 300, 4, 96, jnp.float32)  # a head dim the Pallas kernel does not take
  assert gpu(odd_q, odd_k, odd_k, MaskSpec.full()) == 'blockwise'
  # TPU: splash, except for runtime key masks and query offsets
  tpu = functools.partial(resolve, 'auto', platform='tpu')
  assert tpu(tok_q, tok_k, tok_k, encoder) == 'splash'
  assert tpu(dit_q, dit_k, dit_k, MaskSpec.full()) == 'splash'
  assert tpu(lm_q, lm_k, lm_k, MaskSpec.causal(), kv_valid=padding) == 'blockwise'
  assert tpu(step_q, step_k, step_k, MaskSpec.causal(), q_offset=traced, max_gib=1e-9) == 'blockwise'
  # CPU: always blockwise
  for q, k, mask in ((dit_q, dit_k, MaskSpec.full()), (tok_q, tok_k, encoder), (lm_q, lm_k, MaskSpec.causal())):
    assert resolve('auto', q, k, k, mask, platform='cpu') == 'blockwise'
  # explicit choices run as asked, except where they cannot
  assert resolve('xla', lm_q, lm_k, lm_k, MaskSpec.causal(), platform='gpu') == 'xla'
  assert resolve('cudnn', tok_q, tok_k, tok_k, encoder, platform='gpu') == 'cudnn'
  assert resolve('pallas', step_q, step_k, step_k, MaskSpec.causal(), q_offset=traced, platform='gpu') == 'blockwise'
  assert resolve('splash', lm_q, lm_k, lm_k, MaskSpec.causal(), kv_valid=padding, platform='tpu') == 'blockwise'
  assert resolve('cudnn', dit_q, dit_k, dit_k, MaskSpec.full(), platform='tpu') == 'splash'  # falls back to auto's


def test_unavailable_backend_warns_and_runs_the_auto_choice(monkeypatch):
  monkeypatch.delenv(attention_lib.INTERPRET_ENV, raising=False)
  monkeypatch.setattr(attention_lib, '_warned', set())
  q, k, v, _ = _inputs(1, 22, 22, 2, 2, 16)
  mask = MaskSpec.decoder(LAYOUT)
  with pytest.warns(UserWarning, match=r"'pallas' is unavailable .*falling back to 'blockwise'"):
    got = attention_lib.attention(q, k, v, mask, backend='pallas')
  np.testing.assert_allclose(np.asarray(got), np.asarray(attention_lib.attention(q, k, v, mask, backend='xla')),
                             atol=1e-5)


# --- the scores limit --------------------------------------------------------------------------------------------


def test_explicit_backends_above_the_limit_are_refused_with_the_fix():
  q, k, v, _ = _inputs(1, 300, 300, 4, 4, 8)  # xla: 1·4·300·300 float32 scores = 1.4 MB
  mask = MaskSpec.causal()
  assert max_scores_gib() == attention_lib.DEFAULT_MAX_SCORES_GIB == 4.0
  with scores_limit(2**-10):  # 1 MiB
    with pytest.raises(ValueError) as refused:
      attention_lib.attention(q, k, v, mask, backend='xla')
    message = str(refused.value)
    assert "'xla'" in message and 'GiB' in message and '--config.attention_backend=auto' in message
    assert 'attention_max_scores_gib=0.000976562' in message
    # the memory-efficient paths run under the same limit and agree with the reference run without one
    blocked = attention_lib.attention(q, k, v, mask, backend='blockwise')
    automatic = attention_lib.attention(q, k, v, mask)
  with scores_limit(None):
    assert max_scores_gib() is None
    dense = attention_lib.attention(q, k, v, mask, backend='xla')
  assert max_scores_gib() == 4.0  # the block leaves nothing behind
  np.testing.assert_allclose(np.asarray(blocked), np.asarray(dense), atol=1e-5)
  np.testing.assert_allclose(np.asarray(automatic), np.asarray(dense), atol=1e-5)


def test_release_sizes_refused_by_default_and_cudnn_dense_masks_counted():
  n = OFFICIAL_TOKENIZER.length
  spec = MaskSpec.encoder(OFFICIAL_TOKENIZER)
  q = jax.ShapeDtypeStruct((1, n, 12, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"'xla' would hold 15\.7 GiB .* attention_max_scores_gib=4"):
    jax.eval_shape(lambda q: attention_lib.attention(q, q, q, spec, backend='xla'), q)
  # cuDNN materialises a dense boolean mask and a bf16 bias for frame-causal masks: 0.984 GiB here
  dense_mask = attention_lib.materialised_bytes('cudnn', q, q, spec)
  assert dense_mask == n * n * 3
  attention_lib.check_scores_limit('cudnn', q, q, spec)  # under 4 GiB
  with pytest.raises(ValueError, match=r"'cudnn' would hold 0\.984 GiB of a dense frame_causal_encoder mask"):
    attention_lib.check_scores_limit('cudnn', q, q, spec, max_gib=0.5)
  assert attention_lib.materialised_bytes('cudnn', q, q, MaskSpec.full()) == 0  # no mask at all
  assert attention_lib.materialised_bytes('blockwise', q, q, spec) == 0
  with pytest.raises(ValueError, match='non-negative'):
    scores_limit(-1.0)


# --- entry points ------------------------------------------------------------------------------------------------


def _record_backends(monkeypatch) -> list[str]:
  """Every attention call from here on appends the backend it runs (and runs blockwise, which is cheap to trace)."""
  calls = []
  for name, backend in list(attention_lib._BACKENDS.items()):

    def recorded(q, k, v, mask, *, name=name, **kwargs):
      calls.append(name)
      return attention_lib.blockwise_backend(q, k, v, mask, **kwargs)

    monkeypatch.setitem(attention_lib._BACKENDS, name, attention_lib.Backend(recorded, backend.unavailable_reason))
  return calls


def _model_backend(model):
  return getattr(model, 'attention_backend', None) or model.backend


@pytest.mark.parametrize('backend', ['auto', 'pallas'])
@pytest.mark.parametrize('stage', ['tokenizer', 'theia', 'lm', 'backbone', 'diffusion', 'vae'])
def test_every_training_task_builds_its_model_with_the_configured_backend(stage, backend, monkeypatch):
  from landiff_jax.cli import TRAIN_TASKS
  from landiff_jax.config import load_config
  monkeypatch.setenv(attention_lib.INTERPRET_ENV, '1')  # 'pallas' runs (interpreted) on CPU
  config = load_config(f'configs/train.py:{stage},tiny', [f'attention_backend={backend}'])
  module_name, class_name = TRAIN_TASKS[stage].split(':')
  task = getattr(importlib.import_module(module_name), class_name)(config)
  calls = _record_backends(monkeypatch)
  shapes = task.example_shapes(2)
  params = jax.eval_shape(task.init_params, jax.random.key(0), shapes)
  jax.eval_shape(task.loss_fn, params, shapes, jax.random.key(1))
  if stage == 'vae':  # the CogVideoX VAE has no attention layer
    assert not hasattr(task.model, 'backend') and calls == []
    return
  assert _model_backend(task.model) == backend
  assert calls and set(calls) == {'blockwise' if backend == 'auto' else 'pallas'}, calls


@pytest.fixture(scope='module')
def encoder_dirs(tmp_path_factory):
  """A directory holding random tiny theia/ and tokenizer/ model directories, and a clip to encode."""
  from landiff_jax import checkpoints
  from landiff_jax.config import load_config
  from landiff_jax.data import shapes
  from landiff_jax.data.video import write_video
  from landiff_jax.parallel.sharding import strip_partitioning
  root = tmp_path_factory.mktemp('encode')
  config = load_config('configs/tiny.py')
  for part, key in (('theia', 0), ('tokenizer', 1)):
    model = checkpoints.build_model(part, config[part])
    params = strip_partitioning(jax.jit(model.init_params)(jax.random.key(key)))
    checkpoints.save(str(root / 'models' / part), part=part, config=checkpoints.part_config(config, part),
                     params=params)
  clip = shapes.render(shapes.sample_spec(0, 1), 3, config.video.height, config.video.width)
  write_video(str(root / 'clip.mp4'), clip, fps=8)
  return root


def test_encode_builds_theia_and_tokenizer_with_the_configured_backend_and_limit(encoder_dirs, capsys):
  from landiff_jax.cli import main
  args = ['encode', '--video', str(encoder_dirs / 'clip.mp4'), '--ckpt', str(encoder_dirs / 'models'),
          '--config=configs/tiny.py', '--config.attention_max_scores_gib=0', '--overwrite']
  out = encoder_dirs / 'ids.npy'
  assert main(args + ['--out', str(out), '--config.attention_backend=xla']) == 1
  error = capsys.readouterr().err
  assert "Attention backend 'xla' would hold" in error and '--config.attention_backend=auto' in error
  assert not out.exists()
  assert main(args + ['--out', str(out), '--config.attention_backend=blockwise']) == 0
  assert np.load(out).ndim == 1


def test_pipeline_load_builds_every_attention_part_with_the_configured_backend(tmp_path, monkeypatch):
  """Pipeline.load passes config.attention_backend unchanged (no platform swap) to the DiT, LM and tokenizer."""
  from landiff_jax import pipeline
  from landiff_jax.config import load_config
  built = {}

  def load_part(path, mesh, rules, **kwargs):
    built[os.path.basename(path)] = kwargs.get('attention_backend')
    return object(), {}

  monkeypatch.setattr(pipeline, 'load_part', load_part)
  monkeypatch.setattr(pipeline.t5_model, 'load_tokenizer', lambda path: None)
  monkeypatch.setattr(pipeline, 'check_directory', lambda directory: None, raising=False)  # the parts are stubs
  for sub in (*pipeline.PARTS, *pipeline.TEXT_TOKENIZERS.values()):
    (tmp_path / sub).mkdir()
  for backend in ('auto', 'xla'):
    config = load_config('configs/tiny.py', [f'attention_backend={backend}'])
    with monkeypatch.context() as gpu:  # an explicit 'xla' stays 'xla' on a GPU too (no silent swap to cudnn)
      gpu.setattr(jax, 'default_backend', lambda: 'gpu')
      pipeline.Pipeline.load(str(tmp_path), config)
    assert {part: built[part] for part in ('dit', 'lm', 'tokenizer')} == dict.fromkeys(('dit', 'lm', 'tokenizer'),
                                                                                       backend)


def test_cli_sets_the_limit_from_the_config(monkeypatch):
  from landiff_jax import cli
  seen = []
  monkeypatch.setitem(cli.COMMANDS, 'config', (lambda args, config: seen.append(max_scores_gib()) or 0, ''))
  assert cli.main(['config', '--config=configs/tiny.py', '--config.attention_max_scores_gib=0.25']) == 0
  assert cli.main(['config', '--config=configs/tiny.py', '--config.attention_max_scores_gib=inf']) == 0
  assert cli.main(['config', '--config=configs/tiny.py']) == 0
  assert seen == [0.25, None, 4.0]
  assert cli.main(['config', '--config=configs/tiny.py', '--config.attention_max_scores_gib=-1']) == 2
