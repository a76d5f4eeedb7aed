"""The dtype policy: every stage at tiny size in bf16 (bf16-stored parameters, bf16 matmuls) stays within a bf16
tolerance of its fp32 run; the tokenizer and Theia keep the release's autocast residual stream in fp32; a bf16
training step of each stage tracks its fp32 run with fp32 master weights and optimizer state."""

import functools

from flax import linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import pytest

from landiff_jax.config import load_config
from landiff_jax.data.shapes import NUM_SEMANTIC_CLASSES
from landiff_jax.models import dit as dit_model
from landiff_jax.models import lm as lm_model
from landiff_jax.models import t5 as t5_model
from landiff_jax.models import theia as theia_model
from landiff_jax.models import tokenizer as tokenizer_model
from landiff_jax.models import vae as vae_model
from landiff_jax.nn import Dense
from landiff_jax.nn.precision import gradient_reduce_dtype
from landiff_jax.parallel import make_mesh, strip_partitioning
from landiff_jax.train import train, validate_train_config
from landiff_jax.train.tasks.diffusion import DiffusionTask
from landiff_jax.train.tasks.lm import LMTask
from landiff_jax.train.tasks.theia import TheiaTask, cell_size
from landiff_jax.train.tasks.tokenizer import TokenizerTask
from landiff_jax.train.tasks.vae import VAETask
import test_train_diffusion  # the tests dir is on sys.path: reuse the stages' tiny configs and examples
import test_train_lm
import test_train_tokenizer
import test_train_vae

BF16 = jnp.bfloat16
# bf16 keeps 8 mantissa bits (relative step 2⁻⁸ ≈ 0.4 %); a stage of a few layers that rounds every matmul input to
# bf16 stays within a few of those steps of its fp32 run (measured at tiny size: 0.6–1.7 %). Relative L2 error
# ‖bf16 − fp32‖ / ‖fp32‖ of a stage:
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


def test_release_sizes_keep_the_policy_on_abstract_shapes():
  """At the release's sizes (traced on abstract shapes, nothing allocated): bf16-stored parameters, bf16 matmuls in
  the blocks, an fp32 residual stream for the tokenizer (18,768 tokens) and Theia, bf16 for the LM."""
  official = load_config('configs/landiff_official.py')
  S = jax.ShapeDtypeStruct

  def abstract_bf16(init):
    shapes = strip_partitioning(jax.eval_shape(init))
    return jax.tree.map(lambda p: S(p.shape, BF16 if jnp.issubdtype(p.dtype, jnp.floating) else p.dtype), shapes)

  def dot_dtypes(fn, *args):
    return {str(e.outvars[0].aval.dtype) for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if e.primitive.name == 'scan'
            for e in e.params['jaxpr'].jaxpr.eqns if e.primitive.name == 'dot_general'}

  tokenizer = tokenizer_model.build_tokenizer(official.tokenizer, dtype=BF16, attention_backend='auto')
  s = tokenizer.settings
  params = abstract_bf16(lambda: tokenizer.init_params(jax.random.key(0)))
  ids = S((1, s.num_tokens(13)), jnp.int32)
  decode = lambda p, i: tokenizer.apply(p, i, method=tokenizer_model.VideoTokenizer.decode_group)
  assert ids.shape == (1, 1218)
  assert scan_carry_dtypes(decode, params, ids) == [jnp.float32]
  assert 'bfloat16' in dot_dtypes(decode, params, ids)
  theia = theia_model.build_theia(official.theia, dtype=BF16, attention_backend='auto')
  params = abstract_bf16(lambda: theia.init_params(jax.random.key(0)))
  assert scan_carry_dtypes(lambda p, f: theia.apply(p, f), params, S((1, 480, 720, 3), jnp.uint8)) == [jnp.float32]
  lm = lm_model.build_lm(official.lm, dtype=BF16, attention_backend='auto')
  params = abstract_bf16(lambda: lm.init_params(jax.random.key(0)))
  n = 1284
  forward = lambda p, e: lm.apply(p, e, jnp.arange(n)[None], jnp.ones((1, n), bool))
  assert scan_carry_dtypes(forward, params, S((1, n, official.lm.hidden_size), BF16)) == [BF16]
  assert jax.eval_shape(forward, params, S((1, n, official.lm.hidden_size), BF16)).dtype == jnp.float32  # logits


# --- training: parameter gradients in train.grad_reduce_dtype ---------------------------------------------------------


