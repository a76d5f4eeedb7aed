"""`landiff-jax bench attention`: the masked attention shapes of LanDiff, every path side by side.

Cases (from the config): the tokenizer's encoder and decoder masks over one group (batch 1 and 4) and the LM's
causal attention (`--tokens`, batch 2). Paths: the Pallas kernel, the dense-masked `xla` reference,
`jax.nn.dot_product_attention` with a boolean mask, splash on TPU, and, where torch is importable, FlexAttention
with the equivalent `BlockMask`, compiled. For each: median forward and forward+backward time, TFLOP/s and MFU from
the analytic count of the allowed (query, key) pairs (`bench.flops.attention` × the mask's exact density; the
same count for every path; forward+backward = 3× forward), the compiled program's temporary memory and the
device's peak, and the time relative to the Pallas kernel.

`--sweep [N]` times the Pallas kernel instead over the candidate tiles of `flash_attention.SWEEP_TILES` (the first
N per head dim, all by default) on every case, next to cuDNN dense-masked and FlexAttention, writes the JSON after
every measurement (a time limit loses nothing already measured) and prints a markdown table plus the
`TUNED_TILES` lines to paste into the kernel.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax.bench import device_peak_bytes, flops, gib, time_calls
from landiff_jax.kernels import block_mask
from landiff_jax.kernels import flash_attention
from landiff_jax.nn.masks import MaskSpec, VideoTokenLayout

attention_lib = importlib.import_module('landiff_jax.nn.attention')

JAX_PATHS = ('pallas', 'xla', 'blockwise', 'jax_nn', 'splash')
FORWARD_BACKWARD_FLOPS = flops.train_step(1.0)  # × forward: the gradients of q, k and v cost two forwards


def cases(config: Any, tokens: int) -> list[dict]:
  t, lm = config.tokenizer, config.lm
  layout = VideoTokenLayout(int(t.frames_per_group), int(np.prod(t.feature_grid)), int(t.num_iframe_tokens),
                            int(t.num_pframe_tokens))
  tokenizer_heads, tokenizer_dim = int(t.num_heads), int(t.width) // int(t.num_heads)
  found = []
  for name, spec in (('tokenizer_encoder', MaskSpec.encoder(layout)), ('tokenizer_decoder', MaskSpec.decoder(layout))):
    for batch in (1, 4):
      found.append(dict(name=f'{name}_b{batch}', spec=spec, batch=batch, length=layout.length,
                        heads=tokenizer_heads, head_dim=tokenizer_dim))
  found.append(dict(name='lm_causal_b2', spec=MaskSpec.causal(), batch=2, length=tokens, heads=int(lm.num_heads),
                    head_dim=int(lm.head_dim)))
  return found


def model_flops(case: dict) -> float:
  """Forward FLOPs of the allowed (query, key) pairs: the analytic count every path is measured against."""
  density = flops.mask_density(case['spec'], case['length'], case['length'])
  return flops.attention(case['batch'], case['heads'], case['length'], case['length'], case['head_dim'], density)


def skipped_blocks(case: dict) -> float:
  """Fraction of the tiles the kernel skips at its tuned tiling."""
  block_q, block_k = flash_attention.default_blocks(case['head_dim'], case['spec'].kind)
  classes = block_mask.classify_blocks(case['spec'], case['length'], case['length'], block_q, block_k)
  return block_mask.skipped_fraction(classes)


def rates(flop: float, result: dict) -> dict:
  """TFLOP/s and MFU (None where the device's peak is unknown) of the timed phases in `result`."""
  out = {}
  for phase, work in (('forward', flop), ('forward_backward', flop * FORWARD_BACKWARD_FLOPS)):
    seconds = result.get(phase, {}).get('median_s')
    if seconds:
      out[f'{phase}_tflops'] = float(f'{work / seconds / 1e12:.4g}')
      mfu = flops.mfu(work, seconds)
      out[f'{phase}_mfu'] = None if mfu is None else round(mfu, 4)
  return out


def _jax_function(path: str, spec: MaskSpec, scale: float, tiles: Any = None) -> Callable:
  if tiles is not None:  # the Pallas kernel at these tiles
    interpret = attention_lib._interpret()  # pylint: disable=protected-access
    return lambda q, k, v: flash_attention.flash_attention(q, k, v, spec, scale=scale, tiles=tiles,
                                                           interpret=interpret)
  if path == 'jax_nn':
    implementation = 'cudnn' if jax.default_backend() == 'gpu' else None
    return lambda q, k, v: attention_lib.jax_nn_attention(q, k, v, spec, scale=scale, implementation=implementation)
  return lambda q, k, v: attention_lib.attention(q, k, v, spec, backend=path, scale=scale)


def _skip_reason(path: str, q: jax.ShapeDtypeStruct) -> str | None:
  if path in ('pallas', 'splash'):
    return attention_lib.unavailable_reason(path, q, q, q)
  return None


def _compiled_bytes(compiled) -> int | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def _mib(num_bytes: int | None) -> float | None:
  return None if num_bytes is None else round(num_bytes / 2**20, 3)


def run_jax_path(path: str, case: dict, dtype, repeats: int, flop: float, tiles: Any = None) -> dict:
  shape = (case['batch'], case['length'], case['heads'], case['head_dim'])
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, shape, dtype) for key in keys)
  fn = _jax_function(path, case['spec'], 1.0 / math.sqrt(case['head_dim']), tiles)
  forward = jax.jit(fn).lower(q, k, v).compile()
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
  both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  result = dict(forward=time_calls(lambda: forward(q, k, v), repeats),
                forward_backward=time_calls(lambda: both(q, k, v), repeats),
                forward_temp_mib=_mib(_compiled_bytes(forward)),
                forward_backward_temp_mib=_mib(_compiled_bytes(both)))
  result.update(rates(flop, result))
  result['device_peak_gib'] = gib(device_peak_bytes())
  return result


