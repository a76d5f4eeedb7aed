"""CogVideoX 3D causal VAE (reference landiff-official.md §6, cogvideox-theia-t5.md §3), channels last.

Every temporal convolution is causal: k−1 frames are padded in front only — copies of the first frame on a
video's first chunk, and afterwards the last k−1 padded-input frames of the previous chunk (its *cache*).
Videos are processed chunk by chunk with those caches carried over, exactly as the release does, and the
chunking is part of the numerics: GroupNorm statistics are taken over one chunk's frames only. A decode of
13 latent frames therefore runs on [0:3], [3:5], …, [11:13] (see `latent_chunks`).

`decode(model, params, latents)` and `encode(model, params, video)` are the entry points: both are jit-compiled,
run the first chunk directly and the remaining equal-sized chunks in one `lax.scan`, so the activations held at
once do not grow with the video's length. Within a chunk, the convolutions run a few frames at a time (see
"Frame tiles"), so that at 480×720 a layer holds little more than its input and output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from landiff_jax.nn.layers import GroupNorm, constrain, group_moments, merge_group_moments, moments_statistics
from landiff_jax.nn.stack import REMAT_POLICIES, recompute_after_cotangent

Array = jax.Array
Cache = dict[str, Any]

# The kernels' output channels have a name of their own, which every config leaves unmapped: the VAE's maps split by
# rows ('act_height' below), never by channels (and the decoder's last convolution has 3 outputs).
CONV_KERNEL_AXES_3D = (None, None, None, 'conv_in', 'vae_conv_out')
CONV_KERNEL_AXES_2D = (None, None, 'conv_in', 'vae_conv_out')
# Feature maps, chunk inputs and caches [B, T, H, W, C]: rows split over the mesh axes 'act_height' maps to (context
# parallelism for training on whole clips; GSPMD exchanges the convolutions' halo rows and all-reduces GroupNorm's
# sums). No-op outside a mesh context and where the rules leave 'act_height' unmapped.
FRAME_AXES = ('batch', None, 'act_height', None, None)


def constrain_frames(tree: Any) -> Any:
  return jax.tree.map(lambda x: constrain(x, FRAME_AXES), tree)


def _checkpoint_policy(remat_policy: str) -> Any:
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f'remat_policy {remat_policy!r} is not one of {REMAT_POLICIES}.')
  return getattr(jax.checkpoint_policies, remat_policy)


# PyTorch's default convolution initialisation: uniform(±1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def _bias(module: nn.Module, features: int) -> Array:
  return module.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(), ('vae_conv_out',)), (features,),
                      jnp.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Resampling helpers


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output position for PyTorch's `interpolate(mode='nearest', size=...)`."""
  if in_size == out_size:
    return np.arange(out_size)
  scale = np.float32(in_size) / np.float32(out_size)
  return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


