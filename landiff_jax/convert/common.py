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
import re
import tempfile
from typing import Any

import jax
import numpy as np

from landiff_jax.checkpoints import SpilledArray
from landiff_jax.convert import ConversionError, notice
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
  view = renamed(state_dict, {name[len(prefix):]: name for name in state_dict if name.startswith(prefix)})
  view.source = getattr(state_dict, 'source', '')
  return view


def source_of(state_dict: Mapping[str, Any], default: str = 'the checkpoint') -> str:
  return getattr(state_dict, 'source', '') or default


def overlay(top: Mapping[str, Any], base: Mapping[str, Any], what: str, top_label: str, base_label: str,
            reason: str) -> LazyStateDict:
  """`top`'s tensors over `base`'s (a view: nothing is read until used), as a release loader that applies `top`
  after `base` leaves them. Says which copy was taken and, for the names both hold, how far apart they are (reading
  each shared pair once, one at a time)."""
  shared = [name for name in top if name in base]
  differing, largest, largest_name, rounding_only, top_dtypes = 0, 0.0, '', True, set()
  for name in shared:
    raw = np.asarray(top[name])
    a, b = raw.astype(np.float32), np.asarray(base[name], np.float32)
    if a.shape != b.shape:
      differing, largest, largest_name = differing + 1, float('inf'), f'{name} (shapes {a.shape} vs {b.shape})'
      rounding_only = False
      continue
    gap = float(np.max(np.abs(a - b))) if a.size else 0.0
    if gap > 0 or not np.array_equal(np.isnan(a), np.isnan(b)):
      differing += 1
      top_dtypes.add(str(raw.dtype))
      # the same weights, only stored in a narrower dtype (e.g. a bf16 engine over an fp32 file)?
      rounding_only &= raw.dtype.itemsize < 4 and np.array_equal(raw.astype(np.float32),
                                                                 b.astype(raw.dtype).astype(np.float32))
      if gap >= largest:
        largest, largest_name = gap, name
  only_base = sum(1 for name in base if name not in top)
  if not differing:
    comparison = f'the {len(shared)} tensors both hold are identical'
  elif rounding_only:
    comparison = (f'the {len(shared)} tensors both hold are the same up to the rounding of the copy\'s '
                  f'{"/".join(sorted(top_dtypes))} storage (at most {largest:.3g})')
  else:
    comparison = f'{differing} of the {len(shared)} tensors both hold differ, by up to {largest:.3g} ({largest_name})'
  notice(f'{what}: took {len(top)} tensors from {top_label} over {base_label} ({reason})'
         + (f', {only_base} only in {base_label}' if only_base else '') + f'; {comparison}.')
  readers = {name: functools.partial(base.__getitem__, name) for name in base}
  readers.update({name: functools.partial(top.__getitem__, name) for name in top})
  return LazyStateDict(readers, source=f'{top_label} over {base_label}')


def abstract_init(init_fn: Callable[[jax.Array], Any], what: str = 'model') -> Any:
  """`init_fn(rng)` evaluated abstractly; a config the model cannot be built from is one ConversionError line."""
  try:
    return strip_partitioning(jax.eval_shape(init_fn, jax.random.key(0)))
  except (ValueError, TypeError, ZeroDivisionError) as e:
    first = ' '.join(str(e).split())[:300]
    raise ConversionError(f'the config cannot build the {what}: {first} Fix the config (--config / '
                          '--config.SECTION.FIELD=VALUE) to describe the checkpoint.', details=repr(e)) from None


