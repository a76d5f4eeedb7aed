"""Loading ml_collections config files and applying `--config.a.b=value` overrides.

A config is a Python file whose `get_config()` (or `get_config(arg)` for `file.py:arg`) returns a
`ml_collections.ConfigDict`. Overrides are parsed against the type of the field they replace, and a key that does
not exist fails with the list of keys that do.
"""

import ast
import difflib
import importlib.util
import inspect
import os
from typing import Any, Iterable

import ml_collections

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')

_TRUE = ('true', '1', 'yes', 'on')
_FALSE = ('false', '0', 'no', 'off')


class ConfigError(ValueError):
  """A config file, key or value the user can fix."""


def available_configs() -> list[str]:
  if not os.path.isdir(CONFIG_DIR):
    return []
  return sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith('.py') and not f.startswith('_'))


def resolve_config_path(source: str) -> tuple[str, str | None]:
  """`configs/x.py`, `x.py`, `x` or any of them with `:arg` → (existing file path, arg or None)."""
  path, _, arg = source.partition(':')
  candidates = [path]
  if not os.path.isabs(path):
    name = path if path.endswith('.py') else path + '.py'
    candidates.append(os.path.join(CONFIG_DIR, os.path.basename(name)))
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate, (arg or None)
  raise ConfigError(f'config file {path!r} not found. Pass a path to a .py file with get_config(), '
                    f'or one of the bundled configs in {CONFIG_DIR}: {", ".join(available_configs()) or "(none)"}.')


def load_config(source: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Loads `source` (see `resolve_config_path`) and applies `overrides` ('a.b=value' strings)."""
  path, arg = resolve_config_path(source)
  spec = importlib.util.spec_from_file_location(f'_landiff_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  get_config = getattr(module, 'get_config', None)
  if get_config is None:
    raise ConfigError(f'config file {path} has no get_config() function.')
  takes_arg = bool(inspect.signature(get_config).parameters)
  if arg is not None and not takes_arg:
    raise ConfigError(f'config file {path} takes no argument, but {source!r} passes {arg!r}; drop the ":{arg}".')
  try:
    config = get_config(arg) if takes_arg else get_config()
  except ValueError as e:
    raise ConfigError(f'{path}: {e}') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'get_config() in {path} returned {type(config).__name__}, expected ml_collections.ConfigDict.')
  apply_overrides(config, overrides)
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
  for override in overrides:
    key, sep, text = override.partition('=')
    if not sep:
      raise ConfigError(f'config override {override!r} has no value; write it as {override}=VALUE.')
    set_field(config, key.strip(), text)
  return config


def set_field(config: ml_collections.ConfigDict, dotted_key: str, text: str) -> None:
  """Sets `config.<dotted_key>` to `text` parsed as the type of the value it replaces."""
  parent, name = _parent_of(config, dotted_key)
  current = parent[name]
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f'config key {dotted_key!r} is a section, not a value; set one of its fields: '
                      f'{", ".join(f"{dotted_key}.{k}" for k in current.keys())}.')
  try:
    value = parse_value(text, current)
  except ValueError as e:
    raise ConfigError(f'config key {dotted_key!r}: cannot use {text!r}: {e}') from None
  with parent.ignore_type():
    parent[name] = value


def _parent_of(config: ml_collections.ConfigDict, dotted_key: str) -> tuple[ml_collections.ConfigDict, str]:
  parts = dotted_key.split('.')
  node = config
  for depth, part in enumerate(parts):
    where = '.'.join(parts[:depth]) or '(top level)'
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f'unknown config key {dotted_key!r}: {where} is a value, not a section.')
    if part not in node:
      valid = sorted(node.keys())
      close = difflib.get_close_matches(part, valid, n=1)
      hint = f' Did you mean {".".join(parts[:depth] + close)!r}?' if close else ''
      raise ConfigError(f'unknown config key {dotted_key!r}: {part!r} is not a key of {where}.{hint} '
                        f'Valid keys there: {", ".join(valid)}.')
    if depth < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


def parse_value(text: str, current: Any) -> Any:
  """Parses command-line `text` as the type of `current` (the value it will replace)."""
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered in _TRUE:
      return True
    if lowered in _FALSE:
      return False
    raise ValueError(f'expected a boolean ({"/".join(_TRUE)} or {"/".join(_FALSE)}).')
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise ValueError('expected an integer.') from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise ValueError('expected a number.') from None
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    value = _literal(text)
    if isinstance(value, (int, float, str)):
      value = (value,)
    if not isinstance(value, (tuple, list)):
      raise ValueError(f'expected a {type(current).__name__} like {current!r}.')
    return type(current)(value)
  value = _literal(text)
  return value


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
