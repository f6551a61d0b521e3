"""Fake quantization: scaled integers, scaled FP8 and OCP Microscaling (MX).

``quantize(x, fmt)`` rounds ``x`` to a number format, multiplies back by the
format's scale and returns the result in ``x``'s dtype, so a model can be
trained or evaluated as if its tensors were stored in ``fmt``. The gradient is
straight-through: ``d quantize(x) / dx = I``.

Scaling groups
--------------
A *group* is the set of elements that share one scale:

* ``granularity='tensor'``: the whole array.
* ``granularity='channel'``: one scale per index of the dims other than
  ``axis``, i.e. the scale is reduced over ``axis``. For a Flax ``Dense`` kernel
  of shape ``(in, out)``, per-output-channel scales are ``axis=0``.
* ``granularity='block'``: ``block_size`` consecutive elements along ``axis``
  (``block_size`` must divide the size of ``axis``). MX formats always use
  blocks, of ``MX_BLOCK_SIZE = 32`` elements unless ``block_size`` is given.

Formats
-------
Below ``RNE`` is round-half-to-even, ``amax = max |x|`` over a group, and all
arithmetic is IEEE float32 (see *Arithmetic*).

**Scaled integers** ``'int2'`` ... ``'int8'`` (``k`` bits, ``q_max = 2^(k-1) - 1``):

.. math::

   s = amax / q_{max}, \\qquad
   Q(x) = s \\cdot \\mathrm{clip}(\\mathrm{RNE}(x / s), -q_{max}, q_{max}).

With ``symmetric=False`` (affine): ``lo = min(min x, 0)``, ``hi = max(max x, 0)``,
``s = (hi - lo) / (2^k - 1)``, integer zero point ``z = RNE(-lo / s)`` in
``[0, 2^k - 1]`` and ``Q(x) = s * (clip(RNE(x / s) + z, 0, 2^k - 1) - z)``, so
that 0 is exactly representable.

**Scaled FP8** ``'fp8_e4m3'`` (OCP E4M3FN: finite only, largest normal 448,
subnormals down to 2^-9) and ``'fp8_e5m2'`` (largest normal 57344, subnormals
down to 2^-16): ``s = amax / max_normal`` (``amax`` maps onto the largest
normal) and ``Q(x) = s * RNE_fmt(clip(x / s, -max_normal, max_normal))``, where
``RNE_fmt`` rounds to the nearest value of the format, *including its
subnormals*, ties to even (the same result as ``ml_dtypes`` casting after
saturation).

In both families an all-zero group has ``s = 0`` and output 0, outputs carry
the sign bit of ``x`` (a negative ``x`` that rounds to 0 gives ``-0.0``), and
the output is ``fl32(n * s)`` for an integer (or FP8 value) ``n`` whenever that
is a normal float32. Symmetric formats are idempotent, ``Q(Q(x)) == Q(x)``
bit for bit (``fl32(fl32(q_max * s) / q_max) == s`` for every float32 ``s``);
the affine variant is idempotent up to one ulp of the recomputed scale.

**MX** (OCP Microscaling Formats v1.0): ``'mxfp8_e4m3'``, ``'mxfp8_e5m2'``,
``'mxfp6_e3m2'``, ``'mxfp6_e2m3'``, ``'mxfp4_e2m1'``, ``'mxint8'``. Each block
shares an E8M0 power-of-two scale ``X = 2^e``. The result agrees bit for bit
(zeros' signs included) with ``mx.mx_ops._quantize_mx(A, scale_bits=8,
elem_format, block_size=..., axes=[axis], round='even')`` of Microsoft's
microxcaling library (its PyTorch path; default ``flush_fp32_subnorms=False``):

.. math::

   E &= \\lfloor \\mathrm{fl32}(\\log_2 amax) \\rfloor \\quad (amax = 0: E = -126) \\\\
   e &= \\max(E - e_{max}, -127) \\\\
   a_i &= x_i / 2^e \\\\
   p_i &= \\max(\\lfloor \\log_2 |a_i| \\rfloor, e_{min}) \\quad (p_i = 0 \\text{ for mxint8}) \\\\
   t_i &= |a_i| \\cdot 2^{m - p_i}, \\qquad
   r_i = \\lfloor t_i + 1/2 \\rfloor - [\\,t_i - 1/2 \\in 2\\mathbb{Z}\\,] \\\\
   Q(x_i) &= \\mathrm{sign}(a_i) \\cdot \\min(r_i \\cdot 2^{p_i - m}, max_{normal}) \\cdot 2^e

with the element parameters ``(e_max, e_min, m, max_normal)`` (``m`` = fraction
bits): e4m3 (8, -6, 3, 448), e5m2 (15, -14, 2, 57344), e3m2 (4, -2, 2, 28),
e2m3 (2, 0, 3, 7.5), e2m1 (2, 0, 1, 6), int8 (0, 0, 6, 127/64). So mxint8 is
the reference's sign-magnitude 1.6 fixed point: ``k / 64`` with ``|k| <= 127``
(its ``-2`` is never produced). Elements keep their format's subnormals
(``p_i`` is clamped at ``e_min``) and saturate at ``max_normal``. MX is
idempotent up to the sign of zeros (``-0.0`` gives ``+0.0``). Three details of
the reference's PyTorch path are kept on purpose and differ from the spec's
text (its CUDA kernels take ``E`` from the exponent bits instead):

* ``fl32(log2 amax)`` is log2 rounded to float32 (as ``torch.log2`` returns
  it), so for ``amax`` a few float32 ulps below a power of two ``2^k``
  (``|k| >= 3``; relative distance below about ``|k| * 2^-24 * ln 2``; 7456
  float32 values in all) the shared exponent is one larger than
  ``floor(log2 amax)``: the largest element rounds to ``2^k`` instead of
  saturating at ``max_normal * 2^e``, the others lose one bit. At the top of
  the range (``amax`` among the 44 largest finite float32) this gives
  ``E = 128``: mxint8 blocks become NaN (``e > 127``), and in the float
  formats elements that round to ``2^emax`` become ``2^128 = inf``.
* ``r_i`` is evaluated in float32: it is ``RNE(t_i)`` except for the single
  value ``t_i = 1/2 - 2^-25``, where ``t_i + 1/2`` rounds up to 1.
* ``sign(0) = +0``: a negative ``x_i`` whose element rounds to 0 gives
  ``-0.0``, but ``-0.0`` gives ``+0.0``, and so does a negative ``x_i`` for
  which ``x_i / 2^e`` underflows float32 to zero.

Non-finite input
----------------
A NaN or +-inf anywhere in a group makes the whole group's output NaN, in
every family. For MX this is what the reference does (``amax`` is NaN or inf,
the shared exponent becomes NaN); for int and FP8 an infinite ``amax`` would
otherwise make ``s`` infinite and silently zero the rest of the group.

Arithmetic
----------
Everything is computed in float32: bfloat16, float16, float64 and FP8 inputs
are cast to float32 and the result is cast back (rounding to nearest; MX
results of bfloat16 inputs stay exact outside bfloat16's subnormal range,
int/FP8 results ``n * s`` are generally rounded). Exponents, multiplications
by powers of two and the max reductions are done on the float32 bit patterns,
so float32 subnormal inputs and outputs are exact even on XLA:CPU, which flushes
subnormals to zero in float arithmetic. For the same reason int and FP8 groups
are first scaled by ``2^-floor(log2 amax)`` (exactly), which changes no result
while ``s`` and ``n * s`` are normal and keeps ``s`` normal for tiny groups.
Divisions are correctly rounded: XLA's rewrite of a division by a broadcast
into a multiplication by the reciprocal is blocked.

References: OCP Microscaling Formats (MX) v1.0 Specification (2023);
OCP 8-bit Floating Point Specification (OFP8) v1.0 (2023);
Rouhani et al., "Microscaling Data Formats for Deep Learning", 2023;
github.com/microsoft/microxcaling (``mx/mx_ops.py``, ``mx/elemwise_ops.py``).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MX_BLOCK_SIZE = 32
GRANULARITIES = ("tensor", "channel", "block")


class Format(NamedTuple):
  """A quantization format.

  Attributes:
    name: its name in ``FORMATS``.
    kind: ``'int'`` (scaled integer), ``'fp'`` (scaled FP8) or ``'mx'``.
    bits: storage bits per element, sign included (the MX scale is not counted).
    ebits: exponent bits of the element (0 for integer elements).
    mbits: fraction bits of the element: explicit mantissa bits for floats, 6
      for mxint8's 1.6 fixed point, 0 for integers.
    emax: ``floor(log2(max_normal))``, the exponent of the largest normal.
    emin: exponent of the smallest normal (``2 - 2^(ebits-1)``); 0 for integers.
    max_normal: largest magnitude of the element (``2^(k-1) - 1`` for ``intk``).
  """

  name: str
  kind: str
  bits: int
  ebits: int
  mbits: int
  emax: int
  emin: int
  max_normal: float


def _float_element(name: str, kind: str, ebits: int, mbits: int, max_normal: float) -> Format:
  return Format(
    name, kind, 1 + ebits + mbits, ebits, mbits, math.floor(math.log2(max_normal)),
    2 - 2 ** (ebits - 1), max_normal)


_ALL = (
  *(Format(f"int{k}", "int", k, 0, 0, k - 2, 0, float(2 ** (k - 1) - 1)) for k in range(2, 9)),
  _float_element("fp8_e4m3", "fp", 4, 3, 448.0),
  _float_element("fp8_e5m2", "fp", 5, 2, 57344.0),
  _float_element("mxfp8_e4m3", "mx", 4, 3, 448.0),
  _float_element("mxfp8_e5m2", "mx", 5, 2, 57344.0),
  _float_element("mxfp6_e3m2", "mx", 3, 2, 28.0),
  _float_element("mxfp6_e2m3", "mx", 2, 3, 7.5),
  _float_element("mxfp4_e2m1", "mx", 2, 1, 6.0),
  Format("mxint8", "mx", 8, 0, 6, 0, 0, 127 / 64),
)
_BY_NAME = {f.name: f for f in _ALL}
FORMATS: tuple[str, ...] = tuple(_BY_NAME)


def get_format(fmt: str | Format) -> Format:
  """The ``Format`` called ``fmt``; raises ``ValueError`` listing ``FORMATS`` if none is."""
  name = fmt.name if isinstance(fmt, Format) else fmt
  if not isinstance(name, str) or name not in _BY_NAME or (
      isinstance(fmt, Format) and fmt != _BY_NAME[name]):
    raise ValueError(f"Unknown format `fmt`={fmt!r}; valid names: {', '.join(FORMATS)}.")
  return _BY_NAME[name]


def int_format(bits: int) -> Format:
  """The symmetric scaled-integer format with ``bits`` bits, ``2 <= bits <= 8``."""
  if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= 8:
    raise ValueError(f"`bits` must be an integer in [2, 8], got {bits!r}.")
  return _BY_NAME[f"int{int(bits)}"]


# ---------------------------------------------------------------------------
# float32 bit-level helpers. XLA:CPU treats subnormal float32 operands as zero
# and flushes subnormal results, so anything that can touch the subnormal range
# is done on the bit patterns.
# ---------------------------------------------------------------------------
_SIGN = np.int32(-(2**31))
_MAG = np.int32(0x7FFFFFFF)
_INF_BITS = 0x7F800000
_MANT = 0x7FFFFF
_IMPLICIT = 0x800000


def _bits(x: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(x, jnp.int32)


def _float(b: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(b, jnp.float32)


def _msb(m: jax.Array) -> jax.Array:
  """Index of the most significant set bit of a positive int32 (-1 for 0)."""
  return 31 - jax.lax.clz(m)


def _significand(mag: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(m, lead)`` with ``|x| = m * 2^(max(biased, 1) - 150)`` and ``lead = msb(m)``."""
  biased = mag >> 23
  m = jnp.where(biased > 0, (mag & _MANT) | _IMPLICIT, mag)
  return m, _msb(m)


