"""The official tokenizer (`tokenizer/model.safetensors`, VideoVQ names, reference landiff-official.md §3.8) →
`models/tokenizer.py` parameters, plus the quantizer's EMA state (kept for fine-tuning) in `quantizer_ema`.

Linear weights (out, in) become (in, out) kernels, q/k/v/o split into heads; per-layer tensors are stacked along a
leading layer axis; the 1×1 patch-embedding convolution becomes a matrix. Theia weights under `feature_extractor.`
are left to `convert theia`.

Loading rules of the release: `tokenizer/model.safetensors` is loaded with strict=True (unknown tensors refused);
the `mean`/`std` buffers are never applied (`mean_std_path=None`), so they are dropped (reported when they are not
the identity). LanDiff's diffusion engine holds its own copy of the tokenizer under
`…semantic_conditioner.semantic_model.model.` and loads it (strict=False) after the tokenizer file, so where the
copy has a tensor, the copy's wins: `convert_tokenizer(engine, config, base_state_dict=tokenizer_file)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from landiff_jax.convert import notice
from landiff_jax.convert.common import Mapper, expected_shapes, linear, overlay, source_of, strip_prefix
from landiff_jax.models import tokenizer as tokenizer_model

IGNORED_PREFIXES = ('feature_extractor.',)
NORMALISATION = {'mean': 0.0, 'std': 1.0}  # buffers the release never applies, with their identity values
# where LanDiff's diffusion engine keeps its copy of the VideoVQ state dict (reference §5.5)
COPY_PREFIXES = tuple(p + 'semantic_conditioner.semantic_model.model.' for p in (
    'model.control_model.diffusion_model.', 'control_model.diffusion_model.', ''))
ENGINE_PREFIXES = ('model.control_model.', 'model.main_model.', 'model.diffusion_model.', 'first_stage_model.',
                   'conditioner.')
EMA_KEYS = {'quantizer._codebook.embed_avg': 'embed_avg', 'quantizer._codebook.cluster_size': 'cluster_size',
            'quantizer._codebook.initted': 'initted'}


def block_rules(width: int, heads: int) -> list[tuple[str, tuple[str, ...], Any]]:
  head_dim = width // heads
  return [
      ('ln_1.weight', ('ln_1', 'scale'), None), ('ln_1.bias', ('ln_1', 'bias'), None),
      ('ln_2.weight', ('ln_2', 'scale'), None), ('ln_2.bias', ('ln_2', 'bias'), None),
      ('attn.wq.weight', ('wq', 'kernel'), lambda w: w.T.reshape(width, heads, head_dim)),
      ('attn.wk.weight', ('wk', 'kernel'), lambda w: w.T.reshape(width, heads, head_dim)),
      ('attn.wv.weight', ('wv', 'kernel'), lambda w: w.T.reshape(width, heads, head_dim)),
      ('attn.wq.bias', ('wq', 'bias'), lambda b: b.reshape(heads, head_dim)),
      ('attn.wk.bias', ('wk', 'bias'), lambda b: b.reshape(heads, head_dim)),
      ('attn.wv.bias', ('wv', 'bias'), lambda b: b.reshape(heads, head_dim)),
      ('attn.wo.weight', ('wo', 'kernel'), lambda w: w.T.reshape(heads, head_dim, width)),
      ('attn.wo.bias', ('wo', 'bias'), None),
      ('mlp.c_fc.weight', ('mlp', 'fc1', 'kernel'), linear), ('mlp.c_fc.bias', ('mlp', 'fc1', 'bias'), None),
      ('mlp.c_proj.weight', ('mlp', 'fc2', 'kernel'), linear), ('mlp.c_proj.bias', ('mlp', 'fc2', 'bias'), None),
  ]


def top_rules() -> list[tuple[str, tuple[str, ...], Any]]:
  dense = lambda name, path: [(f'{name}.weight', path + ('kernel',), linear), (f'{name}.bias', path + ('bias',), None)]
  norm = lambda name, path: [(f'{name}.weight', path + ('scale',), None), (f'{name}.bias', path + ('bias',), None)]
  rules = [
      ('encoder.patch_embed.weight', ('encoder', 'patch_embed', 'kernel'), lambda w: linear(w[:, :, 0, 0])),
      ('encoder.patch_embed.bias', ('encoder', 'patch_embed', 'bias'), None),
      ('encoder.IFrame_latent_tokens', ('encoder', 'iframe_queries'), None),
      ('encoder.PFrame_latent_tokens', ('encoder', 'pframe_queries'), None),
      ('decoder.mask_token', ('decoder', 'mask_token'), lambda w: w.reshape(-1)),
      ('quantizer._codebook.embed', ('quantizer', 'codebook'), lambda w: w[0]),
  ]
  for part in ('encoder', 'decoder'):
    rules += norm(f'{part}.ln_pre', (part, 'ln_pre')) + norm(f'{part}.ln_post', (part, 'ln_post'))
  rules += dense('encoder.proj_out', ('encoder', 'proj_out'))
  rules += dense('decoder.decoder_embed', ('decoder', 'decoder_embed'))
  rules += dense('decoder.ffn.0', ('decoder', 'ffn_in')) + dense('decoder.ffn.2', ('decoder', 'ffn_out'))
  rules += dense('quantizer.project_in', ('quantizer', 'project_in'))
  rules += dense('quantizer.project_out', ('quantizer', 'project_out'))
  return rules


def engine_copy(state_dict: Mapping[str, np.ndarray]) -> tuple[Mapping[str, np.ndarray], str]:
  """(the tokenizer tensors inside an engine checkpoint, without their prefix; the prefix), or ({}, '')."""
  for prefix in COPY_PREFIXES:
    if any(name.startswith(prefix) for name in state_dict):
      return strip_prefix(state_dict, prefix), prefix
  return {}, ''


def drop_normalisation(state_dict: Mapping[str, np.ndarray]) -> None:
  """Reports `mean`/`std` buffers that are not the identity: the release never applies them, nor does landiff-jax."""
  for name, identity in NORMALISATION.items():
    if name not in state_dict:
      continue
    value = np.asarray(state_dict[name], np.float32)
    if not np.allclose(value, identity):
      notice(f'tokenizer: dropped the `{name}` buffer ({value.size} values in [{value.min():.3g}, {value.max():.3g}], '
             f'not the identity {identity:g}): the release never applies it (mean_std_path=None), nor does '
             'landiff-jax.')


def select_source(state_dict: Mapping[str, np.ndarray],
                  base_state_dict: Mapping[str, np.ndarray] | None) -> tuple[Mapping[str, np.ndarray], set[str]]:
  """(the VideoVQ tensors to convert, the names that come from an engine copy, which are read leniently) following
  the release's precedence: the engine's copy over the tokenizer file."""
  copy, prefix = engine_copy(state_dict)
  if base_state_dict is None:
    if copy:
      notice(f'tokenizer: converting the copy inside the engine checkpoint {source_of(state_dict)} '
             f'({len(copy)} tensors under {prefix}).')
      return copy, set(copy)
    return state_dict, set()
  base_copy, _ = engine_copy(base_state_dict)
  base = base_copy or base_state_dict
  if not copy:
    if any(name.startswith(ENGINE_PREFIXES) for name in state_dict):
      notice(f'tokenizer: the engine checkpoint {source_of(state_dict)} holds no tokenizer copy; converting '
             f'{source_of(base, "the tokenizer file")} alone.')
      return base, set()
    copy = state_dict
  merged = overlay(copy, base, 'tokenizer', f'the engine copy in {source_of(state_dict)}',
                   source_of(base, 'the tokenizer file'),
                   'the release loads the diffusion engine after tokenizer/model.safetensors, so its copy is the '
                   'one it decodes with')
  return merged, {name for name in copy if name not in base}


def convert_tokenizer(state_dict: Mapping[str, np.ndarray], config: Any, *,
                      base_state_dict: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
  """{'params': ..., 'quantizer_ema': ...} for `build_tokenizer(config)` from the official VideoVQ state dict, or from
  LanDiff's engine checkpoint (its tokenizer copy), over `base_state_dict` (the tokenizer file) when given."""
  state_dict, lenient_names = select_source(state_dict, base_state_dict)
  drop_normalisation(state_dict)
  model = tokenizer_model.build_tokenizer(config)
  s = model.settings
  m = Mapper(state_dict, expected_shapes(model.init_params, 'tokenizer'))
  for name, path, transform in top_rules():
    m.take(name, ('params',) + path, transform)
  for part in ('encoder', 'decoder'):
    for suffix, path, transform in block_rules(s.width, s.num_heads):
      if suffix.startswith('attn.') and suffix.endswith('.bias') and not s.qkv_bias:
        continue
      names = [f'{part}.transformer.{i}.{suffix}' for i in range(s.num_layers)]
      m.take_stacked(names, ('params', part, 'transformer') + path, transform)
  # EMA statistics stay float32 arrays (not parameters: never cast to the storage dtype, never spilled; small)
  ema = {short: np.asarray(state_dict[name], np.float32)[0] for name, short in EMA_KEYS.items() if name in state_dict}
  m.used.update(name for name in EMA_KEYS if name in state_dict)
  ignored_copy = [n for n in lenient_names if n not in m.used and not n.startswith(IGNORED_PREFIXES)
                  and n not in NORMALISATION]
  if ignored_copy:
    notice(f'tokenizer: ignored {len(ignored_copy)} tensor(s) of the engine copy the model has no place for, as the '
           f'release does (it loads the engine with strict=False): {", ".join(sorted(ignored_copy)[:10])}')
  ignored = lambda name: name in NORMALISATION or name.startswith(IGNORED_PREFIXES) or name in lenient_names
  out = m.result(f'the tokenizer checkpoint (width {s.width}, {s.num_layers} layers, {s.num_heads} heads, codebook '
                 f'{s.codebook_size}×{s.codebook_dim})', ignored, strict=True, config=config, section='tokenizer')
  if ema:
    out['quantizer_ema'] = ema
  return out
