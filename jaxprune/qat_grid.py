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

Every step QAT computes ``Q`` of the master weights, so float32 tensors whose groups
are finite and not tiny take fast paths that give ``quantize``'s bits with a
fraction of its integer arithmetic: :func:`_grid_code` (int, FP8), :func:`_fast_mx` (MX)
and :func:`_fast_nvfp4`, each exact on every backend, fast math included.

NVFP4: the per-tensor scale ``s_t = amax / 2688`` is rounded to ``b = 14``
significant bits in the same way (the tensor's largest entry set to ``2688 s~``,
exact), and the block scales and elements are ``quantize``'s. Plain NVFP4 is not
idempotent in float32 (``fl(fl(6 fl(448 s_t)) / 2688)`` differs from ``s_t`` for
a third of all ``s_t``); with ``s~`` of 14 bits, ``6 * 448 * s~`` is exact and
``quantize`` recomputes ``s~`` (and then every block scale and element) from the
view. Grid values ``c * s_b * s~`` are exact products with at most 20 significant
bits (E2M1 2, E4M3 4, ``s~`` 14): integer multiples of ``u = 2^(E_b + E_t - 17)``
(``2^E_b``, ``2^E_t`` the binades of ``s_b``, ``s~``) below ``12 * 15 * 2^14 u <
2^21.5 u``, so that they land exactly much as int values do
(:mod:`jaxprune.qat_landing`).

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

from jaxprune import quant, quant_blocks, quant_nvfp4
from jaxprune import quant_bits as qb

NVFP4_SCALE_BITS = 14


def scale_bits(fmt: str | quant.Format) -> int | None:
  """Significant bits of the QAT scale: ``22 - bits(2 q_max)`` for int, ``11 - mbits`` for FP8,
  ``NVFP4_SCALE_BITS`` (14) for NVFP4's per-tensor scale.

  ``None`` for MX formats, whose scales are powers of two. For float32 params; bfloat16
  params use ``quantize``'s own scales. See the module docstring.
  """
  fmt = quant.get_format(fmt)
  if fmt.kind == "int":
    return 22 - (2 * int(fmt.max_normal)).bit_length()
  if fmt.kind == "fp":
    return 11 - fmt.mbits
  if fmt.kind == "nvfp4":
    return NVFP4_SCALE_BITS
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


def _snapped_scale(amax: jax.Array, max_normal: float, bits: int):
  """``(top, s)`` per group from the bits ``amax`` (finite, nonzero) of its largest ``|x|``:
  ``s = s~ 2^E``, ``top = max_normal s`` (exact), with ``E = floor(log2 amax)`` and ``s~`` the
  unit scale ``mantissa(amax) / max_normal`` rounded to ``bits`` significant bits.

  In units of ``2^E``, as ``quantize`` computes, so that tiny groups keep a normal scale;
  on the bits, since CPUs flush subnormals.
  """
  unit_scale = _snap(qb.divide(qb.mantissa(amax), max_normal), bits)
  e = qb.floor_log2(amax)
  # max_normal * s~ is exact: it has at most 22 significant bits (scale_bits).
  return qb.ldexp(max_normal * unit_scale, e), qb.ldexp(unit_scale, e)


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
  top = qb.bits(_snapped_scale(amax, max_normal, bits)[0])
  clipped = jnp.where(mag == amax, top, jnp.minimum(mag, top)) | (qb.bits(g) & ~qb.MAG)
  return jax.lax.bitcast_convert_type(jnp.where(finite, clipped, qb.bits(g)), jnp.float32)


# The fast path below needs every group's scale s >= 2^-80 (amax >= 2^-60 is enough), so that
# the numbers it compares and multiplies are normal float32 numbers on every backend.
_FAST_MIN_AMAX = int(np.float32(2.0**-60).view(np.int32))


