"""Quantization-aware training (QAT) as a drop-in transform, with or without sparsity.

The model trains through fake quantization (Jacob et al. 2018, "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"):
it sees quantized weights, and the gradient taken there passes straight through
the rounding (the straight-through estimator of Bengio, Leonard and Courville
2013, "Estimating or Propagating Gradients Through Stochastic Neurons") to
float master weights ``W`` kept in the optimizer state. With ``Q`` the fake
quantizer below and ``M(s)`` the magnitude mask of scores ``s`` (True = kept),
the view the model sees is

.. math::

   \\text{order 'sq':}\\quad v(W) &= Q(M(|W|) \\odot W)
      \\qquad \\text{(scales computed on the sparse tensor)} \\\\
   \\text{order 'qs':}\\quad v(W) &= M(|Q(W)|) \\odot Q(W)

and each step is that of :func:`jaxprune.master_weight_transform`::

    W_{t+1} = W_t + inner_update(g_t)          # g_t: the gradient at the view
    params_{t+1} = v(W_{t+1})                  # emitted as an update, see below

Harma et al. 2024, "Effective Interplay between Sparsity and Quantization: From
Theory to Practice" (arXiv:2405.20935), show that sparsifying first is the
better order (see :mod:`jaxprune.compress`); ``'qs'`` is there to compare. In
``'qs'`` the mask ranks quantized magnitudes, which tie often: an N:M group keeps
the lower index of a tie (:func:`jaxprune.nm_mask`), an unstructured mask prunes
the higher row-major index first. ``M`` is N:M (``nm=(n, m)``, along the leaf's
axis) or unstructured at ``sparsity``, recomputed from ``|W|`` every step, so
pruned weights keep learning (STE). Sparsity may instead come from the inner
transform (:func:`jaxprune.nm_pruning`, :func:`jaxprune.magnitude_pruning`,
:func:`jaxprune.sr_ste`, ...): it then owns the (sparse) master weights and the
view is ``Q(W)``, whose scales are those of the sparse tensor and whose zeros stay
zeros.

The grid: scales with few significant bits
------------------------------------------
``Q`` is :func:`jaxprune.quant.quantize` except that the int and FP8 scale
``s = amax / max_normal`` is rounded to ``b`` significant bits
(:func:`scale_bits`): ``b = 22 - bits(2 q_max)`` for ``intk`` (20 for int2, 18 for
int4, 14 for int8), ``b = 11 - mbits`` for scaled FP8 (8 for e4m3, 9 for e5m2). MX
scales are powers of two already and MX is unchanged. The scale moves by a
relative ``|s~ - s| / s <= 2^-b``, the largest entry still maps onto
``+-max_normal`` (so ``amax`` is ``max_normal * s~`` exactly) and
``quantize(v) == v`` bit for bit: the params are exactly representable in the
plain format with the plain format's own scale rule. See :func:`snapped_quantize`.

Exactness: what is guaranteed, and why
--------------------------------------
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
   the group's scale.
3. Every entry that ends elsewhere than ``v`` is counted in
   ``MasterWeightsState.corrections`` (:func:`quantization_corrections`); nothing
   is silent, and the next step starts from the corrected params. A step where
   every entry lands pays only for the check (the corrections run under a ``cond``).

**Guaranteed after every step, for every format** (selected float32 or bfloat16
leaves, values in the normal range): ``quant.quantize(p, fmt, axis=a,
block_size=..., granularity=...) == p`` bit for bit, with ``a`` the leaf's
axis; the sparsity structure holds (pruned entries are exactly ``+0.0``, N:M
groups have at most ``n`` non-zeros, unstructured leaves at least
``round(sparsity * size)`` zeros); and every zero is ``+0.0``.

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
The grid is then ``quant.quantize``'s own in bfloat16: the view is
``Q(bf16(M(|W|) * W))`` (``'sq'``; ``'qs'`` likewise), whose symmetric int, FP8
and MX results are fixed points of ``quantize`` in bfloat16 (see
:mod:`jaxprune.quant`: ``amax`` is a bfloat16 value, so the scale is recomputed
exactly). No scale is snapped: a grid value has up to 8 significant bits either
way. With float32 master weights (the engine's layout for bfloat16 params) the
float32 view is rounded to bfloat16 and quantized there, which keeps its codes.
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

Composition and master weights
------------------------------
``quantization(inner, ...)`` is a :class:`jaxprune.ViewTransformation`: the
loop is unchanged (``tx.update`` then ``optax.apply_updates``); give the model
its first view with ``params = tx.view(params)``. Put it last in an
``optax.chain``. When the inner transform is itself a master-weight transform
(:func:`jaxprune.sr_ste`, :func:`jaxprune.ste`, :func:`jaxprune.gradient_flow`,
:func:`jaxprune.step_adam`), the views compose: the inner transform's params are
this transform's ``W``, ``view(params) = v(inner.view(params))``, and the state
holds two master-weight states. (A master-weight transform inside an
``optax.chain`` composes from the first update on; for the first view too, pass
``ViewTransformation(chain.init, chain.update, transform.view)``.)
:func:`jaxprune.master_params` then returns, for each parameter, the master of
the innermost transform that holds it (for SR-STE, its dense weights; ``W`` for
parameters only this transform selects). This transform's own ``W`` (sparse, not
quantized) is the ``master`` of the outermost :class:`jaxprune.MasterWeightsState`.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import _checks, pruning, quant
from jaxprune import masks as masks_lib
from jaxprune import quant_bits as qb
from jaxprune.compress import ORDERS, _check_nm
from jaxprune.straight_through import (
  MasterWeightsState,
  ViewTransformation,
  _state_chain,
  master_weight_transform,
)

_MAG = np.int32(0x7FFFFFFF)
_INF_BITS = np.int32(0x7F800000)


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


def _bits(x: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(x, jnp.int32)


def _group_max(x: jax.Array, spec) -> jax.Array:
  """The max over each scaling group of ``spec``, broadcast back to ``x``'s shape."""
  return quant._grouped(
      lambda g: jnp.broadcast_to(jnp.max(g, axis=-1, keepdims=True), g.shape), x, spec)