def _floor_log2(mag: jax.Array) -> jax.Array:
  """Exact ``floor(log2 |x|)`` from the bits ``mag`` of a finite nonzero ``|x|``."""
  biased = mag >> 23
  return jnp.where(biased > 0, biased - 127, _msb(mag) - 149)


def _mantissa(mag: jax.Array) -> jax.Array:
  """``|x| / 2^floor(log2 |x|)`` in ``[1, 2)``, also for subnormal ``x``."""
  m, lead = _significand(mag)
  return _float(((m << jnp.maximum(23 - lead, 0)) & _MANT) | 0x3F800000)


def _pow2(k: jax.Array) -> jax.Array:
  """``2^k`` as a normal float32, for integer ``-126 <= k <= 127``."""
  return _float((jnp.clip(k, -126, 127) + 127) << 23)


def _ldexp(x: jax.Array, k: jax.Array) -> jax.Array:
  """``x * 2^k`` rounded to nearest even like IEEE arithmetic, subnormals kept.

  ``jnp.ldexp`` flushes subnormal inputs and results to zero on CPU; this works
  on the bit patterns instead. NaN and inf pass through; overflow gives inf.
  """
  b = _bits(x)
  sign, mag = b & _SIGN, b & _MAG
  m, lead = _significand(mag)
  e = jnp.maximum(mag >> 23, 1) + k  # |x| * 2^k = m * 2^(e - 150)
  e_normal = e + lead - 23  # biased exponent of the result, if normal
  normal = (e_normal << 23) | ((m << jnp.maximum(23 - lead, 0)) & _MANT)
  # Subnormal result: the integer m * 2^(e - 1), i.e. m shifted by e - 1.
  up = m << jnp.clip(e - 1, 0, 23)
  shift = jnp.clip(1 - e, 1, 25)
  kept, rest, half = m >> shift, m & ((1 << shift) - 1), 1 << (shift - 1)
  down = kept + ((rest > half) | ((rest == half) & ((kept & 1) == 1))).astype(jnp.int32)
  sub = jnp.where(e >= 1, up, down)
  out = jnp.where(e_normal >= 1, normal, sub)
  out = jnp.where(e_normal >= 255, _INF_BITS, out)
  out = jnp.where(mag == 0, 0, out)
  out = jnp.where(mag >= _INF_BITS, mag, out)
  return _float(sign | out)