def _grid_code(x: jax.Array, s: jax.Array, fmt: quant.Format) -> jax.Array:
  """``round_fmt(fl(x / s))`` for ``0 <= x <= max_normal s`` on a snapped scale ``s >= 2^-80``.

  With ``p = max(floor(log2 t), emin)`` (``p = 0`` for int), the grid around
  ``t = x / s`` is ``k u``, ``u = 2^(p - mbits)``, and the rounding boundary between
  ``k u`` and ``(k + 1) u`` is ``h = (k + 1/2) u``. ``h s`` has at most 22
  significant bits (``mbits + 2`` or ``bits(2 q_max)``, plus :func:`scale_bits`), so
  it is an exact normal float32 and ``fl(t) > h`` iff ``x > h s``. And ``fl(t) = h``
  (rounded to the even neighbour) iff ``x = h s``: ``fl(t) = h`` means
  ``|x - h s| <= s ulp(h) / 2 < ulp(h s)``, which leaves only ``x = h s`` unless ``h s``
  is a power of two (the float below it is ``ulp(h s) / 2`` away); that needs
  ``2k + 1 = 1``, where the even neighbour and rounding down are both 0. ``k`` comes
  from an estimate of ``t``, which only has to be within a fraction of ``u``. No
  saturation is needed: ``t <= max_normal``, itself a grid value.
  """
  t = x * (1.0 / s)  # an estimate: any backend's reciprocal will do
  if fmt.ebits:  # u = 2^(p - mbits), built from the exponent field of t
    p_bits = jnp.maximum(qb.bits(t) & qb.INF_BITS, (fmt.emin + 127) << 23)
    unit = qb.from_bits(p_bits - (fmt.mbits << 23))
    k = jnp.floor(t * qb.from_bits((254 << 23) - p_bits + (fmt.mbits << 23)))
  else:
    unit, k = 1.0, jnp.floor(t)
  hs = (k + 0.5) * unit * s
  ki = k.astype(jnp.int32)
  r = jnp.where(x == hs, ki + (ki & 1), ki + (x > hs).astype(jnp.int32))
  return r.astype(jnp.float32) * unit


def _fast_snapped(g: jax.Array, amax: jax.Array, fmt: quant.Format, bits: int) -> jax.Array:
  """``grid_quantize`` of finite groups whose largest magnitude (bits ``amax``, broadcast onto
  ``g``) is 0 or at least ``2^-60``."""
  mag = qb.bits(g) & qb.MAG
  top, s = _snapped_scale(jnp.maximum(amax, _FAST_MIN_AMAX), fmt.max_normal, bits)
  # The largest entry maps onto max_normal s exactly; an all-zero group (amax 0) stays 0.
  x = jnp.where((mag == amax) & (amax != 0), top, jnp.minimum(qb.from_bits(mag), top))
  return _with_sign_of(g, _grid_code(x, s, fmt) * s)  # exact: <= 22 significant bits, normal


def _fast_amax(g: jax.Array, axis: int | None,
               limit: float = np.inf) -> tuple[jax.Array, jax.Array]:
  """``(fast_ok, amax)``: whether every group of ``g`` (along ``axis``) is finite with a largest
  magnitude 0 or in ``[2^-60, limit)``, and the bits of that magnitude per group.

  Usually from a float max of ``|g|`` (about twice as fast on CPU as an integer max):
  where every group's max is a finite float ``>= 2^-60`` it is exact whatever the
  backend does with subnormals (they are below it, flushed or not), and its bits are the
  integer max of the magnitudes' bits. Otherwise (a NaN, an infinity, a zero or tiny
  group) the integer max of the bits decides.
  """
  amax = jnp.max(jnp.abs(g), axis=axis, keepdims=True)
  normal = jnp.all((amax >= np.float32(2.0**-60)) & (amax < np.float32(limit)))
  limit_bits = int(np.float32(limit).view(np.int32))

  def from_bits(g, amax):
    del amax
    bits = jnp.max(qb.bits(g) & qb.MAG, axis=axis, keepdims=True)
    return jnp.all((bits < limit_bits) & ((bits == 0) | (bits >= _FAST_MIN_AMAX))), bits

  return jax.lax.cond(normal, lambda g, amax: (jnp.bool_(True), qb.bits(amax)), from_bits,
                      g, amax)


# The MX fast path needs 2^-e normal for every block's scale exponent e, and NVFP4's its
# snapped per-tensor scale far from overflow: amax < 2^100.
_FAST_LIMIT = 2.0**100
# microxcaling's floor(t + 1/2) in float32 also rounds this t up to 1 (see quant_elements).
_MX_HALF_QUIRK = np.float32(0.5 - 2.0**-25)


