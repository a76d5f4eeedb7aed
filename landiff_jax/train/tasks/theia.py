"""Semantic ViT stage: teach a small Theia-architecture ViT to see objects (the built-in demo's feature extractor).

The released Theia is distilled from vision foundation models, so its features describe what is in a patch rather
than its pixels. The demo has no foundation model to distil, but its procedural scenes come with the ground truth
of what is where: each example pairs a frame with the fraction of every cell (half a patch on a side) covered by
each (colour, shape) class or the background (`data.shapes.semantic_map`). A linear head on the ViT's patch
features predicts those fractions (soft-target cross-entropy); `landiff-jax export theia` keeps the ViT and drops
the head. A random ViT's features mostly describe the background's texture, which is what a reconstruction-trained
tokenizer then spends its codes on; these describe the shapes.

Examples (`train.data_dir`, one `.npz` each): `frame` uint8 [H, W, 3], `semantics` float32 [H/c, W/c, classes]
with c = patch_size / CELLS_PER_PATCH (`landiff-jax prepare semantics`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from landiff_jax.data.shapes import NUM_SEMANTIC_CLASSES
from landiff_jax.models.theia import Theia, TheiaSettings
from landiff_jax.nn import Dense
from landiff_jax.train.tasks.base import StageTask

CELLS_PER_PATCH = 2  # semantic targets per patch side


class SemanticViT(nn.Module):
  """Theia (`vit`) + a linear head (`head`): frames [B, H, W, 3] → logits [B, H/c, W/c, classes]."""
  settings: TheiaSettings
  num_classes: int
  cells: int = CELLS_PER_PATCH
  dtype: Any = jnp.float32
  attention_backend: str = 'auto'

  @nn.compact
  def __call__(self, frames: jax.Array) -> jax.Array:
    features = Theia(self.settings, self.attention_backend, dtype=self.dtype, name='vit')(frames)
    b, h, w, _ = features.shape
    c = self.cells
    logits = Dense(c * c * self.num_classes, kernel_axes=('embed', None), dtype=self.dtype, name='head')(features)
    logits = logits.reshape(b, h, w, c, c, self.num_classes).transpose(0, 1, 3, 2, 4, 5)
    return logits.reshape(b, h * c, w * c, self.num_classes).astype(jnp.float32)


def cell_size(theia_config: Any) -> int:
  """The side in pixels of a semantic-map cell for a ViT of this config (`CELLS_PER_PATCH` cells per patch side)."""
  patch = int(theia_config.patch_size)
  if patch % CELLS_PER_PATCH:
    raise ValueError(f'theia.patch_size={patch} does not split into {CELLS_PER_PATCH} cells.')
  return patch // CELLS_PER_PATCH


def vit_params(params: Any) -> Any:
  """The ViT's parameters of a `SemanticViT` tree: what a `theia` model directory holds."""
  if 'vit' not in params.get('params', {}):
    raise ValueError('these parameters have no semantic ViT (params/vit); were they trained by '
                     '`landiff-jax train theia`?')
  return {'params': params['params']['vit']}


class TheiaTask(StageTask):
  """The `landiff_jax.train.Task` of the semantic ViT stage."""

  example_keys = ('frame', 'semantics')

  def __init__(self, config: Any, examples: Any = None):
    super().__init__(config, examples)
    self.cell = cell_size(config.theia)
    self.model = SemanticViT(TheiaSettings.from_config(config.theia), NUM_SEMANTIC_CLASSES,
                             dtype=jnp.dtype(config.compute_dtype), attention_backend=config.attention_backend)

  def example_shapes(self, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    v = self.config.video
    return {'frame': jax.ShapeDtypeStruct((batch, v.height, v.width, 3), jnp.uint8),
            'semantics': jax.ShapeDtypeStruct((batch, v.height // self.cell, v.width // self.cell,
                                               NUM_SEMANTIC_CLASSES), jnp.float32)}

  def init_params(self, rng: jax.Array, example_batch: Any) -> Any:
    return self.model.init(rng, example_batch['frame'][:1])

  def pretrained_params(self) -> Any:
    """A `theia` model directory (`train.init_from`) starts the ViT; the head starts fresh."""
    pretrained = super().pretrained_params()
    return None if pretrained is None else {'params': {'vit': pretrained['params']}}

  def loss_fn(self, params: Any, batch: Any, rng: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    del rng
    frames, targets = batch['frame'], batch['semantics'].astype(jnp.float32)
    expected = (frames.shape[1] // self.cell, frames.shape[2] // self.cell, NUM_SEMANTIC_CLASSES)
    if targets.shape[1:] != expected:
      raise ValueError(f'semantics of shape {targets.shape[1:]} do not match {frames.shape[1:3]} frames: expected '
                       f'{expected} ({self.cell}-pixel cells); write them with `landiff-jax prepare semantics` and '
                       'the same config.')
    logits = self.model.apply(params, frames)
    loss = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))
    # cells mostly covered by a shape: is it read as the right (colour, shape)?
    on_shape = targets[..., 0] < 0.5
    hits = (jnp.argmax(logits, -1) == jnp.argmax(targets, -1)) & on_shape
    return loss, {'shape_cell_accuracy': hits.sum() / jnp.maximum(on_shape.sum(), 1)}
