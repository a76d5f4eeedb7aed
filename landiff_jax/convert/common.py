"""Pieces every converter shares: expected parameter shapes, nested-dict assembly, one error listing all key problems."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from landiff_jax.convert import ConversionError
from landiff_jax.parallel import strip_partitioning


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
    self.out[path] = value

  def take(self, name: str, path: tuple[str, ...], transform: Callable | None = None) -> None:
    if name not in self.state_dict:
      self.missing.append(name)
      return
    self.used.add(name)
    value = np.asarray(self.state_dict[name], np.float32)
    self.put(path, transform(value) if transform else value, name)

  def take_stacked(self, names: list[str], path: tuple[str, ...], transform: Callable | None = None) -> None:
    absent = [n for n in names if n not in self.state_dict]
    self.used.update(n for n in names if n in self.state_dict)
    if absent:
      self.missing.extend(absent)
      return
    values = [np.asarray(self.state_dict[n], np.float32) for n in names]
    per_layer = self.expected.get(path, (None,))[1:]
    converted = []
    for name, value in zip(names, values):
      try:
        value = transform(value) if transform else value
      except ValueError:  # e.g. a reshape that does not fit
        pass
      if value.shape != per_layer:
        self.misshaped.append(f'{name}: {tuple(self.state_dict[name].shape)}, expected {per_layer} after conversion')
      converted.append(value)
    if all(v.shape == per_layer for v in converted):
      self.put(path, np.stack(converted), f'{names[0]} (stacked)')

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