def _fast_mx(g: jax.Array, amax: jax.Array, fmt: quant.Format) -> jax.Array:
  """``plus_zero(quantize(g))`` for MX blocks (``round='even'``) whose largest magnitude (bits
  ``amax``, broadcast onto ``g``) is 0 or in ``[2^-60, 2^100)``.

  The block scale ``2^e`` is :func:`jaxprune.quant_blocks.mx_shared_exponent`'s, so
  ``e`` is in ``[-68, 100)`` and ``a = |g| 2^-e`` is an exact product (or below
  ``2^-58``, where every element format rounds it to 0, flushed or not). Clipping ``a``
  at ``max_normal`` before rounding equals saturating after it (rounding is monotone and
  ``max_normal`` is on the grid). With ``p = max(floor(log2 a), emin)`` (0 for mxint8),
  ``t = a 2^(m - p)`` is exact and ``jnp.round`` rounds it half to even without
  arithmetic; ``t = 1/2 - 2^-25`` goes to 1 as in microxcaling. ``r 2^(p - m) 2^e`` has
  at most ``m + 1`` significant bits and is normal: every step is exact on every backend.
  """
  e = quant_blocks.mx_shared_exponent(jnp.maximum(amax, _FAST_MIN_AMAX), fmt.emax)
  a = jnp.minimum(jnp.abs(g) * qb.pow2(-e), np.float32(fmt.max_normal))
  return _with_sign_of(g, _round_element(a, fmt, microxcaling=True) * qb.pow2(e))


def _round_element(a: jax.Array, fmt: quant.Format, microxcaling: bool) -> jax.Array:
  """``a`` (float32, ``0 <= a <= max_normal``, normal or below the grid's half step) rounded
  half to even onto the element grid: ``jnp.round(t) 2^(p - m)``, ``t = a 2^(m - p)`` exact,
  ``p = max(floor(log2 a), emin)`` (``emin`` for integer elements); ``microxcaling`` also
  rounds ``t = 1/2 - 2^-25`` up to 1, as its float32 ``floor(t + 1/2)`` does."""
  if fmt.ebits:  # 2^(m - p) and 2^(p - m) from the exponent field of a
    p_bits = jnp.maximum(qb.bits(a) & qb.INF_BITS, (fmt.emin + 127) << 23)
    up = qb.from_bits((254 << 23) - p_bits + (fmt.mbits << 23))
    unit = qb.from_bits(p_bits - (fmt.mbits << 23))
  else:
    up, unit = np.float32(2.0 ** (fmt.mbits - fmt.emin)), np.float32(2.0 ** (fmt.emin - fmt.mbits))
  t = a * up
  r = jnp.round(t)
  if microxcaling:
    r = jnp.where(t == _MX_HALF_QUIRK, np.float32(1), r)
  return r * unit


def _with_sign_of(g: jax.Array, v: jax.Array) -> jax.Array:
  """``|v|`` (``v >= 0``) with ``g``'s sign where ``v != 0``, and ``+0.0`` elsewhere."""
  return qb.from_bits(jnp.where(v > 0, qb.bits(v) | (qb.bits(g) & qb.SIGN), 0))


