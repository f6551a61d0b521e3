"""GPTQ: post-training quantization with OBS error feedback (Frantar et al. 2023).

"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023 (https://arxiv.org/abs/2210.17323); reference code
IST-DASLab/gptq, ``GPTQ.fasterquant``.

The sweep of :mod:`jaxprune.oneshot.obs` with ``q = Q(w)``: each input row of
a Flax ``(in, out)`` kernel is rounded to the format's grid and its error
``(w - q) / U_ii`` is spread over the rows not yet rounded. Scales are fixed
per group (:mod:`jaxprune.oneshot.grids`):

* per output channel (``group_size=None``, int formats): from the whole kernel
  before the sweep;
* per ``group_size`` consecutive inputs (MX: 32 by default): computed when the
  sweep reaches the group's first row, from the weights as they are at the
  start of the current lazy-update block (exactly what the reference reads);
  with ``act_order``, from the kernel before the sweep (the reference's
  ``static_groups``, which keeps groups contiguous in the original order, as
  the format needs).

``act_order`` processes the inputs by decreasing ``H_ii`` (the reference's
``--act-order``, "desc_act") and puts the rows back at the end.

Differences from the reference: the int grid is the symmetric absmax grid of
:mod:`jaxprune.quant` (levels ``-q_max..q_max``; the reference's symmetric
mode has ``2^k`` levels with a zero point) and MX formats are supported; the
entry that sets an int scale is rounded to ``+-q_max`` (see
:mod:`jaxprune.oneshot.grids`); per-channel scales are computed after dead
inputs' weights are zeroed (the reference computes them before, which can
only coarsen the grid).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxprune.oneshot import _args, grids, obs

Array = jax.Array


@partial(jax.jit, static_argnames=("fmt", "blocksize", "damp", "group_size", "act_order"))
def _gptq(kernel, hessian, *, fmt, blocksize, damp, group_size, act_order):
  grid = grids.grid(fmt)
  w = kernel.astype(jnp.float32)
  n_in = w.shape[0]
  h = hessian.astype(jnp.float32)
  dead = jnp.diagonal(h) == 0
  w = jnp.where(dead[:, None], 0.0, w)
  order = None
  if act_order:
    # Stable: ties keep their original order (torch.argsort leaves them to the backend).
    order = jnp.argsort(-jnp.diagonal(h), stable=True)
    w_sweep, h = w[order], h[order][:, order]
  else:
    w_sweep = w
  if group_size is None or act_order:
    quantizer = obs.static_quantizer(grid, w, group_size, order, blocksize)
  else:
    n_pad = n_in + (-n_in % blocksize)
    quantizer = obs.Quantizer(grid, group_size, False,
                              original=jnp.arange(n_pad, dtype=jnp.int32))
  factor = obs.inverse_hessian_factor(h, damp)
  out, _ = obs.obs_sweep(w_sweep, factor.u, blocksize=blocksize, block_mask=None, nm=None,
                         quantizer=quantizer)
  if act_order:
    out = out[jnp.argsort(order)]
  return out


def gptq(
    kernel: Array,
    hessian: Array,
    fmt: str,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    group_size: int | None = None,
    act_order: bool = False,
) -> Array:
  """Quantizes a Flax ``(in, out)`` kernel with GPTQ.

  Each input row is rounded on a fixed per-group scale and its error is
  compensated on the later rows, ``W_j -= U_ij (w - Q(w)) / U_ii`` (``U`` the
  upper Cholesky factor of the damped ``H^-1``); lazy block updates as in the
  paper's Algorithm 1. See the module docstring for how scales are chosen.

  The result is exactly representable: ``quant.quantize(out, fmt, axis=0,
  granularity='channel') == out`` for int formats without ``group_size``, and
  ``quant.quantize(out, fmt, axis=0, block_size=group_size) == out`` with it
  (MX: ``block_size`` 32 by default).

  Args:
    kernel: ``(in, out)`` float32 kernel.
    hessian: ``(in, in)`` float32 ``2 X^T X`` summed over calibration tokens;
      zero-diagonal (dead) inputs get ``H_ii = 1`` and zero weights.
    fmt: an int (``'int2'``..``'int8'``) or MX format of :mod:`jaxprune.quant`.
    blocksize: rows per lazy-update block.
    damp: dampening ``lambda = damp * mean(diag H)``, > 0.
    group_size: inputs per scale; ``None``: one scale per output channel (int)
      or 32-element blocks (MX). Must divide ``in``.
    act_order: process inputs by decreasing ``H_ii``.

  Returns:
    The quantized ``(in, out)`` float32 kernel.

  Raises:
    ValueError: for a kernel that is not 2-D float32, a Hessian that is not
      ``(in, in)``, ``damp <= 0``, an unknown or FP8 ``fmt``, or a
      ``group_size`` that does not divide ``in``.
  """
  n_in, _ = _args.kernel_2d(kernel)
  if jnp.result_type(kernel) != jnp.float32:
    raise ValueError(f"`kernel` must be float32 for GPTQ (exact representability), got "
                     f"{jnp.result_type(kernel)}; cast it first.")
  _args.hessian(hessian, n_in)
  grid = grids.grid(fmt)
  blocksize = min(_args.blocksize(blocksize), n_in)   # (one block either way)
  damp = _args.damp(damp)
  group_size = _args.group_size(group_size, n_in, 32 if grid.fmt.kind == "mx" else None)
  return _gptq(kernel, hessian, fmt=grid.fmt.name, blocksize=blocksize, damp=damp,
               group_size=group_size, act_order=bool(act_order))
