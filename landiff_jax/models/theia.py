"""Theia / DeiT-Base/16 features as LanDiff computes them (reference landiff-official.md §3.2,
cogvideox-theia-t5.md §4): the semantic input of the video tokenizer.

uint8 frames → pad to a square with grey 127 (at the bottom for landscape frames, at the right for portrait
ones) → (x − 127.5)/127.5 → 16×16 patch embedding → [CLS; patches] + position table, the pretrained 14×14 patch
table resized to the grid with PyTorch's bicubic (A = −0.75, align_corners=False, edge-clamped), computed as two
interpolation matrices on the host (`jax.image.resize` differs) → pre-norm ViT blocks (LayerNorm eps 1e-12, exact
GELU) → final LayerNorm → CLS dropped → the frame's own (H/16, W/16) region of the grid.

Numerics follow the release's bf16 autocast: with `dtype=bfloat16` the patch embedding, projections and attention
run in bf16, while the embeddings sum, every LayerNorm output and so the residual stream stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax.nn import Dense, LayerNorm, MaskSpec, Mlp, attention, constrain, scan_layers

Array = jax.Array
SEQUENCE_AXES = ('batch', 'length', 'act_embed')


@dataclasses.dataclass(frozen=True)
class TheiaSettings:
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  eps: float
  pretrained_grid: int
  pixel_offset: float
  pixel_scale: float
  pad_value: float

  @classmethod
  def from_config(cls, c: Any) -> TheiaSettings:
    return cls(int(c.patch_size), int(c.hidden_size), int(c.num_layers), int(c.num_heads), int(c.mlp_dim),
               float(c.layer_norm_eps), int(c.pretrained_grid), float(c.pixel_offset), float(c.pixel_scale),
               float(c.pad_value))


def cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Weights of the 4 taps (−1, 0, 1, 2) for fractional offsets t, PyTorch's cubic convolution."""
  def near(x):  # |x| ≤ 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=32)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] matrix of `F.interpolate(mode='bicubic', align_corners=False, size=out)` along one axis."""
  scale = np.float32(in_size) / np.float32(out_size)
  real = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  base = np.floor(real)
  weights = cubic_weights((real - base).astype(np.float64))
  matrix = np.zeros((out_size, in_size), np.float64)
  for tap in range(4):
    index = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
    np.add.at(matrix, (np.arange(out_size), index), weights[:, tap])
  return matrix


def resize_position_table(table: Array, grid: int) -> Array:
  """Patch position table [g0, g0, D] → [grid, grid, D] (bicubic as PyTorch)."""
  if table.shape[0] == grid:
    return table
  m = jnp.asarray(bicubic_matrix(table.shape[0], grid), jnp.float32)
  return jnp.einsum('oh,hwd,pw->opd', m, table.astype(jnp.float32), m, precision=jax.lax.Precision.HIGHEST)


class TheiaBlock(nn.Module):
  settings: TheiaSettings
  backend: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, _: Any = None) -> tuple[Array, None]:
    s = self.settings
    head_dim = s.hidden_size // s.num_heads
    proj = functools.partial(Dense, (s.num_heads, head_dim), kernel_axes=('embed', 'heads', 'kv'), dtype=self.dtype)
    h = LayerNorm(s.eps, dtype=jnp.float32, name='norm1')(x)
    out = attention(proj(name='q')(h), proj(name='k')(h), proj(name='v')(h), MaskSpec.full(), backend=self.backend)
    x = x + Dense(s.hidden_size, axis=(-2, -1), kernel_axes=('heads', 'kv', 'embed'), dtype=self.dtype,
                  name='o')(out)
    x = x + Mlp(s.mlp_dim, activation='gelu', dtype=self.dtype, name='mlp')(
        LayerNorm(s.eps, dtype=jnp.float32, name='norm2')(x))
    return constrain(x, SEQUENCE_AXES), None


