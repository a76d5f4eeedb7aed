"""Model directories: `config.json` (which model, its config section) beside orbax parameters in `params/`.

Every converted or trained model is such a directory, so `load(path)` returns `(model, params)` for any of them.
Directories are written under a temporary name and renamed when complete, so a crash never leaves a directory
that looks finished. Parameters may be `SpilledArray`s (conversions keep their output on disk, not in memory):
those are read and written one at a time and stored exactly as the numpy arrays they stand for.
"""

import ctypes
import functools
import importlib
import json
import os
import shutil
import uuid
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from landiff_jax import __version__, runtime

FORMAT = runtime.MODEL_FORMAT
FORMAT_VERSION = 1
CONFIG_FILE = runtime.MODEL_CONFIG_FILE
PARAMS_DIR = 'params'

# part name → 'module:function' that builds the linen module from its config section (imported lazily).
# Each model issue registers its part here when its model file lands.
MODEL_BUILDERS: dict[str, str] = {
    'dit': 'landiff_jax.models.dit:build_dit',
    'lm': 'landiff_jax.models.lm:build_lm',
    't5_dit': 'landiff_jax.models.t5:build_t5',
    't5_lm': 'landiff_jax.models.t5:build_t5',
    'theia': 'landiff_jax.models.theia:build_theia',
    'tokenizer': 'landiff_jax.models.tokenizer:build_tokenizer',
    'vae': 'landiff_jax.models.vae:build_vae',
}

# part → the config sections stored with its model directory, where that is not just the section of its own name:
# the renderer's directory holds the backbone, the control branch and the semantic upsampler.
PART_SECTIONS: dict[str, tuple[str, ...]] = {'dit': ('dit', 'control', 'upsampler')}


class CheckpointError(ValueError):
  """A model directory that cannot be written or read; the message names the path and the fix."""


class SpilledArray:
  """An array kept in a raw file (C order, no header) instead of memory, e.g. a converted parameter.

  `save` writes it as the numpy array it stands for, reading it from disk only when its turn comes.
  """

  def __init__(self, path: str, shape: tuple[int, ...], dtype: Any):
    self.path, self.shape, self.dtype = path, tuple(int(n) for n in shape), np.dtype(dtype)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def load(self) -> np.ndarray:
    data = np.fromfile(self.path, dtype=self.dtype)
    if data.size != self.size:
      raise CheckpointError(f'{self.path} holds {data.size} values, expected {self.shape}; it was changed or cut.')
    return data.reshape(self.shape)

  def __array__(self, dtype=None, copy=None):
    array = self.load()
    return array if dtype is None else array.astype(dtype)

  def __repr__(self) -> str:
    return f'SpilledArray({self.path!r}, {self.shape}, {self.dtype})'


# Spilled leaves are written in batches of about this many bytes (a larger leaf alone): few enough orbax/OCDBT
# commits to stay quick, little enough memory to stay near the largest leaf.
SPILLED_BATCH_BYTES = 32 << 20


class _SpilledArrayHandler(ocp.type_handlers.NumpyHandler):
  """Writes `SpilledArray` leaves as `np.ndarray` ones (same typestr and files) a batch at a time, each read just
  before it is written and dropped after, so saving holds about one batch in memory rather than the tree."""

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)

  # NumpyHandler.serialize (orbax 0.12, pinned) runs `_background_serialize(values, infos, args)` after the
  # synchronous part of the save; it writes all values at once, here it is called one batch at a time.
  async def _background_serialize(self, values, infos, args=None):
    args = args or [ocp.SaveArgs()] * len(values)
    batch, batch_bytes = [], 0
    for item in zip(values, infos, args):
      if batch and batch_bytes + item[0].nbytes > SPILLED_BATCH_BYTES:
        await self._write(batch)
        batch, batch_bytes = [], 0
      batch.append(item)
      batch_bytes += item[0].nbytes
    if batch:
      await self._write(batch)

  async def _write(self, batch):
    values, infos, args = zip(*batch)
    await super()._background_serialize([value.load() for value in values], list(infos), list(args))
    _return_freed_memory()


