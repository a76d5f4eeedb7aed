"""Text to video: prompt → semantic ids (T5 + LM) → semantic features (tokenizer decoder) → condition (upsampler)
→ latents (DiT + control branch, DPM-Solver++ sampler; streamed windows for several groups) → frames (VAE).

A pipeline directory (written by `landiff-jax convert all`) holds one model directory per part (`t5_lm`, `t5_dit`,
`lm`, `tokenizer`, `dit`, `vae`), the two T5 tokenizers (`t5_lm_tokenizer/`, `t5_dit_tokenizer/`) and the full
config (`landiff.json`). Every stage is jit-compiled once and reused across prompts of the same shape.

    pipe = landiff_jax.pipeline.load('models/landiff')
    result = pipe.generate('a red circle moving right', seed=42)
    result.video  # uint8 [frames, height, width, 3]
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
from jax.sharding import NamedSharding, PartitionSpec
import jax.numpy as jnp
import ml_collections
import numpy as np

from landiff_jax import checkpoints, parallel, runtime
from landiff_jax.models import dit as dit_model
from landiff_jax.models import t5 as t5_model
from landiff_jax.models import tokenizer as tokenizer_model
from landiff_jax.models import vae as vae_model
from landiff_jax.sampling import diffusion, streaming
from landiff_jax.sampling import lm as lm_sampling
from landiff_jax.sampling.render import Renderer

PARTS = runtime.PARTS
TEXT_TOKENIZERS = runtime.TEXT_TOKENIZERS
CONFIG_FILE = runtime.PIPELINE_CONFIG_FILE
# the parts each stage runs; with `offload='stage'` only these are on the device while it runs
STAGE_PARTS = {
    'lm_text': ('t5_lm',),
    'semantic_ids': ('lm',),
    'dit_text': ('t5_dit',),
    'condition': ('tokenizer', 'dit'),  # the semantic upsampler's weights live in the renderer's directory
    'latents': ('dit',),
    'frames': ('vae',),
}


PipelineError = runtime.DirectoryError  # a pipeline directory that cannot be used; names the file and the fix


@dataclasses.dataclass
class Generation:
  video: np.ndarray  # uint8 [frames, height, width, 3]
  ids: np.ndarray  # int32 [groups · tokens_per_group]
  fps: int
  seconds: dict[str, float]  # per stage


def save_config(directory: str, config: ml_collections.ConfigDict) -> None:
  with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))


def load_config(directory: str) -> ml_collections.ConfigDict:
  return runtime.read_pipeline_config(directory)


class Pipeline:

  def __init__(self, config: ml_collections.ConfigDict, parts: dict[str, tuple[Any, Any]], text_tokenizers: dict,
               progress: Callable[[str], None] | None = None, mesh: jax.sharding.Mesh | None = None,
               offload: str | None = None):
    self.config = config
    self.offload = runtime.check_offload(offload or config.get('runtime', {}).get('offload', 'none'))
    # where each part's parameters go when on the device, and which parts are there now ('stage' mode)
    self._placement, self._resident = {}, set()
    for name, (_, params) in parts.items():
      if isinstance(params, _Offloaded):
        self._placement[name] = params.placement
      else:
        self._placement[name] = jax.tree.map(lambda p: getattr(p, 'sharding', None), params)
        self._resident.add(name)
    self.mesh = mesh or parallel.make_mesh(config.parallel.mesh)
    self.rules = parallel.logical_rules(config.parallel)
    self.parts = parts
    self.text_tokenizers = text_tokenizers
    self.layout = lm_sampling.Layout.from_config(config)
    self.progress = progress or (lambda message: None)
    self._renderers: dict[int, Renderer] = {}
    dit, _ = parts['dit']
    self._condition = jax.jit(lambda params, features: dit.apply(params, features,
                                                                 method=dit_model.ControlledDiT.semantic_condition))
    if self.offload == 'stage':
      self.use_parts()  # loading placed every part; keep none on the device until a stage needs it

  @classmethod
  def load(cls, directory: str, config: ml_collections.ConfigDict | None = None, dtype: Any = None,
           progress: Callable[[str], None] | None = None, mesh: jax.sharding.Mesh | None = None,
           offload: str | None = None) -> Pipeline:
    """Loads every part, its parameters placed on `mesh` (default: `config.parallel.mesh` over all devices) by
    the logical-axis rules: replicated on a data-only mesh, split over `fsdp` / `tensor` where the mesh has them.

    Parameters load in `config.storage_dtype` and the models compute in `config.compute_dtype`; an explicit `dtype`
    sets both (e.g. float32 for parity work). `offload` ('none' | 'stage', default `config.runtime.offload`):
    'stage' keeps each part in host memory except while a stage that runs it is on the device."""
    config = config or load_config(directory)
    compute_dtype = jnp.dtype(dtype or config.compute_dtype)
    param_dtype = jnp.dtype(dtype or config.get('storage_dtype', None) or compute_dtype)
    offload = runtime.check_offload(offload or config.get('runtime', {}).get('offload', 'none'))
    check_directory(directory)
    mesh = mesh or parallel.make_mesh(config.parallel.mesh)
    rules = parallel.logical_rules(config.parallel)
    backend = config.attention_backend
    parts = {}
    for name in PARTS:
      kwargs = {'attention_backend': backend} if name in ('dit', 'lm', 'tokenizer') else {}
      model, params = load_part(os.path.join(directory, name), mesh, rules, param_dtype=param_dtype,
                                dtype=compute_dtype, **kwargs)
      if offload == 'stage':  # to host memory at once: one part on the device at a time, also while loading
        params = _Offloaded(runtime.to_host(params), jax.tree.map(lambda p: p.sharding, params))
      parts[name] = (model, params)
    tokenizers = {name: t5_model.load_tokenizer(os.path.join(directory, sub)) for name, sub in TEXT_TOKENIZERS.items()}
    return cls(config, parts, tokenizers, progress, mesh, offload)

  # --- residency ('stage' offload) ------------------------------------------------------------------------------

  def use_parts(self, *names: str) -> None:
    """With `offload='stage'`: makes `names` the only parts whose parameters are on the device (the others are
    copied to host memory and their device buffers freed). Without offloading, nothing to do."""
    if self.offload != 'stage':
      return
    for name in sorted(self._resident - set(names)):
      model, params = self.parts[name]
      self.parts[name] = (model, _Offloaded(runtime.to_host(params), self._placement[name]))
      self._resident.discard(name)
    for name in names:
      if name not in self._resident:
        model, offloaded = self.parts[name]
        self.parts[name] = (model, runtime.to_device(offloaded.params, offloaded.placement))
        self._resident.add(name)

  # --- stages -------------------------------------------------------------------------------------------------

  def lm_text(self, prompt: str) -> np.ndarray:
    self.use_parts(*STAGE_PARTS['lm_text'])
    model, params = self.parts['t5_lm']
    c = self.config.t5_lm
    ids, mask = t5_model.tokenize(self.text_tokenizers['t5_lm'], [prompt], int(c.max_length), pad_to_max=False)
    length = int(mask.sum())
    if c.use_attention_mask:  # masked padding leaves the real tokens' states as they are: pad to few lengths
      ids, mask = pad_to_bucket(ids, T5_BUCKET, int(c.max_length)), pad_to_bucket(mask, T5_BUCKET, int(c.max_length))
    hidden = t5_model.encode(model, params, ids, mask if c.use_attention_mask else None)
    return np.asarray(hidden[0, :length])

  def dit_text(self, prompt: str) -> jax.Array:
    self.use_parts(*STAGE_PARTS['dit_text'])
    model, params = self.parts['t5_dit']
    ids, mask = t5_model.tokenize(self.text_tokenizers['t5_dit'], [prompt], int(self.config.t5_dit.max_length),
                                  pad_to_max=True)
    return t5_model.encode(model, params, ids, mask if self.config.t5_dit.use_attention_mask else None)

  def semantic_ids(self, text: np.ndarray, key: jax.Array, num_groups: int, motion_score: float,
                   cfg_scale: float) -> np.ndarray:
    self.use_parts(*STAGE_PARTS['semantic_ids'])
    model, params = self.parts['lm']
    s = self.config.lm.sampling
    ids = lm_sampling.generate(model, params, [text], layout=self.layout, key=key,
                               num_frames=num_groups * self.layout.frames_per_group, motion_score=motion_score,
                               cfg_scale=cfg_scale, temperature=float(s.temperature), top_k=int(s.top_k),
                               top_p=float(s.top_p), max_text_length=int(self.config.lm.text_max_length),
                               devices=self.mesh)
    return np.asarray(ids[0])

  def condition(self, ids: np.ndarray) -> jax.Array:
    """Semantic ids → the control condition [T, H, W, C] (tokenizer decoder, then the upsampler)."""
    self.use_parts(*STAGE_PARTS['condition'])
    model, params = self.parts['tokenizer']
    features = tokenizer_model.decode(model, params, jnp.asarray(ids)[None])
    dit, dit_params = self.parts['dit']
    return self._condition(dit_params, features[0].astype(dit.dtype))

  def renderer(self, steps: int) -> Renderer:
    if steps not in self._renderers:
      schedule = diffusion.make_schedule(self.config.diffusion, num_steps=steps)
      # With 2+ devices in the mesh, CFG's [uncond, cond] rows run on different devices (sampling/devices.py).
      self._renderers[steps] = Renderer(self.parts['dit'][0], schedule, devices=self.mesh)
    return self._renderers[steps]

  def latents(self, text: jax.Array, condition: jax.Array, key: jax.Array, steps: int) -> jax.Array:
    self.use_parts(*STAGE_PARTS['latents'])
    dit, params = self.parts['dit']
    c = self.config.dit
    render = self.renderer(steps)
    shape = (1, c.latent_frames, c.latent_height, c.latent_width, c.in_channels)

    def window(cond, prefix, window_key):
      noise_key, step_key = jax.random.split(window_key)
      return render(params, text, cond[0], jax.random.normal(noise_key, shape), key=step_key, prefix=prefix)

    if condition.shape[0] == c.latent_frames:
      return window(condition[None], None, key)
    overlap = int(self.config.diffusion.stream_overlap)
    return streaming.render_stream(window, condition[None], key, window=c.latent_frames, overlap=overlap)

  def frames(self, latents: jax.Array) -> np.ndarray:
    self.use_parts(*STAGE_PARTS['frames'])
    model, params = self.parts['vae']
    video = vae_model.decode(model, params, latents)[0]
    return np.asarray(jnp.clip((video + 1.0) / 2.0, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

  # --- the whole thing ------------------------------------------------------------------------------------------

  def generate(self, prompt: str, *, seed: int | None = None, motion_score: float | None = None,
               lm_cfg: float | None = None, dit_steps: int | None = None, num_groups: int = 1,
               dit_caption: bool = True) -> Generation:
    """prompt → video; unset options take the config's (the release's) values. `dit_caption=False` (an ablation)
    renders without the caption, so the video's content comes from the semantic tokens alone."""
    with parallel.mesh_context(self.mesh, self.rules):
      return self._generate(prompt, seed, motion_score, lm_cfg, dit_steps, num_groups, dit_caption)

  def _generate(self, prompt, seed, motion_score, lm_cfg, dit_steps, num_groups, dit_caption) -> Generation:
    if not prompt or not prompt.strip():
      raise ValueError('the prompt is empty; describe the video to generate.')
    if num_groups < 1:
      raise ValueError(f'num_groups must be at least 1, got {num_groups}.')
    s = self.config.lm.sampling
    seed = int(s.seed if seed is None else seed)
    lm_key, render_key = jax.random.split(jax.random.key(seed))
    seconds: dict[str, float] = {}

    def timed(name, fn, *args):
      self.progress(f'{name} …')
      start = time.perf_counter()
      out = jax.block_until_ready(fn(*args))
      seconds[name] = round(time.perf_counter() - start, 3)
      self.progress(f'{name}: {seconds[name]:.1f} s')
      return out

    lm_text = timed('text (Flan-T5)', self.lm_text, prompt)
    ids = timed('semantic tokens (LM)', self.semantic_ids, lm_text, lm_key, num_groups,
                float(s.motion_score if motion_score is None else motion_score),
                float(s.cfg_scale if lm_cfg is None else lm_cfg))
    video = self._render_ids(ids, prompt, render_key, dit_steps, timed, dit_caption)
    seconds['total'] = round(sum(seconds.values()), 3)
    return Generation(video=video, ids=ids, fps=int(self.config.video.fps), seconds=seconds)

  def render_ids(self, ids: np.ndarray, prompt: str, key: jax.Array, dit_steps: int | None = None,
                 timed: Callable | None = None, dit_caption: bool = True) -> np.ndarray:
    """Semantic ids (from `generate` or a file) → uint8 frames; the diffusion half of the pipeline alone."""
    with parallel.mesh_context(self.mesh, self.rules):
      return self._render_ids(ids, prompt, key, dit_steps, timed, dit_caption)

  def _render_ids(self, ids, prompt, key, dit_steps, timed, dit_caption=True) -> np.ndarray:
    timed = timed or (lambda name, fn, *args: fn(*args))
    steps = int(self.config.diffusion.num_steps if dit_steps is None else dit_steps)
    text = timed('text (T5)', self.dit_text, prompt)  # before the condition: then the renderer comes in once
    condition = timed('semantic features (tokenizer + upsampler)', self.condition, ids)
    if not dit_caption:  # what a caption dropped in training (`diffusion.text_dropout`) is: zeros
      text = jnp.zeros_like(text)
    latents = timed(f'latents (DiT, {steps} steps)', self.latents, text, condition, key, steps)
    return timed('frames (VAE)', self.frames, latents)


