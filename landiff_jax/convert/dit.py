"""CogVideoX-2B SAT checkpoints (and LanDiff's engine checkpoint) → `models/dit.py` parameters.

SAT names (cogvideox-theia-t5.md §1.4) map directly onto the Flax tree; the fused qkv and the 12-way adaLN stay
single kernels, per-layer tensors are stacked along a leading layer axis. Prefixes:
`model.diffusion_model.` (CogVideoX-2B), `model.main_model.diffusion_model.` and
`model.control_model.diffusion_model.` (LanDiff). The stored `pos_embedding` is checked against the recomputed
3D sin-cos table, within the rounding of the dtype it is stored in. A control branch missing from the file starts
as the release's training initialisation: its embeddings and blocks copied from the backbone's first layers, zero
linears at zero.

The release loads both files with strict=False: tensors the model has no place for are listed in one notice, not
refused; missing ones are still an error (the release would leave them random). The tokenizer copy under
`semantic_conditioner.semantic_model.` is converted by `convert_tokenizer`, which gives it precedence.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax.convert import ConversionError, notice
from landiff_jax.convert.common import Stack, abstract_init, field_hint, keep, report_problems, source_of, strip_prefix
from landiff_jax.models.dit import build_dit
from landiff_jax.models.semantic_upsampler import build_semantic_upsampler
from landiff_jax.nn.embeddings import cogvideox_3d_sincos_table
from landiff_jax.parallel import strip_partitioning

BACKBONE_PREFIXES = ('model.main_model.diffusion_model.', 'model.diffusion_model.', 'main_model.diffusion_model.',
                     'diffusion_model.')
CONTROL_PREFIXES = ('model.control_model.diffusion_model.', 'control_model.diffusion_model.')
# Parts of the engine checkpoint that other converters handle.
OTHER_PARTS = ('conditioner.', 'model.conditioner.', 'first_stage_model.', 'model.first_stage_model.', 'loss.')


def _linear(weight: np.ndarray) -> np.ndarray:
  return np.asarray(weight, np.float32).T


def layer_rules(d: int, heads: int, head_dim: int) -> list[tuple[str, tuple[str, ...], Any]]:
  """(SAT name pattern with {l}, Flax path under blocks/, transform) for the per-layer tensors."""
  return [
      ('mixins.adaln_layer.adaLN_modulations.{l}.1.weight', ('block', 'adaln', 'kernel'),
       lambda w: _linear(w).reshape(w.shape[1], 12, d)),
      ('mixins.adaln_layer.adaLN_modulations.{l}.1.bias', ('block', 'adaln', 'bias'), lambda b: b.reshape(12, d)),
      ('mixins.adaln_layer.query_layernorm_list.{l}.weight', ('block', 'attn', 'q_norm', 'scale'), None),
      ('mixins.adaln_layer.query_layernorm_list.{l}.bias', ('block', 'attn', 'q_norm', 'bias'), None),
      ('mixins.adaln_layer.key_layernorm_list.{l}.weight', ('block', 'attn', 'k_norm', 'scale'), None),
      ('mixins.adaln_layer.key_layernorm_list.{l}.bias', ('block', 'attn', 'k_norm', 'bias'), None),
      ('transformer.layers.{l}.input_layernorm.weight', ('block', 'norm1', 'scale'), None),
      ('transformer.layers.{l}.input_layernorm.bias', ('block', 'norm1', 'bias'), None),
      ('transformer.layers.{l}.post_attention_layernorm.weight', ('block', 'norm2', 'scale'), None),
      ('transformer.layers.{l}.post_attention_layernorm.bias', ('block', 'norm2', 'bias'), None),
      ('transformer.layers.{l}.attention.query_key_value.weight', ('block', 'attn', 'qkv', 'kernel'),
       lambda w: _linear(w).reshape(d, 3, heads, head_dim)),
      ('transformer.layers.{l}.attention.query_key_value.bias', ('block', 'attn', 'qkv', 'bias'),
       lambda b: b.reshape(3, heads, head_dim)),
      ('transformer.layers.{l}.attention.dense.weight', ('block', 'attn', 'out', 'kernel'),
       lambda w: _linear(w).reshape(heads, head_dim, d)),
      ('transformer.layers.{l}.attention.dense.bias', ('block', 'attn', 'out', 'bias'), None),
      ('transformer.layers.{l}.mlp.dense_h_to_4h.weight', ('block', 'mlp', 'fc1', 'kernel'), _linear),
      ('transformer.layers.{l}.mlp.dense_h_to_4h.bias', ('block', 'mlp', 'fc1', 'bias'), None),
      ('transformer.layers.{l}.mlp.dense_4h_to_h.weight', ('block', 'mlp', 'fc2', 'kernel'), _linear),
      ('transformer.layers.{l}.mlp.dense_4h_to_h.bias', ('block', 'mlp', 'fc2', 'bias'), None),
  ]


def embedding_rules() -> list[tuple[str, tuple[str, ...], Any]]:
  return [
      ('time_embed.0.weight', ('time_embed', 'fc1', 'kernel'), _linear),
      ('time_embed.0.bias', ('time_embed', 'fc1', 'bias'), None),
      ('time_embed.2.weight', ('time_embed', 'fc2', 'kernel'), _linear),
      ('time_embed.2.bias', ('time_embed', 'fc2', 'bias'), None),
      ('mixins.patch_embed.proj.weight', ('patch_embed', 'kernel'), lambda w: np.transpose(w, (2, 3, 1, 0))),
      ('mixins.patch_embed.proj.bias', ('patch_embed', 'bias'), None),
      ('mixins.patch_embed.text_proj.weight', ('text_proj', 'kernel'), _linear),
      ('mixins.patch_embed.text_proj.bias', ('text_proj', 'bias'), None),
  ]


def final_rules(d: int, channels: int, patch: int) -> list[tuple[str, tuple[str, ...], Any]]:
  return [
      ('transformer.final_layernorm.weight', ('final_layernorm', 'scale'), None),
      ('transformer.final_layernorm.bias', ('final_layernorm', 'bias'), None),
      ('mixins.final_layer.norm_final.weight', ('norm_final', 'scale'), None),
      ('mixins.final_layer.norm_final.bias', ('norm_final', 'bias'), None),
      ('mixins.final_layer.linear.weight', ('proj', 'kernel'), lambda w: _linear(w).reshape(d, channels, patch, patch)),
      ('mixins.final_layer.linear.bias', ('proj', 'bias'), lambda b: b.reshape(channels, patch, patch)),
      ('mixins.final_layer.adaLN_modulation.1.weight', ('adaln', 'kernel'),
       lambda w: _linear(w).reshape(w.shape[1], 2, d)),
      ('mixins.final_layer.adaLN_modulation.1.bias', ('adaln', 'bias'), lambda b: b.reshape(2, d)),
  ]


class _Reader:
  """Takes tensors out of one sub-model's {name: array}, remembering what was used and what was missing."""

  def __init__(self, tensors: Mapping[str, np.ndarray], label: str):
    self.tensors, self.label = tensors, label
    self.used: set[str] = set()
    self.missing: list[str] = []

  def take(self, name: str, transform=None) -> np.ndarray | None:
    if name not in self.tensors:
      self.missing.append(f'{self.label}{name}')
      return None
    self.used.add(name)
    value = np.asarray(self.tensors[name], np.float32)
    return np.ascontiguousarray(transform(value) if transform else value)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _take(reader: _Reader, name: str, transform=None) -> Any:
  value = reader.take(name, transform)
  return None if value is None else keep(value)