@functools.cache
def _malloc_trim():
  try:
    return ctypes.CDLL(None).malloc_trim
  except (OSError, AttributeError):  # not glibc
    return None


def _return_freed_memory() -> None:
  """glibc keeps freed memory of its heaps for reuse (tensorstore's writer threads each have one); hand it back so
  that the process's resident memory follows what is live."""
  trim = _malloc_trim()
  if trim is not None:
    trim(0)


def _checkpointer_for(params: Any) -> tuple[Any, Any]:
  """(checkpointer, what its `save` takes): orbax's standard one, or for trees with spilled leaves the PyTree
  handler that one wraps (writing the same files) with spilled leaves written by `_SpilledArrayHandler`."""
  if not any(isinstance(leaf, SpilledArray) for leaf in jax.tree.leaves(params)):
    return ocp.StandardCheckpointer(), params
  handlers = ocp.type_handlers
  defaults = [(ty, handlers.get_type_handler(ty)) for ty in handlers.supported_types()]
  registry = handlers.create_type_handler_registry((SpilledArray, _SpilledArrayHandler()), *defaults)
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, type_handler_registry=registry)
  return ocp.AsyncCheckpointer(handler), ocp.args.PyTreeSave(params)


def save(dst: str, *, part: str, config: ml_collections.ConfigDict, params: Any, overwrite: bool = False,
         source: str = '') -> str:
  """Writes `params` and `config` (the part's config section) as a model directory at `dst`; returns its path."""
  if part not in MODEL_BUILDERS:
    raise CheckpointError(f'unknown model part {part!r}; known parts: {", ".join(sorted(MODEL_BUILDERS))}.')
  _check_leaves(params)
  dst = os.path.abspath(dst)
  if os.path.exists(dst) and not overwrite:
    raise CheckpointError(f'{dst} already exists; choose another destination or pass --overwrite.')
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f'.{os.path.basename(dst)}.tmp-{uuid.uuid4().hex[:8]}')
  checkpointer, item = _checkpointer_for(params)
  try:
    checkpointer.save(os.path.join(tmp, PARAMS_DIR), item)
    checkpointer.wait_until_finished()
    meta = dict(format=FORMAT, format_version=FORMAT_VERSION, landiff_jax_version=__version__, part=part,
                source=source, config=json.loads(config.to_json_best_effort()))
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
      json.dump(meta, f, indent=2)
    _replace_directory(tmp, dst)
  finally:
    _settle(checkpointer)  # a failed save may still have a writer thread about to create files under tmp
    shutil.rmtree(tmp, ignore_errors=True)
  return dst


def _settle(checkpointer) -> None:
  try:
    checkpointer.wait_until_finished()
  except Exception:  # pylint: disable=broad-except
    pass  # the save already failed; its error is the one the caller sees