def run_flex(case: dict, dtype_name: str, repeats: int, flop: float) -> dict:
  """torch FlexAttention with a BlockMask built from the same rule, compiled (the official system's path)."""
  try:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
  except ImportError as e:
    return {'skipped': f'{e.name} is not importable'}
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  spec, length = case['spec'], case['length']
  meta = spec.layout.token_metadata() if spec.is_frame_causal else None
  frame = torch.tensor(np.array(meta.frame), device=device) if meta else None
  latent = torch.tensor(np.array(meta.is_latent), device=device) if meta else None

  def mask_mod(b, h, q_idx, kv_idx):
    if frame is None:
      return spec.rule(q_idx, kv_idx, 0, 0, 0, 0) if spec.kind == 'causal' else q_idx >= 0
    return spec.rule(q_idx, kv_idx, frame[q_idx], frame[kv_idx], latent[q_idx], latent[kv_idx])

  block_mask_ = create_block_mask(mask_mod, None, None, length, length, device=device)
  shape = (case['batch'], case['heads'], length, case['head_dim'])
  generator = torch.Generator(device=device).manual_seed(0)
  # FlexAttention has no CPU backward: there only the forward is timed.
  q, k, v = (torch.randn(shape, generator=generator, device=device, dtype=getattr(torch, dtype_name),
                         requires_grad=device == 'cuda') for _ in range(3))
  compiled = torch.compile(flex_attention)
  sync = (lambda x: (torch.cuda.synchronize(), x)[1]) if device == 'cuda' else (lambda x: x)

  def forward_backward():
    out = compiled(q, k, v, block_mask=block_mask_)
    out.float().sum().backward()
    return out

  with torch.no_grad():
    forward = time_calls(lambda: compiled(q, k, v, block_mask=block_mask_), repeats, sync)
  result = dict(device=device, torch=torch.__version__, forward=forward)
  if device == 'cuda':
    both = time_calls(forward_backward, repeats, sync)
    result.update(forward_backward=both, device_peak_gib=gib(torch.cuda.max_memory_allocated()))
  else:
    result['forward_backward'] = {'skipped': 'FlexAttention has no backward on CPU'}
  result.update(rates(flop, result))
  return result


