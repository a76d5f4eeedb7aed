"""LM stage: next-token cross-entropy over the visual and structural tokens of the release's layout (§4.3).

Each example is one clip: `ids` [groups · tokens_per_group] tokenizer ids, `text` [L_max, 4096] T5 features padded
to a common length with `text_length` real rows, `motion_score` (a float in [0, 1]). The sequence is
[BOS, micro(frames), micro(motion), text, SOI, I…, EOI, (SOP, P…, EOP)…, (SOI, … for later groups), EOS]; text
padding stays in the batch as masked slots that do not advance the RoPE positions. Condition dropout: the text is
replaced by the null-text vector (10 %), each micro-condition by a zero token (50 %).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax.train.tasks.base import StageTask
from landiff_jax.models import lm as lm_model
from landiff_jax.sampling.lm import Layout

EXAMPLE_KEYS = ('ids', 'text', 'text_length', 'motion_score')


class LMTask(StageTask):
  """The `landiff_jax.train.Task` of the LM stage."""

  example_keys = EXAMPLE_KEYS
  data_stage = 'lm'

  def __init__(self, config: Any, examples: Any = None):
    super().__init__(config, examples)
    c = config.lm
    self.model = lm_model.build_lm(c, dtype=jnp.dtype(config.compute_dtype), remat_policy=config.remat_policy,
                                   attention_backend=config.attention_backend)
    self.layout = Layout.from_config(config)
    self.dropout = {'text': float(c.text_dropout), 'motion_score': float(c.motion_dropout),
                    'frames': float(c.frames_dropout)}

  def example_shapes(self, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of `batch` one-group examples, text at its maximum length (for `landiff-jax plan`)."""
    c = self.config.lm
    return {'ids': jax.ShapeDtypeStruct((batch, self.layout.tokens_per_group), jnp.int32),
            'text': jax.ShapeDtypeStruct((batch, int(c.text_max_length), int(c.text_feature_dim)), jnp.float32),
            'text_length': jax.ShapeDtypeStruct((batch,), jnp.int32),
            'motion_score': jax.ShapeDtypeStruct((batch,), jnp.float32)}

  def init_params(self, rng: jax.Array, example_batch: Any) -> Any:
    del example_batch
    return self.model.init_params(rng)

  def groups(self, batch: Any) -> int:
    tokens = batch['ids'].shape[1]
    if tokens % self.layout.tokens_per_group:
      raise ValueError(f'examples hold {tokens} ids, not a whole number of {self.layout.tokens_per_group}-id groups.')
    return tokens // self.layout.tokens_per_group

  def count_units(self, batch: Any) -> dict[str, Any]:
    return {'samples': batch['ids'].shape[0], 'tokens': batch['ids'].size}

  def targets(self, ids: jax.Array, groups: int) -> jax.Array:
    """The generated part of the sequence [B, S]: the plan with the visual slots filled by `ids`."""
    plan = self.layout.plan(groups)
    visual = np.flatnonzero(plan < 0)
    return jnp.broadcast_to(jnp.asarray(plan), (ids.shape[0], len(plan))).at[:, visual].set(ids.astype(jnp.int32))

  def loss_fn(self, params: Any, batch: Any, rng: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    model, layout = self.model, self.layout
    groups = self.groups(batch)
    b, max_text = batch['text'].shape[:2]
    keys = dict(zip(('text', 'motion_score', 'frames'), jax.random.split(rng, 3)))
    keep = {k: jax.random.bernoulli(keys[k], 1.0 - p, (b,)) for k, p in self.dropout.items()}
    text = model.apply(params, batch['text'], method=model.embed_text)
    text = jnp.where(keep['text'][:, None, None], text, model.apply(params, text, method=model.null_text_like))
    values = {'frames': jnp.full((b,), float(groups * layout.frames_per_group)),
              'motion_score': batch['motion_score'].astype(jnp.float32)}
    micro = model.apply(params, {k: values[k] for k in model.settings.micro_conditions}, method=model.embed_micro)
    micro = micro * jnp.stack([keep[k] for k in model.settings.micro_conditions], axis=1)[..., None]
    special = model.apply(params, jnp.asarray([[layout.bos, layout.soi]]), method=model.embed_tokens)[0]
    targets = self.targets(batch['ids'], groups)
    generated = model.apply(params, targets[:, :-1], method=model.embed_tokens)
    embeds = jnp.concatenate([jnp.broadcast_to(special[0], (b, 1, special.shape[-1])), micro, text,
                              jnp.broadcast_to(special[1], (b, 1, special.shape[-1])), generated], axis=1)
    text_valid = jnp.arange(max_text)[None] < batch['text_length'].reshape(b, 1)
    valid = jnp.concatenate([jnp.ones((b, 1 + micro.shape[1]), bool), text_valid,
                             jnp.ones((b, 1 + generated.shape[1]), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    logits = model.apply(params, embeds, positions, valid)
    first = embeds.shape[1] - targets.shape[1]  # the SOI slot predicts the first generated token
    logits = logits[:, first:]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    is_visual = jnp.asarray(layout.plan(groups) < 0)
    visual_nll = jnp.sum(nll * is_visual) / (b * is_visual.sum())
    return jnp.mean(nll), {'visual_nll': visual_nll,
                           'accuracy': jnp.mean(jnp.argmax(logits, -1) == targets)}
