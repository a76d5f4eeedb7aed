"""Attention masks as descriptions: a rule plus per-token metadata, evaluated wherever a kernel needs it.

Callers never build [L, L] arrays. `MaskSpec` is hashable, so it can be a static argument of `jax.jit`;
`MaskSpec.allowed` evaluates the rule on index arrays (per block in a kernel, numpy or jax), and
`MaskSpec.materialize` builds the dense boolean matrix for tests and host-side mask building.

Video tokenizer sequence (LanDiff TiTok encoder/decoder):
  [visual tokens, T frames × F tokens ; I-frame latents (I) ; P-frame latents, P per frame for frames 1..T−1]
Each token has a frame: visual token q → q // F, I latents → 0, P latents of group g → g.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MASK_KINDS = ('full', 'causal', 'frame_causal_encoder', 'frame_causal_decoder')


class TokenMetadata(NamedTuple):
  frame: np.ndarray  # int32 [L]
  is_latent: np.ndarray  # int32 [L], 0 or 1


@dataclasses.dataclass(frozen=True)
class VideoTokenLayout:
  """Token counts of the tokenizer sequence `[visual T·F ; I latents ; P latents × (T−1)]`."""
  num_frames: int
  tokens_per_frame: int
  num_iframe_tokens: int
  num_pframe_tokens: int

  def __post_init__(self):
    for name in ('num_frames', 'tokens_per_frame', 'num_iframe_tokens', 'num_pframe_tokens'):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f'VideoTokenLayout.{name} must be a non-negative int, got {value!r}.')
    if self.num_frames < 1 or self.tokens_per_frame < 1:
      raise ValueError(f'VideoTokenLayout needs at least one frame and one token per frame, got {self}.')

  @property
  def num_visual_tokens(self) -> int:
    return self.num_frames * self.tokens_per_frame

  @property
  def num_latent_tokens(self) -> int:
    return self.num_iframe_tokens + (self.num_frames - 1) * self.num_pframe_tokens

  @property
  def length(self) -> int:
    return self.num_visual_tokens + self.num_latent_tokens

  def token_metadata(self) -> TokenMetadata:
    return _token_metadata(self)

  def frame_of(self, position, xp=np):
    """Frame of each absolute position, by arithmetic (no table lookup, so it also runs inside TPU kernels).

    Positions outside [0, length) get frame -1. Exact in float32 for any realistic length (< 2^22 tokens).
    """
    position = xp.asarray(position)
    as_float = position.astype(xp.float32) + 0.5
    visual = xp.floor(as_float / self.tokens_per_frame)
    first_pframe = self.num_visual_tokens + self.num_iframe_tokens
    pframe = 1 + xp.floor((as_float - first_pframe) / max(self.num_pframe_tokens, 1))
    frame = xp.where(position < self.num_visual_tokens, visual, xp.where(position < first_pframe, 0.0, pframe))
    return xp.where((position >= 0) & (position < self.length), frame, -1.0).astype(xp.int32)


@functools.lru_cache(maxsize=16)
def _token_metadata(layout: VideoTokenLayout) -> TokenMetadata:
  position = np.arange(layout.length)
  frame = layout.frame_of(position)
  is_latent = (position >= layout.num_visual_tokens).astype(np.int32)
  frame.flags.writeable = False
  is_latent.flags.writeable = False
  return TokenMetadata(frame=frame, is_latent=is_latent)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Which keys each query may attend to, by rule.

  - full: everything.
  - causal: k ≤ q (q is the absolute position; with a KV cache, queries start at `q_offset`).
  - frame_causal_encoder: visual q → visual k with frame_k ≤ frame_q;
    latent q → (visual k with frame_k ≤ frame_q) or (latent k with k ≤ q).
  - frame_causal_decoder: frame_k ≤ frame_q for every pair.
  """
  kind: str = 'full'
  layout: VideoTokenLayout | None = None

  def __post_init__(self):
    if self.kind not in MASK_KINDS:
      raise ValueError(f'Unknown mask kind {self.kind!r}; valid kinds: {MASK_KINDS}.')
    if self.is_frame_causal != (self.layout is not None):
      raise ValueError(f'Mask kind {self.kind!r} ' +
                       ('needs a VideoTokenLayout.' if self.is_frame_causal else 'takes no layout.'))

  @classmethod
  def full(cls) -> MaskSpec:
    return cls('full')

  @classmethod
  def causal(cls) -> MaskSpec:
    return cls('causal')

  @classmethod
  def encoder(cls, layout: VideoTokenLayout) -> MaskSpec:
    return cls('frame_causal_encoder', layout)

  @classmethod
  def decoder(cls, layout: VideoTokenLayout) -> MaskSpec:
    return cls('frame_causal_decoder', layout)

  @property
  def is_frame_causal(self) -> bool:
    return self.kind.startswith('frame_causal')

  def check_lengths(self, q_len: int, kv_len: int, q_offset=0) -> None:
    """Raises ValueError when a frame-causal spec meets a sequence of another length than its layout."""
    if not self.is_frame_causal:
      return
    length = self.layout.length
    if kv_len != length:
      raise ValueError(f'{self.kind} mask: key/value length {kv_len} differs from the layout length {length} '
                       f'({self.layout}).')
    if isinstance(q_offset, (int, np.integer)) and q_offset + q_len > length:
      raise ValueError(f'{self.kind} mask: query positions up to {q_offset + q_len} exceed the layout length '
                       f'{length} ({self.layout}).')

  def allowed(self, q_index, k_index):
    """Boolean, broadcast of q_index and k_index (absolute token positions).

    numpy / Python ints in → numpy out (host-side mask building, e.g. per-block masks for kernels); any jax array
    in → jax array out. For frame-causal kinds, positions outside [0, layout.length) are never allowed (the
    padding of blocked kernels).
    """
    xp = jnp if isinstance(q_index, jax.Array) or isinstance(k_index, jax.Array) else np
    q_index, k_index = xp.asarray(q_index), xp.asarray(k_index)
    shape = np.broadcast_shapes(q_index.shape, k_index.shape)
    if self.kind == 'full':
      return xp.ones(shape, bool)
    if self.kind == 'causal':
      return k_index <= q_index
    meta = self.layout.token_metadata()
    length = self.layout.length
    in_range = (q_index >= 0) & (q_index < length) & (k_index >= 0) & (k_index < length)
    q_clipped, k_clipped = xp.clip(q_index, 0, length - 1), xp.clip(k_index, 0, length - 1)
    frame, is_latent = xp.asarray(meta.frame), xp.asarray(meta.is_latent).astype(bool)
    rule = self.rule(q_index, k_index, frame[q_clipped], frame[k_clipped], is_latent[q_clipped],
                     is_latent[k_clipped])
    return in_range & rule

  def rule(self, q_index, k_index, q_frame, k_frame, q_latent, k_latent):
    """The mask rule on positions and per-token metadata (frame, is-latent), broadcast; no range checks.

    This is the single statement of each rule: `allowed` gathers the metadata and calls it, the attention
    kernels load the metadata of a block and call it on partial blocks.
    """
    if self.kind == 'full':
      xp = jnp if isinstance(q_index, jax.Array) or isinstance(k_index, jax.Array) else np
      return xp.ones(np.broadcast_shapes(np.shape(q_index), np.shape(k_index)), bool)
    if self.kind == 'causal':
      return k_index <= q_index
    frame_ok = k_frame <= q_frame
    if self.kind == 'frame_causal_decoder':
      return frame_ok
    visual_key = (k_latent == 0) & frame_ok
    earlier_latent = (q_latent != 0) & (k_latent != 0) & (k_index <= q_index)
    return visual_key | earlier_latent

  def materialize(self, q_len: int, kv_len: int, q_offset=0):
    """Dense bool [q_len, kv_len]; query i sits at absolute position q_offset + i.

    numpy for a concrete q_offset; a jax array when q_offset is traced (KV-cache decoding under jit).
    """
    self.check_lengths(q_len, kv_len, q_offset)
    xp = jnp if isinstance(q_offset, jax.Array) else np
    q_index = q_offset + xp.arange(q_len)[:, None]
    k_index = xp.arange(kv_len)[None, :]
    return xp.broadcast_to(self.allowed(q_index, k_index), (q_len, kv_len))
