"""Model directories: `config.json` (which model, its config section) beside orbax parameters in `params/`.

Every converted or trained model is such a directory, so `load(path)` returns `(model, params)` for any of them.
Directories are written under a temporary name and renamed when complete, so a crash never leaves a directory
that looks finished.
"""

import importlib
import json
import os
import shutil
import uuid
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from landiff_jax import __version__

FORMAT = 'landiff-jax-model'
FORMAT_VERSION = 1
CONFIG_FILE = 'config.json'
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


class CheckpointError(ValueError):
  """A model directory that cannot be written or read; the message names the path and the fix."""


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
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
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
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise CheckpointError(f'{path} is not a landiff-jax model directory (no {CONFIG_FILE}); convert the official '
                          'checkpoint first with `landiff-jax convert`.')
  with open(config_path) as f:
    meta = json.load(f)
  if meta.get('format') != FORMAT:
    raise CheckpointError(f'{config_path} is not a landiff-jax model config (format {meta.get("format")!r}).')
  if meta.get('format_version', 0) > FORMAT_VERSION:
    raise CheckpointError(f'{path} was written by a newer landiff-jax (format {meta["format_version"]}); upgrade.')
  return meta


def load_params(path: str, shardings: Any = None) -> Any:
  """The parameter tree of a model directory; placed in `shardings` when given: a matching tree, or a function
  `(key_path, leaf metadata) -> Sharding` called per stored leaf."""
  params_path = os.path.join(os.path.abspath(path), PARAMS_DIR)
  if not os.path.isdir(params_path):
    raise CheckpointError(f'{path} has no {PARAMS_DIR}/ directory; the conversion did not finish. Convert again.')
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(params_path).item_metadata.tree
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, metadata)
  elif callable(shardings):
    shardings = jax.tree_util.tree_map_with_path(shardings, metadata)
  target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), metadata, shardings)
  return checkpointer.restore(params_path, target)


def build_model(part: str, config: ml_collections.ConfigDict, **model_kwargs) -> Any:
  if part not in MODEL_BUILDERS:
    raise CheckpointError(f'unknown model part {part!r}; known parts: {", ".join(sorted(MODEL_BUILDERS))}.')
  module_name, function_name = MODEL_BUILDERS[part].split(':')
  return getattr(importlib.import_module(module_name), function_name)(config, **model_kwargs)


def load(path: str, *, shardings: Any = None, **model_kwargs) -> tuple[Any, Any]:
  """(model, params) of any model directory; `model_kwargs` (e.g. dtype) go to the model's builder."""
  meta = read_meta(path)
  config = ml_collections.ConfigDict(meta['config'])
  return build_model(meta['part'], config, **model_kwargs), load_params(path, shardings)


def load_config(path: str) -> ml_collections.ConfigDict:
  """The config section stored with a model directory."""
  return ml_collections.ConfigDict(read_meta(path)['config'])
