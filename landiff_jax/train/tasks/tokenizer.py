"""Tokenizer stage: reconstruct Theia features through the VQ bottleneck (reference landiff-official.md §3.1).

Loss = reconstruction MSE · w_rec + commitment MSE (code space, codes stop-gradient) · w_commit, with the
straight-through estimator. The codebook learns without gradients, as `vector_quantize_pytorch` does: an EMA
(decay 0.8) of the assigned vectors' sums and counts with Laplace smoothing, codes used less than the threshold (2)
replaced by random vectors of the batch, and a k-means initialisation from the first batch (unlike the
PyTorch library, whose EMA sums start as the centroids themselves, they start as centroid × count, so the first
EMA step does not shrink the codes). The codebook and its
EMA statistics (`quantizer_ema`) are therefore frozen for the optimizer and updated in `update_frozen`.

Examples (`train.data_dir`: a shard store of `landiff-jax prepare dataset`, or one `.npz` each): `features`
[T, 30, 45, 768] Theia features of a clip (a cache, so
the frozen ViT runs once per video).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from landiff_jax.models import tokenizer as tokenizer_model
from landiff_jax.models.quantizer import squared_distances
from landiff_jax.train.loop import STATE_UPDATE_KEY
from landiff_jax.train.tasks.base import StageTask
from landiff_jax.train.optimizer import flatten_params, split_frozen, unflatten_params

CODEBOOK_PATH = 'params/quantizer/codebook'
EMA_COLLECTION = 'quantizer_ema'
REQUIRED_FROZEN = ('quantizer/codebook', f'^{EMA_COLLECTION}/')
LAPLACE_EPS = 1e-5


def kmeans(x: jax.Array, k: int, iterations: int, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(centroids [k, D], counts [k]) of x [N, D]: k random samples, then Lloyd iterations (empty clusters stay)."""
  centroids = x[jax.random.randint(rng, (k,), 0, x.shape[0])]

  def step(centroids, _):
    assign = jax.nn.one_hot(jnp.argmin(squared_distances(x, centroids), axis=-1), k, dtype=x.dtype)
    counts = assign.sum(0)
    sums = jnp.einsum('nk,nd->kd', assign, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centroids), counts

  centroids, counts = jax.lax.scan(step, centroids, None, length=iterations)
  return centroids, counts[-1]


