"""Layer stacks: one block class scanned over a leading 'layers' parameter axis, optionally rematerialised."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

REMAT_POLICIES = ('none', 'nothing_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable', 'everything_saveable')


def scan_layers(block: type[nn.Module], num_layers: int, *args: Any, in_axes: Any = nn.broadcast,
                remat_policy: str = 'none', name: str, **kwargs: Any) -> nn.Module:
  """`nn.scan` of `block(*args, **kwargs)` over `num_layers`, stacked parameters named with the 'layers' axis.

  The block's `__call__(carry, *xs)` returns `(carry, y)`; `in_axes` says which xs are per layer (0) or shared
  (`nn.broadcast`). `remat_policy` names a `jax.checkpoint_policies` entry ('none' keeps every activation).
  """
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f'remat_policy {remat_policy!r} is not one of {REMAT_POLICIES}.')
  if remat_policy != 'none':
    block = nn.remat(block, policy=getattr(jax.checkpoint_policies, remat_policy), prevent_cse=False)
  return nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True}, in_axes=in_axes,
                 length=num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})(*args, name=name, **kwargs)
