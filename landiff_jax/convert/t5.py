"""HF `T5EncoderModel` / `T5ForConditionalGeneration` weights (safetensors, sharded or not) → `models/t5.py` params.

Names are the same in transformers 4.x and 5.x (cogvideox-theia-t5.md §5); decoder and LM-head tensors of a full
T5 are ignored, and `encoder.embed_tokens.weight` (a tied copy) stands in for `shared.weight` when that is absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from landiff_jax.convert.common import Mapper, expected_shapes, linear, renamed
from landiff_jax.models import t5 as t5_model

IGNORED_PREFIXES = ('decoder.', 'lm_head.')


def convert_t5(state_dict: Mapping[str, np.ndarray], config: Any, *, section: str = 't5') -> dict[str, Any]:
  """Loaded as `from_pretrained` does: tensors the encoder has no place for are ignored (listed in a notice)."""
  model = t5_model.build_t5(config)
  s = model.settings
  state_dict = renamed(state_dict, {k[len('model.'):] if k.startswith('model.') else k: k for k in state_dict})
  m = Mapper(state_dict, expected_shapes(model.init_params, 'T5 encoder'))
  p = ('params',)
  embedding = 'shared.weight' if 'shared.weight' in state_dict else 'encoder.embed_tokens.weight'
  m.take(embedding, p + ('token_embedding', 'embedding'))
  m.used.update(n for n in ('shared.weight', 'encoder.embed_tokens.weight') if n in state_dict)
  m.take('encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight', p + ('relative_attention_bias',))
  block = lambda suffix: [f'encoder.block.{i}.{suffix}' for i in range(s.num_layers)]
  heads = lambda w: w.T.reshape(s.d_model, s.num_heads, s.d_kv)
  for name in ('q', 'k', 'v'):
    m.take_stacked(block(f'layer.0.SelfAttention.{name}.weight'), p + ('blocks', name, 'kernel'), heads)
  m.take_stacked(block('layer.0.SelfAttention.o.weight'), p + ('blocks', 'o', 'kernel'),
                 lambda w: w.T.reshape(s.num_heads, s.d_kv, s.d_model))
  m.take_stacked(block('layer.0.layer_norm.weight'), p + ('blocks', 'attn_norm', 'scale'))
  m.take_stacked(block('layer.1.layer_norm.weight'), p + ('blocks', 'mlp_norm', 'scale'))
  for ours, theirs in (('w1', 'wi_0'), ('w3', 'wi_1'), ('w2', 'wo')):
    m.take_stacked(block(f'layer.1.DenseReluDense.{theirs}.weight'), p + ('blocks', 'mlp', ours, 'kernel'), linear)
  m.take('encoder.final_layer_norm.weight', p + ('final_norm', 'scale'))
  return m.result(f'the T5 encoder checkpoint (d_model {s.d_model}, {s.num_layers} layers, {s.num_heads} heads)',
                  ignored=lambda name: name.startswith(IGNORED_PREFIXES), strict=False, config=config,
                  section=section)
