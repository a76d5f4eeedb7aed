"""`landiff-jax convert all`: the whole official release (reference landiff-official.md §1) → one pipeline directory.

    ckpts/LanDiff/llm/model.safetensors                                  → lm
    the engine's tokenizer copy over ckpts/LanDiff/tokenizer/model.safetensors → tokenizer
    ckpts/LanDiff/diffusion/1/mp_rank_00_model_states.pt (diffusion/latest names the 1)
      over CogVideoX-2b-sat/transformer/1000/mp_rank_00_model_states.pt  → dit (backbone, control, upsampler)
    ckpts/LanDiff/CogVideoX-2b-sat/vae/3d-vae.pt                         → vae
    CogVideoX-2b-sat/t5-v1_1-xxl/ (or --t5)                              → t5_dit + t5_dit_tokenizer/
    --flan-t5 DIR (not part of the release)                              → t5_lm + t5_lm_tokenizer/
    --theia DIR, or Theia's copy inside the tokenizer file (optional)     → theia (to encode videos)

Each part is converted and written on its own, streaming: source tensors are read one at a time and each converted
parameter goes to a temporary file under DST at once (`common.spilling`), then `checkpoints.save` writes them one at
a time, so memory stays near the largest tensor rather than the part (that takes free disk for one part's float32
parameters besides the output). A part whose sources are unchanged since it was written (size and modification
time, kept in `manifest.json`, and the storage dtype) is skipped. Parameters are stored in `dtype` (default: the
config's `storage_dtype`); a part's failure is one line naming the part and its file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable

import ml_collections

from landiff_jax import checkpoints, pipeline
from landiff_jax.convert import ConversionError, common, io
from landiff_jax.convert.dit import convert_dit
from landiff_jax.convert.lm import convert_lm
from landiff_jax.convert.t5 import convert_t5
from landiff_jax.convert.theia import convert_theia
from landiff_jax.convert.tokenizer import convert_tokenizer
from landiff_jax.convert.vae import convert_vae

MANIFEST = 'manifest.json'
TOKENIZER_FILES = ('spiece.model', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'added_tokens.json')


THEIA_KEY = 'feature_extractor.model.backbone.model.embeddings.position_embeddings'
# Frozen parts LanDiff's engine checkpoint may also hold (reference §5.10; whether it does is an open question):
# SAT loads the engine last with strict=False, so tensors found there win over the part's own file.
ENGINE_COPIES = {'vae': ('first_stage_model.', 'model.first_stage_model.'),
                 't5_dit': ('conditioner.embedders.0.transformer.', 'model.conditioner.embedders.0.transformer.')}


def over_engine(part: str, engine: Any, base: Any) -> Any:
  """The part's tensors: the engine's copy (if it holds one) over the part's own file, as the release loads them."""
  for prefix in ENGINE_COPIES[part]:
    copy = common.strip_prefix(engine, prefix)
    if copy:
      return common.overlay(copy, base, part, f'the engine copy in {common.source_of(engine)}',
                            common.source_of(base, f'the {part} file'),
                            'the release loads the engine checkpoint last, so its tensors win')
  return base


def release_sources(src: str, t5: str | None, flan_t5: str | None,
                    theia: str | None = None) -> dict[str, dict[str, str]]:
  """part → {'src': path, optional 'base': path}; raises naming every missing file. Theia (only needed to encode
  videos) comes from --theia, else from the tokenizer file when it holds a copy, else is left out."""
  cog = os.path.join(src, 'CogVideoX-2b-sat')
  engine = deepspeed_file(os.path.join(src, 'diffusion'), '1')
  sources = {
      'lm': {'src': os.path.join(src, 'llm', 'model.safetensors')},
      # the engine's tokenizer copy (if it holds one) wins over the tokenizer file, as in the release
      'tokenizer': {'src': os.path.join(src, 'tokenizer', 'model.safetensors'), 'engine': engine},
      'dit': {'src': engine, 'base': deepspeed_file(os.path.join(cog, 'transformer'), '1000')},
      'vae': {'src': os.path.join(cog, 'vae', '3d-vae.pt'), 'engine': engine},
      't5_dit': {'src': t5 or os.path.join(cog, 't5-v1_1-xxl'), 'engine': engine},
      't5_lm': {'src': flan_t5 or ''},
  }
  tokenizer_file = sources['tokenizer']['src']
  if theia:
    sources['theia'] = {'src': theia}
  elif os.path.isfile(tokenizer_file) and THEIA_KEY in io.read_safetensors_header(tokenizer_file)[0]:
    sources['theia'] = {'src': tokenizer_file}
  missing = []
  for part, paths in sources.items():
    for role, path in paths.items():
      if not path:
        missing.append(f'{part}: pass --flan-t5 DIR (google/flan-t5-xxl with its tokenizer; not in the release)')
      elif not os.path.exists(path):
        missing.append(f'{part} ({role}): {path}')
  if missing:
    raise ConversionError('the release is incomplete:\n  ' + '\n  '.join(missing))
  return sources


