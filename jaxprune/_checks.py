"""Argument validation shared by every transform: clear errors at construction time.

Values that are JAX tracers (e.g. hyperparameters injected by
``optax.inject_hyperparams``) cannot be checked on the host and are let through.
"""

from __future__ import annotations

import numbers

import jax


def is_concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def check_sparsity(name: str, value) -> None:
  """Raises unless ``0 <= value < 1``."""
  if not is_concrete(value):
    return
  value = float(value)
  if not 0.0 <= value < 1.0:
    raise ValueError(f"`{name}` must be in [0, 1), got {value}.")


def check_int(name: str, value, *, minimum: int | None = None) -> int:
  """Raises unless ``value`` is an integer ``>= minimum``; returns it as ``int``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"`{name}` must be an integer, got {value!r}.")
  value = int(value)
  if minimum is not None and value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
  return value


def check_nm(n, m) -> tuple[int, int]:
  """Raises unless ``1 <= n <= m``; returns ``(n, m)`` as ints."""
  n = check_int("n", n, minimum=1)
  m = check_int("m", m, minimum=1)
  if n > m:
    raise ValueError(f"`n` must be in [1, m] = [1, {m}], got n={n}.")
  return n, m
