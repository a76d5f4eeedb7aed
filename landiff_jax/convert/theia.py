"""Theia's ViT backbone (HF `ViTModel`, transformers 4.x or 5.x names, bare, under `vit.` or under Theia's
`feature_extractor.model.backbone.model.` inside the tokenizer checkpoint) → `models/theia.py` params."""

from __future__ import annotations

from collections.abc import Mapping
import re
from typing import Any

import numpy as np

from landiff_jax.convert import ConversionError
from landiff_jax.convert.common import Mapper, expected_shapes, linear, renamed, strip_prefix
from landiff_jax.convert.io import LazyStateDict
from landiff_jax.models import theia as theia_model

PREFIXES = ('feature_extractor.model.backbone.model.', 'backbone.model.', 'model.', 'vit.')
# transformers 4.x name → 5.x name (per layer), the layout the converter reads
RENAMES_4X = [
    (r'^encoder\.layer\.(\d+)\.attention\.attention\.query\.', r'layers.\1.attention.q_proj.'),
    (r'^encoder\.layer\.(\d+)\.attention\.attention\.key\.', r'layers.\1.attention.k_proj.'),
    (r'^encoder\.layer\.(\d+)\.attention\.attention\.value\.', r'layers.\1.attention.v_proj.'),
    (r'^encoder\.layer\.(\d+)\.attention\.output\.dense\.', r'layers.\1.attention.o_proj.'),
    (r'^encoder\.layer\.(\d+)\.intermediate\.dense\.', r'layers.\1.mlp.fc1.'),
    (r'^encoder\.layer\.(\d+)\.output\.dense\.', r'layers.\1.mlp.fc2.'),
    (r'^encoder\.layer\.(\d+)\.', r'layers.\1.'),
]
IGNORED = ('pooler.', 'classifier.', 'translator.', 'head.')


def normalise_names(state_dict: Mapping[str, np.ndarray]) -> LazyStateDict:
  """Strips the wrapper prefix (the backbone's tensors only) and maps 4.x names onto 5.x names (reading nothing)."""
  for prefix in PREFIXES:
    inside = strip_prefix(state_dict, prefix)
    if any(k.startswith('embeddings.') for k in inside):
      state_dict = inside
      break
  names = {}
  for old_name in state_dict:
    name = old_name
    for pattern, replacement in RENAMES_4X:
      name = re.sub(pattern, replacement, name)
    names[name] = old_name
  return renamed(state_dict, names)


def convert_theia(state_dict: Mapping[str, np.ndarray], config: Any) -> dict[str, Any]:
  model = theia_model.build_theia(config)
  s = model.settings
  sd = normalise_names(state_dict)
  if 'embeddings.position_embeddings' not in sd:
    raise ConversionError('no ViT backbone found (expected embeddings.position_embeddings, optionally under '
                          f'{PREFIXES[0]}); is this the Theia/DeiT checkpoint?')
  m = Mapper(sd, expected_shapes(model.init_params, 'Theia ViT'))
  p = ('params',)
  d, heads = s.hidden_size, s.num_heads
  head_dim = d // heads
  g = s.pretrained_grid
  m.take('embeddings.cls_token', p + ('cls_token',), lambda w: w.reshape(-1))
  m.used.add('embeddings.position_embeddings')
  table = np.asarray(sd['embeddings.position_embeddings'], np.float32).reshape(-1, d)
  if table.shape[0] != 1 + g * g:
    m.misshaped.append(f'embeddings.position_embeddings: {table.shape[0]} positions, expected 1 + {g}² '
                       f'(theia.pretrained_grid={g})')
  else:
    m.put(p + ('cls_position',), table[0], 'embeddings.position_embeddings[0]')
    m.put(p + ('position_table',), table[1:].reshape(g, g, d), 'embeddings.position_embeddings[1:]')
  m.take('embeddings.patch_embeddings.projection.weight', p + ('patch_embed', 'kernel'),
         lambda w: np.transpose(w, (2, 3, 1, 0)))
  m.take('embeddings.patch_embeddings.projection.bias', p + ('patch_embed', 'bias'))
  layer = lambda suffix: [f'layers.{i}.{suffix}' for i in range(s.num_layers)]
  for name in ('q', 'k', 'v'):
    m.take_stacked(layer(f'attention.{name}_proj.weight'), p + ('blocks', name, 'kernel'),
                   lambda w: w.T.reshape(d, heads, head_dim))
    m.take_stacked(layer(f'attention.{name}_proj.bias'), p + ('blocks', name, 'bias'),
                   lambda b: b.reshape(heads, head_dim))
  m.take_stacked(layer('attention.o_proj.weight'), p + ('blocks', 'o', 'kernel'), lambda w: w.T.reshape(heads,
                                                                                                        head_dim, d))
  m.take_stacked(layer('attention.o_proj.bias'), p + ('blocks', 'o', 'bias'))
  for ours, theirs in (('norm1', 'layernorm_before'), ('norm2', 'layernorm_after')):
    m.take_stacked(layer(f'{theirs}.weight'), p + ('blocks', ours, 'scale'))
    m.take_stacked(layer(f'{theirs}.bias'), p + ('blocks', ours, 'bias'))
  for ours, theirs in (('fc1', 'fc1'), ('fc2', 'fc2')):
    m.take_stacked(layer(f'mlp.{theirs}.weight'), p + ('blocks', 'mlp', ours, 'kernel'), linear)
    m.take_stacked(layer(f'mlp.{theirs}.bias'), p + ('blocks', 'mlp', ours, 'bias'))
  m.take('layernorm.weight', p + ('final_norm', 'scale'))
  m.take('layernorm.bias', p + ('final_norm', 'bias'))
  # HF `from_pretrained` (and the tokenizer file's backbone prefix) leave other tensors alone: listed, not refused
  return m.result(f'the Theia ViT checkpoint (hidden {d}, {s.num_layers} layers)',
                  ignored=lambda n: n.startswith(IGNORED), strict=False, config=config, section='theia')