def nearest_resize(x: Array, size: Sequence[int]) -> Array:
  """Nearest-neighbour resize of axes 1..len(size) of a channels-last tensor; integer factors become repeats."""
  for axis, out_size in enumerate(size, start=1):
    in_size = x.shape[axis]
    if out_size == in_size:
      continue
    if out_size % in_size == 0:
      x = jnp.repeat(x, out_size // in_size, axis=axis)
    else:
      x = jnp.take(x, nearest_indices(in_size, out_size), axis=axis)
  return x


# ---------------------------------------------------------------------------------------------------------------------
# Frame tiles
#
# GroupNorm statistics span a whole chunk, so a layer's input and output are whole-chunk tensors. Everything in
# between (the normalised and activated input, its causal time padding) is computed a few output frames at a time,
# which keeps it to one tile's worth at the release's 480×720. Every output frame is computed from the same values in
# the same order as without tiles. The decoder's upsampled feature maps, the largest tensors of the decode (256
# channels at 480×720 before the last level), are never held whole where the next block narrows them: they are
# `LazyFrames`, computed tile by tile for each pass that reads them (GroupNorm moments together with the narrower
# shortcut, then the first convolution).

Activation = Callable[[Array, Array], Array]  # (frames [B, n, H, W, C], their indices in the chunk [n]) → activated
DEFAULT_TILE_BYTES = 2**28
# Training (a remat policy) runs untiled: under differentiation a tile loop stacks every tile's residuals anyway, and
# XLA allocates each loop's residual stack up front (306 -> 115 GiB for one 49-frame 480x720 clip, CPU plan).
UNTILED = 2**62


def tile_frames(num_frames: int, frame_bytes: int, budget: int) -> int:
  """The largest divisor of `num_frames` whose frames take at most `budget` bytes (at least 1)."""
  return max((n for n in range(1, num_frames + 1) if num_frames % n == 0 and n * frame_bytes <= budget), default=1)


def scan_frame_tiles(tile_fn: Callable[[Any, int, Any], tuple[Array, Any]], state: Any, num_frames: int,
                     tile: int) -> tuple[Array, Any]:
  """`tile_fn(start, tile, state) -> (output frames, state)` for start = 0, tile, 2·tile, …: the outputs concatenated
  along axis 1, and the last state. The first tile (static start) padded to full length is the buffer the others
  are written into, one loop step each, so that XLA finishes a tile before it starts the next."""
  first, state = tile_fn(0, tile, state)
  if tile >= num_frames:
    return first, state
  out = jnp.pad(first, [(0, 0), (0, num_frames - tile)] + [(0, 0)] * (first.ndim - 2))

  def step(i, carry):
    out, state = carry
    frames, state = tile_fn(i * tile, tile, state)
    return lax.dynamic_update_slice_in_dim(out, frames, i * tile, axis=1), state

  return lax.fori_loop(1, num_frames // tile, step, (out, state))


@dataclasses.dataclass(frozen=True)
class LazyFrames:
  """A chunk's feature map that is never held whole: `read(start, count)` computes frames [start, start + count)
  (start may be traced, count is static); computing one frame takes about `frame_bytes` of temporaries."""
  shape: tuple[int, ...]
  dtype: Any
  read: Callable[[Any, int], Array]
  frame_bytes: int


Frames = Array | LazyFrames


def read_frames(x: Frames, start: Any, count: int) -> Array:
  if isinstance(x, LazyFrames):
    return x.read(start, count)
  return lax.dynamic_slice_in_dim(x, start, count, axis=1)


def frame_bytes(x: Frames, features: int, dtype: Any) -> int:
  """Bytes of one frame of a layer reading `x` and writing `features` channels in `dtype` (sizes its tiles)."""
  _, _, h, w, c = x.shape
  own = h * w * max(c, features) * jnp.dtype(dtype).itemsize
  return max(own, x.frame_bytes) if isinstance(x, LazyFrames) else own


def map_frames_with_moments(x: LazyFrames, fn: Callable[[Array], Array], num_groups: int,
                            tile_bytes: int) -> tuple[Array, tuple[Array, Array]]:
  """One pass over `x`'s frames in tiles: fn of every frame (held whole), and x's GroupNorm statistics."""

  def tile(start, count, moments):
    frames = x.read(start, count)
    return fn(frames), merge_group_moments(moments, group_moments(frames, num_groups))

  num_frames = x.shape[1]
  out, moments = scan_frame_tiles(tile, None, num_frames, tile_frames(num_frames, x.frame_bytes, tile_bytes))
  return out, moments_statistics(moments)


def latent_frame_sources(latent_frames: int, frames: int) -> np.ndarray:
  """The latent frame each of a feature map's frames is conditioned on (frame 0 on its own when T is odd and > 1)."""
  if frames > 1 and frames % 2 == 1:
    return np.concatenate([[0], 1 + nearest_indices(latent_frames - 1, frames - 1)])
  return nearest_indices(latent_frames, frames)


def upsampled_frame_sources(frames: int, compress_time: bool) -> np.ndarray:
  """The input frame of each output frame of a time upsampling (frame 0 kept single when T is odd)."""
  if not compress_time or frames == 1:
    return np.arange(frames)
  if frames % 2:
    return np.concatenate([[0], 1 + np.arange(2 * (frames - 1)) // 2])
  return np.arange(2 * frames) // 2


# ---------------------------------------------------------------------------------------------------------------------
# Layers
#
# Layers used inside frame tiles are called with their input's channel count and return the layer as a function:
# Flax modules cannot be called inside the tiles' loop, their parameters can.


CONV3D_MODES = ('auto', 'native', 'taps')


def _conv3d_valid(x: Array, kernel: Array, precision: Any, mode: str = 'auto') -> Array:
  """Valid in time, same in space. `mode` 'native' is one 3D convolution (what GPUs and TPUs run), 'taps' the sum
  of 2D convolutions below, 'auto' taps on CPU only."""
  if mode not in CONV3D_MODES:
    raise ValueError(f'conv3d {mode!r} is not one of {CONV3D_MODES}.')
  if mode == 'taps' or (mode == 'auto' and jax.default_backend() == 'cpu'):
    return _conv3d_as_conv2d(x, kernel, precision)
  pad = kernel.shape[1] // 2
  return lax.conv_general_dilated(x, kernel, window_strides=(1, 1, 1), padding=((0, 0), (pad, pad), (pad, pad)),
                                  dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'), precision=precision)


def _conv3d_as_conv2d(x: Array, kernel: Array, precision: Any) -> Array:
  """The valid-in-time, same-in-space 3D convolution as the sum over the kernel's k time taps of 2D convolutions of
  the time-shifted inputs. XLA:CPU has no fast 3D convolution: this is about 5× faster there (same sums,
  reassociated); taking each tap from a slice, never from a stacked copy, keeps the memory at the input's."""
  k, _, _, c, features = kernel.shape
  b, t, h, w, _ = x.shape
  frames = t - k + 1
  y = None
  for i in range(k):
    tap = lax.conv_general_dilated(x[:, i:i + frames].reshape(b * frames, h, w, c), kernel[i], window_strides=(1, 1),
                                   padding=((k // 2, k // 2),) * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   precision=precision)
    y = tap if y is None else y + tap
  return y.reshape(b, frames, h, w, features)


class CausalConv3d(nn.Module):
  """Conv3d of act(x) with k−1 frames of causal front padding (first-frame copies, or the previous chunk's cache),
  computed in frame tiles; a `residual` (shaped like the output) is added."""
  features: int
  kernel_size: int = 3
  dtype: Any = jnp.float32
  precision: Any = None
  tile_bytes: int = DEFAULT_TILE_BYTES
  conv3d: str = 'auto'

  @nn.compact
  def __call__(self, x: Frames, act: Activation | None = None, cache: Array | None = None,
               residual: Array | None = None) -> tuple[Array, Array]:
    k = self.kernel_size
    kernel = self.param('kernel', nn.with_logical_partitioning(torch_default_init, CONV_KERNEL_AXES_3D),
                        (k, k, k, x.shape[-1], self.features), jnp.float32).astype(self.dtype)
    bias = _bias(self, self.features).astype(self.dtype)
    act = act or (lambda frames, index: frames)
    activated = lambda frames, index: act(frames, index).astype(self.dtype)
    if cache is None:
      cache = jnp.repeat(activated(read_frames(x, 0, 1), jnp.zeros(1, jnp.int32)), k - 1, axis=1)
    cache = cache.astype(self.dtype)

    def tile(start, count, cache):  # a chunk's tiles carry the causal cache from one to the next, like chunks do
      frames = activated(read_frames(x, start, count), start + jnp.arange(count))
      window = jnp.concatenate([cache, frames], axis=1)
      y = _conv3d_valid(window, kernel, self.precision, self.conv3d) + bias
      if residual is not None:
        y = y + lax.dynamic_slice_in_dim(residual, start, count, axis=1)
      return y, window[:, -(k - 1):]

    t = x.shape[1]
    frames = tile_frames(t, frame_bytes(x, self.features, self.dtype), self.tile_bytes)
    return scan_frame_tiles(tile, cache, t, frames)


class PointwiseConv(nn.Module):
  """A 1×1×1 convolution (a per-position dense layer); PyTorch stores it as an (out, in, 1, 1, 1) Conv3d."""
  features: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, in_features: int) -> Callable[[Array], Array]:
    kernel = self.param('kernel', nn.with_logical_partitioning(torch_default_init, ('conv_in', 'vae_conv_out')),
                        (in_features, self.features), jnp.float32).astype(self.dtype)
    bias = _bias(self, self.features).astype(self.dtype)
    return lambda x: jnp.einsum('...i,io->...o', x.astype(self.dtype), kernel, precision=self.precision) + bias


class FrameConv2d(nn.Module):
  """A Conv2d applied to every frame independently (the VAE's resampling convolutions)."""
  features: int
  stride: int = 1
  padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, in_features: int) -> Callable[[Array], Array]:
    kernel = self.param('kernel', nn.with_logical_partitioning(torch_default_init, CONV_KERNEL_AXES_2D),
                        (3, 3, in_features, self.features), jnp.float32).astype(self.dtype)
    bias = _bias(self, self.features).astype(self.dtype)

    def conv(x):
      b, t = x.shape[:2]
      frames = x.reshape((b * t,) + x.shape[2:]).astype(self.dtype)
      y = lax.conv_general_dilated(frames, kernel, window_strides=(self.stride, self.stride), padding=self.padding,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)
      y = y + bias
      return y.reshape((b, t) + y.shape[1:])

    return conv


class SpatialNorm3D(nn.Module):
  """GroupNorm(f) · conv_y(z') + conv_b(z'), z' the latent chunk resized to f (no "1 +"); returns it as an
  Activation of f's frames.

  conv_y and conv_b are 1×1×1, so they commute with the nearest resize: they run at latent resolution and the
  result is resized, which gives the same values at a fraction of the cost.
  """
  features: int
  num_groups: int
  eps: float = 1e-6
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, f: Frames, z: Array, statistics: Any = None) -> Activation:
    conv = functools.partial(PointwiseConv, self.features, dtype=self.dtype, precision=self.precision)
    gain = conv(name='conv_y')(z.shape[-1])(z)
    shift = conv(name='conv_b')(z.shape[-1])(z)
    normalize = GroupNorm(self.num_groups, self.eps, dtype=self.dtype, name='norm_layer').normalizer(f, statistics)
    sources = jnp.asarray(latent_frame_sources(z.shape[1], f.shape[1]))
    height, width = f.shape[2:4]

    def norm(frames, index):
      resized = lambda m: nearest_resize(jnp.take(m, sources[index], axis=1), (len(index), height, width))
      return normalize(frames) * resized(gain) + resized(shift)

    return norm


def silu_of(norm: Activation) -> Activation:
  return lambda frames, index: nn.silu(norm(frames, index))


class ResnetBlock3D(nn.Module):
  """norm → SiLU → causal conv, twice, plus a 1×1×1 shortcut when the width changes.

  With `spatial_norm` (the decoder) the norms are SpatialNorm3D conditioned on the latent chunk `z`. The input may be
  `LazyFrames`: one pass then computes its statistics and its shortcut, a second one the first convolution.
  """
  features: int
  num_groups: int
  eps: float = 1e-6
  spatial_norm: bool = False
  dtype: Any = jnp.float32
  precision: Any = None
  tile_bytes: int = DEFAULT_TILE_BYTES
  conv3d: str = 'auto'

  def norm(self, name: str, x: Frames, z: Array | None, statistics: Any = None) -> Activation:
    if self.spatial_norm:
      return SpatialNorm3D(x.shape[-1], self.num_groups, self.eps, dtype=self.dtype, precision=self.precision,
                           name=name)(x, z, statistics)
    normalize = GroupNorm(self.num_groups, self.eps, dtype=self.dtype, name=name).normalizer(x, statistics)
    return lambda frames, index: normalize(frames)

  @nn.compact
  def __call__(self, x: Frames, z: Array | None, cache: Cache | None) -> tuple[Array, Cache]:
    cache = cache or {}
    conv = functools.partial(CausalConv3d, self.features, 3, dtype=self.dtype, precision=self.precision,
                             tile_bytes=self.tile_bytes, conv3d=self.conv3d)
    shortcut = lambda frames: frames.astype(self.dtype)
    if x.shape[-1] != self.features:
      shortcut = PointwiseConv(self.features, dtype=self.dtype, precision=self.precision,
                               name='conv_shortcut')(x.shape[-1])
    residual = statistics = None
    if isinstance(x, LazyFrames):
      residual, statistics = map_frames_with_moments(x, shortcut, self.num_groups, self.tile_bytes)
      if x.shape[-1] == self.features:
        x = residual  # an identity shortcut has just held every frame: read them instead of computing them again
    h, cache1 = conv(name='conv1')(x, silu_of(self.norm('norm1', x, z, statistics)), cache.get('conv1'))
    if residual is None:
      residual = shortcut(x)
    h, cache2 = conv(name='conv2')(h, silu_of(self.norm('norm2', h, z)), cache.get('conv2'), residual)
    return h, {'conv1': cache1, 'conv2': cache2}


def resnet_block(remat_policy: str) -> type[ResnetBlock3D]:
  """ResnetBlock3D, rematerialised under `remat_policy` (a `jax.checkpoint_policies` name) unless 'none'."""
  if remat_policy == 'none':
    return ResnetBlock3D
  return nn.remat(ResnetBlock3D, policy=_checkpoint_policy(remat_policy))


def call_resnet(parent: nn.Module, block: nn.Module, *args: Any) -> tuple[Array, Cache]:
  """`block(*args)` in `parent` (an Encoder3D or Decoder3D); with a remat policy the block recomputes in the
  backward pass once its output's cotangent exists (`recompute_after_cotangent`: a plain `nn.remat` outside a scan
  saves nothing on XLA:CPU, whose CSE merges the recomputation into the forward pass)."""
  if parent.remat_policy == 'none' or parent.is_initializing():
    return block(*args)
  return constrain_frames(recompute_after_cotangent(block, *args))


class Upsample3D(nn.Module):
  """Nearest ×2 (in time too when `compress_time`, frame 0 kept single when T is odd), then a per-frame 3×3 conv;
  in frame tiles, or as `LazyFrames` when `lazy`."""
  features: int
  compress_time: bool
  dtype: Any = jnp.float32
  precision: Any = None
  tile_bytes: int = DEFAULT_TILE_BYTES
  lazy: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Frames:
    b, t, h, w, c = x.shape
    conv = FrameConv2d(self.features, dtype=self.dtype, precision=self.precision, name='conv')(c)
    sources = jnp.asarray(upsampled_frame_sources(t, self.compress_time))

    def read(start, count):
      frames = jnp.take(x, lax.dynamic_slice_in_dim(sources, start, count), axis=1)
      return conv(nearest_resize(frames, (count, 2 * h, 2 * w)))

    one_frame = 4 * h * w * max(c, self.features) * jnp.dtype(self.dtype).itemsize
    if self.lazy:
      return LazyFrames((b, len(sources), 2 * h, 2 * w, self.features), jnp.dtype(self.dtype), read, one_frame)
    frames = tile_frames(len(sources), one_frame, self.tile_bytes)
    return scan_frame_tiles(lambda start, count, state: (read(start, count), state), None, len(sources), frames)[0]


class Downsample3D(nn.Module):
  """Average pairs of frames (frame 0 kept single when T is odd) when `compress_time`, then a stride-2 3×3 conv
  with one row/column of zero padding at the bottom/right."""
  features: int
  compress_time: bool
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.compress_time and x.shape[1] > 1:
      first, rest = (x[:, :1], x[:, 1:]) if x.shape[1] % 2 else (x[:, :0], x)
      pooled = (rest[:, 0::2] + rest[:, 1::2]) / 2
      x = jnp.concatenate([first, pooled], axis=1)
    return FrameConv2d(self.features, stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                       precision=self.precision, name='conv')(x.shape[-1])(x)


# ---------------------------------------------------------------------------------------------------------------------
# Encoder and decoder


class Encoder3D(nn.Module):
  """Video chunk [B, T, H, W, 3] → posterior moments [B, T', H/8, W/8, 2·latent] (mean, then log-variance)."""
  latent_channels: int
  block_channels: tuple[int, ...]
  num_res_blocks: int
  num_groups: int
  eps: float
  temporal_compress_levels: int
  dtype: Any = jnp.float32
  precision: Any = None
  tile_bytes: int = DEFAULT_TILE_BYTES
  conv3d: str = 'auto'
  remat_policy: str = 'none'

  @nn.compact
  def __call__(self, x: Array, cache: Cache | None = None) -> tuple[Array, Cache]:
    cache = cache or {}
    new: Cache = {}
    common = dict(dtype=self.dtype, precision=self.precision)
    tiled = dict(common, tile_bytes=self.tile_bytes, conv3d=self.conv3d)
    resnet = functools.partial(resnet_block(self.remat_policy), num_groups=self.num_groups, eps=self.eps, **tiled)
    h, new['conv_in'] = CausalConv3d(self.block_channels[0], **tiled, name='conv_in')(x, cache=cache.get('conv_in'))
    for i, channels in enumerate(self.block_channels):
      block_cache = cache.get(f'down_blocks_{i}', {})
      new_block: Cache = {}
      for j in range(self.num_res_blocks):
        h, new_block[f'resnets_{j}'] = call_resnet(self, resnet(channels, name=f'down_blocks_{i}_resnets_{j}'),
                                                   h, None, block_cache.get(f'resnets_{j}'))
      if i < len(self.block_channels) - 1:
        h = Downsample3D(channels, i < self.temporal_compress_levels, **common, name=f'down_blocks_{i}_downsampler')(h)
      new[f'down_blocks_{i}'] = new_block
    mid_cache = cache.get('mid_block', {})
    new['mid_block'] = {}
    for j in range(2):
      h, new['mid_block'][f'resnets_{j}'] = call_resnet(
          self, resnet(self.block_channels[-1], name=f'mid_block_resnets_{j}'), h, None, mid_cache.get(f'resnets_{j}'))
    normalize = GroupNorm(self.num_groups, self.eps, dtype=self.dtype, name='norm_out').normalizer(h)
    h, new['conv_out'] = CausalConv3d(2 * self.latent_channels, **tiled, name='conv_out')(
        h, lambda frames, index: nn.silu(normalize(frames)), cache.get('conv_out'))
    return h, new


class Decoder3D(nn.Module):
  """Latent chunk z [B, T, h, w, latent] (unscaled) → video chunk [B, T', 8h, 8w, 3] in about [−1, 1]."""
  out_channels: int
  block_channels: tuple[int, ...]
  num_res_blocks: int
  num_groups: int
  eps: float
  temporal_compress_levels: int
  dtype: Any = jnp.float32
  precision: Any = None
  tile_bytes: int = DEFAULT_TILE_BYTES
  conv3d: str = 'auto'
  remat_policy: str = 'none'

  @nn.compact
  def __call__(self, z: Array, cache: Cache | None = None) -> tuple[Array, Cache]:
    cache = cache or {}
    new: Cache = {}
    common = dict(dtype=self.dtype, precision=self.precision, tile_bytes=self.tile_bytes)
    convs = dict(common, conv3d=self.conv3d)
    widths = tuple(reversed(self.block_channels))
    resnet = functools.partial(resnet_block(self.remat_policy), num_groups=self.num_groups, eps=self.eps,
                               spatial_norm=True, **convs)
    h, new['conv_in'] = CausalConv3d(widths[0], **convs, name='conv_in')(z, cache=cache.get('conv_in'))
    mid_cache = cache.get('mid_block', {})
    new['mid_block'] = {}
    for j in range(2):
      h, new['mid_block'][f'resnets_{j}'] = call_resnet(self, resnet(widths[0], name=f'mid_block_resnets_{j}'),
                                                        h, z, mid_cache.get(f'resnets_{j}'))
    for i, channels in enumerate(widths):
      block_cache = cache.get(f'up_blocks_{i}', {})
      new_block: Cache = {}
      for j in range(self.num_res_blocks + 1):
        h, new_block[f'resnets_{j}'] = call_resnet(self, resnet(channels, name=f'up_blocks_{i}_resnets_{j}'),
                                                   h, z, block_cache.get(f'resnets_{j}'))
      if i < len(widths) - 1:
        # lazy where the next block narrows it (its shortcut is then smaller); rematerialised blocks take arrays
        lazy = widths[i + 1] != channels and self.remat_policy == 'none'
        h = Upsample3D(channels, i < self.temporal_compress_levels, **common, lazy=lazy,
                       name=f'up_blocks_{i}_upsampler')(h)
      new[f'up_blocks_{i}'] = new_block
    norm = SpatialNorm3D(widths[-1], self.num_groups, self.eps, dtype=self.dtype, precision=self.precision,
                         name='norm_out')(h, z)
    h, new['conv_out'] = CausalConv3d(self.out_channels, **convs, name='conv_out')(h, silu_of(norm),
                                                                                   cache.get('conv_out'))
    return h, new


class CogVideoXVAE(nn.Module):
  """The VAE's parameters and per-chunk computations; use `encode` / `decode` below for whole videos."""
  in_channels: int = 3
  latent_channels: int = 16
  channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 2, 4)
  num_res_blocks: int = 3
  num_groups: int = 32
  norm_eps: float = 1e-6
  temporal_compression: int = 4
  scaling_factor: float = 1.15258426
  decode_chunk_frames: int = 2
  encode_chunk_frames: int = 8
  with_encoder: bool = True
  dtype: Any = jnp.float32
  precision: Any = None
  tile_bytes: int = DEFAULT_TILE_BYTES
  # training: each chunk and each ResnetBlock3D rematerialised under this jax.checkpoint_policies name, untiled
  remat_policy: str = 'none'
  # how temporal convolutions are computed (`CONV3D_MODES`); 'native' compiles on CPU the program a GPU runs
  conv3d: str = 'auto'

  @property
  def spatial_compression(self) -> int:
    return 2 ** (len(self.channel_mult) - 1)

  def setup(self):
    block_channels = tuple(self.channels * m for m in self.channel_mult)
    levels = int(np.log2(self.temporal_compression))
    common = dict(block_channels=block_channels, num_res_blocks=self.num_res_blocks, num_groups=self.num_groups,
                  eps=self.norm_eps, temporal_compress_levels=levels, dtype=self.dtype, precision=self.precision,
                  tile_bytes=self.tile_bytes if self.remat_policy == 'none' else UNTILED, conv3d=self.conv3d,
                  remat_policy=self.remat_policy)
    if self.with_encoder:
      self.encoder = Encoder3D(self.latent_channels, **common)
    self.decoder = Decoder3D(self.in_channels, **common)

  def encode_chunk(self, video: Array, cache: Cache | None = None) -> tuple[Array, Cache]:
    return self.encoder(video, cache)

  def decode_chunk(self, z: Array, cache: Cache | None = None) -> tuple[Array, Cache]:
    return self.decoder(z, cache)

  def __call__(self, video: Array) -> Array:
    """One-chunk autoencoding through the posterior mean (used to initialise every parameter)."""
    moments, _ = self.encode_chunk(video)
    return self.decode_chunk(moments[..., :self.latent_channels])[0]

  def init_params(self, rng: Array) -> Any:
    """Parameters for this configuration (decoder only when `with_encoder` is False)."""
    s = self.spatial_compression
    if self.with_encoder:
      return self.init(rng, jnp.zeros((1, 1, s, s, self.in_channels)))
    return self.init(rng, jnp.zeros((1, 1, 1, 1, self.latent_channels)), method=CogVideoXVAE.decode_chunk)


def build_vae(config: Any, *, dtype: Any = jnp.float32, with_encoder: bool | None = None,
              precision: Any = None, remat_policy: str = 'none') -> CogVideoXVAE:
  """The VAE of a config section (`configs/landiff_official.py: vae_config`)."""
  if remat_policy != 'none':
    _checkpoint_policy(remat_policy)
  if with_encoder is None:
    with_encoder = bool(config.get('with_encoder', True))
  return CogVideoXVAE(
      in_channels=int(config.in_channels), latent_channels=int(config.latent_channels), channels=int(config.channels),
      channel_mult=tuple(int(m) for m in config.channel_mult), num_res_blocks=int(config.num_res_blocks),
      num_groups=int(config.num_groups), norm_eps=float(config.norm_eps),
      temporal_compression=int(config.temporal_compression), scaling_factor=float(config.scaling_factor),
      decode_chunk_frames=int(config.decode_chunk_frames), encode_chunk_frames=int(config.encode_chunk_frames),
      with_encoder=with_encoder, dtype=jnp.dtype(dtype), precision=precision, remat_policy=remat_policy)


# ---------------------------------------------------------------------------------------------------------------------
# Whole videos


def latent_chunks(num_frames: int, chunk_frames: int) -> list[tuple[int, int]]:
  """The release's chunks: `chunk_frames` each, the remainder folded into the first chunk (13, 2 → [0:3], [3:5], …)."""
  if num_frames < 1:
    raise ValueError(f'cannot split {num_frames} frames into chunks; the time axis must not be empty.')
  count = max(num_frames // chunk_frames, 1)
  remainder = num_frames % chunk_frames
  spans = []
  for i in range(count):
    start = 0 if i == 0 else chunk_frames * i + remainder
    spans.append((start, min(chunk_frames * (i + 1) + remainder, num_frames)))
  return spans


def decoded_frames(num_latent_frames: int, temporal_compression: int = 4, chunk_frames: int = 2) -> int:
  """RGB frames a decode returns: 1 + 4·(T−1) when the first chunk has an odd length (every odd T), else 4·T."""
  first = latent_chunks(num_latent_frames, chunk_frames)[0][1]
  first_out = 1 + temporal_compression * (first - 1) if first % 2 else temporal_compression * first
  return first_out + temporal_compression * (num_latent_frames - first)


def _constrained_chunk(apply_chunk, chunk: Array, cache: Cache | None) -> tuple[Array, Cache]:
  return constrain_frames(apply_chunk(constrain_frames(chunk), cache))


def _run_chunks(apply_chunk, x: Array, chunk_frames: int, remat_policy: str = 'none') -> Array:
  """Runs `apply_chunk(chunk, cache) -> (out, cache)` over the release's chunks along axis 1; concatenates outputs.
  With a `remat_policy`, the backward pass keeps each chunk's input and caches only and recomputes the rest."""
  if remat_policy != 'none':
    apply_chunk = jax.checkpoint(apply_chunk, policy=_checkpoint_policy(remat_policy))
  apply_chunk = functools.partial(_constrained_chunk, apply_chunk)
  spans = latent_chunks(x.shape[1], chunk_frames)
  first_stop = spans[0][1]
  out, cache = apply_chunk(x[:, :first_stop], None)
  if len(spans) == 1:
    return out
  rest = x[:, first_stop:]
  rest = rest.reshape((rest.shape[0], len(spans) - 1, chunk_frames) + rest.shape[2:]).swapaxes(0, 1)

  def step(cache, chunk):
    chunk_out, cache = apply_chunk(chunk, cache)
    return cache, chunk_out

  _, outs = lax.scan(step, cache, rest)
  outs = outs.swapaxes(0, 1)
  outs = outs.reshape((outs.shape[0], -1) + outs.shape[3:])
  return jnp.concatenate([out, outs.astype(out.dtype)], axis=1)


def check_latents(model: CogVideoXVAE, latents: Any) -> None:
  shape = tuple(latents.shape)
  if len(shape) != 5:
    raise ValueError(f'latents must be [batch, frames, height, width, {model.latent_channels}] (channels last); '
                     f'got shape {shape}.')
  if shape[-1] != model.latent_channels:
    hint = ' They look channels-first: transpose to [B, T, h, w, C].' if shape[1] == model.latent_channels else ''
    raise ValueError(f'latents have {shape[-1]} channels but this VAE takes {model.latent_channels}.{hint}')
  if shape[1] == 0:
    raise ValueError('latents have an empty time axis; pass at least one latent frame.')
  if 0 in shape:
    raise ValueError(f'latents have an empty axis: shape {shape}.')


def check_video(model: CogVideoXVAE, video: Any) -> None:
  shape = tuple(video.shape)
  if len(shape) != 5:
    raise ValueError(f'video must be [batch, frames, height, width, {model.in_channels}] (channels last); '
                     f'got shape {shape}.')
  if shape[-1] != model.in_channels:
    hint = ' It looks channels-first: transpose to [B, T, H, W, C].' if shape[1] == model.in_channels else ''
    raise ValueError(f'video has {shape[-1]} channels but this VAE takes {model.in_channels}.{hint}')
  if shape[1] == 0:
    raise ValueError('video has an empty time axis; pass at least one frame.')
  s = model.spatial_compression
  if shape[2] % s or shape[3] % s or 0 in shape:
    raise ValueError(f'video height and width must be positive multiples of {s}; got {shape[2]}×{shape[3]}. '
                     f'Resize or crop it, e.g. to {max(s, shape[2] // s * s)}×{max(s, shape[3] // s * s)}.')


@functools.partial(jax.jit, static_argnums=(0,))
def _decode(model: CogVideoXVAE, params: Any, latents: Array) -> Array:
  z = latents.astype(jnp.float32) / model.scaling_factor

  def apply_chunk(chunk, cache):
    return model.apply(params, chunk, cache, method=CogVideoXVAE.decode_chunk)

  return _run_chunks(apply_chunk, z.astype(model.dtype), model.decode_chunk_frames,
                     model.remat_policy).astype(jnp.float32)


def decode(model: CogVideoXVAE, params: Any, latents: Array) -> Array:
  """Scaled latents [B, T, h, w, C] → video [B, 1+4(T−1), 8h, 8w, 3] (float32, about [−1, 1]), in the release's
  chunks with the causal caches carried over."""
  check_latents(model, latents)
  return _decode(model, params, latents)


def decode_with_chunks(model: CogVideoXVAE, params: Any, latents: Array, spans: Sequence[tuple[int, int]]) -> Array:
  """Decodes with an explicit chunk list (e.g. [(0, 3), (3, 5), …]), one jit call per chunk; for tests and tools."""
  check_latents(model, latents)
  z = (latents.astype(jnp.float32) / model.scaling_factor).astype(model.dtype)
  step = jax.jit(lambda p, chunk, cache: model.apply(p, chunk, cache, method=CogVideoXVAE.decode_chunk))
  cache, outs = None, []
  for start, stop in spans:
    out, cache = step(params, z[:, start:stop], cache)
    outs.append(out.astype(jnp.float32))
  return jnp.concatenate(outs, axis=1)


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_moments(model: CogVideoXVAE, params: Any, video: Array) -> Array:

  def apply_chunk(chunk, cache):
    return model.apply(params, chunk, cache, method=CogVideoXVAE.encode_chunk)

  return _run_chunks(apply_chunk, video.astype(model.dtype), model.encode_chunk_frames,
                     model.remat_policy).astype(jnp.float32)


def encode_moments(model: CogVideoXVAE, params: Any, video: Array) -> tuple[Array, Array]:
  """The diagonal Gaussian posterior of a video [B, F, H, W, 3] in [−1, 1]: (mean, log-variance clipped to
  [−30, 20]), unscaled, each [B, T, H/8, W/8, C]."""
  check_video(model, video)
  if not model.with_encoder or 'encoder' not in params.get('params', {}):
    raise ValueError('these VAE parameters have no encoder (converted with --decoder-only); convert the VAE '
                     'again without --decoder-only to encode videos.')
  moments = _encode_moments(model, params, video)
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return mean, jnp.clip(logvar, -30.0, 20.0)


def encode(model: CogVideoXVAE, params: Any, video: Array, key: Array | None = None) -> Array:
  """Video [B, 1+4k, H, W, 3] in [−1, 1] → scaled latents [B, 1+k, H/8, W/8, C]: the posterior mean, or a
  sample from the posterior when `key` is given (as the release's training data pipeline does)."""
  mean, logvar = encode_moments(model, params, video)
  z = mean
  if key is not None:
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
  return z * model.scaling_factor
