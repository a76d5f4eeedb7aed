"""The dtype policy: every stage at tiny size in bf16 (bf16-stored parameters, bf16 matmuls) stays within a bf16
tolerance of its fp32 run; the tokenizer and Theia keep the release's autocast residual stream in fp32; a bf16
training step of each stage tracks its fp32 run with fp32 master weights and optimizer state."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landiff_jax.config import load_config
from landiff_jax.models import dit as dit_model
from landiff_jax.models import lm as lm_model
from landiff_jax.models import t5 as t5_model
from landiff_jax.models import theia as theia_model
from landiff_jax.models import tokenizer as tokenizer_model
from landiff_jax.models import vae as vae_model
from landiff_jax.parallel import strip_partitioning

BF16 = jnp.bfloat16
# bf16 keeps 8 mantissa bits (relative step 2⁻⁸ ≈ 0.4 %); a stage of a few layers that rounds every matmul input to
# bf16 stays within a few of those steps of its fp32 run
# (measured at tiny size: 0.6–1.7 %). Relative L2 error ‖bf16 − fp32‖ / ‖fp32‖ of a stage:
INFERENCE_RTOL = 3e-2


@pytest.fixture(scope='module')
def cfg():
  return load_config('configs/tiny.py')


def relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def randomised(params, seed, scale=0.1):
  """Every float leaf moved by N(0, scale²), so no zero-initialised path (adaLN, zero linears) is hidden."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                                   if jnp.issubdtype(p.dtype, jnp.floating) else p for p, k in zip(leaves, keys)])


def stored(params, dtype=BF16):
  """The parameters as inference stores and loads them (`config.storage_dtype`)."""
  return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def both(build, init, run, seed=0):
  """(fp32 output, bf16 output) of one stage: fp32 parameters and compute, then bf16-stored parameters and bf16
  compute, on the same randomised weights."""
  model32 = build(jnp.float32)
  params = randomised(strip_partitioning(init(model32)), seed)
  out16 = jax.jit(functools.partial(run, build(BF16)))(stored(params))
  return np.asarray(jax.jit(functools.partial(run, model32))(params)), np.asarray(out16, np.float32)


# --- inference: each stage in bf16 tracks fp32 ----------------------------------------------------------------------


def test_tokenizer_encode_and_decode_in_bf16(cfg):
  build = lambda dtype: tokenizer_model.build_tokenizer(cfg.tokenizer, dtype=dtype)
  s = tokenizer_model.TokenizerSettings.from_config(cfg.tokenizer)
  features = jax.random.normal(jax.random.key(1), (2, s.frames_per_group, *s.grid, s.feature_dim))
  init = lambda m: m.init_params(jax.random.key(0))
  encoded32, encoded16 = both(build, init, lambda m, p: m.apply(p, features, method=lambda m, f: m.encoder(f)))
  assert relative_error(encoded16, encoded32) < INFERENCE_RTOL
  ids = jax.random.randint(jax.random.key(2), (2, s.num_tokens(s.frames_per_group)), 0, s.codebook_size)
  decoded32, decoded16 = both(build, init, lambda m, p: m.apply(p, ids, method=tokenizer_model.VideoTokenizer.decode_group))
  assert decoded16.dtype == np.float32
  assert relative_error(decoded16, decoded32) < INFERENCE_RTOL


def test_lm_logits_in_bf16(cfg):
  build = lambda dtype: lm_model.build_lm(cfg.lm, dtype=dtype)
  length = 12
  embeds = jax.random.normal(jax.random.key(1), (2, length, cfg.lm.hidden_size))
  positions = jnp.broadcast_to(jnp.arange(length), (2, length))
  valid = jnp.ones((2, length), bool)
  logits32, logits16 = both(build, lambda m: m.init_params(jax.random.key(0)),
                            lambda m, p: m.apply(p, embeds, positions, valid))
  assert logits16.dtype == np.float32
  assert relative_error(logits16, logits32) < INFERENCE_RTOL


def test_t5_in_bf16(cfg):
  build = lambda dtype: t5_model.build_t5(cfg.t5_dit, dtype=dtype)
  ids = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.t5_dit.vocab_size)
  hidden32, hidden16 = both(build, lambda m: m.init_params(jax.random.key(0)), lambda m, p: m.apply(p, ids))
  assert relative_error(hidden16, hidden32) < INFERENCE_RTOL


def test_dit_step_with_control_in_bf16(cfg):
  c = cfg.dit
  build = lambda dtype: dit_model.build_dit(cfg, dtype=dtype)
  latents = jax.random.normal(jax.random.key(1), (2, c.latent_frames, c.latent_height, c.latent_width, c.in_channels))
  text = jax.random.normal(jax.random.key(2), (2, c.text_length, c.text_dim))
  features = jax.random.normal(jax.random.key(3), (c.latent_frames, c.latent_height // 2, c.latent_width // 2,
                                                   cfg.upsampler.in_channels))
  timesteps = jnp.array([999.0, 19.0])

  def step(model, params):
    condition = model.apply(params, features, method=dit_model.ControlledDiT.semantic_condition)
    return model.apply(params, latents, timesteps, text, condition)

  v32, v16 = both(build, lambda m: m.init_params(jax.random.key(0)), step)
  assert v16.dtype == np.float32
  assert relative_error(v16, v32) < INFERENCE_RTOL