def _take_stacked(reader: _Reader, names: list[str], transform=None) -> Any:
  """The layers stacked on a leading axis, read one at a time; None if any is missing (all are still looked up)."""
  stack, complete = Stack(), True
  for name in names:
    value = reader.take(name, transform)
    if value is None or not complete:
      complete = False
    elif stack.count and value.shape != stack.shape:
      raise ConversionError(f'{reader.label}{name}: {value.shape} after conversion, but the earlier layers are '
                            f'{stack.shape}.')
    else:
      stack.add(value)
  return stack.result() if complete and names else None


def _convert_transformer(reader: _Reader, dit: Any, num_layers: int, *, final: bool, zero_linears: bool) -> dict:
  d, heads, head_dim = dit.hidden_size, dit.num_heads, dit.head_dim
  tree: dict = {}
  for name, path, transform in embedding_rules():
    _set(tree, ('embed',) + path, _take(reader, name, transform))
  for pattern, path, transform in layer_rules(d, heads, head_dim):
    _set(tree, ('blocks',) + path, _take_stacked(reader, [pattern.format(l=l) for l in range(num_layers)], transform))
  if zero_linears:
    _set(tree, ('blocks', 'zero_linear', 'kernel'),
         _take_stacked(reader, [f'mixins.adaln_layer.zero_linears.{l}.weight' for l in range(num_layers)], _linear))
  if final:
    for name, path, transform in final_rules(d, dit.out_channels, dit.patch_size):
      _set(tree, ('final',) + path, _take(reader, name, transform))
  return tree