def _ratios(paths: dict) -> None:
  """Each path's median time divided by the Pallas kernel's (> 1: the kernel is faster)."""
  reference = paths.get('pallas', {})
  for name, result in paths.items():
    if name == 'pallas' or 'forward' not in result or 'forward' not in reference:
      continue
    result['time_vs_pallas'] = {
        phase: round(result[phase]['median_s'] / reference[phase]['median_s'], 3)
        for phase in ('forward', 'forward_backward') if 'median_s' in result.get(phase, {})}


def _measure(fn: Callable[[], dict]) -> dict:
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory: report it, bench the rest
    return {'failed': f'{type(e).__name__}: {str(e)[:300]}'}


def _case_entry(case: dict, flop: float) -> dict:
  return dict(shape=dict(batch=case['batch'], length=case['length'], heads=case['heads'], head_dim=case['head_dim']),
              mask=case['spec'].kind, blocks_skipped=round(skipped_blocks(case), 4),
              model_gflop_forward=round(flop / 1e9, 3), paths={})


def _write(result: dict, out: str) -> None:
  """The result so far, atomically (a later time limit keeps everything measured up to here)."""
  if out:
    with open(out + '.tmp', 'w') as f:
      json.dump(result, f, indent=2)
    os.replace(out + '.tmp', out)


def run(config: Any, options: Any) -> dict:
  if getattr(options, 'sweep', None) is not None:
    return run_sweep(config, options)
  dtype = jnp.dtype(options.dtype)
  result = dict(benchmark='masked attention: tokenizer encoder/decoder masks and LM causal', dtype=options.dtype,
                device=str(jax.devices()[0].device_kind), jax=jax.__version__, cases={})
  for case in cases(config, options.tokens):
    flop = model_flops(case)
    entry = _case_entry(case, flop)
    q_struct = jax.ShapeDtypeStruct((case['batch'], case['length'], case['heads'], case['head_dim']), dtype)
    for path in JAX_PATHS:
      reason = _skip_reason(path, q_struct)
      if reason is not None:
        entry['paths'][path] = {'skipped': reason}
        continue
      entry['paths'][path] = _measure(lambda: run_jax_path(path, case, dtype, options.repeats, flop))
    if options.reference:
      entry['paths']['flex_attention'] = _measure(lambda: run_flex(case, options.dtype, options.repeats, flop))
    _ratios(entry['paths'])
    result['cases'][case['name']] = entry
    _write(result, getattr(options, 'out', ''))
  return result


def _tile_name(tiles: Any) -> str:
  return (f'pallas_{tiles.block_q}x{tiles.block_k}_w{tiles.num_warps}_s{tiles.num_stages}'
          f'{"_heavy_first" if tiles.heavy_first else ""}')


def _candidates(case: dict, limit: int | None) -> list:
  """The tuned tiles of this case first, then the other candidates of its head dim; the first `limit`."""
  tuned = flash_attention.tiles_for(case['head_dim'], case['spec'].kind)
  others = [t for t in flash_attention.SWEEP_TILES.get(case['head_dim'], ()) if t != tuned]
  return [tuned, *others][:limit]


def run_sweep(config: Any, options: Any) -> dict:
  """The kernel over its candidate tiles on every case, next to cuDNN (dense mask) and FlexAttention.

  Breadth first, so a time limit still leaves every case compared: first each case's tuned tiles, cuDNN and
  FlexAttention, then the other candidates case by case."""
  dtype = jnp.dtype(options.dtype)
  limit = options.sweep or None
  result = dict(benchmark='attention tile sweep (Pallas candidates vs cuDNN dense-masked and FlexAttention)',
                dtype=options.dtype, device=str(jax.devices()[0].device_kind), jax=jax.__version__, cases={})
  out = getattr(options, 'out', '')
  all_cases = cases(config, options.tokens)
  work = {}
  for case in all_cases:
    work[case['name']] = model_flops(case)
    result['cases'][case['name']] = _case_entry(case, work[case['name']])

  def pallas(case, tiles):
    q_struct = jax.ShapeDtypeStruct((case['batch'], case['length'], case['heads'], case['head_dim']), dtype)
    reason = _skip_reason('pallas', q_struct)
    flop = work[case['name']]
    result['cases'][case['name']]['paths'][_tile_name(tiles)] = dict(
        {'skipped': reason} if reason else
        _measure(lambda: run_jax_path('pallas', case, dtype, options.repeats, flop, tiles)),
        tiles=dataclasses.asdict(tiles))
    _write(result, out)

  for case in all_cases:
    paths, flop = result['cases'][case['name']]['paths'], work[case['name']]
    pallas(case, _candidates(case, limit)[0])
    if jax.default_backend() == 'gpu' and dtype in (jnp.bfloat16, jnp.float16):
      paths['cudnn'] = _measure(lambda: run_jax_path('jax_nn', case, dtype, options.repeats, flop))
    else:
      paths['cudnn'] = {'skipped': 'cuDNN attention needs a CUDA GPU and bf16/fp16 inputs'}
    if options.reference:
      paths['flex_attention'] = _measure(lambda: run_flex(case, options.dtype, options.repeats, flop))
    _write(result, out)
  for case in all_cases:
    for tiles in _candidates(case, limit)[1:]:
      pallas(case, tiles)
  result['best_tiles'] = best_tiles(result['cases'])
  result['table'] = sweep_table(result['cases'])
  _write(result, out)
  print(result['table'], file=sys.stderr)
  return result


