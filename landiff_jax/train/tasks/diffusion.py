"""Diffusion stage: the control branch and semantic upsampler learn, the CogVideoX-2B backbone stays frozen.

Loss (reference landiff-official.md §5.6, §5.11): a discrete timestep t uniform in [0, 1000) picks a = √ᾱ from the
ZeroSNR (shift 3) table; x_t = a·x + √(1−a²)·ε; the network predicts v; x̂0 = a·x_t − √(1−a²)·v̂; the loss is
1/(1−a²)·mean((x̂0 − x)²) (which equals the v-prediction error). Text features are dropped to zeros for 10 % of
the examples (classifier-free guidance). With `diffusion.prefix_frames = k` the first k latent frames stay clean in
the input and are left out of the loss (the release's `fixed_frames`, the basis of streaming).

Examples (`train.data_dir`, one `.npz` each, see `NpzDirectory`): `latents` [T, h, w, 16] scaled VAE latents,
`text` [226, 4096] T5 features, `features` [T, h/2, w/2, 768] tokenizer-decoder features (not for `BackboneTask`,
the backbone trained alone).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax.train.tasks.base import StageTask
from landiff_jax.models import dit as dit_model

EXAMPLE_KEYS = ('latents', 'text', 'features')


def training_alphas(diffusion_config: Any) -> np.ndarray:
  """a_t = √ᾱ'_t for t = 0..999: scaled-linear betas, SNR shift, zero-terminal rescale (a_999 = 0), float32."""
  n = int(diffusion_config.num_train_timesteps)
  betas = np.linspace(np.sqrt(diffusion_config.beta_start), np.sqrt(diffusion_config.beta_end), n,
                      dtype=np.float64)**2
  cumprod = np.cumprod(1.0 - betas)
  shift = float(diffusion_config.snr_shift_scale)
  a = np.sqrt(cumprod / (shift - (shift - 1.0) * cumprod))
  a = (a - a[-1]) * a[0] / (a[0] - a[-1])
  return a.astype(np.float32)


class DiffusionTask(StageTask):
  """The `landiff_jax.train.Task` of the diffusion stage (control branch + upsampler on a frozen backbone)."""

  example_keys = EXAMPLE_KEYS
  data_stage = 'diffusion'
  with_control = True

  def __init__(self, config: Any, examples: Any = None):
    super().__init__(config, examples)
    dtype = jnp.dtype(config.compute_dtype)
    self.model = dit_model.build_dit(config, dtype=dtype, remat_policy=config.remat_policy,
                                     attention_backend=config.attention_backend,
                                     num_control_layers=None if self.with_control else 0)
    if self.with_control and (not self.model.num_control_layers or self.model.upsampler is None):
      raise ValueError('diffusion training needs control.num_layers > 0 and an upsampler section.')
    self.alphas = jnp.asarray(training_alphas(config.diffusion))
    self.text_dropout = float(config.diffusion.text_dropout)
    self.prefix_frames = int(config.diffusion.prefix_frames)

  def example_shapes(self, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of `batch` examples, as abstract arrays (for `landiff-jax plan`)."""
    c, u = self.config.dit, self.config.upsampler
    grid = (c.latent_frames, c.latent_height, c.latent_width)
    shapes = {'latents': jax.ShapeDtypeStruct((batch, *grid, c.in_channels), jnp.float32),
              'text': jax.ShapeDtypeStruct((batch, c.text_length, c.text_dim), jnp.float32),
              'features': jax.ShapeDtypeStruct((batch, grid[0], grid[1] // 2, grid[2] // 2, u.in_channels),
                                               jnp.float32)}
    return {k: shapes[k] for k in self.example_keys}

  def init_params(self, rng: jax.Array, example_batch: Any) -> Any:
    del example_batch
    return self.model.init_params(rng)

  def count_units(self, batch: Any) -> dict[str, Any]:
    return {'samples': batch['latents'].shape[0], 'frames': batch['latents'].shape[0] * batch['latents'].shape[1]}

  def loss_fn(self, params: Any, batch: Any, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    latents = batch['latents'].astype(jnp.float32)
    b = latents.shape[0]
    t_key, noise_key, drop_key = jax.random.split(rng, 3)
    t = jax.random.randint(t_key, (b,), 0, self.alphas.shape[0])
    a = self.alphas[t][:, None, None, None, None]
    sigma = jnp.sqrt(1.0 - a**2)
    noisy = a * latents + sigma * jax.random.normal(noise_key, latents.shape)
    k = self.prefix_frames
    if k:
      noisy = noisy.at[:, :k].set(latents[:, :k])
    keep_text = jax.random.bernoulli(drop_key, 1.0 - self.text_dropout, (b,))
    text = jnp.where(keep_text[:, None, None], batch['text'], 0.0)
    condition = None
    if self.with_control:
      condition = self.model.apply(params, batch['features'], method=dit_model.ControlledDiT.semantic_condition)
    v = self.model.apply(params, noisy, t.astype(jnp.float32), text, condition)
    x0 = a * noisy - sigma * v
    per_example = jnp.mean(jnp.square(x0 - latents)[:, k:], axis=(1, 2, 3, 4)) / (1.0 - a[:, 0, 0, 0, 0]**2)
    loss = jnp.mean(per_example)
    return loss, {'v_mse': jnp.mean(jnp.square(v - (a * noisy - latents) / sigma)[:, k:]),
                  'text_kept': jnp.mean(keep_text.astype(jnp.float32))}


class BackboneTask(DiffusionTask):
  """The backbone alone (no control branch, no semantic features), trained whole with the same loss: how a
  small renderer is made from scratch (the demo) before its control branch trains on top of it, frozen."""

  example_keys = ('latents', 'text')
  data_stage = 'backbone'
  with_control = False