# Largest |stored - recomputed| of a sin-cos table (values in [-1, 1]) that is only the rounding of its storage
# dtype: half the float spacing just above 1 (bf16 2^-8 ≈ 3.9e-3, fp16 2^-11 ≈ 4.9e-4; tables measured at 2.0e-3
# and 2.4e-4), never below float32 recomputation noise.
def rounding_tolerance(dtype: Any) -> float:
  dtype = np.dtype(dtype)
  if not np.issubdtype(dtype, np.floating) and dtype != np.dtype(jnp.bfloat16):
    return 1e-5
  return max(float(jnp.finfo(dtype).eps) / 2 * 1.01, 1e-5)


CLOSE_TABLE = 0.05  # beyond rounding but below this: reported, not fatal (the model recomputes the table anyway)


def _check_position_table(tensors: Mapping[str, np.ndarray], dit: Any, label: str) -> None:
  name = 'mixins.pos_embed.pos_embedding'
  if name not in tensors:
    return
  raw = tensors[name]
  stored = np.asarray(raw, np.float32)
  patch = dit.patch_size
  table = cogvideox_3d_sincos_table(dit.hidden_size, dit.latent_frames, dit.latent_height // patch,
                                    dit.latent_width // patch, dit.spatial_interpolation,
                                    dit.temporal_interpolation, text_length=dit.text_length)
  where = f'{label}{name} {tuple(stored.shape)}'
  if stored.shape[-1] != table.shape[-1]:
    raise ConversionError(f'{where}: the file has width {stored.shape[-1]} where dit.hidden_size is '
                          f'{dit.hidden_size}; set --config.dit.hidden_size={stored.shape[-1]} (with its num_heads '
                          'and head_dim) or use the config the checkpoint was trained with.')
  stored = stored.reshape(-1, table.shape[-1])
  if stored.shape[0] != table.shape[0]:
    raise ConversionError(f'{where}: the file has {stored.shape[0]} positions, the config {table.shape[0]} '
                          f'(dit.text_length {dit.text_length} + dit.latent_frames {dit.latent_frames} × '
                          f'(dit.latent_height {dit.latent_height} / dit.patch_size {patch}) × (dit.latent_width '
                          f'{dit.latent_width} / {patch})); set those fields to the checkpoint\'s.')
  gap = float(np.max(np.abs(stored - table))) if stored.size else 0.0
  tolerance = rounding_tolerance(np.asarray(raw).dtype)
  if gap <= tolerance:
    return
  if gap <= CLOSE_TABLE:
    notice(f'{where} differs from the table recomputed from the config by up to {gap:.3g}, more than the rounding '
           f'of its {np.asarray(raw).dtype} storage ({tolerance:.2g}) but close; converted anyway (the model '
           'recomputes the table, so it is not used).')
    return
  raise ConversionError(f'{where} differs from the 3D sin-cos table recomputed from the dit config by up to '
                        f'{gap:.3g}; check dit.spatial_interpolation ({dit.spatial_interpolation}), '
                        f'dit.temporal_interpolation ({dit.temporal_interpolation}) and the latent grid fields '
                        'against the checkpoint\'s training config.')


def check_config(config: Any, tensors: Mapping[str, np.ndarray]) -> None:
  """Relations between config sections the model needs before it can even be built, each named with its fields."""
  dit = config.dit
  if 'upsampler' in config and 'control' in config and int(config.control.num_layers):
    target, latent = int(config.upsampler.target_channels), int(dit.in_channels)
    if target != latent:
      name = 'mixins.patch_embed.proj.weight'
      in_file = f' (the checkpoint\'s is {np.shape(tensors[name])[1]})' if name in tensors else ''
      raise ConversionError(f'the config is inconsistent: upsampler.target_channels is {target} but dit.in_channels '
                            f'is {latent}{in_file}; the semantic condition is added to the latents, so set both '
                            'to the latent channels of the checkpoint.')


def split_by_prefix(state_dict: Mapping[str, np.ndarray], prefixes: tuple[str, ...]) -> tuple[Mapping, str]:
  """The tensors under the first of `prefixes` any name starts with (a view, without it), and that prefix."""
  for prefix in prefixes:
    part = strip_prefix(state_dict, prefix)
    if part:
      return part, prefix
  return {}, ''


