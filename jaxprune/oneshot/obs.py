"""The Optimal Brain Surgeon sweep shared by SparseGPT and GPTQ.

Both methods (Frantar & Alistarh 2023; Frantar et al. 2023) walk over the
inputs of a layer in order and, for input row ``i`` of a Flax ``(in, out)``
kernel ``W``, replace ``w = W[i]`` by ``q`` (zeroed where pruned, rounded where
quantized) and spread the error over the rows not yet processed, which is the
OBS update for the layer-wise loss ``||X W - X W'||^2`` with Hessian
``H = 2 X^T X``:

.. math::

   U &= \\mathrm{chol}\\big((H + \\lambda I)^{-1}\\big)^{\\mathsf T}
        \\quad \\text{(upper: } (H + \\lambda I)^{-1} = U^{\\mathsf T} U),
        \\qquad \\lambda = \\text{damp} \\cdot \\overline{\\mathrm{diag}\\, H} \\\\
   e &= (w - q) / U_{ii}, \\qquad
   W_{j} \\leftarrow W_{j} - U_{ij}\\, e \\quad (j > i).

Updates are lazy (the papers' Algorithm 1): inside a block of ``blocksize``
rows they are applied row by row; the rows after the block receive the whole
block's errors at once, ``W[i2:] -= U[i1:i2, i2:]^T E``. Inputs that the
calibration data never excites (``H_ii = 0``, "dead") get ``H_ii = 1`` and
their weights are zeroed first, as the reference code does, so a singular
Hessian gives no NaN.

Everything is jittable: ``lax.fori_loop`` over blocks, over the groups of a
block and over the rows of a group; only shapes and Python settings are
static. Matrix products use ``Precision.HIGHEST`` (no TF32 or bf16 passes on
GPU/TPU: the reference disables TF32 too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxprune import masks as masks_lib
from jaxprune.oneshot.grids import Grid

Array = jax.Array
HIGHEST = lax.Precision.HIGHEST


class Factor(NamedTuple):
  """The inverse Hessian's upper Cholesky factor ``U`` and what was done to get it."""

  u: Array          # (in, in) upper triangular, (H + lambda I)^-1 = U^T U
  dead: Array       # (in,) bool: inputs with H_ii = 0
  damping: Array    # lambda = damp * mean(diag H), after dead diagonals were set to 1


def inverse_hessian_factor(hessian: Array, damp: float) -> Factor:
  """``U`` with ``(H + lambda I)^-1 = U^T U``.

  The reference's ``cholesky(cholesky_inverse(cholesky(H)), upper=True)``.
  """
  h = hessian.astype(jnp.float32)
  diag = jnp.diagonal(h)
  dead = diag == 0
  index = jnp.arange(h.shape[0])
  h = h.at[index, index].set(jnp.where(dead, 1.0, diag))
  damping = damp * jnp.mean(jnp.diagonal(h))
  h = h.at[index, index].add(damping)
  lower = jnp.linalg.cholesky(h)
  inverse = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(h.shape[0], dtype=h.dtype))
  return Factor(jnp.linalg.cholesky(inverse).T, dead, damping)


class Quantizer(NamedTuple):
  """How the sweep rounds a row: a grid, and where each row's scale comes from.

  ``static``: ``scales``/``pins`` hold one entry per group of ``group_size``
  original rows (computed before the sweep); ``group_of`` maps a processing
  row to its group and ``original`` to its original row (they differ under
  GPTQ's act-order permutation). Otherwise the scale of each group is computed
  when the sweep reaches its first row, from the weights as they are at the
  start of the current block (what the reference's ``W[:, i:i+groupsize]``
  reads).
  """

  grid: Grid
  group_size: int
  static: bool
  scales: Any = None      # (groups, out) float32, or None
  pins: Any = None        # (groups, out) int32 original row indices, or None
  original: Any = None    # (in_padded,) int32