def _median(entry: dict, phase: str) -> float | None:
  return entry.get(phase, {}).get('median_s') if isinstance(entry.get(phase), dict) else None


def best_tiles(sweep_cases: dict) -> dict:
  """Per (head dim, mask kind): the candidate with the least forward+backward time summed over its cases, as the
  `TUNED_TILES` line to paste (only candidates timed on every case of the group compete)."""
  groups: dict[tuple[int, str], dict[str, list]] = {}
  for entry in sweep_cases.values():
    key = (entry['shape']['head_dim'], entry['mask'])
    for name, timing in entry['paths'].items():
      if 'tiles' in timing:
        groups.setdefault(key, {}).setdefault(name, []).append(_median(timing, 'forward_backward'))
  best = {}
  for (head_dim, kind), timings in groups.items():
    complete = {name: sum(t) for name, t in timings.items()
                if all(t) and len(t) == max(len(x) for x in timings.values())}
    if not complete:
      continue
    name = min(complete, key=complete.get)
    tiles = next(e['paths'][name]['tiles'] for e in sweep_cases.values() if name in e['paths'])
    fields = ', '.join(str(tiles[f]) for f in ('block_q', 'block_k', 'num_warps', 'num_stages'))
    fields += ', True' if tiles.get('heavy_first') else ''
    best[f'{head_dim}/{kind}'] = dict(tiles=name, seconds=round(complete[name], 5),
                                      line=f"({head_dim}, '{kind}'): Tiles({fields}),")
  return best


def sweep_table(sweep_cases: dict) -> str:
  """Markdown: one row per case and path, forward / forward+backward in ms, TFLOP/s and the ratio to the best
  Pallas candidate (> 1: the kernel is faster)."""
  lines = ['| case | path | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | time / best pallas (fwd, fwd+bwd) |',
           '|---|---|---|---|---|---|---|']
  for case_name, entry in sweep_cases.items():
    timed = {name: t for name, t in entry['paths'].items() if _median(t, 'forward')}
    pallas = [t for name, t in timed.items() if name.startswith('pallas_')]
    best = {phase: min((_median(t, phase) for t in pallas if _median(t, phase)), default=None)
            for phase in ('forward', 'forward_backward')}
    for name, t in entry['paths'].items():
      if name not in timed:
        why = t.get('skipped') or t.get('failed') or ''
        lines.append(f'| {case_name} | {name} | — | — | — | — | {why[:60]} |')
        continue
      ms = {phase: _median(t, phase) for phase in ('forward', 'forward_backward')}
      ratio = ', '.join(f'{ms[p] / best[p]:.2f}' if ms[p] and best[p] else '—' for p in ms)
      cell = lambda p: f'{1e3 * ms[p]:.2f}' if ms[p] else '—'
      lines.append(f"| {case_name} | {name} | {cell('forward')} | {cell('forward_backward')} | "
                   f"{t.get('forward_tflops', '—')} | {t.get('forward_backward_tflops', '—')} | {ratio} |")
  return '\n'.join(lines)
