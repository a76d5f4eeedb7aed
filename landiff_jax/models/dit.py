"""CogVideoX-2B MMDiT as LanDiff runs it, and LanDiff's ControlNet branch (reference landiff-official.md §5.3–5.4,
cogvideox-theia-t5.md §1), channels last.

Sequence = [226 text tokens ; T·(H/2)·(W/2) video tokens], absolute 3D sin-cos positions (zero on text), one
timestep embedding that drives a 12-way "expert" adaLN per block (separate shift/scale/gate for text and video,
shared LayerNorm, attention and MLP weights), joint full attention with per-head q/k LayerNorm.

The control branch is a truncated copy (15 blocks, own embeddings, no final layer) fed `latents + semantic
condition`. After each of its blocks a bias-free zero-initialised linear Z_l projects the whole sequence, and —
the release's quirk — that projection is both the next control block's input and the residual the backbone adds
after its block l (text tokens included).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax.models.semantic_upsampler import SemanticUpsampler, build_semantic_upsampler
from landiff_jax.nn import Dense, LayerNorm, MaskSpec, Mlp, attention, constrain, scan_layers
from landiff_jax.nn.embeddings import TimestepMLP, timestep_embedding

Array = jax.Array
SEQUENCE_AXES = ('batch', 'length', 'act_embed')

# Order of the 12 adaLN chunks in the official checkpoint: video then text, attention then MLP.
MODULATIONS = ('shift_attn', 'scale_attn', 'gate_attn', 'shift_mlp', 'scale_mlp', 'gate_mlp',
               'text_shift_attn', 'text_scale_attn', 'text_gate_attn', 'text_shift_mlp', 'text_scale_mlp',
               'text_gate_mlp')


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
  """Fused-qkv self-attention with per-head q/k LayerNorm; the mask is `full` (joint text + video attention)."""
  num_heads: int
  head_dim: int
  qk_norm_eps: float
  backend: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    qkv = Dense((3, self.num_heads, self.head_dim), kernel_axes=('embed', None, 'heads', 'kv'), dtype=self.dtype,
                name='qkv')(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = LayerNorm(self.qk_norm_eps, param_axes=('kv',), name='q_norm')(q)
    k = LayerNorm(self.qk_norm_eps, param_axes=('kv',), name='k_norm')(k)
    out = attention(q, k, v, MaskSpec.full(), backend=self.backend)
    return Dense(x.shape[-1], axis=(-2, -1), kernel_axes=('heads', 'kv', 'embed'), dtype=self.dtype, name='out')(out)


class DiTBlock(nn.Module):
  """One expert-adaLN transformer block on the full [text; video] sequence."""
  num_heads: int
  head_dim: int
  mlp_dim: int
  text_length: int
  layer_norm_eps: float
  qk_norm_eps: float
  backend: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: Array, emb: Array) -> Array:
    width = h.shape[-1]
    chunks = Dense((len(MODULATIONS), width), kernel_axes=(None, None, 'embed'), dtype=self.dtype,
                   name='adaln')(nn.silu(emb))
    m = {name: chunks[:, i] for i, name in enumerate(MODULATIONS)}
    n = self.text_length

    def expert_modulate(x, kind):
      return jnp.concatenate([modulate(x[:, :n], m[f'text_shift_{kind}'], m[f'text_scale_{kind}']),
                              modulate(x[:, n:], m[f'shift_{kind}'], m[f'scale_{kind}'])], axis=1)

    def gated(update, kind):
      return jnp.concatenate([update[:, :n] * m[f'text_gate_{kind}'][:, None],
                              update[:, n:] * m[f'gate_{kind}'][:, None]], axis=1)

    x = expert_modulate(LayerNorm(self.layer_norm_eps, name='norm1')(h), 'attn')
    h = h + gated(Attention(self.num_heads, self.head_dim, self.qk_norm_eps, self.backend, self.dtype,
                            name='attn')(x), 'attn')
    x = expert_modulate(LayerNorm(self.layer_norm_eps, name='norm2')(h), 'mlp')
    h = h + gated(Mlp(self.mlp_dim, activation='gelu_tanh', dtype=self.dtype, name='mlp')(x), 'mlp')
    return constrain(h, SEQUENCE_AXES)


class ScannedBlock(nn.Module):
  """`DiTBlock` in an `nn.scan` step; adds the step's control residual (if any) and, for the control branch,
  projects the result through the step's zero linear."""
  block: dict
  zero_linear: bool = False

  @nn.compact
  def __call__(self, h: Array, xs: Any, emb: Array, control: Array | None):
    h = DiTBlock(**self.block, name='block')(h, emb)
    if control is not None:
      index = xs
      residual = jax.lax.dynamic_index_in_dim(control, jnp.minimum(index, control.shape[0] - 1), keepdims=False)
      h = h + jnp.where(index < control.shape[0], residual, jnp.zeros_like(residual)).astype(h.dtype)
    if self.zero_linear:
      h = Dense(h.shape[-1], use_bias=False, kernel_axes=('embed', 'mlp'), kernel_init=nn.initializers.zeros_init(),
                dtype=self.block['dtype'], name='zero_linear')(h)
      return h, h
    return h, None


