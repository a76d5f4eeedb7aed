"""Scaled dot-product attention with one entry point and backends chosen by name.

`attention(q, k, v, mask, backend=...)`: q [B, Lq, H, D], k/v [B, Lk, Hkv, D] with Hkv dividing H (grouped-query
attention), mask a `MaskSpec`. Backends live in a registry so kernels added later ('pallas', 'splash') plug in
with `register_backend`; every backend must match 'xla' on the same inputs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Protocol
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax.nn.masks import MaskSpec


class AttentionFn(Protocol):

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec, *, kv_valid: jax.Array | None,
               q_offset, scale: float) -> jax.Array:
    ...


@dataclasses.dataclass(frozen=True)
class Backend:
  fn: AttentionFn
  # Returns None when the backend can run these inputs here, otherwise the reason it cannot.
  unavailable_reason: Callable[[jax.Array, jax.Array, jax.Array], str | None] = lambda q, k, v: None


_BACKENDS: dict[str, Backend] = {}
_FALLBACK_BACKEND = 'xla'
_warned: set[tuple[str, str]] = set()


def register_backend(name: str, fn: AttentionFn,
                     unavailable_reason: Callable[[jax.Array, jax.Array, jax.Array], str | None] | None = None):
  _BACKENDS[name] = Backend(fn, unavailable_reason or (lambda q, k, v: None))


def available_backends() -> tuple[str, ...]:
  return tuple(sorted(_BACKENDS))


def unavailable_reason(backend: str, q, k, v) -> str | None:
  """Why `backend` cannot run these inputs (arrays or `jax.ShapeDtypeStruct`s) here, or None when it can."""
  if backend not in _BACKENDS:
    return f'{backend!r} is not a registered backend ({", ".join(available_backends())})'
  return _BACKENDS[backend].unavailable_reason(q, k, v)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec, *, backend: str = 'xla',
              kv_valid: jax.Array | None = None, q_offset=0, scale: float | None = None) -> jax.Array:
  """Softmax(q·kᵀ·scale + mask)·v → [B, Lq, H, D] in q.dtype.

  kv_valid: optional bool [B, Lk]; False keys (padding) are ignored. Query rows with no allowed key give zeros.
  q_offset: absolute position of query 0 (KV-cache decoding with a causal mask); may be traced.
  scale: defaults to 1/sqrt(D).
  """
  check_shapes(q, k, v, kv_valid)
  if backend not in _BACKENDS:
    raise ValueError(f'Unknown attention backend {backend!r}; valid names: {available_backends()}.')
  mask.check_lengths(q.shape[1], k.shape[1], q_offset)
  reason = _BACKENDS[backend].unavailable_reason(q, k, v)
  if reason is not None:
    if (backend, reason) not in _warned:
      _warned.add((backend, reason))
      warnings.warn(f"Attention backend {backend!r} is unavailable ({reason}); falling back to "
                    f"{_FALLBACK_BACKEND!r}.", stacklevel=2)
    backend = _FALLBACK_BACKEND
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  return _BACKENDS[backend].fn(q, k, v, mask, kv_valid=kv_valid, q_offset=q_offset, scale=scale)


def check_shapes(q, k, v, kv_valid):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f'attention expects q, k, v of rank 4 [B, L, H, D], got {q.shape}, {k.shape}, {v.shape}.')
  (b, _, h, d), (bk, lk, hkv, dk) = q.shape, k.shape
  if bk != b or v.shape[:3] != k.shape[:3] or dk != d:
    raise ValueError(f'attention: incompatible q {q.shape}, k {k.shape}, v {v.shape} '
                     '(need equal batch, k/v equal length and heads, q/k equal head dim).')
  if h % hkv:
    raise ValueError(f'attention: query heads {h} must be a multiple of key/value heads {hkv}.')
  if kv_valid is not None and kv_valid.shape != (b, lk):
    raise ValueError(f'attention: kv_valid shape {kv_valid.shape} must be (batch, kv_len) = {(b, lk)}.')


def _allowed_keys(mask: MaskSpec, q_len: int, kv_len: int, q_offset, kv_valid) -> jax.Array:
  """bool [B or 1, 1, Lq, Lk], computed in the graph (a numpy mask would become a constant of size Lq·Lk)."""
  mask.check_lengths(q_len, kv_len, q_offset)
  q_index = q_offset + jnp.arange(q_len)[:, None]
  allowed = jnp.broadcast_to(mask.allowed(q_index, jnp.arange(kv_len)[None, :]), (q_len, kv_len))[None, None]
  if kv_valid is not None:
    allowed = allowed & kv_valid[:, None, None, :]
  return allowed


def xla_attention(q, k, v, mask: MaskSpec, *, kv_valid=None, q_offset=0, scale: float) -> jax.Array:
  """Reference: dense mask, scores and softmax in float32, zeros for rows with no allowed key."""
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  groups = h // hkv
  allowed = _allowed_keys(mask, lq, lk, q_offset, kv_valid)[:, :, None]  # [B|1, 1, 1, Lq, Lk]
  q_grouped = q.reshape(b, lq, hkv, groups, d)
  scores = jnp.einsum('bqhgd,bkhd->bhgqk', q_grouped, k, preferred_element_type=jnp.float32)
  scores = scores.astype(jnp.float32) * scale
  row_max = jnp.max(jnp.where(allowed, scores, -jnp.inf), axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  unnormalised = jnp.exp(jnp.where(allowed, scores - row_max, -jnp.inf))
  denominator = jnp.sum(unnormalised, axis=-1, keepdims=True)
  probs = unnormalised / jnp.where(denominator > 0, denominator, 1.0)
  out = jnp.einsum('bhgqk,bkhd->bqhgd', probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, lq, h, v.shape[-1]).astype(q.dtype)


def jax_nn_attention(q, k, v, mask: MaskSpec, *, kv_valid=None, q_offset=0, scale: float,
                     implementation: str | None = 'cudnn') -> jax.Array:
  """`jax.nn.dot_product_attention`: causal flag for aligned causal masks, a dense boolean mask otherwise."""
  aligned_causal = mask.kind == 'causal' and isinstance(q_offset, int) and q_offset == 0
  if mask.kind == 'full' and kv_valid is None:
    dense, is_causal = None, False
  elif aligned_causal and kv_valid is None:
    dense, is_causal = None, True
  else:
    dense, is_causal = _allowed_keys(mask, q.shape[1], k.shape[1], q_offset, kv_valid), False
  out = jax.nn.dot_product_attention(q, k, v, mask=dense, scale=scale, is_causal=is_causal,
                                     implementation=implementation)
  if dense is not None and kv_valid is not None:
    # jax.nn gives fully masked rows a uniform average; the contract here is zeros.
    row_has_key = jnp.any(dense, axis=-1)  # [B, 1, Lq]
    out = jnp.where(jnp.swapaxes(row_has_key, 1, 2)[..., None], out, 0)
  return out.astype(q.dtype)


def _cudnn_unavailable_reason(q, k, v) -> str | None:
  platform = jax.default_backend()
  if platform != 'gpu':
    return f"cuDNN attention needs a CUDA GPU, JAX's default backend is {platform!r}"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f'cuDNN attention takes float16/bfloat16 inputs, got {q.dtype}'
  if q.shape[-1] % 8 or q.shape[-1] > 256:
    return f'cuDNN attention needs a head dim that is a multiple of 8 and at most 256, got {q.shape[-1]}'
  return None


# Kernels run in Pallas interpret mode on any platform when this is set (slow; for tests and debugging).
INTERPRET_ENV = 'LANDIFF_PALLAS_INTERPRET'


def _interpret() -> bool:
  return os.environ.get(INTERPRET_ENV, '') not in ('', '0')


def _static_offset(q_offset) -> bool:
  return isinstance(q_offset, (int, np.integer))


def pallas_attention(q, k, v, mask: MaskSpec, *, kv_valid=None, q_offset=0, scale: float) -> jax.Array:
  """The block-skipping flash kernel; a traced q_offset (one-token decode steps) runs the xla reference."""
  if not _static_offset(q_offset):
    return xla_attention(q, k, v, mask, kv_valid=kv_valid, q_offset=q_offset, scale=scale)
  from landiff_jax.kernels import flash_attention  # pylint: disable=import-outside-toplevel
  return flash_attention.flash_attention(q, k, v, mask, kv_valid=kv_valid, q_offset=int(q_offset), scale=scale,
                                         interpret=_interpret())


def _pallas_unavailable_reason(q, k, v) -> str | None:
  if _interpret():
    return None
  if jax.default_backend() != 'gpu':
    return (f"the Pallas kernel lowers through Triton on GPUs, JAX's default backend is "
            f"{jax.default_backend()!r} (use 'splash' on TPU; {INTERPRET_ENV}=1 runs it interpreted)")
  return None


def splash_backend(q, k, v, mask: MaskSpec, *, kv_valid=None, q_offset=0, scale: float) -> jax.Array:
  """Splash attention; runtime key masks and query offsets (LM decoding) run the xla reference."""
  if kv_valid is not None or not _static_offset(q_offset) or q_offset != 0:
    return xla_attention(q, k, v, mask, kv_valid=kv_valid, q_offset=q_offset, scale=scale)
  from landiff_jax.kernels import splash  # pylint: disable=import-outside-toplevel
  return splash.splash_attention(q, k, v, mask, scale=scale, interpret=_interpret())


def _splash_unavailable_reason(q, k, v) -> str | None:
  if _interpret():
    return None
  if jax.default_backend() != 'tpu':
    return (f"splash attention is a TPU kernel, JAX's default backend is {jax.default_backend()!r} "
            "(use 'pallas' on GPU)")
  return None


register_backend('xla', xla_attention)
register_backend('cudnn', jax_nn_attention, _cudnn_unavailable_reason)
register_backend('pallas', pallas_attention, _pallas_unavailable_reason)
register_backend('splash', splash_backend, _splash_unavailable_reason)