def expected_shapes(init_fn: Callable[[jax.Array], Any],
                    what: str = 'model') -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path: shape} of the parameters `init_fn(rng)` creates (evaluated abstractly, nothing allocated)."""
  shapes = abstract_init(init_fn, what)
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
    self.shape_pairs: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []  # (name, converted, expected)

  def put(self, path: tuple[str, ...], value: np.ndarray, source: str) -> None:
    value = np.ascontiguousarray(value, np.float32)
    if path not in self.expected:
      raise KeyError(f'converter bug: {path} is not a parameter of the model')
    if value.shape != self.expected[path]:
      self.misshaped.append(f'{source}: {value.shape} after conversion, expected {self.expected[path]}')
      self.shape_pairs.append((source, value.shape, self.expected[path]))
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
        if value.shape != source_shape or len(value.shape) == len(per_layer):
          self.shape_pairs.append((name, value.shape, per_layer))
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

  def result(self, what: str, ignored: Callable[[str], bool] = lambda name: False, *, strict: bool = True,
             config: Any = None, section: str = '') -> dict[str, Any]:
    """The nested parameter tree, or a ConversionError naming the missing, unexpected and mis-shaped keys.
    Unexpected keys are refused if `strict` (the release's loader is strict), else listed in a notice."""
    unexpected = [n for n in self.state_dict if n not in self.used and not ignored(n)]
    not_filled = ['/'.join(p) for p in self.expected if p not in self.out and not self.missing and not self.misshaped]
    report_problems(what, self.missing + not_filled, unexpected, self.misshaped, strict=strict,
                    hint=field_hint(config, section, self.shape_pairs))
    return nested(self.out)


LOADERS = {True: 'loads it with strict=True', False: 'loads it with strict=False'}


def _names(items: list[str], limit: int = 5) -> str:
  return ', '.join(items[:limit]) + (f', … ({len(items) - limit} more; --verbose lists all)' if len(items) > limit
                                     else '')


def report_problems(what: str, missing: list[str], unexpected: list[str], misshaped: list[str], *, strict: bool,
                    hint: str = '') -> None:
  """Raises one ConversionError line naming the problems (full lists in `details`), or, when the only problem is
  unexpected keys and the release's loader is lenient, reports them in a notice."""
  if not (missing or misshaped or (strict and unexpected)):
    if unexpected:
      notice(f'{what}: ignored {len(unexpected)} tensor(s) the model has no place for, as the release does (it '
             f'{LOADERS[False]}): {_names(unexpected, 10)}')
    return
  parts = []
  if missing:
    parts.append(f'{len(missing)} missing ({_names(missing)})')
  if unexpected:
    label = 'unexpected' if strict else 'unused'
    parts.append(f'{len(unexpected)} {label} ({_names(unexpected)})')
  if misshaped:
    parts.append(f'{len(misshaped)} wrong shape ({_names(misshaped)})')
  if not hint:
    if misshaped or missing:
      hint = 'check that --config describes this checkpoint (widths, layer counts) and that --src is the right file.'
    else:
      hint = (f'the release {LOADERS[True]} and refuses them too: check that --src is the right file, or remove '
              'those tensors.')
  details = '\n'.join(f'{title}:\n  ' + '\n  '.join(items)
                       for title, items in (('missing', missing), ('unexpected', unexpected), ('wrong shape', misshaped))
                       if items)
  raise ConversionError(f'{what} does not match: {"; ".join(parts)}. {hint}', details=details)


def raise_problems(headline: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> None:
  """Strict `report_problems` with `headline` as the subject (kept for callers that check everything)."""
  report_problems(headline.rstrip(':'), missing, unexpected, misshaped, strict=True)


def config_fields(config: Any, section: str, value: int) -> list[str]:
  """Dotted names of the integer fields of `config` (named `section`, or holding sections) equal to `value`."""
  if config is None:
    return []
  found = []

  def walk(node: Any, prefix: str) -> None:
    items = node.items() if hasattr(node, 'items') else []
    for key, item in items:
      name = f'{prefix}.{key}' if prefix else str(key)
      if hasattr(item, 'items'):
        walk(item, name)
      elif isinstance(item, int) and not isinstance(item, bool) and item == value:
        found.append(name)

  walk(config, section)
  return found


def _words(name: str) -> set[str]:
  return {w for w in re.split(r'[^a-z0-9]+', name.lower().replace('_', '.')) if len(w) > 1 and not w.isdigit()}


def field_hint(config: Any, section: str, shape_pairs: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> str:
  """Names the config field whose value gives the dimension that differs from the file, e.g. 'The file has 24
  where the config gives 12 (dit.text_dim): set --config.dit.text_dim=24'. Of several fields with that value, the
  ones sharing a word with the tensor's name (text_proj ~ text_dim) are preferred."""
  for name, got, want in shape_pairs:
    if len(got) != len(want):
      continue
    for found, expected in zip(got, want):
      if found == expected:
        continue
      fields = config_fields(config, section, expected)
      related = [f for f in fields if _words(f.rsplit('.', 1)[-1]) & _words(name)]
      fields = related or fields
      if len(fields) == 1:
        return (f'The file has {found} where the config gives {expected} ({fields[0]}): set '
                f'--config.{fields[0]}={found} (or use the config the checkpoint was trained with).')
      if fields:
        return (f'The file has {found} where the config gives {expected} (one of {", ".join(fields[:4])}): set that '
                f'field to {found} (or use the config the checkpoint was trained with).')
      return (f'The file has {found} where the config derives {expected}; check the {section or "model"} section '
              'of --config.')
  return ''


def is_float(leaf: Any) -> bool:
  return np.issubdtype(np.dtype(leaf.dtype), np.floating) or np.dtype(leaf.dtype) == np.dtype(jax.numpy.bfloat16)


class CastSpilledArray(SpilledArray):
  """A `SpilledArray` read back cast to another dtype (`save` sees the target dtype; the file is unchanged)."""

  def __init__(self, spilled: SpilledArray, dtype: Any):
    super().__init__(spilled.path, spilled.shape, dtype)
    self.source = spilled

  def load(self) -> np.ndarray:
    return self.source.load().astype(self.dtype)


def cast_params(tree: dict[str, Any], dtype: Any) -> dict[str, Any]:
  """The converted tree with the floating leaves of its `params` collection in `dtype` (the storage dtype);
  other collections (e.g. the quantizer's EMA statistics) and integer leaves are left as they are."""
  dtype = np.dtype(jax.numpy.dtype(dtype))

  def cast(leaf: Any) -> Any:
    if not hasattr(leaf, 'dtype') or not is_float(leaf) or np.dtype(leaf.dtype) == dtype:
      return leaf
    if isinstance(leaf, SpilledArray):
      return CastSpilledArray(leaf, dtype)
    return np.asarray(leaf).astype(dtype)

  if 'params' not in tree:
    return jax.tree.map(cast, tree)
  return {**tree, 'params': jax.tree.map(cast, tree['params'])}


def linear(w: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight (out, in) → kernel (in, out)."""
  return w.T
