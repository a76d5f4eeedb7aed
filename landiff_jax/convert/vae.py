"""CogVideoX VAE: SAT `3d-vae.pt` or diffusers `AutoencoderKLCogVideoX` tensors → `models/vae.py` parameters.

SAT names are first renamed to diffusers names (cogvideox-theia-t5.md §3.4), then diffusers names map one to one
onto the Flax tree: `down_blocks.1.resnets.0.conv1.conv.weight` → `down_blocks_1_resnets_0/conv1/kernel`.
PyTorch convolutions are transposed to channels-last kernels; 1×1×1 convolutions become (in, out) matrices.
"""

from __future__ import annotations

from collections.abc import Mapping
import re
from typing import Any

import numpy as np

from landiff_jax.convert.common import expected_shapes, field_hint, keep, nested, report_problems, strip_prefix
from landiff_jax.models import vae as vae_model

SAT_PREFIXES = ('first_stage_model.',)
IGNORED_PREFIXES = ('loss.',)


def is_sat_layout(names: list[str]) -> bool:
  return any(re.search(r'\.(up|down)\.\d+\.|\.mid\.block_\d', name) for name in names)


def sat_to_diffusers_name(name: str, num_levels: int) -> str:
  """SAT VAE name → diffusers name (the rename rules of `convert_cogvideox_to_diffusers.py`)."""
  name = re.sub(r'\.block\.(\d+)\.', r'.resnets.\1.', name)
  name = re.sub(r'\.mid\.block_(\d+)\.', lambda m: f'.mid_block.resnets.{int(m.group(1)) - 1}.', name)
  name = re.sub(r'^encoder\.down\.(\d+)\.', r'encoder.down_blocks.\1.', name)
  name = re.sub(r'^decoder\.up\.(\d+)\.', lambda m: f'decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.', name)
  name = name.replace('.downsample.', '.downsamplers.0.').replace('.upsample.', '.upsamplers.0.')
  return name.replace('nin_shortcut', 'conv_shortcut')


def diffusers_name_to_path(name: str, ndim: int) -> tuple[str, ...]:
  """Diffusers VAE name → path in the Flax parameter tree (under 'params')."""
  name = re.sub(r'(conv_in|conv_out|conv1|conv2|conv_y|conv_b)\.conv\.', r'\1.', name)
  name = re.sub(r'(down_blocks|up_blocks)\.(\d+)\.resnets\.(\d+)\.', r'\1_\2_resnets_\3.', name)
  name = re.sub(r'down_blocks\.(\d+)\.downsamplers\.0\.', r'down_blocks_\1_downsampler.', name)
  name = re.sub(r'up_blocks\.(\d+)\.upsamplers\.0\.', r'up_blocks_\1_upsampler.', name)
  name = re.sub(r'mid_block\.resnets\.(\d+)\.', r'mid_block_resnets_\1.', name)
  parts = name.split('.')
  if parts[-1] == 'weight':
    parts[-1] = 'kernel' if ndim > 1 else 'scale'
  return tuple(parts)


def to_flax_layout(array: np.ndarray) -> np.ndarray:
  """PyTorch (out, in, *kernel) → channels-last (*kernel, in, out); 1×1×1 kernels → (in, out)."""
  if array.ndim == 5 and array.shape[2:] == (1, 1, 1):
    return array[:, :, 0, 0, 0].T
  if array.ndim in (4, 5):
    return np.transpose(array, tuple(range(2, array.ndim)) + (1, 0))
  return array


def expected_tree(config: Any, decoder_only: bool) -> dict[tuple[str, ...], tuple[int, ...]]:
  return expected_shapes(vae_model.build_vae(config, with_encoder=not decoder_only).init_params, 'VAE')


def convert_vae(state_dict: Mapping[str, np.ndarray], config: Any, *, decoder_only: bool = False) -> dict[str, Any]:
  """Parameters of `build_vae(config)` (decoder only with `decoder_only`) from a SAT or diffusers state dict."""
  names = list(state_dict)
  for prefix in SAT_PREFIXES:
    if names and all(n.startswith(prefix) for n in names):
      state_dict = strip_prefix(state_dict, prefix)
      names = list(state_dict)
  sat = is_sat_layout(names)
  num_levels = len(config.channel_mult)
  expected = expected_tree(config, decoder_only)
  params: dict[tuple[str, ...], Any] = {}
  unexpected, misshaped, pairs = [], [], []
  for name in names:  # one tensor read at a time
    if name.startswith(IGNORED_PREFIXES) or (decoder_only and name.startswith('encoder.')):
      continue
    array = state_dict[name]
    diffusers_name = sat_to_diffusers_name(name, num_levels) if sat else name
    path = ('params',) + diffusers_name_to_path(diffusers_name, np.ndim(array))
    if path not in expected:
      unexpected.append(name)
      continue
    value = to_flax_layout(np.asarray(array, dtype=np.float32))
    if value.shape != expected[path]:
      misshaped.append(f'{name}: {tuple(np.shape(array))} → {value.shape}, expected {expected[path]}')
      pairs.append((name, value.shape, expected[path]))
      continue
    params[path] = keep(value)
  missing = ['/'.join(p[1:]) for p in expected if p not in params]
  layout = 'SAT' if sat else 'diffusers'
  # the release's `init_from_ckpt` loads with strict=False (after dropping `loss.`): other tensors are listed
  report_problems(f'the VAE checkpoint ({layout} layout; config: channels {config.channels}, channel_mult '
                  f'{tuple(config.channel_mult)}, latent_channels {config.latent_channels}, num_res_blocks '
                  f'{config.num_res_blocks})', missing, unexpected, misshaped, strict=False,
                  hint=field_hint(config, 'vae', pairs))
  return nested(params)
