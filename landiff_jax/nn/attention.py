"""Scaled dot-product attention with one entry point and backends chosen by name.

`attention(q, k, v, mask, backend=...)`: q [B, Lq, H, D], k/v [B, Lk, Hkv, D] with Hkv dividing H (grouped-query
attention), mask a `MaskSpec`. Backends live in a registry (`register_backend`); every backend must match 'xla' on
the same inputs:

- 'auto' (the default): resolved per call by `resolve_backend` from the platform, dtype, head dim and mask to the
  fastest path that never materialises L×L scores (GPU: 'pallas' for frame-causal masks, 'cudnn' for full and
  causal attention in bf16/fp16 that needs no dense mask, else 'pallas', else 'cudnn' for decode steps, else
  'blockwise'; TPU: 'splash', 'blockwise' for decode steps and padded keys; CPU: 'blockwise').
- 'xla': the dense reference (B·H·Lq·Lk float32 scores); explicit only.
- 'blockwise': online softmax over key blocks in plain JAX (`kernels/blockwise.py`), O(L) memory, any device.
- 'cudnn': `jax.nn.dot_product_attention`; masks other than full / aligned causal go in as a dense boolean mask.
- 'pallas', 'splash': the block-skipping kernels (`kernels/flash_attention.py`, `kernels/splash.py`).

An explicit choice that would hold more than the scores limit (`scores_limit`, set by the entry points from
`config.attention_max_scores_gib`) is refused with the fix; a backend that cannot run here is replaced by what
'auto' picks, with a warning.
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

from landiff_jax.attention_limit import DEFAULT_MAX_SCORES_GIB, max_scores_gib, scores_limit  # noqa: F401, re-exported
from landiff_jax.nn.masks import MaskSpec

AUTO = 'auto'


class AttentionFn(Protocol):

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec, *, kv_valid: jax.Array | None,
               q_offset, scale: float) -> jax.Array:
    ...


# (q, k, v, platform) → None when the backend can run these inputs on that platform, otherwise the reason.
ReasonFn = Callable[[jax.Array, jax.Array, jax.Array, str], 'str | None']


@dataclasses.dataclass(frozen=True)
class Backend:
  fn: AttentionFn
  unavailable_reason: ReasonFn = lambda q, k, v, platform: None


_BACKENDS: dict[str, Backend] = {}
_warned: set[tuple[str, str]] = set()


def register_backend(name: str, fn: AttentionFn, unavailable_reason: ReasonFn | None = None):
  if name == AUTO:
    raise ValueError(f'{AUTO!r} is reserved for the per-platform choice.')
  _BACKENDS[name] = Backend(fn, unavailable_reason or (lambda q, k, v, platform: None))


def available_backends() -> tuple[str, ...]:
  """Every name `attention` accepts: 'auto' and the registered backends."""
  return tuple(sorted((AUTO, *_BACKENDS)))


def unavailable_reason(backend: str, q, k, v, platform: str | None = None) -> str | None:
  """Why `backend` cannot run these inputs (arrays or `jax.ShapeDtypeStruct`s) on `platform` (default: JAX's
  default backend), or None when it can."""
  if backend == AUTO:
    return None
  if backend not in _BACKENDS:
    return f'{backend!r} is not a registered backend ({", ".join(available_backends())})'
  return _BACKENDS[backend].unavailable_reason(q, k, v, platform or jax.default_backend())


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec, *, backend: str = AUTO,
              kv_valid: jax.Array | None = None, q_offset=0, scale: float | None = None) -> jax.Array:
  """Softmax(q·kᵀ·scale + mask)·v → [B, Lq, H, D] in q.dtype.

  kv_valid: optional bool [B, Lk]; False keys (padding) are ignored. Query rows with no allowed key give zeros.
  q_offset: absolute position of query 0 (KV-cache decoding with a causal mask); may be traced.
  scale: defaults to 1/sqrt(D).
  """
  check_shapes(q, k, v, kv_valid)
  if backend != AUTO and backend not in _BACKENDS:
    raise ValueError(f'Unknown attention backend {backend!r}; valid names: {available_backends()}.')
  mask.check_lengths(q.shape[1], k.shape[1], q_offset)
  name = resolve_backend(backend, q, k, v, mask, kv_valid=kv_valid, q_offset=q_offset, warn=True)
  if backend != AUTO:
    check_scores_limit(name, q, k, mask, kv_valid=kv_valid, q_offset=q_offset)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  return _BACKENDS[name].fn(q, k, v, mask, kv_valid=kv_valid, q_offset=q_offset, scale=scale)


# --- choosing a backend ------------------------------------------------------------------------------------------


def resolve_backend(backend: str, q, k, v, mask: MaskSpec, *, kv_valid=None, q_offset=0,
                    platform: str | None = None, max_gib: float | None | str = 'current',
                    warn: bool = False) -> str:
  """The registered backend that `attention(..., backend=backend)` runs for these inputs (arrays or
  `jax.ShapeDtypeStruct`s) on `platform` (default: JAX's default backend; pass 'gpu' / 'tpu' / 'cpu' to see
  another platform's choice). `max_gib` bounds what 'auto' may pick for cuDNN's dense masks (default: the
  current `scores_limit`).

  'auto' picks per platform and mask; an explicit backend that cannot run here is replaced by the 'auto' choice
  (with a warning when `warn`); 'pallas' with a traced q_offset and 'splash' with kv_valid or a query offset (KV-cache
  decoding) run 'blockwise', which handles both.
  """
  platform = platform or jax.default_backend()
  max_gib = max_scores_gib() if max_gib == 'current' else max_gib
  auto = lambda: _auto_backend(q, k, v, mask, kv_valid, q_offset, platform, max_gib)
  if backend == AUTO:
    return auto()
  if backend not in _BACKENDS:
    raise ValueError(f'Unknown attention backend {backend!r}; valid names: {available_backends()}.')
  reason = _BACKENDS[backend].unavailable_reason(q, k, v, platform)
  if reason is not None:
    choice = auto()
    if warn and (backend, reason) not in _warned:
      _warned.add((backend, reason))
      warnings.warn(f"Attention backend {backend!r} is unavailable ({reason}); falling back to {choice!r} "
                    f"(what 'auto' picks here).", stacklevel=3)
    return choice
  if backend == 'pallas' and not _static_offset(q_offset):
    return 'blockwise'
  if backend == 'splash' and not _splash_handles(kv_valid, q_offset):
    return 'blockwise'
  return backend


# A KV-cache step (traced offset) this short with scores this small runs best as one dense einsum on every platform:
# blocked paths pad and re-lay out the whole cache every step (the release LM's decode step read 1.52x its weights
# and cache through 'blockwise' on CPU, 1.22x through 'xla'), and the H200 ran a single decode call in 0.15 ms with
# 'xla' against 0.29-0.35 ms with cuDNN or 'blockwise'.
DECODE_QUERIES = 16
DECODE_SCORES_BYTES = 64 * 2**20


def _is_decode_step(q, k, mask: MaskSpec, kv_valid, q_offset, max_gib: float | None) -> bool:
  """A KV-cache step: a traced query offset, a few queries, small scores."""
  if _static_offset(q_offset) or q.shape[1] > DECODE_QUERIES:
    return False
  scores = materialised_bytes('xla', q, k, mask, kv_valid=kv_valid, q_offset=q_offset)
  return scores <= DECODE_SCORES_BYTES and _within(scores, max_gib)


def _auto_backend(q, k, v, mask: MaskSpec, kv_valid, q_offset, platform: str, max_gib: float | None) -> str:
  if _is_decode_step(q, k, mask, kv_valid, q_offset, max_gib):
    return 'xla'
  # GPU order from launch/attention_auto_check.py on an H200 (bf16, release shapes): cuDNN for full and aligned
  # causal attention (DiT 17,776 tokens: 11.8 ms vs the Pallas kernel's 19.5 ms forward), the Pallas kernel for
  # frame-causal masks (tokenizer: 2.9 ms vs cuDNN with a dense mask 5.5 ms) and for padded causal prefill (0.30 vs
  # 0.52 ms), cuDNN with its small dense mask for decode steps (traced offset), which the kernel cannot take.
  if platform == 'gpu':
    pallas_ok = _static_offset(q_offset) and _pallas_supports(q, k, v)
    cudnn_ok = not mask.is_frame_causal and _cudnn_unavailable_reason(q, k, v, platform) is None
    if cudnn_ok and not _needs_dense_mask(mask, kv_valid, q_offset):
      return 'cudnn'
    if pallas_ok:
      return 'pallas'
    if cudnn_ok and _within(materialised_bytes('cudnn', q, k, mask, kv_valid=kv_valid, q_offset=q_offset), max_gib):
      return 'cudnn'
    return 'blockwise'
  if platform == 'tpu' and _splash_handles(kv_valid, q_offset):
    return 'splash'
  return 'blockwise'


# --- the scores limit --------------------------------------------------------------------------------------------


def _needs_dense_mask(mask: MaskSpec, kv_valid, q_offset) -> bool:
  """Whether the cudnn backend passes a dense [B|1, 1, Lq, Lk] boolean mask (anything but full / aligned causal
  attention without padding)."""
  if kv_valid is not None:
    return True
  if mask.kind == 'full':
    return False
  return not (mask.kind == 'causal' and _static_offset(q_offset) and q_offset == 0)


def materialised_bytes(backend: str, q, k, mask: MaskSpec, *, kv_valid=None, q_offset=0) -> int:
  """Bytes of L×L data one call of `backend` holds at once: 'xla' the float32 scores B·H·Lq·Lk; 'cudnn' the dense
  boolean mask and the additive bias jax.nn builds from it (when the mask is not full / aligned causal); 0 for the
  blocked paths."""
  b, q_len, heads, _ = q.shape
  kv_len = k.shape[1]
  if backend == 'xla':
    return b * heads * q_len * kv_len * 4
  if backend == 'cudnn' and _needs_dense_mask(mask, kv_valid, q_offset):
    mask_batch = b if kv_valid is not None else 1
    return mask_batch * q_len * kv_len * (1 + jnp.dtype(q.dtype).itemsize)
  return 0


def _within(num_bytes: int, max_gib: float | None) -> bool:
  return max_gib is None or num_bytes <= max_gib * 2**30


def check_scores_limit(backend: str, q, k, mask: MaskSpec, *, kv_valid=None, q_offset=0,
                       max_gib: float | None | str = 'current') -> None:
  """Raises ValueError when running `backend` on these inputs would hold more than the scores limit."""
  max_gib = max_scores_gib() if max_gib == 'current' else max_gib
  num_bytes = materialised_bytes(backend, q, k, mask, kv_valid=kv_valid, q_offset=q_offset)
  if _within(num_bytes, max_gib):
    return
  b, q_len, heads, _ = q.shape
  what = (f'float32 scores B·H·Lq·Lk = {b}·{heads}·{q_len}·{k.shape[1]}' if backend == 'xla' else
          f'a dense {mask.kind} mask and bias of {q_len}·{k.shape[1]} per batch row')
  raise ValueError(f'Attention backend {backend!r} would hold {num_bytes / 2**30:.3g} GiB of {what} in one call, '
                   f'more than attention_max_scores_gib={max_gib:g}; use --config.attention_backend=auto (never '
                   f'materialises the scores) or raise --config.attention_max_scores_gib.')


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
  aligned_causal = mask.kind == 'causal' and _static_offset(q_offset) and q_offset == 0
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


def _cudnn_unavailable_reason(q, k, v, platform: str) -> str | None:
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


def blockwise_backend(q, k, v, mask: MaskSpec, *, kv_valid=None, q_offset=0, scale: float) -> jax.Array:
  from landiff_jax.kernels import blockwise  # pylint: disable=import-outside-toplevel
  return blockwise.blockwise_attention(q, k, v, mask, kv_valid=kv_valid, q_offset=q_offset, scale=scale)


def pallas_attention(q, k, v, mask: MaskSpec, *, kv_valid=None, q_offset=0, scale: float) -> jax.Array:
  """The block-skipping flash kernel; a traced q_offset (one-token decode steps) runs 'blockwise'."""
  if not _static_offset(q_offset):
    return blockwise_backend(q, k, v, mask, kv_valid=kv_valid, q_offset=q_offset, scale=scale)
  from landiff_jax.kernels import flash_attention  # pylint: disable=import-outside-toplevel
  return flash_attention.flash_attention(q, k, v, mask, kv_valid=kv_valid, q_offset=int(q_offset), scale=scale,
                                         interpret=_interpret())


def _pallas_unavailable_reason(q, k, v, platform: str) -> str | None:
  if _interpret():
    return None
  if platform != 'gpu':
    return (f"the Pallas kernel lowers through Triton on GPUs, JAX's default backend is {platform!r} "
            f"(use 'splash' on TPU; {INTERPRET_ENV}=1 runs it interpreted)")
  return None


def _pallas_supports(q, k, v) -> bool:
  """Whether the Pallas kernel takes these shapes and dtypes (its head dims and dtypes; one dtype, k/v alike)."""
  from landiff_jax.kernels import flash_attention  # pylint: disable=import-outside-toplevel
  return (q.shape[-1] in flash_attention.SUPPORTED_HEAD_DIMS and k.shape == v.shape and
          q.dtype == k.dtype == v.dtype and any(q.dtype == d for d in flash_attention.SUPPORTED_DTYPES))


def _splash_handles(kv_valid, q_offset) -> bool:
  return kv_valid is None and _static_offset(q_offset) and q_offset == 0


def splash_backend(q, k, v, mask: MaskSpec, *, kv_valid=None, q_offset=0, scale: float) -> jax.Array:
  """Splash attention; runtime key masks and query offsets (LM decoding) run 'blockwise'."""
  if not _splash_handles(kv_valid, q_offset):
    return blockwise_backend(q, k, v, mask, kv_valid=kv_valid, q_offset=q_offset, scale=scale)
  from landiff_jax.kernels import splash  # pylint: disable=import-outside-toplevel
  return splash.splash_attention(q, k, v, mask, scale=scale, interpret=_interpret())


def _splash_unavailable_reason(q, k, v, platform: str) -> str | None:
  if _interpret():
    return None
  if platform != 'tpu':
    return f"splash attention is a TPU kernel, JAX's default backend is {platform!r} (use 'pallas' on GPU)"
  return None


register_backend('xla', xla_attention)
register_backend('blockwise', blockwise_backend)
register_backend('cudnn', jax_nn_attention, _cudnn_unavailable_reason)
register_backend('pallas', pallas_attention, _pallas_unavailable_reason)
register_backend('splash', splash_backend, _splash_unavailable_reason)
