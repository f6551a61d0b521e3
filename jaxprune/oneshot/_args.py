"""Argument checks shared by the one-shot layer functions: errors at call time, naming the argument.

Shapes and Python values are checked when the function is called (or traced);
array values under ``jit`` cannot be, and are not.
"""

from __future__ import annotations

import math
import numbers

import jax.numpy as jnp

from jaxprune import _checks


def kernel_2d(kernel) -> tuple[int, int]:
  """``(in, out)`` of a floating-point Flax ``(in, out)`` kernel."""
  shape = jnp.shape(kernel)
  if len(shape) != 2:
    raise ValueError(f"`kernel` must be a 2-D Flax kernel of shape (in, out), got shape {shape}.")
  if not jnp.issubdtype(jnp.result_type(kernel), jnp.floating):
    raise ValueError(f"`kernel` must be floating-point, got dtype {jnp.result_type(kernel)}.")
  return shape


def hessian(h, n_in: int) -> None:
  shape = jnp.shape(h)
  if len(shape) != 2 or shape[0] != shape[1]:
    raise ValueError(f"`hessian` must be a square (in, in) matrix, got shape {shape}.")
  if shape[0] != n_in:
    raise ValueError(f"`hessian` is {shape[0]} x {shape[1]} but the kernel has {n_in} inputs "
                     "(rows of an (in, out) kernel).")


def damp(value) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
      math.isfinite(value) and value > 0):
    raise ValueError(f"`damp` must be a finite number > 0 (a fraction of the mean diagonal "
                     f"of the Hessian, 0.01 in the papers), got {value!r}.")
  return float(value)


def blocksize(value) -> int:
  return _checks.check_int("blocksize", value, minimum=1)


def structure(sparsity, nm, n_in: int, block: int | None = None
              ) -> tuple[float, tuple[int, int] | None]:
  """Exactly one of ``sparsity`` (unstructured, in [0, 1)) and ``nm`` (``(n, m)``, kept n of m)."""
  if sparsity is not None and nm is not None:
    raise ValueError("give either `sparsity` (unstructured) or `nm` (N:M), not both; "
                     f"got sparsity={sparsity!r}, nm={nm!r}.")
  if sparsity is None and nm is None:
    raise ValueError("give `sparsity` (unstructured, in [0, 1)) or `nm` (N:M, e.g. (2, 4)).")
  if sparsity is not None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
      raise ValueError(f"`sparsity` must be a number in [0, 1), got {sparsity!r}.")
    _checks.check_sparsity("sparsity", sparsity)
    return float(sparsity), None
  if not isinstance(nm, tuple | list) or len(nm) != 2:
    raise ValueError(f"`nm` must be a pair (n, m): keep n of every m inputs, got {nm!r}.")
  n, m = _checks.check_nm(*nm)
  if n_in % m:
    raise ValueError(f"`nm` = ({n}, {m}): m = {m} must divide the kernel's {n_in} inputs.")
  if block is not None and block % m:
    raise ValueError(f"`blocksize` = {block} must be a multiple of m = {m} for `nm` = "
                     f"({n}, {m}), so that no N:M group straddles two blocks.")
  return 0.0, (n, m)


def group_size(value, n_in: int, default: int | None) -> int | None:
  """Rows (inputs) per quantization scale; None: one scale per output channel (or ``default``)."""
  if value is None:
    value = default
  if value is None:
    return None
  value = _checks.check_int("group_size", value, minimum=1)
  if n_in % value:
    raise ValueError(f"`group_size` = {value} must divide the kernel's {n_in} inputs.")
  return value
