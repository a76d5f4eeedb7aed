"""Memory-efficient attention in plain JAX: online softmax over key blocks, O(L) memory, any device.

Layout as in `nn.attention`: q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (Hkv divides H). A `lax.scan` walks the query
blocks and, inside it, another walks the key blocks, keeping the running maximum, the running sum and the
unnormalised output of each row (the flash-attention recurrence). The mask is evaluated per block from the
`MaskSpec` rule on positions and on per-token metadata computed arithmetically (never an L×L array), so at most
one [B, H, block_q, block_k] score tile is live. The backward pass is a custom VJP that recomputes each tile's
probabilities from the saved log-sum-exp, so training holds O(L) too (q, k, v, output and log-sum-exp).

Exact to float32 round-off against the `xla` reference: scores, softmax statistics and accumulators are float32,
rows with no allowed key give zeros. Lengths need not be multiples of the blocks (inputs are padded inside).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from landiff_jax.nn.masks import MaskSpec

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


@dataclasses.dataclass(frozen=True)
class Config:
  """The static part of one call."""
  mask: MaskSpec
  q_len: int
  kv_len: int
  scale: float
  block_q: int
  block_k: int

  @property
  def num_q_blocks(self) -> int:
    return -(-self.q_len // self.block_q)

  @property
  def num_k_blocks(self) -> int:
    return -(-self.kv_len // self.block_k)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec, *,
                        kv_valid: jax.Array | None = None, q_offset=0, scale: float | None = None,
                        block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K) -> jax.Array:
  """Softmax(q·kᵀ·scale, masked)·v → [B, Lq, H, Dv] in q.dtype; rows with no allowed key give zeros.

  kv_valid: optional bool [B, Lk] (False keys are ignored). q_offset: absolute position of query 0, a Python int
  or a traced integer (KV-cache decoding).
  """
  if block_q < 1 or block_k < 1:
    raise ValueError(f'blockwise attention: block sizes must be positive, got block_q={block_q}, block_k={block_k}.')
  q_len, kv_len = q.shape[1], k.shape[1]
  config = Config(mask=mask, q_len=q_len, kv_len=kv_len,
                  scale=float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale),
                  block_q=min(block_q, q_len), block_k=min(block_k, kv_len))
  offset = jnp.asarray(q_offset, jnp.int32)
  return _attention(config, q, k, v, kv_valid, offset)


# --- blocks and the mask -----------------------------------------------------------------------------------------


def _to_blocks(x: jax.Array, block: int, num_blocks: int, value=0) -> jax.Array:
  """[B, L, ...] → [num_blocks, B, block, ...], padded at the end."""
  pad = num_blocks * block - x.shape[1]
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
  x = x.reshape(x.shape[0], num_blocks, block, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _from_blocks(x: jax.Array, length: int) -> jax.Array:
  """[num_blocks, B, block, ...] → [B, length, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _token_metadata(mask: MaskSpec, position: jax.Array):
  if not mask.is_frame_causal:
    return 0, 0
  layout = mask.layout
  return layout.frame_of(position, jnp), (position >= layout.num_visual_tokens).astype(jnp.int32)


def _block_allowed(config: Config, q_start, k_start, valid_block) -> jax.Array:
  """bool [B|1, 1, 1, block_q, block_k] for the query block at absolute position q_start and the key block at
  k_start; padded keys (beyond kv_len) are never allowed."""
  q_index = q_start + jnp.arange(config.block_q, dtype=jnp.int32)[:, None]
  k_index = k_start + jnp.arange(config.block_k, dtype=jnp.int32)[None, :]
  q_frame, q_latent = _token_metadata(config.mask, q_index)
  k_frame, k_latent = _token_metadata(config.mask, k_index)
  allowed = config.mask.rule(q_index, k_index, q_frame, k_frame, q_latent, k_latent) & (k_index < config.kv_len)
  allowed = jnp.broadcast_to(allowed, (config.block_q, config.block_k))[None, None, None]
  if valid_block is not None:  # [B, block_k]
    allowed = allowed & valid_block[:, None, None, None, :]
  return allowed


def _masked_scores(config: Config, q_block, k_block, allowed):
  """float32 scores [B, Hkv, G, block_q, block_k], −inf where not allowed."""
  scores = jnp.einsum('bqhgd,bkhd->bhgqk', q_block, k_block, preferred_element_type=jnp.float32)
  return jnp.where(allowed, scores.astype(jnp.float32) * config.scale, -jnp.inf)


def _grouped(q: jax.Array, num_kv_heads: int) -> jax.Array:
  b, length, h, d = q.shape
  return q.reshape(b, length, num_kv_heads, h // num_kv_heads, d)


def _key_inputs(config: Config, k, v, kv_valid):
  """Key-side scan inputs: blocks of k, v, kv_valid (or None) and each block's first position."""
  num = config.num_k_blocks
  valid = None if kv_valid is None else _to_blocks(kv_valid, config.block_k, num, value=False)
  starts = jnp.arange(num, dtype=jnp.int32) * config.block_k
  return _to_blocks(k, config.block_k, num), _to_blocks(v, config.block_k, num), valid, starts


# --- forward -----------------------------------------------------------------------------------------------------


def _forward(config: Config, q, k, v, kv_valid, offset):
  """(out [B, Lq, H, Dv] in q.dtype, lse [B, Hkv, G, Lq] float32, −inf on rows with no allowed key)."""
  b, _, h, _ = q.shape
  hkv, dv = k.shape[2], v.shape[-1]
  groups = h // hkv
  q_blocks = _to_blocks(_grouped(q, hkv), config.block_q, config.num_q_blocks)
  q_starts = offset + jnp.arange(config.num_q_blocks, dtype=jnp.int32) * config.block_q
  key_inputs = _key_inputs(config, k, v, kv_valid)

  def query_block(_, inputs):
    q_block, q_start = inputs

    def key_block(carry, inputs):
      row_max, row_sum, acc = carry
      k_block, v_block, valid_block, k_start = inputs
      scores = _masked_scores(config, q_block, k_block, _block_allowed(config, q_start, k_start, valid_block))
      new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))
      safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
      correction = jnp.exp(row_max - safe_max)  # 0 while the row had no key yet (row_max = −inf)
      probs = jnp.exp(scores - safe_max[..., None])
      row_sum = row_sum * correction + jnp.sum(probs, axis=-1)
      update = jnp.einsum('bhgqk,bkhd->bhgqd', probs.astype(v_block.dtype), v_block,
                          preferred_element_type=jnp.float32)
      return (new_max, row_sum, acc * correction[..., None] + update), None

    stats_shape = (b, hkv, groups, config.block_q)
    init = (jnp.full(stats_shape, -jnp.inf, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, dv), jnp.float32))
    (row_max, row_sum, acc), _ = lax.scan(key_block, init, key_inputs)
    has_key = row_sum > 0
    out = acc / jnp.where(has_key, row_sum, 1.0)[..., None]
    lse = jnp.where(has_key, row_max + jnp.log(jnp.where(has_key, row_sum, 1.0)), -jnp.inf)
    # [B, Hkv, G, bq, Dv] → [B, bq, H, Dv]
    out = jnp.moveaxis(out, 3, 1).reshape(b, config.block_q, h, dv).astype(q.dtype)
    return None, (out, lse)

  _, (out, lse) = lax.scan(query_block, None, (q_blocks, q_starts))
  out = _from_blocks(out, config.q_len)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, hkv, groups, -1)[..., :config.q_len]
  return out, lse


