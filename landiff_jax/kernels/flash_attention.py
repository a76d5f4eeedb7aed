"""Pallas flash attention for `MaskSpec` masks: online softmax, fp32 accumulation, empty blocks skipped.

Layout as in `nn.attention`: q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (Hkv divides H). The grid runs over
(batch, head, query block); each program walks only the key blocks its row of `classify_blocks` marks non-empty
— first the full ones with no mask arithmetic, then the partial ones, where the rule is evaluated from the
positions and the per-token metadata (frame, is-latent) of the two blocks. Sequences are padded to block
multiples inside the op. The backward pass (custom VJP) recomputes probabilities from the saved log-sum-exp:
one kernel for dq over the same visit lists, one for dk/dv over the transposed lists.

The kernels are written for Pallas' Triton lowering (GPU); `interpret=True` runs them anywhere (tests on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from landiff_jax.kernels import block_mask
from landiff_jax.nn.masks import MaskSpec

# the module, not the function `landiff_jax.nn` re-exports under the same name
attention_lib = importlib.import_module('landiff_jax.nn.attention')

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static part of one call: everything that shapes the compiled kernels."""
  mask: MaskSpec
  q_len: int
  kv_len: int
  q_offset: int
  scale: float
  block_q: int
  block_k: int
  num_warps: int
  num_stages: int
  heavy_first: bool
  masked_keys: bool  # a runtime kv_valid is given: every visited block is partial
  interpret: bool

  @property
  def q_padded(self) -> int:
    return -(-self.q_len // self.block_q) * self.block_q

  @property
  def kv_padded(self) -> int:
    return -(-self.kv_len // self.block_k) * self.block_k

  def row(self, index):
    """Query block of grid index `index` in the forward and dq kernels: in reverse with `heavy_first` (under
    causal-like masks the last rows visit the most blocks, and launching them first shortens the tail)."""
    return self.q_padded // self.block_q - 1 - index if self.heavy_first else index

  def classes(self) -> np.ndarray:
    return block_mask.classify_blocks(self.mask, self.q_len, self.kv_len, self.block_q, self.block_k,
                                      self.q_offset)

  def key_lists(self) -> block_mask.BlockLists:
    """Per query block: the key blocks to visit (forward and dq)."""
    return block_mask.block_lists(self.classes(), all_partial=self.masked_keys)

  def query_lists(self) -> block_mask.BlockLists:
    """Per key block: the query blocks to visit (dk, dv)."""
    return block_mask.block_lists(self.classes().T, all_partial=self.masked_keys)


def check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, *, block_q: int, block_k: int,
                 kv_valid: jax.Array | None = None) -> None:
  """Raises ValueError for inputs this kernel cannot run (before any lowering is attempted)."""
  attention_lib.check_shapes(q, k, v, kv_valid)
  if v.shape != k.shape:
    raise ValueError(f'flash_attention: k {k.shape} and v {v.shape} must have one shape (equal head dims).')
  if q.shape[3] not in SUPPORTED_HEAD_DIMS:
    raise ValueError(f'flash_attention (pallas backend): head dim {q.shape[3]} is not supported; the Triton '
                     f'lowering needs one of {SUPPORTED_HEAD_DIMS}. Use the xla or cudnn backend for this model.')
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
    raise ValueError(f'flash_attention: q, k, v must share one dtype of float32/bfloat16/float16, got '
                     f'{q.dtype}, {k.dtype}, {v.dtype}.')
  for name, size in (('block_q', block_q), ('block_k', block_k)):
    if size < 16 or size & (size - 1):
      raise ValueError(f'flash_attention: {name}={size} must be a power of two ≥ 16 (Triton tile sizes).')


@dataclasses.dataclass(frozen=True)
class Tiles:
  """One launch configuration of the three kernels: the (query, key) tile, Triton's warps per program and
  software-pipelining depth, and whether the forward and dq kernels launch their query blocks last to first."""
  block_q: int
  block_k: int
  num_warps: int
  num_stages: int
  heavy_first: bool = False


# Autotuning table: (head dim, mask kind) → tiles, from `landiff-jax bench attention --sweep` on a GPU (the sweep
# prints the lines to paste here). As measured on 2026-12-04 (one H200, jax 0.11.2, bf16, `--sweep 3`: the three
# 128×64 candidates below, docs/benchmarks.md): launching the heaviest query blocks first gave the encoder mask
# 2.5 / 8.4 ms fwd / fwd+bwd at batch 1 (2.9 / 9.5 without), the decoder mask 2.7 / 9.0 (2.8 / 9.4), and ties at
# batch 4. For causal d128 the 64×64 and 128×64 tiles tie (0.3-0.5 / 0.8 ms); 'auto' sends causal to cuDNN anyway.
TUNED_TILES: dict[tuple[int, str], Tiles] = {
    (64, 'frame_causal_encoder'): Tiles(128, 64, 4, 2, True),
    (64, 'frame_causal_decoder'): Tiles(128, 64, 4, 2, True),
    (128, 'causal'): Tiles(64, 64, 8, 2),
}

# What the sweep tries per head dim (tiles whose shared memory fits a Hopper/Ampere SM at that head dim).
SWEEP_TILES: dict[int, tuple[Tiles, ...]] = {
    64: (Tiles(128, 64, 4, 2, True), Tiles(128, 64, 4, 3), Tiles(128, 128, 8, 2), Tiles(64, 64, 4, 2),
         Tiles(128, 64, 8, 3), Tiles(64, 128, 4, 2)),
    128: (Tiles(64, 64, 8, 2, True), Tiles(128, 64, 8, 2), Tiles(64, 64, 4, 3), Tiles(128, 32, 4, 2)),
}


def tiles_for(head_dim: int, mask_kind: str) -> Tiles:
  """The tuned tiles for this head dim and mask kind, else the head dim's default."""
  tuned = TUNED_TILES.get((head_dim, mask_kind))
  if tuned is not None:
    return tuned
  return Tiles(128, 64, 4, 2) if head_dim <= 64 else Tiles(64, 64, 8, 2)


def default_blocks(head_dim: int, mask_kind: str = '') -> tuple[int, int]:
  tiles = tiles_for(head_dim, mask_kind)
  return tiles.block_q, tiles.block_k


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec, *, kv_valid: jax.Array | None = None,
                    q_offset: int = 0, scale: float | None = None, block_q: int | None = None,
                    block_k: int | None = None, tiles: Tiles | None = None, interpret: bool = False) -> jax.Array:
  """Softmax(q·kᵀ·scale, masked)·v → [B, Lq, H, D] in q.dtype; rows with no allowed key give zeros.

  `q_offset` must be a Python int here (the block classification is static); `kv_valid` (bool [B, Lk]) masks
  keys at run time and turns every visited block partial. `tiles` (default: `tiles_for` the head dim and mask
  kind) sets the launch configuration; `block_q`/`block_k` override its tile.
  """
  tiles = tiles or tiles_for(q.shape[-1], mask.kind)
  block_q, block_k = block_q or tiles.block_q, block_k or tiles.block_k
  check_inputs(q, k, v, block_q=block_q, block_k=block_k, kv_valid=kv_valid)
  if not isinstance(q_offset, (int, np.integer)):
    raise ValueError('flash_attention needs a static (Python int) q_offset; decode steps with a traced offset '
                     'belong to the xla backend.')
  # Queries shorter than a block get a smaller block (still a Triton-legal power of two).
  block_q = min(block_q, max(16, pl.next_power_of_2(q.shape[1])))
  block_k = min(block_k, max(16, pl.next_power_of_2(k.shape[1])))
  config = KernelConfig(mask=mask, q_len=q.shape[1], kv_len=k.shape[1], q_offset=int(q_offset),
                        scale=float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale), block_q=block_q,
                        block_k=block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                        heavy_first=tiles.heavy_first, masked_keys=kv_valid is not None, interpret=interpret)
  valid = jnp.ones(k.shape[:2], jnp.int32) if kv_valid is None else kv_valid.astype(jnp.int32)
  return _flash(config, q, k, v, valid)