T5_BUCKET = lm_sampling.TEXT_BUCKET  # the LM's text encoder pads prompts to a multiple of this (compiles once per bucket)


def pad_to_bucket(x: np.ndarray, bucket: int, limit: int) -> np.ndarray:
  """[B, L] zero-padded on the right to the next multiple of `bucket` (at most `limit`, at least L)."""
  length = x.shape[1]
  target = max(length, min(limit, bucket * max(1, -(-length // bucket))))
  return np.pad(x, ((0, 0), (0, target - length)))


class _Offloaded:
  """A part's parameters in host memory, with the shardings they go back to."""

  def __init__(self, params: Any, placement: Any):
    self.params, self.placement = params, placement


def check_directory(directory: str) -> None:
  """Every part and tokenizer of a pipeline directory is present and of the right kind, before anything loads."""
  runtime.check_pipeline_directory(directory)


def load_part(path: str, mesh: jax.sharding.Mesh, rules, param_dtype: Any = None, **model_kwargs) -> tuple[Any, Any]:
  """(model, params) of one model directory, each parameter placed in the sharding its logical axes give and
  floating parameters cast to `param_dtype` while read (default: as stored)."""
  try:
    meta = checkpoints.read_meta(path)
    model = checkpoints.build_model(meta['part'], ml_collections.ConfigDict(meta['config']), **model_kwargs)
    abstract = jax.eval_shape(model.init_params, jax.random.key(0))
    shardings = parallel.param_shardings(abstract, mesh, rules, uneven='replicate')
    by_path = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    replicated = NamedSharding(mesh, PartitionSpec())
    # Stored trees may lack collections the model's init has (e.g. the tokenizer's EMA codebook statistics).
    placement = lambda key_path, _: by_path.get(jax.tree_util.keystr(key_path), replicated)
    return model, checkpoints.load_params(path, placement, dtype=param_dtype)
  except checkpoints.CheckpointError as e:
    raise PipelineError(str(e)) from None


def load(directory: str, config: ml_collections.ConfigDict | None = None, dtype: Any = None,
         progress: Callable[[str], None] | None = None, mesh: jax.sharding.Mesh | None = None,
         offload: str | None = None) -> Pipeline:
  return Pipeline.load(directory, config, dtype, progress, mesh, offload)
