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
reads its dense weights. :func:`step_phase` tells which phase it is in and
:func:`step_status` says it in words ("STEP has not switched ..."), for reports.

One update (:func:`_update`) reads as its phases: :func:`_moments` (the
precondition phase's Adam moments), :func:`_autoswitch` (the switch test on
the pooled ``Z``), :func:`_frozen_denominator` (the frozen-``v`` update) and
:func:`_land` (the params move onto the N:M view of the master weights).

**The frozen preconditioner.** ``preconditioner='corrected'`` (default)
divides ``v*`` by the bias correction Adam applied to it at the switch step,
so that the step size does not jump at the switch. ``'reference'`` is the
public ``AdamW_STEP``'s ``sqrt(v*) + ε^{3/4}``: its steps are larger by
``1 / sqrt(1 - β2^{t_s})`` (where ``sqrt(v*) >> ε^{3/4}``): 2.29x at
``t_s = 21`` with ``β2 = 0.99``, 1.26x at ``t_s = T_w``, 1.003x at
``t_s = 5 T_w``; ``ε^{3/4}`` = 1e-6 for ``ε`` = 1e-8. Checked against a
float64 port of ``AdamW_STEP.step`` on the same gradients
(``tests/test_step.py``): master weights within 1.5e-7 (float32 rounding)
over 40 steps, and the same N:M masks; the default ends 0.09 away on the
same problem, with 58% of the mask entries agreeing.

