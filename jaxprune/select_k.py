"""Exact bottom-k selection without a full sort: the engine of the magnitude masks.

:func:`bottom_k` prunes exactly the ``k`` smallest entries of the union of
several score arrays. Scores are ranked on int32 *keys* in IEEE 754
totalOrder (:func:`compare_key`), and ties are broken by position: the
pruning order is

.. math::  (\\mathrm{key}(s_i),\\ -i) \\quad \\text{ascending},

with ``i`` the flat index in the concatenation of the leaves (row-major, in
leaf order): among equal scores, later leaves and higher indices are pruned
first. Every method below returns this same mask, bit for bit, on every
backend; they differ only in speed.

Each method finds the threshold key ``t`` (the k-th smallest) and the count
``below = #{key < t}``; a tie pass then finds where the ties at ``t`` are
cut, and one elementwise pass writes the mask. ``scripts/bench.py --only
masks`` times every method on the backend at hand, in elementwise passes
(one pass = one jitted ``jnp.abs(x) * 2`` over the same tensors), and prints
about how many kernels each launches. The cost model, for ``n`` keys:

* ``'radix'``: two-round 16-bit radix select. Round 1 scatter-adds every
  key's top 16 bits into a 65,536-bin histogram, round 2 the low 16 bits of
  the keys in the chosen bin; prefix sums find the bins. Ties that are only
  partly pruned are located by a histogram of their flat indices, behind a
  ``lax.cond`` (skipped for distinct scores). Two read passes with ``n``
  scatter updates each. XLA:CPU scatters are serial loops without
  contention: the fastest method on CPU. On a GPU every update is a global
  atomic add, serialised when many keys share a bin (the top 16 bits of
  ``|w|`` take a few hundred values; heavily tied scores, a handful).
* ``'sort'``: one stable key-value sort of the reversed keys with their
  positions (``lax.sort``, int32 keys and a plain ``<``, which XLA:GPU can
  hand to CUB's radix sort) gives the k-th entry of the pruning order
  directly. About eight read-and-write passes of ``8n`` bytes in a few
  kernels, whatever the data; no tie pass. On a CPU, hundreds of passes.
* ``'bisect'``: multi-way bisection with reductions only, no scatter and no
  sort. Each round compares every key with the ``2**bits - 1`` pivots that
  split the current interval of keys evenly and counts in one fused
  reduction; ``32 / bits`` rounds (``bits = 4``: 8 rounds of 15 pivots).
  Data-independent cost (ties cost the same as distinct scores): 8 read
  passes and 8 small kernels, then the tie pass. 255 pivots would halve the
  rounds but make each one bound by its ``255 n`` comparisons. Meant for
  TPUs, where scatters and sorts are slow.
* ``'sample'``: a sampled threshold with an exact fix-up. A stratified,
  jittered sample of 4,096 keys is sorted; 15 of its keys spanning +-5
  standard deviations of the k-th key's rank in the sample are counted in
  one fused reduction (``#{key < p}``, ``#{key <= p}``). Either a pivot *is*
  the k-th key (always, for heavily tied scores) or the k-th key lies
  strictly between two adjacent pivots, in a band of about ``0.7 sqrt(q (1 -
  q) / 4096)`` of the keys (0.45% for ``q = 80%``); the radix select above
  then runs on that band only, so only the band's keys scatter (thousands
  of atomics, not millions, spread over the bins). Three read passes, the
  tie pass and the mask pass, plus about twenty small kernels (sample sort,
  prefix sums over 65,536 bins): the candidate for GPUs. The mask never
  depends on the sample: a poor sample widens the band (slower); it cannot
  change the mask.

``bisect`` and ``sample`` locate the cut in the ties by reductions over
blocks of 1,024 entries (one read pass and a few small kernels; no scatter
and no ``cond``, which on a GPU costs a device-to-host synchronisation).
On a GPU, where each kernel launch costs about as much as a read pass over
4 MB, the kernel count matters as much as the passes. The default per
backend is :data:`DEFAULT_METHOD`, read at trace time from
``jax.default_backend()``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

METHODS = ("radix", "sort", "bisect", "sample")

# The default method per backend (``jax.default_backend()``). Every method gives
# the same masks, so this table only decides speed: set each entry to the fastest
# row of ``python scripts/bench.py --only masks`` run on that backend.
# cpu: radix, measured fastest on CPU by far (the others materialise comparisons
#   or sort). gpu, tpu: not measured yet; picked by the cost model above.
DEFAULT_METHOD = {"cpu": "radix", "gpu": "sample", "tpu": "bisect"}
_FALLBACK_METHOD = "radix"

_RADIX_BITS = 16
_NUM_BINS = 1 << _RADIX_BITS
_TIE_BLOCK = 1024
_BISECT_BITS = 4
_SAMPLE_SIZE = 4096
_SAMPLE_PIVOTS = 15
_SAMPLE_SPREAD = 5.0
_SIGN = -(1 << 31)  # int32 0x80000000


# ----------------------------------------------------------------------------
# Keys.


def compare_key(scores: Array) -> Array:
  """int32 keys whose signed order is IEEE totalOrder, with every NaN largest.

  ``-inf < ... < -0.0 < +0.0 < subnormals < ... < +inf < NaN``: the float32
  bit pattern ``b`` (scores are converted to float32 first: exact for
  bfloat16 and float16) maps to ``b ^ ((b >> 31) & 0x7FFFFFFF)``, after
  every NaN, whatever its sign or payload, is made the largest positive one.
  So a NaN score is never pruned before a finite one (a NaN weight does not
  push a healthy weight out), NaNs tie with each other, and ``-inf`` is the
  smallest score (e.g. ``log |w|`` of an exact zero). Comparing keys rather
  than floats matters on CPUs, where XLA treats subnormals as zero.
  """
  b = lax.bitcast_convert_type(jnp.asarray(scores).astype(jnp.float32), jnp.int32)
  b = jnp.where((b & 0x7FFFFFFF) > 0x7F800000, jnp.int32(0x7FFFFFFF), b)
  return b ^ ((b >> 31) & 0x7FFFFFFF)


def _radix_key(scores: Array) -> Array:
  """uint32 keys whose unsigned order is :func:`compare_key`'s (the histograms' digits).

  The same keys as ``_radix(compare_key(scores))``, written as a different
  expression on purpose: XLA merges identical expressions, and a key shared
  by the histograms, the tie pass and the mask is materialised in memory
  (on CPU, 3-4x slower) instead of being recomputed inside each pass.
  """
  b = lax.bitcast_convert_type(jnp.asarray(scores).astype(jnp.float32), jnp.uint32)
  r = jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))
  nan = (r > jnp.uint32(0xFF800000)) | (r < jnp.uint32(0x007FFFFF))
  return jnp.where(nan, jnp.uint32(0xFFFFFFFF), r)


def _radix(key: Array) -> Array:
  """The uint32 key with the same order as the int32 ``key`` (top bit flipped)."""
  return lax.bitcast_convert_type(key ^ jnp.int32(_SIGN), jnp.uint32)


def _unradix(key: Array) -> Array:
  return lax.bitcast_convert_type(key, jnp.int32) ^ jnp.int32(_SIGN)


def default_method() -> str:
  """:data:`DEFAULT_METHOD` for the backend that ``jit`` is tracing for."""
  return DEFAULT_METHOD.get(jax.default_backend(), _FALLBACK_METHOD)


def check_method(method: str | None) -> str:
  if method is None:
    return default_method()
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {METHODS} or None, got {method!r}.")
  return method


# ----------------------------------------------------------------------------
# Radix select on a band of keys (the whole key range for 'radix').


def _find_bin(hist: Array, rank: Array) -> tuple[Array, Array]:
  """First bin whose cumulative count exceeds ``rank``, and the count below it."""
  rows = hist.reshape(256, _NUM_BINS // 256)
  row_cum = jnp.cumsum(rows.sum(1))
  i = jnp.sum(row_cum <= rank).astype(jnp.int32)
  below_row = jnp.where(i > 0, row_cum[jnp.maximum(i - 1, 0)], 0)
  col_cum = jnp.cumsum(rows[i]) + below_row
  j = jnp.sum(col_cum <= rank).astype(jnp.int32)
  below = jnp.where(j > 0, col_cum[jnp.maximum(j - 1, 0)], below_row)
  return i * (_NUM_BINS // 256) + j, below


def _histogram(index: Array) -> Array:
  """Counts of ``index`` in [0, 65536); out-of-range indices are dropped."""
  return jnp.zeros(_NUM_BINS, jnp.int32).at[index.reshape(-1)].add(1, mode="drop")


def _radix_band(scores: Sequence[Array], rank: Array, low=None, width=None, member=None):
  """The ``rank``-th smallest (0-based) key of ``scores`` among those in ``[low, low + width]``.

  ``low`` and ``width`` are uint32 radix keys (``None``: the whole range, no
  membership test); ``member`` is an extra scalar condition. Two rounds of
  16 bits over ``d = key - low``: round 1 bins ``d >> shift`` with ``shift``
  such that the width fits 16 bits, round 2 the remaining low bits inside
  the chosen bin. Only members scatter. Returns ``(t, below, equal)``: the
  threshold as a radix key, the members below it, and per leaf the keys
  equal to it.
  """
  if low is None:
    low, shift = jnp.uint32(0), jnp.uint32(_RADIX_BITS)
  else:
    shift = jnp.maximum(jnp.uint32(32) - lax.clz(width), _RADIX_BITS) - _RADIX_BITS
  offsets, valid = [], []
  for x in scores:
    d = _radix_key(x) - low
    ok = None if width is None else d <= width
    if member is not None:
      ok = member if ok is None else ok & member
    offsets.append(d)
    valid.append(ok)

  def hist(index, ok):
    return _histogram(index.astype(jnp.int32) if ok is None else
                      jnp.where(ok, index.astype(jnp.int32), _NUM_BINS))

  high = sum(hist(d >> shift, ok) for d, ok in zip(offsets, valid, strict=True))
  high_bin, below_high = _find_bin(high, rank)
  high_bin = high_bin.astype(jnp.uint32)
  low_mask = (jnp.uint32(1) << shift) - 1
  lows = [hist(d & low_mask, (d >> shift == high_bin) if ok is None else
               ok & (d >> shift == high_bin)) for d, ok in zip(offsets, valid, strict=True)]
  low_bin, below_low = _find_bin(sum(lows), rank - below_high)
  t = low + (high_bin << shift) + low_bin.astype(jnp.uint32)
  return t, below_high + below_low, [h[low_bin] for h in lows]


def _radix_select(scores, rank):
  t, below, equal = _radix_band(scores, rank)
  return _unradix(t), below, equal


# ----------------------------------------------------------------------------
# Multi-way bisection (reductions only).


def _count_below(scores: Sequence[Array], pivots: Array, inclusive: bool = False) -> Array:
  """``#{key < p}`` for every pivot (and ``#{key <= p}`` after them if ``inclusive``).

  Summed over the leaves; one reduction per leaf. XLA:CPU materialises the
  comparisons before reducing (hundreds of passes there); XLA:GPU fuses
  elementwise producers into a reduction (``bench.py`` prints the kernels).
  """
  def count(x):
    flat = compare_key(x).reshape(-1, 1)
    hits = jnp.concatenate([flat < pivots, flat <= pivots], axis=1) if inclusive else (
        flat < pivots)
    return jnp.sum(hits, axis=0, dtype=jnp.int32)
  return sum(count(x) for x in scores)


def _bisect_select(scores, rank, bits: int = _BISECT_BITS):
  """Fixes ``bits`` bits of the k-th radix key per round from the top.

  With the interval ``[prefix, prefix + 2^(shift + bits))`` holding the
  k-th key ``t``, the pivots ``p_j = prefix + j 2^shift`` (``j = 1 ..
  2^bits - 1``) below or at ``t`` are exactly those with ``#{key < p_j} <=
  rank``; their number is the next digit of ``t``.
  """
  prefix = jnp.uint32(0)
  below = jnp.int32(0)
  steps = jnp.arange(1, 1 << bits, dtype=jnp.uint32)
  for shift in range(32 - bits, -1, -bits):
    counts = _count_below(scores, _unradix(prefix + (steps << shift)))
    digit = jnp.sum(counts <= rank).astype(jnp.int32)
    below = jnp.where(digit > 0, counts[jnp.maximum(digit - 1, 0)], below)
    prefix = prefix + (digit.astype(jnp.uint32) << shift)
  return _unradix(prefix), below, None


# ----------------------------------------------------------------------------
# Sampled pivots, then an exact radix select in the band between two of them.


def _sample(scores: Sequence[Array], size: int) -> Array:
  """The sorted keys of a stratified sample of about ``size`` scores (each leaf in proportion).

  Entry ``i`` of a leaf's sample is taken from stratum ``i`` (``n // s``
  entries wide) at a hashed offset, so periodic patterns (columns of a
  kernel) do not alias with the stride.
  """
  total = sum(x.size for x in scores)
  parts = []
  for x in scores:
    s = min(x.size, max(1, round(size * x.size / total)))
    stride = x.size // s
    i = jnp.arange(s, dtype=jnp.uint32)
    offset = ((i * jnp.uint32(0x9E3779B1)) >> 16) % jnp.uint32(stride)
    parts.append(compare_key(x.reshape(-1)[(i * stride + offset).astype(jnp.int32)]))
  return jnp.sort(jnp.concatenate(parts))


def sample_pivots(scores: Sequence[Array], rank: Array, size: int = _SAMPLE_SIZE,
                  num: int = _SAMPLE_PIVOTS, spread: float = _SAMPLE_SPREAD) -> Array:
  """``num`` sorted keys from a sample, spanning ``+-spread`` sd of the k-th's rank."""
  sample = _sample(scores, size)
  s = sample.size
  q = (rank.astype(jnp.float32) + 0.5) / sum(x.size for x in scores)
  sd = jnp.sqrt(q * (1 - q) * s) + 1.0
  where = q * s + sd * jnp.linspace(-spread, spread, num, dtype=jnp.float32)
  return sample[jnp.clip(jnp.floor(where), 0, s - 1).astype(jnp.int32)]


