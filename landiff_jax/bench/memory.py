"""Peak device memory of one video, computed from shapes: nothing is allocated and no GPU is needed.

    stored bytes of each part     jax.eval_shape of its init, floating leaves in config.storage_dtype
    each stage's temporaries      the stage's program compiled ahead of time at full size (on CPU),
                                  compiled.memory_analysis(): temp + output bytes
    peak, offload 'none'          every part resident + the largest stage's temporaries
    peak, offload 'stage'         max over stages of (that stage's parts + its temporaries)

Stored bytes are exact. Temporaries compiled on CPU stand for the GPU's, as an upper bound: XLA:CPU computes bf16
matmuls by converting their operands to float32 (a float32 copy of the weights, which a GPU never makes), so the
stages are compiled in float32 throughout (every activation at least as large as in bf16, no weight copies), and
attention runs a memory-efficient backend ('blockwise' when registered) where the GPU runs cuDNN's flash kernel.
The VAE is compiled with the GPU's temporal convolutions (`conv3d='native'`), not with the sums of 2D convolutions
that only the CPU runs (their time taps that read just the causal cache are scheduled early on CPU and held).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax import checkpoints
from landiff_jax.pipeline import PARTS, STAGE_PARTS

GIB = 2**30


def _storage(config: Any) -> np.dtype:
  return np.dtype(jnp.dtype(config.storage_dtype))


def build_part(config: Any, name: str, attention_backend: str | None = None) -> Any:
  kwargs = {'attention_backend': attention_backend} if attention_backend and name in ('dit', 'lm', 'tokenizer') else {}
  return checkpoints.build_model(name, checkpoints.part_config(config, name), dtype=jnp.dtype(config.compute_dtype),
                                 **kwargs)


def abstract_params(config: Any, name: str, model: Any = None) -> Any:
  """The part's parameter tree as ShapeDtypeStructs, floating leaves in the storage dtype (no allocation)."""
  from landiff_jax.parallel import strip_partitioning
  model = model or build_part(config, name)
  storage = _storage(config)
  tree = jax.eval_shape(lambda key: strip_partitioning(model.init_params(key)), jax.random.key(0))
  cast = lambda s: jax.ShapeDtypeStruct(s.shape, storage if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype)
  return jax.tree.map(cast, tree)


def tree_bytes(tree: Any) -> int:
  return int(sum(np.prod(s.shape, dtype=np.int64) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(tree)))


def stored_bytes(config: Any) -> dict[str, int]:
  """Bytes of each part's parameters as the pipeline stores and loads them (config.storage_dtype)."""
  return {name: tree_bytes(abstract_params(config, name)) for name in PARTS}


def _estimation_backend(config: Any) -> str:
  from landiff_jax.nn import available_backends
  backend = str(config.attention_backend)
  available = available_backends()
  if backend in ('xla', 'auto') and 'blockwise' in available:
    return 'blockwise'  # what never materialises L×L scores, as the GPU's kernels
  return backend if backend in available else 'xla'


