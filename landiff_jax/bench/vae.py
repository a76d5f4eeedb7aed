"""`landiff-jax bench vae`: decode latent frames at the configured video size, next to diffusers.

Both sides use random weights of the configured VAE in the same dtype and the release's chunking (2-latent-frame
chunks, remainder in the first); diffusers runs `AutoencoderKLCogVideoX.decode` without tiling or slicing.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax.bench import TorchReference, device_peak_bytes, gib, parameter_count, random_params, time_calls
from landiff_jax.models import vae as vae_model


def latent_shape(config: Any, options: Any) -> tuple[int, ...]:
  s = 2 ** (len(config.vae.channel_mult) - 1)
  if config.video.height % s or config.video.width % s:
    raise ValueError(f'video size {config.video.height}×{config.video.width} is not a multiple of the VAE\'s {s}×.')
  return (options.batch, options.latent_frames, config.video.height // s, config.video.width // s,
          config.vae.latent_channels)


def run_jax(config: Any, options: Any, latents: np.ndarray) -> dict:
  dtype = jnp.dtype(options.dtype)
  model = vae_model.build_vae(config.vae, dtype=dtype, with_encoder=False)
  params = random_params(model.init_params, dtype)
  z = jnp.asarray(latents)
  start = time.perf_counter()
  compiled = vae_model._decode.lower(model, params, z).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  result = dict(compile_s=round(compile_s, 3), **time_calls(lambda: compiled(params, z), options.repeats))
  video = compiled(params, z)
  result.update(
      output_shape=list(video.shape),
      peak_gib=gib(device_peak_bytes()),
      xla_temp_gib=gib(getattr(memory, 'temp_size_in_bytes', None)),
      parameters=parameter_count(params),
  )
  return result


def run_diffusers(config: Any, options: Any, latents: np.ndarray) -> dict:
  reference, skipped = TorchReference.create(options.dtype, need_diffusers=True)
  if reference is None:
    return dict(skipped=skipped)
  import diffusers
  torch, device, dtype = reference.torch, reference.device, reference.dtype
  vae = config.vae
  model = diffusers.AutoencoderKLCogVideoX(
      in_channels=vae.in_channels, out_channels=vae.in_channels, latent_channels=vae.latent_channels,
      block_out_channels=tuple(vae.channels * m for m in vae.channel_mult), layers_per_block=vae.num_res_blocks,
      norm_num_groups=vae.num_groups, scaling_factor=vae.scaling_factor)
  del model.encoder
  model = model.to(device=device, dtype=dtype).eval()
  z = torch.from_numpy(latents).permute(0, 4, 1, 2, 3).to(device=device, dtype=dtype)
  with torch.no_grad():
    result = time_calls(lambda: model.decode(z).sample, options.repeats, sync=reference.sync)
  return dict(result, diffusers=diffusers.__version__, **reference.describe())


def run(config: Any, options: Any) -> dict:
  shape = latent_shape(config, options)
  latents = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  result = dict(benchmark='vae decode', latents=list(shape), dtype=options.dtype,
                device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                landiff_jax=run_jax(config, options, latents))
  if options.reference:
    result['diffusers'] = run_diffusers(config, options, latents)
    theirs, ours = result['diffusers'].get('median_s'), result['landiff_jax']['median_s']
    if theirs:
      result['speedup_vs_diffusers'] = round(theirs / ours, 3)
  return result
