"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh 2023).

"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
ICML 2023 (https://arxiv.org/abs/2301.00774); reference code
IST-DASLab/sparsegpt, ``SparseGPT.fasterprune``.

For a Flax ``(in, out)`` kernel ``W`` and the Hessian ``H = 2 X^T X`` of the
layer's calibration inputs ``X`` (tokens x in), SparseGPT walks over the input
rows with the OBS sweep of :mod:`jaxprune.oneshot.obs` (``U`` the upper
Cholesky factor of the damped inverse Hessian). The mask is chosen
adaptively, on the weights as the sweep has updated them, with the OBS
saliency ``w_ij^2 / U_ii^2``:

* unstructured: at the start of each block of ``blocksize`` rows, the block's
  ``round(sparsity * rows * out)`` smallest saliencies are pruned (one
  threshold over the block, all output columns together);
* N:M: at the first row of each group of ``m`` rows, every output column
  keeps the ``n`` largest saliencies of the group.

Differences from the reference, all deliberate:

* the count: the reference prunes every saliency ``<=`` the one at sorted
  position ``int(sparsity * numel)``, one more than ``sparsity * numel``;
  here exactly ``round(sparsity * numel)`` per block, ties pruning the higher
  row-major index first (:func:`jaxprune.bottom_k_masks`);
* N:M ties keep the lower index (:func:`jaxprune.nm_mask`); the reference's
  ``topk`` leaves ties to the backend;
* joint quantization (``quantize=fmt``) uses :mod:`jaxprune.oneshot.grids`
  with scales from the dense kernel (as the reference's ``find_params(W)``),
  per output channel or per ``group_size`` inputs, after dead inputs are
  zeroed; for int formats the entry that sets each scale is never pruned and
  is rounded to ``+-q_max``, so that the result is exactly representable.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxprune import masks as masks_lib
from jaxprune.oneshot import _args, grids, obs

Array = jax.Array


class Pruned(NamedTuple):
  """A pruned kernel and its mask (True = kept)."""

  kernel: Array
  mask: Array


def _unstructured_block_mask(sparsity: float, n_in: int, n_out: int, blocksize: int):
  """``block_mask`` for :func:`obs.obs_sweep`: exactly ``round(sparsity * numel)`` per block."""
  full = masks_lib.num_pruned(sparsity, blocksize * n_out)
  tail = n_in % blocksize
  last = masks_lib.num_pruned(sparsity, tail * n_out) if tail else full
  n_blocks = -(-n_in // blocksize)

  def block_mask(w1, d1, b, pinned1):
    score = w1**2 / (d1**2)[:, None]
    real = (b * blocksize + jnp.arange(blocksize) < n_in)[:, None]
    score = jnp.where(real & ~pinned1, score, jnp.inf)   # padding and pins are never pruned
    k = jnp.where(b == n_blocks - 1, last, full)
    return masks_lib.bottom_k_masks([score], k)[0]

  return block_mask


@partial(jax.jit, static_argnames=("sparsity", "nm", "blocksize", "damp", "fmt", "group_size"))
def _sparsegpt(kernel, hessian, *, sparsity, nm, blocksize, damp, fmt, group_size):
  w = kernel.astype(jnp.float32)
  n_in, n_out = w.shape
  factor = obs.inverse_hessian_factor(hessian, damp)
  w = jnp.where(factor.dead[:, None], 0.0, w)
  quantizer = None
  if fmt is not None:
    quantizer = obs.static_quantizer(grids.grid(fmt), w, group_size, blocksize=blocksize)
  block_mask = None
  if nm is None and sparsity > 0:
    block_mask = _unstructured_block_mask(sparsity, n_in, n_out, blocksize)
  out, kept = obs.obs_sweep(w, factor.u, blocksize=blocksize, block_mask=block_mask, nm=nm,
                            quantizer=quantizer)
  return Pruned(jnp.where(kept, out, 0.0).astype(kernel.dtype), kept)


def sparsegpt(
    kernel: Array,
    hessian: Array,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    quantize: str | None = None,
    group_size: int | None = None,
) -> Pruned:
  """Prunes a Flax ``(in, out)`` kernel with SparseGPT, reconstructing the kept weights.

  Minimises ``||X W - X W'||^2`` approximately: each input row is pruned on the
  OBS saliency ``w^2 / [U]_ii^2`` (``U`` the upper Cholesky factor of the
  damped ``H^-1``) and its error ``(w - q) / U_ii`` is spread over the later
  rows, ``W_j -= U_ij (w - q) / U_ii``. See the module docstring for the mask
  rules and the differences from the reference code.

  Args:
    kernel: ``(in, out)`` floating-point kernel (computed in float32, returned
      in its dtype).
    hessian: ``(in, in)`` float32 ``2 X^T X`` summed over calibration tokens.
      Rows and columns of inputs never excited (zero diagonal) are handled as
      in the reference: diagonal set to 1, weights zeroed.
    sparsity: unstructured fraction pruned, in [0, 1), per block of rows.
    nm: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs of every output
      (2:4 is ``(2, 4)``). Exactly one of ``sparsity`` and ``nm``.
    blocksize: rows per lazy-update block (and per unstructured mask); a
      multiple of ``m`` for N:M.
    damp: dampening ``lambda = damp * mean(diag H)``, > 0.
    quantize: a ``jaxprune.quant`` int or MX format: joint pruning and
      quantization (sparsity first, then rounding on the error-corrected
      weights), the SparseGPT paper's 2:4 + 4-bit setting. The result satisfies
      ``quant.quantize(W', fmt, axis=0, granularity='channel')`` (int, no
      ``group_size``) or ``..., block_size=group_size`` ``== W'``.
    group_size: inputs per quantization scale (default: one per output
      channel for int, 32-element blocks for MX).

  Returns:
    :class:`Pruned` ``(kernel, mask)``: pruned entries are exactly 0.

  Raises:
    ValueError: for a non-2-D or non-float kernel, a Hessian that is not
      ``(in, in)``, ``sparsity`` outside [0, 1) or given with ``nm``, ``m`` not
      dividing ``in`` or ``blocksize``, ``damp <= 0``, an unknown or FP8
      format, a ``group_size`` not dividing ``in`` (or not a multiple of ``m``
      with an int format), or a non-float32 kernel with ``quantize``.
  """
  n_in, n_out = _args.kernel_2d(kernel)
  _args.hessian(hessian, n_in)
  blocksize = _args.blocksize(blocksize)
  sparsity, nm = _args.structure(sparsity, nm, n_in, blocksize)
  blocksize = min(blocksize, n_in)   # One block either way; no padding to compute.
  damp = _args.damp(damp)
  fmt = None
  if quantize is not None:
    grid = grids.grid(quantize)
    fmt = grid.fmt.name
    if jnp.result_type(kernel) != jnp.float32:
      raise ValueError(f"`quantize` needs a float32 kernel (exact representability), got "
                       f"{jnp.result_type(kernel)}; cast it first.")
    default = 32 if grid.fmt.kind == "mx" else None
    group_size = _args.group_size(group_size, n_in, default)
    if grid.pins and nm is not None and (group_size or n_in) % nm[1]:
      raise ValueError(f"`group_size` = {group_size} must be a multiple of m = {nm[1]}: an "
                       "N:M group must not hold two entries that set a scale.")
    if grid.pins and nm is None:
      rows = min(blocksize, n_in)
      pins = max(1, rows // group_size) if group_size else 1   # per output column per block
      if masks_lib.num_pruned(sparsity, rows * n_out) > (rows - pins) * n_out:
        raise ValueError(f"`sparsity` = {sparsity} with an int format leaves no room for "
                         "the entry of each output column that sets its scale.")
  elif group_size is not None:
    raise ValueError("`group_size` is a quantization setting; give `quantize` too.")
  return _sparsegpt(kernel, hessian, sparsity=sparsity, nm=nm, blocksize=blocksize, damp=damp,
                    fmt=fmt, group_size=group_size)
