"""`landiff-jax bench lm`: generate one group of semantic tokens (CFG batch 2) at the configured size, next to a
PyTorch KV-cache loop of the same shapes (the release's decoding structure: one Python step per token), timed over
its first `REFERENCE_TOKENS` tokens only so the benchmark stays bounded (eager PyTorch on a slow device would
otherwise take minutes).

Reports prefill time, per-token latency, total time, the fraction of the device's memory-bandwidth roofline
reached per decoding step (weights + the KV cache read once per token) and model FLOP utilisation from the analytic
count (`bench.flops`; a decode step is memory-bound, so its MFU is small by nature).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax.bench import TorchReference, device_peak_bytes, flops, gib, parameter_count, random_params, time_calls
from landiff_jax.models import lm as lm_model
from landiff_jax.sampling import lm as lm_sampling

PEAK_BANDWIDTH = {'NVIDIA H100': 3.35e12, 'NVIDIA H200': 4.8e12, 'NVIDIA A100': 2.0e12}
PROMPT_TOKENS = 24
REFERENCE_TOKENS = 64  # decode steps timed in the PyTorch loop (its per-token time is what is compared)


def peak_bandwidth() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_BANDWIDTH.items() if kind.startswith(k)), None)


def bytes_per_token(config: Any, params_bytes: int, sequence: int, dtype_bytes: int) -> float:
  c = config.lm
  kv = 2 * c.num_layers * 2 * sequence / 2 * c.num_heads * c.head_dim * dtype_bytes  # CFG rows, mean length
  return params_bytes + kv


def run_jax(config: Any, options: Any, text: np.ndarray) -> dict:
  dtype = jnp.dtype(options.dtype)
  model = lm_model.build_lm(config.lm, dtype=dtype, attention_backend=config.attention_backend)
  params = random_params(model.init_params, dtype)
  layout = lm_sampling.Layout.from_config(config)
  frames = layout.frames_per_group
  run = lambda: lm_sampling.generate(model, params, [text], layout=layout, key=jax.random.key(1), num_frames=frames,
                                     cfg_scale=7.5)
  start = time.perf_counter()
  jax.block_until_ready(run())
  first = time.perf_counter() - start
  totals = []
  for _ in range(options.repeats):
    start = time.perf_counter()
    jax.block_until_ready(run())
    totals.append(time.perf_counter() - start)
  # Prefill alone: the same prefix through one `extend` call.
  prefix = 3 + lm_sampling.TEXT_BUCKET + 1
  embeds = jnp.zeros((2, prefix, config.lm.hidden_size), dtype)
  positions = jnp.broadcast_to(jnp.arange(prefix), (2, prefix))
  steps = len(layout.plan(1))
  cache = lm_model.empty_cache(model.settings, 2, prefix + steps, dtype)
  valid = jnp.ones((2, prefix + steps), bool)
  prefill = jax.jit(lambda p, e, c: model.apply(p, e, positions, valid, c, 0, method=model.extend))
  jax.block_until_ready(prefill(params, embeds, cache))
  prefill_times = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(prefill(params, embeds, cache))
    prefill_times.append(time.perf_counter() - start)
  prefill_s = min(prefill_times)
  total = float(np.median(totals))
  # At toy sizes the prefill is within the timers' noise of the whole generation; the per-token time then counts
  # the prefill in rather than going negative.
  decode_s = total - prefill_s if total > 2 * prefill_s else total
  per_token = decode_s / steps
  params_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
  work = flops.lm_generate(config, 2, prefix, steps)
  result = dict(first_call_s=round(first, 3), total_s=round(total, 4), prefill_s=round(prefill_s, 4),
                per_token_ms=round(1e3 * per_token, 4), positions=steps, parameters=parameter_count(params),
                tflop=float(f'{work / 1e12:.4g}'), peak_gib=gib(device_peak_bytes()))
  utilisation = flops.mfu(work, total)
  if utilisation is not None:
    result['mfu'] = round(utilisation, 5)
  bandwidth = peak_bandwidth()
  if bandwidth:
    moved = bytes_per_token(config, params_bytes, prefix + steps, dtype.itemsize)
    result['roofline_fraction'] = round(moved / per_token / bandwidth, 3)
  return result


def run_torch(config: Any, options: Any, text: np.ndarray) -> dict:
  reference, skipped = TorchReference.create(options.dtype)
  if reference is None:
    return dict(skipped=skipped)
  torch, device, dtype = reference.torch, reference.device, reference.dtype
  c = config.lm
  layout = lm_sampling.Layout.from_config(config)
  torch.manual_seed(0)
  d, h, hd, f, v = c.hidden_size, c.num_heads, c.head_dim, c.mlp_dim, c.vocab_size
  make = lambda *shape: (torch.randn(*shape, device=device) * shape[-1]**-0.5).to(dtype)
  layers = [dict(n0=torch.ones(d, device=device, dtype=dtype), n1=torch.ones(d, device=device, dtype=dtype),
                 wqkv=make(3 * d, d), wo=make(d, d), w1=make(f, d), w3=make(f, d), w2=make(d, f))
            for _ in range(c.num_layers)]
  head, emb = make(v, d).float(), make(v, d)
  steps = len(layout.plan(1))
  timed_steps = min(steps, REFERENCE_TOKENS)
  prefix = 3 + len(text) + 1
  max_len = prefix + steps
  inv = 1.0 / (c.rope_theta**(torch.arange(0, hd, 2, device=device).float() / hd))
  angles = torch.arange(max_len, device=device).float()[:, None] * inv
  rot = torch.polar(torch.ones_like(angles), angles)

  def rope(x, start):
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(z * rot[start:start + x.shape[1], None]).flatten(-2).to(x.dtype)

  def rms(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + c.norm_eps)).to(x.dtype) * w

  def forward(x, start, cache):
    for i, p in enumerate(layers):
      q, k, vv = (rms(x, p['n0']) @ p['wqkv'].T).split(d, dim=-1)
      q, k, vv = (t.reshape(2, -1, h, hd) for t in (q, k, vv))
      q, k = rope(q, start), rope(k, start)
      cache[i][0][:, start:start + x.shape[1]] = k
      cache[i][1][:, start:start + x.shape[1]] = vv
      end = start + x.shape[1]
      keys, values = cache[i][0][:, :end].transpose(1, 2), cache[i][1][:, :end].transpose(1, 2)
      out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), keys, values,
                                                             is_causal=x.shape[1] > 1)
      x = x + out.transpose(1, 2).reshape(2, -1, d) @ p['wo'].T
      y = rms(x, p['n1'])
      x = x + (torch.nn.functional.gelu(y @ p['w1'].T, approximate='tanh') * (y @ p['w3'].T)) @ p['w2'].T
    return torch.nn.functional.layer_norm(x[:, -1].float(), (d,), eps=c.final_norm_eps) @ head.T

  def generate():
    cache = [(torch.zeros(2, max_len, h, hd, device=device, dtype=dtype),
              torch.zeros(2, max_len, h, hd, device=device, dtype=dtype)) for _ in range(c.num_layers)]
    x = torch.randn(2, prefix, d, device=device, dtype=dtype)
    logits = forward(x, 0, cache)
    token = None
    for i in range(timed_steps):
      guided = logits[1] + 7.5 * (logits[0] - logits[1])
      token = torch.multinomial(torch.softmax(guided, -1), 1)
      logits = forward(emb[token].expand(2, 1, d), prefix + i, cache)
    return token

  with torch.no_grad():
    timing = time_calls(generate, options.repeats, sync=reference.sync)
  total = timing['median_s']
  return dict(timed_tokens=timed_steps, timed_s=total, per_token_ms=round(1e3 * total / timed_steps, 4),
              total_s_estimate=round(total / timed_steps * steps, 4), **reference.describe())


def run(config: Any, options: Any) -> dict:
  text = np.random.default_rng(0).standard_normal((PROMPT_TOKENS, config.lm.text_feature_dim)).astype(np.float32)
  result = dict(benchmark='lm generation of one group (CFG batch 2)', dtype=options.dtype,
                device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                landiff_jax=run_jax(config, options, text))
  if options.reference:
    result['pytorch_kv_loop'] = run_torch(config, options, text)
    theirs = result['pytorch_kv_loop'].get('per_token_ms')
    if theirs:  # per generated token (the reference loop times only its first REFERENCE_TOKENS tokens)
      result['per_token_speedup_vs_pytorch'] = round(theirs / result['landiff_jax']['per_token_ms'], 3)
  return result
