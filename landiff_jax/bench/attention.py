"""`landiff-jax bench attention`: the masked attention shapes of LanDiff, every path side by side.

Cases (from the config): the tokenizer's encoder and decoder masks over one group (batch 1 and 4) and the LM's
causal attention (`--tokens`, batch 2). Paths: the Pallas kernel, the dense-masked `xla` reference,
`jax.nn.dot_product_attention` with a boolean mask, splash on TPU, and, where torch is importable, FlexAttention
with the equivalent `BlockMask`, compiled. For each: median forward and forward+backward time, TFLOP/s counting
only the visible blocks (the work a block-skipping kernel must do; the same count for every path), the compiled
program's temporary memory and the device's peak, and the time relative to the Pallas kernel.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax.bench import device_peak_bytes, gib, time_calls
from landiff_jax.kernels import block_mask
from landiff_jax.kernels.flash_attention import default_blocks
from landiff_jax.nn.masks import MaskSpec, VideoTokenLayout

attention_lib = importlib.import_module('landiff_jax.nn.attention')

JAX_PATHS = ('pallas', 'xla', 'blockwise', 'jax_nn', 'splash')
BACKWARD_FLOP_RATIO = 2.5  # the backward pass does 5 of the 7 block matmuls of forward+backward


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


def visible_flops(case: dict) -> tuple[float, float]:
  """(forward FLOPs over the non-empty blocks, fraction of blocks skipped) at the kernel's default tiling."""
  block_q, block_k = default_blocks(case['head_dim'])
  classes = block_mask.classify_blocks(case['spec'], case['length'], case['length'], block_q, block_k)
  visited = int(np.sum(classes != block_mask.EMPTY))
  flops = 4.0 * case['batch'] * case['heads'] * visited * block_q * block_k * case['head_dim']
  return flops, block_mask.skipped_fraction(classes)


def _jax_function(path: str, spec: MaskSpec, scale: float) -> Callable:
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


def run_jax_path(path: str, case: dict, dtype, repeats: int, flops: float) -> dict:
  shape = (case['batch'], case['length'], case['heads'], case['head_dim'])
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, shape, dtype) for key in keys)
  fn = _jax_function(path, case['spec'], 1.0 / math.sqrt(case['head_dim']))
  forward = jax.jit(fn).lower(q, k, v).compile()
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
  both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  result = dict(forward=time_calls(lambda: forward(q, k, v), repeats),
                forward_backward=time_calls(lambda: both(q, k, v), repeats),
                forward_temp_mib=_mib(_compiled_bytes(forward)),
                forward_backward_temp_mib=_mib(_compiled_bytes(both)))
  result['forward_tflops'] = round(flops / result['forward']['median_s'] / 1e12, 3)
  result['forward_backward_tflops'] = round(
      flops * (1 + BACKWARD_FLOP_RATIO) / result['forward_backward']['median_s'] / 1e12, 3)
  result['device_peak_gib'] = gib(device_peak_bytes())
  return result


def run_flex(case: dict, dtype_name: str, repeats: int, flops: float) -> dict:
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
  result = dict(device=device, torch=torch.__version__, forward=forward,
                forward_tflops=round(flops / forward['median_s'] / 1e12, 3))
  if device == 'cuda':
    both = time_calls(forward_backward, repeats, sync)
    result.update(forward_backward=both, device_peak_gib=gib(torch.cuda.max_memory_allocated()),
                  forward_backward_tflops=round(flops * (1 + BACKWARD_FLOP_RATIO) / both['median_s'] / 1e12, 3))
  else:
    result['forward_backward'] = {'skipped': 'FlexAttention has no backward on CPU'}
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


def run(config: Any, options: Any) -> dict:
  dtype = jnp.dtype(options.dtype)
  result = dict(benchmark='masked attention: tokenizer encoder/decoder masks and LM causal', dtype=options.dtype,
                device=str(jax.devices()[0].device_kind), jax=jax.__version__, cases={})
  for case in cases(config, options.tokens):
    flops, skipped = visible_flops(case)
    entry = dict(shape=dict(batch=case['batch'], length=case['length'], heads=case['heads'],
                            head_dim=case['head_dim']), mask=case['spec'].kind, blocks_skipped=round(skipped, 4),
                 visible_gflop_forward=round(flops / 1e9, 3), paths={})
    q_struct = jax.ShapeDtypeStruct((case['batch'], case['length'], case['heads'], case['head_dim']), dtype)
    for path in JAX_PATHS:
      reason = _skip_reason(path, q_struct)
      if reason is not None:
        entry['paths'][path] = {'skipped': reason}
        continue
      try:
        entry['paths'][path] = run_jax_path(path, case, dtype, options.repeats, flops)
      except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory: report it, bench the rest
        entry['paths'][path] = {'failed': f'{type(e).__name__}: {str(e)[:300]}'}
    if options.reference:
      try:
        entry['paths']['flex_attention'] = run_flex(case, options.dtype, options.repeats, flops)
      except Exception as e:  # pylint: disable=broad-except
        entry['paths']['flex_attention'] = {'failed': f'{type(e).__name__}: {str(e)[:300]}'}
    _ratios(entry['paths'])
    result['cases'][case['name']] = entry
  return result