def _check_leaves(params: Any) -> None:
  """Every leaf must be an array or a number; checked before orbax starts writing (it writes in threads)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  bad = [jax.tree_util.keystr(path) for path, leaf in flat
         if not (hasattr(leaf, 'shape') and hasattr(leaf, 'dtype')) and not isinstance(leaf, (int, float, bool))]
  if bad:
    raise CheckpointError(f'parameters must be arrays; these leaves are not: {", ".join(bad[:10])}.')


def _replace_directory(src: str, dst: str) -> None:
  old = None
  if os.path.exists(dst):
    old = f'{dst}.old-{uuid.uuid4().hex[:8]}'
    os.rename(dst, old)
  os.rename(src, dst)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def read_meta(path: str) -> dict[str, Any]:
  meta = runtime.read_model_meta(path, CheckpointError)
  if meta.get('format_version', 0) > FORMAT_VERSION:
    raise CheckpointError(f'{path} was written by a newer landiff-jax (format {meta["format_version"]}); upgrade.')
  return meta


def load_params(path: str, shardings: Any = None, dtype: Any = None) -> Any:
  """The parameter tree of a model directory; placed in `shardings` when given: a matching tree, or a function
  `(key_path, leaf metadata) -> Sharding` called per stored leaf. With `dtype`, floating leaves are cast to it while
  they are read (on the host, leaf by leaf), so a float32 directory loads as bfloat16 without ever holding its
  float32 copy on the device, and the other way round."""
  params_path = os.path.join(os.path.abspath(path), PARAMS_DIR)
  if not os.path.isdir(params_path):
    raise CheckpointError(f'{path} has no {PARAMS_DIR}/ directory; the conversion did not finish. Convert again.')
  checkpointer = ocp.StandardCheckpointer()
  try:
    metadata = checkpointer.metadata(params_path).item_metadata.tree
  except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many kinds)
    raise CheckpointError(f'{params_path} cannot be read ({_first_line(e)}); the directory is damaged or '
                          f'incomplete: convert or export it again.') from None
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's (multi-host: not devices()[0])
    shardings = jax.tree.map(lambda _: device, metadata)
  elif callable(shardings):
    shardings = jax.tree_util.tree_map_with_path(shardings, metadata)
  cast = (lambda stored: stored) if dtype is None else functools.partial(_load_dtype, np.dtype(jax.numpy.dtype(dtype)))
  target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, cast(np.dtype(m.dtype)), sharding=s), metadata,
                        shardings)
  try:
    return checkpointer.restore(params_path, target)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'{params_path} cannot be read ({_first_line(e)}); its files are truncated or corrupt: '
                          f'convert or export it again.') from None


def _load_dtype(dtype: np.dtype, stored: np.dtype) -> np.dtype:
  return dtype if np.issubdtype(stored, np.floating) or stored == jax.numpy.bfloat16 else stored


def _first_line(error: BaseException, limit: int = 300) -> str:
  text = ' '.join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit] + ' …'


def build_model(part: str, config: ml_collections.ConfigDict, **model_kwargs) -> Any:
  if part not in MODEL_BUILDERS:
    raise CheckpointError(f'unknown model part {part!r}; known parts: {", ".join(sorted(MODEL_BUILDERS))}.')
  module_name, function_name = MODEL_BUILDERS[part].split(':')
  return getattr(importlib.import_module(module_name), function_name)(config, **model_kwargs)


def part_config(config: ml_collections.ConfigDict, part: str) -> ml_collections.ConfigDict:
  """The config a model directory of `part` stores, taken from a full config (a copy, references resolved)."""
  sections = PART_SECTIONS.get(part, (part,))
  missing = [name for name in sections if name not in config]
  if missing:
    raise CheckpointError(f'the config has no {", ".join(missing)} section, which a {part} model directory needs; '
                          f'pass a full LanDiff config (configs/landiff_official.py or one built from it).')
  if sections == (part,):
    return config[part].copy_and_resolve_references()
  return ml_collections.ConfigDict({name: config[name].to_dict() for name in sections})


def load(path: str, *, shardings: Any = None, param_dtype: Any = None, **model_kwargs) -> tuple[Any, Any]:
  """(model, params) of any model directory; `model_kwargs` (e.g. dtype, the compute dtype) go to the model's
  builder. Floating parameters load in `param_dtype`; without it in `model_kwargs['dtype']` when that is given
  (an explicit dtype covers both), else as stored (`convert --dtype`: bfloat16 by default)."""
  meta = read_meta(path)
  config = ml_collections.ConfigDict(meta['config'])
  if param_dtype is None:
    param_dtype = model_kwargs.get('dtype')
  return build_model(meta['part'], config, **model_kwargs), load_params(path, shardings, dtype=param_dtype)


def load_config(path: str) -> ml_collections.ConfigDict:
  """The config section stored with a model directory."""
  return ml_collections.ConfigDict(read_meta(path)['config'])
