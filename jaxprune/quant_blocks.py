"""Block formats with a shared power-of-two scale: OCP Microscaling (MX).

On arrays of blocks (the last axis is one block). The definitions, and the
details of microxcaling's reference that are reproduced bit for bit, are in
:mod:`jaxprune.quant`. Everything is integer and bit arithmetic
(:mod:`jaxprune.quant_bits`), so every backend gives the same bits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import quant_bits as qb
from jaxprune.quant_elements import round_magnitude
from jaxprune.quant_formats import Format

MX_ROUNDING = ("even", "nearest")


def _log2_round_up_thresholds() -> np.ndarray:
  """Per float32 binade ``[2^e, 2^(e+1))``, ``e = -149..127``, the bits of the smallest
  ``x`` in it with ``fl32(log2 x) = e + 1`` (``0x7f800000`` if there is none).

  ``fl32(log2 x) >= k`` iff ``log2 x > k - g/2`` with ``g`` the float32 spacing just
  below ``k`` (``log2`` of a float32 that is not a power of two is irrational, so
  there is no tie), i.e. iff ``x > 2^(k - g/2)``.
  """
  out = np.full(277, qb.INF_BITS, np.int32)
  for e in range(-149, 128):
    k = e + 1
    g = k - float(np.nextafter(np.float32(k), np.float32(-np.inf)))
    bound = math.ldexp(math.exp2(-g / 2), k)
    c = np.float32(bound)
    if float(c) <= bound:
      c = np.nextafter(c, np.float32(np.inf))
    if float(c) < 2.0**k:
      out[e + 149] = c.view(np.int32)
  return out


LOG2_ROUND_UP = _log2_round_up_thresholds()


def mx_shared_exponent(amax_bits: jax.Array, emax: int) -> jax.Array:
  """``max(floor(fl32(log2 amax)) - emax, -127)`` from the bits of ``amax``."""
  e = jnp.where(amax_bits == 0, -126, qb.floor_log2(amax_bits))
  threshold = jnp.asarray(LOG2_ROUND_UP)[jnp.clip(e + 149, 0, 276)]
  e = e + (amax_bits >= threshold).astype(jnp.int32)
  return jnp.maximum(e - emax, -127)


def mx(g: jax.Array, fmt: Format, rounding: str = "even", axis: int = -1) -> jax.Array:
  """MX quantization of blocks along ``axis`` of ``g`` (by default ``g[..., :]``), microxcaling's
  ``round='even'`` or ``'nearest'``.

  ``'even'`` rounds an element's ties to even, ``'nearest'`` away from zero
  (microxcaling's ``sign(A) * floor(|A| + 1/2)``); both keep its float32 quirk
  at ``t = 1/2 - 2^-25`` (:func:`jaxprune.quant_elements.round_magnitude`).
  """
  if rounding not in MX_ROUNDING:
    raise ValueError(f"`round` must be one of {MX_ROUNDING}, got {rounding!r}.")
  amax = jnp.max(qb.bits(g) & qb.MAG, axis=axis, keepdims=True)
  e = mx_shared_exponent(amax, fmt.emax)
  bad = (amax >= qb.INF_BITS) | (e > 127)
  a = qb.ldexp(g, -e)
  a_bits = qb.bits(a)
  negative = (a_bits < 0) & ((a_bits & qb.MAG) != 0)  # torch.sign(-0.0) == 0
  ties = "even" if rounding == "even" else "away"
  mag = round_magnitude(a_bits & qb.MAG, fmt, ties=ties, microxcaling=True)
  q = qb.ldexp(qb.with_sign(mag, negative), e)
  return jnp.where(bad, jnp.nan, q)
