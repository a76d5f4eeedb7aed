"""The official semantic LM (`llm/model.safetensors`, reference landiff-official.md §4.7) → `models/lm.py` params.

The fused `wqkv` rows [q; k; v] (heads contiguous) become one (hidden, 3, heads, head_dim) kernel; per-block
tensors are stacked along a leading layer axis; Linear weights are transposed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from landiff_jax.convert.common import Mapper, expected_shapes, linear
from landiff_jax.models import lm as lm_model

# Frozen parts the release does not save; ignored if a file holds them.
IGNORED_PREFIXES = ('cond_model.text_encoder.', 'tokenizer.')


def convert_lm(state_dict: Mapping[str, np.ndarray], config: Any) -> dict[str, Any]:
  model = lm_model.build_lm(config)
  s = model.settings
  m = Mapper(state_dict, expected_shapes(model.init_params, 'semantic LM'))
  d, h, hd = s.hidden_size, s.num_heads, s.head_dim
  p = ('params',)
  blocks = lambda suffix: [f'transformer.blocks.{i}.{suffix}' for i in range(s.num_layers)]
  m.take_stacked(blocks('norm0.weight'), p + ('blocks', 'norm0', 'scale'))
  m.take_stacked(blocks('norm1.weight'), p + ('blocks', 'norm1', 'scale'))
  m.take_stacked(blocks('wqkv.weight'), p + ('blocks', 'wqkv', 'kernel'), lambda w: w.T.reshape(d, 3, h, hd))
  m.take_stacked(blocks('wo.weight'), p + ('blocks', 'wo', 'kernel'), lambda w: w.T.reshape(h, hd, d))
  for name in ('w1', 'w2', 'w3'):
    m.take_stacked(blocks(f'mlp.{name}.weight'), p + ('blocks', 'mlp', name, 'kernel'), linear)
  m.take('transformer.layer_norm.weight', p + ('final_norm', 'scale'))
  m.take('transformer.layer_norm.bias', p + ('final_norm', 'bias'))
  m.take('transformer.head.weight', p + ('head', 'kernel'), linear)
  m.take('visual_embedding_model.tok_emb_code.weight', p + ('token_embedding', 'embedding'))
  for i in (0, 1):
    m.take(f'cond_model.embeddings.fc{i}.weight', p + (f'text_fc{i}', 'kernel'), linear)
    m.take(f'cond_model.embeddings.fc{i}.bias', p + (f'text_fc{i}', 'bias'))
  m.take('cond_model.null_text_embedding', p + ('null_text',))
  for key in s.micro_conditions:
    for index, layer in ((0, 'fc1'), (2, 'fc2')):
      m.take(f'micro_condition.mlps.{key}.{index}.weight', p + (f'micro_{key}', layer, 'kernel'), linear)
      m.take(f'micro_condition.mlps.{key}.{index}.bias', p + (f'micro_{key}', layer, 'bias'))
  # the release loads this file with strict=True (frozen sub-modules aside): unknown tensors are refused
  return m.result(f'the semantic LM checkpoint (hidden {d}, {s.num_layers} layers)',
                  ignored=lambda name: name.startswith(IGNORED_PREFIXES), strict=True, config=config, section='lm')