def test_dense_parameter_gradients_come_in_the_stated_dtype():
  """Inside `gradient_reduce_dtype(float32)` a bf16-compute dense layer with fp32 parameters gets the exact gradient
  of its bf16 forward (no bf16 rounding of the batch sum), and on a data-parallel mesh the cross-device reduction
  of that gradient is an fp32 all-reduce."""
  layer = Dense((5, 6), axis=(3, 1), dtype=BF16)  # contracted axes out of order, two output axes
  x = jax.random.normal(jax.random.key(1), (16, 3, 7, 4))
  params = nn.meta.unbox(layer.init(jax.random.key(0), x))
  weights = jax.random.normal(jax.random.key(2), (16, 7, 5, 6))
  loss = lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32) * weights)
  plain = jax.grad(loss, argnums=(0, 1))(params, x)
  with gradient_reduce_dtype('float32'):
    mixed = jax.grad(loss, argnums=(0, 1))(params, x)
  with gradient_reduce_dtype('bfloat16'):
    coarse = jax.grad(loss, argnums=(0, 1))(params, x)
  # float64 gradient of the bf16 forward: x and the output cotangent as bf16 sees them
  xb = np.asarray(x.astype(BF16), np.float64)
  gb = np.asarray(weights.astype(BF16), np.float64)
  want_kernel, want_bias = np.einsum('abcd,acef->dbef', xb, gb), gb.sum((0, 1))
  for grads, rtol in ((mixed, 1e-5), (coarse, 2e-2)):
    assert grads[0]['params']['kernel'].dtype == jnp.float32
    np.testing.assert_allclose(grads[0]['params']['kernel'], want_kernel, rtol=rtol, atol=rtol * np.abs(want_kernel).max())
    np.testing.assert_allclose(grads[0]['params']['bias'], want_bias, rtol=rtol, atol=rtol * np.abs(want_bias).max())
    np.testing.assert_array_equal(grads[1], plain[1])  # the input gradient is autodiff's own
  assert relative_error(plain[0]['params']['bias'], want_bias) > 1e-4  # plain autodiff sums in bf16
  mesh = make_mesh({'data': 2, 'fsdp': 1, 'tensor': 1}, jax.devices()[:2])

  def grads_on_mesh(p, x):
    with gradient_reduce_dtype('float32'):
      return jax.grad(loss)(p, x)

  step = jax.jit(grads_on_mesh, in_shardings=(NamedSharding(mesh, PartitionSpec()),
                                             NamedSharding(mesh, PartitionSpec('data'))))
  reductions = [line for line in step.lower(params, x).compile().as_text().splitlines() if ' all-reduce(' in line]
  assert reductions and all('bf16' not in line.split('all-reduce(')[0] for line in reductions), reductions


# --- training: bf16 compute from fp32 masters ------------------------------------------------------------------------


TRAIN_STEPS = 20
# The mean loss of each 5-step window of the bf16 run is within TRAIN_RTOL of the fp32 run's: the two runs start
# from the same fp32 masters and see the same batches, so they differ only by the bf16 rounding of the compute, which
# the updates carry along the trajectory (single steps of these tiny batches differ by up to 9 %, the VAE's by 15 %).
TRAIN_RTOL, WINDOW = 1e-1, 5


def theia_examples(cfg, count=16):
  rng = np.random.default_rng(0)
  v, cell = cfg.video, cell_size(cfg.theia)
  logits = rng.standard_normal((count, v.height // cell, v.width // cell, NUM_SEMANTIC_CLASSES))
  targets = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return [dict(frame=rng.integers(0, 256, (v.height, v.width, 3), dtype=np.uint8),
               semantics=targets[i].astype(np.float32)) for i in range(count)]


STAGES = {
    'tokenizer': (TokenizerTask, lambda w, *o: test_train_tokenizer.tiny(w, 'train.checkpoint_every=1000', *o),
                  lambda cfg: test_train_tokenizer.clips(cfg, 16)),
    'lm': (LMTask, lambda w, *o: test_train_lm.tiny(w, 'lm.text_dropout=0.0', *o),
           lambda cfg: test_train_lm.examples(cfg, 16)[0]),
    'control': (DiffusionTask, test_train_diffusion.tiny, test_train_diffusion.examples),
    'vae': (VAETask, lambda w, *o: test_train_vae.tiny(w, 'video.num_frames=1', *o), test_train_vae.examples),
    'theia': (TheiaTask, lambda w, *o: load_config('configs/train.py:theia,tiny', [
        f'train.workdir={w}', 'train.learning_rate=1e-2', 'train.warmup_steps=3', 'video.height=32',
        'video.width=32', *o]), theia_examples),
}


def train_run(stage, workdir, compute_dtype):
  task_class, tiny, examples = STAGES[stage]
  batch = 8 if stage == 'vae' else 4  # the VAE (its single-frame phase) at its own batch: 4 frames are too noisy
  cfg = tiny(str(workdir), f'train.num_steps={TRAIN_STEPS}', f'train.batch_size={batch}', 'train.checkpoint_every=1000',
             'train.log_every=1000', f'compute_dtype={compute_dtype}')
  losses = []
  hook = lambda step, state, metrics: losses.append(np.asarray(metrics['loss']))
  # two devices: the gradients are reduced across the data axis (in train.grad_reduce_dtype), and it compiles fast
  mesh = make_mesh({'data': 2, 'fsdp': 1, 'tensor': 1}, jax.devices()[:2])
  state = train(task_class(cfg, examples(cfg)), cfg.train, cfg.parallel, mesh=mesh, hooks=[hook])
  return state, np.array(losses)


@pytest.mark.parametrize('stage', sorted(STAGES))
def test_bf16_training_tracks_fp32_with_fp32_masters(stage, tmp_path):
  _, losses32 = train_run(stage, tmp_path / 'fp32', 'float32')
  state, losses16 = train_run(stage, tmp_path / 'bf16', 'bfloat16')
  assert losses16.dtype == np.float32 and len(losses16) == TRAIN_STEPS
  windows = lambda losses: losses.reshape(-1, WINDOW).mean(axis=1)
  np.testing.assert_allclose(windows(losses16), windows(losses32), rtol=TRAIN_RTOL)
  assert losses16[-5:].mean() < losses16[:5].mean(), losses16  # and it learns
  # master weights, EMA and every float leaf of the optimizer state stay fp32
  for tree in (state.params, state.frozen_params, state.opt_state, state.ema_params):
    floats = [leaf.dtype for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert all(d == jnp.float32 for d in floats), set(floats)
  assert jax.tree.leaves(state.opt_state)


def test_an_unknown_gradient_reduction_dtype_is_refused(tmp_path):
  cfg = load_config('configs/tiny.py', [f'train.workdir={tmp_path}', 'train.grad_reduce_dtype=fp8'])
  with pytest.raises(ValueError, match='grad_reduce_dtype'):
    validate_train_config(cfg.train)