UPSAMPLER_PREFIX = 'semantic_conditioner.'


def upsampler_path(name: str, ndim: int) -> tuple[str, ...] | None:
  """`semantic_conditioner.` name (prefix removed) → path in the upsampler tree; None for other parts (the
  tokenizer under `semantic_model.` is converted with the tokenizer)."""
  if name.startswith('conv_out.'):
    name = 'project.' + name[len('conv_out.'):]
  elif name.startswith('upsample_model.'):
    name = name[len('upsample_model.'):]
    name = re.sub(r'^mid\.block_(\d+)\.', r'mid_block_\1.', name)
    name = re.sub(r'^up\.(\d+)\.block\.(\d+)\.', r'up_\1_block_\2.', name)
    name = re.sub(r'^up\.(\d+)\.upsample\.conv\.', r'up_\1_upsample.', name)
  else:
    return None
  parts = name.split('.')
  if parts[-1] == 'weight':
    parts[-1] = 'kernel' if ndim > 1 else 'scale'
  return tuple(parts)


def convert_upsampler(tensors: Mapping[str, np.ndarray], config: Any, label: str) -> tuple[dict, list[str], set]:
  """(upsampler params, missing names, used names) from the `semantic_conditioner.` tensors."""
  module = build_semantic_upsampler(config)
  shapes = strip_partitioning(jax.eval_shape(
      module.init, jax.random.key(0), jnp.zeros((1, 1, 1, module.in_channels))))['params']
  expected = {tuple(str(k.key) for k in path): leaf.shape
              for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  tree: dict = {}
  used = set()
  for name in tensors:
    if upsampler_path(name, 1) is None:  # not the upsampler's (e.g. the tokenizer under semantic_model.): not read
      continue
    value = np.asarray(tensors[name], np.float32)
    path = upsampler_path(name, value.ndim)
    if path not in expected:
      continue
    if value.ndim == 4:
      value = np.transpose(value, (2, 3, 1, 0))
    _set(tree, path, keep(value))
    used.add(name)
  found = {tuple(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
  missing = [f'{label}{UPSAMPLER_PREFIX}' + '/'.join(p) for p in expected if p not in found]
  return tree, missing, {UPSAMPLER_PREFIX + n for n in used}


def initial_upsampler(config: Any) -> dict:
  """The release's training initialisation (random, seed 0; zero final projection) for a file without one."""
  module = build_semantic_upsampler(config)
  params = module.init(jax.random.key(0), jnp.zeros((1, 1, 1, module.in_channels)))['params']
  return jax.tree.map(np.asarray, strip_partitioning(params))


def convert_dit(state_dict: Mapping[str, np.ndarray], config: Any, *,
                base_state_dict: Mapping[str, np.ndarray] | None = None) -> dict:
  """Parameters of `build_dit(config)` ({'dit', 'control'} config sections) from a SAT state dict.

  `state_dict` is a CogVideoX-2B SAT checkpoint or LanDiff's engine checkpoint; `base_state_dict` (optional) is the
  CogVideoX-2B checkpoint LanDiff's loader reads first: tensors absent from `state_dict` fall back to it, with the
  control branch reading the base backbone's tensors, as the release's two-stage `strict=False` load does.
  """
  dit = config.dit
  num_control = int(config.control.num_layers) if 'control' in config else 0
  backbone, backbone_prefix = split_by_prefix(state_dict, BACKBONE_PREFIXES)
  control, control_prefix = split_by_prefix(state_dict, CONTROL_PREFIXES)
  base, base_prefix = split_by_prefix(base_state_dict or {}, BACKBONE_PREFIXES)
  if not backbone and not base:
    sample = ', '.join(list(state_dict)[:5])
    raise ConversionError(f'no DiT tensors found: expected names starting with one of {BACKBONE_PREFIXES}; the file '
                          f'starts with {sample}. Is this the CogVideoX-2B transformer or LanDiff diffusion checkpoint?')
  merged_backbone = ChainMap(backbone, base)  # views: nothing is read until converted
  check_config(config, merged_backbone)
  _check_position_table(merged_backbone, dit, backbone_prefix or base_prefix)
  reader = _Reader(merged_backbone, backbone_prefix or base_prefix)
  params = {'dit': _convert_transformer(reader, dit, int(dit.num_layers), final=True, zero_linears=False)}
  readers = [reader]
  if num_control:
    control_reader = _Reader(ChainMap(control, merged_backbone), control_prefix or CONTROL_PREFIXES[0])
    control_tree = _convert_transformer(control_reader, dit, num_control, final=False, zero_linears=True)
    if not control:  # not trained yet: the release's initialisation
      zeros = Stack()
      for _ in range(num_control):
        zeros.add(np.zeros((dit.hidden_size, dit.hidden_size), np.float32))
      control_tree['blocks']['zero_linear']['kernel'] = zeros.result()
      control_reader.missing = [m for m in control_reader.missing if 'zero_linears' not in m]
    _check_position_table(control, dit, control_prefix)
    params['control'] = control_tree
    readers.append(control_reader)
  missing = [m for r in readers for m in r.missing]
  control_used = set(readers[-1].used) if num_control else set()
  if num_control and 'upsampler' in config:
    conditioner = strip_prefix(control, UPSAMPLER_PREFIX)
    if conditioner or control:
      params['upsampler'], upsampler_missing, upsampler_used = convert_upsampler(conditioner, config.upsampler,
                                                                                 control_prefix)
      missing += upsampler_missing
      control_used |= upsampler_used
    else:
      params['upsampler'] = initial_upsampler(config.upsampler)
  unexpected = unexpected_names(state_dict, backbone_prefix, readers[0].used, control_prefix, control_used)
  if base_state_dict:
    unexpected += unexpected_names(base_state_dict, base_prefix, readers[0].used, '', set())
  misshaped, pairs = _check_shapes(params, config)
  copy = [n for n in state_dict if n.startswith(control_prefix + 'semantic_conditioner.semantic_model.')]
  if control_prefix and copy:
    notice(f'dit: the engine holds a tokenizer copy ({len(copy)} tensors under {control_prefix}semantic_conditioner.'
           'semantic_model.), converted with the tokenizer, where it takes precedence: `convert tokenizer --src '
           f'{source_of(state_dict, "ENGINE")} --base tokenizer/model.safetensors` (`convert all` does this).')
  frozen = [n for n in state_dict if n.startswith(OTHER_PARTS) and not n.startswith('loss.')]
  if frozen:
    notice(f'dit: the engine also holds {len(frozen)} tensors of frozen parts (VAE under first_stage_model., T5 under '
           'conditioner.), converted with those parts, where they take precedence: `convert all` does this; single '
           'parts: `convert vae|t5_dit --src ENGINE --base FILE`.')
  report_problems(f'the DiT checkpoint (config: hidden {dit.hidden_size}, {dit.num_layers} layers, {num_control} '
                  'control layers)', missing, unexpected, misshaped, strict=False, hint=field_hint(config, '', pairs))
  return {'params': params}


def unexpected_names(state_dict, backbone_prefix, backbone_used, control_prefix, control_used) -> list[str]:
  """Names the conversion did not use and no other converter owns (the position table is checked, not used)."""
  skipped_everywhere = ('mixins.pos_embed.pos_embedding',)
  skipped_in_control = ('transformer.final_layernorm.', 'semantic_conditioner.semantic_model.')  # discarded / tokenizer's
  out = []
  for name in state_dict:
    if name.startswith(OTHER_PARTS):
      continue
    if backbone_prefix and name.startswith(backbone_prefix):
      rest = name[len(backbone_prefix):]
      if rest not in backbone_used and not rest.startswith(skipped_everywhere):
        out.append(name)
    elif control_prefix and name.startswith(control_prefix):
      rest = name[len(control_prefix):]
      if rest not in control_used and not rest.startswith(skipped_everywhere + skipped_in_control):
        out.append(name)
    else:
      out.append(name)
  return out


def _check_shapes(params: dict, config: Any) -> tuple[list[str], list[tuple]]:
  """(mis-shaped parameter messages, (name, converted shape, expected shape)) against the model the config builds."""
  expected = abstract_init(build_dit(config).init_params, 'DiT')['params']
  problems, pairs = [], []

  def compare(path, want, got):
    name = '/'.join(str(getattr(p, 'key', p)) for p in path)
    if got is not None and tuple(want.shape) != tuple(np.shape(got)):
      problems.append(f'{name}: {tuple(np.shape(got))}, expected {tuple(want.shape)}')
      pairs.append((name, tuple(np.shape(got)), tuple(want.shape)))

  flat_want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  flat_got = dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)[0])
  for path, want in flat_want.items():
    if path in flat_got:
      compare(path, want, flat_got[path])
  return problems, pairs
