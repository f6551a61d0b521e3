"""Progressive gradient flow for high N:M sparsity: mask decay (MDGF) and structure decay (SDGF).

Bambhaniya, Yazdanbakhsh, Subramanian, Kao, Agrawal, Evci and Krishna,
"Progressive Gradient Flow for Robust N:M Sparsity Training in Transformers"
(arXiv:2402.04744, 2024; CPAL 2025), following Kao et al. 2022, "Training
Recipe for N:M Structured Sparsity with Decaying Pruning Mask". Reference
code: github.com/abhibambhaniya/progressive_gradient_flow_nm_sparsity
(``timm/sparse_pruning/sparse_functions.py``).

At high sparsity (1:8, 1:16, ...) a hard N:M mask cuts the gradient flow to
most weights at once, and the noise in the gradient grows. Both recipes
restrict that flow progressively. Training is split into three phases of the
step ``s`` (the index of the forward pass)::

    [0, dense_steps)                       dense: the model sees W
    [dense_steps, total - finetune_steps)  sparse window: MDGF or SDGF
    [total - finetune_steps, ...)          fine-tune: hard target N:M mask

Both are straight-through methods on dense master weights ``W`` (see
:func:`jaxprune.master_weight_transform`): the model sees

.. math::  \\tilde W_s = W \\odot \\bigl(E_s + b_s (1 - E_s)\\bigr),

where ``E_s`` is the N:M mask of ``|W|`` recomputed every step and ``b_s``
the value of the mask at pruned positions; the gradient at the view reaches
``W`` unchanged (not scaled by the soft mask), as in the reference code.
The schedules themselves, :func:`jaxprune.schedules.mask_decay` (``b_s``) and
:func:`jaxprune.schedules.structure_frames` (SDGF's patterns), live beside the
sparsity schedules. The user's loop is unchanged::

    tx = gradient_flow(optax.adamw(1e-3), 1, 8, total_steps=100_000,
                       dense_steps=10_000, finetune_steps=10_000)
    state = tx.init(params)    # master weights: a dense copy of params
    params = tx.view(params)   # the first forward pass sees the view
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune import _checks
from jaxprune import masks as masks_lib
from jaxprune.schedules import (
  check_coef,
  check_decay,
  check_steps,
  default_coef,
  mask_decay,
  structure_frames,
)
from jaxprune.straight_through import ViewTransformation, master_weight_transform


def _check_groups(leaf, frames, schedule) -> None:
  """Raises unless every frame's group size divides the leaf's grouping axis."""
  size = leaf.shape[leaf.axis]
  for _, a, b in frames:
    if size % b:
      raise ValueError(
          f"`structure_schedule` = {schedule!r} uses the pattern {a}:{b}, but its group size "
          f"{b} does not divide the size {size} of axis {leaf.axis} of {leaf.path} (shape "
          f"{leaf.shape}); use 'sparsify' or leave the parameter out of `select`.")


def gradient_flow(
    inner: optax.GradientTransformation,
    n: int,
    m: int,
    *,
    total_steps: int,
    decay: str | None = None,
    coef: float | None = None,
    structure_schedule: str | None = None,
    dense_steps: int = 0,
    finetune_steps: int = 0,
    axis: int | None = None,
    select=None,
) -> ViewTransformation:
  """Progressive gradient flow (MDGF / SDGF) for N:M sparsity, Bambhaniya et al. 2024.

  The model sees, at the forward pass of step ``s``,

  .. math::

      \\tilde W_s = W \\odot \\bigl(E_s + b_s (1 - E_s)\\bigr), \\qquad
      b_s = \\begin{cases}
        1 & s < d \\\\
        \\text{mask\\_decay}(s - d) & d \\le s < T - f \\\\
        0 & s \\ge T - f
      \\end{cases}

  with ``d = dense_steps``, ``f = finetune_steps``, ``T = total_steps``,
  ``E_s`` the N:M mask of ``|W|`` (recomputed every step) and ``b`` from
  :func:`mask_decay`. The master ``W`` receives the gradient ``g`` at the view
  unchanged (straight-through, not scaled by the soft mask), and the params
  the model sees are the view (pruned entries exactly ``0.0`` once ``b = 0``).

  * **MDGF** (``structure_schedule=None``, default ``decay='exp'``):
    ``E_s`` is the target ``n:m`` mask; pruned weights fade from the forward
    pass as ``b_s`` decays. ``b = 1`` at the first sparse step, so the model
    is still dense there.
  * **SDGF** (``structure_schedule='sparsify'`` or ``'fine'``, default
    ``decay='step'``): ``E_s`` is the mask of the current frame's pattern
    (see :func:`jaxprune.schedules.structure_frames`), chosen by ``lax.switch`` on the traced
    step so that only one mask is computed. The paper keeps masks binary in
    every frame, hence the default ``'step'`` (``b = 0``); a soft ``decay``
    may be combined with frames (as the reference code allows), ``t`` still
    counted from ``dense_steps``.
  * **Fine-tune** (``s >= T - f``, and past ``T``): the hard target ``n:m``
    mask, ``b = 0``; pruned params are exactly ``0.0``.

  Give the model the view before its first forward pass with
  ``params = tx.view(params)``; read the dense weights with
  :func:`jaxprune.master_params`.

  Args:
    inner: the optimizer of the dense master weights.
    n: target weights kept per group, ``1 <= n <= m``.
    m: target group size; must divide the grouping axis (for ``'fine'``,
      ``8 m`` must).
    total_steps: training steps ``T >= 1`` (dense + sparse + fine-tune).
    decay: ``'exp'``, ``'linear'`` or ``'step'`` (see :func:`mask_decay`);
      ``None``: ``'exp'`` for MDGF, ``'step'`` for SDGF.
    coef: decay rate ``c > 0`` per step. ``None`` (default): scaled to the
      sparse window ``L = T - d - f`` by :func:`default_coef`, so that ``b``
      reaches 0.01 (``'exp'``) or 0 (``'linear'``) where the hard mask
      arrives; a fixed rate gives each run length another end value.
    structure_schedule: ``None`` (MDGF), ``'sparsify'`` or ``'fine'`` (SDGF).
    dense_steps: dense steps ``d >= 0`` at the start.
    finetune_steps: hard-mask steps ``f >= 0`` at the end; ``d + f < T``.
    axis: the grouping axis; ``None``: each layer's reduction axis
      (:mod:`jaxprune.layouts`: axis 0 of a Flax ``(in, out)`` kernel, 1 of an Equinox
      ``(out, in)`` weight).
    select: which parameters, see :func:`jaxprune.select`.

  Returns:
    A :class:`jaxprune.ViewTransformation` whose state is a
    :class:`jaxprune.MasterWeightsState`.

  Memory: one dense master copy of the selected weights; masks are recomputed.
  """
  _checks.check_inner(inner)
  structure = masks_lib.nm(n, m, axis=axis)
  total, dense, finetune = check_steps(total_steps, dense_steps, finetune_steps)
  frames = None if structure_schedule is None else structure_frames(
      structure.n, structure.m, structure_schedule, total_steps=total, dense_steps=dense,
      finetune_steps=finetune)
  if decay is None:
    decay = "exp" if frames is None else "step"
  decay = check_decay(decay)
  sparse_end = total - finetune
  coef = default_coef(decay, sparse_end - dense) if coef is None else check_coef(coef)

  def view_fn(w, mask, step):
    b = jnp.where(step >= sparse_end, 0.0, mask_decay(step - dense, decay, coef))
    b = b.astype(w.dtype)
    # A zero b gives exactly 0.0 (not -0.0 or inf * 0) at pruned positions.
    return jnp.where(mask, w, jnp.where(b == 0, jnp.zeros_like(w), w * b))

  mask_fn = None
  if frames is not None:
    later_starts = np.array([start for start, _, _ in frames[1:]], np.int32)

    def mask_fn(leaf, w, step):
      _check_groups(leaf, frames, structure_schedule)
      # Dense steps take frame 0 (b = 1 hides its mask); fine-tune the last (the target).
      index = jnp.sum(step >= later_starts).astype(jnp.int32)
      branches = [lambda s, a=a, b=b: masks_lib.nm_mask(s, a, b, axis=leaf.axis)
                  for _, a, b in frames]
      return lax.switch(index, branches, jnp.abs(w))

  check_leaf = None if frames is None else (
      lambda leaf, dtype: _check_groups(leaf, frames, structure_schedule))
  return master_weight_transform(inner, select=select, structure=structure,
                                 sparsity=structure.sparsity, view_fn=view_fn, mask_fn=mask_fn,
                                 check_leaf=check_leaf)
