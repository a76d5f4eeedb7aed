"""`landiff-jax bench dit`: one denoising step of the renderer at the configured size, next to diffusers.

Measures the backbone alone (what diffusers' `CogVideoXTransformer3DModel` computes) and backbone + control branch
(what LanDiff runs every step), CFG batch 2, random weights in the benchmark dtype. Model FLOP utilisation counts
the model's FLOPs analytically (`bench.flops`: matmuls and attention) against the device's dense bf16 peak where
known; XLA's cost analysis is not used (on GPU it does not see the cuDNN attention calls).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax.bench import TorchReference, device_peak_bytes, flops, gib, parameter_count, random_params, time_calls
from landiff_jax.models import dit as dit_model


def utilisation(work: float, timing: dict) -> dict:
  """TFLOP of the step (analytic), TFLOP/s and MFU (None where the device's peak is unknown) for one timing."""
  seconds = timing['median_s']
  mfu = flops.mfu(work, seconds)
  return dict(tflop=float(f'{work / 1e12:.4g}'), tflops=float(f'{work / seconds / 1e12:.4g}'),
              mfu=None if mfu is None else round(mfu, 4))


def attention_backend(config: Any) -> str:
  return config.attention_backend


def run_jax(config: Any, options: Any, inputs: dict) -> dict:
  dtype = jnp.dtype(options.dtype)
  backend = attention_backend(config)
  model = dit_model.build_dit(config, dtype=dtype, attention_backend=backend)
  params = random_params(model.init_params, dtype)
  args = {k: jnp.asarray(v) for k, v in inputs.items()}
  result = dict(attention_backend=backend, parameters=parameter_count(params))
  for name, with_control in (('backbone', False), ('backbone_and_control', True)):
    if with_control and not model.num_control_layers:
      continue

    def step(p, latents, timesteps, text, condition, with_control=with_control):
      return model.apply(p, latents, timesteps, text, condition if with_control else None)

    start = time.perf_counter()
    compiled = jax.jit(step).lower(params, *args.values()).compile()
    entry = dict(compile_s=round(time.perf_counter() - start, 2))
    entry.update(time_calls(lambda: compiled(params, *args.values()), options.repeats))
    entry.update(utilisation(flops.dit_forward(config, args['latents'].shape[0], control=with_control), entry))
    result[name] = entry
  result['peak_gib'] = gib(device_peak_bytes())
  return result


def run_diffusers(config: Any, options: Any, inputs: dict) -> dict:
  reference, skipped = TorchReference.create(options.dtype, need_diffusers=True)
  if reference is None:
    return dict(skipped=skipped)
  import diffusers
  torch, device, dtype = reference.torch, reference.device, reference.dtype
  c = config.dit
  model = diffusers.CogVideoXTransformer3DModel(
      num_attention_heads=c.num_heads, attention_head_dim=c.head_dim, in_channels=c.in_channels,
      out_channels=c.out_channels, time_embed_dim=c.time_embed_dim, text_embed_dim=c.text_dim,
      num_layers=c.num_layers, sample_width=c.latent_width, sample_height=c.latent_height,
      sample_frames=1 + 4 * (c.latent_frames - 1), patch_size=c.patch_size, max_text_seq_length=c.text_length,
      spatial_interpolation_scale=c.spatial_interpolation, temporal_interpolation_scale=c.temporal_interpolation,
      use_rotary_positional_embeddings=False).to(device=device, dtype=dtype).eval()
  latents = torch.from_numpy(inputs['latents']).permute(0, 1, 4, 2, 3).to(device, dtype)
  text = torch.from_numpy(inputs['text']).to(device, dtype)
  timesteps = torch.from_numpy(inputs['timesteps']).to(device)
  with torch.no_grad():
    result = dict(backbone=time_calls(lambda: model(latents, text, timesteps).sample, options.repeats,
                                      sync=reference.sync))
  result['backbone'].update(utilisation(flops.dit_forward(config, latents.shape[0], control=False),
                                        result['backbone']))
  return dict(result, diffusers=diffusers.__version__, **reference.describe())


def run(config: Any, options: Any) -> dict:
  c = config.dit
  rng = np.random.default_rng(0)
  batch = 2 * options.batch  # [uncond, cond]
  inputs = dict(
      latents=rng.standard_normal((batch, c.latent_frames, c.latent_height, c.latent_width, c.in_channels),
                                  np.float32),
      timesteps=np.full((batch,), 500.0, np.float32),
      text=rng.standard_normal((batch, c.text_length, c.text_dim), np.float32),
      condition=rng.standard_normal((c.latent_frames, c.latent_height, c.latent_width, c.in_channels), np.float32),
  )
  tokens = c.text_length + c.latent_frames * (c.latent_height // c.patch_size) * (c.latent_width // c.patch_size)
  result = dict(benchmark='dit denoising step (CFG batch)', batch=batch, tokens=tokens, dtype=options.dtype,
                device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                landiff_jax=run_jax(config, options, inputs))
  if options.reference:
    result['diffusers'] = run_diffusers(config, options, inputs)
    theirs = result['diffusers'].get('backbone', {}).get('median_s')
    if theirs:
      result['backbone_speedup_vs_diffusers'] = round(theirs / result['landiff_jax']['backbone']['median_s'], 3)
  return result
