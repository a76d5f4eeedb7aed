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
    'dit': 'landiff_jax.bench.dit:run',
    'lm': 'landiff_jax.bench.lm:run',
    'tokenizer': 'landiff_jax.bench.tokenizer:run',
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