def test_vae_decode_in_bf16(cfg):
  build = lambda dtype: vae_model.build_vae(cfg.vae, dtype=dtype, with_encoder=False)
  latents = jax.random.normal(jax.random.key(1), (1, 3, 4, 6, cfg.vae.latent_channels))
  video32, video16 = both(build, lambda m: m.init_params(jax.random.key(0)),
                          lambda m, p: vae_model.decode(m, p, latents), seed=3)
  assert video16.shape == (1, 9, 32, 48, 3)
  assert relative_error(video16, video32) < INFERENCE_RTOL


def test_theia_in_bf16(cfg):
  build = lambda dtype: theia_model.build_theia(cfg.theia, dtype=dtype)
  frames = jax.random.randint(jax.random.key(1), (2, 32, 48, 3), 0, 256).astype(jnp.uint8)
  features32, features16 = both(build, lambda m: m.init_params(jax.random.key(0)), lambda m, p: m.apply(p, frames))
  assert features16.dtype == np.float32
  assert relative_error(features16, features32) < INFERENCE_RTOL


# --- the release's autocast semantics: where the residual stream is fp32 ---------------------------------------------


def scan_carry_dtypes(fn, *args):
  """dtypes of the carries of every `scan` in fn's jaxpr (the layer stacks' residual streams)."""
  dtypes = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'scan':
        carry = eqn.params['num_carry']
        consts = eqn.params['num_consts']
        dtypes.extend(v.aval.dtype for v in eqn.invars[consts:consts + carry] if v.aval.ndim == 3)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          sub = getattr(sub, 'jaxpr', sub)  # ClosedJaxpr → Jaxpr
          if hasattr(sub, 'eqns'):
            visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return dtypes


def test_tokenizer_residual_stream_is_fp32_under_bf16_compute(cfg):
  """The release runs the tokenizer under bf16 autocast: LayerNorm returns fp32, so `x + bf16 update` promotes and
  the residual stream between blocks is fp32, not bf16 (while the projections are bf16 matmuls)."""
  model = tokenizer_model.build_tokenizer(cfg.tokenizer, dtype=BF16)
  s = model.settings
  params = stored(strip_partitioning(model.init_params(jax.random.key(0))))
  features = jnp.zeros((1, s.frames_per_group, *s.grid, s.feature_dim))
  ids = jnp.zeros((1, s.num_tokens(s.frames_per_group)), jnp.int32)
  encode = lambda p, f: model.apply(p, f, method=lambda m, f: m.encoder(f))
  decode = lambda p, i: model.apply(p, i, method=tokenizer_model.VideoTokenizer.decode_group)
  for fn, x in ((encode, features), (decode, ids)):
    carries = scan_carry_dtypes(fn, params, x)
    assert carries and all(d == jnp.float32 for d in carries), carries
  # and numerically: a block whose updates are zero must hand its input through unrounded
  block = tokenizer_model.Block(s, tokenizer_model.MaskSpec.full(), dtype=BF16)
  x = 1.0 + 1e-4 * jax.random.normal(jax.random.key(1), (1, 5, s.width))  # differences far below bf16's 2⁻⁸
  angles = jnp.zeros((5, s.head_dim // 2))
  block_params = strip_partitioning(block.init(jax.random.key(2), x, angles))
  zeroed = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.zeros_like(p) if any(getattr(k, 'key', None) in ('wo', 'fc2') for k in path) else p,
      block_params)
  out, _ = block.apply(stored(zeroed), x, angles)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
  # while the matmuls inside are bf16
  jaxpr = str(jax.make_jaxpr(lambda p, x: block.apply(p, x, angles))(stored(block_params), x))
  assert 'bf16' in jaxpr and 'dot_general' in jaxpr


def test_theia_residual_stream_is_fp32_under_bf16_compute(cfg):
  model = theia_model.build_theia(cfg.theia, dtype=BF16)
  params = stored(strip_partitioning(model.init_params(jax.random.key(0))))
  frames = jnp.zeros((1, 32, 32, 3), jnp.uint8)
  carries = scan_carry_dtypes(lambda p, f: model.apply(p, f), params, frames)
  assert carries and all(d == jnp.float32 for d in carries), carries


def test_stages_without_autocast_keep_the_release_bf16_residual(cfg):
  """The release casts the diffusion engine (DiT, T5, VAE) and runs the LM blocks with a bf16 residual; so do we,
  which halves the activations of the largest stages."""
  lm = lm_model.build_lm(cfg.lm, dtype=BF16)
  params = stored(strip_partitioning(lm.init_params(jax.random.key(0))))
  embeds = jnp.zeros((1, 4, cfg.lm.hidden_size))
  carries = scan_carry_dtypes(lambda p, e: lm.apply(p, e, jnp.arange(4)[None], jnp.ones((1, 4), bool)), params, embeds)
  assert carries and all(d == BF16 for d in carries), carries
  dit = dit_model.build_dit(cfg, dtype=BF16, num_control_layers=0)
  params = stored(strip_partitioning(dit.init_params(jax.random.key(0))))
  c = cfg.dit
  latents = jnp.zeros((1, 1, 4, 4, c.in_channels))
  carries = scan_carry_dtypes(lambda p, x: dit.apply(p, x, jnp.zeros((1,)), jnp.zeros((1, c.text_length, c.text_dim))),
                              params, latents)
  assert carries and all(d == BF16 for d in carries), carries