# --- shared pieces -----------------------------------------------------------------------------------------------


def _pad_to(x: jax.Array, axis: int, length: int, value=0) -> jax.Array:
  if x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _metadata(config: KernelConfig, length: int, padded: int, offset: int) -> tuple[jax.Array, jax.Array]:
  """Frame and is-latent of positions offset .. offset+length, padded with frame -1 (never a visible frame)."""
  if config.mask.is_frame_causal:
    meta = config.mask.layout.token_metadata()
    frame = np.asarray(meta.frame[offset:offset + length], np.int32)
    latent = np.asarray(meta.is_latent[offset:offset + length], np.int32)
  else:
    frame, latent = np.zeros(length, np.int32), np.zeros(length, np.int32)
  return (jnp.asarray(np.pad(frame, (0, padded - length), constant_values=-1)),
          jnp.asarray(np.pad(latent, (0, padded - length))))


def _dot(a: jax.Array, b: jax.Array, contract_a: int, contract_b: int) -> jax.Array:
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _allowed(config: KernelConfig, q_start, k_start, q_frame, q_latent, k_frame, k_latent, k_valid, rows: int,
             cols: int) -> jax.Array:
  """bool [rows, cols] for one partial block: the rule, key padding and the runtime key mask."""
  q_pos = config.q_offset + q_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
  allowed = config.mask.rule(q_pos, k_pos, q_frame[:, None], k_frame[None, :], q_latent[:, None],
                             k_latent[None, :])
  return allowed & (k_pos < config.kv_len) & (k_valid[None, :] != 0)


