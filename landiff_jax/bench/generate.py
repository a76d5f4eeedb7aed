"""`landiff-jax bench generate`: one video at the configured size through exactly the path `generate` takes.

A random-weight pipeline is written to disk in the config's storage dtype (`checkpoints.save`, as `convert all`
writes it, with a small local T5 tokenizer), then each measurement is a fresh process that `pipeline.load`s it and
generates one video, as `landiff-jax generate` does:

1. offload 'none', empty compilation cache: the first-process time (compiling everything), then a second video in
   the same process (warm: nothing left to compile);
2. offload 'none' again, a new process reading the cache the first one wrote: the cached-process time;
3. offload 'stage', cached: only the running stage's parts on the device.

Each process reports seconds per stage, its compile statistics and its peak device memory (GPU/TPU allocators
report it; CPU does not). `--estimate` instead computes the peaks from shapes (`landiff_jax.bench.memory`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

PROMPT = 'a red circle moving right across a blue sky above green hills while white clouds drift slowly'


def write_random_pipeline(config: Any, directory: str, seed: int = 0) -> str:
  """A pipeline directory of random weights in `config.storage_dtype`, written part by part (each part's device
  copy freed before the next one is made)."""
  import jax
  import jax.numpy as jnp

  from landiff_jax import checkpoints, pipeline
  from landiff_jax.parallel import strip_partitioning

  storage = jnp.dtype(config.storage_dtype)
  os.makedirs(directory, exist_ok=True)
  for i, name in enumerate(pipeline.PARTS):
    section = checkpoints.part_config(config, name)
    model = checkpoints.build_model(name, section, dtype=jnp.dtype(config.compute_dtype))
    abstract = jax.eval_shape(lambda key: strip_partitioning(model.init_params(key)), jax.random.key(0))
    params = random_tree(abstract, storage, seed + i)
    checkpoints.save(os.path.join(directory, name), part=name, config=section, params=params, overwrite=True,
                     source='random (bench generate)')
    del params
  for name, sub in pipeline.TEXT_TOKENIZERS.items():
    write_text_tokenizer(os.path.join(directory, sub))
  pipeline.save_config(directory, config)
  return directory


def random_tree(abstract: Any, dtype: Any, seed: int, pool_size: int = 1 << 22) -> Any:
  """Random parameters of the given shapes as host arrays, cut from one pool of N(0, 0.02²) values (norm scales
  1 + that): no compile of the model's init and no RNG per leaf, so writing the 14.6 B-parameter release's random
  pipeline runs at memory speed. Non-floating leaves are zeros."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  dtype = np.dtype(jnp.dtype(dtype))
  pool = (0.02 * np.random.default_rng(seed).standard_normal(pool_size, dtype=np.float32))
  pools = {False: pool.astype(dtype), True: (1.0 + pool).astype(dtype)}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  out = []
  for n, (path, leaf) in enumerate(leaves):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      out.append(np.zeros(leaf.shape, leaf.dtype))
      continue
    source = pools['scale' in jax.tree_util.keystr(path)]
    start = (7919 * n) % (source.size // 2)  # leaves do not all start alike
    out.append(np.resize(source[start:], leaf.shape))
  return jax.tree_util.tree_unflatten(treedef, out)


def write_text_tokenizer(directory: str) -> None:
  """A small T5-style tokenizer (Unigram over a few sentences), made locally: nothing is downloaded."""
  os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  from transformers import T5TokenizerFast
  tokenizer = Tokenizer(models.Unigram())
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
  trainer = trainers.UnigramTrainer(vocab_size=60, special_tokens=['<pad>', '</s>', '<unk>'], unk_token='<unk>')
  tokenizer.train_from_iterator([PROMPT, 'a blue square moving up', 'a green star staying still'] * 10, trainer)
  T5TokenizerFast(tokenizer_object=tokenizer, eos_token='</s>', pad_token='<pad>', unk_token='<unk>',
                  extra_ids=0).save_pretrained(directory)


def worker(directory: str, offload: str, cache: str, steps: int | None, videos: int) -> dict:
  """One process of the benchmark: load as `generate` does, then `videos` videos of PROMPT."""
  start = time.perf_counter()
  from landiff_jax import runtime
  runtime.setup({'compilation_cache': bool(cache), 'compilation_cache_dir': cache})
  import jax
  import numpy as np

  from landiff_jax import pipeline
  from landiff_jax.bench import device_peak_bytes, gib
  load_start = time.perf_counter()
  pipe = pipeline.load(directory, offload=offload)
  load_s = time.perf_counter() - load_start
  runs = []
  for _ in range(videos):
    result = pipe.generate(PROMPT, seed=0, dit_steps=steps)
    runs.append(dict(result.seconds))
  return dict(offload=offload, device=str(jax.devices()[0].device_kind), load_s=round(load_s, 3),
              process_s=round(time.perf_counter() - start, 3), runs=runs, compilation=runtime.compile_stats.summary(),
              peak_gib=gib(device_peak_bytes()), video_shape=list(result.video.shape),
              video_sha256=hashlib.sha256(np.ascontiguousarray(result.video).tobytes()).hexdigest())


def _run_worker(directory: str, offload: str, cache: str, steps: int | None, videos: int) -> dict:
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH', '')])))
  command = [sys.executable, '-m', 'landiff_jax.bench.generate', '--dir', directory, '--offload', offload,
             '--cache', cache, '--videos', str(videos)] + (['--steps', str(steps)] if steps else [])
  done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  lines = [line for line in done.stdout.splitlines() if line.startswith('{')]
  if done.returncode or not lines:
    raise ValueError(f'the benchmark process ({offload}) failed: {done.stderr.strip().splitlines()[-1:]}')
  return json.loads(lines[-1])


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def run(config: Any, options: Any) -> dict:
  if getattr(options, 'tiny', False):
    from landiff_jax import config as config_lib
    config = config_lib.load_config('tiny', getattr(options, 'overrides', []))
  if getattr(options, 'estimate', False):
    from landiff_jax.bench import memory
    return memory.estimate(config)
  modes = ('none', 'stage') if options.offload in ('', 'both') else (options.offload,)
  steps = int(config.diffusion.num_steps)
  with tempfile.TemporaryDirectory(prefix='landiff-bench-') as tmp:
    directory = os.path.join(tmp, 'pipeline')
    start = time.perf_counter()
    write_random_pipeline(config, directory)
    written_s = time.perf_counter() - start
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files)
    cache = os.path.join(tmp, 'xla')  # empty: the first process compiles everything
    results = {}
    log(f'wrote a random pipeline of {stored / 2**30:.2f} GiB in {written_s:.1f} s')
    first = _run_worker(directory, modes[0], cache, steps, videos=2)
    log(f'first process ({modes[0]}): {json.dumps(first)}')
    results[modes[0]] = dict(first_process=first)
    if modes[0] == 'none':
      results['none']['cached_process'] = _run_worker(directory, 'none', cache, steps, videos=1)
      log(f'cached process (none): {json.dumps(results["none"]["cached_process"])}')
    for mode in modes[1:]:
      results[mode] = dict(cached_process=_run_worker(directory, mode, cache, steps, videos=1))
      log(f'cached process ({mode}): {json.dumps(results[mode]["cached_process"])}')
  summary = {}
  for mode, by_process in results.items():
    entry = {}
    if 'first_process' in by_process:
      p = by_process['first_process']
      entry.update(first_process_s=p['runs'][0]['total'], warm_s=p['runs'][1]['total'], seconds=p['runs'][1],
                   first_process_compile=p['compilation'])
    if 'cached_process' in by_process:
      p = by_process['cached_process']
      entry.update(cached_process_s=p['runs'][0]['total'], cached_process_compile=p['compilation'])
    entry['peak_gib'] = max(filter(None, [p.get('peak_gib') for p in by_process.values()]), default=None)
    entry['video_sha256'] = {k: p['video_sha256'] for k, p in by_process.items()}
    summary[mode] = entry
  any_process = next(iter(results[modes[0]].values()))
  return dict(benchmark='generate one video (random weights, loaded from disk as generate does)',
              storage_dtype=str(config.storage_dtype), compute_dtype=str(config.compute_dtype),
              device=any_process['device'], stored_gib=round(stored / 2**30, 3), write_s=round(written_s, 1),
              steps=steps, video_shape=any_process['video_shape'], modes=summary, processes=results)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description='one process of `landiff-jax bench generate`')
  parser.add_argument('--dir', required=True)
  parser.add_argument('--offload', default='none')
  parser.add_argument('--cache', default='')
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--videos', type=int, default=1)
  args = parser.parse_args(argv)
  print(json.dumps(worker(args.dir, args.offload, args.cache, args.steps, args.videos)), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