def stage_programs(config: Any, backend: str) -> dict[str, tuple[tuple[str, ...], Callable[[], Any]]]:
  """stage → (its parts, a function returning the stage's program lowered at full size on abstract inputs)."""
  from landiff_jax.models import tokenizer as tokenizer_model
  from landiff_jax.models import vae as vae_model
  from landiff_jax.sampling import diffusion
  from landiff_jax.sampling import lm as lm_sampling
  from landiff_jax.sampling.render import Renderer

  f32, i32 = jnp.float32, jnp.int32
  sds = jax.ShapeDtypeStruct
  c = config.dit
  layout = lm_sampling.Layout.from_config(config)
  models = {name: build_part(config, name, backend) for name in PARTS}
  params = {name: abstract_params(config, name, models[name]) for name in PARTS}

  def t5(name, length, masked):
    model = models[name]
    fn = jax.jit(lambda p, ids, mask: model.apply(p, ids, mask if masked else None))
    return lambda: fn.lower(params[name], sds((1, length), i32), sds((1, length), i32))

  def lm():
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 1))
    text_len = lm_sampling.TEXT_BUCKET
    micro = {k: sds((1,), f32) for k in models['lm'].settings.micro_conditions}
    s = config.lm.sampling
    return lm_sampling._generate.lower(  # pylint: disable=protected-access
        models['lm'], params['lm'], lm_layers, sds((1, text_len, int(config.t5_lm.d_model)), f32), sds((1,), i32),
        micro, keys, sds((), f32), sds((), f32), layout=layout, num_groups=1, use_cfg=True, top_k=int(s.top_k),
        top_p=float(s.top_p), progress=None)

  lm_layers = jax.eval_shape(lm_sampling._split_layers, params['lm'])  # pylint: disable=protected-access
  tok, dit = models['tokenizer'], models['dit']

  def condition_fn(tok_params, dit_params, ids):  # one group: the tokenizer decodes group by group
    features = tokenizer_model._decode_group(tok, tok_params, ids)  # pylint: disable=protected-access
    return dit.apply(dit_params, features[0].astype(dit.dtype), method=type(dit).semantic_condition)

  ids = sds((1, layout.tokens_per_group), i32)
  condition = lambda: jax.jit(condition_fn).lower(params['tokenizer'], params['dit'], ids)

  def latents():
    schedule = diffusion.make_schedule(config.diffusion, num_steps=int(config.diffusion.num_steps))
    render = Renderer(models['dit'], schedule)
    shape = (1, c.latent_frames, c.latent_height, c.latent_width, c.in_channels)
    cond = jax.eval_shape(condition_fn, params['tokenizer'], params['dit'], ids)
    return render._render.lower(  # pylint: disable=protected-access
        None, params['dit'], sds((1, int(c.text_length), int(c.text_dim)), f32), cond, sds(shape, f32),
        jax.eval_shape(lambda: jax.random.key(0)), None, None)

  def frames():
    model = models['vae'].clone(conv3d='native')
    shape = (1, c.latent_frames, c.latent_height, c.latent_width, c.in_channels)
    return vae_model._decode.lower(model, params['vae'], sds(shape, f32))  # pylint: disable=protected-access

  t5_lm_len = min(int(config.t5_lm.max_length), lm_sampling.TEXT_BUCKET)
  return {
      'lm_text': (STAGE_PARTS['lm_text'], t5('t5_lm', t5_lm_len, True)),
      'semantic_ids': (STAGE_PARTS['semantic_ids'], lm),
      'dit_text': (STAGE_PARTS['dit_text'], t5('t5_dit', int(config.t5_dit.max_length), False)),
      'condition': (STAGE_PARTS['condition'], condition),
      'latents': (STAGE_PARTS['latents'], latents),
      'frames': (STAGE_PARTS['frames'], frames),
  }


def held_bytes(config: Any) -> dict[str, int]:
  """Bytes a stage holds on the device beside its parts and its program: the LM sampler's per-layer copy of the
  block parameters (`sampling/lm.py` splits them once per call, in the storage dtype)."""
  return {'semantic_ids': tree_bytes(abstract_params(config, 'lm')['params']['blocks'])}


def estimate(config: Any, stages: tuple[str, ...] | None = None, log: Callable[[str], None] = print) -> dict:
  """Stored bytes per part, compiled temporaries per stage and the peak per offload mode, in GiB."""
  stored = stored_bytes(config)
  backend = _estimation_backend(config)
  temps, compile_s = {}, {}
  compiled = config.copy_and_resolve_references()
  if jax.default_backend() == 'cpu':
    compiled.storage_dtype = compiled.compute_dtype = 'float32'  # see the module's docstring
  held = held_bytes(config)
  for stage, (_, lower) in stage_programs(compiled, backend).items():
    if stages and stage not in stages:
      continue
    start = time.perf_counter()
    analysis = lower().compile().memory_analysis()
    temps[stage] = int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes) + held.get(stage, 0)
    compile_s[stage] = round(time.perf_counter() - start, 1)
    log(f'{stage}: temporaries {temps[stage] / GIB:.2f} GiB (compiled in {compile_s[stage]} s)')
  all_parts = sum(stored.values())
  peak_none = all_parts + max(temps.values(), default=0)
  peak_stage = max((sum(stored[p] for p in STAGE_PARTS[s]) + t for s, t in temps.items()), default=0)
  gib = lambda n: round(n / GIB, 3)
  return dict(
      benchmark='peak device memory of one video, from shapes', storage_dtype=str(config.storage_dtype),
      compute_dtype=str(config.compute_dtype), attention_backend=backend,
      temporaries_compiled_in=f'{compiled.compute_dtype} on {jax.default_backend()}',
      stored_gib={**{name: gib(n) for name, n in stored.items()}, 'total': gib(all_parts)},
      temporaries_gib={stage: gib(n) for stage, n in temps.items()}, compile_s=compile_s,
      peak_gib={'none': gib(peak_none), 'stage': gib(peak_stage)})