def position_table(embed_dim: int, num_frames: int, height: int, width: int, spatial_interpolation: float,
                   temporal_interpolation: float, text_length: int) -> Array:
  """`cogvideox_3d_sincos_table` computed inside the program (float32 angles, about 1e-6 from the float64 table).

  As a numpy constant the table would be baked into every compiled DiT program (136 MB at 17,776 tokens × 1920);
  computed from iotas it costs a few elementwise ops per call and no constant memory. Only the per-axis
  frequencies (embed_dim/8 values) are constants."""
  if embed_dim % 16:
    raise ValueError(f'the 3D sin-cos table needs embed_dim divisible by 16, got {embed_dim}.')

  def sincos(positions, dim):  # [N] → [N, dim] = [sin(p·ω), cos(p·ω)], ω_j = 10000^(−j/(dim/2))
    omega = jnp.asarray(10000.0 ** (-np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)), jnp.float32)
    angles = positions[:, None] * omega[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)

  spatial_dim = 3 * embed_dim // 8
  per_frame = sincos(jnp.arange(num_frames, dtype=jnp.float32) / temporal_interpolation, embed_dim // 4)
  per_column = sincos(jnp.arange(width, dtype=jnp.float32) / spatial_interpolation, spatial_dim)
  per_row = sincos(jnp.arange(height, dtype=jnp.float32) / spatial_interpolation, spatial_dim)
  shape = (num_frames, height, width)
  video = jnp.concatenate([  # rows ordered (t, h, w), each [frame part, column part, row part] as CogVideoX's
      jnp.broadcast_to(per_frame[:, None, None], shape + per_frame.shape[-1:]),
      jnp.broadcast_to(per_column[None, None, :], shape + per_column.shape[-1:]),
      jnp.broadcast_to(per_row[None, :, None], shape + per_row.shape[-1:]),
  ], axis=-1).reshape(-1, embed_dim)
  return jnp.concatenate([jnp.zeros((text_length, embed_dim), jnp.float32), video], axis=0)


class Embeddings(nn.Module):
  """Timestep MLP, per-frame 2×2 patch embedding, text projection, [text; video] + 3D sin-cos table."""
  hidden_size: int
  time_embed_dim: int
  time_freq_dim: int
  patch_size: int
  spatial_interpolation: float
  temporal_interpolation: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latents: Array, timesteps: Array, text: Array) -> tuple[Array, Array]:
    b, t, height, width, channels = latents.shape
    p = self.patch_size
    freqs = timestep_embedding(timesteps.astype(jnp.float32), self.time_freq_dim, flip_sin_to_cos=True)
    emb = TimestepMLP(self.time_embed_dim, self.time_embed_dim, kernel_axes_in=(None, None),
                      kernel_axes_out=(None, None), dtype=self.dtype, name='time_embed')(freqs.astype(self.dtype))
    patches = latents.reshape(b, t, height // p, p, width // p, p, channels)
    video = Dense(self.hidden_size, axis=(3, 5, 6), kernel_axes=(None, None, None, 'embed'), dtype=self.dtype,
                  name='patch_embed')(patches.astype(self.dtype))
    video = video.reshape(b, -1, self.hidden_size)
    text = Dense(self.hidden_size, kernel_axes=(None, 'embed'), dtype=self.dtype, name='text_proj')(
        text.astype(self.dtype))
    table = position_table(self.hidden_size, t, height // p, width // p, self.spatial_interpolation,
                           self.temporal_interpolation, text_length=text.shape[1])
    h = jnp.concatenate([text, video], axis=1) + table.astype(self.dtype)
    return constrain(h, SEQUENCE_AXES), emb


class FinalLayer(nn.Module):
  """LayerNorm (eps 1e-5) → video tokens → adaLN [shift, scale] → LayerNorm (eps 1e-6) → linear → unpatchify."""
  out_channels: int
  patch_size: int
  layer_norm_eps: float
  final_norm_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: Array, emb: Array, text_length: int, grid: tuple[int, int, int]) -> Array:
    h = LayerNorm(self.layer_norm_eps, name='final_layernorm')(h[:, text_length:])
    shift_scale = Dense((2, h.shape[-1]), kernel_axes=(None, None, 'embed'), dtype=self.dtype, name='adaln')(
        nn.silu(emb))
    h = modulate(LayerNorm(self.final_norm_eps, name='norm_final')(h), shift_scale[:, 0], shift_scale[:, 1])
    p, c = self.patch_size, self.out_channels
    y = Dense((c, p, p), kernel_axes=('embed', None, None, None), dtype=self.dtype, name='proj')(h)
    t, gh, gw = grid
    y = y.reshape(h.shape[0], t, gh, gw, c, p, p).transpose(0, 1, 2, 5, 3, 6, 4)
    return y.reshape(h.shape[0], t, gh * p, gw * p, c)