def pivot_select(scores: Sequence[Array], rank: Array, pivots: Array):
  """The ``rank``-th smallest key of ``scores``, exactly, for any nondecreasing ``pivots``.

  One fused reduction counts ``#{key < p}`` and ``#{key <= p}``. Either a
  pivot is the answer, or the answer lies strictly between the last pivot
  with ``#{key <= p} <= rank`` and the next one; :func:`_radix_band` then
  selects it among the keys of that band only.
  """
  num = pivots.size
  lt, le = jnp.split(_count_below(scores, pivots, inclusive=True), 2)
  j = jnp.sum(le <= rank).astype(jnp.int32)          # pivots strictly below the answer
  at = jnp.minimum(j, num - 1)
  hit = (j < num) & (lt[at] <= rank)
  prev = jnp.maximum(j - 1, 0)
  low = jnp.where(j > 0, _radix(pivots[prev]) + 1, jnp.uint32(0))
  high = jnp.where(j < num, _radix(pivots[at]) - 1, jnp.uint32(0xFFFFFFFF))
  below_band = jnp.where(j > 0, le[prev], 0)
  t, below, _ = _radix_band(scores, rank - below_band, low, high - low, member=~hit)
  return (jnp.where(hit, pivots[at], _unradix(t)),
          jnp.where(hit, lt[at], below_band + below), None)


