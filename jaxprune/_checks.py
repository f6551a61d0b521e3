"""Argument validation shared by every transform: clear errors at construction time.

Values that are JAX tracers (e.g. hyperparameters injected by
``optax.inject_hyperparams``) cannot be checked on the host and are let through.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp


def is_concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def check_sparsity(name: str, value) -> None:
  """Raises unless ``value`` is a real number (or a scalar array) with ``0 <= value < 1``.

  Strings, ``None``, bools, lists and arrays of more than one element are
  refused with the same message (a traced scalar is let through).
  """
  shape = getattr(value, "shape", None)
  is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
  dtype = getattr(value, "dtype", None)
  is_scalar_array = shape == () and dtype is not None and (
      jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
  if not (is_number or is_scalar_array):
    raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")
  if not is_concrete(value):
    return
  value = float(value)
  if not 0.0 <= value < 1.0:
    raise ValueError(f"`{name}` must be in [0, 1), got {value}.")


#: Optax counts steps in int32: a step argument beyond it is never reached (and overflows jit).
MAX_STEP = 2**31 - 1


def check_int(name: str, value, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
  """Raises unless ``value`` is an integer in ``[minimum, maximum]``; returns it as ``int``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"`{name}` must be an integer, got {value!r}.")
  value = int(value)
  if minimum is not None and value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
  if maximum is not None and value > maximum:
    raise ValueError(f"`{name}` must be <= {maximum}, got {value}.")
  return value


def check_step(name: str, value, *, minimum: int | None = 0) -> int:
  """A step argument: an integer in ``[minimum, 2^31 - 1]`` (optax's int32 step count)."""
  return check_int(name, value, minimum=minimum, maximum=MAX_STEP)


def check_nm(n, m) -> tuple[int, int]:
  """Raises unless ``1 <= n <= m``; returns ``(n, m)`` as ints."""
  n = check_int("n", n, minimum=1)
  m = check_int("m", m, minimum=1)
  if n > m:
    raise ValueError(f"`n` must be in [1, m] = [1, {m}], got n={n}.")
  return n, m


def check_inner(value, name: str = "inner") -> None:
  """Raises unless ``value`` is an optax ``GradientTransformation`` (has ``init`` and ``update``).

  An optimizer factory passed uncalled (``optax.adam`` instead of
  ``optax.adam(1e-3)``) is named as such. Every wrapper that takes an inner
  optimizer calls this at construction.
  """
  if callable(getattr(value, "init", None)) and callable(getattr(value, "update", None)):
    return
  if callable(value):
    what = getattr(value, "__qualname__", None) or repr(value)
    raise ValueError(
        f"`{name}` must be an optax.GradientTransformation, got the function {what}: call it "
        f"to build the optimizer, e.g. `{getattr(value, '__name__', 'optimizer')}(1e-3)` "
        "instead of passing it uncalled.")
  raise ValueError(f"`{name}` must be an optax.GradientTransformation, got {value!r}.")
