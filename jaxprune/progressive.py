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
The user's loop is unchanged::

    tx = gradient_flow(optax.adamw(1e-3), 1, 8, total_steps=100_000,
                       dense_steps=10_000, finetune_steps=10_000)
    state = tx.init(params)    # master weights: a dense copy of params
    params = tx.view(params)   # the first forward pass sees the view
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune import _checks
from jaxprune import masks as masks_lib
from jaxprune.straight_through import ViewTransformation, master_weight_transform

DECAYS = ("exp", "linear", "step")
STRUCTURE_SCHEDULES = ("sparsify", "fine")

#: The ``fine`` schedule's group sizes are ``m * 2**k`` for these ``k``.
_FINE_LEVELS = (3, 2, 1, 0)

#: ``b`` where the sparse window ends when ``coef`` is left to its default ('exp').
B_END = 0.01


def _check_decay(decay) -> str:
  if decay not in DECAYS:
    raise ValueError(f"`decay` must be one of {DECAYS}, got {decay!r}.")
  return decay


def _check_coef(coef) -> float:
  if (isinstance(coef, bool) or not isinstance(coef, numbers.Real)
      or not math.isfinite(coef) or coef <= 0):
    raise ValueError(f"`coef` must be a finite number > 0, got {coef!r}.")
  return float(coef)


def _check_steps(total_steps, dense_steps, finetune_steps) -> tuple[int, int, int]:
  total = _checks.check_int("total_steps", total_steps, minimum=1)
  dense = _checks.check_int("dense_steps", dense_steps, minimum=0)
  finetune = _checks.check_int("finetune_steps", finetune_steps, minimum=0)
  if dense + finetune >= total:
    raise ValueError(
        f"`dense_steps` + `finetune_steps` must be < `total_steps` (the sparse window "
        f"must not be empty), got {dense} + {finetune} >= {total}.")
  return total, dense, finetune


def default_coef(decay: str, window: int) -> float:
  """The decay rate that brings ``b`` to its end value where the sparse window ends.

  .. math::  c = \\frac{\\ln(1 / b_{end})}{L} \\ (\\text{'exp'}), \\qquad
             c = \\frac{1}{L} \\ (\\text{'linear'}),

  with ``L = window`` the steps of the sparse window and ``b_end =``
  :data:`B_END` = 0.01: the exponential decay reaches 0.01 and the linear one
  reaches 0 at ``t = L``, the first step of the hard mask, so that the pruned
  weights hardly contribute any more when they are cut. ``'step'`` has no
  rate (1.0 is returned and not used).

  A fixed rate gives each run length another ``b`` at the hard mask. The
  authors' ViT-B config (``vit_base_training.yaml`` in
  abhibambhaniya/progressive_gradient_flow_nm_sparsity: ``decay_type: EXP``,
  ``decay_coef: 0.0001``; 350 epochs of about 1,251 steps, ~438k steps) has
  ``b`` below 0.01 after 46k steps (10.5% of training) and at ``e^{-44}`` by
  the end; ``c = 8e-4`` in an 800-step run with a 10% fine-tune phase leaves
  ``b = 0.56`` at step 720, where the hard mask arrives.

  Args:
    decay: ``'exp'``, ``'linear'`` or ``'step'``.
    window: ``L >= 1``.
  """
  decay = _check_decay(decay)
  window = _checks.check_int("window", window, minimum=1)
  if decay == "exp":
    return math.log(1.0 / B_END) / window
  return 1.0 / window


def mask_decay(t, decay: str = "exp", coef: float | None = None) -> jax.Array:
  """``b_t``, the mask value of pruned weights ``t`` steps into the sparse window.

  .. math::

      b_t = \\begin{cases}
        e^{-c\\, t} & \\text{'exp' (MDGF-Exponential)} \\\\
        \\max(0, 1 - c\\, t) & \\text{'linear' (MDGF-Linear)} \\\\
        0 & \\text{'step'}
      \\end{cases} \\qquad (t \\ge 0),

  and ``b_t = 1`` for ``t < 0`` (the dense phase), so ``'step'`` is the unit
  step: dense, then a binary mask from the first sparse step on (the
  reference code's ``StepDecay``, i.e. STE after a dense warm-up). For
  ``'exp'`` the half-life is ``ln 2 / c``: ``b(ln 2 / c) = 0.5``. For
  ``'linear'`` the mask is binary from ``t = 1 / c`` on.

  Args:
    t: steps since the start of the sparse window, scalar or array; may be
      traced.
    decay: ``'exp'``, ``'linear'`` or ``'step'``.
    coef: the decay rate ``c > 0`` per step; needed by ``'exp'`` and
      ``'linear'`` (see :func:`default_coef`), unused by ``'step'``.

  Returns:
    ``b_t`` as float32, of the shape of ``t``.
  """
  decay = _check_decay(decay)
  if decay == "step" and coef is None:
    coef = 1.0
  elif coef is None:
    raise ValueError(f"`coef` is needed by decay={decay!r}; see jaxprune.progressive."
                     "default_coef for the rate that fits a sparse window.")
  coef = _check_coef(coef)
  t = jnp.asarray(t, jnp.float32)
  if decay == "exp":
    b = jnp.exp(-coef * jnp.maximum(t, 0.0))
  elif decay == "linear":
    b = jnp.clip(1.0 - coef * t, 0.0, 1.0)
  else:
    b = jnp.zeros_like(t)
  return jnp.where(t < 0, 1.0, b)


