"""The .npz example source: what grain's reader threads see."""

from concurrent.futures import ThreadPoolExecutor

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


def test_many_threads_read_the_same_examples_at_once(tmp_path):
  # CPython 3.11's parser (numpy parses every .npy header with it) failed once in a recipe run when grain's threads
  # parsed at once ('AST constructor recursion depth mismatch'); it is rare, so this checks reads under load only.
  examples = _write_examples(tmp_path, 32)
  source = NpzDirectory(str(tmp_path), keys=[f'array_{k}' for k in range(8)])
  indices = [i % len(source) for i in range(4000)]

  def read_from_depth(index, depth=None):  # the threads parse from different stack depths, as in a real run
    depth = index % 29 if depth is None else depth
    return source[index] if depth == 0 else read_from_depth(index, depth - 1)

  with ThreadPoolExecutor(16) as pool:
    read = list(pool.map(read_from_depth, indices))
  for index, example in zip(indices, read):
    for key, value in examples[index].items():
      np.testing.assert_array_equal(example[key], value)


def test_a_missing_array_is_named(tmp_path):
  _write_examples(tmp_path, 1)
  with pytest.raises(KeyError, match='lacks'):
    NpzDirectory(str(tmp_path), keys=['array_0', 'latents'])[0]
