"""`landiff-jax bench tokenizer`: encode and decode one group of Theia features at the configured size, once per
attention backend (xla materialises the masked scores; pallas/splash skip masked blocks where registered), with
TFLOP/s and MFU from the analytic count (`bench.flops.tokenizer_encode/decode`: matmuls and the masks' allowed
pairs)."""

from __future__ import annotations

import importlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax.bench import device_peak_bytes, flops, gib, random_params, time_calls
from landiff_jax.models import tokenizer as tokenizer_model
from landiff_jax.nn import available_backends

attention_lib = importlib.import_module('landiff_jax.nn.attention')

BACKENDS = ('xla', 'blockwise', 'cudnn', 'pallas', 'splash')


def run_backend(config: Any, options: Any, backend: str, features: np.ndarray) -> dict:
  dtype = jnp.dtype(options.dtype)
  model = tokenizer_model.build_tokenizer(config.tokenizer, dtype=dtype, attention_backend=backend)
  params = random_params(model.init_params, dtype)
  x = jnp.asarray(features, dtype)
  result = {}
  start = time.perf_counter()
  encode = jax.jit(lambda p, f: model.apply(p, f, method=tokenizer_model.VideoTokenizer.encode_group))
  encode_compiled = encode.lower(params, x).compile()
  ids = encode_compiled(params, x)
  decode = jax.jit(lambda p, i: model.apply(p, i, method=tokenizer_model.VideoTokenizer.decode_group))
  decode_compiled = decode.lower(params, ids).compile()
  result['compile_s'] = round(time.perf_counter() - start, 2)
  result['encode'] = time_calls(lambda: encode_compiled(params, x), options.repeats)
  result['decode'] = time_calls(lambda: decode_compiled(params, ids), options.repeats)
  for phase, work in (('encode', flops.tokenizer_encode(config, options.batch)),
                      ('decode', flops.tokenizer_decode(config, options.batch))):
    seconds = result[phase]['median_s']
    mfu = flops.mfu(work, seconds)
    result[phase].update(tflop=float(f'{work / 1e12:.4g}'), tflops=float(f'{work / seconds / 1e12:.4g}'),
                         mfu=None if mfu is None else round(mfu, 4))
  result['tokens'] = int(ids.shape[1])
  result['peak_gib'] = gib(device_peak_bytes())
  return result


def run(config: Any, options: Any) -> dict:
  t = config.tokenizer
  shape = (options.batch, t.frames_per_group, *t.feature_grid, t.feature_dim)
  features = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  result = dict(benchmark='tokenizer encode + decode of one group', features=list(shape), dtype=options.dtype,
                device=str(jax.devices()[0].device_kind), jax=jax.__version__, backends={})
  registered = available_backends()
  for backend in BACKENDS:
    if backend not in registered:
      result['backends'][backend] = {'skipped': 'not registered in this build'}
      continue
    dim = config.tokenizer.width // config.tokenizer.num_heads
    probe = jax.ShapeDtypeStruct((1, 1, config.tokenizer.num_heads, dim), jnp.dtype(options.dtype))
    reason = attention_lib.unavailable_reason(backend, probe, probe, probe)
    if reason is not None:
      result['backends'][backend] = {'skipped': reason}
      continue
    try:
      result['backends'][backend] = run_backend(config, options, backend, features)
    except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory: report it, bench the rest
      result['backends'][backend] = {'failed': f'{type(e).__name__}: {str(e)[:300]}'}
  return result
