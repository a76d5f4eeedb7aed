"""Which (query block, key block) tiles of a masked attention are empty, full or partial — from the mask rule.

A blocked kernel skips empty tiles, runs full tiles without mask arithmetic and evaluates the rule only on
partial tiles. The classification is exact and costs O(blocks²), never O(L²): inside a block the tokens of one
kind (visual or latent) have non-decreasing frames and positions, so every condition of the rules
(`frame_k ≤ frame_q`, `k ≤ q`) is all-true, all-false or mixed over a pair of such runs, decided by their ends.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from landiff_jax.nn.masks import MaskSpec

EMPTY, PARTIAL, FULL = 0, 1, 2
_NONE, _MIXED, _ALL, _ABSENT = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class _Runs:
  """Per block, for each token kind (0 visual, 1 latent): first/last position and first/last frame, or absent."""
  present: np.ndarray  # bool [blocks, 2]
  first: np.ndarray  # int [blocks, 2]
  last: np.ndarray
  first_frame: np.ndarray
  last_frame: np.ndarray


def _block_runs(spec: MaskSpec, starts: np.ndarray, stops: np.ndarray) -> _Runs:
  """Runs of the real positions [start, stop) of each block, split at the visual/latent boundary."""
  boundary = spec.layout.num_visual_tokens if spec.is_frame_causal else np.iinfo(np.int64).max
  first = np.stack([starts, np.maximum(starts, boundary)], axis=1)
  last = np.stack([np.minimum(stops, boundary), stops], axis=1) - 1
  present = last >= first
  if spec.is_frame_causal:
    clip = lambda x: np.clip(x, 0, spec.layout.length - 1)
    first_frame, last_frame = spec.layout.frame_of(clip(first)), spec.layout.frame_of(clip(last))
  else:
    first_frame = last_frame = np.zeros_like(first)
  return _Runs(present, first, last, first_frame, last_frame)


def _status(all_true: np.ndarray, none_true: np.ndarray) -> np.ndarray:
  return np.where(all_true, _ALL, np.where(none_true, _NONE, _MIXED))


def _pair_status(spec: MaskSpec, q: _Runs, k: _Runs, q_kind: int, k_kind: int) -> np.ndarray:
  """[nq, nk] status of the rule over (q run of q_kind) × (k run of k_kind)."""
  qi = lambda a: a[:, q_kind][:, None]
  kj = lambda a: a[:, k_kind][None, :]
  frame = _status(kj(k.last_frame) <= qi(q.first_frame), kj(k.first_frame) > qi(q.last_frame))
  order = _status(kj(k.last) <= qi(q.first), kj(k.first) > qi(q.last))
  if spec.kind == 'full':
    status = np.full(frame.shape, _ALL)
  elif spec.kind == 'causal':
    status = order
  elif spec.kind == 'frame_causal_decoder':
    status = frame
  elif k_kind == 0:  # encoder, visual keys
    status = frame
  elif q_kind == 0:  # encoder, visual query → latent key
    status = np.full(frame.shape, _NONE)
  else:  # encoder, latent → latent
    status = order
  return np.where(qi(q.present) & kj(k.present), status, _ABSENT)


@functools.lru_cache(maxsize=64)
def classify_blocks(spec: MaskSpec, q_len: int, kv_len: int, block_q: int, block_k: int,
                    q_offset: int = 0) -> np.ndarray:
  """int8 [ceil(q_len/block_q), ceil(kv_len/block_k)] of EMPTY / PARTIAL / FULL.

  Query i sits at absolute position q_offset + i. Padding rows (beyond q_len) are ignored: they may see any
  key, their outputs are dropped. Padding keys (beyond kv_len) are never allowed, so a block holding some is
  at most PARTIAL.
  """
  spec.check_lengths(q_len, kv_len, q_offset)
  num_q, num_k = -(-q_len // block_q), -(-kv_len // block_k)
  q_starts = q_offset + np.arange(num_q) * block_q
  q_runs = _block_runs(spec, q_starts, np.minimum(q_starts + block_q, q_offset + q_len))
  k_starts = np.arange(num_k) * block_k
  k_runs = _block_runs(spec, k_starts, np.minimum(k_starts + block_k, kv_len))
  statuses = [_pair_status(spec, q_runs, k_runs, a, b) for a in (0, 1) for b in (0, 1)]
  has_padding_keys = (k_starts + block_k > kv_len)[None, :]
  statuses.append(np.broadcast_to(np.where(has_padding_keys, _NONE, _ABSENT), (num_q, num_k)))
  stacked = np.stack(statuses)
  present = stacked != _ABSENT
  all_true = np.all((stacked == _ALL) | ~present, axis=0)
  none_true = np.all((stacked == _NONE) | ~present, axis=0)
  classes = np.where(all_true, FULL, np.where(none_true, EMPTY, PARTIAL)).astype(np.int8)
  classes.flags.writeable = False
  return classes


@dataclasses.dataclass(frozen=True)
class BlockLists:
  """For each row block, the column blocks to visit: full ones first, then partial ones (padded with 0)."""
  full: np.ndarray  # int32 [rows, cols]
  num_full: np.ndarray  # int32 [rows]
  partial: np.ndarray
  num_partial: np.ndarray

  @property
  def visited(self) -> int:
    return int(self.num_full.sum() + self.num_partial.sum())


def block_lists(classes: np.ndarray, *, all_partial: bool = False) -> BlockLists:
  """Compacts a [rows, cols] classification into visit lists; `all_partial` masks every non-empty block
  (a runtime key mask such as `kv_valid` can make any block partial)."""
  full = (classes == FULL) & (not all_partial)
  partial = (classes == PARTIAL) | ((classes == FULL) & all_partial)

  def compact(selected):
    order = np.argsort(~selected, axis=1, kind='stable').astype(np.int32)
    count = selected.sum(axis=1).astype(np.int32)
    return np.where(np.arange(selected.shape[1])[None, :] < count[:, None], order, 0).astype(np.int32), count

  full_list, num_full = compact(full)
  partial_list, num_partial = compact(partial)
  return BlockLists(full_list, num_full, partial_list, num_partial)


def skipped_fraction(classes: np.ndarray) -> float:
  return float(np.mean(classes == EMPTY))
