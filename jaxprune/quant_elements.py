"""Rounding to the grid of one element format, on integer significands.

An element format with ``m`` fraction bits, smallest normal exponent ``emin``
and largest magnitude ``max_normal`` has the values ``r 2^(p - m)`` with
``p = max(floor(log2 |a|), emin)`` (``p = 0`` for integer elements) and an
integer ``r``. Rounding ``|a|`` to it is rounding ``t = |a| 2^(m - p)`` to an
integer and saturating:

.. math::  \\mathrm{round}_{fmt}(|a|) = \\min(\\mathrm{rint}(t)\\, 2^{p - m}, max_{normal}).

With ``|a| = M 2^f`` (``M`` its integer significand), ``t = M / 2^(p - m - f)``:
an integer right shift with rounding (:func:`jaxprune.quant_bits.round_shift`),
so no float arithmetic decides anything and every backend gives the same bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprune import quant_bits as qb
from jaxprune.quant_formats import Format


def round_magnitude(mag: jax.Array, fmt: Format, *, ties: str = "even",
                    microxcaling: bool = False) -> jax.Array:
  """``round_fmt(|a|)`` as a float32 ``>= 0``, from the bits ``mag`` of a finite ``|a|``.

  Args:
    mag: int32 bits of ``|a|`` (sign bit clear).
    fmt: the element format (``mbits``, ``emin``, ``emax``, ``max_normal``;
      ``ebits = 0`` means an integer grid, ``p = emin``).
    ties: ``'even'`` (round half to even) or ``'away'`` (half away from zero).
    microxcaling: reproduce microxcaling's float32 evaluation of the rounding,
      ``floor(t + 1/2)``, which also rounds ``t = 1/2 - 2^-25`` up to 1 (the only
      ``t`` where it differs from exact rounding).
  """
  m, f = qb.significand(mag)
  ex = qb.floor_log2(mag)
  p = jnp.maximum(ex, fmt.emin) if fmt.ebits else jnp.full_like(ex, fmt.emin)
  shift = p - fmt.mbits - f  # t = m / 2^shift; >= 1 for every |a| < 2^(emax + 2)
  r = qb.round_shift(m, shift, ties=ties)
  if microxcaling:
    r = jnp.where((m == 2**24 - 1) & (shift == 25), 1, r)
  # r <= 2^(mbits + 1) (2^bits for integers), and 2^(p - mbits) >= 2^-16: an exact product
  # of normal float32 numbers on every backend.
  q = r.astype(jnp.float32) * qb.pow2(p - fmt.mbits)
  big = ex > fmt.emax + 1  # saturates; also keeps r and the shift in range
  return jnp.where(big | (q > fmt.max_normal), jnp.float32(fmt.max_normal), q)


def round_integer(t: jax.Array, ties: str = "even") -> jax.Array:
  """``t`` (float32) rounded to an integer: half to even, or half away from zero.

  ``jnp.round`` is exact on every backend (no arithmetic); for ``'away'``,
  ``t - trunc(t)`` is exact (Sterbenz) and so is adding ``+-1`` to an integer
  below ``2^24``, so this too gives the same bits everywhere.
  """
  qb.check_ties(ties)
  if ties == "even":
    return jnp.round(t)
  r = jnp.trunc(t)
  return r + jnp.where(jnp.abs(t - r) >= 0.5, jnp.sign(t), 0.0)