**Entries with v* = 0** (``zero_v``). A unit that never received a gradient
before the switch (a dead ReLU, an unused input) has ``v* = 0`` exactly. If
it comes alive after the switch (pruning changes the pre-activations), its
frozen step is ``lr m̂ / ε``, 1e8 times too large at ``ε`` = 1e-8 (1e6
times with the reference's ``ε^{3/4}``): in two client codebases 14-31% of a
layer's entries were such zeros and ``max |W|`` went 0.08 -> 6.3 -> 1e3 ->
1e5 in three steps. With ``zero_v='adam'`` (default) these entries are not
frozen: their ``v`` keeps Adam's update and their step is AdamW's (a unit
waking up late then moves as it would under AdamW); entries with ``v* > 0``
follow the paper exactly. ``zero_v='freeze'`` freezes them too, as the paper
and ``AdamW_STEP`` do; ``preconditioner='reference', zero_v='freeze'``
is that implementation. A floor relative to the layer's ``v`` would also
bound the step, but would change the preconditioner of every small-``v``
entry, which is what STEP is about; an entry with a tiny non-zero ``v*``
keeps the paper's step. The fraction of such entries is in
:func:`step_status`.


**Choosing t_max.** The switch is forced at ``t_max + 1`` at the latest; a
run that ends before never learns a mask and stays dense (check with
:func:`step_status`). Give ``total_steps`` and ``t_max`` defaults to
``min(10 T_w, total_steps / 4)`` (:func:`default_t_max`): at least three
quarters of the run learn the mask. ``b2 = 0.999`` (``T_w`` = 999: ``int``
rounds ``1 / (1 - b2)`` down, as in the reference) needs a few thousand steps
for a meaningful precondition phase; in shorter runs use ``b2 = 0.99``
(``T_w = 100``).

**bfloat16 params.** The master weights ``W``, ``mu`` and ``v`` are kept in
float32 (in the params' dtype when that is float32 or wider); the params
are ``W`` (then its view) rounded to bfloat16 after every step, pruned
entries exactly 0. Leaves that are not selected have no master: their AdamW
update is computed in float32 and applied in bfloat16.

**Memory.** ``mu`` and ``v`` for every parameter plus one dense master copy
and one ``bool`` (``adam_v``) per selected parameter: 13 bytes per selected
and 8 per other parameter in float32 (AdamW: 8), plus ``4 * T_w`` bytes for
the ``Z`` window. The mask is recomputed, never stored.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import _checks, pruning
from jaxprune import masks as masks_lib
from jaxprune.invariants import INT32_MAX
from jaxprune.straight_through import (
    MasterWeightsState,
    ViewTransformation,
    master_dtype,
    master_state,
)

#: Frozen-``v`` preconditioners of the mask-learning phase, see :func:`step_adam`.
PRECONDITIONERS = ("corrected", "reference")
#: What happens to entries whose ``v`` is exactly 0 at the switch, see :func:`step_adam`.
ZERO_V = ("adam", "freeze")
#: With ``total_steps``, the switch is forced by this fraction of training at the latest.
T_MAX_FRACTION = 0.25


class StepState(NamedTuple):
  """The moments and AutoSwitch statistics of :func:`step_adam`.

  Stored as the ``inner_state`` of a :class:`jaxprune.MasterWeightsState`
  whose ``count`` is the number of steps taken so far (``t`` of the last one).

  Attributes:
    mu: Adam's first moment, a tree like params (float32 for bfloat16 params).
    nu: Adam's second moment, a tree like params; for selected leaves it is
      frozen at the switch step, ``nu = v*``, except where ``adam_v`` is set.
    z_window: float32 ring buffer of the last ``int(1 / (1 - b2))`` values of
      ``Z_t``; ``Z_t`` is stored at index ``(t - 1) % len(z_window)``.
    switched: bool scalar, True once the mask-learning phase has begun.
    switch_step: int32 scalar, the step ``t_s`` at which AutoSwitch fired
      (0 before).
    adam_v: a tree like params of bool, True for the entries of selected leaves
      whose ``v`` was exactly 0 at the switch and keeps Adam's update
      (``zero_v='adam'``); a scalar False for the other leaves.
    t_max: int32 scalar, the step after which the switch is forced (for
      :func:`step_status`).
  """

  mu: Any
  nu: Any
  z_window: jax.Array
  switched: jax.Array
  switch_step: jax.Array
  adam_v: Any
  t_max: jax.Array


def _is_step_state(x) -> bool:
  return isinstance(x, MasterWeightsState) and isinstance(x.inner_state, StepState)


def _step_state(opt_state) -> MasterWeightsState:
  state = master_state(opt_state)
  if not _is_step_state(state):
    raise ValueError("`opt_state` holds a master-weight state that is not STEP's "
                     "(jaxprune.step.step_adam).")
  return state


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
  inner = _step_state(opt_state).inner_state
  return jnp.asarray(inner.switched), jnp.asarray(inner.switch_step)


def step_status(opt_state) -> str:
  """One line for a report: whether STEP has switched, when and how (host-side).

  Examples::

      STEP has not switched (t=150, t_max=200: forced at t=201; mean Z 3.1e-07): the model is
      still dense.
      STEP switched at t=121 (AutoSwitch); N:M masks learned for 679 steps under frozen v.
      STEP switched at t=201 (forced: t > t_max=200); ... 2.30% of the selected entries had
      v = 0 at the switch and keep Adam's v.

  Args:
    opt_state: the state of :func:`step_adam`, or any state that contains it.
  """
  state = _step_state(opt_state)
  inner = state.inner_state
  t, t_max = int(state.count), int(inner.t_max)
  if not bool(inner.switched):
    window = np.asarray(inner.z_window)
    z = float(window.sum() / max(min(t, window.size), 1))
    return (f"STEP has not switched (t={t}, t_max={t_max}: forced at t={t_max + 1}; "
            f"mean Z {z:.3g}): the model is still dense.")
  t_s = int(inner.switch_step)
  how = f"forced: t > t_max={t_max}" if t_s > t_max else "AutoSwitch"
  line = f"STEP switched at t={t_s} ({how}); N:M masks learned for {t - t_s} steps under frozen v"
  flags = [np.asarray(a) for a in jax.tree.leaves(inner.adam_v) if np.ndim(a)]
  adam = sum(int(a.sum()) for a in flags)
  if adam:
    size = sum(a.size for a in flags)
    line += (f"; {adam / size:.2%} of the selected entries had v = 0 at the switch and keep "
             "Adam's v")
  return line + "."


def default_t_max(b2: float, total_steps: int | None) -> int:
  """The default ``t_max``: ``10 T_w``, capped at a quarter of ``total_steps`` when given.

  ``T_w = int(1 / (1 - b2))``. Without the cap a run shorter than ``T_w``
  steps never switches (AutoSwitch cannot fire before ``t_min = T_w``), and
  one shorter than ``10 T_w`` may spend most of its steps dense.
  """
  t_max = 10 * int(1 / (1 - float(b2)))
  if total_steps is not None:
    t_max = min(t_max, max(int(T_MAX_FRACTION * total_steps), 1))
  return t_max


def _moments(g, mu, nu, b1, b2):
  """Adam's moments: ``mu_t = b1 mu + (1 - b1) g``, ``v_t = b2 v + (1 - b2) g^2``."""
  g = g.astype(mu.dtype)
  return (1 - b1) * g + b1 * mu, (1 - b2) * g**2 + b2 * nu


def _autoswitch(inner: StepState, z_sum, z_count: int, count, t, *, window, switch_eps, t_min,
                t_max):
  """AutoSwitch: ``(z_window, fire)`` after step ``t`` with ``Z_t = z_sum / z_count``.

  At each step of the precondition phase, over the ``D`` entries of all
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
  """
  switched = inner.switched
  z = z_sum / max(z_count, 1)
  z_window = jnp.where(switched, inner.z_window, inner.z_window.at[count % window].set(z))
  z_mean = jnp.sum(z_window) / jnp.minimum(t, window).astype(jnp.float32)
  fire = ~switched & (((z_mean < switch_eps) & (t > t_min)) | (t > t_max))
  return z_window, fire


def _adam_denominator(nu, t, *, b2, eps):
  """Adam's ``sqrt(v_t / (1 - b2^t)) + eps``."""
  return jnp.sqrt(nu / (1 - b2**t).astype(nu.dtype)) + eps


def _frozen_denominator(nu, t_s, *, b2, eps, preconditioner):
  """The frozen-``v`` preconditioner ``D*``: ``'corrected'``, ``sqrt(v* / (1 - b2^{t_s})) +
  eps``; ``'reference'`` (AdamW_STEP), ``sqrt(v*) + eps^{3/4}``."""
  if preconditioner == "corrected":
    return _adam_denominator(nu, t_s, b2=b2, eps=eps)
  return jnp.sqrt(nu) + eps**0.75


def _adamw_update(w, mu, denom, t, lr, *, b1, weight_decay):
  """``-lr (mu / (1 - b1^t) / denom + lambda w)``: AdamW's update with a given denominator."""
  mu_hat = mu / (1 - b1**t).astype(mu.dtype)
  return jnp.asarray(-lr, w.dtype) * (mu_hat / denom + weight_decay * w)


def _land(w, p, mask):
  """The update that moves the params ``p`` onto the N:M view ``mask * w``.

  Pruned entries are emitted as ``-p`` (they land on exactly 0.0); kept ones as
  ``w - p`` in the params' dtype (exact when the two are within a factor of 2).
  """
  return jnp.where(mask, w.astype(p.dtype) - p, -p)


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
    total_steps: int | None = None,
    preconditioner: str = "corrected",
    zero_v: str = "adam",
    axis: int | None = None,
    select=None,
) -> ViewTransformation:
  """STEP (Lu et al. 2023): AdamW, AutoSwitch, then N:M masks under a frozen ``v``.

  Let ``t = 1, 2, ...`` count the calls to ``update`` (Adam's step count:
  the ``t``-th call computes ``mu_t, v_t``), ``g_t`` the gradient it is given
  and ``lr_t = learning_rate(t - 1)`` (optax's schedule convention).

  **Precondition phase** (every parameter, until the switch step included):
  AdamW on the weights ``W``,

  .. math::

      \\mu_t = \\beta_1 \\mu_{t-1} + (1 - \\beta_1) g_t, \\quad
      v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2, \\\\
      W_t = W_{t-1} - \\mathrm{lr}_t \\Big(
          \\frac{\\mu_t / (1 - \\beta_1^t)}{\\sqrt{v_t / (1 - \\beta_2^t)} + \\epsilon}
          + \\lambda W_{t-1} \\Big),

  ``optax.adamw(learning_rate, b1, b2, eps, weight_decay=λ)`` to float rounding.

  **AutoSwitch** (:func:`_autoswitch`) ends it at the first step ``t_s`` with
  ``(mean(Z) < switch_eps and t > t_min) or t > t_max``, where ``Z_t`` is the
  mean ``|v_t - v_{t-1}|`` over all selected entries and the mean runs over
  the last ``T_w = int(1 / (1 - β2))`` steps.

  **Mask-learning phase.** ``v* = v_{t_s}`` is frozen (selected leaves). From
  step ``t_s`` on the params are the view ``E(W) ⊙ W``, ``E`` the N:M mask of
  ``|W|`` along ``axis``; the gradient at the view passes straight to ``W``:

  .. math::

      \\mu_t = \\beta_1 \\mu_{t-1} + (1 - \\beta_1) g_t, \\quad
      W_t = W_{t-1} - \\mathrm{lr}_t \\Big(
          \\frac{\\mu_t / (1 - \\beta_1^t)}{D^*} + \\lambda W_{t-1} \\Big),

  with the frozen preconditioner ``D*`` chosen by ``preconditioner``:

  * ``'corrected'`` (default): ``D* = sqrt(v* / (1 - β2^{t_s})) + ε``, the
    denominator of the last dense step;
  * ``'reference'``: ``D* = sqrt(v*) + ε^{3/4}``, the public PyTorch
    ``AdamW_STEP``'s (see the module docstring for the difference).

  ``mu`` is bias-corrected with ``t`` in both. Entries whose ``v`` is exactly 0
  at the switch keep Adam's ``v`` unless ``zero_v='freeze'``; the module
  docstring says why, how to choose ``t_max`` and what bfloat16 params keep.

  Leaves not selected (biases, norms, embeddings by default) get plain AdamW
  throughout, outside ``Z``. The updates: AdamW's before the switch, then
  ``E(W_t) ⊙ W_t - params`` (pruned entries ``-params``: exactly 0.0).

  Args:
    learning_rate: a float or an optax schedule ``count -> lr``.
    n: weights kept per group, ``1 <= n <= m``.
    m: group size; must divide the grouping axis of every selected leaf.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in (0, 1); a Python float, as it sets the window
      ``T_w`` (a static shape).
    eps: Adam's denominator term.
    weight_decay: decoupled weight decay ``λ`` (AdamW), applied to ``W``.
    switch_eps: AutoSwitch threshold ``>= 0`` on the mean ``Z`` (the reference
      compares with Adam's ``eps``, 1e-8, the default here).
    t_min: no switch on ``Z`` while ``t <= t_min``; ``None``: ``T_w`` (a full
      window, initialisation bias ``β2^t ≈ 1/e``), capped at ``t_max``.
    t_max: the switch is forced at ``t = t_max + 1``; ``None``:
      :func:`default_t_max` (``10 T_w``, bias ``β2^t < e^{-10}``, capped at
      ``total_steps / 4``). The reference's ``clipping`` has no default bounds.
    total_steps: the run's length ``>= 2``: sets the default ``t_max``; a given
      ``t_max`` must satisfy ``t_max + 1 < total_steps``.
    preconditioner: ``'corrected'`` or ``'reference'``, see above.
    zero_v: ``'adam'`` or ``'freeze'``, see above.
    axis: the N:M grouping axis; ``None``: each layer's reduction axis
      (:mod:`jaxprune.layouts`: axis 0 of a Flax ``(in, out)`` kernel, 1 of an Equinox
      ``(out, in)`` weight).
    select: which parameters, see :func:`jaxprune.select`.

  Returns:
    A :class:`jaxprune.ViewTransformation` (``view`` is the identity: the precondition phase
    is dense) whose :class:`jaxprune.MasterWeightsState` holds a :class:`StepState`; read it
    with :func:`step_phase`, :func:`step_status`, :func:`jaxprune.master_params`.
  """
  structure = masks_lib.nm(n, m, axis=axis)
  window, t_min, t_max = _check_args(b1, b2, switch_eps, t_min, t_max, total_steps,
                                     preconditioner, zero_v)
  selection = pruning.as_selection(select)

  def plan_for(params):
    return pruning.plan(params, selection, structure.sparsity, structure, "layer")

  def init_fn(params):
    return _init(plan_for(params), params, window, t_max)

  hyper = dict(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, preconditioner=preconditioner)
  switch = dict(window=window, switch_eps=switch_eps, t_min=t_min, t_max=t_max)

  def update_fn(updates, state, params=None):
    pruning.check_update_args("jaxprune.step_adam", updates, params, state.master)
    return _update(plan_for(params), updates, state, params, learning_rate, zero_v, structure,
                   hyper, switch)

  def view(params):
    return params

  return ViewTransformation(init_fn, update_fn, view)


def _init(plan, params, window: int, t_max: int) -> MasterWeightsState:
  """Zero moments, an empty ``Z`` window and a master copy of the selected leaves."""
  leaves, treedef = jax.tree.flatten(params)

  def zeros(x):
    return jnp.zeros(jnp.shape(x), master_dtype(jnp.result_type(x)))

  inner = StepState(
      mu=jax.tree.map(zeros, params),
      nu=jax.tree.map(zeros, params),
      z_window=jnp.zeros([window], jnp.float32),
      switched=jnp.zeros([], bool),
      switch_step=jnp.zeros([], jnp.int32),
      adam_v=treedef.unflatten([jnp.zeros(() if p is None else jnp.shape(x), bool)
                                for p, x in zip(plan, leaves, strict=True)]),
      t_max=jnp.asarray(t_max, jnp.int32),
  )
  master = [jnp.zeros((), master_dtype(jnp.result_type(x))) if p is None else
            jnp.array(x, dtype=master_dtype(jnp.result_type(x)), copy=True)
            for p, x in zip(plan, leaves, strict=True)]
  return MasterWeightsState(inner, treedef.unflatten(master), jnp.zeros([], jnp.int32))


#: The largest AutoSwitch window ``T_w`` (a ring buffer of ``T_w`` float32 in the state: 4 MiB).
MAX_WINDOW = 2**20


def _check_args(b1, b2, switch_eps, t_min, t_max, total_steps, preconditioner, zero_v):
  """Validates the arguments of :func:`step_adam`; returns ``(T_w, t_min, t_max)``."""
  if _checks.is_concrete(b1) and not 0.0 <= b1 < 1.0:
    raise ValueError(f"`b1` must be in [0, 1), got {b1}.")
  if not _checks.is_concrete(b2) or not 0.0 < b2 < 1.0:
    raise ValueError(f"`b2` must be a float in (0, 1), got {b2}.")
  if _checks.is_concrete(switch_eps) and not switch_eps >= 0:
    raise ValueError(f"`switch_eps` must be >= 0, got {switch_eps}.")
  if preconditioner not in PRECONDITIONERS:
    raise ValueError(f"`preconditioner` must be one of {PRECONDITIONERS}, got "
                     f"{preconditioner!r}.")
  if zero_v not in ZERO_V:
    raise ValueError(f"`zero_v` must be one of {ZERO_V}, got {zero_v!r}.")
  if total_steps is not None:
    total_steps = _checks.check_int("total_steps", total_steps, minimum=2)
  window = int(1 / (1 - float(b2)))
  if window > MAX_WINDOW:
    raise ValueError(f"`b2` = {b2!r} gives an AutoSwitch window T_w = int(1 / (1 - b2)) = "
                     f"{window:,} steps, whose ring buffer would not fit; `b2` must be <= "
                     f"{1 - 1 / MAX_WINDOW} (T_w <= {MAX_WINDOW:,}).")
  t_max = default_t_max(b2, total_steps) if t_max is None else _checks.check_int(
      "t_max", t_max, minimum=0)
  if total_steps is not None and t_max + 1 >= total_steps:
    raise ValueError(f"`t_max` = {t_max} forces the switch at step {t_max + 1}, not before "
                     f"the end of `total_steps` = {total_steps}: STEP would never learn a mask; "
                     f"use t_max < {total_steps - 1} (or leave it to the default).")
  t_min = min(window, t_max) if t_min is None else _checks.check_int("t_min", t_min, minimum=0)
  if t_min > t_max:
    raise ValueError(f"`t_min` must be <= `t_max` = {t_max}, got t_min={t_min}.")
  return window, min(t_min, INT32_MAX), min(t_max, INT32_MAX)


def _update(plan, updates, state, params, learning_rate, zero_v, structure, hyper, switch):
  """One STEP update: moments, AutoSwitch, denominators, master step, landing."""
  inner, count = state.inner_state, state.count
  t = optax.safe_int32_increment(count)
  lr = learning_rate(count) if callable(learning_rate) else learning_rate
  switched, t_s = inner.switched, inner.switch_step
  b1, b2, eps = hyper["b1"], hyper["b2"], hyper["eps"]
  treedef = jax.tree.structure(params)
  ps, gs, mus, nus, ws, adam_vs = (jax.tree.leaves(x) for x in (
      params, updates, inner.mu, inner.nu, state.master, inner.adam_v))
  new_mu, new_nu, steps, z_sum, z_count = [], [], [], jnp.zeros([], jnp.float32), 0
  for leaf, p, g, mu, nu, w, adam_v in zip(plan, ps, gs, mus, nus, ws, adam_vs, strict=True):
    mu, nu_t = _moments(g, mu, nu, b1, b2)
    if leaf is None:  # plain AdamW on the params throughout.
      w, denom = p.astype(mu.dtype), _adam_denominator(nu_t, t, b2=b2, eps=eps)
    else:
      z_sum += jnp.sum(jnp.abs(nu_t - nu).astype(jnp.float32))
      z_count += nu.size
      frozen = switched & ~adam_v
      nu_t = jnp.where(frozen, nu, nu_t)
      denom = jnp.where(frozen, _frozen_denominator(
          nu_t, t_s, b2=b2, eps=eps, preconditioner=hyper["preconditioner"]),
                        _adam_denominator(nu_t, t, b2=b2, eps=eps))
      # W is the params until the switch, unless the master is wider (bfloat16 params).
      w = jnp.where(switched, w, p) if w.dtype == p.dtype else w
    new_mu.append(mu)
    new_nu.append(nu_t)
    steps.append((w, _adamw_update(w, mu, denom, t, lr, b1=b1,
                                   weight_decay=hyper["weight_decay"])))

  z_window, fire = _autoswitch(inner, z_sum, z_count, count, t, **switch)
  now_switched = switched | fire
  out, master, new_adam_v = [], [], []
  for leaf, p, (w, u), nu, w0, adam_v in zip(plan, ps, steps, new_nu, ws, adam_vs, strict=True):
    if leaf is None:
      out.append(u.astype(p.dtype))
      master.append(w0)
      new_adam_v.append(adam_v)
      continue
    w = w + u
    mask = masks_lib.nm_mask(jnp.abs(w), structure.n, structure.m, axis=leaf.axis)
    # Before the switch: AdamW's update (params in the master's dtype) or the rounded master.
    dense = u.astype(p.dtype) if w.dtype == p.dtype else w.astype(p.dtype) - p
    out.append(jnp.where(now_switched, _land(w, p, mask), dense))
    master.append(w)
    new_adam_v.append(adam_v | (fire & (nu == 0)) if zero_v == "adam" else adam_v)
  new_inner = StepState(
      mu=treedef.unflatten(new_mu), nu=treedef.unflatten(new_nu), z_window=z_window,
      switched=now_switched, switch_step=jnp.where(fire, t, t_s),
      adam_v=treedef.unflatten(new_adam_v), t_max=inner.t_max)
  return treedef.unflatten(out), MasterWeightsState(new_inner, treedef.unflatten(master), t)
