"""Analytic FLOP counts of the models at a config's sizes, for model FLOP utilisation (MFU).

XLA's cost analysis cannot be used for MFU: on GPU it does not see inside cuDNN or Pallas custom calls (a DiT step
showed as 0.02 TFLOP), and it counts the padding and masked work of kernels. These functions count what the model
asks for: 2 FLOPs per multiply-add of every matmul, and for attention 4·Lq·Lk·D per head (scores and the weighted
sum) times the fraction of (query, key) pairs the mask allows. Elementwise work (norms, softmax, activations, RoPE,
modulation) and the few-MFLOP layers that run once per sample (timestep MLPs, adaLN projections of one vector) are
counted only where noted; they are well under 0.1 % of any step at the release's sizes.

`config` is always the whole ConfigDict (configs/landiff_official.py or one with the same structure). Counts are
forward passes unless the name says otherwise; `train_step` turns a forward count into a training step's.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

# Dense bf16 matrix peak per device kind (vendor datasheets, dense, no sparsity), matched on a lower-case substring
# of `jax.Device.device_kind`; the first match wins, so more specific names come first.
PEAK_BF16_FLOPS = (
    ('h200', 989.4e12),
    ('h100 pcie', 756.5e12),
    ('h100', 989.4e12),
    ('h800', 989.4e12),
    ('gh200', 989.4e12),
    ('b200', 2250e12),
    ('a100', 312e12),
    ('a800', 312e12),
    ('l40s', 362e12),
    ('l4', 121e12),
    ('rtx 4090', 165.2e12),
    ('tpu v6', 918e12),
    ('tpu v5p', 459e12),
    ('tpu v5 lite', 197e12),
    ('tpu v5e', 197e12),
    ('tpu v4', 275e12),
)


def peak_flops(device: Any = None) -> float | None:
  """Dense bf16 peak FLOP/s of `device` (default: the first JAX device), or None when its kind is not known."""
  if device is None:
    import jax  # pylint: disable=import-outside-toplevel
    device = jax.devices()[0]
  kind = str(getattr(device, 'device_kind', device)).lower()
  for name, flops in PEAK_BF16_FLOPS:
    if name in kind:
      return flops
  return None


def mfu(flops: float, seconds: float, device: Any = None) -> float | None:
  """Model FLOP utilisation of `flops` done in `seconds` on one device, or None when its peak is not known."""
  peak = peak_flops(device)
  if peak is None or seconds <= 0:
    return None
  return flops / seconds / peak


def matmul(m: int, k: int, n: int) -> int:
  """[m, k] @ [k, n]."""
  return 2 * int(m) * int(k) * int(n)


def attention(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, density: float = 1.0) -> float:
  """Scores q·kᵀ and probabilities·v over the allowed fraction `density` of the (query, key) pairs."""
  return 4.0 * batch * heads * q_len * kv_len * head_dim * density


def causal_density(q_len: int, kv_len: int | None = None, q_offset: int = 0) -> float:
  """Fraction of pairs a causal mask allows: query i (absolute position q_offset + i) sees keys 0..q_offset + i."""
  kv_len = q_len + q_offset if kv_len is None else kv_len
  allowed = np.minimum(q_offset + np.arange(q_len, dtype=np.int64) + 1, kv_len).sum()
  return float(allowed) / (q_len * kv_len)


@functools.lru_cache(maxsize=32)
def mask_density(mask: Any, q_len: int, kv_len: int) -> float:
  """Fraction of (query, key) pairs a `MaskSpec` allows, counted exactly on the host a block of rows at a time."""
  if mask.kind == 'full':
    return 1.0
  if mask.kind == 'causal':
    return causal_density(q_len, kv_len)
  keys = np.arange(kv_len)[None, :]
  allowed = 0
  for start in range(0, q_len, 1024):
    rows = np.arange(start, min(start + 1024, q_len))[:, None]
    allowed += int(np.count_nonzero(mask.allowed(rows, keys)))
  return allowed / (q_len * kv_len)


# --- the renderer (CogVideoX-2B MMDiT + control branch) ------------------------------------------------------------

def dit_tokens(config: Any) -> tuple[int, int]:
  """(text tokens, video tokens) of one DiT sequence: 226 and 13·30·45 = 17,550 at the release's sizes."""
  c = config.dit
  video = c.latent_frames * (c.latent_height // c.patch_size) * (c.latent_width // c.patch_size)
  return int(c.text_length), int(video)


def dit_layer(config: Any, batch: int) -> float:
  """One expert-adaLN block over [text; video]: qkv, full attention, output projection, MLP, and its adaLN."""
  c = config.dit
  tokens = sum(dit_tokens(config)) * batch
  inner = c.num_heads * c.head_dim
  return (matmul(batch, c.time_embed_dim, c.num_modulations * c.hidden_size)
          + matmul(tokens, c.hidden_size, 3 * inner)
          + attention(batch, c.num_heads, sum(dit_tokens(config)), sum(dit_tokens(config)), c.head_dim)
          + matmul(tokens, inner, c.hidden_size)
          + matmul(tokens, c.hidden_size, c.mlp_dim) + matmul(tokens, c.mlp_dim, c.hidden_size))


def dit_embeddings(config: Any, batch: int) -> float:
  """Timestep MLP, 2×2 patch embedding and text projection."""
  c = config.dit
  text, video = dit_tokens(config)
  return (matmul(batch, c.time_freq_dim, c.time_embed_dim) + matmul(batch, c.time_embed_dim, c.time_embed_dim)
          + matmul(batch * video, c.patch_size**2 * c.in_channels, c.hidden_size)
          + matmul(batch * text, c.text_dim, c.hidden_size))


def dit_forward(config: Any, batch: int, control: bool = True) -> float:
  """One denoising call of `batch` rows (CFG's two rows are batch 2): backbone, and the control branch (its own
  embeddings, `control.num_layers` blocks, a zero linear after each) when `control`. The semantic upsampler runs
  once per video, not per step, and is not included."""
  c = config.dit
  text, video = dit_tokens(config)
  final = (matmul(batch, c.time_embed_dim, 2 * c.hidden_size)
           + matmul(batch * video, c.hidden_size, c.patch_size**2 * c.out_channels))
  total = dit_embeddings(config, batch) + c.num_layers * dit_layer(config, batch) + final
  if control:
    layers = int(config.control.num_layers)
    zero_linear = matmul(batch * (text + video), c.hidden_size, c.hidden_size)
    total += dit_embeddings(config, batch) + layers * (dit_layer(config, batch) + zero_linear)
  return total


# --- the semantic LM ---------------------------------------------------------------------------------------------

def lm_layer(config: Any, batch: int, q_len: int, kv_len: int, density: float | None = None) -> float:
  """One LLaMA-like block: fused qkv, attention of q_len queries over kv_len keys (causal unless `density` is
  given), output projection, gated MLP (three matmuls)."""
  c = config.lm
  inner = c.num_heads * c.head_dim
  tokens = batch * q_len
  if density is None:
    density = causal_density(q_len, kv_len, q_offset=kv_len - q_len)
  return (matmul(tokens, c.hidden_size, 3 * inner)
          + attention(batch, c.num_heads, q_len, kv_len, c.head_dim, density)
          + matmul(tokens, inner, c.hidden_size)
          + 2 * matmul(tokens, c.hidden_size, c.mlp_dim) + matmul(tokens, c.mlp_dim, c.hidden_size))


def lm_forward(config: Any, batch: int, length: int, text_length: int = 0) -> float:
  """Whole sequences of `length` positions (causal) and the vocabulary head at every position; `text_length` T5
  tokens per row also go through the text projection MLP."""
  c = config.lm
  dims = c.text_mlp_dims
  text = matmul(batch * text_length, dims[0], dims[1]) + matmul(batch * text_length, dims[1], dims[2])
  return (c.num_layers * lm_layer(config, batch, length, length) + matmul(batch * length, c.hidden_size, c.vocab_size)
          + text)


def lm_decode_step(config: Any, batch: int, kv_len: int) -> float:
  """One generated position per row, attending over the `kv_len` filled cache slots, and the head."""
  c = config.lm
  return c.num_layers * lm_layer(config, batch, 1, kv_len, density=1.0) + matmul(batch, c.hidden_size, c.vocab_size)


def lm_generate(config: Any, batch: int, prefix: int, generated: int) -> float:
  """A prefill of `prefix` positions then `generated` decode steps (what one sampled group costs)."""
  return (lm_forward(config, batch, prefix)
          + sum(lm_decode_step(config, batch, prefix + i + 1) for i in range(generated)))


# --- the video tokenizer -------------------------------------------------------------------------------------------

def _tokenizer_layout(config: Any):
  from landiff_jax.nn.masks import VideoTokenLayout  # pylint: disable=import-outside-toplevel
  t = config.tokenizer
  return VideoTokenLayout(int(t.frames_per_group), int(t.feature_grid[0] * t.feature_grid[1]),
                          int(t.num_iframe_tokens), int(t.num_pframe_tokens))


def _tokenizer_transformer(config: Any, batch: int, mask: Any, length: int) -> float:
  t = config.tokenizer
  width, mlp = t.width, t.width * t.mlp_ratio
  tokens = batch * length
  per_layer = (4 * matmul(tokens, width, width)
               + attention(batch, t.num_heads, length, length, width // t.num_heads, mask_density(mask, length, length))
               + matmul(tokens, width, mlp) + matmul(tokens, mlp, width))
  return t.num_layers * per_layer


def tokenizer_encode(config: Any, batch: int) -> float:
  """One group of Theia features → pre-quantization latents (the quantizer's nearest-code search is left out)."""
  from landiff_jax.nn.masks import MaskSpec  # pylint: disable=import-outside-toplevel
  t = config.tokenizer
  layout = _tokenizer_layout(config)
  return (matmul(batch * layout.num_visual_tokens, t.feature_dim, t.width)
          + _tokenizer_transformer(config, batch, MaskSpec.encoder(layout), layout.length)
          + matmul(batch * layout.num_latent_tokens, t.width, t.token_size))


def tokenizer_decode(config: Any, batch: int) -> float:
  """Quantized latents of one group → features."""
  from landiff_jax.nn.masks import MaskSpec  # pylint: disable=import-outside-toplevel
  t = config.tokenizer
  layout = _tokenizer_layout(config)
  visual = batch * layout.num_visual_tokens
  return (matmul(batch * layout.num_latent_tokens, t.token_size, t.width)
          + _tokenizer_transformer(config, batch, MaskSpec.decoder(layout), layout.length)
          + matmul(visual, t.width, t.decoder_ffn_dim) + matmul(visual, t.decoder_ffn_dim, t.feature_dim))


def tokenizer_forward(config: Any, batch: int) -> float:
  """Encode + decode of one group (a reconstruction, what a training step's forward runs)."""
  return tokenizer_encode(config, batch) + tokenizer_decode(config, batch)


# --- training ------------------------------------------------------------------------------------------------------

def train_step(forward_flops: float, trained_fraction: float = 1.0) -> float:
  """A training step from its forward count: the backward pass computes activation gradients (≈ one forward) and
  weight gradients of the trained parameters (≈ `trained_fraction` of a forward), the usual 3× when all train.
  Rematerialised activations are recomputation, not model FLOPs, and are not counted."""
  return forward_flops * (2.0 + trained_fraction)
