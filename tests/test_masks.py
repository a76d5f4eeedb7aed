"""Mask descriptions reproduce the official frame-causal masks (reference §3.6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landiff_jax.nn.masks import MaskSpec, VideoTokenLayout

# Toy example of reference §3.6 (T=3, F=4, I=3, P=2; rows q, cols k), verbatim.
TOY = """\
ENCODER                 DECODER
1111000000000000000     1111000000001110000
1111000000000000000     1111000000001110000
1111000000000000000     1111000000001110000
1111000000000000000     1111000000001110000
1111111100000000000     1111111100001111100
1111111100000000000     1111111100001111100
1111111100000000000     1111111100001111100
1111111100000000000     1111111100001111100
1111111111110000000     1111111111111111111
1111111111110000000     1111111111111111111
1111111111110000000     1111111111111111111
1111111111110000000     1111111111111111111
1111000000001000000     1111000000001110000
1111000000001100000     1111000000001110000
1111000000001110000     1111000000001110000
1111111100001111000     1111111100001111100
1111111100001111100     1111111100001111100
1111111111111111110     1111111111111111111
1111111111111111111     1111111111111111111
"""

TOY_LAYOUT = VideoTokenLayout(num_frames=3, tokens_per_frame=4, num_iframe_tokens=3, num_pframe_tokens=2)


def _toy_matrices():
  rows = [line.split() for line in TOY.splitlines()[1:]]
  to_array = lambda strings: np.array([[c == '1' for c in s] for s in strings])
  return to_array([r[0] for r in rows]), to_array([r[1] for r in rows])


def _mask_string(matrix):
  return '\n'.join(''.join('1' if b else '0' for b in row) for row in np.asarray(matrix))


def test_toy_encoder_mask_matches_reference():
  encoder, _ = _toy_matrices()
  got = MaskSpec.encoder(TOY_LAYOUT).materialize(19, 19)
  assert _mask_string(got) == _mask_string(encoder)


def test_toy_decoder_mask_matches_reference():
  _, decoder = _toy_matrices()
  got = MaskSpec.decoder(TOY_LAYOUT).materialize(19, 19)
  assert _mask_string(got) == _mask_string(decoder)


def _official_rule(kind, layout, q, k):
  """Restatement of the official per-token rules in terms of index ranges (reference §3.6 prose)."""
  f_tok, v = layout.tokens_per_frame, layout.num_visual_tokens
  i_end = v + layout.num_iframe_tokens

  def p_group(x):
    return 1 + (x - i_end) // layout.num_pframe_tokens

  if kind == 'encoder':
    if q < v:
      return k < v and k // f_tok <= q // f_tok
    if q < i_end:
      return (k < v and k // f_tok == 0) or (v <= k < i_end and k <= q)
    g = p_group(q)
    return (k < v and k // f_tok <= g) or (v <= k <= q)
  if q < v:
    f = q // f_tok
    return (k < v and k // f_tok <= f) or (v <= k < i_end + f * layout.num_pframe_tokens)
  if q < i_end:
    return (k < v and k // f_tok == 0) or (v <= k < i_end)
  g = p_group(q)
  return (k < v and k // f_tok <= g) or (v <= k < i_end + g * layout.num_pframe_tokens)


@pytest.mark.parametrize('kind', ['encoder', 'decoder'])
def test_mask_matches_range_restatement_on_uneven_layout(kind):
  layout = VideoTokenLayout(num_frames=4, tokens_per_frame=3, num_iframe_tokens=5, num_pframe_tokens=2)
  spec = getattr(MaskSpec, kind)(layout)
  expected = np.array([[_official_rule(kind, layout, q, k) for k in range(layout.length)]
                       for q in range(layout.length)])
  np.testing.assert_array_equal(np.asarray(spec.materialize(layout.length, layout.length)), expected)


def test_token_metadata_values():
  meta = TOY_LAYOUT.token_metadata()
  np.testing.assert_array_equal(meta.frame, [0] * 4 + [1] * 4 + [2] * 4 + [0] * 3 + [1] * 2 + [2] * 2)
  np.testing.assert_array_equal(meta.is_latent, [0] * 12 + [1] * 7)
  assert meta.frame.dtype == np.int32 and meta.is_latent.dtype == np.int32


def test_real_layout_length():
  layout = VideoTokenLayout(num_frames=13, tokens_per_frame=1350, num_iframe_tokens=330, num_pframe_tokens=74)
  assert layout.num_latent_tokens == 1218
  assert layout.length == 18768
  meta = layout.token_metadata()
  assert meta.frame[17549] == 12 and meta.frame[17550] == 0 and meta.frame[17550 + 330] == 1
  assert meta.frame[-1] == 12


def test_wrong_length_rejected():
  with pytest.raises(ValueError, match=r'20.*19|19.*20'):
    MaskSpec.encoder(TOY_LAYOUT).materialize(20, 20)
  with pytest.raises(ValueError, match='18'):
    MaskSpec.decoder(TOY_LAYOUT).materialize(19, 18)


def test_causal_with_offset_and_full():
  got = np.asarray(MaskSpec.causal().materialize(2, 5, q_offset=3))
  np.testing.assert_array_equal(got, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(np.asarray(MaskSpec.causal().materialize(3, 3)), np.tril(np.ones((3, 3), bool)))
  assert np.asarray(MaskSpec.full().materialize(2, 3)).all()


def test_allowed_broadcasts_and_excludes_out_of_range():
  spec = MaskSpec.encoder(TOY_LAYOUT)
  dense = np.asarray(spec.materialize(19, 19))
  q = np.arange(-2, 24)[:, None]
  k = np.arange(-2, 24)[None, :]
  padded = spec.allowed(q, k)
  assert isinstance(padded, np.ndarray)
  np.testing.assert_array_equal(padded[2:21, 2:21], dense)
  assert padded[2:21, 2:21].any() and padded.sum() == dense.sum()
  on_device = jax.jit(spec.allowed)(jnp.asarray(q), jnp.asarray(k))
  assert isinstance(on_device, jax.Array)
  np.testing.assert_array_equal(np.asarray(on_device), padded)


def test_spec_is_hashable_static_jit_arg():
  spec = MaskSpec.decoder(TOY_LAYOUT)
  assert spec == MaskSpec.decoder(VideoTokenLayout(3, 4, 3, 2)) and hash(spec) == hash(MaskSpec.decoder(TOY_LAYOUT))
  count = jax.jit(lambda s, offset: jnp.sum(s.materialize(19, 19, offset)), static_argnums=0)(spec, jnp.int32(0))
  assert int(count) == int(_toy_matrices()[1].sum())


def test_bad_specs_rejected():
  with pytest.raises(ValueError, match='kind'):
    MaskSpec('sliding')
  with pytest.raises(ValueError, match='VideoTokenLayout'):
    MaskSpec('frame_causal_encoder')
  with pytest.raises(ValueError, match='num_frames'):
    VideoTokenLayout(0, 4, 3, 2)
