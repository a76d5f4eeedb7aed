"""TPU attention for `MaskSpec` masks through JAX's splash-attention kernel with a computable mask.

Splash evaluates a mask function inside the kernel and classifies blocks itself; the function here is the
spec's own `rule` on frames computed arithmetically from positions (`VideoTokenLayout.frame_of`), because a
TPU kernel cannot gather from a metadata table. Sequences are padded to the block size; padded keys are never
visible and padded query rows see key 0 only (finite softmax; their outputs are dropped).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from landiff_jax.nn.masks import MaskSpec


class SpecMask(splash_mask._ComputableMask):  # pylint: disable=protected-access
  """A `MaskSpec` over padded lengths, as splash's lazily computed mask."""

  def __init__(self, spec: MaskSpec, q_len: int, kv_len: int, padded_q: int, padded_kv: int):
    self.spec, self.q_len, self.kv_len = spec, q_len, kv_len

    def mask_function(q_ids, kv_ids):
      xp = np if isinstance(q_ids, np.ndarray) and isinstance(kv_ids, np.ndarray) else jnp
      if spec.is_frame_causal:
        layout = spec.layout
        q_frame, k_frame = layout.frame_of(q_ids, xp), layout.frame_of(kv_ids, xp)
        q_latent = (q_ids >= layout.num_visual_tokens).astype(xp.int32)
        k_latent = (kv_ids >= layout.num_visual_tokens).astype(xp.int32)
      else:
        q_frame = k_frame = q_latent = k_latent = 0
      allowed = spec.rule(q_ids, kv_ids, q_frame, k_frame, q_latent, k_latent) & (kv_ids < kv_len)
      return allowed | ((q_ids >= q_len) & (kv_ids == 0))

    super().__init__((padded_q, padded_kv), mask_function)

  def __eq__(self, other):
    return isinstance(other, SpecMask) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def _key(self):
    return (self.spec, self.q_len, self.kv_len, self.shape)


def block_size(length: int) -> int:
  return 512 if length >= 2048 else 128


@functools.lru_cache(maxsize=32)
def _kernel(spec: MaskSpec, q_len: int, kv_len: int, num_heads: int, interpret: bool):
  block_q, block_k = block_size(q_len), block_size(kv_len)
  padded_q, padded_kv = -(-q_len // block_q) * block_q, -(-kv_len // block_k) * block_k
  mask = splash_mask.MultiHeadMask([SpecMask(spec, q_len, kv_len, padded_q, padded_kv)] * num_heads)
  sizes = splash_kernel.BlockSizes(block_q=block_q, block_kv=block_k, block_kv_compute=block_k,
                                   block_q_dkv=block_q, block_kv_dkv=block_k, block_kv_dkv_compute=block_k,
                                   block_q_dq=block_q, block_kv_dq=block_k)
  kernel = splash_kernel.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                         interpret=interpret)
  return kernel, padded_q, padded_kv


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec, *, scale: float,
                     interpret: bool = False) -> jax.Array:
  """[B, Lq, H, D] attention with splash; grouped key/value heads are repeated to the query heads."""
  b, q_len, h, _ = q.shape
  kv_len, groups = k.shape[1], h // k.shape[2]
  mask.check_lengths(q_len, kv_len)
  kernel, padded_q, padded_kv = _kernel(mask, q_len, kv_len, h, interpret)
  if groups > 1:
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  to_heads_first = lambda x, length: jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(
      0, 2, 1, 3)
  qh = to_heads_first(q * jnp.asarray(scale, q.dtype), padded_q)
  kh, vh = to_heads_first(k, padded_kv), to_heads_first(v, padded_kv)
  out = jax.vmap(kernel)(qh, kh, vh)
  return out.transpose(0, 2, 1, 3)[:, :q_len].astype(q.dtype)
