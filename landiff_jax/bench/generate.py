"""`landiff-jax bench generate`: seconds per stage for one video at the configured size, random weights in the
official shapes (T5 inputs are random token ids: no tokenizer files needed). Compile time is reported separately:
every stage runs once to compile, then once timed."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax import checkpoints
from landiff_jax.bench import device_peak_bytes, gib, random_params
from landiff_jax.models import t5 as t5_model
from landiff_jax.pipeline import PARTS, Pipeline


def random_pipeline(config: Any, dtype: Any) -> Pipeline:
  parts = {}
  backend = config.attention_backend
  for name in PARTS:
    section = (config if name == 'dit' else config[name])
    kwargs = {'attention_backend': backend} if name in ('dit', 'lm', 'tokenizer') else {}
    model = checkpoints.build_model(name, section, dtype=dtype, **kwargs)
    parts[name] = (model, random_params(model.init_params, dtype))
  return Pipeline(config, parts, text_tokenizers={})


def run(config: Any, options: Any) -> dict:
  dtype = jnp.dtype(options.dtype)
  pipe = random_pipeline(config, dtype)
  rng = np.random.default_rng(0)
  t5_lm, t5_lm_params = pipe.parts['t5_lm']
  t5_dit, t5_dit_params = pipe.parts['t5_dit']
  prompt_ids = rng.integers(2, config.t5_lm.vocab_size, (1, min(24, int(config.t5_lm.max_length))))  # a short prompt
  dit_ids = rng.integers(2, config.t5_dit.vocab_size, (1, int(config.t5_dit.max_length)))
  steps = int(config.diffusion.num_steps)

  def once() -> tuple[dict[str, float], Any]:
    seconds = {}

    def timed(name, fn, *args):
      start = time.perf_counter()
      out = jax.block_until_ready(fn(*args))
      seconds[name] = round(time.perf_counter() - start, 3)
      return out

    text = timed('text (Flan-T5)', lambda: np.asarray(t5_model.encode(t5_lm, t5_lm_params, prompt_ids)[0]))
    ids = timed('semantic tokens (LM)', pipe.semantic_ids, text, jax.random.key(0), 1, 0.1, 7.5)
    condition = timed('semantic features (tokenizer + upsampler)', pipe.condition, ids)
    dit_text = timed('text (T5)', t5_model.encode, t5_dit, t5_dit_params, dit_ids)
    latents = timed(f'latents (DiT, {steps} steps)', pipe.latents, dit_text, condition, jax.random.key(1), steps)
    video = timed('frames (VAE)', pipe.frames, latents)
    seconds['total'] = round(sum(seconds.values()), 3)
    return seconds, video

  first, _ = once()
  seconds, video = once()
  return dict(benchmark='generate one video', dtype=options.dtype, device=str(jax.devices()[0].device_kind),
              jax=jax.__version__, compile_and_first_run_s=first, seconds=seconds, video_shape=list(video.shape),
              peak_gib=gib(device_peak_bytes()))