def deepspeed_file(folder: str, default_tag: str) -> str:
  """FOLDER/<tag>/mp_rank_00_model_states.pt, the tag read from FOLDER/latest as SAT does (default_tag without it)."""
  latest = os.path.join(folder, 'latest')
  tag = default_tag
  if os.path.isfile(latest):
    with open(latest) as f:
      tag = f.read().strip() or default_tag
  return os.path.join(folder, tag, io.DEEPSPEED_MODEL_FILE)


def fingerprint(paths: dict[str, str]) -> dict[str, list]:
  out = {}
  for role, path in paths.items():
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    out[role] = [[os.path.relpath(f, path) if f != path else '', os.path.getsize(f), int(os.path.getmtime(f))]
                 for f in files]
  return out


def copy_tokenizer(src_dir: str, dst_dir: str) -> None:
  files = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, f))]
  if not any(f in files for f in ('spiece.model', 'tokenizer.json')):
    raise ConversionError(f'{src_dir} has no T5 tokenizer (spiece.model or tokenizer.json).')
  tmp = dst_dir + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for f in files:
    shutil.copy2(os.path.join(src_dir, f), os.path.join(tmp, f))
  shutil.rmtree(dst_dir, ignore_errors=True)
  os.replace(tmp, dst_dir)


def convert_part(part: str, paths: dict[str, str], config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(params, part config) of one part."""
  state = io.load_state_dict(paths['src'])
  part_config = checkpoints.part_config(config, part)
  if part == 'dit':
    return convert_dit(state, part_config, base_state_dict=io.load_state_dict(paths['base'])), part_config
  if part == 'tokenizer' and 'engine' in paths:
    return convert_tokenizer(io.load_state_dict(paths['engine']), part_config, base_state_dict=state), part_config
  if part in ENGINE_COPIES and 'engine' in paths:
    state = over_engine(part, io.load_state_dict(paths['engine']), state)
  if part in ('t5_dit', 't5_lm'):
    return convert_t5(state, part_config, section=part), part_config
  converters = {'lm': convert_lm, 'tokenizer': convert_tokenizer, 'vae': convert_vae, 'theia': convert_theia}
  return converters[part](state, part_config), part_config


def convert_release(src: str, dst: str, config: ml_collections.ConfigDict, *, t5: str | None = None,
                    flan_t5: str | None = None, theia: str | None = None, dtype: str | None = None,
                    log: Callable[[str], None] = print) -> dict[str, str]:
  """Converts every part into `dst`, parameters stored in `dtype` (default `config.storage_dtype`); returns
  part → 'converted' | 'unchanged'."""
  dtype = dtype or config.get('storage_dtype', 'float32')
  sources = release_sources(src, t5, flan_t5, theia)
  os.makedirs(dst, exist_ok=True)
  manifest_path = os.path.join(dst, MANIFEST)
  manifest = {}
  if os.path.isfile(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
  report = {}
  for part, paths in sources.items():
    stamp = {**fingerprint(paths), 'dtype': dtype}
    out = os.path.join(dst, part)
    if manifest.get(part) == stamp and os.path.isdir(out):
      report[part] = 'unchanged'
      log(f'{part}: unchanged since the last conversion, kept')
      continue
    log(f'{part}: converting {paths["src"]}' + (f' over {paths["base"]}' if 'base' in paths else '')
        + (f' under the engine\'s copy, if it holds one' if 'engine' in paths else '') + f' ({dtype})')
    with tempfile.TemporaryDirectory(prefix=f'.{part}.spill-', dir=dst) as spill, common.spilling(spill):
      try:
        params, part_config = convert_part(part, paths, config)
      except ConversionError as e:
        where = '' if paths['src'] in str(e) else f' ({paths["src"]})'
        raise ConversionError(f'{part}{where}: {e}', details=e.details) from None
      params = common.cast_params(params, dtype)
      checkpoints.save(out, part=part, config=part_config, params=params, overwrite=True, source=paths['src'])
      del params
    if part in pipeline.TEXT_TOKENIZERS:
      copy_tokenizer(paths['src'], os.path.join(dst, pipeline.TEXT_TOKENIZERS[part]))
    manifest[part] = stamp
    with open(manifest_path + '.partial', 'w') as f:
      json.dump(manifest, f, indent=1)
    os.replace(manifest_path + '.partial', manifest_path)
    report[part] = 'converted'
  pipeline.save_config(dst, config)
  return report