def _visit(lists_full, count_full, lists_partial, count_partial, row: jax.Array, num_cols: int, body, carry):
  """Runs body(col, carry, masked) over a row's full blocks (masked=False) then its partial blocks (masked=True)."""
  carry = lax.fori_loop(0, count_full[row], lambda t, c: body(lists_full[row * num_cols + t], c, False), carry)
  return lax.fori_loop(0, count_partial[row], lambda t, c: body(lists_partial[row * num_cols + t], c, True), carry)


def _list_arrays(lists: block_mask.BlockLists) -> tuple[jax.Array, ...]:
  return tuple(jnp.asarray(a.reshape(-1)) for a in (lists.full, lists.num_full, lists.partial, lists.num_partial))


def _like(shape, dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
  """An output shape that varies over the same manual mesh axes as `like` (kernels called inside shard_map);
  the field is `manual_axis_type` in jax 0.10 and `vma` in older releases."""
  aval = jax.typeof(like)
  for field in ('manual_axis_type', 'vma'):
    if field in _STRUCT_FIELDS and hasattr(aval, field):
      return jax.ShapeDtypeStruct(shape, dtype, **{field: getattr(aval, field)})
  return jax.ShapeDtypeStruct(shape, dtype)


_STRUCT_FIELDS = frozenset(inspect.signature(jax.ShapeDtypeStruct).parameters)


def _whole(array_shape) -> pl.BlockSpec:
  return pl.BlockSpec(array_shape, lambda *_: (0,) * len(array_shape))


# --- forward -----------------------------------------------------------------------------------------------------


def _forward_kernel(full_ref, num_full_ref, partial_ref, num_partial_ref, q_ref, k_ref, v_ref, q_frame_ref,
                    q_latent_ref, k_frame_ref, k_latent_ref, valid_ref, o_ref, lse_ref, *, config: KernelConfig,
                    num_k_blocks: int):
  bq, bk = config.block_q, config.block_k
  row = config.row(pl.program_id(2))
  q = q_ref[...]
  q_frame, q_latent = q_frame_ref[...], q_latent_ref[...]

  def body(col, carry, masked):
    acc, m_prev, l_prev = carry
    keys = pl.ds(col * bk, bk)
    s = _dot(q, k_ref[keys, :], 1, 1) * config.scale
    if masked:
      allowed = _allowed(config, row * bq, col * bk, q_frame, q_latent, k_frame_ref[keys], k_latent_ref[keys],
                         valid_ref[keys], bq, bk)
      s = jnp.where(allowed, s, -jnp.inf)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    correction = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    v = v_ref[keys, :]
    acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v, 1, 0)
    return acc, m_new, l_prev * correction + jnp.sum(p, axis=1)

  init = (jnp.zeros((bq, q.shape[-1]), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = _visit(full_ref, num_full_ref, partial_ref, num_partial_ref, row, num_k_blocks, body, init)
  has_keys = l > 0
  o_ref[...] = jnp.where(has_keys[:, None], acc / jnp.where(has_keys, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)
  # +inf for rows without keys makes exp(s - lse) exactly 0 there in the backward pass.
  lse_ref[...] = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), jnp.inf)


def _padded_inputs(config: KernelConfig, q, k, v, valid):
  q = _pad_to(q, 1, config.q_padded)
  k, v = _pad_to(k, 1, config.kv_padded), _pad_to(v, 1, config.kv_padded)
  return q, k, v, _pad_to(valid, 1, config.kv_padded)


def _forward(config: KernelConfig, q, k, v, valid):
  """(o [B, Lq_pad, H, D], lse [B, H, Lq_pad]) on padded inputs."""
  b, lq, h, d = q.shape
  lk, groups = k.shape[1], h // k.shape[2]
  bq, bk = config.block_q, config.block_k
  list_arrays = _list_arrays(config.key_lists())
  kernel = functools.partial(_forward_kernel, config=config, num_k_blocks=lk // bk)
  in_specs = [_whole(a.shape) for a in list_arrays] + [
      pl.BlockSpec((None, bq, None, d), lambda bi, hi, qi: (bi, config.row(qi), hi, 0)),
      pl.BlockSpec((None, lk, None, d), lambda bi, hi, qi: (bi, 0, hi // groups, 0)),
      pl.BlockSpec((None, lk, None, d), lambda bi, hi, qi: (bi, 0, hi // groups, 0)),
      pl.BlockSpec((bq,), lambda bi, hi, qi: (config.row(qi),)),
      pl.BlockSpec((bq,), lambda bi, hi, qi: (config.row(qi),)),
      _whole((lk,)),
      _whole((lk,)),
      pl.BlockSpec((None, lk), lambda bi, hi, qi: (bi, 0)),
  ]
  out_specs = [pl.BlockSpec((None, bq, None, d), lambda bi, hi, qi: (bi, config.row(qi), hi, 0)),
               pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, config.row(qi)))]
  q_meta, k_meta = _metadata(config, config.q_len, lq, config.q_offset), _metadata(config, config.kv_len, lk, 0)
  return pl.pallas_call(
      kernel, grid=(b, h, lq // bq), in_specs=in_specs, out_specs=out_specs,
      out_shape=[_like(q.shape, q.dtype, q), _like((b, h, lq), jnp.float32, q)],
      compiler_params=_compiler_params(config), interpret=config.interpret, name='landiff_flash_forward',
  )(*list_arrays, q, k, v, *q_meta, *k_meta, valid)


def _compiler_params(config: KernelConfig):
  try:
    from jax.experimental.pallas import triton as plgpu
  except ImportError:  # pragma: no cover - every supported jax ships the Triton backend module
    return None
  return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


# --- backward ----------------------------------------------------------------------------------------------------


def _dq_kernel(full_ref, num_full_ref, partial_ref, num_partial_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, q_frame_ref, q_latent_ref, k_frame_ref, k_latent_ref, valid_ref, dq_ref, *,
               config: KernelConfig, num_k_blocks: int):
  bq, bk = config.block_q, config.block_k
  row = config.row(pl.program_id(2))
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_frame, q_latent = q_frame_ref[...], q_latent_ref[...]

  def body(col, dq, masked):
    keys = pl.ds(col * bk, bk)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s = _dot(q, k, 1, 1) * config.scale
    p = jnp.exp(s - lse[:, None])
    if masked:
      allowed = _allowed(config, row * bq, col * bk, q_frame, q_latent, k_frame_ref[keys], k_latent_ref[keys],
                         valid_ref[keys], bq, bk)
      p = jnp.where(allowed, p, 0.0)
    ds = p * (_dot(do, v, 1, 1) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, 1, 0)

  dq = _visit(full_ref, num_full_ref, partial_ref, num_partial_ref, row, num_k_blocks, body,
              jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * config.scale).astype(dq_ref.dtype)


def _dkv_kernel(full_ref, num_full_ref, partial_ref, num_partial_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, q_frame_ref, q_latent_ref, k_frame_ref, k_latent_ref, valid_ref, dk_ref, dv_ref, *,
                config: KernelConfig, num_q_blocks: int):
  bq, bk = config.block_q, config.block_k
  col = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  k_frame, k_latent, k_valid = k_frame_ref[...], k_latent_ref[...], valid_ref[...]

  def body(row, carry, masked):
    dk, dv = carry
    rows = pl.ds(row * bq, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    s = _dot(q, k, 1, 1) * config.scale
    p = jnp.exp(s - lse_ref[rows][:, None])
    if masked:
      allowed = _allowed(config, row * bq, col * bk, q_frame_ref[rows], q_latent_ref[rows], k_frame, k_latent,
                         k_valid, bq, bk)
      p = jnp.where(allowed, p, 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, 0, 0)
    ds = p * (_dot(do, v, 1, 1) - delta_ref[rows][:, None])
    return dk + _dot(ds.astype(q.dtype), q, 0, 0), dv

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = _visit(full_ref, num_full_ref, partial_ref, num_partial_ref, col, num_q_blocks, body, init)
  dk_ref[...] = (dk * config.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(config: KernelConfig, q, k, v, valid, o, lse, do):
  """(dq, dk, dv) on padded inputs; dk/dv summed over the query heads that share a key/value head."""
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  groups = h // hkv
  bq, bk = config.block_q, config.block_k
  delta = jnp.einsum('blhd,blhd->bhl', o.astype(jnp.float32), do.astype(jnp.float32))
  q_meta, k_meta = _metadata(config, config.q_len, lq, config.q_offset), _metadata(config, config.kv_len, lk, 0)

  key_lists = _list_arrays(config.key_lists())
  row_specs = [
      pl.BlockSpec((None, bq, None, d), lambda bi, hi, qi: (bi, config.row(qi), hi, 0)),  # q
      pl.BlockSpec((None, lk, None, d), lambda bi, hi, qi: (bi, 0, hi // groups, 0)),  # k
      pl.BlockSpec((None, lk, None, d), lambda bi, hi, qi: (bi, 0, hi // groups, 0)),  # v
      pl.BlockSpec((None, bq, None, d), lambda bi, hi, qi: (bi, config.row(qi), hi, 0)),  # do
      pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, config.row(qi))),  # lse
      pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, config.row(qi))),  # delta
      pl.BlockSpec((bq,), lambda bi, hi, qi: (config.row(qi),)),
      pl.BlockSpec((bq,), lambda bi, hi, qi: (config.row(qi),)),
      _whole((lk,)),
      _whole((lk,)),
      pl.BlockSpec((None, lk), lambda bi, hi, qi: (bi, 0)),
  ]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, config=config, num_k_blocks=lk // bk), grid=(b, h, lq // bq),
      in_specs=[_whole(a.shape) for a in key_lists] + row_specs,
      out_specs=pl.BlockSpec((None, bq, None, d), lambda bi, hi, qi: (bi, config.row(qi), hi, 0)),
      out_shape=_like(q.shape, q.dtype, q), compiler_params=_compiler_params(config),
      interpret=config.interpret, name='landiff_flash_dq',
  )(*key_lists, q, k, v, do, lse, delta, *q_meta, *k_meta, valid)

  query_lists = _list_arrays(config.query_lists())
  col_specs = [
      pl.BlockSpec((None, lq, None, d), lambda bi, hi, ki: (bi, 0, hi, 0)),  # q
      pl.BlockSpec((None, bk, None, d), lambda bi, hi, ki: (bi, ki, hi // groups, 0)),  # k
      pl.BlockSpec((None, bk, None, d), lambda bi, hi, ki: (bi, ki, hi // groups, 0)),  # v
      pl.BlockSpec((None, lq, None, d), lambda bi, hi, ki: (bi, 0, hi, 0)),  # do
      pl.BlockSpec((None, None, lq), lambda bi, hi, ki: (bi, hi, 0)),  # lse
      pl.BlockSpec((None, None, lq), lambda bi, hi, ki: (bi, hi, 0)),  # delta
      _whole((lq,)),
      _whole((lq,)),
      pl.BlockSpec((bk,), lambda bi, hi, ki: (ki,)),
      pl.BlockSpec((bk,), lambda bi, hi, ki: (ki,)),
      pl.BlockSpec((None, bk), lambda bi, hi, ki: (bi, ki)),
  ]
  per_head = _like((b, lk, h, d), jnp.float32 if groups > 1 else k.dtype, k)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, config=config, num_q_blocks=lq // bq), grid=(b, h, lk // bk),
      in_specs=[_whole(a.shape) for a in query_lists] + col_specs,
      out_specs=[pl.BlockSpec((None, bk, None, d), lambda bi, hi, ki: (bi, ki, hi, 0))] * 2,
      out_shape=[per_head, per_head], compiler_params=_compiler_params(config), interpret=config.interpret,
      name='landiff_flash_dkv',
  )(*query_lists, q, k, v, do, lse, delta, *q_meta, *k_meta, valid)
  if groups > 1:
    dk = dk.reshape(b, lk, hkv, groups, d).sum(axis=3).astype(k.dtype)
    dv = dv.reshape(b, lk, hkv, groups, d).sum(axis=3).astype(v.dtype)
  return dq, dk, dv


# --- custom VJP --------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(config: KernelConfig, q, k, v, valid):
  return _flash_forward(config, q, k, v, valid)[0]


def _flash_forward(config: KernelConfig, q, k, v, valid):
  padded = _padded_inputs(config, q, k, v, valid)
  o, lse = _forward(config, *padded)
  return o[:, :config.q_len], (*padded, o, lse)


def _flash_backward(config: KernelConfig, residuals, do):
  qp, kp, vp, validp, o, lse = residuals
  dq, dk, dv = _backward(config, qp, kp, vp, validp, o, lse, _pad_to(do, 1, config.q_padded))
  return (dq[:, :config.q_len], dk[:, :config.kv_len], dv[:, :config.kv_len],
          np.zeros((validp.shape[0], config.kv_len), jax.dtypes.float0))


_flash.defvjp(_flash_forward, _flash_backward)
