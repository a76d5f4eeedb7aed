"""The official tokenizer (`tokenizer/model.safetensors`, VideoVQ names, reference landiff-official.md §3.8) →
`models/tokenizer.py` parameters, plus the quantizer's EMA state (kept for fine-tuning) in `quantizer_ema`.

Linear weights (out, in) become (in, out) kernels, q/k/v/o split into heads; per-layer tensors are stacked along a
leading layer axis; the 1×1 patch-embedding convolution becomes a matrix. `mean`/`std` must be the identity
normalisation the release ships; Theia weights under `feature_extractor.` are left to `convert theia`.
"""

from __future__ import annotations

from collections.abc import Mapping
import re
from typing import Any

import jax
import numpy as np

from landiff_jax.convert import ConversionError
from landiff_jax.models import tokenizer as tokenizer_model
from landiff_jax.parallel import strip_partitioning

IGNORED_PREFIXES = ('feature_extractor.',)
EMA_KEYS = {'quantizer._codebook.embed_avg': 'embed_avg', 'quantizer._codebook.cluster_size': 'cluster_size',
            'quantizer._codebook.initted': 'initted'}


def _transposed(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(w.T)


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
      ('mlp.c_fc.weight', ('mlp', 'fc1', 'kernel'), _transposed), ('mlp.c_fc.bias', ('mlp', 'fc1', 'bias'), None),
      ('mlp.c_proj.weight', ('mlp', 'fc2', 'kernel'), _transposed), ('mlp.c_proj.bias', ('mlp', 'fc2', 'bias'), None),
  ]


def top_rules() -> list[tuple[str, tuple[str, ...], Any]]:
  linear = lambda name, path: [(f'{name}.weight', path + ('kernel',), _transposed), (f'{name}.bias', path + ('bias',),
                                                                                      None)]
  norm = lambda name, path: [(f'{name}.weight', path + ('scale',), None), (f'{name}.bias', path + ('bias',), None)]
  rules = [
      ('encoder.patch_embed.weight', ('encoder', 'patch_embed', 'kernel'), lambda w: _transposed(w[:, :, 0, 0])),
      ('encoder.patch_embed.bias', ('encoder', 'patch_embed', 'bias'), None),
      ('encoder.IFrame_latent_tokens', ('encoder', 'iframe_queries'), None),
      ('encoder.PFrame_latent_tokens', ('encoder', 'pframe_queries'), None),
      ('decoder.mask_token', ('decoder', 'mask_token'), lambda w: w.reshape(-1)),
      ('quantizer._codebook.embed', ('quantizer', 'codebook'), lambda w: w[0]),
  ]
  for part in ('encoder', 'decoder'):
    rules += norm(f'{part}.ln_pre', (part, 'ln_pre')) + norm(f'{part}.ln_post', (part, 'ln_post'))
  rules += linear('encoder.proj_out', ('encoder', 'proj_out'))
  rules += linear('decoder.decoder_embed', ('decoder', 'decoder_embed'))
  rules += linear('decoder.ffn.0', ('decoder', 'ffn_in')) + linear('decoder.ffn.2', ('decoder', 'ffn_out'))
  rules += linear('quantizer.project_in', ('quantizer', 'project_in'))
  rules += linear('quantizer.project_out', ('quantizer', 'project_out'))
  return rules


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def expected_shapes(model: tokenizer_model.VideoTokenizer) -> dict[tuple[str, ...], tuple[int, ...]]:
  shapes = strip_partitioning(jax.eval_shape(model.init_params, jax.random.key(0)))['params']
  return {tuple(str(k.key) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def check_identity_normalisation(state_dict: Mapping[str, np.ndarray]) -> None:
  for name, identity in (('mean', 0.0), ('std', 1.0)):
    if name in state_dict and not np.allclose(np.asarray(state_dict[name], np.float32), identity):
      raise ConversionError(f'the tokenizer checkpoint has a non-identity feature `{name}`; the released tokenizer '
                            f'normalises nothing and landiff-jax does not apply one. Remove or reset `{name}`.')


def convert_tokenizer(state_dict: Mapping[str, np.ndarray], config: Any) -> dict[str, Any]:
  """{'params': ..., 'quantizer_ema': ...} for `build_tokenizer(config)` from the official VideoVQ state dict."""
  check_identity_normalisation(state_dict)
  model = tokenizer_model.build_tokenizer(config)
  s = model.settings
  expected = expected_shapes(model)
  params: dict = {}
  used, missing, misshaped = set(), [], []

  def put(name, path, transform, value=None):
    if name not in state_dict:
      if path in expected:
        missing.append(name)
      return
    used.add(name)
    value = np.asarray(state_dict[name], np.float32) if value is None else value
    value = np.ascontiguousarray(transform(value) if transform else value)
    if path not in expected:
      return
    if value.shape != expected[path]:
      misshaped.append(f'{name}: {tuple(np.shape(state_dict[name]))}, expected {expected[path]} after conversion')
      return
    _set(params, path, value)

  for name, path, transform in top_rules():
    put(name, path, transform)
  for part in ('encoder', 'decoder'):
    for suffix, path, transform in block_rules(s.width, s.num_heads):
      names = [f'{part}.transformer.{i}.{suffix}' for i in range(s.num_layers)]
      full_path = (part, 'transformer') + path
      present = [n for n in names if n in state_dict]
      if not present:
        if full_path in expected:
          missing.extend(names)
        continue
      if len(present) < len(names):
        missing.extend(n for n in names if n not in state_dict)
        used.update(present)
        continue
      layers = [np.asarray(transform(np.asarray(state_dict[n], np.float32)) if transform else state_dict[n],
                           np.float32) for n in names]
      used.update(names)
      stacked = np.stack(layers)
      if full_path not in expected:
        continue
      if stacked.shape != expected[full_path]:
        misshaped.append(f'{part}.transformer.*.{suffix}: stacked {stacked.shape}, expected {expected[full_path]}')
        continue
      _set(params, full_path, stacked)
  ema = {short: np.asarray(state_dict[name], np.float32)[0] for name, short in EMA_KEYS.items() if name in state_dict}
  used.update(name for name in EMA_KEYS if name in state_dict)
  unexpected = [n for n in state_dict
                if n not in used and n not in ('mean', 'std') and not n.startswith(IGNORED_PREFIXES)]
  qkv_bias_given = any(re.search(r'attn\.w[qkvo]\.bias$', n) for n in state_dict)
  if qkv_bias_given != s.qkv_bias:
    misshaped.append(f'q/k/v/o biases {"present" if qkv_bias_given else "absent"} but tokenizer.qkv_bias={s.qkv_bias}')
  if missing or unexpected or misshaped:
    lines = [f'the tokenizer checkpoint does not match the config (width {s.width}, {s.num_layers} layers, '
             f'{s.num_heads} heads, codebook {s.codebook_size}×{s.codebook_dim}):']
    for title, items in (('missing', missing), ('unexpected', unexpected), ('wrong shape', misshaped)):
      if items:
        lines.append(f'  {len(items)} {title}: ' + ', '.join(items[:20]) + (' …' if len(items) > 20 else ''))
    raise ConversionError('\n'.join(lines))
  out = {'params': params}
  if ema:
    out['quantizer_ema'] = ema
  return out
