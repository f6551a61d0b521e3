"""STEP: N:M masks learned with Adam after a precondition phase (Lu et al. 2023).

"STEP: Learning N:M Structured Sparsity Masks from Scratch with Precondition",
Lu, Agrawal, Subramanian, Rybakov, De Sa and Yazdanbakhsh, ICML 2023
(arXiv:2302.01172). Straight-through N:M training (SR-STE) breaks Adam: the
second moment ``v`` is estimated from gradients of a model whose weights keep
being masked, and a poor ``v`` means poorly scaled steps. STEP trains in two
phases:

1. *Precondition*: dense AdamW, while AutoSwitch watches how much ``v`` still
   moves.
2. *Mask learning*: ``v`` is frozen (``v*``) and used as a fixed
   preconditioner; the model sees the N:M view ``E(W) * W`` of dense master
   weights ``W`` and its gradient passes straight through to ``W``, as in
   :func:`jaxprune.ste`.

:func:`step_adam` is a complete optimizer (not a wrapper) built on the
master-weight design of :mod:`jaxprune.straight_through`: its state is a
:class:`jaxprune.MasterWeightsState`, so :func:`jaxprune.master_params`
reads its dense weights, and :func:`step_phase` tells which phase it is in.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune import _checks, pruning
from jaxprune import masks as masks_lib
from jaxprune.straight_through import (
    MasterWeightsState,
    ViewTransformation,
    _find_state,
    dense_copy,
)

_INT32_MAX = 2**31 - 1


class StepState(NamedTuple):
  """The moments and AutoSwitch statistics of :func:`step_adam`.

  Stored as the ``inner_state`` of a :class:`jaxprune.MasterWeightsState`
  whose ``count`` is the number of steps taken so far (``t`` of the last one).

  Attributes:
    mu: Adam's first moment, a tree like params.
    nu: Adam's second moment, a tree like params; for selected leaves it is
      frozen at the switch step: ``nu = v*``.
    z_window: float32 ring buffer of the last ``int(1 / (1 - b2))`` values of
      ``Z_t``; ``Z_t`` is stored at index ``(t - 1) % len(z_window)``.
    switched: bool scalar, True once the mask-learning phase has begun.
    switch_step: int32 scalar, the step ``t_s`` at which AutoSwitch fired
      (0 before).
  """

  mu: Any
  nu: Any
  z_window: jax.Array
  switched: jax.Array
  switch_step: jax.Array


def _is_step_state(x) -> bool:
  return isinstance(x, MasterWeightsState) and isinstance(x.inner_state, StepState)


def step_phase(opt_state) -> tuple[jax.Array, jax.Array]:
  """``(switched, switch_step)`` of the STEP optimizer inside ``opt_state``.

  Args:
    opt_state: the state of :func:`step_adam`, or any state that contains it
      (``optax.chain``, ``nnx.Optimizer``'s ``opt_state``, ...).

  Returns:
    ``switched``: bool scalar, True from the switch step on (its update is
    the first to land the params on the N:M view). ``switch_step``: int32
    scalar, the step ``t_s`` (1-based Adam step count) at which AutoSwitch
    fired, 0 while it has not.
  """
  state = _find_state(opt_state)
  if not _is_step_state(state):
    raise ValueError("`opt_state` holds a master-weight state that is not STEP's "
                     "(jaxprune.step.step_adam).")
  inner = state.inner_state
  return jnp.asarray(inner.switched), jnp.asarray(inner.switch_step)


def step_adam(
    learning_rate: float | optax.Schedule,
    n: int = 2,
    m: int = 4,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    switch_eps: float = 1e-8,
    t_min: int | None = None,
    t_max: int | None = None,
    axis: int | None = None,
    select=None,
) -> ViewTransformation:
  """STEP (Lu et al. 2023): AdamW, AutoSwitch, then N:M masks under a frozen ``v``.

  Let ``t = 1, 2, ...`` count the calls to ``update`` (Adam's step count:
  the ``t``-th call computes ``mu_t, v_t``), ``g_t`` the gradient it is given
  and ``lr_t = learning_rate(t - 1)`` (optax's schedule convention).

  **Precondition phase** (every parameter, until the switch step included):
  AdamW on the params ``W = params``,

  .. math::

      \\mu_t = \\beta_1 \\mu_{t-1} + (1 - \\beta_1) g_t, \\quad
      v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2, \\\\
      W_t = W_{t-1} - \\mathrm{lr}_t \\Big(
          \\frac{\\mu_t / (1 - \\beta_1^t)}{\\sqrt{v_t / (1 - \\beta_2^t)} + \\epsilon}
          + \\lambda W_{t-1} \\Big),

  the update of ``optax.adamw(learning_rate, b1, b2, eps, weight_decay=λ)``
  (equal up to float rounding).

  **AutoSwitch.** At each step of this phase, over the ``D`` entries of all
  selected tensors pooled,

  .. math::

      Z_t = \\frac{1}{D} \\sum_i |v_{t,i} - v_{t-1,i}|, \\qquad
      \\bar Z_t = \\frac{1}{\\min(t, T_w)} \\sum_{s = \\max(1, t - T_w + 1)}^{t} Z_s,
      \\qquad T_w = \\mathrm{int}(1 / (1 - \\beta_2)),

  and the switch step ``t_s`` is the first ``t`` with

  .. math::  (\\bar Z_t < \\varepsilon_{switch} \\text{ and } t > t_{min})
             \\text{ or } t > t_{max}.

  Before ``T_w`` values exist, the mean is over those there are, as in the
  reference code. With ``switch_eps = 0`` (``Z >= 0``) the switch is forced at
  ``t_s = t_max + 1``.

  **Mask-learning phase.** ``v* = v_{t_s}`` is frozen for good (selected
  leaves). The update of step ``t_s`` already lands the params on the view;
  for ``t > t_s`` the model sees ``E(W) ⊙ W`` with ``E`` the N:M mask of
  ``|W|`` (recomputed every step, :func:`jaxprune.nm_mask` along ``axis``),
  the gradient ``g_t`` taken at the view passes straight through to ``W``,
  and

  .. math::

      \\mu_t = \\beta_1 \\mu_{t-1} + (1 - \\beta_1) g_t, \\quad
      W_t = W_{t-1} - \\mathrm{lr}_t \\Big(
          \\frac{\\mu_t / (1 - \\beta_1^t)}{\\sqrt{v^* / (1 - \\beta_2^{t_s})} + \\epsilon}
          + \\lambda W_{t-1} \\Big).

  *Bias correction of v\\*:* ``v*`` is divided by ``1 - β2^{t_s}``, the
  correction Adam applied to it at the switch step, so the preconditioner is
  exactly the one of the last dense step and the step size does not jump at
  the switch. The public PyTorch implementation we checked (``AdamW_STEP``)
  divides by the raw ``sqrt(v*)`` instead (plus ``eps^{3/4}``), which takes
  steps larger by ``1 / sqrt(1 - β2^{t_s})``: 1.26x at ``t_s = 1 / (1 - β2)``,
  1.003x at ``5 / (1 - β2)``. ``mu`` is bias-corrected with ``t`` in both.

  Parameters that are not selected (biases, norms, embeddings by default)
  get plain AdamW throughout; their ``v`` keeps updating and does not enter
  ``Z``.

  The updates: before the switch, the AdamW update itself; from the switch
  step on, for selected leaves, ``E(W_t) ⊙ W_t - params`` (pruned entries
  ``-params``, so they land on exactly 0.0).

  Args:
    learning_rate: a float or an optax schedule ``count -> lr``.
    n: weights kept per group, ``1 <= n <= m``.
    m: group size; must divide the grouping axis of every selected leaf.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in (0, 1); a Python float, as it sets the window
      ``T_w`` (a static shape).
    eps: Adam's denominator term.
    weight_decay: decoupled weight decay ``λ`` (AdamW), applied to ``W``.
    switch_eps: AutoSwitch threshold ``ε_switch >= 0`` on the mean ``Z``. The
      reference code compares with Adam's ``eps`` (1e-8), the default here; it
      is kept separate because ``Z`` scales with the squared gradients.
    t_min: no switch on ``Z`` while ``t <= t_min``; ``None``: ``T_w`` (the
      window is full and the initialisation bias ``β2^t ≈ 1/e``), capped at
      ``t_max``.
    t_max: the switch is forced at ``t = t_max + 1``; ``None``:
      ``10 * T_w``, when the initialisation bias ``β2^t < e^{-10}``. (The
      reference code's ``clipping=(T_min, T_max)`` defaults to no bounds.)
    axis: the N:M grouping axis; ``None``: the input axis of a Flax kernel.
    select: which parameters, see :func:`jaxprune.select`.

  Returns:
    A :class:`jaxprune.ViewTransformation`; ``view(params)`` is
    ``params`` (the precondition phase is dense). Its state is a
    :class:`jaxprune.MasterWeightsState` holding a :class:`StepState`;
    read it with :func:`step_phase` and :func:`jaxprune.master_params`.

  Memory: ``mu`` and ``nu`` for every parameter plus one dense master copy of
  the selected ones: 12 bytes per selected and 8 per other parameter in
  float32 (AdamW: 8), plus ``4 * T_w`` bytes for the ``Z`` window. The mask is
  recomputed, never stored.
  """
  structure = masks_lib.nm(n, m, axis=axis)
  if _checks.is_concrete(b1) and not 0.0 <= b1 < 1.0:
    raise ValueError(f"`b1` must be in [0, 1), got {b1}.")
  if not _checks.is_concrete(b2) or not 0.0 < b2 < 1.0:
    raise ValueError(f"`b2` must be a float in (0, 1), got {b2}.")
  if _checks.is_concrete(switch_eps) and not switch_eps >= 0:
    raise ValueError(f"`switch_eps` must be >= 0, got {switch_eps}.")
  window = int(1 / (1 - float(b2)))
  if t_max is None:
    t_max = 10 * window
  t_max = _checks.check_int("t_max", t_max, minimum=0)
  t_min = min(window, t_max) if t_min is None else _checks.check_int("t_min", t_min, minimum=0)
  if t_min > t_max:
    raise ValueError(f"`t_min` must be <= `t_max` = {t_max}, got t_min={t_min}.")
  t_min, t_max = min(t_min, _INT32_MAX), min(t_max, _INT32_MAX)
  selection = pruning.as_selection(select)

  def plan_for(params):
    return pruning._plan(params, selection, structure.sparsity, structure, "layer")

  def init_fn(params):
    inner = StepState(
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
        z_window=jnp.zeros([window], jnp.float32),
        switched=jnp.zeros([], bool),
        switch_step=jnp.zeros([], jnp.int32),
    )
    return MasterWeightsState(inner, dense_copy(plan_for(params), params),
                              jnp.zeros([], jnp.int32))

  def adamw(w, mu, nu, t_nu, t, lr):
    mu_hat = mu / (1 - b1**t).astype(mu.dtype)
    nu_hat = nu / (1 - b2**t_nu).astype(nu.dtype)
    return jnp.asarray(-lr, w.dtype) * (mu_hat / (jnp.sqrt(nu_hat) + eps) + weight_decay * w)

  def update_fn(updates, state, params=None):
    pruning.check_update_args("jaxprune.step_adam", updates, params, state.master)
    plan = plan_for(params)
    inner = state.inner_state
    count = state.count
    t = optax.safe_int32_increment(count)
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    switched = inner.switched
    t_frozen = jnp.where(switched, inner.switch_step, t)  # the t of v's bias correction

    treedef = jax.tree.structure(params)
    ps, gs = jax.tree.leaves(params), jax.tree.leaves(updates)
    mus, nus = jax.tree.leaves(inner.mu), jax.tree.leaves(inner.nu)
    masters = jax.tree.leaves(state.master)
    new_mu, new_nu, new_master, adam_updates, new_w = [], [], [], [], []
    z_sum, z_count = jnp.zeros([], jnp.float32), 0
    for leaf, p, g, mu, nu, w in zip(plan, ps, gs, mus, nus, masters, strict=True):
      mu = (1 - b1) * g + b1 * mu
      nu_t = (1 - b2) * g**2 + b2 * nu
      if leaf is None:  # plain AdamW on the params throughout.
        u = adamw(p, mu, nu_t, t, t, lr)
      else:
        z_sum += jnp.sum(jnp.abs(nu_t - nu).astype(jnp.float32))
        z_count += nu.size
        nu_t = jnp.where(switched, nu, nu_t)
        w = jnp.where(switched, w, p)  # W is the params until the switch.
        u = adamw(w, mu, nu_t, t_frozen, t, lr)
        w = (w + u).astype(p.dtype)
      new_mu.append(mu)
      new_nu.append(nu_t)
      new_master.append(w)
      adam_updates.append(u)
      new_w.append(None if leaf is None else w)

    z = z_sum / max(z_count, 1)
    z_window = jnp.where(switched, inner.z_window,
                         inner.z_window.at[count % window].set(z))
    z_mean = jnp.sum(z_window) / jnp.minimum(t, window).astype(jnp.float32)
    fire = ~switched & (((z_mean < switch_eps) & (t > t_min)) | (t > t_max))
    now_switched = switched | fire

    # Before the switch the update is AdamW's; from it on, params land on the view.
    # (A select, not `lax.cond`: XLA:CPU runs array-valued branches slowly, and
    # the N:M mask is one fused pass.)
    out = [u if w is None else jnp.where(
        now_switched,
        jnp.where(masks_lib.nm_mask(jnp.abs(w), structure.n, structure.m, axis=leaf.axis),
                  w - p, -p),
        u).astype(p.dtype) for leaf, u, w, p in zip(plan, adam_updates, new_w, ps, strict=True)]
    new_inner = StepState(
        mu=treedef.unflatten(new_mu),
        nu=treedef.unflatten(new_nu),
        z_window=z_window,
        switched=now_switched,
        switch_step=jnp.where(fire, t, inner.switch_step),
    )
    return treedef.unflatten(out), MasterWeightsState(
        new_inner, treedef.unflatten(new_master), t)

  def view(params):
    return params

  return ViewTransformation(init_fn, update_fn, view)
