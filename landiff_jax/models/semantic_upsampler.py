"""LanDiff's semantic upsampler (reference landiff-official.md §5.5), channels last.

Tokenizer-decoder features [N, 30, 45, 768] → [N, 60, 90, 16], the condition added to the control branch's input:
conv_in → two mid ResnetBlocks → levels from coarse to fine (num_res_blocks+1 ResnetBlocks each, a PixelShuffle(2)
+ 3×3 conv between levels) → GroupNorm → swish → conv_out (→ 64) → the conditioner's own 3×3 conv (→ 16).
PixelShuffle follows PyTorch's channel order: input channel c·4 + i·2 + j goes to output pixel (2y+i, 2x+j).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from landiff_jax.nn import GroupNorm

Array = jax.Array
torch_default_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


class Conv2d(nn.Module):
  """A k×k convolution with PyTorch's symmetric k//2 padding, kernel [k, k, in, out]."""
  features: int
  kernel_size: int = 3
  dtype: Any = jnp.float32
  kernel_init: Any = torch_default_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, (None, None, 'conv_in', 'conv_out')),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(), ('conv_out',)),
                      (self.features,), jnp.float32)
    y = lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (1, 1), ((k // 2, k // 2),) * 2,
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + bias.astype(self.dtype)


def pixel_shuffle(x: Array, factor: int = 2) -> Array:
  n, h, w, c = x.shape
  x = x.reshape(n, h, w, c // factor**2, factor, factor)
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(n, h * factor, w * factor, c // factor**2)


class ResnetBlock2D(nn.Module):
  features: int
  num_groups: int
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    norm = functools.partial(GroupNorm, self.num_groups, self.eps, dtype=self.dtype)
    h = Conv2d(self.features, dtype=self.dtype, name='conv1')(nn.silu(norm(name='norm1')(x)))
    h = Conv2d(self.features, dtype=self.dtype, name='conv2')(nn.silu(norm(name='norm2')(h)))
    if x.shape[-1] != self.features:
      x = Conv2d(self.features, kernel_size=1, dtype=self.dtype, name='nin_shortcut')(x)
    return x.astype(h.dtype) + h


class SemanticUpsampler(nn.Module):
  """`apply(params, features[..., h, w, in_channels]) -> condition[..., 2h, 2w, target_channels]` (float32)."""
  in_channels: int = 768
  channels: int = 512
  channel_mult: tuple[float, ...] = (0.25, 1.0)
  num_res_blocks: int = 4
  out_channels: int = 64
  target_channels: int = 16
  num_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Array) -> Array:
    if features.shape[-1] != self.in_channels:
      raise ValueError(f'semantic features have {features.shape[-1]} channels; the upsampler takes '
                       f'{self.in_channels} (the tokenizer decoder output, channels last).')
    lead = features.shape[:-3]
    x = features.reshape((-1,) + features.shape[-3:])
    widths = [int(self.channels * m) for m in self.channel_mult]
    block = functools.partial(ResnetBlock2D, num_groups=self.num_groups, eps=self.norm_eps, dtype=self.dtype)
    h = Conv2d(widths[-1], dtype=self.dtype, name='conv_in')(x)
    h = block(widths[-1], name='mid_block_1')(h)
    h = block(widths[-1], name='mid_block_2')(h)
    for level in reversed(range(len(widths))):
      for j in range(self.num_res_blocks + 1):
        h = block(widths[level], name=f'up_{level}_block_{j}')(h)
      if level:
        h = Conv2d(widths[level], dtype=self.dtype, name=f'up_{level}_upsample')(pixel_shuffle(h))
    h = nn.silu(GroupNorm(self.num_groups, self.norm_eps, dtype=self.dtype, name='norm_out')(h))
    h = Conv2d(self.out_channels, dtype=self.dtype, name='conv_out')(h)
    h = Conv2d(self.target_channels, dtype=self.dtype, kernel_init=nn.initializers.zeros_init(),
               name='project')(h)
    return h.astype(jnp.float32).reshape(lead + h.shape[1:])


def build_semantic_upsampler(config: Any, *, dtype: Any = jnp.float32) -> SemanticUpsampler:
  if config.upsample != 'pixelshuffle':
    raise ValueError(f'upsampler.upsample {config.upsample!r} is not supported; the release uses "pixelshuffle".')
  return SemanticUpsampler(int(config.in_channels), int(config.channels), tuple(float(m) for m in config.channel_mult),
                           int(config.num_res_blocks), int(config.out_channels), int(config.target_channels),
                           int(config.num_groups), float(config.norm_eps), jnp.dtype(dtype))