def _divide(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a / b`` correctly rounded (``b`` broadcasts to ``a``'s shape).

  XLA rewrites a division by a constant or a broadcast into a multiplication by
  its reciprocal, which is off by an ulp. The divisor is made a full array that
  depends on ``a`` (so that ``vmap`` batches it too) and hidden behind a barrier.
  """
  return a / jax.lax.optimization_barrier(a * 0 + b)


def _with_sign(magnitude: jax.Array, negative: jax.Array) -> jax.Array:
  return _float(_bits(magnitude) | jnp.where(negative, _SIGN, np.int32(0)))


# ---------------------------------------------------------------------------
# Element rounding, shared by every format.
# ---------------------------------------------------------------------------
def _rint_microxcaling(t: jax.Array) -> jax.Array:
  """microxcaling's ``round='even'`` for ``t >= 0``: ``floor(t + 1/2) - [t - 1/2 in 2Z]``.

  Evaluated in float32 this is round-half-to-even except at ``t = 1/2 - 2^-25``,
  where ``t + 1/2`` rounds up to 1.
  """
  return jnp.floor(t + 0.5) - (jnp.remainder(t - 0.5, 2.0) == 0).astype(t.dtype)


def _round_element(a: jax.Array, fmt: Format, rint=jnp.round) -> jax.Array:
  """``|a|`` rounded to the element grid of ``fmt`` and saturated at its largest normal.

  ``p = max(floor(log2 |a|), emin)`` for floats (``p = 0`` for integers, whose
  ``emin`` is 0), ``t = |a| * 2^(mbits - p)`` and the result is
  ``min(rint(t) * 2^(p - mbits), max_normal)``: the format's nearest value,
  subnormals included (``rint = jnp.round`` is round-half-to-even).
  """
  mag = _bits(a) & _MAG
  ex = _floor_log2(mag)
  p = jnp.maximum(ex, fmt.emin) if fmt.ebits else jnp.full_like(ex, fmt.emin)
  # |t| < 2^-60 rounds to 0 whatever its exact value; the clip keeps t normal.
  t = _mantissa(mag) * _pow2(jnp.maximum(ex - p + fmt.mbits, -60))
  q = jnp.minimum(rint(t) * _pow2(p - fmt.mbits), jnp.float32(fmt.max_normal))
  return jnp.where(mag == 0, 0.0, q)


# ---------------------------------------------------------------------------
# The three families, on arrays of groups: the last axis is one group.
# ---------------------------------------------------------------------------
def _log2_round_up_thresholds() -> np.ndarray:
  """Per float32 binade ``[2^e, 2^(e+1))``, ``e = -149..127``, the bits of the smallest
  ``x`` in it with ``fl32(log2 x) = e + 1`` (``0x7f800000`` if there is none).

  ``fl32(log2 x) >= k`` iff ``log2 x > k - g/2`` with ``g`` the float32 spacing just
  below ``k`` (``log2`` of a float32 that is not a power of two is irrational, so
  there is no tie), i.e. iff ``x > 2^(k - g/2)``.
  """
  out = np.full(277, _INF_BITS, np.int32)
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


_LOG2_ROUND_UP = _log2_round_up_thresholds()


def _mx_shared_exponent(amax_bits: jax.Array, emax: int) -> jax.Array:
  """``max(floor(fl32(log2 amax)) - emax, -127)`` from the bits of ``amax``."""
  e = jnp.where(amax_bits == 0, -126, _floor_log2(amax_bits))
  threshold = jnp.asarray(_LOG2_ROUND_UP)[jnp.clip(e + 149, 0, 276)]
  e = e + (amax_bits >= threshold).astype(jnp.int32)
  return jnp.maximum(e - emax, -127)


def _mx(g: jax.Array, fmt: Format) -> jax.Array:
  """MX quantization of blocks ``g[..., :]`` (see the module docstring)."""
  amax = jnp.max(_bits(g) & _MAG, axis=-1, keepdims=True)
  e = _mx_shared_exponent(amax, fmt.emax)
  bad = (amax >= _INF_BITS) | (e > 127)
  a = _ldexp(g, -e)
  negative = (_bits(a) < 0) & ((_bits(a) & _MAG) != 0)  # torch.sign(-0.0) == 0
  q = _ldexp(_with_sign(_round_element(a, fmt, _rint_microxcaling), negative), e)
  return jnp.where(bad, jnp.nan, q)


def _normalize(g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(y, e, amax_bits)`` with ``y = g / 2^e`` exactly and the group's ``max |y|`` in ``[1, 2)``.

  Scaling by the power of two changes no rounding decision while everything is
  normal, and keeps the float scale normal for groups of tiny values.
  """
  amax = jnp.max(_bits(g) & _MAG, axis=-1, keepdims=True)
  e = jnp.where((amax == 0) | (amax >= _INF_BITS), 0, _floor_log2(amax))
  return _ldexp(g, -e), e, amax


def _finish(q_y: jax.Array, g: jax.Array, e: jax.Array, amax: jax.Array) -> jax.Array:
  """Undo ``_normalize``, give zeros ``g``'s sign, zero all-zero groups, NaN non-finite ones."""
  q = _float(_bits(_ldexp(q_y, e)) & _MAG)
  q = _with_sign(q, _bits(g) < 0)
  q = jnp.where(amax == 0, g, q)
  return jnp.where(amax >= _INF_BITS, jnp.nan, q)


def _absmax(g: jax.Array, fmt: Format) -> jax.Array:
  """Symmetric scaled int / FP8: ``s = amax / max_normal``, ``Q = s * round_fmt(x / s)``."""
  y, e, amax = _normalize(g)
  s = jnp.where(amax == 0, 1.0, _divide(_ldexp(_float(amax), -e), fmt.max_normal))
  n = _round_element(_divide(y, s), fmt)
  return _finish(n * s, g, e, amax)


def _affine(g: jax.Array, fmt: Format) -> jax.Array:
  """Asymmetric scaled int: ``Q = s * (clip(RNE(x / s) + z, 0, 2^k - 1) - z)``."""
  y, e, amax = _normalize(g)
  levels = float(2**fmt.bits - 1)
  lo = jnp.minimum(jnp.min(y, axis=-1, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.max(y, axis=-1, keepdims=True), 0.0)
  s = jnp.where(amax == 0, 1.0, _divide(hi - lo, levels))
  z = jnp.round(_divide(-lo, s))
  n = jnp.clip(jnp.round(_divide(y, s)) + z, 0.0, levels)
  return _finish((n - z) * s, g, e, amax)


# ---------------------------------------------------------------------------
# Argument checks, grouping and the public function.
# ---------------------------------------------------------------------------
class _Spec(NamedTuple):
  fmt: Format
  granularity: str
  axis: int
  block_size: int
  symmetric: bool


def _spec(fmt, shape, dtype, axis, block_size, granularity, symmetric) -> _Spec:
  fmt = get_format(fmt)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"quantize expects floating-point input, got dtype {dtype}.")
  if granularity is not None and granularity not in GRANULARITIES:
    raise ValueError(
      f"`granularity` must be one of {GRANULARITIES} or None, got {granularity!r}.")
  if block_size is not None and (
      isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral)
      or block_size < 1):
    raise ValueError(f"`block_size` must be a positive integer or None, got {block_size!r}.")
  if fmt.kind == "mx":
    if granularity not in (None, "block"):
      raise ValueError(
        f"MX format {fmt.name!r} scales blocks: `granularity` must be 'block' or None, "
        f"got {granularity!r}.")
    granularity = "block"
    block_size = MX_BLOCK_SIZE if block_size is None else block_size
  elif granularity is None:
    granularity = "tensor" if block_size is None else "block"
  if granularity == "block" and block_size is None:
    raise ValueError("granularity='block' needs a `block_size`.")
  if granularity != "block" and block_size is not None:
    raise ValueError(
      f"`block_size`={block_size} is only used with granularity='block', "
      f"got granularity={granularity!r}.")
  if not symmetric and fmt.kind != "int":
    raise ValueError(f"`symmetric`=False is only defined for int formats, got {fmt.name!r}.")
  if granularity == "tensor":
    axis = 0
  else:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not (
        -len(shape) <= axis < len(shape)):
      raise ValueError(f"`axis`={axis!r} is out of range for an array of shape {shape}.")
    size = shape[axis]
    if granularity == "block" and size % block_size:
      raise ValueError(
        f"`block_size`={block_size} must divide the size {size} of `axis`={axis} "
        f"(shape {shape}).")
    axis = int(axis) % len(shape)
  return _Spec(fmt, granularity, axis, 0 if block_size is None else int(block_size),
               bool(symmetric))


def _grouped(fn, x: jax.Array, spec: _Spec) -> jax.Array:
  """Applies ``fn`` to ``x`` laid out as groups along a last axis, and lays it back."""
  if spec.granularity == "tensor":
    return fn(x.reshape(1, -1)).reshape(x.shape)
  g = jnp.moveaxis(x, spec.axis, -1)
  moved = g.shape
  if spec.granularity == "block":
    g = g.reshape(*moved[:-1], moved[-1] // spec.block_size, spec.block_size)
  return jnp.moveaxis(fn(g).reshape(moved), -1, spec.axis)


def _fake_quantize(x: jax.Array, spec: _Spec) -> jax.Array:
  if x.size == 0:
    return x
  if spec.fmt.kind == "mx":
    fn = functools.partial(_mx, fmt=spec.fmt)
  elif spec.symmetric:
    fn = functools.partial(_absmax, fmt=spec.fmt)
  else:
    fn = functools.partial(_affine, fmt=spec.fmt)
  return _grouped(fn, x.astype(jnp.float32), spec).astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _straight_through(x: jax.Array, spec: _Spec) -> jax.Array:
  return _fake_quantize(x, spec)


@_straight_through.defjvp
def _straight_through_jvp(spec, primals, tangents):
  # The identity tangent map is linear, so reverse mode (grad, vjp) follows by transposition;
  # the primal output goes through _straight_through again for higher derivatives.
  ((x,), (dx,)) = primals, tangents
  return _straight_through(x, spec), dx


def quantize(
    x: jax.Array,
    fmt: str | Format,
    *,
    axis: int = -1,
    block_size: int | None = None,
    granularity: str | None = None,
    symmetric: bool = True,
) -> jax.Array:
  """Fake-quantizes ``x`` to ``fmt``, with a straight-through gradient.

  Definitions of every format, the scaling groups and the handling of NaN, inf
  and subnormals are in the module docstring of ``jaxprune.quant``.

  Args:
    x: floating-point array (float32, bfloat16, float16, ...). Computed in
      float32, returned in ``x.dtype``.
    fmt: a name in ``FORMATS`` (or its ``Format``).
    axis: the axis that channel scales are reduced over and that blocks run
      along. Ignored for ``granularity='tensor'``.
    block_size: elements per block along ``axis``; must divide its size.
      Default for MX formats: ``MX_BLOCK_SIZE`` (32).
    granularity: ``'tensor'``, ``'channel'`` or ``'block'``. Default:
      ``'block'`` if ``block_size`` is given or ``fmt`` is MX, else ``'tensor'``.
    symmetric: int formats only; ``False`` selects the affine variant with an
      integer zero point.

  Returns:
    An array of ``x``'s shape and dtype whose values are representable in
    ``fmt`` times their group's scale. ``d quantize(x) / dx`` is the identity.

  Raises:
    ValueError: for an unknown ``fmt``, non-floating ``x``, an out-of-range
      ``axis``, a ``block_size`` that does not divide the axis, or inconsistent
      ``granularity`` / ``block_size`` / ``symmetric``.
  """
  x = jnp.asarray(x)
  spec = _spec(fmt, x.shape, x.dtype, axis, block_size, granularity, symmetric)
  return _straight_through(x, spec)
