"""Building blocks shared by every model: layers, RoPE, embeddings, MLPs, masks and attention."""

from landiff_jax.nn.attention import attention, available_backends, register_backend, xla_attention
from landiff_jax.nn.embeddings import (TimestepMLP, cogvideox_3d_sincos_table, sincos_1d, timestep_embedding)
from landiff_jax.nn.layers import Dense, Embed, GroupNorm, LayerNorm, RMSNorm, constrain
from landiff_jax.nn.masks import MASK_KINDS, MaskSpec, TokenMetadata, VideoTokenLayout
from landiff_jax.nn.mlp import ACTIVATIONS, GatedMlp, Mlp, activation_by_name
from landiff_jax.nn.stack import REMAT_POLICIES, scan_layers
from landiff_jax.nn.rope import (apply_rope, rope_1d_frequencies, rope_3d_band_sizes, rope_3d_frequencies,
                                 video_token_positions)

__all__ = [
    'ACTIVATIONS', 'Dense', 'Embed', 'GatedMlp', 'GroupNorm', 'LayerNorm', 'MASK_KINDS', 'MaskSpec', 'Mlp', 'REMAT_POLICIES', 'RMSNorm',
    'TimestepMLP', 'TokenMetadata', 'VideoTokenLayout', 'activation_by_name', 'apply_rope', 'attention',
    'available_backends', 'cogvideox_3d_sincos_table', 'constrain', 'register_backend', 'rope_1d_frequencies',
    'rope_3d_band_sizes', 'rope_3d_frequencies', 'scan_layers', 'sincos_1d', 'timestep_embedding', 'video_token_positions',
    'xla_attention',
]
