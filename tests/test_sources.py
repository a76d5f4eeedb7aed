"""The .npz example source: what grain's reader threads see."""

import ast
from concurrent.futures import ThreadPoolExecutor
import threading
import time

import numpy as np
import pytest

from landiff_jax.data.sources import NpzDirectory


def _write_examples(directory, count):
  rng = np.random.default_rng(0)
  examples = []
  for i in range(count):
    example = {f'array_{k}': rng.normal(size=(3, k + 1)).astype(np.float32) for k in range(8)}
    np.savez(directory / f'{i:04d}.npz', **example)
    examples.append(example)
  return examples


def test_threads_never_parse_headers_at_once(tmp_path, monkeypatch):
  """CPython 3.11's parser is not thread-safe, and numpy parses every .npy header with `ast.literal_eval`: grain's
  reader threads doing so at once crashed a recipe run ('AST constructor recursion depth mismatch'). The crash is too
  rare to provoke, so this checks the cure: however many threads read, one header is parsed at a time."""
  examples = _write_examples(tmp_path, 32)
  source = NpzDirectory(str(tmp_path), keys=[f'array_{k}' for k in range(8)])
  parse, lock, parsing, most = ast.literal_eval, threading.Lock(), [0], [0]

  def watched_parse(text):
    with lock:
      parsing[0] += 1
      most[0] = max(most[0], parsing[0])
    time.sleep(0.0005)  # widen the window another thread would need
    try:
      return parse(text)
    finally:
      with lock:
        parsing[0] -= 1

  monkeypatch.setattr(ast, 'literal_eval', watched_parse)
  indices = [i % len(source) for i in range(400)]
  with ThreadPoolExecutor(16) as pool:
    read = list(pool.map(source.__getitem__, indices))
  assert most[0] == 1
  for index, example in zip(indices, read):
    for key, value in examples[index].items():
      np.testing.assert_array_equal(example[key], value)


def test_a_missing_array_is_named(tmp_path):
  _write_examples(tmp_path, 1)
  with pytest.raises(KeyError, match='lacks'):
    NpzDirectory(str(tmp_path), keys=['array_0', 'latents'])[0]
