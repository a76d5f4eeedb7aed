"""Benchmarks behind `landiff-jax bench NAME`: time and peak memory, side by side with the PyTorch reference.

Each benchmark is `run(config, options) -> dict` in its own module, registered in `BENCHMARKS`; results are printed
as one JSON object so runs on different machines can be collected and compared.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

# name → 'module:function'
BENCHMARKS = {
    'attention': 'landiff_jax.bench.attention:run',
    'dit': 'landiff_jax.bench.dit:run',
    'generate': 'landiff_jax.bench.generate:run',
    'lm': 'landiff_jax.bench.lm:run',
    'tokenizer': 'landiff_jax.bench.tokenizer:run',
    'train': 'landiff_jax.bench.train:run',
    'vae': 'landiff_jax.bench.vae:run',
}


def time_calls(fn: Callable[[], Any], repeats: int, sync: Callable[[Any], Any] | None = None) -> dict:
  """Seconds of the first call (compilation included unless compiled ahead) and the median of `repeats` more."""
  if sync is None:
    import jax
    sync = jax.block_until_ready
  start = time.perf_counter()
  sync(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - start)
  return dict(first_call_s=round(first, 4), median_s=round(statistics.median(times), 4),
              min_s=round(min(times), 4), repeats=repeats)


def device_peak_bytes() -> int | None:
  """Peak bytes the first device has held (GPU/TPU allocators report it; CPU does not)."""
  import jax

  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  return stats.get('peak_bytes_in_use')


def gib(num_bytes: int | None) -> float | None:
  return None if num_bytes is None else round(num_bytes / 2**30, 3)


def random_params(init_fn: Callable[[Any], Any], dtype: Any) -> Any:
  """Random parameters from `init_fn(key)`, unboxed, floating leaves cast to `dtype`, initialised on the device."""
  import jax
  import jax.numpy as jnp

  from landiff_jax.parallel import strip_partitioning

  cast = lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p
  return jax.jit(lambda key: jax.tree.map(cast, strip_partitioning(init_fn(key))))(jax.random.key(0))


def parameter_count(params: Any) -> int:
  import jax
  return int(sum(p.size for p in jax.tree.leaves(params)))


class TorchReference:
  """PyTorch for a reference run: the device (CUDA when present), the dtype, synchronisation and peak memory.

  `TorchReference.create(dtype_name)` returns (reference, None), or (None, why) when torch (or diffusers, with
  `need_diffusers`) is not installed.
  """

  def __init__(self, torch, dtype_name: str):
    self.torch = torch
    self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    self.dtype = getattr(torch, dtype_name)
    if self.device == 'cuda':
      torch.cuda.reset_peak_memory_stats()

  @classmethod
  def create(cls, dtype_name: str, need_diffusers: bool = False):
    try:
      import torch
      if need_diffusers:
        import diffusers  # noqa: F401
    except ImportError as e:
      return None, f'{e.name} is not installed (pip install -r requirements-test.txt)'
    return cls(torch, dtype_name), None

  def sync(self, x: Any = None) -> Any:
    if self.device == 'cuda':
      self.torch.cuda.synchronize()
    return x

  def describe(self) -> dict:
    peak = self.torch.cuda.max_memory_allocated() if self.device == 'cuda' else None
    return dict(device=self.device, torch=self.torch.__version__, peak_gib=gib(peak))
