"""Semantic-token generation with the LM (reference landiff-official.md §4.3, §4.6): one jit-compiled function, a
prefill and a `lax.fori_loop` over positions with a preallocated KV cache.

Sequence per prompt: [BOS, micro(frames), micro(motion), text…, SOI] then, per group of 13 frames,
I×330, EOI, (SOP, P×74, EOP)×12, a new SOI before every later group, and EOS at the end. Structural positions are
forced; visual positions sample the full vocabulary (as the release does: a special id drawn there is fed back and
only clamped into the codebook at the end). Classifier-free guidance runs a second row per prompt whose text is the
learned null vector (same length), combining logits u + g·(c − u); both rows are fed the same sampled token.

Prompts of different lengths share a batch: prefixes are left-padded, padded slots are masked out of attention and
RoPE positions count real tokens only, so each row gets exactly the tokens it gets alone (per-row keys).

With two or more `devices`, the rows (conditional and CFG rows) are split over them (`sampling.devices`): each
device group holds its rows' KV cache and runs their forward passes; only the logits meet for guidance.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from landiff_jax.models.lm import SemanticLM, decode, empty_cache, layer_params, split_cache
from landiff_jax.sampling import devices as devices_lib

Array = jax.Array
TEXT_BUCKET = 64  # prefix text lengths are padded up to a multiple of this, so few lengths compile


@dataclasses.dataclass(frozen=True)
class Layout:
  """Token layout of one group and the special ids (from the `tokenizer` and `lm` config sections)."""
  num_iframe_tokens: int
  num_pframe_tokens: int
  frames_per_group: int
  codebook_size: int
  bos: int
  eos: int
  soi: int
  eoi: int
  sop: int
  eop: int

  @classmethod
  def from_config(cls, config: Any) -> Layout:
    t, ids = config.tokenizer, config.lm.special_ids
    return cls(int(t.num_iframe_tokens), int(t.num_pframe_tokens), int(t.frames_per_group),
               int(config.lm.codebook_size), int(ids.bos), int(ids.eos), int(ids.soi), int(ids.eoi), int(ids.sop),
               int(ids.eop))

  @property
  def tokens_per_group(self) -> int:
    return self.num_iframe_tokens + (self.frames_per_group - 1) * self.num_pframe_tokens

  def plan(self, num_groups: int) -> np.ndarray:
    """Forced id per generated position after the first SOI (−1 = visual, sampled); ends with EOS."""
    group = [-1] * self.num_iframe_tokens + [self.eoi]
    for _ in range(self.frames_per_group - 1):
      group += [self.sop] + [-1] * self.num_pframe_tokens + [self.eop]
    out = []
    for g in range(num_groups):
      out += ([self.soi] if g else []) + group
    return np.asarray(out + [self.eos], np.int32)


def groups_for(layout: Layout, num_frames: int) -> int:
  if num_frames < 1 or num_frames % layout.frames_per_group:
    raise ValueError(f'num_frames={num_frames} is not a whole number of {layout.frames_per_group}-frame groups; '
                     f'use a multiple of {layout.frames_per_group}.')
  return num_frames // layout.frames_per_group


def filter_logits(logits: Array, top_k: int, top_p: float) -> Array:
  """Keeps the top-k logits and the smallest prefix of sorted probabilities reaching top_p (first always kept)."""
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    keep_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < top_p  # mass before this one < p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def prefix_rows(model: SemanticLM, text: Array, lengths: Array, micro: dict[str, Array], layout: Layout,
                cfg: bool) -> tuple[Array, Array, Array]:
  """Left-padded prefix embeddings [R, P, D], RoPE positions [R, P] and validity [R, P]; R = B (or 2B with CFG:
  conditional rows first)."""
  b, max_text = text.shape[:2]
  text_embeds = model.embed_text(text)
  rows = [text_embeds] + ([model.null_text_like(text_embeds)] if cfg else [])
  micro_tokens = model.embed_micro(micro)
  special = model.embed_tokens(jnp.asarray([[layout.bos, layout.soi]], jnp.int32))[0]
  embeds, lengths_all = [], []
  for text_part in rows:
    bos = jnp.broadcast_to(special[0], (b, 1, special.shape[-1]))
    soi = jnp.broadcast_to(special[1], (b, 1, special.shape[-1]))
    embeds.append(jnp.concatenate([bos, micro_tokens, text_part, soi], axis=1))
    lengths_all.append(lengths)
  embeds, lengths = jnp.concatenate(embeds), jnp.concatenate(lengths_all)
  width = embeds.shape[1]  # 1 + micro + max_text + 1
  prefix_len = lengths + width - max_text  # real slots per row
  # Unpadded order is [BOS, micro, text (lengths[r] real), SOI at slot prefix_len−1]; move SOI right after the text.
  slot = jnp.arange(width)[None]
  soi_slot = width - 1
  source = jnp.where(slot == prefix_len[:, None] - 1, soi_slot, slot)
  unpadded = jnp.take_along_axis(embeds, source[..., None], axis=1)
  pad = width - prefix_len
  gathered = jnp.take_along_axis(unpadded, jnp.clip(slot - pad[:, None], 0, width - 1)[..., None], axis=1)
  valid = slot >= pad[:, None]
  positions = jnp.clip(slot - pad[:, None], 0, None)
  return jnp.where(valid[..., None], gathered, 0), positions, valid


def decode_step(model: SemanticLM, params: Any, layers: tuple[Any, ...], i: Array, logits: Array,
                caches: tuple[tuple[Array, Array], ...], tokens: Array,
                *, keys: Array, cfg_scale: Array, temperature: Array, plan: Array, valid: Array, next_position: Array,
                width: int, use_cfg: bool, top_k: int, top_p: float,
                progress: Callable[[Any], None] | None = None,
                mesh: Any = None) -> tuple[Array, tuple[Any, ...], Array]:
  """One generated position: guide and sample (or force) token i from `logits` [R, V], feed it to every row and
  return (the next logits, the per-layer caches with slot width + i written, tokens [B, steps] with column i set).

  `layers` are the block parameters split per layer (`models.lm.layer_params`), so the step streams each weight
  once; `params` supplies the embeddings, the final norm and the head. `mesh` (`devices.rows_mesh`) splits the
  rows over devices."""
  b = tokens.shape[0]
  guided = logits[:b]
  if use_cfg:
    guided = logits[b:] + cfg_scale * (logits[:b] - logits[b:])
  guided = filter_logits(guided / temperature, top_k, top_p)
  sampled = jax.vmap(lambda k, l: jax.random.categorical(jax.random.fold_in(k, i), l))(keys, guided)
  token = jnp.where(plan[i] >= 0, plan[i], sampled).astype(jnp.int32)
  tokens = tokens.at[:, i].set(token)
  if progress is not None:
    jax.lax.cond(i % 64 == 0, lambda: jax.debug.callback(progress, i), lambda: None)
  fed = jnp.concatenate([token] * (2 if use_cfg else 1))
  embed = devices_lib.constrain_rows(model.apply(params, fed[:, None], method=SemanticLM.embed_tokens), mesh)
  new_logits, caches = decode(model, params, layers, embed, (next_position + i)[:, None], valid, caches, width + i)
  caches = jax.tree.map(lambda c: devices_lib.constrain_rows(c, mesh), caches)
  return devices_lib.constrain_rows(new_logits, mesh), caches, tokens


@functools.partial(jax.jit, static_argnames=('model', 'layout', 'num_groups', 'use_cfg', 'top_k', 'top_p',
                                             'progress', 'mesh'))
def _generate(model: SemanticLM, params: Any, layers: tuple[Any, ...], text: Array, lengths: Array,
              micro: dict[str, Array], keys: Array, cfg_scale: Array, temperature: Array, *, layout: Layout,
              num_groups: int, use_cfg: bool, top_k: int, top_p: float, progress: Callable[[Any], None] | None,
              mesh: Any = None) -> Array:
  plan = jnp.asarray(layout.plan(num_groups))
  steps = plan.shape[0]
  b = text.shape[0]
  embeds, positions, prefix_valid = model.apply(params, text, lengths, micro, layout, use_cfg, method=prefix_rows)
  rows, width = embeds.shape[:2]
  max_len = width + steps
  valid = jnp.concatenate([prefix_valid, jnp.ones((rows, steps), bool)], axis=1)
  cache = empty_cache(model.settings, rows, max_len, model.dtype)
  embeds = devices_lib.constrain_rows(embeds, mesh)
  logits, cache = model.apply(params, embeds, positions, valid, cache, 0, method=SemanticLM.extend)
  caches = jax.tree.map(lambda c: devices_lib.constrain_rows(c, mesh), split_cache(cache))
  logits = devices_lib.constrain_rows(logits, mesh)
  next_position = positions[:, -1] + 1

  def step(i, carry):
    return decode_step(model, params, layers, i, *carry, keys=keys, cfg_scale=cfg_scale, temperature=temperature,
                       plan=plan, valid=valid, next_position=next_position, width=width, use_cfg=use_cfg,
                       top_k=top_k, top_p=top_p, progress=progress, mesh=mesh)

  tokens = jnp.zeros((b, steps), jnp.int32)
  # (the forward pass after the final, forced EOS is not needed; one spare step keeps the loop body uniform)
  _, _, tokens = jax.lax.fori_loop(0, steps, step, (logits, caches, tokens))
  visual = np.flatnonzero(layout.plan(num_groups) < 0)
  return jnp.clip(tokens[:, visual], 0, layout.codebook_size - 1)


_split_layers = jax.jit(layer_params)


def generate(model: SemanticLM, params: Any, text: list[np.ndarray] | np.ndarray, *, layout: Layout,
             key: Array, num_frames: int, motion_score: float | list[float] = 0.1, cfg_scale: float = 7.5,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, max_text_length: int | None = None,
             progress: Callable[[Any], None] | None = None, devices: Any = None) -> Array:
  """Semantic ids [B, groups·tokens_per_group] for B prompts' T5 features (a list of [L_b, 4096] arrays).

  `key` is one PRNG key (row b uses `fold_in(key, b)`) or a batch of keys [B] (row b uses keys[b]), so a row's
  tokens do not depend on what else is in the batch. CFG is on when cfg_scale is not 0 or 1. `devices` (a list or
  a mesh): with two or more, the rows run on different devices, with the same tokens as on one.
  """
  if isinstance(text, np.ndarray) and text.ndim == 2:
    text = [text]
  text = [np.asarray(t, np.float32) for t in text]
  if not text:
    raise ValueError('no prompts given.')
  for i, t in enumerate(text):
    if t.ndim != 2 or t.shape[0] == 0:
      raise ValueError(f'prompt {i}: text features must be [length ≥ 1, dim]; got {t.shape}. An empty prompt still '
                       f'has the T5 end-of-sequence token.')
  if max_text_length is not None and any(len(t) > max_text_length for t in text):
    warnings.warn(f'prompts longer than {max_text_length} text tokens are truncated to {max_text_length}.')
    text = [t[:max_text_length] for t in text]
  scores = [motion_score] * len(text) if np.isscalar(motion_score) else list(motion_score)
  if len(scores) != len(text) or not all(0.0 <= float(m) <= 1.0 for m in scores):
    raise ValueError(f'motion_score must be in [0, 1] (one value, or one per prompt); got {motion_score}.')
  num_groups = groups_for(layout, num_frames)
  lengths = np.asarray([len(t) for t in text], np.int32)
  padded_len = TEXT_BUCKET * math.ceil(lengths.max() / TEXT_BUCKET)
  batch = np.zeros((len(text), padded_len, text[0].shape[1]), np.float32)
  for i, t in enumerate(text):
    batch[i, :len(t)] = t
  key = jnp.asarray(key)
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  if key.ndim == (0 if typed else 1):  # one key
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(len(text)))
  else:
    keys = key
  if keys.shape[0] != len(text):
    raise ValueError(f'{keys.shape[0]} keys for {len(text)} prompts.')
  micro = {'frames': jnp.full((len(text),), float(num_frames)), 'motion_score': jnp.asarray(scores, jnp.float32)}
  micro = {k: v for k, v in micro.items() if k in model.settings.micro_conditions}
  use_cfg = cfg_scale not in (0, 1)
  mesh = devices_lib.rows_mesh(devices, len(text) * (2 if use_cfg else 1))
  params, keys = devices_lib.on_mesh_devices((params, keys), mesh)
  layers = _split_layers(params)
  return _generate(model, params, layers, jnp.asarray(batch), jnp.asarray(lengths), micro, keys,
                   jnp.float32(cfg_scale), jnp.float32(temperature), layout=layout, num_groups=num_groups,
                   use_cfg=use_cfg, top_k=int(top_k), top_p=float(top_p), progress=progress, mesh=mesh)
