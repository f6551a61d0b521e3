"""Landing the params exactly on the QAT view: the check, the corrections, and why.

The transform emits ``u = v - p`` and ``optax.apply_updates`` computes
``fl(p + u)`` in float32. That is ``v`` when ``v - p`` is a float32 (``v`` and
``p`` multiples of some ``2^l`` with ``|v - p| <= 2^(l + 24)``), and otherwise
only if the rounding happens to land there; some targets no single addition
reaches (a tiny ``v`` from a large ``p``: every ``fl(p + u)`` near 0 is a
multiple of about ``ulp(p)``). So inside the jitted update every entry is
checked, bit for bit, against what ``apply_updates`` will compute, and where it
would miss:

1. int and FP8 groups get a coarser scale: the same codes on the scale rounded to
   a multiple of ``2^l``, ``l = floor(log2 M) - 21`` with ``M`` the group's largest
   ``|v|`` or ``|p|`` (or the coarsest power of two dividing ``p``'s group, if
   finer), so that new and old values are multiples of ``2^l`` less than
   ``2^(l + 24)`` apart; for an int group whose scale shrank this lands every
   entry. (int: every group with a miss; FP8: groups whose largest entry misses,
   since single FP8 entries miss only when they collapse, see below.)
2. Entries that still miss land on ``0.0`` (``u = -p`` always lands exactly), and
   the whole group if its largest entry is among them, so that ``quantize`` keeps
   the group's scale. NVFP4's tensor is a group too: its largest entry sets the
   per-tensor scale, and if it misses, the whole tensor lands on 0 (from where the
   next step's view always lands; keeping the old params instead was measured to
   miss again, step after step, when the scale keeps moving).
3. Every entry that ends elsewhere than ``v`` is counted in
   ``MasterWeightsState.corrections`` (:func:`quantization_corrections`); nothing
   is silent, and the next step starts from the corrected params. A step where
   every entry lands pays only for the check (the corrections run under a ``cond``).

**When the params are exactly the view** ``v(W)`` (no correction), for params that
are the previous step's view (start with ``params = tx.view(params)``):

* ``int2`` ... ``int8``: every entry lands whenever each group's scale
  (``max |p| / q_max``) changes by at most a factor 4 in the step (8 for int2 ...
  int4). Proof: with ``s~ = m 2^(E-b+1)``, ``s' = m' 2^(E'-b+1)`` (``m, m' <= 2^b``)
  and ``|E - E'| <= D``, both values are multiples of ``2^(min(E, E') - b + 1)`` and
  ``|v - p| < q_max 2^(min(E, E') + 1) (1 + 2^D) <= 2^(min(E, E') - b + 25)``, since
  ``q_max (1 + 2^D) <= 2^(bits(2 q_max) + 2)`` for ``D <= 2`` (``D <= 3`` when
  ``q_max <= 8``); a factor 4 moves ``E`` by at most 2. A group whose scale shrinks
  by a larger factor ``F`` still lands every entry, with its codes and a scale
  within a relative ``F 2^-(b+1)`` of the view's (step 1; 0 only if
  ``F >= 2^22 / q_max``).
  A scale that grows by more than 4x can make an entry miss where ``u`` crosses a
  power of two (landed on 0; the whole group if it is the largest).
* MX: every entry lands whenever each block's shared exponent changes by at most
  6 (mxfp8_e4m3), 15 (mxfp6_e3m2), 18 (mxfp6_e2m3), 20 (mxfp4_e2m1) or 17
  (mxint8) in the step: the same argument on the element grid, whose values are
  multiples of its smallest step ``d`` up to ``max_normal <= 2^24 d / (1 + 2^D)``.
  mxfp8_e5m2 spans 32 bits within a block and has no such bound.
* NVFP4 (float32): every entry lands whenever, for each block, the binade
  exponents of its scale ``s_b`` and of the per-tensor scale ``s~`` together move by
  at most 2 in the step: the int argument with values ``< 2^21.5 u`` on the lattice
  ``u`` of :mod:`jaxprune.qat_grid` (``2^21.5 (1 + 2^2) < 2^24``). Measured as
  below (64x128 kernel, 100 steps, blocks of 16, dense and 2:4): no correction for
  steps of N(0, 1) or 3 N(0, 1), nor from ``1e-3 N(0, 1)``; the tensor scaled by
  ``2^U(-3, 3)``: 0-4; by ``2^U(-10, 10)`` (a stress test): 8-14% of the entry
  updates, whole tensors landed on 0 for a step because their largest entry missed.
* FP8 and MX: grid values have at most ``sigma`` significant bits (scaled FP8: 12,
  the element's ``mbits + 1`` plus the scale's ``b``; MX: ``mbits + 1``, 7 for
  mxint8). With ``sigma <= 12``, an entry can miss only if its magnitude changes by
  more than ``2^(23 - sigma)`` (``2^11`` for FP8) in one step: either it
  collapses, ``|v| < 2^(sigma - 23) |p|`` (landing on 0 is then off by less than
  that), or ``v = +-2^E`` is reached from a ``p`` of the opposite sign with
  ``|p| < 2^(sigma - 23) |v|``. Proof: if ``v - p`` is not a float32, it exceeds
  ``2^24`` times the lower of the two values' lowest set bits; if that is ``v``'s,
  ``|v| < 2^sigma 2^l < 2^(sigma - 24) |v - p|``; if it is ``p``'s, ``|p|`` is that
  small, ``u`` cannot cross ``2^(E+1)`` (``v``'s lowest bit exceeds ``|p|``), and
  ``fl(v + (u - (v - p)))`` is ``v`` (half-way cases round to ``v``, whose last
  significand bit is 0) unless ``v = 2^E`` and ``u`` crosses it.

Measured: 100 steps on a 64x128 kernel (819,200 entry updates) with the inner
optimizer replaced by a prescribed update, per tensor and per channel (MX: blocks
of 32), every format in ``quant.FORMATS``. Every entry moving by N(0, 1) or by 3
N(0, 1) per step (typically 2 or 5 grid steps of int4): no correction at all except
scaled fp8_e5m2 (4-10 entries, each a collapse landed on 0, off by at most
``8e-6 * amax``). The same with the whole tensor multiplied by ``2^U(-3, 3)``
every step: none for int and MX, 7-18 collapses for FP8 (off by ``<= 2.4e-4
amax``). Starting from weights ``1e-3 * N(0, 1)`` (the scale grows ~1000x in the
first step): 0-5 entries for int per channel, 5-6 for fp8_e5m2, 1 for
mxfp8_e5m2. The tensor multiplied by up to ``2^+-10`` every step (a stress test):
MX stays exact; int groups whose scale shrinks keep their codes on a coarser
scale (step 1; about 28% of the entry updates, within the relative ``F 2^-(b+1)``:
measured up to 6e-4 of amax for int4, 5e-3 for int7) and at most 8 entries land on
0; FP8 lands about 500 collapsing entries on 0 (off by at most 3.3% of the group's
amax). Without the snapped scales, plain ``quantize`` views miss on up to 3% (int8), 0.2%
(int4) and 4% (FP8) of the entries in the first regime already.
``tests/test_qat.py`` checks smaller versions of these, and the counts against
``params != view(master)`` after every step.

bfloat16 params
---------------
The update ``u`` is bfloat16 and the check emulates ``apply_updates``'s bfloat16
sum. There is no rescaling (the lattice argument needs more significant bits than
bfloat16 has): an entry that misses lands on 0, and its whole group if it is the
group's largest, counted as above. Misses are entries whose sign flips or whose
magnitude changes by more than 2x in a step (then ``v - p`` needs more than 8 bits).
Measured (this machine's CPU): 50 Adam(1e-2) steps towards a random target on a
64x128 kernel (409,600 entry updates), per channel for int and e4m3: int4 272-282,
int8 3,574-3,752, fp8_e4m3 5,788-5,791, fp8_e5m2 (per tensor) 5,412-5,591,
mxfp4_e2m1 and mxint8 0, mxfp8_e4m3 7-362 corrections (bfloat16 or float32 master
weights); the same run with float32 params: 0, except 1 for fp8_e5m2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprune import quant_bits as qb
from jaxprune.qat_grid import group_max, plus_zero


def _rounded(x: jax.Array, dtype) -> jax.Array:
  """float32 ``x`` rounded to the param ``dtype`` (float32 or bfloat16), as float32."""
  return qb.to_bfloat16(x).astype(jnp.float32) if dtype == jnp.bfloat16 else x


def _lands(p: jax.Array, u: jax.Array, v: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Whether ``p + u`` is ``v`` in the param ``dtype``, computed as ``optax.apply_updates`` will.

  ``p``, ``u``, ``v``: float32 arrays of ``dtype`` values; NaN views count as landed.
  float32: the backend's own addition, as ``apply_updates`` will do it (IEEE
  everywhere; subnormal results as the backend treats them), with ``u`` passed
  through its bits and an integer that is 0 unless ``p`` is NaN, so that no
  fast-math compiler can simplify ``p + (v - p)`` to ``v``. bfloat16: the IEEE sum on
  integers (:func:`jaxprune.quant_bits.add`), rounded to bfloat16 (the bfloat16
  sum: float32 has more than twice bfloat16's 8 significant bits).
  """
  if dtype == jnp.bfloat16:
    total = _rounded(qb.add(p, u), dtype)
  else:
    opaque = ((qb.bits(p) & qb.MAG) > qb.INF_BITS).astype(jnp.int32)
    total = p + qb.from_bits(qb.bits(u) | opaque)
  return (qb.bits(total) == qb.bits(v)) | jnp.isnan(v)


