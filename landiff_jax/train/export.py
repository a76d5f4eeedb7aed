"""A training run's latest checkpoint → a model directory (`checkpoints.save`): what `generate`, `encode`,
`train.init_from` and the next stage's data preparation read.

The stored training config names the sizes; the part's config section goes with the parameters. The EMA copy of
the parameters is exported when the run kept one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from landiff_jax import checkpoints
from landiff_jax.train import checkpoint as train_checkpoint
from landiff_jax.train.optimizer import merge_params

# training stage → the model part it trains
STAGE_PARTS = {'vae': 'vae', 'tokenizer': 'tokenizer', 'lm': 'lm', 'backbone': 'dit', 'diffusion': 'dit',
               'theia': 'theia'}


def latest_state(workdir: str) -> tuple[int, dict[str, Any], dict[str, Any]]:
  """(step, training state as numpy trees, stored config) of the latest finished checkpoint in `workdir`."""
  directory = train_checkpoint.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{workdir} holds no training checkpoints ({directory} does not exist); train first '
                            'with `landiff-jax train STAGE --config.train.workdir=...`.')
  manager = ocp.CheckpointManager(directory, item_names=train_checkpoint.ITEMS)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'{directory} holds no finished checkpoint; train longer or check the run\'s log.')
  state_path = os.path.join(directory, str(step), 'state')
  metadata = ocp.StandardCheckpointer().metadata(state_path).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                         config=ocp.args.JsonRestore()))
  manager.close()
  return step, jax.device_get(restored.state), restored.config


def vae_decoder_only(params: Any, vae_config: ml_collections.ConfigDict) -> tuple[Any, ml_collections.ConfigDict]:
  """A VAE's parameters and config section without the encoder (enough to generate)."""
  vae_config = vae_config.copy_and_resolve_references()
  vae_config.with_encoder = False
  return {'params': {'decoder': params['params']['decoder']}}, vae_config


def check_modules(stage: str, part: str, part_config: ml_collections.ConfigDict, params: Any, workdir: str) -> None:
  """Refuses parameters whose top-level modules are not the part's (a run exported under another stage's name,
  which the stored config alone does not reveal: every training config holds every section)."""
  kwargs = {'num_control_layers': 0} if stage == 'backbone' else {}
  model = checkpoints.build_model(part, part_config, **kwargs)
  expected = set(jax.eval_shape(lambda: model.init_params(jax.random.key(0)))['params'])
  found = set(params.get('params', {}))
  if not found or not found <= expected:
    raise ValueError(f'the checkpoints in {workdir} do not hold {stage} parameters: their modules are '
                     f'{sorted(found)}, a {part} has {sorted(expected)}. Export with the stage that trained the run '
                     '(`landiff-jax export STAGE`, STAGE as in its `landiff-jax train STAGE`).')


def export(stage: str, workdir: str, dst: str, *, decoder_only: bool = False, overwrite: bool = False) -> str:
  """Writes the run's latest parameters (EMA when kept) as a model directory of the stage's part; returns `dst`."""
  if stage not in STAGE_PARTS:
    raise ValueError(f'unknown stage {stage!r}; one of {", ".join(sorted(STAGE_PARTS))}.')
  if decoder_only and stage != 'vae':
    raise ValueError(f'--decoder-only applies to the vae only, not to {stage}.')
  step, state, stored = latest_state(workdir)
  part = STAGE_PARTS[stage]
  try:
    part_config = checkpoints.part_config(ml_collections.ConfigDict(stored), part)
  except checkpoints.CheckpointError as e:
    raise ValueError(f'the checkpoints in {workdir} were not written by `landiff-jax train {stage}`: {e}') from e
  trainable = state['ema_params'] if state.get('ema_params') is not None else state['params']
  params = merge_params(trainable, state['frozen_params'] or {})
  if stage == 'theia':  # the semantic head only served training
    from landiff_jax.train.tasks.theia import vit_params
    params = vit_params(params)
  if decoder_only:
    params, part_config = vae_decoder_only(params, part_config)
  check_modules(stage, part, part_config, params, workdir)
  return checkpoints.save(dst, part=part, config=part_config, params=params, overwrite=overwrite,
                          source=f'{os.path.abspath(workdir)} step {step}')