class Theia(nn.Module):
  """`apply(params, frames[B, H, W, 3] uint8 or 0..255) -> features[B, H/16, W/16, hidden]` (float32)."""
  settings: TheiaSettings
  backend: str = 'auto'
  remat_policy: str = 'none'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, frames: Array) -> Array:
    s = self.settings
    p = s.patch_size
    if frames.ndim != 4 or frames.shape[-1] != 3:
      raise ValueError(f'frames must be [batch, height, width, 3] RGB; got {tuple(frames.shape)}.')
    b, height, width, _ = frames.shape
    if height % p or width % p:
      raise ValueError(f'frame size {height}x{width} is not a multiple of the patch size {p}; resize or crop it.')
    side = max(height, width)
    x = jnp.pad(frames.astype(jnp.float32), ((0, 0), (0, side - height), (0, side - width), (0, 0)),
                constant_values=s.pad_value)
    x = (x - s.pixel_offset) / s.pixel_scale
    grid = side // p
    patches = x.reshape(b, grid, p, grid, p, 3)
    tokens = Dense(s.hidden_size, axis=(2, 4, 5), kernel_axes=(None, None, None, 'embed'), dtype=self.dtype,
                   name='patch_embed')(patches.astype(self.dtype)).reshape(b, grid * grid, s.hidden_size)
    init = nn.initializers.normal(0.02)
    cls = self.param('cls_token', nn.with_logical_partitioning(init, ('embed',)), (s.hidden_size,))
    cls_position = self.param('cls_position', nn.with_logical_partitioning(init, ('embed',)), (s.hidden_size,))
    table = self.param('position_table', nn.with_logical_partitioning(init, (None, None, 'embed')),
                       (s.pretrained_grid, s.pretrained_grid, s.hidden_size))
    positions = resize_position_table(table, grid).reshape(grid * grid, s.hidden_size)
    first = jnp.broadcast_to((cls + cls_position).astype(jnp.float32), (b, 1, s.hidden_size))
    x = jnp.concatenate([first, tokens.astype(jnp.float32) + positions.astype(jnp.float32)], axis=1)
    x, _ = scan_layers(TheiaBlock, s.num_layers, s, self.backend, self.dtype, remat_policy=self.remat_policy,
                       name='blocks')(x, None)
    x = LayerNorm(s.eps, dtype=jnp.float32, name='final_norm')(x)[:, 1:].reshape(b, grid, grid, s.hidden_size)
    return x[:, :height // p, :width // p].astype(jnp.float32)

  def init_params(self, rng: Array) -> Any:
    return self.init(rng, jnp.zeros((1, self.settings.patch_size, self.settings.patch_size, 3), jnp.uint8))


def build_theia(config: Any, *, dtype: Any = jnp.float32, attention_backend: str = 'auto',
                remat_policy: str = 'none') -> Theia:
  return Theia(TheiaSettings.from_config(config), attention_backend, remat_policy, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0,))
def _features(model: Theia, params: Any, frames: Array) -> Array:
  return model.apply(params, frames)


def features(model: Theia, params: Any, frames: Any, micro_batch: int = 4) -> Array:
  """Features of frames [N, H, W, 3], `micro_batch` frames per call (memory stays flat for long videos)."""
  frames = np.asarray(frames)
  if frames.dtype not in (np.uint8, np.float32, np.float64):
    raise ValueError(f'frames must be uint8 (0..255) or float in [0, 255]; got {frames.dtype}.')
  if frames.ndim != 4 or frames.shape[0] == 0:
    raise ValueError(f'frames must be [N ≥ 1, height, width, 3]; got {frames.shape}.')
  count = len(frames)
  padded = -count % micro_batch  # one shape for every call, so one compilation
  if padded:
    frames = np.concatenate([frames, np.repeat(frames[-1:], padded, axis=0)])
  pieces = [_features(model, params, jnp.asarray(frames[i:i + micro_batch]))
            for i in range(0, len(frames), micro_batch)]
  return jnp.concatenate(pieces, axis=0)[:count]


def video_features(model: Theia, params: Any, frames: Any, micro_batch: int = 4) -> Array:
  """Features of clips [B, T, H, W, 3] → [B, T, H/16, W/16, hidden]: the tokenizer's input."""
  frames = np.asarray(frames)
  if frames.ndim != 5:
    raise ValueError(f'clips must be [batch, frames, height, width, 3]; got {frames.shape}.')
  flat = features(model, params, frames.reshape((-1,) + frames.shape[2:]), micro_batch)
  return flat.reshape(frames.shape[:2] + flat.shape[1:])