def _patterns(n: int, m: int, schedule: str) -> list[tuple[int, int]]:
  if schedule == "fine":
    return [(n << k, m << k) for k in _FINE_LEVELS]
  # (m-1):m, then m/2, m/4, ... kept per group while above n, then n:m.
  kept = [m - 1] + [m >> k for k in range(1, m.bit_length())]
  return [(k, m) for k in dict.fromkeys([k for k in kept if k > n] + [n])]


def structure_frames(
    n: int,
    m: int,
    schedule: str,
    *,
    total_steps: int,
    dense_steps: int = 0,
    finetune_steps: int = 0,
) -> list[tuple[int, int, int]]:
  """The SDGF patterns and the step at which each starts: ``[(start, n_k, m_k), ...]``.

  The sparse window ``[dense_steps, total_steps - finetune_steps)`` of
  ``L`` steps is cut into ``F`` equal frames, frame ``i`` starting at
  ``dense_steps + floor(i L / F)``; the last frame's pattern is the target
  ``n:m`` and also holds through the fine-tune phase.

  * ``'sparsify'`` (SdGf-Stepwise, fixed ``m``): ``(m-1):m, (m/2):m,
    (m/4):m, ...`` while above ``n``, then ``n:m``; e.g. 1:8 gives 7:8, 4:8,
    2:8, 1:8.
  * ``'fine'`` (SdGf-Geometric, fixed ratio): ``(n 2^k):(m 2^k)`` for
    ``k = 3, 2, 1, 0``; e.g. 1:8 gives 8:64, 4:32, 2:16, 1:8. Every group
    size must divide the grouping axis of every pruned parameter.

  Example: ``structure_frames(1, 8, 'sparsify', total_steps=100,
  dense_steps=10, finetune_steps=10)`` is ``[(10, 7, 8), (30, 4, 8),
  (50, 2, 8), (70, 1, 8)]``.

  Args:
    n: target kept per group, ``1 <= n <= m``.
    m: target group size.
    schedule: ``'sparsify'`` or ``'fine'``.
    total_steps: all training steps, ``>= 1``.
    dense_steps: dense steps at the start, ``>= 0``.
    finetune_steps: hard-mask steps at the end, ``>= 0``; the window between
      must hold at least one step per frame.
  """
  n, m = _checks.check_nm(n, m)
  if schedule not in STRUCTURE_SCHEDULES:
    raise ValueError(
        f"`structure_schedule` must be one of {STRUCTURE_SCHEDULES} or None, got {schedule!r}.")
  total, dense, finetune = _check_steps(total_steps, dense_steps, finetune_steps)
  patterns = _patterns(n, m, schedule)
  window = total - dense - finetune
  if window < len(patterns):
    listed = ", ".join(f"{a}:{b}" for a, b in patterns)
    raise ValueError(
        f"`structure_schedule` = {schedule!r} has {len(patterns)} frames ({listed}) but the "
        f"sparse window [dense_steps, total_steps - finetune_steps) = [{dense}, "
        f"{total - finetune}) has only {window} steps; it needs at least one step per frame.")
  return [(dense + i * window // len(patterns), a, b) for i, (a, b) in enumerate(patterns)]


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
    (see :func:`structure_frames`), chosen by ``lax.switch`` on the traced
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
  total, dense, finetune = _check_steps(total_steps, dense_steps, finetune_steps)
  frames = None if structure_schedule is None else structure_frames(
      structure.n, structure.m, structure_schedule, total_steps=total, dense_steps=dense,
      finetune_steps=finetune)
  if decay is None:
    decay = "exp" if frames is None else "step"
  decay = _check_decay(decay)
  sparse_end = total - finetune
  coef = default_coef(decay, sparse_end - dense) if coef is None else _check_coef(coef)

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
