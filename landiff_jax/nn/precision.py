"""Mixed precision for training: a dense layer's matmul in the compute dtype, its parameter gradients in a stated
dtype.

Under data or FSDP sharding the gradient of a kernel is a sum over the batch, so the partial sums of the devices are
reduced (all-reduce / reduce-scatter) in whatever dtype the backward matmul produces. With a bf16 copy of an fp32
master kernel that is bf16 by default (or fp32 after a bf16 rounding, as XLA decides). Inside
`gradient_reduce_dtype(dtype)` (the train loop sets it from `train.grad_reduce_dtype`) a dense layer whose
parameters are stored wider than it computes takes its kernel and bias gradients from a backward matmul that
accumulates and outputs `dtype` directly, so the cross-device reduction runs in that dtype and the gradient reaches
the master parameter without a bf16 rounding. The forward pass is the plain one, identical to inference.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import contextvars
import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

_GRADIENT_DTYPE: contextvars.ContextVar[Any] = contextvars.ContextVar('landiff_gradient_reduce_dtype', default=None)


@contextlib.contextmanager
def gradient_reduce_dtype(dtype: Any) -> Iterator[None]:
  """Dense layers traced inside compute their parameter gradients (and so reduce them across devices) in `dtype`;
  None restores the default (autodiff's own dtypes)."""
  token = _GRADIENT_DTYPE.set(None if dtype is None else jnp.dtype(dtype))
  try:
    yield
  finally:
    _GRADIENT_DTYPE.reset(token)


def current_gradient_dtype() -> Any:
  return _GRADIENT_DTYPE.get()


def dense_general(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, axis: tuple[int, ...], dtype: Any,
                  precision: Any = None) -> jax.Array:
  """`x · kernel + bias` in `dtype`, contracting x's `axis` with the kernel's leading axes (in that order).

  Parameter gradients come in `current_gradient_dtype()` when one is set and the parameters are wider than `dtype`
  (fp32 masters, bf16 compute); otherwise this is exactly the plain computation.
  """
  grad_dtype = current_gradient_dtype()
  if grad_dtype is None or jnp.dtype(kernel.dtype) == jnp.dtype(dtype):
    return _forward(x, kernel, bias, axis, jnp.dtype(dtype), precision)
  return _mixed(x, kernel, bias, axis, jnp.dtype(dtype), grad_dtype, precision)


def _forward(x, kernel, bias, axis, dtype, precision):
  dims = ((axis, tuple(range(len(axis)))), ((), ()))
  y = lax.dot_general(x.astype(dtype), kernel.astype(dtype), dims, precision=precision)
  return y if bias is None else y + bias.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _mixed(x, kernel, bias, axis, dtype, grad_dtype, precision):
  return _forward(x, kernel, bias, axis, dtype, precision)


def _mixed_fwd(x, kernel, bias, axis, dtype, grad_dtype, precision):
  out = _forward(x, kernel, bias, axis, dtype, precision)
  # keep the compute-dtype input (what the plain matmul keeps) and the master parameters (resident anyway); an empty
  # array remembers the input's own dtype
  return out, (x.astype(dtype), jnp.zeros((0,), x.dtype), kernel, bias)


def _mixed_bwd(axis, dtype, grad_dtype, precision, residuals, g):
  xc, x_dtype, kernel, bias = residuals
  kc = kernel.astype(dtype)
  dims = ((axis, tuple(range(len(axis)))), ((), ()))
  # input gradient: the ordinary transpose, in the compute dtype
  _, input_vjp = jax.vjp(lambda xx: lax.dot_general(xx, kc, dims, precision=precision), xc)
  (dx,) = input_vjp(g.astype(dtype))
  # kernel gradient: contract every free axis of x with the matching leading axis of g, accumulating in grad_dtype
  free = tuple(i for i in range(xc.ndim) if i not in axis)
  dk = lax.dot_general(xc, g.astype(dtype), ((free, tuple(range(len(free)))), ((), ())), precision=precision,
                       preferred_element_type=grad_dtype)
  contracted = sorted(axis)  # dk's leading axes follow x's order; the kernel's follow `axis`
  dk = jnp.transpose(dk, [contracted.index(a) for a in axis] + list(range(len(axis), dk.ndim)))
  db = None
  if bias is not None:
    db = jnp.sum(g.astype(grad_dtype), axis=tuple(range(len(free)))).astype(bias.dtype)
  return dx.astype(x_dtype.dtype), dk.astype(kernel.dtype), db


_mixed.defvjp(_mixed_fwd, _mixed_bwd)