class CogVideoXDiT(nn.Module):
  """`apply(params, latents[B,T,H,W,C], timesteps[B], text[B,226,4096], control=None) -> v[B,T,H,W,C]`.

  `control` is the stacked residuals [L_control, B, S, D] of `ControlBranch`, added after blocks 0..L_control−1.
  """
  config: Any
  attention_backend: str = 'auto'
  remat_policy: str = 'none'
  dtype: Any = jnp.float32

  def block_kwargs(self) -> dict:
    c = self.config
    return dict(num_heads=c.num_heads, head_dim=c.head_dim, mlp_dim=c.mlp_dim, text_length=c.text_length,
                layer_norm_eps=c.layer_norm_eps, qk_norm_eps=c.qk_norm_eps, backend=self.attention_backend,
                dtype=self.dtype)

  def embeddings(self) -> Embeddings:
    c = self.config
    return Embeddings(c.hidden_size, c.time_embed_dim, c.time_freq_dim, c.patch_size, c.spatial_interpolation,
                      c.temporal_interpolation, dtype=self.dtype, name='embed')

  def stack(self, num_layers: int, zero_linear: bool, name: str):
    return scan_layers(ScannedBlock, num_layers, self.block_kwargs(), zero_linear,
                       in_axes=(0, nn.broadcast, nn.broadcast), remat_policy=self.remat_policy, name=name)

  @nn.compact
  def __call__(self, latents: Array, timesteps: Array, text: Array, control: Array | None = None) -> Array:
    c = self.config
    check_inputs(c, latents, timesteps, text)
    h, emb = self.embeddings()(latents, timesteps, text)
    h, _ = self.stack(c.num_layers, False, 'blocks')(
        h, jnp.arange(c.num_layers), emb, control)
    b, t, height, width, _ = latents.shape
    grid = (t, height // c.patch_size, width // c.patch_size)
    out = FinalLayer(c.out_channels, c.patch_size, c.layer_norm_eps, c.final_norm_eps, self.dtype, name='final')(
        h, emb, c.text_length, grid)
    return out.astype(jnp.float32)


class ControlBranch(CogVideoXDiT):
  """The first `num_layers` blocks with their own embeddings and zero linears; returns the stacked residuals."""
  num_layers: int = 15

  @nn.compact
  def __call__(self, latents: Array, timesteps: Array, text: Array, condition: Array) -> Array:
    check_inputs(self.config, latents, timesteps, text)
    if condition.shape != latents.shape[-condition.ndim:]:
      raise ValueError(f'semantic condition {condition.shape} does not match the latents {latents.shape}.')
    h, emb = self.embeddings()(latents + condition.astype(latents.dtype), timesteps, text)
    _, residuals = self.stack(self.num_layers, True, 'blocks')(h, jnp.arange(self.num_layers), emb, None)
    return residuals


class ControlledDiT(nn.Module):
  """Backbone + control branch + semantic upsampler.

  `apply(params, latents, timesteps, text, condition=None)`; without a condition the control branch is skipped
  (the plain CogVideoX-2B). The condition [T, H, W, C] (or [B, T, H, W, C]) comes from
  `apply(params, features, method=ControlledDiT.semantic_condition)`, computed once per video.
  """
  dit_config: Any
  num_control_layers: int
  upsampler: SemanticUpsampler | None = None
  attention_backend: str = 'auto'
  remat_policy: str = 'none'
  dtype: Any = jnp.float32

  def setup(self):
    common = dict(attention_backend=self.attention_backend, remat_policy=self.remat_policy, dtype=self.dtype)
    self.dit = CogVideoXDiT(self.dit_config, **common)
    if self.num_control_layers:
      self.control = ControlBranch(self.dit_config, num_layers=self.num_control_layers, **common)

  def __call__(self, latents: Array, timesteps: Array, text: Array, condition: Array | None = None) -> Array:
    residuals = None
    if condition is not None:
      if not self.num_control_layers:
        raise ValueError('this model has no control branch (control.num_layers is 0); pass condition=None.')
      residuals = self.control(latents, timesteps, text, condition)
    return self.dit(latents, timesteps, text, residuals)

  def semantic_condition(self, features: Array) -> Array:
    """Tokenizer-decoder features [..., h, w, 768] → the control input condition [..., 2h, 2w, C]."""
    if self.upsampler is None:
      raise ValueError('this model has no semantic upsampler; build it with an upsampler config section.')
    return self.upsampler(features)

  def initialize(self, latents: Array, timesteps: Array, text: Array, features: Array | None) -> Array:
    condition = self.semantic_condition(features)[0] if features is not None else None
    return self(latents, timesteps, text, condition)

  def init_params(self, rng: Array, batch: int = 1) -> Any:
    c = self.dit_config
    latents = jnp.zeros((batch, 1, 2 * c.patch_size, 2 * c.patch_size, c.in_channels))
    text = jnp.zeros((batch, c.text_length, c.text_dim))
    features = None
    if self.num_control_layers and self.upsampler is not None:
      features = jnp.zeros((batch, 1, c.patch_size, c.patch_size, self.upsampler.in_channels))
    elif self.num_control_layers:
      return self.init(rng, latents, jnp.zeros((batch,)), text, latents[0])
    return self.init(rng, latents, jnp.zeros((batch,)), text, features, method=ControlledDiT.initialize)


def check_inputs(config: Any, latents: Any, timesteps: Any, text: Any) -> None:
  if latents.ndim != 5 or latents.shape[-1] != config.in_channels:
    raise ValueError(f'latents must be [batch, frames, height, width, {config.in_channels}] (channels last); '
                     f'got {tuple(latents.shape)}.')
  p = config.patch_size
  if latents.shape[2] % p or latents.shape[3] % p:
    raise ValueError(f'latent height and width must be multiples of the patch size {p}; got '
                     f'{latents.shape[2]}×{latents.shape[3]}.')
  if text.ndim != 3 or text.shape[1:] != (config.text_length, config.text_dim):
    raise ValueError(f'text features must be [batch, {config.text_length}, {config.text_dim}] (T5 output padded to '
                     f'{config.text_length} tokens); got {tuple(text.shape)}.')
  if timesteps.shape != (latents.shape[0],) or text.shape[0] != latents.shape[0]:
    raise ValueError(f'batch sizes differ: latents {latents.shape[0]}, timesteps {tuple(timesteps.shape)}, '
                     f'text {text.shape[0]}.')


def build_dit(config: Any, *, dtype: Any = jnp.float32, num_control_layers: int | None = None,
              attention_backend: str | None = None, remat_policy: str = 'none') -> ControlledDiT:
  """The renderer of a config holding `dit`, and optionally `control` and `upsampler`, sections."""
  dit_config = freeze(config.dit)
  if num_control_layers is None:
    num_control_layers = int(config.control.num_layers) if 'control' in config else 0
  upsampler = None
  if num_control_layers and 'upsampler' in config:
    upsampler = build_semantic_upsampler(config.upsampler, dtype=dtype)
  return ControlledDiT(dit_config, num_control_layers, upsampler,
                       attention_backend or config.get('attention_backend', 'auto'), remat_policy, jnp.dtype(dtype))


@dataclasses.dataclass(frozen=True)
class DiTSettings:
  """The numbers of a `dit` config section the model reads (hashable, so modules stay jit-static)."""
  num_layers: int
  hidden_size: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  time_embed_dim: int
  time_freq_dim: int
  patch_size: int
  in_channels: int
  out_channels: int
  text_length: int
  text_dim: int
  spatial_interpolation: float
  temporal_interpolation: float
  layer_norm_eps: float
  qk_norm_eps: float
  final_norm_eps: float

  @classmethod
  def from_config(cls, section: Any) -> DiTSettings:
    return cls(**{f.name: f.type == 'float' and float(section[f.name]) or section[f.name]
                  for f in dataclasses.fields(cls)})


def freeze(section: Any) -> DiTSettings:
  return DiTSettings.from_config(section)