def _plus_zero(x: jax.Array) -> jax.Array:
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
  mag = _bits(g) & _MAG
  amax = jnp.max(mag, axis=-1, keepdims=True)
  finite = (amax > 0) & (amax < _INF_BITS)
  amax = jnp.where(finite, amax, 0x3F800000)
  # In units of 2^floor(log2 amax), as quantize computes, so that tiny groups keep a normal
  # scale; on the bits, since CPUs flush subnormals. One value per group.
  unit_scale = qb.divide(qb.mantissa(amax), max_normal)
  # max_normal * s~ is exact: it has at most 22 significant bits (scale_bits).
  top = _bits(qb.ldexp(max_normal * _snap(unit_scale, bits), qb.floor_log2(amax)))
  clipped = jnp.where(mag == amax, top, jnp.minimum(mag, top)) | (_bits(g) & ~_MAG)
  return jax.lax.bitcast_convert_type(jnp.where(finite, clipped, _bits(g)), jnp.float32)


def _quantize(x: jax.Array, spec, bits: int | None) -> jax.Array:
  """``quantize`` with the int/FP8 scale snapped to ``bits`` significant bits; zeros ``+0.0``.

  bfloat16 ``x``: ``quantize`` itself (its results are fixed points in bfloat16).
  """
  if bits is not None and x.dtype == jnp.float32:
    x = quant._grouped(
        functools.partial(_snapped_top, max_normal=spec.fmt.max_normal, bits=bits), x, spec)
  return _plus_zero(quant.quantize(x, spec.fmt, axis=spec.axis,
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
  spec = quant._spec(fmt, x.shape, x.dtype, axis, block_size, granularity, True)
  return _quantize(x, spec, scale_bits(spec.fmt))


def _rounded(x: jax.Array, dtype) -> jax.Array:
  """float32 ``x`` rounded to the param ``dtype`` (float32 or bfloat16), as float32."""
  return qb.to_bfloat16(x).astype(jnp.float32) if dtype == jnp.bfloat16 else x


def _lands(p: jax.Array, u: jax.Array, v: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Whether ``p + u`` is ``v`` in the param ``dtype``, computed as ``optax.apply_updates`` will.

  ``p``, ``u``, ``v``: float32 arrays of ``dtype`` values. The sum is IEEE's,
  computed on integers (:func:`jaxprune.quant_bits.add`; for bfloat16 rounded
  once more, which gives the bfloat16 sum since float32 has more than twice
  bfloat16's 8 significant bits): a fast-math compiler could simplify a float
  ``p + (v - p)`` to ``v``, and CPUs flush subnormals in float arithmetic. NaN
  views count as landed.
  """
  return (_bits(_rounded(qb.add(p, u), dtype)) == _bits(v)) | jnp.isnan(v)


def _exponent(b: jax.Array) -> jax.Array:
  """``floor(log2 x)`` from the bits ``b`` of a normal float32 ``x > 0``."""
  return (b >> 23) - 127


def _lowest_bit_exponent(x: jax.Array) -> jax.Array:
  """``k`` with ``2^k`` the lowest set bit of each normal float32 ``x`` (a large int for 0)."""
  b = _bits(x) & _MAG
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
  top = _group_max(_bits(v) & _MAG, spec)
  scale = qb.divide(jax.lax.bitcast_convert_type(top, jnp.float32), spec.fmt.max_normal)
  codes = qb.divide(v, jnp.where(top == 0, 1.0, scale))
  largest = jnp.maximum(top, _group_max(_bits(p) & _MAG, spec))
  lattice = jnp.minimum(_exponent(largest) - 21, -_group_max(-_lowest_bit_exponent(p), spec))
  lattice = jnp.clip(lattice, -126, 127)
  coarse = qb.round_to_multiple(scale, lattice)
  return _plus_zero(codes * coarse)


def _land(v: jax.Array, p: jax.Array, spec) -> tuple[jax.Array, jax.Array]:
  """``(u, misses)``: the update that moves ``p`` onto ``v`` where ``p + u`` is exactly ``v``.

  Where it is not, int and FP8 groups are first given a coarser scale
  (:func:`_rescaled`): int groups with any miss (misses there come from a scale
  that changed by more than 4x), FP8 groups whose largest entry misses (single
  entries miss when they collapse towards 0, and are better landed on 0). Then
  every entry that still cannot land goes to 0 (``u = -p`` always lands), and the
  whole group if its largest entry is among them, so the params keep the scale
  of their group. ``misses`` counts the entries that end elsewhere than ``v``.
  The corrections run under a ``cond``: a step where every entry lands pays only
  for the check.

  bfloat16 params (``v`` a bfloat16 view): the update and the check are in
  bfloat16, and there is no rescaling (a coarser scale's lattice would need more
  than bfloat16's 8 significant bits): missed entries go to 0 as above.
  """
  dtype = p.dtype
  v, p = v.astype(jnp.float32), p.astype(jnp.float32)
  u = _rounded(v - p, dtype)  # bfloat16: rounded twice, innocuously (float32 has > 2 x 8 bits)
  hit = _lands(p, u, v, dtype)
  kind = spec.fmt.kind

  def correct():
    w, mag, u_w, hit_w = v, _bits(v) & _MAG, u, hit
    if kind != "mx" and dtype == jnp.float32:
      missed = _group_max(jnp.where(hit, 0, mag if kind == "fp" else 1), spec)
      rescale = missed == (_group_max(mag, spec) if kind == "fp" else 1)
      w = jnp.where(rescale & (mag != 0), _rescaled(v, p, spec), v)
      mag, u_w = _bits(w) & _MAG, w - p
      hit_w = _lands(p, u_w, w)
    keep = hit_w & (_group_max(jnp.where(hit_w, mag, 0), spec) == _group_max(mag, spec))
    landed = jnp.where(keep, w, jnp.zeros_like(w))
    misses = jnp.sum(((_bits(landed) != _bits(v)) & ~jnp.isnan(v)).astype(jnp.int32))
    return jnp.where(keep, u_w, -p), misses

  u, misses = jax.lax.cond(jnp.all(hit), lambda: (u, jnp.zeros([], jnp.int32)), correct)
  return u.astype(dtype), misses


def _view_in(dtype, v: jax.Array, spec) -> jax.Array:
  """The view ``v`` on the grid of params of ``dtype``: for bfloat16 params, ``v`` rounded to
  bfloat16 and quantized there (a fixed point of ``quantize``; no change if ``v`` is already
  a bfloat16 view)."""
  if dtype != jnp.bfloat16 or v.dtype == jnp.bfloat16:
    return v
  return _quantize(qb.to_bfloat16(v), spec, None)


def _check_inner_sparsity(order: str, own_sparsity: bool) -> None:
  """Raises for the combinations that an inner transform owning sparsity rules out."""
  if order == "qs":
    raise ValueError(
        "order='qs' masks the quantized weights, so the mask must be this transform's "
        "(`sparsity` or `nm`), but the inner transform owns a mask computed on its own float "
        "weights. Use order='sq' with a pruning or master-weight inner (its zeros stay zeros "
        "and the scales are those of the sparse tensor), or a plain inner optimizer with "
        "`sparsity`/`nm` here.")
  if own_sparsity:
    raise ValueError(
        "sparsity comes either from `sparsity`/`nm` here or from the inner transform (a "
        "pruning or master-weight transform), not both.")


def _owns_sparsity(inner_state) -> bool:
  kinds = (pruning.PruningState, MasterWeightsState)
  return any(isinstance(x, kinds)
             for x in jax.tree.leaves(inner_state, is_leaf=lambda x: isinstance(x, kinds)))


def quantization(
    inner: optax.GradientTransformation,
    fmt: str | quant.Format,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    order: str = "sq",
    axis: int | None = None,
    block_size: int | None = None,
    granularity: str | None = None,
    select=None,
) -> ViewTransformation:
  """Quantization-aware training around any optimizer, optionally sparse.

  The model sees ``Q(M(|W|) * W)`` (``order='sq'``) or ``M(|Q(W)|) * Q(W)``
  (``'qs'``) of float master weights ``W`` that the inner optimizer updates
  with the gradient taken at the view (straight-through). The equations, the
  grid (scales rounded to :func:`scale_bits` significant bits) and what is
  guaranteed after every step are in the module docstring of
  :mod:`jaxprune.qat`; in short, every selected parameter is exactly
  representable (``quant.quantize(p, fmt, axis=a, block_size=block_size,
  granularity=granularity) == p`` bit for bit, ``a`` the leaf's axis) and
  has its sparsity structure after every step, and the rare entries that
  cannot land on the view are corrected (a coarser group scale, or 0) and
  counted (:func:`quantization_corrections`).

  Usage::

      tx = jaxprune.quantization(optax.adam(1e-3), "int4", nm=(2, 4))
      # or sparsity from a pruning transform:
      tx = jaxprune.quantization(jaxprune.nm_pruning(optax.adam(1e-3), 2, 4), "mxfp4_e2m1")
      state = tx.init(params)
      params = tx.view(params)                      # the first forward pass sees Q(S(W))
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)

  Args:
    inner: the optimizer of the master weights; may be a pruning transform
      or a master-weight transform (then it owns the sparsity; see the module
      docstring).
    fmt: a name in :data:`jaxprune.quant.FORMATS` (or its ``Format``).
    sparsity: unstructured magnitude sparsity in [0, 1), per leaf (ERK and
      per-parameter overrides through ``select``).
    nm: ``(n, m)``: keep ``n`` of every ``m`` along the leaf's axis.
    order: ``'sq'`` (sparsify, then quantize with the sparse tensor's scales)
      or ``'qs'`` (quantize, then mask by quantized magnitude; needs
      ``sparsity`` or ``nm`` here, not an inner pruning transform, whose mask
      is computed on its own float weights).
    axis: the N:M grouping axis and the axis that channel scales are reduced
      over and blocks run along, for every leaf; ``None``: the input axis of
      a Flax kernel (0 for ``(in, out)``, ``ndim - 2`` for HWIO), where MX
      blocks and 2:4 groups run along the dot product. Per-parameter ``axis``
      overrides in ``select`` take precedence.
    block_size: elements per block (MX default 32); must divide the axis of
      every selected leaf.
    granularity: ``'tensor'``, ``'channel'`` or ``'block'``, as in
      :func:`jaxprune.quant.quantize` (default ``'tensor'``, or ``'block'``
      with ``block_size`` and for MX).
    select: which parameters, see :func:`jaxprune.select` (default: kernels,
      not embeddings or the output head).

  Returns:
    A :class:`jaxprune.ViewTransformation` whose state is a
    :class:`jaxprune.MasterWeightsState` (with ``corrections``).

  Raises:
    ValueError: at construction for an unknown ``fmt`` (listing the valid
      names), an ``order`` other than ``'sq'``/``'qs'``, both ``sparsity``
      and ``nm``, ``sparsity`` outside [0, 1), a bad ``nm``, inconsistent
      ``granularity``/``block_size``, ``order='qs'`` with ``nm`` and blocks
      that ``m`` does not divide, or a master-weight ``inner`` (which owns
      sparsity) with ``sparsity``/``nm`` or ``order='qs'``; at ``init`` for a
      selected leaf that is not float32 or bfloat16 or whose axis the block size does not
      divide (naming the leaf), and for a pruning transform found in the inner
      state with ``sparsity``/``nm`` or ``order='qs'``.
  """
  fmt = quant.get_format(fmt)
  if order not in ORDERS:
    raise ValueError(f"`order` must be one of {ORDERS}, got {order!r}.")
  if sparsity is not None and nm is not None:
    raise ValueError("give either `sparsity` (unstructured) or `nm` (N:M), not both.")
  nm = _check_nm(nm)
  if sparsity is not None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
      raise ValueError(f"`sparsity` must be a number in [0, 1), got {sparsity!r}.")
    _checks.check_sparsity("sparsity", sparsity)
    sparsity = float(sparsity)
  if axis is not None:
    axis = _checks.check_int("axis", axis)
  # The shape-independent settings are checked now, on a shape every block size divides.
  size = block_size if isinstance(block_size, numbers.Integral) and block_size > 0 else (
      quant.MX_BLOCK_SIZE if fmt.kind == "mx" else 1)
  probe = quant._spec(fmt, (size,), jnp.float32, 0, block_size, granularity, True)
  if order == "qs" and nm is not None and probe.granularity == "block" and (
      probe.block_size % nm[1]):
    raise ValueError(
        f"order='qs' with nm={nm} needs the N:M groups inside the scaling blocks: m = {nm[1]} "
        f"must divide `block_size` = {probe.block_size}, or a block's largest entry could "
        "be pruned and the block's scale would change.")
  own_sparsity = nm is not None or bool(sparsity)
  if isinstance(inner, ViewTransformation):
    _check_inner_sparsity(order, own_sparsity)
  structure = masks_lib.nm(*nm, axis=axis) if nm is not None else masks_lib.UNSTRUCTURED
  target = structure.sparsity if nm is not None else (sparsity or 0.0)
  selection = pruning.as_selection(select)
  bits = scale_bits(fmt)

  def spec_of(leaf) -> quant._Spec:
    leaf_axis = leaf.axis
    override = selection.override(leaf.path)
    if axis is not None and (override is None or override.axis is None):
      leaf_axis = axis
    try:
      return quant._spec(fmt, leaf.shape, jnp.float32, leaf_axis, block_size, granularity, True)
    except ValueError as e:
      raise ValueError(f"{leaf.path}: {e}") from None

  def q(leaf, x):
    return _quantize(x, spec_of(leaf), bits)

  def all_kept(leaf, w, step):
    del leaf, step
    return jnp.ones((), bool)

  def qs_mask(leaf, w, step):
    del step
    scores = [jnp.abs(q(leaf, w))]
    return pruning.mask_leaves([leaf], scores, jnp.float32(target), target, structure)[0]

  def leaf_view(leaf, w, mask, step):
    del step
    if order == "qs":
      return jnp.where(mask, q(leaf, w), jnp.zeros_like(w))
    return q(leaf, jnp.where(mask, w, jnp.zeros_like(w)))

  def land(leaf, v, p):
    spec = spec_of(leaf)
    return _land(_view_in(p.dtype, v, spec), p, spec)

  if not own_sparsity:
    mask_fn = all_kept
  else:
    mask_fn = qs_mask if order == "qs" else None
  tx = master_weight_transform(inner, select=selection, structure=structure, sparsity=target,
                               mask_fn=mask_fn, leaf_view_fn=leaf_view, land_fn=land)

  def plan_of(params):
    return pruning._plan(params, selection, target, structure, "layer")

  def init_fn(params):
    for leaf, x in zip(plan_of(params), jax.tree.leaves(params), strict=True):
      if leaf is not None:
        if jnp.asarray(x).dtype not in (jnp.float32, jnp.bfloat16):
          raise ValueError(
              f"{leaf.path}: quantization-aware training needs float32 or bfloat16 params, "
              f"got {jnp.asarray(x).dtype}; keep it out of `select` or cast it.")
        spec_of(leaf)
    state = tx.init(params)
    if _owns_sparsity(state.inner_state):
      _check_inner_sparsity(order, own_sparsity)
    return state

  @jax.jit
  def view(params):
    # With float32 masters for bfloat16 params the engine computes the view in float32 and
    # casts it: quantized again in bfloat16, it is on the grid (a no-op if it already was).
    views = jax.tree.leaves(tx.view(params))
    return jax.tree.structure(params).unflatten([
        v if leaf is None or v.dtype != jnp.bfloat16 else _quantize(v, spec_of(leaf), None)
        for leaf, v in zip(plan_of(params), views, strict=True)])

  return ViewTransformation(init_fn, tx.update, view)


def quantization_corrections(opt_state) -> jax.Array:
  """Entries whose params did not land on the view, summed over steps (:mod:`jaxprune.qat`).

  Each was corrected instead (its group given a coarser scale, or landed on 0).

  Args:
    opt_state: the state of :func:`quantization`, or any state that contains
      it (``optax.chain``, ``nnx.Optimizer``'s ``opt_state``).

  Returns:
    An int32 scalar (saturating at ``2^31 - 1``), summed over nested
    quantization transforms.
  """
  counts = [jnp.asarray(s.corrections) for s in _state_chain(opt_state)
            if s.corrections is not None]
  if not counts:
    raise ValueError("`opt_state` holds no jaxprune.quantization state.")
  return sum(counts[1:], counts[0])