def static_quantizer(grid: Grid, w: Array, group_size: int | None,
                     order: Array | None = None, blocksize: int = 1) -> Quantizer:
  """Scales fixed before the sweep, from ``w`` (original row order), per group of rows."""
  n_in, n_out = w.shape
  gs = n_in if group_size is None else group_size
  scales, pins = jax.vmap(grid.params)(w.reshape(n_in // gs, gs, n_out))
  pins = pins + (jnp.arange(n_in // gs, dtype=jnp.int32) * gs)[:, None]
  n_pad = n_in + (-n_in % blocksize)
  original = jnp.arange(n_pad, dtype=jnp.int32) if order is None else jnp.concatenate(
      [order.astype(jnp.int32), jnp.arange(n_in, n_pad, dtype=jnp.int32)])
  return Quantizer(grid, gs, True, scales, pins, original)


def _pad(w: Array, u: Array, blocksize: int) -> tuple[Array, Array]:
  """Zero rows for ``w`` and an identity corner for ``u`` up to a multiple of ``blocksize``."""
  extra = -w.shape[0] % blocksize
  if not extra:
    return w, u
  n = u.shape[0]
  u = jnp.pad(u, ((0, extra), (0, extra)))
  index = jnp.arange(n, n + extra)
  return jnp.pad(w, ((0, extra), (0, 0))), u.at[index, index].set(1.0)


class _Rows(NamedTuple):
  w1: Array       # (B, out) the block's rows, updated row by row
  q1: Array       # (B, out) the final values of processed rows
  e1: Array       # (B, out) the errors (w - q) / U_ii
  mask1: Array    # (B, out) kept
  scale: Array    # (out,) the current quantization group's scale
  pin: Array      # (out,) its pinned original row


def obs_sweep(
    w: Array,
    u: Array,
    *,
    blocksize: int,
    block_mask: Callable[[Array, Array, Array, Array], Array] | None,
    nm: tuple[int, int] | None,
    quantizer: Quantizer | None,
) -> tuple[Array, Array]:
  """Runs the sweep over the rows of ``w`` (``(in, out)`` float32); returns ``(W', kept)``.

  Args:
    w: the kernel, dead rows already zeroed.
    u: the upper Cholesky factor of the damped inverse Hessian.
    blocksize: rows per lazy-update block.
    block_mask: for unstructured pruning, ``block_mask(w1, d1, b, pinned1)``
      gives the kept mask of block ``b`` from its rows ``w1`` at the block's
      start, the diagonal ``d1`` of its ``U`` block and the pinned entries.
    nm: ``(n, m)``: at the first row of each group of ``m`` rows, keep the
      ``n`` largest ``w^2 / U_ii^2`` of each output column in the group.
    quantizer: rounds each row after pruning (GPTQ; SparseGPT's joint mode).
  """
  n_in, n_out = w.shape
  w, u = _pad(w, u, blocksize)
  n_pad = w.shape[0]
  m = nm[1] if nm else 1
  rows = jnp.arange(n_pad, dtype=jnp.int32)
  original = quantizer.original if quantizer is not None else rows

  def pinned_rows(start: Array, count: int, scale_pin) -> Array:
    """(count, out) bool: the rows ``start..start+count`` that are their group's pin."""
    if quantizer is None or not quantizer.grid.pins:
      return jnp.zeros((count, n_out), bool)
    orig = lax.dynamic_slice(original, (start,), (count,))
    if quantizer.static:
      pins = quantizer.pins[jnp.minimum(orig // quantizer.group_size, quantizer.pins.shape[0] - 1)]
    else:
      pins = jnp.broadcast_to(scale_pin, (count, n_out))
    return (pins == orig[:, None]) & (orig[:, None] < n_in)

  def group_params(r: Array, full_w: Array, carry: _Rows) -> tuple[Array, Array]:
    if quantizer is None:
      return carry.scale, carry.pin
    if quantizer.static:
      g = jnp.minimum(original[r] // quantizer.group_size, quantizer.scales.shape[0] - 1)
      return quantizer.scales[g], quantizer.pins[g]
    gs = quantizer.group_size

    def fresh():
      scale, pin = quantizer.grid.params(lax.dynamic_slice(full_w, (r, 0), (gs, n_out)))
      return scale, pin + r

    return lax.cond((r % gs == 0) & (r < n_in), fresh, lambda: (carry.scale, carry.pin))

  def row_step(i: Array, carry: _Rows, i1: Array, full_w: Array, d1: Array, u1: Array) -> _Rows:
    r = i1 + i
    scale, pin = group_params(r, full_w, carry)
    w_row = carry.w1[i]
    q = jnp.where(carry.mask1[i], w_row, 0.0)
    if quantizer is not None:
      is_pin = (pin == original[r]) & quantizer.grid.pins & (r < n_in)
      q = quantizer.grid.round(q, scale, is_pin & carry.mask1[i])
    err = (w_row - q) / d1[i]
    # U is upper triangular: u1[i, j] = 0 for j < i leaves the rows already done untouched.
    w1 = carry.w1 - u1[i][:, None] * err[None, :]
    return carry._replace(w1=w1, q1=carry.q1.at[i].set(q), e1=carry.e1.at[i].set(err),
                          scale=scale, pin=pin)

  def group_step(g: Array, carry: _Rows, i1: Array, full_w: Array, d1: Array, u1: Array):
    start = g * m
    if nm is not None:
      def choose():
        wg = lax.dynamic_slice(carry.w1, (start, 0), (m, n_out))
        dg = lax.dynamic_slice(d1, (start,), (m,))
        score = wg**2 / (dg**2)[:, None]
        pinned = pinned_rows(i1 + start, m, carry.pin)
        score = jnp.where(pinned, jnp.inf, score)
        kept = masks_lib.nm_mask(score, nm[0], m, axis=0)
        return lax.dynamic_update_slice(carry.mask1, kept, (start, 0))

      carry = carry._replace(mask1=choose())
    if m == 1:   # (no inner loop: one while loop fewer per row)
      return row_step(start, carry, i1, full_w, d1, u1)
    return lax.fori_loop(start, start + m,
                         lambda i, c: row_step(i, c, i1, full_w, d1, u1), carry)

  def block_step(b: Array, state):
    full_w, kept, scale, pin = state
    i1 = b * blocksize
    w1 = lax.dynamic_slice(full_w, (i1, 0), (blocksize, n_out))
    u1 = lax.dynamic_slice(u, (i1, i1), (blocksize, blocksize))
    d1 = jnp.diagonal(u1)
    if block_mask is not None:
      mask1 = block_mask(w1, d1, b, pinned_rows(i1, blocksize, pin))
    else:
      mask1 = jnp.ones_like(w1, bool)
    zeros = jnp.zeros_like(w1)
    carry = _Rows(w1, zeros, zeros, mask1, scale, pin)
    carry = lax.fori_loop(0, blocksize // m,
                          lambda g, c: group_step(g, c, i1, full_w, d1, u1), carry)
    # Lazy update of the rows after the block; rows up to its end already hold their values.
    later = lax.dynamic_slice(u, (i1, 0), (blocksize, n_pad))
    update = jnp.matmul(later.T, carry.e1, precision=HIGHEST)
    full_w = jnp.where((rows >= i1 + blocksize)[:, None], full_w - update, full_w)
    full_w = lax.dynamic_update_slice(full_w, carry.q1, (i1, 0))
    kept = lax.dynamic_update_slice(kept, carry.mask1, (i1, 0))
    return full_w, kept, carry.scale, carry.pin

  scale0 = jnp.zeros((n_out,), jnp.float32)
  pin0 = jnp.full((n_out,), -1, jnp.int32)
  state = (w, jnp.ones_like(w, bool), scale0, pin0)
  full_w, kept, _, _ = lax.fori_loop(0, n_pad // blocksize, block_step, state)
  return full_w[:n_in], kept[:n_in]