# --- backward ----------------------------------------------------------------------------------------------------


def _backward(config: Config, q, k, v, kv_valid, offset, out, lse, d_out):
  """(dq, dk, dv): each tile's probabilities recomputed from the log-sum-exp (flash-attention backward)."""
  b, _, h, d = q.shape
  hkv, dv_dim = k.shape[2], v.shape[-1]
  groups = h // hkv
  num_q, num_k = config.num_q_blocks, config.num_k_blocks
  # delta_i = Σ_d dO_i·O_i, the row term of the softmax Jacobian, in float32.
  delta = jnp.einsum('bqhd,bqhd->bqh', d_out.astype(jnp.float32), out.astype(jnp.float32))
  delta = jnp.moveaxis(delta.reshape(b, -1, hkv, groups), 1, 3)  # [B, Hkv, G, Lq]
  safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows with no key: every probability is exp(−inf) = 0

  def stats_blocks(x):  # [B, Hkv, G, Lq] → [num_q, B, Hkv, G, bq]
    return jnp.moveaxis(_to_blocks(jnp.moveaxis(x, 3, 1), config.block_q, num_q), 2, -1)

  q_inputs = (_to_blocks(_grouped(q, hkv), config.block_q, num_q),
              _to_blocks(_grouped(d_out, hkv), config.block_q, num_q), stats_blocks(safe_lse), stats_blocks(delta),
              offset + jnp.arange(num_q, dtype=jnp.int32) * config.block_q)
  key_inputs = _key_inputs(config, k, v, kv_valid)

  def query_block(carry, inputs):
    dk_acc, dv_acc = carry  # [num_k, B, bk, Hkv, D] float32
    q_block, do_block, lse_block, delta_block, q_start = inputs

    def key_block(dq_block, inputs):
      k_block, v_block, valid_block, k_start = inputs
      scores = _masked_scores(config, q_block, k_block, _block_allowed(config, q_start, k_start, valid_block))
      probs = jnp.exp(scores - lse_block[..., None])  # [B, Hkv, G, bq, bk]
      dv_block = jnp.einsum('bhgqk,bqhgd->bkhd', probs.astype(do_block.dtype), do_block,
                            preferred_element_type=jnp.float32)
      dprobs = jnp.einsum('bqhgd,bkhd->bhgqk', do_block, v_block, preferred_element_type=jnp.float32)
      dscores = probs * (dprobs - delta_block[..., None]) * config.scale
      dscores = dscores.astype(q_block.dtype)
      dq_block = dq_block + jnp.einsum('bhgqk,bkhd->bqhgd', dscores, k_block, preferred_element_type=jnp.float32)
      dk_block = jnp.einsum('bhgqk,bqhgd->bkhd', dscores, q_block, preferred_element_type=jnp.float32)
      return dq_block, (dk_block, dv_block)

    dq_init = jnp.zeros((b, config.block_q, hkv, groups, d), jnp.float32)
    dq_block, (dk_blocks, dv_blocks) = lax.scan(key_block, dq_init, key_inputs)
    return (dk_acc + dk_blocks, dv_acc + dv_blocks), dq_block

  init = (jnp.zeros((num_k, b, config.block_k, hkv, d), jnp.float32),
          jnp.zeros((num_k, b, config.block_k, hkv, dv_dim), jnp.float32))
  (dk, dv), dq = lax.scan(query_block, init, q_inputs)
  dq = _from_blocks(dq, config.q_len).reshape(q.shape)
  return (dq.astype(q.dtype), _from_blocks(dk, config.kv_len).astype(k.dtype),
          _from_blocks(dv, config.kv_len).astype(v.dtype))


# --- the differentiable op ---------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config: Config, q, k, v, kv_valid, offset):
  return _forward(config, q, k, v, kv_valid, offset)[0]


def _attention_fwd(config: Config, q, k, v, kv_valid, offset):
  out, lse = _forward(config, q, k, v, kv_valid, offset)
  return out, (q, k, v, kv_valid, offset, out, lse)


def _attention_bwd(config: Config, residuals, d_out):
  q, k, v, kv_valid, offset, out, lse = residuals
  dq, dk, dv = _backward(config, q, k, v, kv_valid, offset, out, lse, d_out)
  zero_valid = None if kv_valid is None else np.zeros(kv_valid.shape, jax.dtypes.float0)
  return dq, dk, dv, zero_valid, np.zeros(offset.shape, jax.dtypes.float0)


_attention.defvjp(_attention_fwd, _attention_bwd)
