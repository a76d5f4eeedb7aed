"""VAE stage: train a CogVideoX 3D causal VAE (encoder and decoder) on videos, e.g. the demo's shapes clips.

Loss = mean |decode(z) − x| + kl_weight · mean KL(q(z|x) ‖ N(0, I)), z sampled from the posterior, both passes in
the release's temporal chunks (so the caches and per-chunk GroupNorm statistics seen in training are the ones
used at inference). The release's VAE was trained with perceptual and adversarial terms as well; those need
pretrained networks (LPIPS, a discriminator) and are left out: this task is for small VAEs trained from scratch
(the demo), not for reproducing CogVideoX's.

Examples (`train.data_dir`, one `.npz` each): `video` uint8 [1 + 4k, H, W, 3].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from landiff_jax.models import vae as vae_model
from landiff_jax.train.tasks.base import StageTask


class VAETask(StageTask):
  """The `landiff_jax.train.Task` of the VAE stage."""

  example_keys = ('video',)

  def __init__(self, config: Any, examples: Any = None):
    super().__init__(config, examples)
    self.model = vae_model.build_vae(config.vae, dtype=jnp.dtype(config.compute_dtype), with_encoder=True,
                                     remat_policy=config.remat_policy)
    self.kl_weight = float(config.vae.kl_weight)
    self.l2_weight = float(config.vae.l2_weight)
    frames = int(config.video.num_frames)
    latents = 1 + (frames - 1) // self.model.temporal_compression
    if vae_model.decoded_frames(latents, self.model.temporal_compression, self.model.decode_chunk_frames) != frames:
      raise ValueError(f'video.num_frames={frames} does not survive the round trip: {latents} latent frames decode '
                       f'to {vae_model.decoded_frames(latents)} frames. Use 1 + 4k frames with an odd number '
                       '1 + k of latents, e.g. 9, 17 or 49.')

  def example_shapes(self, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    v = self.config.video
    return {'video': jax.ShapeDtypeStruct((batch, v.num_frames, v.height, v.width, 3), jnp.uint8)}

  def init_params(self, rng: jax.Array, example_batch: Any) -> Any:
    del example_batch
    return self.model.init_params(rng)

  def count_units(self, batch: Any) -> dict[str, Any]:
    video = batch['video']
    return {'samples': video.shape[0], 'frames': video.shape[0] * video.shape[1]}

  def loss_fn(self, params: Any, batch: Any, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    video = vae_model.constrain_frames(batch['video'].astype(jnp.float32) / 127.5 - 1.0)
    mean, logvar = vae_model.encode_moments(self.model, params, video)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    reconstruction = vae_model.decode(self.model, params, z * self.model.scaling_factor)
    l1 = jnp.mean(jnp.abs(reconstruction - video))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    mse = jnp.mean(jnp.square(reconstruction - video))
    loss = l1 + self.l2_weight * mse + self.kl_weight * kl
    return loss, {'l1': l1, 'kl': kl, 'psnr': 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))}
