"""Times every attention backend at the release's shapes on this device and records what 'auto' picks, so the
choice can be checked against the measured fastest. One accelerator; prints JSON and writes it to argv[1].

    python launch/attention_auto_check.py out.json [--small]

Cases: the tokenizer's frame-causal encoder mask (one 18,768-token group, 12 heads, D=64), the DiT's full
attention (17,776 tokens, 30 heads, D=64, CFG batch 2), the LM's causal prefill with left padding (1,244 tokens,
16 heads, D=128, batch 2) and one LM decode step (a traced offset, 1 query against 1,244 keys). bf16 inputs;
forward and forward+backward medians. Also checks 'blockwise' against 'xla' in float32 on this device (forward and
gradients, every mask kind) and its compiled temporary memory at the tokenizer's size.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from landiff_jax.attention_limit import scores_limit  # pylint: disable=wrong-import-position
from landiff_jax.nn.masks import MaskSpec, VideoTokenLayout  # pylint: disable=wrong-import-position

attention_lib = importlib.import_module('landiff_jax.nn.attention')
PATHS = ('auto', 'pallas', 'cudnn', 'blockwise', 'xla')


def cases(small: bool) -> list[dict]:
  layout = VideoTokenLayout(3, 40, 10, 4) if small else VideoTokenLayout(13, 1350, 330, 74)
  dit_len, lm_len = (300, 100) if small else (17776, 1244)
  return [
      dict(name='tokenizer_encoder', mask=MaskSpec.encoder(layout), b=1, lq=layout.length, lk=layout.length, h=12,
           d=64, grad=True),
      dict(name='dit_full', mask=MaskSpec.full(), b=2, lq=dit_len, lk=dit_len, h=30, d=64, grad=True),
      dict(name='lm_prefill', mask=MaskSpec.causal(), b=2, lq=lm_len, lk=lm_len, h=16, d=128, grad=True,
           padded=True),
      dict(name='lm_decode', mask=MaskSpec.causal(), b=2, lq=1, lk=lm_len, h=16, d=128, grad=False, padded=True,
           traced_offset=lm_len - 1),
  ]


def inputs(case: dict, dtype):
  rng = np.random.default_rng(0)
  shapes = ((case['b'], case['lq'], case['h'], case['d']), (case['b'], case['lk'], case['h'], case['d']))
  q, k, v = (jnp.asarray(rng.standard_normal(shapes[i > 0]), dtype) for i in range(3))
  kv_valid = None
  if case.get('padded'):
    kv_valid = jnp.ones((case['b'], case['lk']), bool).at[1, :case['lk'] // 10].set(False)  # left padding
  return q, k, v, kv_valid


def median_time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def run_path(case: dict, path: str, q, k, v, kv_valid, repeats: int) -> dict:
  mask, offset = case['mask'], case.get('traced_offset')
  call = lambda q, k, v, off: attention_lib.attention(q, k, v, mask, backend=path, kv_valid=kv_valid,
                                                      q_offset=0 if offset is None else off)
  off = jnp.int32(offset or 0)
  resolved = attention_lib.resolve_backend(path, q, k, v, mask, kv_valid=kv_valid,
                                           q_offset=0 if offset is None else off)
  result = dict(runs=resolved)
  start = time.perf_counter()
  forward = jax.jit(call).lower(q, k, v, off).compile()
  result['compile_forward_s'] = round(time.perf_counter() - start, 2)
  result['forward_ms'] = round(1e3 * median_time(forward, (q, k, v, off), repeats), 3)
  out = forward(q, k, v, off)
  if case['grad']:
    loss = lambda q, k, v, off: jnp.sum(call(q, k, v, off).astype(jnp.float32) * out.astype(jnp.float32))
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, off).compile()
    result['forward_backward_ms'] = round(1e3 * median_time(backward, (q, k, v, off), repeats), 3)
    analysis = backward.memory_analysis()
    if analysis is not None:
      result['forward_backward_temp_gib'] = round(analysis.temp_size_in_bytes / 2**30, 3)
  return result, out


def exactness() -> dict:
  """blockwise vs xla in float32 on this device: max abs difference of the output and of each gradient."""
  layout = VideoTokenLayout(3, 37, 11, 5)
  found = {}
  for name, mask, lq, lk, offset in (('full', MaskSpec.full(), 301, 277, 0), ('causal', MaskSpec.causal(), 300, 300, 0),
                                     ('causal_offset', MaskSpec.causal(), 45, 300, 255),
                                     ('encoder', MaskSpec.encoder(layout), layout.length, layout.length, 0),
                                     ('decoder', MaskSpec.decoder(layout), layout.length, layout.length, 0)):
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, lq, 4, 32)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, lk, 2, 32)), jnp.float32) for _ in range(2))
    kv_valid = jnp.ones((2, lk), bool).at[1, :7].set(False)
    cot = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def value_and_grads(backend, q, k, v, kv_valid, cot):
      f = lambda q, k, v: attention_lib.attention(q, k, v, mask, backend=backend, kv_valid=kv_valid, q_offset=offset)
      out, vjp = jax.vjp(f, q, k, v)
      return (out, *vjp(cot))

    got = jax.jit(value_and_grads, static_argnums=0)('blockwise', q, k, v, kv_valid, cot)
    want = jax.jit(value_and_grads, static_argnums=0)('xla', q, k, v, kv_valid, cot)
    found[name] = [float(jnp.max(jnp.abs(g - w))) for g, w in zip(got, want)]
  return found


def main() -> None:
  out_path = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith('--') else 'attention_auto.json'
  small = '--small' in sys.argv
  repeats = 2 if small else 5
  report = dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(), jax=jax.__version__,
                cases={})
  try:
    with jax.default_matmul_precision('highest'):  # GPUs would otherwise run float32 matmuls in tf32
      report['blockwise_vs_xla_fp32'] = exactness()
  except Exception as e:  # pylint: disable=broad-except
    report['blockwise_vs_xla_fp32'] = {'failed': f'{type(e).__name__}: {str(e)[:400]}'}
  print(json.dumps(report['blockwise_vs_xla_fp32']), flush=True)
  with scores_limit(None):  # this script measures xla too where it fits
    for case in cases(small):
      q, k, v, kv_valid = inputs(case, jnp.bfloat16)
      entry = dict(shape=[case['b'], case['lq'], case['lk'], case['h'], case['d']], mask=case['mask'].kind,
                   paths={})
      outputs = {}
      for path in PATHS:
        if path == 'xla' and case['b'] * case['h'] * case['lq'] * case['lk'] * 4 > 8 * 2**30:
          entry['paths'][path] = {'skipped': 'more than 8 GiB of scores'}
          continue
        try:
          entry['paths'][path], outputs[path] = run_path(case, path, q, k, v, kv_valid, repeats)
        except Exception as e:  # pylint: disable=broad-except  # report it, time the rest
          entry['paths'][path] = {'failed': f'{type(e).__name__}: {str(e)[:400]}'}
      reference = outputs.get('xla', outputs.get('blockwise'))
      for path, out in outputs.items():
        entry['paths'][path]['max_abs_diff_vs_' + ('xla' if 'xla' in outputs else 'blockwise')] = float(
            jnp.max(jnp.abs(out.astype(jnp.float32) - reference.astype(jnp.float32))))
      timed = {p: r for p, r in entry['paths'].items() if 'forward_ms' in r and r['runs'] == p}
      if timed:
        entry['fastest_forward'] = min(timed, key=lambda p: timed[p]['forward_ms'])
        with_grad = {p: r for p, r in timed.items() if 'forward_backward_ms' in r}
        if with_grad:
          entry['fastest_forward_backward'] = min(with_grad, key=lambda p: with_grad[p]['forward_backward_ms'])
      report['cases'][case['name']] = entry
      print(json.dumps({case['name']: entry}), flush=True)
  text = json.dumps(report, indent=2)
  with open(out_path, 'w') as f:
    f.write(text)


if __name__ == '__main__':
  main()
