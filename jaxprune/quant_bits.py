"""float32 arithmetic on bit patterns and integer significands: the same bits on every backend.

XLA does not promise IEEE results for every float operation. On GPUs and TPUs
(and on CPU with ``--xla_cpu_enable_fast_math``) a division may become a
multiplication by an approximate reciprocal, subnormal operands and results may
be flushed to zero, and a float32 to FP8 conversion may round twice, through
float16. What *is* exact everywhere: int32 arithmetic, bitcasts, comparisons,
``max``/``min``, and float products that are exactly representable normal
float32 numbers (e.g. a small integer times a power of two).

So everything here works on the int32 bit pattern of a float32 and on its
integer significand: a finite ``x`` is ``m * 2^f`` with ``m < 2^24``
(:func:`significand`), and a result ``(m + delta) * 2^e`` with an integer ``m``
and a *sticky* fraction ``0 <= delta < 1`` is rounded to float32 by
:func:`compose` (round half to even, or half away from zero; subnormals kept;
overflow to ``inf``). Division (:func:`divide`) computes the integer quotient of
the significands from a float estimate, then corrects it with an exact integer
remainder, so it is correctly rounded on every backend; multiplication
(:func:`multiply`) forms the exact 48-bit product of the significands on 12-bit
limbs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SIGN = np.int32(-(2**31))
MAG = np.int32(0x7FFFFFFF)
INF_BITS = 0x7F800000
MANT = 0x7FFFFF
IMPLICIT = 0x800000
TIES = ("even", "away")


def bits(x: jax.Array) -> jax.Array:
  """The int32 bit pattern of a float32 array."""
  return jax.lax.bitcast_convert_type(x, jnp.int32)


def from_bits(b: jax.Array) -> jax.Array:
  """The float32 whose bit pattern is the int32 ``b``."""
  return jax.lax.bitcast_convert_type(b, jnp.float32)


def computed_once(token: jax.Array, *xs: jax.Array) -> tuple[jax.Array, ...]:
  """``xs`` (float32) unchanged, each computed once rather than once per element of its use.

  XLA fuses cheap elementwise producers into their consumers, so a per-tensor or
  per-block value broadcast onto a tensor (a scale made of a few hundred integer
  operations, say) is recomputed for every element that it scales. XLA does not
  duplicate an integer division by a value that it cannot fold
  (``InstructionFusion::IsExpensive``), so dividing the bits by a ``1`` made from
  ``token`` (int32, ``>= 0``: the bits of a magnitude; a scalar, as its max is taken)
  makes each its own buffer.
  Exact on every backend (``b / 1 = b``). NVFP4 fake quantization of 784x1024 on CPU
  went from 5.4 to 0.9 ms (QAT's fast path) and from 8 to 3 ms (``quantize``).
  """
  one = 1 + (jnp.max(token) >> 31)  # 1, as token >= 0; XLA cannot know that
  return tuple(from_bits(jax.lax.div(bits(x), one)) for x in xs)


def msb(m: jax.Array) -> jax.Array:
  """Index of the most significant set bit of a positive int32 (-1 for 0)."""
  return 31 - jax.lax.clz(m)


def significand(mag: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(m, f)`` with ``|x| = m * 2^f`` exactly, ``m < 2^24``, from the bits ``mag`` of ``|x|``.

  ``m`` has its implicit bit for normal ``x``; ``f = max(biased exponent, 1) - 150``.
  """
  biased = mag >> 23
  m = jnp.where(biased > 0, (mag & MANT) | IMPLICIT, mag)
  return m, jnp.maximum(biased, 1) - 150


def floor_log2(mag: jax.Array) -> jax.Array:
  """Exact ``floor(log2 |x|)`` from the bits ``mag`` of a finite nonzero ``|x|``."""
  biased = mag >> 23
  return jnp.where(biased > 0, biased - 127, msb(mag) - 149)


def mantissa(mag: jax.Array) -> jax.Array:
  """``|x| / 2^floor(log2 |x|)`` in ``[1, 2)``, also for subnormal ``x``."""
  m, _ = significand(mag)
  return from_bits(((m << jnp.maximum(23 - msb(m), 0)) & MANT) | 0x3F800000)


def pow2(k: jax.Array) -> jax.Array:
  """``2^k`` as a normal float32, for integer ``-126 <= k <= 127``."""
  return from_bits((jnp.clip(k, -126, 127) + 127) << 23)


def check_ties(ties: str) -> None:
  if ties not in TIES:
    raise ValueError(f"`ties` must be one of {TIES}, got {ties!r}.")


def round_shift(m: jax.Array, shift: jax.Array, *, sticky: jax.Array | None = None,
                ties: str = "even") -> jax.Array:
  """``(m + delta) / 2^shift`` rounded to an integer, for int32 ``0 <= m < 2^29``, ``shift >= 1``.

  ``delta`` is an unknown fraction in ``(0, 1)`` where ``sticky`` is True and 0
  elsewhere: it only breaks ties. ``ties='even'`` rounds half to even,
  ``'away'`` half away from zero (up). Shifts above 30 act as 30 (the result is 0).
  """
  check_ties(ties)
  shift = jnp.clip(shift, 1, 30)
  kept = m >> shift
  rest = m - (kept << shift)
  half = (1 << shift) >> 1
  if ties == "away":
    up = rest >= half
  else:
    exact_tie_to_odd = (kept & 1) == 1
    if sticky is not None:
      exact_tie_to_odd = exact_tie_to_odd | sticky
    up = (rest > half) | ((rest == half) & exact_tie_to_odd)
  return kept + up.astype(jnp.int32)


def compose(m: jax.Array, e: jax.Array, *, sticky: jax.Array | None = None,
            ties: str = "even") -> jax.Array:
  """The float32 ``(m + delta) * 2^e`` rounded to nearest, for int32 ``0 <= m < 2^29``.

  ``delta`` as in :func:`round_shift` (``sticky``; needs ``m >= 2^24`` where it is
  set, so that the rounding bit is inside ``m``). Subnormal results are rounded
  like IEEE arithmetic without flushing; overflow gives ``+inf``; ``m = 0`` gives
  ``+0.0``.
  """
  lead = msb(m)
  shift = jnp.maximum(lead - 23, -149 - e)  # drop `shift` bits: 24 kept, or down to 2^-149
  rounded = round_shift(m, shift, sticky=sticky, ties=ties)
  r = jnp.where(shift > 0, rounded, m << jnp.clip(-shift, 0, 31))
  unit = e + shift + 149  # r * 2^(unit - 149); r in [2^23, 2^24] unless subnormal
  overflow = unit + (r >> 23) >= 255
  out = (jnp.minimum(unit, 253) << 23) + r
  out = jnp.where(overflow, INF_BITS, out)
  return from_bits(jnp.where(m == 0, 0, out))


def ldexp(x: jax.Array, k: jax.Array) -> jax.Array:
  """``x * 2^k`` rounded to nearest even like IEEE arithmetic, subnormals kept.

  ``jnp.ldexp`` flushes subnormal inputs and results to zero on CPU; this works
  on the bit patterns instead. NaN and inf pass through; overflow gives inf.
  """
  b = bits(x)
  mag = b & MAG
  m, f = significand(mag)
  out = bits(compose(m, f + k))
  out = jnp.where(mag >= INF_BITS, mag, out)
  return from_bits((b & SIGN) | out)


def round_to_multiple(x: jax.Array, k: jax.Array) -> jax.Array:
  """A finite ``x >= 0`` rounded to a multiple of ``2^k`` (half to even); subnormals kept."""
  m, f = significand(bits(x))
  shift = k - f
  r = jnp.where(shift > 0, round_shift(m, shift), m)
  return compose(r, jnp.where(shift > 0, k, f))


def round_to_significant_bits(x: jax.Array, n: int) -> jax.Array:
  """A finite ``x >= 0`` rounded to ``n`` significant bits (half to even), ``1 <= n <= 24``."""
  mag = bits(x)
  return round_to_multiple(x, floor_log2(mag) + 1 - n)


def add(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a + b`` rounded to nearest even like IEEE arithmetic, subnormals kept, on integers.

  What ``a + b`` gives on a backend that neither flushes subnormals nor lets the
  compiler rewrite the expression around it (fast math may turn ``p + (v - p)``
  into ``v``). The larger magnitude's significand gets 4 guard bits, the
  smaller one is aligned to it with a sticky bit, and :func:`compose` rounds.
  Infinite or NaN operands fall back to the backend's addition.
  """
  ba, bb = bits(a), bits(b)
  swap = (bb & MAG) > (ba & MAG)
  bx, by = jnp.where(swap, bb, ba), jnp.where(swap, ba, bb)  # |x| >= |y|
  mx, fx = significand(bx & MAG)
  my, fy = significand(by & MAG)
  shift = jnp.clip(fx - fy, 0, 31)
  y4 = my << 4
  y_aligned = y4 >> jnp.minimum(shift, 30)
  sticky = (y_aligned << jnp.minimum(shift, 30)) != y4
  same_sign = (bx ^ by) >= 0
  total = jnp.where(same_sign, (mx << 4) + y_aligned, (mx << 4) - y_aligned - sticky)
  out = bits(compose(total, fx - 4, sticky=sticky))
  both_zero = ((bx | by) & MAG) == 0
  sign = jnp.where(both_zero, bx & by & SIGN, jnp.where(total == 0, 0, bx & SIGN))
  special = ((ba & MAG) >= INF_BITS) | ((bb & MAG) >= INF_BITS)
  return jnp.where(special, a + b, from_bits(sign | out))


def _normalized(mag: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(m, f)`` with ``|x| = m * 2^f`` and ``2^23 <= m < 2^24`` (for nonzero ``x``)."""
  m, f = significand(mag)
  up = jnp.maximum(23 - msb(m), 0)
  return m << up, f - up


def _product_hi_lo(q: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``q * b = hi * 2^24 + lo`` exactly, for ``0 <= q < 2^25 + 2^12`` and ``0 <= b < 2^24``.

  Schoolbook multiplication on 12-bit limbs: every partial product fits an int32.
  """
  qh, ql = q >> 12, q & 0xFFF
  bh, bl = b >> 12, b & 0xFFF
  mid = qh * bl + ql * bh
  lo = ql * bl + ((mid & 0xFFF) << 12)
  return qh * bh + (mid >> 12) + (lo >> 24), lo & 0xFFFFFF


def _operands(a, b) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``(a, b, bits(a), bits(b))`` as float32, ``b`` broadcast to ``a``'s shape."""
  b = jnp.broadcast_to(b, jnp.shape(a)).astype(jnp.float32)
  a = jnp.asarray(a, jnp.float32)
  return a, b, bits(a), bits(b)


def divide(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a / b`` correctly rounded (to nearest even), the same bits on every backend.

  With ``|a| = A 2^fa`` and ``|b| = B 2^fb`` normalized (``2^23 <= A, B < 2^24``) and
  ``K = 24 + [A < B]``, the quotient is ``(Q + R / B) 2^(fa - fb - K)`` where
  ``Q = floor(A 2^K / B)`` lies in ``[2^24, 2^25)`` and ``0 <= R < B``; :func:`compose`
  rounds it (``R != 0`` is the sticky bit). ``Q`` is first estimated with a float
  division (any backend's is within a few ulps, far inside the +-63 that the
  correction handles) and then corrected with the exact remainder
  ``A 2^K - Q B``, computed on 12-bit limbs. Subnormal operands and results are
  exact. ``b`` broadcasts to ``a``'s shape. Zero, infinite or NaN operands fall
  back to the backend's division (their results are exact anyway: 0, inf or NaN).
  """
  a, b, ba, bb = _operands(a, b)
  mag_a, mag_b = ba & MAG, bb & MAG
  (big_a, fa), (big_b, fb) = _normalized(mag_a), _normalized(mag_b)
  less = (big_a < big_b).astype(jnp.int32)
  num = big_a << less  # A 2^K = num 2^24
  ratio = num.astype(jnp.float32) / big_b.astype(jnp.float32)  # in [1, 2), a few ulps off
  q = jnp.clip(jnp.floor(ratio * 2.0**24), 2**24 - 64, 2**25 + 63).astype(jnp.int32)
  hi, lo = _product_hi_lo(q, big_b)
  r = ((num - hi) << 24) - lo  # A 2^K - q B, |r| < 2^31 while |q - Q| <= 63
  d = jnp.floor(r.astype(jnp.float32) / big_b.astype(jnp.float32)).astype(jnp.int32)
  q, r = q + d, r - d * big_b
  fix = (r >= big_b).astype(jnp.int32) - (r < 0).astype(jnp.int32)
  q, r = q + fix, r - fix * big_b
  out = bits(compose(q, fa - fb - 24 - less, sticky=r != 0))
  special = (mag_a == 0) | (mag_a >= INF_BITS) | (mag_b == 0) | (mag_b >= INF_BITS)
  out = from_bits(((ba ^ bb) & SIGN) | out)
  return jnp.where(special, a / b, out)


def multiply(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a * b`` rounded to nearest even like IEEE arithmetic, subnormals kept, on integers.

  With ``|a| = A 2^fa`` and ``|b| = B 2^fb`` normalized (``2^23 <= A, B < 2^24``), the
  product ``A B`` (below ``2^48``) is computed exactly on 12-bit limbs; its top 27 bits
  and a sticky bit for the rest go to :func:`compose`. A backend that flushes
  subnormals, or a compiler that reassociates a chain of products, changes nothing.
  ``b`` broadcasts to ``a``'s shape. Zero, infinite or NaN operands fall back to the
  backend's product (exact: 0, inf or NaN).
  """
  a, b, ba, bb = _operands(a, b)
  mag_a, mag_b = ba & MAG, bb & MAG
  (big_a, fa), (big_b, fb) = _normalized(mag_a), _normalized(mag_b)
  hi, lo = _product_hi_lo(big_a, big_b)  # A B = hi 2^24 + lo, hi in [2^22, 2^24)
  top = (hi << 3) | (lo >> 21)
  out = bits(compose(top, fa + fb + 21, sticky=(lo & 0x1FFFFF) != 0))
  special = (mag_a == 0) | (mag_a >= INF_BITS) | (mag_b == 0) | (mag_b >= INF_BITS)
  # Selected as integers: a float select may flush a subnormal `out` (XLA:CPU fast math).
  return from_bits(jnp.where(special, bits(a * b), ((ba ^ bb) & SIGN) | out))


def to_bfloat16(x: jax.Array) -> jax.Array:
  """float32 to bfloat16, rounded to nearest even on the bits (subnormals kept, NaN kept).

  The same bits as XLA's conversion where that neither flushes subnormals nor
  rounds twice.
  """
  b = bits(x)
  mag = b & MAG
  rounded = (mag + 0x7FFF + ((mag >> 16) & 1)) >> 16
  rounded = jnp.where(mag > INF_BITS, 0x7FC0, rounded)
  out = rounded | ((b >> 16) & 0x8000)
  return jax.lax.bitcast_convert_type(out.astype(jnp.uint16), jnp.bfloat16)


def from_bfloat16(x: jax.Array) -> jax.Array:
  """bfloat16 to float32 on the bits: exact, and it reads the bfloat16 value itself.

  (XLA may keep a bfloat16 intermediate in float32 inside a fusion,
  ``xla_allow_excess_precision``; a bitcast needs the rounded bits.)
  """
  b = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.int32)
  return from_bits(b << 16)


def with_sign(magnitude: jax.Array, negative: jax.Array) -> jax.Array:
  """``magnitude`` (a float32 ``>= 0``) with its sign bit set where ``negative``."""
  return from_bits(bits(magnitude) | jnp.where(negative, SIGN, np.int32(0)))
