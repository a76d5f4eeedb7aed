"""LanDiff's video semantic tokenizer (reference landiff-official.md §3.3–3.7), channels last.

Encoder: Theia features [B, T, 30, 45, 768] → 1×1 patch embedding → sequence [visual T·1350 ; 330 I-frame
queries ; 74 P-frame queries × (T−1)] → ln_pre → pre-norm blocks (bias-free q/k/v/o, exact-GELU MLP, 3D RoPE with
positions (t, h, w) for visual tokens and (n, n, n) for query n, the frame-causal encoder mask) → the query outputs
→ ln_post → proj_out → vector quantizer → ids [B, 330 + (T−1)·74].
Decoder: ids → codes → project_out → decoder_embed; a shared mask token in every visual position; the decoder mask;
visual outputs → ln_post → Linear → tanh → Linear → features [B, T, 30, 45, 768].

Numerics follow the release's bf16 autocast: with `dtype=bfloat16` the matmuls (and attention) run in bf16, while
every LayerNorm returns float32 (autocast runs layer_norm in fp32), so the residual stream — ln_pre's output plus
bf16 block updates, promoted — stays float32 through every block; the quantizer works in float32.

Clips longer than one group (13 frames) are split into independent groups of 13 (as the paper and long-video
generation need); `grouping='single'` encodes the whole clip as one sequence, which is what the released code does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from landiff_jax.models.quantizer import VectorQuantizer
from landiff_jax.nn import (Dense, LayerNorm, MaskSpec, Mlp, VideoTokenLayout, apply_rope, attention, constrain,
                            rope_3d_frequencies, scan_layers, video_token_positions)

Array = jax.Array
SEQUENCE_AXES = ('batch', 'length', 'act_embed')


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
  feature_dim: int
  frames_per_group: int
  grid: tuple[int, int]
  num_iframe_tokens: int
  num_pframe_tokens: int
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float
  qkv_bias: bool
  token_size: int
  decoder_ffn_dim: int
  rope_theta: float
  rope_multiple: int
  codebook_size: int
  codebook_dim: int

  @classmethod
  def from_config(cls, c: Any) -> TokenizerSettings:
    return cls(int(c.feature_dim), int(c.frames_per_group), tuple(int(g) for g in c.feature_grid),
               int(c.num_iframe_tokens), int(c.num_pframe_tokens), int(c.width), int(c.num_layers), int(c.num_heads),
               int(c.width * c.mlp_ratio), float(c.layer_norm_eps), bool(c.qkv_bias), int(c.token_size),
               int(c.decoder_ffn_dim), float(c.rope.theta), int(c.rope.multiple), int(c.quantizer.codebook_size),
               int(c.quantizer.codebook_dim))

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def tokens_per_frame(self) -> int:
    return self.grid[0] * self.grid[1]

  def num_tokens(self, frames: int) -> int:
    return self.num_iframe_tokens + (frames - 1) * self.num_pframe_tokens

  def frames_of(self, num_tokens: int) -> int:
    extra = num_tokens - self.num_iframe_tokens
    if extra < 0 or extra % self.num_pframe_tokens:
      raise ValueError(f'{num_tokens} tokens is not a whole group: a group of T frames has '
                       f'{self.num_iframe_tokens} + (T−1)·{self.num_pframe_tokens} tokens.')
    return 1 + extra // self.num_pframe_tokens

  def layout(self, frames: int) -> VideoTokenLayout:
    return VideoTokenLayout(frames, self.tokens_per_frame, self.num_iframe_tokens, self.num_pframe_tokens)


def rope_angles(s: TokenizerSettings, frames: int) -> Array:
  positions = video_token_positions(frames, *s.grid, s.num_tokens(frames))
  p = jnp.asarray(positions, jnp.float32)
  return rope_3d_frequencies(p[:, 0], p[:, 1], p[:, 2], s.head_dim, s.rope_theta, s.rope_multiple)


class Block(nn.Module):
  """Pre-norm residual attention block with 3D RoPE on q and k and a frame-causal mask."""
  settings: TokenizerSettings
  mask: MaskSpec
  backend: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, angles: Array) -> tuple[Array, None]:
    s = self.settings
    proj = functools.partial(Dense, (s.num_heads, s.head_dim), use_bias=s.qkv_bias, kernel_axes=('embed', 'heads', 'kv'),
                             dtype=self.dtype)
    h = LayerNorm(s.layer_norm_eps, dtype=jnp.float32, name='ln_1')(x)
    q = apply_rope(proj(name='wq')(h), angles)
    k = apply_rope(proj(name='wk')(h), angles)
    v = proj(name='wv')(h)
    out = attention(q, k, v, self.mask, backend=self.backend)
    x = x + Dense(s.width, axis=(-2, -1), use_bias=s.qkv_bias, kernel_axes=('heads', 'kv', 'embed'), dtype=self.dtype,
                  name='wo')(out)
    x = x + Mlp(s.mlp_dim, activation='gelu', dtype=self.dtype, name='mlp')(
        LayerNorm(s.layer_norm_eps, dtype=jnp.float32, name='ln_2')(x))
    return constrain(x, SEQUENCE_AXES), None


def transformer(s: TokenizerSettings, mask: MaskSpec, backend: str, dtype: Any, remat_policy: str = 'none'):
  return scan_layers(Block, s.num_layers, s, mask, backend, dtype, remat_policy=remat_policy, name='transformer')


class TokenizerEncoder(nn.Module):
  settings: TokenizerSettings
  backend: str = 'auto'
  remat_policy: str = 'none'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Array) -> Array:
    """Features [B, T, h, w, feature_dim] → pre-quantization latents [B, N, token_size]."""
    s = self.settings
    b, frames = features.shape[:2]
    visual = Dense(s.width, kernel_axes=(None, 'embed'), dtype=self.dtype, name='patch_embed')(
        features.astype(self.dtype)).reshape(b, -1, s.width)
    init = nn.initializers.normal(s.width**-0.5)
    iframe = self.param('iframe_queries', nn.with_logical_partitioning(init, (None, 'embed')),
                        (s.num_iframe_tokens, s.width))
    pframe = self.param('pframe_queries', nn.with_logical_partitioning(init, (None, 'embed')),
                        (s.num_pframe_tokens, s.width))
    queries = jnp.concatenate([iframe, jnp.tile(pframe, (frames - 1, 1))], axis=0).astype(jnp.float32)
    x = jnp.concatenate([visual.astype(jnp.float32), jnp.broadcast_to(queries, (b,) + queries.shape)], axis=1)
    x = LayerNorm(s.layer_norm_eps, dtype=jnp.float32, name='ln_pre')(x)
    mask = MaskSpec.encoder(s.layout(frames))
    x, _ = transformer(s, mask, self.backend, self.dtype, self.remat_policy)(x, rope_angles(s, frames))
    latents = LayerNorm(s.layer_norm_eps, dtype=jnp.float32, name='ln_post')(x[:, frames * s.tokens_per_frame:])
    return Dense(s.token_size, kernel_axes=('embed', None), dtype=self.dtype, name='proj_out')(latents)


class TokenizerDecoder(nn.Module):
  settings: TokenizerSettings
  backend: str = 'auto'
  remat_policy: str = 'none'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latents: Array) -> Array:
    """Quantized latents [B, N, token_size] → features [B, T, h, w, feature_dim] (float32)."""
    s = self.settings
    b, n = latents.shape[:2]
    frames = s.frames_of(n)
    latents = Dense(s.width, kernel_axes=(None, 'embed'), dtype=self.dtype, name='decoder_embed')(
        latents.astype(self.dtype))
    mask_token = self.param('mask_token', nn.with_logical_partitioning(nn.initializers.normal(s.width**-0.5),
                                                                       ('embed',)), (s.width,))
    visual = jnp.broadcast_to(mask_token.astype(jnp.float32), (b, frames * s.tokens_per_frame, s.width))
    x = jnp.concatenate([visual, latents.astype(jnp.float32)], axis=1)
    x = LayerNorm(s.layer_norm_eps, dtype=jnp.float32, name='ln_pre')(x)
    mask = MaskSpec.decoder(s.layout(frames))
    x, _ = transformer(s, mask, self.backend, self.dtype, self.remat_policy)(x, rope_angles(s, frames))
    x = LayerNorm(s.layer_norm_eps, dtype=jnp.float32, name='ln_post')(x[:, :frames * s.tokens_per_frame])
    x = jnp.tanh(Dense(s.decoder_ffn_dim, kernel_axes=('embed', 'mlp'), dtype=self.dtype, name='ffn_in')(x))
    x = Dense(s.feature_dim, kernel_axes=('mlp', None), dtype=self.dtype, name='ffn_out')(x)
    return x.astype(jnp.float32).reshape(b, frames, *s.grid, s.feature_dim)


class VideoTokenizer(nn.Module):
  """Encoder + quantizer + decoder. Methods: `encode_group`, `decode_group`, `__call__` (reconstruction)."""
  settings: TokenizerSettings
  backend: str = 'auto'
  remat_policy: str = 'none'
  dtype: Any = jnp.float32

  def setup(self):
    s = self.settings
    common = dict(backend=self.backend, remat_policy=self.remat_policy, dtype=self.dtype)
    self.encoder = TokenizerEncoder(s, **common)
    self.quantizer = VectorQuantizer(s.codebook_size, s.codebook_dim, s.token_size)
    self.decoder = TokenizerDecoder(s, **common)

  def encode_group(self, features: Array) -> Array:
    """Features of one group [B, T ≤ 13, h, w, C] → ids [B, 330 + (T−1)·74]."""
    return self.quantizer.indices(self.encoder(features))

  def decode_group(self, ids: Array) -> Array:
    return self.decoder(self.quantizer.embed(ids))

  def __call__(self, features: Array) -> dict[str, Array]:
    """Reconstruction through the straight-through quantizer (training)."""
    quantized = self.quantizer(self.encoder(features))
    return dict(quantized, reconstruction=self.decoder(quantized['quantized']))

  def init_params(self, rng: Array, frames: int = 2) -> Any:
    s = self.settings
    return self.init(rng, jnp.zeros((1, frames, *s.grid, s.feature_dim)))


def build_tokenizer(config: Any, *, dtype: Any = jnp.float32, attention_backend: str = 'auto',
                    remat_policy: str = 'none') -> VideoTokenizer:
  """The tokenizer of a `tokenizer` config section."""
  return VideoTokenizer(TokenizerSettings.from_config(config), attention_backend, remat_policy, jnp.dtype(dtype))


# ---------------------------------------------------------------------------------------------------------------------
# Whole clips


def group_spans(frames: int, group: int, grouping: str = 'groups') -> list[tuple[int, int]]:
  """Frame spans encoded as one sequence each: independent groups of `group` frames (the last may be shorter), or
  the whole clip (`grouping='single'`, the released code's behaviour)."""
  if frames < 1:
    raise ValueError('the clip has no frames.')
  if grouping == 'single':
    return [(0, frames)]
  if grouping != 'groups':
    raise ValueError(f"grouping must be 'groups' or 'single', not {grouping!r}.")
  return [(start, min(start + group, frames)) for start in range(0, frames, group)]


def check_features(model: VideoTokenizer, features: Any) -> None:
  s = model.settings
  want = (*s.grid, s.feature_dim)
  if features.ndim != 5 or tuple(features.shape[2:]) != want:
    raise ValueError(f'features must be [batch, frames, {want[0]}, {want[1]}, {want[2]}] (Theia output, channels '
                     f'last); got {tuple(features.shape)}.')
  if features.shape[1] == 0:
    raise ValueError('features have an empty time axis.')


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_group(model: VideoTokenizer, params: Any, features: Array) -> Array:
  return model.apply(params, features, method=VideoTokenizer.encode_group)


@functools.partial(jax.jit, static_argnums=(0,))
def _decode_group(model: VideoTokenizer, params: Any, ids: Array) -> Array:
  return model.apply(params, ids, method=VideoTokenizer.decode_group)


def encode_features(model: VideoTokenizer, params: Any, features: Array, grouping: str = 'groups') -> Array:
  """Theia features [B, T, h, w, C] → ids [B, N]: groups of `frames_per_group` frames, ids concatenated."""
  check_features(model, features)
  spans = group_spans(features.shape[1], model.settings.frames_per_group, grouping)
  return jnp.concatenate([_encode_group(model, params, features[:, a:b]) for a, b in spans], axis=1)


def split_ids(model: VideoTokenizer, num_tokens: int, frames: int | None = None,
              grouping: str = 'groups') -> list[tuple[int, int]]:
  """Token spans of the groups of a clip with `num_tokens` ids (full groups, then one shorter group)."""
  s = model.settings
  if grouping == 'single':
    return [(0, num_tokens)]
  full = s.num_tokens(s.frames_per_group)
  spans, start = [], 0
  while num_tokens - start > full:
    spans.append((start, start + full))
    start += full
  s.frames_of(num_tokens - start)  # validates the last group
  spans.append((start, num_tokens))
  return spans


def decode(model: VideoTokenizer, params: Any, ids: Array, grouping: str = 'groups') -> Array:
  """ids [B, N] → features [B, T, h, w, C] (float32)."""
  ids = jnp.asarray(ids)
  s = model.settings
  if ids.ndim != 2:
    raise ValueError(f'ids must be [batch, tokens]; got shape {tuple(ids.shape)}.')
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f'ids must be integers, got {ids.dtype}.')
  if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= s.codebook_size):
    raise ValueError(f'ids must be in [0, {s.codebook_size}); got values in [{int(ids.min())}, {int(ids.max())}].')
  spans = split_ids(model, ids.shape[1], grouping=grouping)
  return jnp.concatenate([_decode_group(model, params, ids[:, a:b].astype(jnp.int32)) for a, b in spans], axis=1)


def num_tokens_for(model: VideoTokenizer, frames: int, grouping: str = 'groups') -> int:
  s = model.settings
  return sum(s.num_tokens(b - a) for a, b in group_spans(frames, s.frames_per_group, grouping))

