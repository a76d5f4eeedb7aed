"""LanDiff's semantic language model (reference landiff-official.md §4), LLaMA-like.

Blocks: RMSNorm → fused bias-free qkv → interleaved 1D RoPE (θ 1e4) → causal attention → wo; RMSNorm → gated
tanh-GELU MLP. Final LayerNorm (with bias) and an untied head over the 2,055-way vocabulary, both in float32.
Inputs are feature vectors, not only ids: the prefix holds [BOS, micro-condition tokens (frames, motion score),
projected T5 text (or the learned null-text vector for CFG), SOI], then embedded visual and structural tokens.

Every call takes explicit per-slot `positions` (RoPE) and `valid` flags, so rows of a batch may be padded (text of
different lengths): padded slots are never attended to and do not shift the positions of the real tokens.
Decoding uses a preallocated KV cache [layers, B, max_len, heads, head_dim] written at `cache_index` (`extend`,
a scan over the stacked layers: prefill), or, one token at a time, `decode`: the layers unrolled over parameters and
caches already split per layer, so a step reads each weight once where it lies (no per-layer slice of the stacked
weights is materialised) and writes its one cache slot in place (no stacked cache rebuilt every step).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from landiff_jax.nn import (Dense, Embed, GatedMlp, LayerNorm, MaskSpec, RMSNorm, TimestepMLP, apply_rope, attention,
                            constrain, rope_1d_frequencies, scan_layers, timestep_embedding)

Array = jax.Array
SEQUENCE_AXES = ('batch', 'length', 'act_embed')


@dataclasses.dataclass(frozen=True)
class LMSettings:
  num_layers: int
  hidden_size: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  norm_eps: float
  final_norm_eps: float
  rope_theta: float
  vocab_size: int
  text_mlp_dims: tuple[int, ...]
  micro_conditions: tuple[str, ...]
  micro_freq_dim: int
  micro_hidden: int

  @classmethod
  def from_config(cls, c: Any) -> LMSettings:
    return cls(int(c.num_layers), int(c.hidden_size), int(c.num_heads), int(c.head_dim), int(c.mlp_dim),
               float(c.norm_eps), float(c.final_norm_eps), float(c.rope_theta), int(c.vocab_size),
               tuple(int(d) for d in c.text_mlp_dims), tuple(str(k) for k in c.micro_conditions),
               int(c.micro_freq_dim), int(c.micro_hidden))


class Block(nn.Module):
  settings: LMSettings
  backend: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, scanned: tuple[Array, Array] | None, angles: Array, valid: Array,
               cache_index: Any) -> tuple[Array, tuple[Array, Array] | None]:
    s = self.settings
    h = RMSNorm(s.norm_eps, name='norm0')(x)
    qkv = Dense((3, s.num_heads, s.head_dim), use_bias=False, kernel_axes=('embed', None, 'heads', 'kv'),
                dtype=self.dtype, name='wqkv')(h)
    q, k, v = (apply_rope(qkv[:, :, i], angles) if i < 2 else qkv[:, :, i] for i in range(3))
    if scanned is None:  # whole sequence
      out = attention(q, k, v, MaskSpec.causal(), backend=self.backend, kv_valid=valid)
      new_cache = None
    else:  # write this chunk into the cache, attend over everything written so far
      cache_k, cache_v = scanned
      cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), cache_index, axis=1)
      cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), cache_index, axis=1)
      out = attention(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), MaskSpec.causal(), backend=self.backend,
                      kv_valid=valid, q_offset=cache_index)
      new_cache = (cache_k, cache_v)
    x = x + Dense(s.hidden_size, axis=(-2, -1), use_bias=False, kernel_axes=('heads', 'kv', 'embed'),
                  dtype=self.dtype, name='wo')(out)
    x = x + GatedMlp(s.mlp_dim, activation='gelu_tanh', dtype=self.dtype, name='mlp')(
        RMSNorm(s.norm_eps, name='norm1')(x))
    return constrain(x, SEQUENCE_AXES), new_cache


class SemanticLM(nn.Module):
  """`apply(params, embeds, positions, valid)` → logits; embedding helpers as methods."""
  settings: LMSettings
  backend: str = 'auto'
  remat_policy: str = 'none'
  dtype: Any = jnp.float32

  def setup(self):
    s = self.settings
    self.token_embedding = Embed(s.vocab_size, s.hidden_size, name='token_embedding')
    dims = s.text_mlp_dims
    self.text_fc0 = Dense(dims[1], kernel_axes=(None, 'embed'), dtype=self.dtype, name='text_fc0')
    self.text_fc1 = Dense(dims[2], kernel_axes=('embed', None), dtype=self.dtype, name='text_fc1')
    self.null_text = self.param('null_text', nn.with_logical_partitioning(nn.initializers.normal(0.02), ('embed',)),
                                (s.hidden_size,))
    self.micro = {key: TimestepMLP(s.micro_hidden, s.hidden_size, kernel_axes_out=(None, 'embed'), dtype=self.dtype,
                                   name=f'micro_{key}') for key in s.micro_conditions}
    self.blocks = scan_layers(Block, s.num_layers, s, self.backend, self.dtype,
                              in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), remat_policy=self.remat_policy,
                              name='blocks')
    self.final_norm = LayerNorm(s.final_norm_eps, dtype=jnp.float32, name='final_norm')
    self.head = Dense(s.vocab_size, use_bias=False, kernel_axes=('embed', 'vocab'), dtype=jnp.float32,
                      name='head')

  # --- inputs -------------------------------------------------------------------------------------------------

  def embed_tokens(self, ids: Array) -> Array:
    return self.token_embedding(ids).astype(self.dtype)

  def embed_text(self, text: Array) -> Array:
    """T5 features [..., L, 4096] → [..., L, hidden] (fc1(gelu_tanh(fc0(x))))."""
    return self.text_fc1(jax.nn.gelu(self.text_fc0(text.astype(self.dtype)), approximate=True))

  def null_text_like(self, text_embeds: Array) -> Array:
    return jnp.broadcast_to(self.null_text.astype(self.dtype), text_embeds.shape)

  def embed_micro(self, values: dict[str, Array]) -> Array:
    """{'frames': [B], 'motion_score': [B]} → micro tokens [B, len(keys), hidden] in the sorted key order."""
    s = self.settings
    tokens = [self.micro[key](timestep_embedding(values[key].astype(jnp.float32), s.micro_freq_dim,
                                                 flip_sin_to_cos=True).astype(self.dtype))
              for key in s.micro_conditions]
    return jnp.stack(tokens, axis=1)

  # --- the transformer ----------------------------------------------------------------------------------------

  def logits(self, h: Array) -> Array:
    return self.head(self.final_norm(h.astype(jnp.float32)))

  def __call__(self, embeds: Array, positions: Array, valid: Array) -> Array:
    """Whole sequences: embeds [B, L, D], positions [B, L] (RoPE), valid [B, L] → logits [B, L, V] float32."""
    angles = rope_1d_frequencies(positions, self.settings.head_dim, self.settings.rope_theta)
    h, _ = self.blocks(embeds.astype(self.dtype), None, angles, valid, 0)
    return self.logits(h)

  def extend(self, embeds: Array, positions: Array, valid: Array, cache: tuple[Array, Array],
             cache_index: Any) -> tuple[Array, tuple[Array, Array]]:
    """Runs embeds [B, m, D] at cache slots [cache_index, cache_index + m); `valid` [B, max_len] covers every slot.
    Returns (logits of the last slot [B, V], updated cache)."""
    angles = rope_1d_frequencies(positions, self.settings.head_dim, self.settings.rope_theta)
    h, cache = self.blocks(embeds.astype(self.dtype), cache, angles, valid, cache_index)
    return self.logits(h[:, -1]), cache

  def init_params(self, rng: Array) -> Any:
    s = self.settings
    embeds = jnp.zeros((1, 4, s.hidden_size))
    positions = jnp.arange(4)[None]

    def everything(module):
      module.embed_tokens(jnp.zeros((1, 1), jnp.int32))
      module.embed_text(jnp.zeros((1, 1, s.text_mlp_dims[0])))
      module.null_text_like(jnp.zeros((1, 1, s.hidden_size)))
      module.embed_micro({k: jnp.zeros((1,)) for k in s.micro_conditions})
      return module(embeds, positions, jnp.ones((1, 4), bool))

    return self.init(rng, method=everything)


def layer_params(params: Any) -> tuple[Any, ...]:
  """The stacked block parameters split into one tree per layer (what `decode` takes); split once, before a loop."""
  blocks = params['params']['blocks']
  count = jax.tree.leaves(blocks)[0].shape[0]
  return tuple(jax.tree.map(lambda p, i=i: p[i], blocks) for i in range(count))


def split_cache(cache: tuple[Array, Array]) -> tuple[tuple[Array, Array], ...]:
  """A stacked cache [layers, B, max_len, heads, head_dim] ×2 → one (k, v) pair per layer."""
  return tuple((cache[0][i], cache[1][i]) for i in range(cache[0].shape[0]))


def decode(model: SemanticLM, params: Any, layers: tuple[Any, ...], embeds: Array, positions: Array, valid: Array,
           caches: tuple[tuple[Array, Array], ...], cache_index: Any) -> tuple[Array, tuple[tuple[Array, Array], ...]]:
  """`SemanticLM.extend` over per-layer parameters (`layer_params`) and caches (`split_cache`), the layers unrolled:
  the same blocks and the same arithmetic, so the logits equal `extend`'s exactly. Returns (logits of the last slot
  [B, V], updated per-layer caches)."""
  s = model.settings
  angles = rope_1d_frequencies(positions, s.head_dim, s.rope_theta)
  block = Block(s, model.backend, model.dtype)
  x = embeds.astype(model.dtype)
  updated = []
  for weights, cache in zip(layers, caches):
    x, cache = block.apply({'params': weights}, x, cache, angles, valid, cache_index)
    updated.append(cache)
  return model.apply(params, x[:, -1], method=SemanticLM.logits), tuple(updated)


def empty_cache(settings: LMSettings, batch: int, max_len: int, dtype: Any) -> tuple[Array, Array]:
  shape = (settings.num_layers, batch, max_len, settings.num_heads, settings.head_dim)
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def build_lm(config: Any, *, dtype: Any = jnp.float32, attention_backend: str = 'auto',
             remat_policy: str = 'none') -> SemanticLM:
  return SemanticLM(LMSettings.from_config(config), attention_backend, remat_policy, jnp.dtype(dtype))
