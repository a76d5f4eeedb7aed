"""Analytic FLOP counts (landiff_jax/bench/flops.py) against hand counts at the release's sizes."""

import numpy as np
import pytest

from landiff_jax import config as config_lib
from landiff_jax.bench import flops
from landiff_jax.nn.masks import MaskSpec, VideoTokenLayout


@pytest.fixture(scope='module')
def official():
  return config_lib.load_config('landiff_official')


def test_one_dit_layer_equals_a_hand_count(official):
  # CFG batch 2; 226 text + 13·30·45 video tokens; hidden 1,920 = 30 heads × 64; MLP 7,680; adaLN 512 → 12·1,920.
  tokens = 2 * 17776
  hand = (2 * 2 * 512 * 12 * 1920  # adaLN of the timestep embedding
          + 2 * tokens * 1920 * 3 * 1920  # fused qkv
          + 4 * 2 * 30 * 17776 * 17776 * 64  # q·kᵀ and p·v, full attention
          + 2 * tokens * 1920 * 1920  # output projection
          + 2 * tokens * 1920 * 7680 * 2)  # MLP in and out
  assert flops.dit_layer(official, batch=2) == hand
  # about 240 TFLOP per CFG step of the 30-layer backbone (the figure)
  assert 230e12 < flops.dit_forward(official, batch=2, control=False) < 250e12


def test_the_control_branch_adds_its_blocks_embeddings_and_zero_linears(official):
  backbone = flops.dit_forward(official, 2, control=False)
  zero_linear = 2 * (2 * 17776) * 1920 * 1920
  embeddings = flops.dit_embeddings(official, 2)
  assert flops.dit_forward(official, 2) - backbone == 15 * (flops.dit_layer(official, 2) + zero_linear) + embeddings


def test_one_lm_layer_equals_a_hand_count(official):
  # whole-sequence causal forward of 1,244 positions at batch 2: hidden 2,048 = 16 heads × 128, gated MLP 11,008
  length, batch = 1244, 2
  tokens = batch * length
  allowed_pairs = length * (length + 1) // 2
  hand = (2 * tokens * 2048 * 3 * 2048  # fused qkv
          + 4 * batch * 16 * allowed_pairs * 128  # causal attention
          + 2 * tokens * 2048 * 2048  # wo
          + 2 * tokens * 2048 * 11008 * 3)  # gate, up, down
  assert flops.lm_layer(official, batch, length, length) == pytest.approx(hand, rel=1e-12)
  # one decode step over 1,244 filled slots: every key allowed
  step = (2 * batch * 2048 * 3 * 2048 + 4 * batch * 16 * 1244 * 128 + 2 * batch * 2048 * 2048
          + 2 * batch * 2048 * 11008 * 3)
  assert flops.lm_layer(official, batch, 1, 1244, density=1.0) == step
  assert flops.lm_decode_step(official, batch, 1244) == 24 * step + 2 * batch * 2048 * 2055


def test_one_masked_attention_call_counts_only_allowed_pairs():
  layout = VideoTokenLayout(num_frames=3, tokens_per_frame=4, num_iframe_tokens=3, num_pframe_tokens=2)
  for mask in (MaskSpec.encoder(layout), MaskSpec.decoder(layout), MaskSpec.causal(), MaskSpec.full()):
    n = layout.length
    allowed = int(np.count_nonzero(mask.materialize(n, n)))
    assert flops.mask_density(mask, n, n) == pytest.approx(allowed / (n * n), rel=1e-12), mask.kind
    # batch 2, 3 heads, head dim 8: 4·D FLOPs per allowed pair and head
    assert flops.attention(2, 3, n, n, 8, flops.mask_density(mask, n, n)) == pytest.approx(2 * 3 * allowed * 4 * 8)


def test_the_tokenizer_masks_skip_about_half_of_the_release_pairs(official):
  layout = flops._tokenizer_layout(official)  # pylint: disable=protected-access
  assert layout.length == 18768
  encoder = flops.mask_density(MaskSpec.encoder(layout), layout.length, layout.length)
  decoder = flops.mask_density(MaskSpec.decoder(layout), layout.length, layout.length)
  assert 0.4 < encoder < 0.7 and 0.4 < decoder < 0.7
  assert flops.tokenizer_forward(official, 1) == flops.tokenizer_encode(official, 1) + flops.tokenizer_decode(official, 1)


def test_train_step_and_peak_lookup():
  assert flops.train_step(10.0) == 30.0
  assert flops.train_step(10.0, trained_fraction=0.0) == 20.0
  assert flops.peak_flops('NVIDIA H200') == 989.4e12
  assert flops.peak_flops('NVIDIA H100 PCIe') == 756.5e12
  assert flops.peak_flops('TPU v5p') == 459e12
  assert flops.peak_flops('cpu') is None
  assert flops.mfu(989.4e12, 2.0, 'NVIDIA H200') == pytest.approx(0.5)
