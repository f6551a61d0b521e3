"""Scores -> masks: N:M, magnitude (per layer and global) and random masks.

Every function here is pure and jittable and returns a ``bool`` mask (``True``
= kept). None of them sorts: a full sort of a large tensor costs tens of
elementwise passes on a CPU, which is what made JaxPruner's masks slow.

* :func:`nm_mask` ranks each element inside its group of ``m`` by ``m``
  pairwise comparisons, which XLA fuses into one pass over the scores.
* :func:`magnitude_mask` and :func:`global_magnitude_masks` find the k-th
  smallest score exactly by a two-round radix select on the float's bit
  pattern (a 65,536-bin histogram of the top 16 bits, then of the low 16 bits
  inside the chosen bin) and resolve ties at the threshold by index.

Conventions shared by all masks:

* Scores are compared as float32 (bfloat16 and float16 convert exactly;
  float64 is rounded to float32 first) in IEEE 754 totalOrder, on their bit
  patterns: ``-NaN < -inf < ... < -0.0 < +0.0 < subnormals < ... < +inf <
  NaN``. Magnitude scores ``|w|`` are never negative, so NaN weights are kept
  first and exact zeros pruned first. (Comparing floats directly would treat
  subnormals as zero on CPUs, which flush them.)
* Ties keep the lower index: in N:M groups the earlier element of a tie is
  kept; in magnitude masks, among equal scores the ones with the *higher*
  flat index (row-major; in the global case, later leaves first) are pruned
  first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxprune import _checks

Array = jax.Array

_RADIX_BITS = 16
_NUM_BINS = 1 << _RADIX_BITS
_TIE_BLOCK = 1024


# ----------------------------------------------------------------------------
# Structures: what a mask must look like.


@dataclasses.dataclass(frozen=True)
class Unstructured:
  """Any ``round(sparsity * size)`` entries may be pruned."""

  def __repr__(self) -> str:
    return "unstructured"


@dataclasses.dataclass(frozen=True)
class NM:
  """``n`` of every ``m`` consecutive elements along ``axis`` are kept.

  ``axis=None`` means the input (reduction) axis of a Flax kernel, see
  :func:`default_nm_axis`.
  """

  n: int
  m: int
  axis: int | None = None

  @property
  def sparsity(self) -> float:
    return 1.0 - self.n / self.m

  def __repr__(self) -> str:
    return f"{self.n}:{self.m}" + ("" if self.axis is None else f"(axis={self.axis})")


UNSTRUCTURED = Unstructured()


def nm(n: int, m: int, *, axis: int | None = None) -> NM:
  """The N:M structure; ``1 <= n <= m``."""
  n, m = _checks.check_nm(n, m)
  if axis is not None:
    axis = _checks.check_int("axis", axis)
  return NM(n, m, axis)


def default_nm_axis(ndim: int) -> int:
  """The input (reduction) axis of a Flax kernel.

  Axis 0 of an ``(in, out)`` Dense kernel and ``ndim - 2`` of an ``HWIO``
  convolution kernel: grouping along the reduction axis is what 2:4 sparse
  tensor cores accelerate. (JaxPruner groups along the last, output, axis.)
  """
  return 0 if ndim <= 2 else ndim - 2


def check_nm_axis(shape: Sequence[int], m: int, axis: int, name: str = "scores") -> int:
  """Normalises ``axis`` and checks that ``m`` divides ``shape[axis]``."""
  ndim = len(shape)
  if not -ndim <= axis < ndim or ndim == 0:
    raise ValueError(f"`axis` must be in [-{ndim}, {ndim}) for {name} of shape {tuple(shape)}, "
                     f"got {axis}.")
  axis %= ndim
  if shape[axis] % m:
    raise ValueError(
        f"`m` = {m} must divide the size {shape[axis]} of axis {axis} of {name} "
        f"(shape {tuple(shape)}).")
  return axis


# ----------------------------------------------------------------------------
# Shared helpers.


def _bits(scores: Array) -> Array:
  return lax.bitcast_convert_type(jnp.asarray(scores).astype(jnp.float32), jnp.int32)


def _radix_key(scores: Array) -> Array:
  """uint32 key in IEEE totalOrder of the float32 scores (for the histograms)."""
  b = lax.bitcast_convert_type(_bits(scores), jnp.uint32)
  return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _compare_key(scores: Array) -> Array:
  """int32 key in IEEE totalOrder: ``_radix_key`` with its top bit flipped.

  Comparing keys rather than floats matters on CPUs, where XLA treats
  subnormal floats as zero in comparisons and arithmetic. (Signed int32
  comparisons vectorise better there than unsigned ones, and unsigned digits
  histogram faster, hence two keys.)
  """
  b = _bits(scores)
  return b ^ ((b >> 31) & 0x7FFFFFFF)


def num_pruned(sparsity, size: int) -> Array | int:
  """``round(sparsity * size)``, half to even.

  Exact (float64 on the host) for a Python number; float32 under ``jit``
  when ``sparsity`` is traced.
  """
  if _checks.is_concrete(sparsity) and not isinstance(sparsity, jax.Array):
    return int(round(float(sparsity) * size))
  return jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)


# ----------------------------------------------------------------------------
# N:M.


def nm_mask(scores: Array, n: int, m: int, *, axis: int) -> Array:
  """Keeps the ``n`` largest scores in every group of ``m`` along ``axis``.

  Groups are ``m`` consecutive elements along ``axis``; exactly ``n`` are
  kept in every group, including all-zero and tied groups, where the lower
  index wins. The rank of element ``i`` in its group is

  .. math::  r_i = \\#\\{j : s_j > s_i\\} + \\#\\{j < i : s_j = s_i\\},

  and it is kept iff ``r_i < n``: ``m`` fused comparisons, no sort.

  Args:
    scores: array of scores (e.g. ``|w|``); any float dtype.
    n: kept per group, ``1 <= n <= m``.
    m: group size; must divide ``scores.shape[axis]``.
    axis: the grouping axis (for a Flax ``(in, out)`` kernel, 0 is the
      input axis that sparse tensor cores need).

  Returns:
    A bool array of ``scores.shape``.
  """
  n, m = _checks.check_nm(n, m)
  axis = check_nm_axis(jnp.shape(scores), m, _checks.check_int("axis", axis))
  s = _compare_key(scores)
  shape = s.shape
  groups = s.reshape(shape[:axis] + (shape[axis] // m, m) + shape[axis + 1:])
  gaxis = axis + 1
  index = lax.broadcasted_iota(jnp.int32, groups.shape, gaxis)
  rank = jnp.zeros(groups.shape, jnp.int32)
  for j in range(m):
    s_j = lax.index_in_dim(groups, j, gaxis, keepdims=True)
    beats = (s_j > groups) | ((s_j == groups) & (index > j))
    rank = rank + beats.astype(jnp.int32)
  return (rank < n).reshape(shape)


# ----------------------------------------------------------------------------
# Exact k-th smallest by radix select.


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


def _kth_smallest(scores: Sequence[Array], k: Array) -> tuple[Array, Array, list[Array]]:
  """The k-th smallest (1-based, ``k >= 1``) of the union of ``scores``.

  Returns ``(t, below, equal)``: the threshold as a :func:`_compare_key`, the
  number of scores below it and, per leaf, the number equal to it.
  """
  keys = [_radix_key(s) for s in scores]
  rank = k - 1
  high = sum(_histogram((key >> _RADIX_BITS).astype(jnp.int32)) for key in keys)
  high_bin, below_high = _find_bin(high, rank)
  high_bin = high_bin.astype(jnp.uint32)
  lows = []
  for key in keys:
    low = (key & jnp.uint32(_NUM_BINS - 1)).astype(jnp.int32)
    lows.append(_histogram(jnp.where(key >> _RADIX_BITS == high_bin, low, _NUM_BINS)))
  low_bin, below_low = _find_bin(sum(lows), rank - below_high)
  t = (high_bin << _RADIX_BITS) | low_bin.astype(jnp.uint32)
  t = lax.bitcast_convert_type(t ^ jnp.uint32(0x80000000), jnp.int32)
  return t, below_high + below_low, [h[low_bin] for h in lows]


def _position_of(flags: Array, count: Array) -> Array:
  """Flat index of the ``count``-th True entry of ``flags`` (1-based; -1 for 0).

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
  j = jnp.sum(jnp.cumsum(in_block) + before < count).astype(jnp.int32)
  return jnp.where(count > 0, b * _TIE_BLOCK + j, -1)


