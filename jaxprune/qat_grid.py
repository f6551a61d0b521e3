"""The grid of quantization-aware training: scales with few significant bits.

``Q`` is :func:`jaxprune.quant.quantize` except that the int and FP8 scale
``s = amax / max_normal`` is rounded to ``b`` significant bits
(:func:`scale_bits`): ``b = 22 - bits(2 q_max)`` for ``intk`` (20 for int2, 18 for
int4, 14 for int8), ``b = 11 - mbits`` for scaled FP8 (8 for e4m3, 9 for e5m2). MX
scales are powers of two already and MX is unchanged. The scale moves by a
relative ``|s~ - s| / s <= 2^-b``, the largest entry still maps onto
``+-max_normal`` (so ``amax`` is ``max_normal * s~`` exactly) and
``quantize(v) == v`` bit for bit: the params are exactly representable in the
plain format with the plain format's own scale rule. See :func:`snapped_quantize`.

bfloat16 params
---------------
The grid is then ``quant.quantize``'s own in bfloat16: the view is
``Q(bf16(M(|W|) * W))`` (``'sq'``; ``'qs'`` likewise), whose symmetric int, FP8
and MX results are fixed points of ``quantize`` in bfloat16 (see
:mod:`jaxprune.quant`: ``amax`` is a bfloat16 value, so the scale is recomputed
exactly). No scale is snapped: a grid value has up to 8 significant bits either
way. With float32 master weights (the engine's layout for bfloat16 params) the
float32 view is rounded to bfloat16 and quantized there, which keeps its codes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import quant
from jaxprune import quant_bits as qb


def scale_bits(fmt: str | quant.Format) -> int | None:
  """Significant bits of the QAT scale: ``22 - bits(2 q_max)`` for int, ``11 - mbits`` for FP8.

  ``None`` for MX formats, whose scales are powers of two. For float32 params; bfloat16
  params use ``quantize``'s own scales. See the module docstring.
  """
  fmt = quant.get_format(fmt)
  if fmt.kind == "int":
    return 22 - (2 * int(fmt.max_normal)).bit_length()
  if fmt.kind == "fp":
    return 11 - fmt.mbits
  return None


def group_max(x: jax.Array, spec) -> jax.Array:
  """The max over each scaling group of ``spec``, broadcast back to ``x``'s shape."""
  return quant.grouped(
      lambda g: jnp.broadcast_to(jnp.max(g, axis=-1, keepdims=True), g.shape), x, spec)


def plus_zero(x: jax.Array) -> jax.Array:
  """``x`` with every zero made ``+0.0`` (``quantize`` keeps the sign of a rounded-away value)."""
  # Selected as integers: XLA:CPU may flush a float select's subnormals.
  int_type = jnp.dtype(f"int{8 * x.dtype.itemsize}")
  b = jax.lax.bitcast_convert_type(x, int_type)
  magnitude = jnp.asarray(np.iinfo(int_type).max, int_type)
  return jax.lax.bitcast_convert_type(jnp.where(b & magnitude == 0, 0, b), x.dtype)


def _snap(s: jax.Array, bits: int) -> jax.Array:
  """``s > 0`` rounded to ``bits`` significant bits, half to even (on the integer significand)."""
  return qb.round_to_significant_bits(s, bits)


def _snapped_top(g: jax.Array, max_normal: float, bits: int) -> jax.Array:
  """Groups ``g[..., :]`` with their largest entries set to ``+-max_normal * s~``, others
  clipped to it; ``s~`` is ``amax / max_normal`` rounded to ``bits`` significant bits.

  This changes no rounded value (the entries round to, or are clipped at,
  ``+-max_normal`` anyway), and ``quantize`` of the result computes the scale ``s~``.
  """
  mag = qb.bits(g) & qb.MAG
  amax = jnp.max(mag, axis=-1, keepdims=True)
  finite = (amax > 0) & (amax < qb.INF_BITS)
  amax = jnp.where(finite, amax, 0x3F800000)
  # In units of 2^floor(log2 amax), as quantize computes, so that tiny groups keep a normal
  # scale; on the bits, since CPUs flush subnormals. One value per group.
  unit_scale = qb.divide(qb.mantissa(amax), max_normal)
  # max_normal * s~ is exact: it has at most 22 significant bits (scale_bits).
  top = qb.bits(qb.ldexp(max_normal * _snap(unit_scale, bits), qb.floor_log2(amax)))
  clipped = jnp.where(mag == amax, top, jnp.minimum(mag, top)) | (qb.bits(g) & ~qb.MAG)
  return jax.lax.bitcast_convert_type(jnp.where(finite, clipped, qb.bits(g)), jnp.float32)


def grid_quantize(x: jax.Array, spec, bits: int | None) -> jax.Array:
  """``quantize`` with the int/FP8 scale snapped to ``bits`` significant bits; zeros ``+0.0``.

  bfloat16 ``x``: ``quantize`` itself (its results are fixed points in bfloat16).
  """
  if bits is not None and x.dtype == jnp.float32:
    x = quant.grouped(
        functools.partial(_snapped_top, max_normal=spec.fmt.max_normal, bits=bits), x, spec)
  return plus_zero(quant.quantize(x, spec.fmt, axis=spec.axis,
                                   block_size=spec.block_size or None,
                                   granularity=spec.granularity))


def snapped_quantize(
    x: jax.Array,
    fmt: str | quant.Format,
    *,
    axis: int = -1,
    block_size: int | None = None,
    granularity: str | None = None,
) -> jax.Array:
  """The quantizer of :func:`quantization`: ``quant.quantize`` on the QAT grid.

  For int and FP8 formats the scale ``s = amax / max_normal`` is rounded to
  :func:`scale_bits` significant bits (``s~``, within a relative ``2^-b`` of
  ``s``); MX is ``quant.quantize`` unchanged. For bfloat16 ``x`` it is
  ``quant.quantize`` in every format (whose symmetric results are fixed points
  in bfloat16, see :mod:`jaxprune.quant`). Every zero of the result is
  ``+0.0``. The result ``y`` satisfies ``quant.quantize(y, fmt, same settings)
  == y`` bit for bit (for ``x`` in the normal range).

  Args:
    x: a float32 or bfloat16 array.
    fmt, axis, block_size, granularity: as in :func:`jaxprune.quant.quantize`.
  """
  x = jnp.asarray(x)
  if x.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(
        f"snapped_quantize expects float32 or bfloat16 input, got dtype {x.dtype}.")
  spec = quant.make_spec(fmt, x.shape, x.dtype, axis, block_size, granularity, True)
  return grid_quantize(x, spec, scale_bits(spec.fmt))