def _fast_nvfp4(g: jax.Array, axis: int, amax: jax.Array, bits: int) -> jax.Array:
  """``general_grid_quantize`` of an NVFP4 tensor laid out as blocks along ``axis`` of ``g``,
  finite with a largest magnitude (bits ``amax``) 0 or in ``[2^-60, 2^100)``.

  As :func:`_snapped_top` and :func:`jaxprune.quant_nvfp4.nvfp4` with two float
  products in place of integer ones: ``fl(|x| r)`` (``r = fl(fl(1 / s_t) / s_b)``, per
  block) is one IEEE product of normal numbers, or below ``2^-48`` where E2M1 rounds
  it to 0 either way (``s_t >= 2^-72``, ``s_b >= 2^-6``, so ``r <= 2^78``); the E2M1
  rounding is the exact ``jnp.round`` of ``t = a 2^(1 - p)``, ``p = max(floor(log2 a), 0)``
  (``a <= 6.375`` as ``s_b`` rounds down by at most half an E4M3 step, so nothing rounds
  past 6; the clip at 6 is there to keep XLA from reassociating the two products);
  ``c s_b s_t`` has at most 20 significant bits (``s_t = s~`` has 14) and is normal, so
  it is exact in any order (torchao's ``fl(c fl(s_b s_t))`` is the same number).
  """
  amax = amax.reshape(())
  snapped = _snapped_scale(jnp.maximum(amax, _FAST_MIN_AMAX), quant_nvfp4.TENSOR_MAX, bits)
  top, s_t = qb.computed_once(amax, *snapped)
  mag = qb.bits(g) & qb.MAG
  x = jnp.where((mag == amax) & (amax != 0), top, jnp.minimum(qb.from_bits(mag), top))
  # Subnormal block maxima (flushed or not) give the smallest block scale either way.
  s_b = quant_nvfp4.block_scales(qb.bits(jnp.max(x, axis=axis, keepdims=True)), s_t)
  r = qb.divide(jnp.broadcast_to(qb.divide(1.0, s_t), s_b.shape), s_b)
  r, scale = qb.computed_once(amax, r, s_b * s_t)
  a = jnp.minimum(x * r, np.float32(quant_nvfp4.E2M1.max_normal))
  c = _round_element(a, quant_nvfp4.E2M1, microxcaling=False)
  return _with_sign_of(g, c * scale)  # exact products


def general_grid_quantize(x: jax.Array, spec, bits: int | None) -> jax.Array:
  """:func:`grid_quantize` through ``quantize``'s general path (any input, slower)."""
  if bits is not None and x.dtype == jnp.float32 and spec.fmt.kind == "nvfp4":
    # The per-tensor scale s_t = amax / TENSOR_MAX, snapped like an int scale.
    x = _snapped_top(x.reshape(1, -1), quant_nvfp4.TENSOR_MAX, bits).reshape(x.shape)
  elif bits is not None and x.dtype == jnp.float32:
    x = quant.grouped(
        functools.partial(_snapped_top, max_normal=spec.fmt.max_normal, bits=bits), x, spec)
  return plus_zero(quant.quantize(x, spec.fmt, axis=spec.axis, block_size=spec.block_size or None,
                                   granularity=spec.granularity))


def grid_quantize(x: jax.Array, spec, bits: int | None) -> jax.Array:
  """``quantize`` with the int/FP8 (NVFP4: per-tensor) scale snapped to ``bits`` significant
  bits; zeros ``+0.0``.

  bfloat16 ``x``: ``quantize`` itself (its results are fixed points in bfloat16). For
  float32 int and FP8 tensors whose groups are finite with ``amax`` 0 or at least
  ``2^-60``, the same bits come from :func:`_grid_code` (a fraction of
  ``quantize``'s work; QAT computes this every step), and for MX tensors whose blocks
  also have ``amax < 2^100`` from :func:`_fast_mx` (NVFP4 tensors:
  :func:`_fast_nvfp4`); other tensors take ``quantize``'s
  general path (:func:`general_grid_quantize`).
  """
  fmt = spec.fmt
  mx = fmt.kind == "mx" and spec.round == "even"
  if x.dtype != jnp.float32 or x.size == 0 or not (bits is not None or mx):
    return general_grid_quantize(x, spec, bits)
  g, axis = quant.group_axes(x, spec)
  if fmt.kind == "nvfp4":
    fast_ok, amax = _fast_amax(g, None, _FAST_LIMIT)
    fast = lambda g, amax: _fast_nvfp4(g, axis, amax, bits).reshape(x.shape)  # noqa: E731
  elif mx:
    fast_ok, amax = _fast_amax(g, axis, _FAST_LIMIT)
    fast = lambda g, amax: _fast_mx(g, amax, fmt).reshape(x.shape)  # noqa: E731
  else:
    fast_ok, amax = _fast_amax(g, axis)
    fast = lambda g, amax: _fast_snapped(g, amax, fmt, bits).reshape(x.shape)  # noqa: E731
  # Computed inside the branches, so that the result is written once.
  return jax.lax.cond(
      fast_ok, fast, lambda g, amax: general_grid_quantize(g.reshape(x.shape), spec, bits),
      g, amax)


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
  ``s``), for NVFP4 the per-tensor scale ``amax / 2688``; MX is
  ``quant.quantize`` unchanged. For bfloat16 ``x`` it is
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