def _threshold_mask(scores: Array, t: Array, equal: Array, prune_equal: Array) -> Array:
  """Keeps keys ``> t``, and of the ``equal`` keys ``== t`` all but the last ``prune_equal``."""
  key = _compare_key(scores)
  at_t = key == t
  keep = equal - prune_equal
  # Only the position of the last kept tie depends on a branch, and the branch
  # returns a scalar: XLA:CPU runs array work inside `cond` slowly, and partial
  # ties at the threshold are rare for real weights.
  last = lax.cond(
      (prune_equal > 0) & (keep > 0),
      lambda: _position_of(at_t, keep),
      lambda: jnp.where(keep > 0, jnp.int32(key.size), -1),
  )
  index = jnp.arange(key.size, dtype=jnp.int32).reshape(key.shape)
  return (key > t) | (at_t & (index <= last))


def bottom_k_masks(scores: Sequence[Array], k) -> list[Array]:
  """Prunes exactly the ``k`` smallest entries of the union of ``scores``.

  The building block of :func:`magnitude_mask` and
  :func:`global_magnitude_masks`, for callers that have already computed the
  number to prune ``k`` (a Python or traced integer in ``[0, total size]``).
  Ties at the threshold prune later leaves and higher flat indices first.
  """
  k = jnp.asarray(k, jnp.int32)
  t, below, equal = _kth_smallest(scores, jnp.maximum(k, 1))
  # Pruned among the ties, taken from the last leaves first. For k = 0 the
  # threshold is the minimum and nothing is pruned: remaining = 0 - 0.
  remaining = k - below
  masks = [None] * len(scores)
  for i in reversed(range(len(scores))):
    here = jnp.clip(remaining, 0, equal[i])
    masks[i] = _threshold_mask(scores[i], t, equal[i], here)
    remaining = remaining - here
  return masks