def _sample_select(scores, rank):
  return pivot_select(scores, rank, sample_pivots(scores, rank))


# ----------------------------------------------------------------------------
# Cutting the ties at the threshold.


def _position_scatter(flags: Array, count: Array) -> Array:
  """Flat index of the ``count``-th True entry of ``flags`` (1-based, ``count >= 1``).

  A radix select on the flat index: a histogram of the True entries per block
  of 1,024 finds the block, a histogram inside that block the position.
  """
  flat = flags.reshape(-1)
  index = jnp.arange(flat.size, dtype=jnp.int32)
  blocks = -(-flat.size // _TIE_BLOCK)
  block = index // _TIE_BLOCK
  per_block = jnp.zeros(blocks, jnp.int32).at[jnp.where(flat, block, blocks)].add(1, mode="drop")
  inclusive = jnp.cumsum(per_block)
  b = jnp.sum(inclusive < count).astype(jnp.int32)
  before = jnp.where(b > 0, inclusive[jnp.maximum(b - 1, 0)], 0)
  in_block = jnp.zeros(_TIE_BLOCK, jnp.int32).at[
      jnp.where(flat & (block == b), index % _TIE_BLOCK, _TIE_BLOCK)].add(1, mode="drop")
  return b * _TIE_BLOCK + jnp.sum(jnp.cumsum(in_block) + before < count).astype(jnp.int32)


def _blocked(flags: Array) -> Array:
  flat = flags.reshape(-1)
  return jnp.pad(flat, (0, -flat.size % _TIE_BLOCK)).reshape(-1, _TIE_BLOCK)


def _position_blocks(flags: Array, per_block: Array, count: Array) -> Array:
  """As :func:`_position_scatter`, from the per-block counts, by reductions only."""
  inclusive = jnp.cumsum(per_block)
  b = jnp.sum(inclusive < count).astype(jnp.int32)
  before = jnp.where(b > 0, inclusive[jnp.maximum(b - 1, 0)], 0)
  in_block = lax.dynamic_index_in_dim(_blocked(flags), b, keepdims=False)
  cum = jnp.cumsum(in_block.astype(jnp.int32)) + before
  return b * _TIE_BLOCK + jnp.sum(cum < count).astype(jnp.int32)


def _tie_cuts(keys, t, below, k, equal) -> list[Array]:
  """Per leaf, the flat index from which the ties ``key == t`` are pruned.

  ``k - below`` ties are pruned, from the last leaf and the highest index
  down. With ``equal`` given (radix), the cut is searched by scatter behind
  a ``cond`` that skips it when no tie is split; otherwise the per-block tie
  counts are reduced first and searched unconditionally.
  """
  blocks = None
  if equal is None:
    blocks = [jnp.sum(_blocked(key == t), axis=1, dtype=jnp.int32) for key in keys]
    equal = [b.sum() for b in blocks]
  remaining = k - below  # for k = 0, t is the minimum and below = 0: nothing pruned.
  cuts = [None] * len(keys)
  for i in reversed(range(len(keys))):
    prune = jnp.clip(remaining, 0, equal[i])
    remaining = remaining - prune
    keep = equal[i] - prune
    at_t = keys[i] == t
    if blocks is not None:
      cut = _position_blocks(at_t, blocks[i], keep) + 1
    else:
      # The cond returns a scalar: XLA:CPU runs array work inside `cond` slowly.
      cut = lax.cond((prune > 0) & (keep > 0), lambda a=at_t, c=keep: _position_scatter(a, c) + 1,
                     lambda n=keys[i].size: jnp.int32(n))
    cuts[i] = jnp.where(keep > 0, cut, 0)
  return cuts


# ----------------------------------------------------------------------------
# Sort.


def _sort_cuts(keys, k):
  """The k-th entry of the pruning order by one stable sort: ``(t, cut)`` per leaf."""
  flat = jnp.concatenate([key.reshape(-1) for key in keys])
  n = flat.size
  # Reversed, so that the stable sort puts equal keys in descending index order.
  sorted_keys, order = lax.sort((flat[::-1], jnp.arange(n, dtype=jnp.int32)), num_keys=1,
                                is_stable=True)
  r = jnp.maximum(k, 1) - 1
  t = sorted_keys[r]
  first_pruned = jnp.where(k > 0, n - 1 - order[r], n)
  cuts, offset = [], 0
  for key in keys:
    cuts.append(first_pruned - offset)
    offset += key.size
  return t, cuts


# ----------------------------------------------------------------------------
# The entry point.

_SELECT = {"radix": _radix_select, "bisect": _bisect_select, "sample": _sample_select}


def bottom_k(scores: Sequence[Array], k, method: str | None = None) -> list[Array]:
  """Bool masks (True = kept) that prune exactly the ``k`` smallest of the union of ``scores``.

  ``k`` is a Python or traced integer in ``[0, total size]``; ties prune
  later leaves and higher flat indices first. ``method``: one of
  :data:`METHODS`, or ``None`` for :data:`DEFAULT_METHOD` of this backend.
  Jitted (one compilation per shapes and method, whatever ``k``), so eager
  calls do not dispatch each of its small steps.
  """
  return _bottom_k(list(scores), jnp.asarray(k, jnp.int32), check_method(method))


@functools.partial(jax.jit, static_argnums=2)
def _bottom_k(scores: list[Array], k: Array, method: str) -> list[Array]:
  shapes = [jnp.shape(s) for s in scores]
  live = [i for i, shape in enumerate(shapes) if math.prod(shape) > 0]
  out = [jnp.ones(shape, bool) for shape in shapes]
  if not live:
    return out
  scores = [jnp.asarray(scores[i]).astype(jnp.float32) for i in live]
  keys = [compare_key(x) for x in scores]
  if method == "sort":
    t, cuts = _sort_cuts(keys, k)
  else:
    t, below, equal = _SELECT[method](scores, jnp.maximum(k, 1) - 1)
    cuts = _tie_cuts(keys, t, below, k, equal)
  for i, key, cut in zip(live, keys, cuts, strict=True):
    index = jnp.arange(key.size, dtype=jnp.int32).reshape(key.shape)
    out[i] = (key > t) | ((key == t) & (index < cut))
  return out
