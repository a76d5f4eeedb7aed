"""The official tokenizer (`tokenizer/model.safetensors`, VideoVQ names, reference landiff-official.md §3.8) →
`models/tokenizer.py` parameters, plus the quantizer's EMA state (kept for fine-tuning) in `quantizer_ema`.

Linear weights (out, in) become (in, out) kernels, q/k/v/o split into heads; per-layer tensors are stacked along a
leading layer axis; the 1×1 patch-embedding convolution becomes a matrix. `mean`/`std` must be the identity
normalisation the release ships; Theia weights under `feature_extractor.` are left to `convert theia`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from landiff_jax.convert import ConversionError
from landiff_jax.convert.common import Mapper, expected_shapes, keep, linear
from landiff_jax.models import tokenizer as tokenizer_model

IGNORED_PREFIXES = ('feature_extractor.',)
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
  m = Mapper(state_dict, expected_shapes(model.init_params))
  for name, path, transform in top_rules():
    m.take(name, ('params',) + path, transform)
  for part in ('encoder', 'decoder'):
    for suffix, path, transform in block_rules(s.width, s.num_heads):
      if suffix.startswith('attn.') and suffix.endswith('.bias') and not s.qkv_bias:
        continue
      names = [f'{part}.transformer.{i}.{suffix}' for i in range(s.num_layers)]
      m.take_stacked(names, ('params', part, 'transformer') + path, transform)
  ema = {short: keep(np.asarray(state_dict[name], np.float32)[0])
         for name, short in EMA_KEYS.items() if name in state_dict}
  m.used.update(name for name in EMA_KEYS if name in state_dict)
  ignored = lambda name: name in ('mean', 'std') or name.startswith(IGNORED_PREFIXES)
  out = m.result(f'tokenizer (width {s.width}, {s.num_layers} layers, {s.num_heads} heads, codebook '
                 f'{s.codebook_size}×{s.codebook_dim})', ignored)
  if ema:
    out['quantizer_ema'] = ema
  return out
