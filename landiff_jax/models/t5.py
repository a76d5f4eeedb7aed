"""T5 v1.1 / Flan-T5 encoder (cogvideox-theia-t5.md §5): one module serves the DiT's T5-v1.1-XXL and the LM's
Flan-T5-XXL.

Blocks: RMSNorm (eps 1e-6, fp32 variance) → self-attention without 1/√d scaling, plus a relative position bias
(32 bidirectional buckets, max distance 128) computed once from layer 0's table and shared by every layer →
residual; RMSNorm → gated tanh-GELU FFN `wo(gelu_new(wi_0 x) ⊙ wi_1 x)` → residual; final RMSNorm. The attention
mask is optional: the DiT's encoder is called on 226 padded tokens without one (padding is attended, as in the
release); the LM's with one (padded keys ignored).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax.nn import Dense, Embed, GatedMlp, RMSNorm, constrain, scan_layers

Array = jax.Array
SEQUENCE_AXES = ('batch', 'length', 'act_embed')


@dataclasses.dataclass(frozen=True)
class T5Settings:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  d_kv: int
  d_ff: int
  num_buckets: int
  max_distance: int
  eps: float

  @classmethod
  def from_config(cls, c: Any) -> T5Settings:
    return cls(int(c.vocab_size), int(c.d_model), int(c.num_layers), int(c.num_heads), int(c.d_kv), int(c.d_ff),
               int(c.relative_attention_num_buckets), int(c.relative_attention_max_distance), float(c.layer_norm_eps))


@functools.lru_cache(maxsize=16)
def relative_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """int32 [L, L] bucket of (key − query) offsets, bidirectional, computed as T5 does (float32 logarithms)."""
  relative = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2
  bucket = (relative > 0).astype(np.int64) * half
  distance = np.abs(relative)
  max_exact = half // 2
  scaled = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)) / np.float32(
      math.log(max_distance / max_exact)) * np.float32(half - max_exact)  # used only where distance ≥ max_exact
  large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
  bucket += np.where(distance < max_exact, distance, large)
  return bucket.astype(np.int32)


class T5Block(nn.Module):
  settings: T5Settings
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, bias: Array) -> tuple[Array, None]:
    s = self.settings
    h = RMSNorm(s.eps, name='attn_norm')(x)
    proj = functools.partial(Dense, (s.num_heads, s.d_kv), use_bias=False, kernel_axes=('embed', 'heads', 'kv'),
                             dtype=self.dtype)
    q, k, v = proj(name='q')(h), proj(name='k')(h), proj(name='v')(h)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    x = x + Dense(s.d_model, axis=(-2, -1), use_bias=False, kernel_axes=('heads', 'kv', 'embed'), dtype=self.dtype,
                  name='o')(out)
    x = x + GatedMlp(s.d_ff, activation='gelu_tanh', dtype=self.dtype, name='mlp')(RMSNorm(s.eps, name='mlp_norm')(x))
    return constrain(x, SEQUENCE_AXES), None


class T5Encoder(nn.Module):
  """`apply(params, ids[B, L], mask[B, L] | None) -> hidden[B, L, d_model]` (float32)."""
  settings: T5Settings
  remat_policy: str = 'none'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: Array, mask: Array | None = None) -> Array:
    s = self.settings
    if ids.ndim != 2:
      raise ValueError(f'token ids must be [batch, length]; got shape {tuple(ids.shape)}.')
    if mask is not None and mask.shape != ids.shape:
      raise ValueError(f'attention mask {tuple(mask.shape)} must match the ids {tuple(ids.shape)}.')
    length = ids.shape[1]
    table = self.param('relative_attention_bias', nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                               (None, 'heads')),
                       (s.num_buckets, s.num_heads))
    buckets = relative_buckets(length, s.num_buckets, s.max_distance)
    bias = jnp.transpose(jnp.take(table, jnp.asarray(buckets), axis=0), (2, 0, 1))[None].astype(jnp.float32)
    if mask is not None:
      bias = bias + jnp.where(mask[:, None, None, :].astype(bool), 0.0, jnp.finfo(jnp.float32).min)
    x = Embed(s.vocab_size, s.d_model, name='token_embedding')(ids).astype(self.dtype)
    x, _ = scan_layers(T5Block, s.num_layers, s, self.dtype, remat_policy=self.remat_policy, name='blocks')(x, bias)
    return RMSNorm(s.eps, name='final_norm')(x).astype(jnp.float32)

  def init_params(self, rng: Array) -> Any:
    return self.init(rng, jnp.zeros((1, 4), jnp.int32))


def build_t5(config: Any, *, dtype: Any = jnp.float32, remat_policy: str = 'none') -> T5Encoder:
  return T5Encoder(T5Settings.from_config(config), remat_policy, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0,))
def _encode(model: T5Encoder, params: Any, ids: Array, mask: Array | None) -> Array:
  return model.apply(params, ids, mask)


def encode(model: T5Encoder, params: Any, ids: Any, mask: Any = None) -> Array:
  """Hidden states of token ids (jit-compiled per shape); ids ≥ vocab_size are rejected."""
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f'token ids must be integers, got {ids.dtype}.')
  if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= model.settings.vocab_size):
    raise ValueError(f'token ids must be in [0, {model.settings.vocab_size}); got [{int(ids.min())}, '
                     f'{int(ids.max())}]. Is the tokenizer the one of this checkpoint?')
  return _encode(model, params, ids.astype(jnp.int32), None if mask is None else jnp.asarray(mask, jnp.int32))


def load_tokenizer(directory: str):
  """The T5 tokenizer saved in `directory` (spiece.model or tokenizer.json), never downloaded."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'T5 tokenizer directory {directory!r} does not exist; point to the folder holding '
                            f'spiece.model / tokenizer.json of the T5 checkpoint.')
  # only the tokenizer is used: without this, importing transformers without torch warns that models are unavailable
  os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int, pad_to_max: bool) -> tuple[np.ndarray,
                                                                                                np.ndarray]:
  """(ids, mask) int32 [B, L]: the DiT pads every prompt to `max_length` (226); the LM pads to the longest."""
  if isinstance(prompts, str):
    prompts = [prompts]
  out = tokenizer(list(prompts), max_length=max_length, truncation=True,
                  padding='max_length' if pad_to_max else 'longest', return_tensors='np')
  return out['input_ids'].astype(np.int32), out['attention_mask'].astype(np.int32)
