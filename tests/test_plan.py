"""`landiff-jax plan`: a training step compiled ahead of time on abstract shapes, memory per device by mesh."""

import json

import pytest

from landiff_jax.cli import main


def plan(capsys, stage, mesh, batch=8):
  assert main(['plan', f'--config=configs/train.py:{stage},tiny', '--stage', stage, '--mesh', mesh, '--batch',
               str(batch)]) == 0
  return json.loads(capsys.readouterr().out)


def test_memory_per_device_drops_as_fsdp_grows(capsys):
  replicated = plan(capsys, 'lm', 'data=8,fsdp=1,tensor=1')
  sharded = plan(capsys, 'lm', 'data=2,fsdp=4,tensor=1')
  assert sharded['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert sharded['parameters'] == replicated['parameters']
  for field in ('trainable_params', 'optimizer_state'):
    assert sharded['per_device_mib'][field] < 0.5 * replicated['per_device_mib'][field]
  memory = sharded['per_device_mib']
  assert memory['compiled_total'] <= memory['compiled_arguments'] + memory['compiled_outputs'] + memory[
      'compiled_temporaries'] + 1e-3
  assert sharded['gflops_per_step_per_device'] > 0


def test_frozen_backbone_is_reported_apart(capsys):
  result = plan(capsys, 'diffusion', 'data=4,fsdp=2,tensor=1')
  assert result['parameters']['frozen'] > 0 and result['parameters']['trainable'] > 0


def test_bad_mesh_is_rejected(capsys):
  assert main(['plan', '--config=configs/train.py:lm,tiny', '--stage', 'lm', '--mesh', 'rows=2']) == 1
  assert '--mesh takes' in capsys.readouterr().err
