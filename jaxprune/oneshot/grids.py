"""Quantization grids with a fixed scale, for GPTQ's column-by-column rounding.

GPTQ (Frantar et al. 2023) fixes a group's scale once, from the weights as
they are when the group starts, and then rounds one input row at a time while
the rows not yet rounded keep changing. :func:`jaxprune.quant.quantize`
computes the scale from the tensor it is given. A grid here does the same
rounding as ``quant.quantize`` (round half to even, saturation at the
format's largest value) on a scale fixed in advance, and guarantees that the
finished kernel is exactly representable by ``quant.quantize`` with the same
granularity, ``quant.quantize(out) == out``:

* **int** (``intk``, symmetric, ``q_max = 2^(k-1) - 1``): ``s = A / q_max`` with
  ``A`` the group's largest ``|w|``, ``Q(x) = s * clip(RNE(x / s), -q_max, q_max)``.
  ``quant.quantize`` recomputes ``s`` from the largest ``|Q|``, which is
  ``q_max * s`` only if some entry of the group lands on ``+-q_max``. So the
  entry that set the scale is *pinned*: it is rounded to ``sign(x) * q_max``
  whatever its value has become by its turn (GPTQ's error feedback then
  compensates, as for any rounding). The reference code stores the scale
  explicitly and may round that entry to ``q_max - 1``; where it does not,
  the two agree exactly.
* **MX** (``mxfp8``, ``mxfp6``, ``mxfp4``, ``mxint8``): the block exponent
  ``e = floor(log2 A) - e_max`` (OCP MX v1.0) and
  ``Q(x) = 2^e * round_element(x / 2^e)``. A finished block's largest value is
  at most ``max_normal * 2^e``, so ``quant.quantize`` finds the same ``e`` or a
  smaller one, and the element grids nest (every value of the coarser grid
  below its top is on the finer one): no pin is needed.

An all-zero group has scale 0 and rounds everything to 0 (as
``quant.quantize`` does). Arithmetic is float32 with correctly rounded
divisions (:func:`jaxprune.quant_bits.divide`, on integer significands: XLA may
turn a float division into a product with an approximate reciprocal on GPUs,
TPUs and under fast math, which would move a scale by an ulp and make the
finished kernel unrepresentable); weights are assumed in the normal float32
range (scales of subnormal size are not supported).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxprune import quant
from jaxprune import quant_bits as qb

Array = jax.Array


def _biased_exponent(x: Array) -> Array:
  """The IEEE biased exponent of a float32 (0 for zeros and subnormals)."""
  return (jax.lax.bitcast_convert_type(x, jnp.int32) >> 23) & 0xFF


def _pow2(k: Array) -> Array:
  """``2^k`` as a normal float32 for integer ``k`` in [-126, 127]."""
  return jax.lax.bitcast_convert_type((jnp.clip(k, -126, 127) + 127) << 23, jnp.float32)


class Grid(NamedTuple):
  """A quantization format's grid on a fixed per-group scale.

  ``params(rows)`` computes a group's scale from its ``(rows, out)`` weights,
  one per output column, and the row (within ``rows``) of the entry to pin;
  ``round(x, scale, pinned)`` rounds one input row ``x`` (shape ``(out,)``).
  """

  fmt: quant.Format

  @property
  def pins(self) -> bool:
    return self.fmt.kind == "int"

  def params(self, rows: Array) -> tuple[Array, Array]:
    """``(scale, pin)``: the float scale (int) or block exponent (MX), and argmax ``|w|``."""
    a = jnp.abs(rows.astype(jnp.float32))
    amax = jnp.max(a, axis=0)
    pin = jnp.argmax(a, axis=0).astype(jnp.int32)
    if self.fmt.kind == "int":
      return qb.divide(amax, self.fmt.max_normal), pin
    e = jnp.maximum(_biased_exponent(amax) - 127 - self.fmt.emax, -127)
    # The exponent travels as a float (exact for |e| < 2^24); 0 marks an all-zero block.
    return jnp.where(amax == 0, jnp.nan, e.astype(jnp.float32)), pin

  def round(self, x: Array, scale: Array, pinned: Array) -> Array:
    x = x.astype(jnp.float32)
    if self.fmt.kind == "int":
      q_max = self.fmt.max_normal
      n = jnp.clip(jnp.round(qb.divide(x, jnp.where(scale == 0, 1.0, scale))), -q_max, q_max)
      n = jnp.where(pinned, jnp.where(x < 0, -q_max, q_max), n)
      return jnp.where(scale == 0, 0.0, n * scale)
    zero_block = jnp.isnan(scale)
    e = jnp.where(zero_block, 0, scale).astype(jnp.int32)
    a = jnp.abs(x) * _pow2(-e)
    fmt = self.fmt
    p = jnp.maximum(_biased_exponent(a) - 127, fmt.emin) if fmt.ebits else jnp.zeros_like(e)
    step = _pow2(p - fmt.mbits)
    v = jnp.minimum(jnp.round(a * _pow2(fmt.mbits - p)) * step, jnp.float32(fmt.max_normal))
    q = jnp.where(x < 0, -v, v) * _pow2(e)
    return jnp.where(zero_block, 0.0, q)


def grid(fmt) -> Grid:
  """The :class:`Grid` of an int or MX format of :mod:`jaxprune.quant`."""
  fmt = quant.get_format(fmt)
  if fmt.kind not in ("int", "mx"):
    raise ValueError(f"GPTQ supports the int and MX formats of jaxprune.quant, got {fmt.name!r} "
                     f"(kind {fmt.kind!r}); valid: "
                     f"{[f for f in quant.FORMATS if quant.get_format(f).kind in ('int', 'mx')]}.")
  return Grid(fmt)