def magnitude_mask(scores: Array, sparsity) -> Array:
  """Prunes exactly ``round(sparsity * scores.size)`` entries, the smallest.

  The threshold is the exact k-th smallest score, found without sorting;
  among scores equal to it, the ones with the higher flat index are pruned
  first.

  Args:
    scores: array of scores (e.g. ``|w|``).
    sparsity: fraction pruned, in [0, 1); may be traced.

  Returns:
    A bool mask of ``scores.shape`` (True = kept).
  """
  _checks.check_sparsity("sparsity", sparsity)
  return bottom_k_masks([scores], num_pruned(sparsity, jnp.size(scores)))[0]


def l2_normalized(s: Array, eps: float = 1e-8) -> Array:
  """``s / (||s||_2 + eps)``: per-layer score normalisation for global pruning."""
  s = jnp.asarray(s).astype(jnp.float32)
  return s / (jnp.linalg.norm(s.reshape(-1)) + eps)


def global_magnitude_masks(scores, sparsity, *, normalize: bool = False):
  """One threshold across all leaves of ``scores``: the smallest overall are pruned.

  Exactly ``round(sparsity * total_size)`` entries are pruned; ties at the
  threshold prune later leaves (in ``jax.tree.leaves`` order) and higher flat
  indices first.

  Args:
    scores: a pytree of score arrays.
    sparsity: global fraction pruned, in [0, 1).
    normalize: divide each leaf's scores by its L2 norm first (as
      JaxPruner's global pruners do), so that layers with larger weights do
      not keep more than their share.

  Returns:
    A pytree of bool masks with the structure of ``scores``.
  """
  _checks.check_sparsity("sparsity", sparsity)
  leaves, treedef = jax.tree.flatten(scores)
  if normalize:
    leaves = [l2_normalized(x) for x in leaves]
  total = sum(math.prod(jnp.shape(x)) for x in leaves)
  return treedef.unflatten(bottom_k_masks(leaves, num_pruned(sparsity, total)))


# ----------------------------------------------------------------------------
# Random masks.


def random_mask(key: Array, shape: Sequence[int], sparsity) -> Array:
  """A uniformly random mask with exactly ``round(sparsity * size)`` pruned."""
  return magnitude_mask(jax.random.uniform(key, tuple(shape)), sparsity)


def random_nm_mask(key: Array, shape: Sequence[int], n: int, m: int, *, axis: int) -> Array:
  """A uniformly random N:M mask: ``n`` of every ``m`` along ``axis`` kept."""
  return nm_mask(jax.random.uniform(key, tuple(shape)), n, m, axis=axis)