class TokenizerTask(StageTask):
  """The `landiff_jax.train.Task` of the tokenizer stage."""

  example_keys = ('features',)
  data_stage = 'tokenizer'

  def __init__(self, config: Any, examples: Any = None):
    super().__init__(config, examples)
    q = config.tokenizer.quantizer
    missing = [r for r in REQUIRED_FROZEN if r not in config.train.frozen]
    if missing:
      raise ValueError(f'train.frozen must include {list(REQUIRED_FROZEN)} (the codebook learns by EMA, not by the '
                       f'optimizer); use configs/train.py:tokenizer or add {missing}.')
    self.model = tokenizer_model.build_tokenizer(config.tokenizer, dtype=jnp.dtype(config.compute_dtype),
                                                 remat_policy=config.remat_policy,
                                                 attention_backend=config.attention_backend)
    self.decay, self.threshold = float(q.ema_decay), float(q.dead_code_threshold)
    self.commitment_weight, self.reconstruction_weight = float(q.commitment_weight), float(q.reconstruction_weight)
    self.kmeans_init = bool(q.kmeans_init)

  def example_shapes(self, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of `batch` one-group clips of features (for `landiff-jax plan`)."""
    s = self.model.settings
    return {'features': jax.ShapeDtypeStruct((batch, s.frames_per_group, *s.grid, s.feature_dim), jnp.float32)}

  def init_params(self, rng: jax.Array, example_batch: Any) -> Any:
    model_rng, kmeans_rng = jax.random.split(rng)
    variables = dict(self.model.init_params(model_rng))
    k, d = self.model.settings.codebook_size, self.model.settings.codebook_dim
    ema = {'embed_avg': jnp.zeros((k, d)), 'cluster_size': jnp.zeros((k,)), 'initted': jnp.zeros(())}
    if self.kmeans_init:
      params = jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x, variables,
                            is_leaf=lambda x: hasattr(x, 'unbox'))
      projected = self.model.apply(params, example_batch['features'],
                                   method=lambda m, f: m.quantizer.project(m.encoder(f)))
      centroids, counts = kmeans(projected.reshape(-1, d), k, 10, kmeans_rng)
      box = variables['params']['quantizer']['codebook']
      variables['params'] = dict(variables['params'])
      variables['params']['quantizer'] = dict(variables['params']['quantizer'], codebook=box.replace_boxed(centroids))
      ema = {'embed_avg': centroids * counts[:, None], 'cluster_size': counts, 'initted': jnp.ones(())}
    variables[EMA_COLLECTION] = ema
    return variables

  def loss_fn(self, params: Any, batch: Any, rng: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    del rng
    features = batch['features'].astype(jnp.float32)
    out = self.model.apply(params, features)
    reconstruction = jnp.mean(jnp.square(out['reconstruction'] - features))
    commitment = jnp.mean(jnp.square(out['projected'] - jax.lax.stop_gradient(out['codes'])))
    loss = self.reconstruction_weight * reconstruction + self.commitment_weight * commitment
    k = self.model.settings.codebook_size
    usage = jax.nn.one_hot(out['ids'].reshape(-1), k).mean(0)
    perplexity = jnp.exp(-jnp.sum(usage * jnp.log(jnp.maximum(usage, 1e-10))))
    return loss, {
        'reconstruction': reconstruction, 'commitment': commitment, 'perplexity': perplexity,
        'codes_used': jnp.sum(usage > 0) / k,
        # replaced codes restart at exactly the threshold, so `<=` counts the ones the last update re-seeded
        'dead_codes': jnp.sum(params[EMA_COLLECTION]['cluster_size'] <= self.threshold),
        STATE_UPDATE_KEY: {'projected': jax.lax.stop_gradient(out['projected']), 'ids': out['ids']},
    }

  def update_frozen(self, params: Any, inputs: Any, rng: jax.Array) -> Any:
    """EMA codebook update with dead-code replacement; returns the frozen sub-tree."""
    k, d = self.model.settings.codebook_size, self.model.settings.codebook_dim
    x = inputs['projected'].reshape(-1, d).astype(jnp.float32)
    assign = jax.nn.one_hot(inputs['ids'].reshape(-1), k, dtype=jnp.float32)
    ema = params[EMA_COLLECTION]
    cluster_size = self.decay * ema['cluster_size'] + (1 - self.decay) * assign.sum(0)
    embed_sum = jnp.einsum('nk,nd->kd', assign, x, precision=jax.lax.Precision.HIGHEST)
    embed_avg = self.decay * ema['embed_avg'] + (1 - self.decay) * embed_sum
    total = cluster_size.sum()
    smoothed = (cluster_size + LAPLACE_EPS) / (total + k * LAPLACE_EPS) * total
    codebook = embed_avg / smoothed[:, None]
    dead = cluster_size < self.threshold
    samples = x[jax.random.randint(jax.random.fold_in(rng, 1), (k,), 0, x.shape[0])]
    codebook = jnp.where(dead[:, None], samples, codebook)
    embed_avg = jnp.where(dead[:, None], samples * self.threshold, embed_avg)
    cluster_size = jnp.where(dead, self.threshold, cluster_size)
    flat = flatten_params(params)
    flat[CODEBOOK_PATH] = codebook
    flat[f'{EMA_COLLECTION}/embed_avg'], flat[f'{EMA_COLLECTION}/cluster_size'] = embed_avg, cluster_size
    flat[f'{EMA_COLLECTION}/initted'] = jnp.ones_like(ema['initted'])
    return split_frozen(unflatten_params(flat), list(self.config.train.frozen))[1]
