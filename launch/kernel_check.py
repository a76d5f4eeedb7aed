"""The Pallas kernel's native correctness check (run by launch/gpu_check.sh on a GPU): forward and gradients of
`flash_attention` against the dense `xla` reference at the highest matmul precision, on the tokenizer's encoder and
decoder masks at the release's layout (18,768 tokens), in bfloat16 and float32.

Error measure: ‖kernel − reference‖ / ‖reference‖ per output (out, dq, dk, dv), the reference computed in
float32 at HIGHEST precision on the same (upcast) inputs. Limits: 1e-4 in float32 (fp32 arithmetic lands far
below), 2e-2 in bfloat16 (bf16 operands land between 1e-3 and 1e-2); NaN never passes. Fresh random inputs per
case. bfloat16 runs first (its kernels compile in seconds, float32's take up to a minute) and the JSON is
rewritten after every case, so a time limit keeps every finished case.

Usage: python3 launch/kernel_check.py --out FILE [--tiny] [--heads N]
(--tiny: a 108-token layout in Pallas interpret mode, for CPU.)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax.kernels.flash_attention import flash_attention
from landiff_jax.nn.masks import MaskSpec, VideoTokenLayout

# the module, not the function `landiff_jax.nn` re-exports under the same name
attention_lib = importlib.import_module('landiff_jax.nn.attention')

RELEASE = VideoTokenLayout(num_frames=13, tokens_per_frame=1350, num_iframe_tokens=330, num_pframe_tokens=74)
TINY = VideoTokenLayout(num_frames=4, tokens_per_frame=21, num_iframe_tokens=9, num_pframe_tokens=5)
LIMITS = {'bfloat16': 2e-2, 'float32': 1e-4}


def relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if not np.all(np.isfinite(got)):
    return float('nan')
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def check_case(spec: MaskSpec, dtype, heads: int, head_dim: int, seed: int, interpret: bool) -> dict:
  length = spec.layout.length
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (1, length, heads, head_dim)
  q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys[:3])
  cotangent = jax.random.normal(keys[3], shape, jnp.float32)
  scale = 1.0 / np.sqrt(head_dim)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)

  kernel = lambda q, k, v: flash_attention(q, k, v, spec, scale=scale, interpret=interpret)
  reference = lambda q, k, v: attention_lib.xla_attention(q, k, v, spec, scale=scale)
  start = time.perf_counter()
  out, grads = jax.jit(lambda q, k, v: (kernel(q, k, v), jax.grad(loss(kernel), (0, 1, 2))(q, k, v)))(q, k, v)
  jax.block_until_ready((out, grads))
  kernel_s = time.perf_counter() - start
  with jax.default_matmul_precision('highest'):
    upcast = [x.astype(jnp.float32) for x in (q, k, v)]
    want_out, want_grads = jax.jit(lambda q, k, v: (reference(q, k, v), jax.grad(loss(reference), (0, 1, 2))(
        q, k, v)))(*upcast)
  errors = dict(out=relative_error(out, want_out))
  errors.update({name: relative_error(g, w) for name, g, w in zip(('dq', 'dk', 'dv'), grads, want_grads)})
  limit = LIMITS[jnp.dtype(dtype).name]
  ok = all(np.isfinite(e) and e <= limit for e in errors.values())
  return dict(mask=spec.kind, dtype=jnp.dtype(dtype).name, tokens=length, heads=heads, head_dim=head_dim,
              relative_error={k: float(f'{e:.3g}') for k, e in errors.items()}, limit=limit, passed=bool(ok),
              kernel_compile_and_run_s=round(kernel_s, 2))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--heads', type=int, default=2)
  args = parser.parse_args(argv)
  interpret = args.tiny or jax.default_backend() != 'gpu'
  layout = TINY if args.tiny else RELEASE
  result = dict(check='pallas flash attention vs xla (highest precision), forward and gradients',
                device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), jax=jax.__version__,
                interpret=interpret, cases={})

  def write():
    with open(args.out + '.tmp', 'w') as f:
      json.dump(result, f, indent=2)
    os.replace(args.out + '.tmp', args.out)

  seed = 0
  for dtype in ('bfloat16', 'float32'):
    for spec in (MaskSpec.encoder(layout), MaskSpec.decoder(layout)):
      name = f'{spec.kind}_{dtype}'
      seed += 1
      try:
        result['cases'][name] = check_case(spec, jnp.dtype(dtype), args.heads, 64, seed, interpret)
      except Exception as e:  # pylint: disable=broad-except  # report it, check the rest
        result['cases'][name] = dict(passed=False, failed=f'{type(e).__name__}: {str(e)[:400]}')
      print(name, json.dumps(result['cases'][name]), flush=True)
      write()
  result['passed'] = all(case.get('passed') for case in result['cases'].values())
  write()
  return 0 if result['passed'] else 1


if __name__ == '__main__':
  sys.exit(main())
