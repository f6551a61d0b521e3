"""Scaled integer and scaled FP8 formats, on arrays of groups (the last axis is one group).

``s = amax / max_normal`` and ``Q(x) = s * round_fmt(x / s)`` (symmetric), the
affine variant with an integer zero point, or Harma et al.'s symmetric integer
quantizer (:func:`harma`); the definitions are in :mod:`jaxprune.quant`.
``ties`` is ``'even'`` (round half to even) or ``'away'`` (half away from zero).
Divisions are correctly rounded and the rounding is done on integer
significands (:mod:`jaxprune.quant_bits`), so the result is the same on every
backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprune import quant_bits as qb
from jaxprune.quant_elements import round_integer, round_magnitude
from jaxprune.quant_formats import Format


def normalize(g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(y, e, amax_bits)`` with ``y = g / 2^e`` exactly and the group's ``max |y|`` in ``[1, 2)``.

  Scaling by the power of two changes no rounding decision while everything is
  normal, and keeps the float scale normal for groups of tiny values.
  """
  amax = jnp.max(qb.bits(g) & qb.MAG, axis=-1, keepdims=True)
  e = jnp.where((amax == 0) | (amax >= qb.INF_BITS), 0, qb.floor_log2(amax))
  return qb.ldexp(g, -e), e, amax


def finish(q_y: jax.Array, g: jax.Array, e: jax.Array, amax: jax.Array) -> jax.Array:
  """Undo :func:`normalize`, give zeros ``g``'s sign, zero all-zero groups, NaN non-finite ones."""
  q = qb.from_bits(qb.bits(qb.ldexp(q_y, e)) & qb.MAG)
  q = qb.with_sign(q, qb.bits(g) < 0)
  q = jnp.where(amax == 0, g, q)
  return jnp.where(amax >= qb.INF_BITS, jnp.nan, q)


def absmax(g: jax.Array, fmt: Format, ties: str = "even") -> jax.Array:
  """Symmetric scaled int / FP8: ``s = amax / max_normal``, ``Q = s * round_fmt(x / s)``."""
  y, e, amax = normalize(g)
  s = jnp.where(amax == 0, 1.0, qb.divide(qb.ldexp(qb.from_bits(amax), -e), fmt.max_normal))
  n = round_magnitude(qb.bits(qb.divide(y, s)) & qb.MAG, fmt, ties=ties)
  return finish(n * s, g, e, amax)  # n * s: a correctly rounded product of normal floats


def affine(g: jax.Array, fmt: Format, ties: str = "even") -> jax.Array:
  """Asymmetric scaled int: ``Q = s * (clip(round(x / s) + z, 0, 2^k - 1) - z)``."""
  y, e, amax = normalize(g)
  levels = float(2**fmt.bits - 1)
  lo = jnp.minimum(jnp.min(y, axis=-1, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.max(y, axis=-1, keepdims=True), 0.0)
  s = jnp.where(amax == 0, 1.0, qb.divide(hi - lo, levels))
  z = round_integer(qb.divide(-lo, s), ties)  # exact on every backend
  n = jnp.clip(round_integer(qb.divide(y, s), ties) + z, 0.0, levels)
  return finish((n - z) * s, g, e, amax)


def harma(g: jax.Array, fmt: Format, ties: str = "even") -> jax.Array:
  """Harma et al.'s symmetric ``k``-bit integer quantizer (GPTQ's ``Quantizer(sym=True)``).

  .. math::

     s = D / (2^k - 1), \\qquad
     Q(x) = s \\cdot \\mathrm{clip}(\\mathrm{RNE}(x / s), -2^{k-1}, 2^{k-1} - 1),

  with ``D = 2 amax`` if the group has a negative element and ``D = amax``
  otherwise (the reference's ``xmax - xmin`` with ``xmin = min(min x, 0)``
  replaced by ``-amax`` only when it is negative; its ``zero = 2^(k-1)``
  offset then clips a group of non-negative values at about ``amax / 2``).
  Every zero of the output is ``+0.0`` (the reference's ``s * (q - zero)``); an
  all-zero group gives ``+0.0``. Divisions are correctly rounded
  (:func:`jaxprune.quant_bits.divide`), so this is bit-identical to the
  reference's IEEE float32 arithmetic on every backend while ``s`` is a normal
  float32 (``amax >= 2^-118`` or so).
  """
  y, e, amax = normalize(g)
  b = qb.bits(g)
  has_negative = jnp.any((b < 0) & ((b & qb.MAG) != 0), axis=-1, keepdims=True)
  d = qb.ldexp(qb.from_bits(amax), has_negative.astype(jnp.int32) - e)  # in [1, 4)
  s = jnp.where(amax == 0, 1.0, qb.divide(d, float(2**fmt.bits - 1)))
  half = 2 ** (fmt.bits - 1)
  n = jnp.clip(round_integer(qb.divide(y, s), ties), -half, half - 1)
  q = qb.bits(qb.ldexp(n * s, e))  # n * s: a correctly rounded product of normal floats
  q = qb.from_bits(jnp.where((q & qb.MAG) == 0, 0, q))  # +0.0, as the reference's s (q - zero)
  return jnp.where(amax >= qb.INF_BITS, jnp.nan, q)