def _exponent(b: jax.Array) -> jax.Array:
  """``floor(log2 x)`` from the bits ``b`` of a normal float32 ``x > 0``."""
  return (b >> 23) - 127


def _lowest_bit_exponent(x: jax.Array) -> jax.Array:
  """``k`` with ``2^k`` the lowest set bit of each normal float32 ``x`` (a large int for 0)."""
  b = qb.bits(x) & qb.MAG
  m = (b & 0x7FFFFF) | 0x800000
  trailing = 31 - jax.lax.clz(m & -m)
  return jnp.where(b == 0, 1 << 30, _exponent(b) - 23 + trailing)


def _rescaled(v: jax.Array, p: jax.Array, spec) -> jax.Array:
  """``v``'s codes on its group scale rounded to a multiple of ``2^l``.

  With ``M`` the group's largest ``|v|`` or ``|p|``, ``l = floor(log2 M) - 21`` (or
  lower, down to the coarsest power of two dividing every entry of ``p``'s group):
  new and old values are then multiples of ``2^l`` that differ by less than
  ``3 M < 2^(l + 24)``, so int codes land exactly. The scale moves by at most
  ``2^(l - 1)``; it becomes 0 (the group lands on 0) if it is below that.
  ``quantize`` of the result has the same codes and the new scale.
  """
  top = group_max(qb.bits(v) & qb.MAG, spec)
  scale = qb.divide(jax.lax.bitcast_convert_type(top, jnp.float32), spec.fmt.max_normal)
  codes = qb.divide(v, jnp.where(top == 0, 1.0, scale))
  largest = jnp.maximum(top, group_max(qb.bits(p) & qb.MAG, spec))
  lattice = jnp.minimum(_exponent(largest) - 21, -group_max(-_lowest_bit_exponent(p), spec))
  lattice = jnp.clip(lattice, -126, 127)
  coarse = qb.round_to_multiple(scale, lattice)
  return plus_zero(codes * coarse)


