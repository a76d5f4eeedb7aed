"""Process-wide run-time settings: the persistent compilation cache, compile statistics, and stage offloading.

The cache makes a second `landiff-jax generate` process load the compiled programs of the first instead of compiling
them again (about 53 s of a 100 s first video at full size). It is set up once, at the start of a command, before
anything compiles; JAX reads it when it compiles its first program.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

CACHE_ENV = 'LANDIFF_JAX_CACHE_DIR'  # overrides the per-user default folder (not an explicit config value)


class SettingError(ValueError):
  """A run-time setting that cannot be used; the message names it and the fix."""


def default_cache_dir() -> str:
  """$LANDIFF_JAX_CACHE_DIR, else $XDG_CACHE_HOME/landiff-jax/xla, else ~/.cache/landiff-jax/xla."""
  if os.environ.get(CACHE_ENV):
    return os.environ[CACHE_ENV]
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'landiff-jax', 'xla')


def enable_compilation_cache(directory: str = '') -> str:
  """Turns on JAX's persistent compilation cache in `directory` (default: `default_cache_dir()`); returns it.

  Every program is cached, however quickly it compiled: a pipeline compiles dozens of small ones, and together
  they are a good part of a process's start-up."""
  import jax

  directory = os.path.abspath(os.path.expanduser(directory or default_cache_dir()))
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise SettingError(f'cannot create the compilation cache folder {directory} ({e.strerror}); set '
                        '--config.runtime.compilation_cache_dir to a writable folder or pass --no-compile-cache.')
  if not os.access(directory, os.W_OK):
    raise SettingError(f'the compilation cache folder {directory} is not writable; set '
                        '--config.runtime.compilation_cache_dir to a writable folder or pass --no-compile-cache.')
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return directory


def setup(runtime_config: Any, use_cache: bool = True) -> str | None:
  """The command-line start-up: the compilation cache per `config.runtime` (None when off) and compile statistics."""
  compile_stats.start()
  if not use_cache or not bool(runtime_config.get('compilation_cache', True)):
    return None
  return enable_compilation_cache(str(runtime_config.get('compilation_cache_dir', '') or ''))


@dataclasses.dataclass
class CompileStats:
  """XLA compilations of this process, counted from JAX's monitoring events once `start()` ran.

  `seconds` is the time spent producing executables (compiling, or reading them from the persistent cache);
  `cache_hits` / `cache_misses` count programs looked up in the persistent cache."""
  seconds: float = 0.0
  programs: int = 0
  cache_hits: int = 0
  cache_misses: int = 0

  def __post_init__(self):
    self._lock = threading.Lock()
    self._started = False

  def start(self) -> None:
    if self._started:
      return
    import jax
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)
    self._started = True

  def _on_duration(self, event: str, duration: float, **kwargs) -> None:
    if event == '/jax/core/compile/backend_compile_duration':
      with self._lock:
        self.seconds += duration
        self.programs += 1

  def _on_event(self, event: str, **kwargs) -> None:
    with self._lock:
      if event == '/jax/compilation_cache/cache_hits':
        self.cache_hits += 1
      elif event == '/jax/compilation_cache/cache_misses':
        self.cache_misses += 1

  def summary(self) -> dict:
    return dict(compile_s=round(self.seconds, 3), programs=self.programs, cache_hits=self.cache_hits,
                cache_misses=self.cache_misses)


compile_stats = CompileStats()

OFFLOAD_MODES = ('none', 'stage')


def check_offload(mode: str) -> str:
  if mode not in OFFLOAD_MODES:
    raise SettingError(f'offload must be one of {", ".join(OFFLOAD_MODES)}, got {mode!r}: "none" keeps every part on '
                        'the device, "stage" only the running stage\'s.')
  return mode


def to_host(params: Any) -> Any:
  """A host copy of a parameter tree (numpy arrays), the device copies released."""
  import jax
  host = jax.device_get(params)
  for leaf in jax.tree.leaves(params):
    if isinstance(leaf, jax.Array):
      leaf.delete()
  return host


def to_device(host: Any, shardings: Any) -> Any:
  """A host parameter tree placed in `shardings` (a matching tree) again."""
  import jax
  return jax.device_put(host, shardings)


# --- pipeline directories, checked without importing JAX (so a command line fails fast) ---------------------------

PARTS = ('t5_lm', 't5_dit', 'lm', 'tokenizer', 'dit', 'vae')
TEXT_TOKENIZERS = {'t5_lm': 't5_lm_tokenizer', 't5_dit': 't5_dit_tokenizer'}
PIPELINE_CONFIG_FILE = 'landiff.json'
MODEL_CONFIG_FILE = 'config.json'
MODEL_FORMAT = 'landiff-jax-model'


class DirectoryError(ValueError):
  """A pipeline or model directory that cannot be used; the message names the file and the fix."""


def read_pipeline_config(directory: str):
  """The full config a pipeline directory was converted with (`landiff.json`)."""
  import json

  import ml_collections

  path = os.path.join(directory, PIPELINE_CONFIG_FILE)
  if not os.path.isfile(path):
    raise DirectoryError(f'{directory} is not a pipeline directory (no {PIPELINE_CONFIG_FILE}); make one with '
                         f'`landiff-jax convert all --dst {directory} ...`.')
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise DirectoryError(f'{path} cannot be read ({" ".join(str(e).split())}); convert the release again with '
                         '`landiff-jax convert all`.') from None


def read_model_meta(path: str, error: type[ValueError] = DirectoryError) -> dict[str, Any]:
  """The `config.json` of a model directory (part, config, format); a missing or foreign file is one `error`."""
  import json

  config_path = os.path.join(path, MODEL_CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise error(f'{path} is not a landiff-jax model directory (no {MODEL_CONFIG_FILE}); convert the official '
                'checkpoint with `landiff-jax convert`.')
  try:
    with open(config_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise error(f'{config_path} cannot be read ({" ".join(str(e).split())}); convert or export the model '
                'again.') from None
  if not isinstance(meta, dict) or meta.get('format') != MODEL_FORMAT or 'part' not in meta:
    found = meta.get('format') if isinstance(meta, dict) else None
    raise error(f'{config_path} is not a landiff-jax model config (format {found!r}); convert the model with '
                '`landiff-jax convert`.')
  return meta


def read_model_part(path: str) -> str:
  """Which part a model directory holds, from its config.json; a missing or foreign file is one clear error."""
  meta = read_model_meta(path)
  if not os.path.isdir(os.path.join(path, 'params')):
    raise DirectoryError(f'{path} has no params/ directory; the conversion did not finish. Convert it again.')
  return meta['part']


def check_pipeline_directory(directory: str) -> None:
  """Every part and text tokenizer of a pipeline directory is present and of the right kind (files only)."""
  if not os.path.isdir(directory):
    raise DirectoryError(f'the pipeline directory {directory} does not exist; make one with '
                         f'`landiff-jax convert all --dst {directory} ...`.')
  missing = [p for p in PARTS if not os.path.isdir(os.path.join(directory, p))]
  missing += [t for t in TEXT_TOKENIZERS.values() if not os.path.isdir(os.path.join(directory, t))]
  if missing:
    raise DirectoryError(f'{directory} lacks {", ".join(missing)}; convert the release with `landiff-jax convert all`.')
  for name in PARTS:
    path = os.path.join(directory, name)
    part = read_model_part(path)
    if part != name:
      raise DirectoryError(f'{path} holds a {part} model, not the {name} this part needs; convert it with '
                           f'`landiff-jax convert {name} --dst {path} ...` (or `convert all`).')
