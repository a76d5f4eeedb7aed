"""Layer stacks: one block class scanned over a leading 'layers' parameter axis, optionally rematerialised."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def recompute_after_cotangent(block: nn.Module, *args: Any) -> Any:
  """`block(*args)` for an `nn.remat` block outside a layer scan, whose backward pass recomputes the block only
  once the cotangent of its output exists.

  `jax.checkpoint` keeps its recomputation apart from the forward pass with optimization barriers, but XLA:CPU
  drops them before its last CSE passes, which then merge each recomputation back into the forward pass: outside a
  scan, rematerialisation saves nothing on CPU, nor in any plan compiled there (inside `scan_layers` the forward and
  backward loops are separate computations). Here the backward pass reads the saved inputs and parameters through a
  zero-valued dependency on the output's cotangent, `r + 0·max|g|`, which no pass folds or merges, and which orders each
  block's recomputation after the backward passes of the blocks that follow it, on every backend. A non-finite
  cotangent makes the gradients non-finite, as it would anyway.
  """
  def call(module, *inputs):
    return module(*inputs)

  def forward(module, *inputs):
    return nn.vjp(call, module, *inputs)

  def backward(vjp_fn, cotangent):
    # a reduction, not one element: picking an element of a sharded cotangent makes GSPMD gather it whole
    anchor = jnp.max(jnp.abs(jax.tree.leaves(cotangent)[0])) * 0
    tie = lambda r: r + anchor.astype(r.dtype) if jnp.issubdtype(r.dtype, jnp.floating) else r
    return jax.tree.map(tie, vjp_fn)(cotangent)

  return nn.custom_vjp(call, forward_fn=forward, backward_fn=backward)(block, *args)
