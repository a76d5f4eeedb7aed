"""Pieces every converter shares: expected parameter shapes, nested-dict assembly, one error listing all key problems,
renamed views of lazily read checkpoints, and spilling converted parameters to disk.

Converters read one source tensor at a time (`io.LazyStateDict`) and hand each converted parameter to `keep`
(whole) or a `Stack` (one layer at a time). Inside `spilling(directory)` those write it to a file at once and the
tree holds a `checkpoints.SpilledArray`, so converting a part needs memory for a few tensors, not the whole part.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import contextlib
import functools
import contextvars
import os
import tempfile
from typing import Any

import jax
import numpy as np

from landiff_jax.checkpoints import SpilledArray
from landiff_jax.convert import ConversionError
from landiff_jax.convert.io import LazyStateDict
from landiff_jax.parallel import strip_partitioning

_SPILL_DIR: contextvars.ContextVar[str | None] = contextvars.ContextVar('landiff_spill_dir', default=None)


@contextlib.contextmanager
def spilling(directory: str) -> Iterator[None]:
  """Within the block, `keep` and `Stack` write converted parameters to files under `directory` (which must
  outlive the `SpilledArray`s, i.e. until the tree is saved) instead of keeping them in memory."""
  token = _SPILL_DIR.set(directory)
  try:
    yield
  finally:
    _SPILL_DIR.reset(token)


def _spill_file(directory: str) -> str:
  fd, path = tempfile.mkstemp(dir=directory, suffix='.bin')
  os.close(fd)
  return path


def keep(value: np.ndarray) -> np.ndarray | SpilledArray:
  """A converted parameter as it goes into the tree: the array, or while `spilling`, a file holding it."""
  value = np.ascontiguousarray(value)
  directory = _SPILL_DIR.get()
  if directory is None:
    return value
  path = _spill_file(directory)
  value.tofile(path)
  return SpilledArray(path, value.shape, value.dtype)


class Stack:
  """`np.stack` of per-layer arrays given one at a time. While `spilling`, each layer is appended to one file as
  it comes (stacking on a new leading axis concatenates C-order bytes), so no two layers are held at once."""

  def __init__(self):
    self.directory = _SPILL_DIR.get()
    self.layers: list[np.ndarray] = []
    self.count, self.shape, self.dtype, self.path = 0, None, None, None

  def add(self, value: np.ndarray) -> None:
    value = np.ascontiguousarray(value)
    if self.count and (value.shape, value.dtype) != (self.shape, self.dtype):
      raise ValueError(f'cannot stack {value.dtype}{value.shape} onto layers of {self.dtype}{self.shape}')
    self.shape, self.dtype = value.shape, value.dtype
    if self.directory is None:
      self.layers.append(value)
    else:
      self.path = self.path or _spill_file(self.directory)
      with open(self.path, 'ab') as f:
        value.tofile(f)
    self.count += 1

  def result(self) -> np.ndarray | SpilledArray:
    if not self.count:
      raise ValueError('nothing to stack')
    if self.directory is None:
      return np.stack(self.layers)
    return SpilledArray(self.path, (self.count,) + self.shape, self.dtype)


def renamed(source: Mapping[str, Any], names: Mapping[str, str]) -> LazyStateDict:
  """`source` under new names ({new: old}), each tensor looked up in `source` only when used."""
  return LazyStateDict({new: functools.partial(source.__getitem__, old) for new, old in names.items()})


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> LazyStateDict:
  """The names starting with `prefix`, without it."""
  return renamed(state_dict, {name[len(prefix):]: name for name in state_dict if name.startswith(prefix)})


def expected_shapes(init_fn: Callable[[jax.Array], Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path: shape} of the parameters `init_fn(rng)` creates (evaluated abstractly, nothing allocated)."""
  shapes = strip_partitioning(jax.eval_shape(init_fn, jax.random.key(0)))
  return {tuple(str(k.key) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def nested(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


class Mapper:
  """Collects converted tensors by target path and the problems found, then raises them all at once."""

  def __init__(self, state_dict: Mapping[str, np.ndarray], expected: dict[tuple[str, ...], tuple[int, ...]]):
    self.state_dict, self.expected = state_dict, expected
    self.out: dict[tuple[str, ...], np.ndarray] = {}
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.misshaped: list[str] = []

  def put(self, path: tuple[str, ...], value: np.ndarray, source: str) -> None:
    value = np.ascontiguousarray(value, np.float32)
    if path not in self.expected:
      raise KeyError(f'converter bug: {path} is not a parameter of the model')
    if value.shape != self.expected[path]:
      self.misshaped.append(f'{source}: {value.shape} after conversion, expected {self.expected[path]}')
      return
    self.out[path] = keep(value)

  def take(self, name: str, path: tuple[str, ...], transform: Callable | None = None) -> None:
    if name not in self.state_dict:
      self.missing.append(name)
      return
    self.used.add(name)
    value = np.asarray(self.state_dict[name], np.float32)
    self.put(path, transform(value) if transform else value, name)

  def take_stacked(self, names: list[str], path: tuple[str, ...], transform: Callable | None = None) -> None:
    """`names` (one per layer) converted and stacked on a leading layer axis, reading one layer at a time."""
    absent = [n for n in names if n not in self.state_dict]
    self.used.update(n for n in names if n in self.state_dict)
    if absent:
      self.missing.extend(absent)
      return
    if path not in self.expected:
      raise KeyError(f'converter bug: {path} is not a parameter of the model')
    per_layer = self.expected[path][1:]
    stack, complete = Stack(), True
    for name in names:
      value = np.asarray(self.state_dict[name], np.float32)
      source_shape = value.shape
      try:
        value = transform(value) if transform else value
      except ValueError:  # e.g. a reshape that does not fit
        pass
      if value.shape != per_layer:
        self.misshaped.append(f'{name}: {source_shape}, expected {per_layer} after conversion')
        complete = False
      elif complete:
        stack.add(np.asarray(value, np.float32))
    if not complete:
      return
    if (len(names),) + per_layer != self.expected[path]:
      self.misshaped.append(f'{names[0]} (stacked): {(len(names),) + per_layer} after conversion, expected '
                            f'{self.expected[path]}')
      return
    self.out[path] = stack.result()

  def result(self, what: str, ignored: Callable[[str], bool] = lambda name: False) -> dict[str, Any]:
    """The nested parameter tree, or a ConversionError naming every missing, unexpected and mis-shaped key."""
    unexpected = [n for n in self.state_dict if n not in self.used and not ignored(n)]
    not_filled = ['/'.join(p) for p in self.expected if p not in self.out and not self.missing and not self.misshaped]
    raise_problems(f'the {what} checkpoint does not match the config:', self.missing + not_filled, unexpected,
                   self.misshaped)
    return nested(self.out)


def raise_problems(headline: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> None:
  """Raises one ConversionError listing every problem (the first 20 of each kind), if there is any."""
  problems = [('missing', missing), ('unexpected', unexpected), ('wrong shape', misshaped)]
  if not any(items for _, items in problems):
    return
  lines = [headline]
  for title, items in problems:
    if items:
      lines.append(f'  {len(items)} {title}: ' + ', '.join(items[:20]) + (' …' if len(items) > 20 else ''))
  raise ConversionError('\n'.join(lines))


def linear(w: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight (out, in) → kernel (in, out)."""
  return w.T