def landing(v: jax.Array, p: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """The landing check: ``(u, hit)``, the update ``v - p`` in the param ``dtype`` and where
  ``p + u`` is ``v`` (``v``, ``p`` and ``u`` as float32)."""
  u = _rounded(v - p, dtype)  # bfloat16: rounded twice, innocuously (float32 has > 2 x 8 bits)
  return u, _lands(p, u, v, dtype)


def _rescale_missed(v, p, hit, spec):
  """Correction 1 (float32 int / FP8 params): ``(w, u, hit)`` for ``w``, ``v`` whose groups
  with a miss (int) or a missed largest entry (FP8) get a coarser scale (:func:`_rescaled`)."""
  kind, mag = spec.fmt.kind, qb.bits(v) & qb.MAG
  missed = group_max(jnp.where(hit, 0, mag if kind == "fp" else 1), spec)
  rescale = missed == (group_max(mag, spec) if kind == "fp" else 1)
  w = jnp.where(rescale & (mag != 0), _rescaled(v, p, spec), v)
  return w, w - p, _lands(p, w - p, w)


def _zero_missed(w, u, hit, p, spec):
  """Correction 2: ``(u, landed)`` with the entries that miss landed on 0 (``u = -p`` always
  lands), and the whole group where its largest entry misses (so it keeps its scale); for
  NVFP4 also the whole tensor where its largest entry (the per-tensor scale's) misses."""
  mag = qb.bits(w) & qb.MAG
  keep = hit & (group_max(jnp.where(hit, mag, 0), spec) == group_max(mag, spec))
  if spec.fmt.kind == "nvfp4":
    keep = keep & (jnp.max(jnp.where(hit, mag, 0)) == jnp.max(mag))
  return jnp.where(keep, u, -p), jnp.where(keep, w, jnp.zeros_like(w))


def correction(v, p, u, hit, spec, dtype) -> tuple[jax.Array, jax.Array]:
  """``(u, misses)`` after the corrections of the module docstring (float32 ``v``, ``p``, ``u``
  holding ``dtype`` values); ``misses`` counts the entries that end elsewhere than ``v``."""
  w = v
  if spec.fmt.kind in ("int", "fp") and dtype == jnp.float32:
    w, u, hit = _rescale_missed(v, p, hit, spec)
  u, landed = _zero_missed(w, u, hit, p, spec)
  return u, jnp.sum(((qb.bits(landed) != qb.bits(v)) & ~jnp.isnan(v)).astype(jnp.int32))


def land(v: jax.Array, p: jax.Array, spec) -> tuple[jax.Array, jax.Array]:
  """``(u, misses)``: the update that moves the params ``p`` onto the view ``v``, corrected where
  ``p + u`` would not be exactly ``v``, and the number of entries that end elsewhere.

  The landing check (:func:`landing`), then, only if some entry misses (under a
  ``cond``: a step where every entry lands pays only for the check), the
  corrections (:func:`correction`): float32 int and FP8 groups are first given a
  coarser scale (:func:`_rescaled`): int groups with any miss (misses there come
  from a scale that changed by more than 4x), FP8 groups whose largest entry
  misses (single entries miss when they collapse towards 0, and are better landed
  on 0); then every entry that still cannot land goes to 0, and the whole group
  if its largest entry is among them. bfloat16 params: the update and the check
  are in bfloat16, and there is no rescaling (a coarser scale's lattice would need
  more than bfloat16's 8 significant bits).
  """
  dtype = p.dtype
  v, p = v.astype(jnp.float32), p.astype(jnp.float32)
  hit = landing(v, p, dtype)[1]

  def corrected(v, p):  # recomputes the check: rarely run, and `hit` need not be stored
    return correction(v, p, *landing(v, p, dtype), spec, dtype)

  def landed(v, p):  # u again, computed inside the branch so that it is written once
    return landing(v, p, dtype)[0], jnp.zeros([], jnp.int32)

  u, misses = jax.lax.cond(jnp.all(hit), landed, corrected, v, p)
  return u.astype(dtype), misses
