"""Scaled integer and scaled FP8 formats, on arrays of groups (the last axis is one group).

``s = amax / max_normal`` and ``Q(x) = s * round_fmt(x / s)`` (symmetric), or the
affine variant with an integer zero point; the definitions are in
:mod:`jaxprune.quant`. Divisions are correctly rounded and the rounding is done
on integer significands (:mod:`jaxprune.quant_bits`), so the result is the same
on every backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprune import quant_bits as qb
from jaxprune.quant_elements import round_magnitude
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


def absmax(g: jax.Array, fmt: Format) -> jax.Array:
  """Symmetric scaled int / FP8: ``s = amax / max_normal``, ``Q = s * round_fmt(x / s)``."""
  y, e, amax = normalize(g)
  s = jnp.where(amax == 0, 1.0, qb.divide(qb.ldexp(qb.from_bits(amax), -e), fmt.max_normal))
  n = round_magnitude(qb.bits(qb.divide(y, s)) & qb.MAG, fmt)
  return finish(n * s, g, e, amax)  # n * s: a correctly rounded product of normal floats


def affine(g: jax.Array, fmt: Format) -> jax.Array:
  """Asymmetric scaled int: ``Q = s * (clip(RNE(x / s) + z, 0, 2^k - 1) - z)``."""
  y, e, amax = normalize(g)
  levels = float(2**fmt.bits - 1)
  lo = jnp.minimum(jnp.min(y, axis=-1, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.max(y, axis=-1, keepdims=True), 0.0)
  s = jnp.where(amax == 0, 1.0, qb.divide(hi - lo, levels))
  # jnp.round is exact on every backend (round half to even, no arithmetic).
  z = jnp.round(qb.divide(-lo, s))
  n = jnp.clip(jnp.round(qb.divide(y, s)) + z, 0.0, levels)
  return finish((n - z) * s, g, e, amax)
