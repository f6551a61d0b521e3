"""Scores -> masks: N:M, magnitude (per layer and global) and random masks.

Every function here is pure and jittable and returns a ``bool`` mask (``True``
= kept). None of them needs a full sort: a sort of a large tensor costs tens
of elementwise passes on a GPU and hundreds on a CPU, which is what made
JaxPruner's masks slow.

* :func:`nm_mask` ranks each element inside its group of ``m`` by ``m``
  pairwise comparisons, which XLA fuses into one pass over the scores.
* :func:`magnitude_mask`, :func:`global_magnitude_masks` and
  :func:`bottom_k_masks` prune exactly the k smallest scores, ties included,
  by one of the exact selection methods of :mod:`jaxprune.select_k` (radix
  select on CPU; sampled pivots plus a radix select of the band between
  them on GPU; reductions only on TPU). Every method gives the same mask.

Conventions shared by all masks:

* Scores are compared as float32 (bfloat16 and float16 convert exactly;
  float64 is rounded to float32 first) in IEEE 754 totalOrder, on their bit
  patterns (:func:`jaxprune.select_k.compare_key`): ``-inf < ... < -0.0 <
  +0.0 < subnormals < ... < +inf < NaN``. Comparing floats directly would
  treat subnormals as zero on CPUs, which flush them.
* Non-finite scores: every NaN (either sign, any payload) and ``+inf`` rank
  as the largest scores, so they are kept first and a NaN weight never
  pushes a healthy weight out of the mask; NaNs tie with each other.
  ``-inf`` ranks as the smallest score and is pruned first: no score of this
  library produces it from a finite weight, and for a user's score (e.g.
  ``log |w|`` of an exact zero) it means "least important".
* Ties keep the lower index: in N:M groups the earlier element of a tie is
  kept; in magnitude masks, among equal scores the ones with the *higher*
  flat index (row-major; in the global case, later leaves first) are pruned
  first.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxprune import _checks, select_k

Array = jax.Array


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

  ``axis=None`` means each layer's reduction axis, read off its layout by the
  layer-aware rule of :mod:`jaxprune.layouts` (axis 0 of a Flax ``(in, out)``
  kernel, 1 of an Equinox ``(out, in)`` weight); leaves that are not kernels
  keep the rank rule, :func:`default_nm_axis`.
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

  and it is kept iff ``r_i < n``: each pair of a group compared once (``m (m - 1) / 2``
  fused comparisons; ``m`` per element above ``m = 16``), no sort.

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
  return _nm_mask(scores, n, m, axis)


# Up to this group size the ranks come from the m (m - 1) / 2 pairs of a group (each compared
# once, the lower index winning ties); above it, from m comparisons of whole arrays, which
# keeps the traced program small.
_PAIRWISE_MAX_M = 16


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _nm_mask(scores: Array, n: int, m: int, axis: int) -> Array:
  s = select_k.compare_key(scores)
  shape = s.shape
  groups = s.reshape(shape[:axis] + (shape[axis] // m, m) + shape[axis + 1:])
  gaxis = axis + 1
  if m <= _PAIRWISE_MAX_M:
    return _pairwise_ranks_below(groups, n, m, gaxis).reshape(shape)
  index = lax.broadcasted_iota(jnp.int32, groups.shape, gaxis)
  rank = jnp.zeros(groups.shape, jnp.int32)
  for j in range(m):
    s_j = lax.index_in_dim(groups, j, gaxis, keepdims=True)
    beats = (s_j > groups) | ((s_j == groups) & (index > j))
    rank = rank + beats.astype(jnp.int32)
  return (rank < n).reshape(shape)


def _pairwise_ranks_below(groups: Array, n: int, m: int, gaxis: int) -> Array:
  """``r_i < n`` for the keys ``groups`` (groups of ``m`` along ``gaxis``): each pair
  ``i < j`` is compared once, ``s_i >= s_j`` (``i`` beats ``j``, the lower index winning
  a tie) or else ``j`` beats ``i``; about half the work of comparing every pair twice."""
  keys = [lax.index_in_dim(groups, j, gaxis, keepdims=False) for j in range(m)]
  rank = [jnp.zeros(keys[0].shape, jnp.int32) for _ in range(m)]
  for i in range(m):
    for j in range(i + 1, m):
      i_wins = keys[i] >= keys[j]
      rank[j] = rank[j] + i_wins.astype(jnp.int32)
      rank[i] = rank[i] + (~i_wins).astype(jnp.int32)
  return jnp.stack([r < n for r in rank], axis=gaxis)


# ----------------------------------------------------------------------------
# Magnitude masks.


def bottom_k_masks(scores: Sequence[Array], k, *, method: str | None = None) -> list[Array]:
  """Prunes exactly the ``k`` smallest entries of the union of ``scores``.

  The building block of :func:`magnitude_mask` and
  :func:`global_magnitude_masks`, for callers that have already computed the
  number to prune ``k`` (a Python or traced integer in ``[0, total size]``).
  Ties at the threshold prune later leaves and higher flat indices first.

  Args:
    scores: a sequence of score arrays (any shapes, any float dtype).
    k: the number of entries to prune.
    method: the exact selection method, one of
      :data:`jaxprune.select_k.METHODS`; ``None`` (default) picks
      :data:`jaxprune.select_k.DEFAULT_METHOD` for the backend being traced
      for. All methods return the same masks; they differ in speed.

  Returns:
    A list of bool masks (True = kept), one per entry of ``scores``.
  """
  return select_k.bottom_k(list(scores), k, method)


def magnitude_mask(scores: Array, sparsity, *, method: str | None = None) -> Array:
  """Prunes exactly ``round(sparsity * scores.size)`` entries, the smallest.

  The threshold is the exact k-th smallest score, found without a full sort;
  among scores equal to it, the ones with the higher flat index are pruned
  first. NaN and ``+inf`` scores are kept first (see the module docstring).

  Args:
    scores: array of scores (e.g. ``|w|``).
    sparsity: fraction pruned, in [0, 1); may be traced.
    method: selection method, see :func:`bottom_k_masks`.

  Returns:
    A bool mask of ``scores.shape`` (True = kept).
  """
  _checks.check_sparsity("sparsity", sparsity)
  return bottom_k_masks([scores], num_pruned(sparsity, jnp.size(scores)), method=method)[0]


def l2_normalized(s: Array, eps: float = 1e-8) -> Array:
  """``s / (||s||_2 + eps)`` with the norm over the finite entries of ``s``.

  The per-layer score normalisation of global pruning (JaxPruner's global
  pruners). Non-finite entries are left out of the norm, so one NaN or inf
  weight does not turn a whole healthy layer into NaN or zero scores; they
  stay NaN or inf and rank as the largest. The squares are summed after
  scaling by a power of two (exact), so large finite scores do not overflow
  the norm; otherwise the result equals the plain formula.
  """
  s = jnp.asarray(s).astype(jnp.float32)
  finite = jnp.where(jnp.isfinite(s), s, 0.0)
  # 2^(127 - e) for the largest finite |s| with biased exponent e, kept a normal float.
  top = jnp.max(lax.bitcast_convert_type(finite, jnp.int32) & 0x7FFFFFFF, initial=0)
  scale = lax.bitcast_convert_type(jnp.clip(254 - (top >> 23), 1, 254) << 23, jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(finite.reshape(-1) * scale))) / scale
  return s / (norm + eps)


def global_magnitude_masks(scores, sparsity, *, normalize: bool = False,
                           method: str | None = None):
  """One threshold across all leaves of ``scores``: the smallest overall are pruned.

  Exactly ``round(sparsity * total_size)`` entries are pruned; ties at the
  threshold prune later leaves (in ``jax.tree.leaves`` order) and higher flat
  indices first.

  Args:
    scores: a pytree of score arrays.
    sparsity: global fraction pruned, in [0, 1).
    normalize: divide each leaf's scores by its L2 norm first (as
      JaxPruner's global pruners do, :func:`l2_normalized`), so that layers
      with larger weights do not keep more than their share.
    method: selection method, see :func:`bottom_k_masks`.

  Returns:
    A pytree of bool masks with the structure of ``scores``.
  """
  _checks.check_sparsity("sparsity", sparsity)
  leaves, treedef = jax.tree.flatten(scores)
  if normalize:
    leaves = [l2_normalized(x) for x in leaves]
  total = sum(math.prod(jnp.shape(x)) for x in leaves)
  return treedef.unflatten(bottom_k_masks(leaves, num_pruned(sparsity, total), method=method))


# ----------------------------------------------------------------------------
# Random masks.


def random_mask(key: Array, shape: Sequence[int], sparsity) -> Array:
  """A uniformly random mask with exactly ``round(sparsity * size)`` pruned."""
  return magnitude_mask(jax.random.uniform(key, tuple(shape)), sparsity)


def random_nm_mask(key: Array, shape: Sequence[int], n: int, m: int, *, axis: int) -> Array:
  """A uniformly random N:M mask: ``n`` of every ``m`` along ``axis`` kept."""
  return nm_mask(jax.random.uniform(key, tuple(shape)), n, m, axis=axis)
