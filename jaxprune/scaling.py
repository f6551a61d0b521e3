"""Scaling laws for sparse pre-training: average parameter count and loss fits.

Jin et al. (2025), "The Journey Matters: Average Parameter Count over
Pre-training Unifies Sparse and Dense Scaling Laws", find that the Chinchilla
law of Hoffmann et al. (2022),

.. math::
    L(N, D) = E + \\frac{A}{N^{\\alpha}} + \\frac{B}{D^{\\beta}},

fits sparse and dense pre-training alike once :math:`N` is the number of
non-zero parameters averaged over the training steps
(:func:`average_param_count`). :func:`fit` fits it as in Hoffmann et al.'s
approach 3 (Huber loss on :math:`\\log L`, L-BFGS from a grid of starts, as
re-examined by Besiroglu et al. 2024, "Chinchilla Scaling: A replication
attempt"); :func:`fit_sparse_form` fits the sparse law of Frantar et al.
(2023), "Scaling Laws for Sparsely-Connected Foundation Models". Both models
are a log-sum-exp of terms linear in the parameters and share one fitting
engine: a vmapped L-BFGS over a grid of starts, with bootstrap intervals.

:func:`read_csv` and :func:`write_csv` move the data (columns ``N``, ``D``,
``loss`` and anything else, e.g. ``sparsity``, ``N_avg``, schedule fields).
"""

from __future__ import annotations

import csv
import functools
import itertools
import math
import numbers
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import _checks, schedules

# -----------------------------------------------------------------------------
# Average parameter count (Jin et al. 2025)
# -----------------------------------------------------------------------------


def average_param_count(
    num_steps: int,
    prunable_sizes: int | Sequence[int],
    *,
    schedule=None,
    sparsity_per_step=None,
    fixed_params: int = 0,
) -> float:
  """Mean number of non-zero parameters over training steps ``0..num_steps-1``.

  .. math::
      \\bar N = N_{\\mathrm{fixed}} + \\frac{1}{T} \\sum_{t=0}^{T-1} \\sum_l
      \\left(n_l - \\mathrm{round}(s_{t,l}\\, n_l)\\right)

  with :math:`n_l` the size of prunable layer :math:`l` and :math:`s_{t,l}`
  the target in force at step :math:`t`: the realised per-layer counts, with
  the same rounding as the masks, not the continuous
  :math:`(1 - \\bar s) \\sum_l n_l`. For a schedule with a final sparsity
  :math:`s_f` that is :math:`\\mathrm{round}(s_t / s_f \\cdot \\mathrm{round}(s_f n_l))`
  pruned, as :func:`jaxprune.magnitude_pruning` prunes (float32, half to even),
  so every layer ends at exactly :math:`\\mathrm{round}(s_f n_l)`; for
  ``sparsity_per_step``, :math:`\\mathrm{round}(s_{t,l} n_l)` in float64.
  This is the :math:`N` of Jin et al. (2025), "The Journey Matters".

  Known answer: a cubic Zhu-Gupta ramp from 0 to :math:`s_f` over the middle
  half of training (``polynomial_schedule(0, s_f, T // 4, 3 * T // 4)``) has
  mean sparsity

  .. math::
      \\frac{1}{T}\\Big[\\underbrace{\\tfrac{T}{2} \\int_0^1 s_f (1 - (1 - p)^3)\\,dp}
      _{\\text{ramp}} + \\underbrace{\\tfrac{T}{4} s_f}_{\\text{after}}\\Big]
      = s_f \\left(\\tfrac12 \\cdot \\tfrac34 + \\tfrac14\\right) = 0.625\\, s_f,

  up to :math:`O(1/T)` discretisation (0.6244995 s_f for T = 1000). In general
  a power-:math:`k` ramp over fractions :math:`[b, e]` of training gives
  :math:`s_f ((e - b) \\frac{k}{k + 1} + 1 - e)`.

  Args:
    num_steps: number of training steps T >= 1.
    prunable_sizes: size of each prunable layer (an int for a single one).
    schedule: a sparsity schedule (see :mod:`jaxprune.schedules`), or one per
      layer; the applied targets come from
      :func:`jaxprune.schedules.applied_sparsity` (masks held between update
      steps, dense before the first).
    sparsity_per_step: instead of ``schedule``, the targets in force at each
      step, shape ``(num_steps,)`` or ``(num_steps, num_layers)``, in [0, 1].
    fixed_params: parameters never pruned (embeddings, norms, biases), >= 0.

  Returns:
    The average non-zero parameter count (a float).
  """
  num_steps = _checks.check_int("num_steps", num_steps, minimum=1)
  fixed_params = _checks.check_int("fixed_params", fixed_params, minimum=0)
  sizes = np.atleast_1d(np.asarray(prunable_sizes))
  if sizes.ndim != 1 or not (
      np.issubdtype(sizes.dtype, np.integer) and np.all(sizes >= 0)
  ):
    raise ValueError(
        f"`prunable_sizes` must be non-negative integers, got {prunable_sizes!r}."
    )
  sizes = sizes.astype(np.int64)
  if (schedule is None) == (sparsity_per_step is None):
    raise ValueError("Pass exactly one of `schedule` and `sparsity_per_step`.")
  if schedule is not None:
    if isinstance(schedule, Sequence):
      if len(schedule) != sizes.size:
        raise ValueError(
            f"Got {len(schedule)} schedules for {sizes.size} `prunable_sizes`."
        )
      targets = np.stack([schedules.applied_sparsity(s, num_steps) for s in schedule], 1)
    else:
      targets = schedules.applied_sparsity(schedule, num_steps)
  else:
    targets = np.asarray(sparsity_per_step, np.float64)
    if targets.shape not in ((num_steps,), (num_steps, sizes.size)):
      raise ValueError(
          f"`sparsity_per_step` must have shape ({num_steps},) or ({num_steps}, "
          f"{sizes.size}) (num_steps, num_layers), got {targets.shape}."
      )
    if not np.all((targets >= 0) & (targets <= 1)):  # also rejects NaN
      raise ValueError("`sparsity_per_step` must be in [0, 1].")
  if schedule is None:
    finals = [None] * sizes.size
  elif isinstance(schedule, Sequence):
    finals = [_final_sparsity(s) for s in schedule]
  else:
    finals = [_final_sparsity(schedule)] * sizes.size
  if targets.ndim == 1 and len(set(finals)) == 1:
    kept = _kept_over_steps(targets, sizes, finals[0])
  else:
    columns = targets if targets.ndim == 2 else np.repeat(targets[:, None], sizes.size, 1)
    kept = sum(_kept_over_steps(columns[:, i], sizes[i : i + 1], finals[i])
               for i in range(sizes.size))
  return fixed_params + kept / num_steps


def _final_sparsity(schedule) -> float | None:
  final = getattr(schedule, "final_sparsity", None)
  return None if final is None else float(final)


def _kept_over_steps(targets: np.ndarray, sizes: np.ndarray, final: float | None) -> int:
  """``sum_t sum_l (n_l - k_{t,l})`` for targets shared by the layers ``sizes``.

  ``k = round(s_t n)`` for plain targets. For a schedule with a final sparsity
  ``s_f`` the pruning transforms prune ``round(s_t / s_f * round(s_f n))``
  (float32 on the device, exactly reproduced here), so that each layer hits
  ``round(s_f n)`` at the end.
  """
  # Schedules hold a few distinct values for many steps: count each once.
  values, counts = np.unique(targets, return_counts=True)
  if final is None:
    pruned = np.rint(values[:, None] * sizes[None, :])
  elif final == 0:
    pruned = np.zeros((values.size, sizes.size))
  else:
    fraction = values.astype(np.float32) / np.float32(final)
    pruned = np.rint(fraction[:, None] * np.rint(final * sizes).astype(np.float32)[None, :])
  pruned = np.clip(pruned, 0, sizes[None, :]).astype(np.int64)
  return int(counts @ (sizes[None, :] - pruned).sum(1))


# -----------------------------------------------------------------------------
# The objective: Huber on log L of a log-sum-exp model
# -----------------------------------------------------------------------------


def _huber(r, delta):
  """Huber_delta(r) = r^2 / 2 for |r| <= delta, delta (|r| - delta / 2) beyond."""
  a = jnp.abs(r)
  return jnp.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def huber_objective(predicted, loss, *, delta: float = 1e-3, weights=None) -> float:
  """Hoffmann et al. (2022) approach-3 objective, summed over points.

  .. math::
      \\sum_i w_i\\, \\mathrm{Huber}_\\delta(\\log \\hat L_i - \\log L_i), \\qquad
      \\mathrm{Huber}_\\delta(r) = \\begin{cases} r^2/2 & |r| \\le \\delta \\\\
      \\delta (|r| - \\delta / 2) & \\text{otherwise} \\end{cases}

  Args:
    predicted: model losses :math:`\\hat L_i > 0`.
    loss: observed losses :math:`L_i > 0`.
    delta: Huber threshold on the log residual (1e-3 in the paper).
    weights: optional per-point weights (bootstrap counts); 1 by default.
  """
  r = np.log(np.asarray(predicted, np.float64)) - np.log(np.asarray(loss, np.float64))
  w = np.ones_like(r) if weights is None else np.asarray(weights, np.float64)
  with jax.enable_x64(True):
    return float(jnp.sum(w * _huber(r, delta)))


def _value_and_grad(log_terms: Callable, theta, log_loss, weights, delta):
  """Objective and gradient for log L-hat = LSE_k(log_terms(theta)_k).

  With r = log L-hat - log L and p_k the softmax weights of the terms,
  d objective / d theta = sum_i w_i clip(r_i, -delta, delta) sum_k p_ik d term_ik / d theta.
  Written out (rather than jax.grad) so that the terms are exponentiated once.
  """
  terms, vjp = jax.vjp(log_terms, theta)  # (num_terms, num_points)
  top = jnp.max(terms, axis=0)
  scaled = jnp.exp(terms - top)
  total = jnp.sum(scaled, axis=0)
  r = top + jnp.log(total) - log_loss
  value = jnp.sum(weights * _huber(r, delta))
  (grad,) = vjp(scaled * (weights * jnp.clip(r, -delta, delta) / total))
  return value, grad


# -----------------------------------------------------------------------------
# L-BFGS that vmaps: one objective evaluation per loop iteration
# -----------------------------------------------------------------------------


class _LbfgsState(NamedTuple):
  x: jax.Array
  value: jax.Array
  grad: jax.Array
  direction: jax.Array
  step: jax.Array  # trial step length along `direction`
  s: jax.Array  # (memory, P) past x differences, oldest first
  y: jax.Array  # (memory, P) past gradient differences
  rho: jax.Array  # (memory,) 1 / (s . y); 0 marks an empty slot
  num_evals: jax.Array
  num_rejected: jax.Array  # consecutive rejected trial steps
  done: jax.Array


def _lbfgs_direction(grad, s, y, rho):
  """-H grad by the two-loop recursion (Nocedal & Wright, alg. 7.4).

  Empty slots (rho = 0, s = y = 0) contribute nothing. H_0 = gamma I with
  gamma = s.y / y.y of the newest pair, or 1 / |grad| before any pair (a first
  step of unit length).
  """
  def newest_first(q, pair):
    s_i, y_i, rho_i = pair
    alpha = rho_i * (s_i @ q)
    return q - alpha * y_i, alpha

  q, alphas = lax.scan(newest_first, grad, (s, y, rho), reverse=True)
  has_pair = rho[-1] > 0
  gamma = jnp.where(
      has_pair,
      (s[-1] @ y[-1]) / jnp.where(has_pair, y[-1] @ y[-1], 1.0),
      1.0 / jnp.maximum(jnp.linalg.norm(grad), jnp.finfo(grad.dtype).tiny),
  )

  def oldest_first(r, pair):
    s_i, y_i, rho_i, alpha = pair
    return r + s_i * (alpha - rho_i * (y_i @ r)), None

  r, _ = lax.scan(oldest_first, gamma * q, (s, y, rho, alphas))
  return -r


def _lbfgs(value_and_grad, x0, max_evals, ftol, *, memory=10, c1=1e-4, max_rejected=30):
  """Minimises with L-BFGS and a backtracking (Armijo) line search.

  optax.lbfgs's zoom line search is a nested while loop; under vmap over
  thousands of starts every outer step waits for the slowest start's line
  search. Here each loop iteration makes exactly one objective evaluation:
  a trial step t along the L-BFGS direction is accepted if
  f(x + t d) <= f(x) + c1 t g.d, else t shrinks by safeguarded quadratic
  interpolation (to [0.1 t, 0.5 t]). A pair (s, y) enters the memory only if
  s.y > eps |s| |y|. Stops after ``max_evals`` evaluations, when an accepted step
  decreases f by at most ``ftol * f``, or after ``max_rejected`` rejected
  trials in a row (no decrease possible at this precision).
  """
  # The first iteration evaluates x0 itself (step 0 from value +inf is
  # accepted), so the objective appears once in the compiled loop.
  zeros = jnp.zeros((memory, x0.shape[0]), x0.dtype)
  state = _LbfgsState(
      x=x0, value=jnp.array(jnp.inf, x0.dtype), grad=jnp.zeros_like(x0),
      direction=jnp.zeros_like(x0), step=jnp.zeros((), x0.dtype), s=zeros, y=zeros,
      rho=zeros[:, 0], num_evals=jnp.zeros((), jnp.int32),
      num_rejected=jnp.zeros((), jnp.int32), done=jnp.zeros((), bool),
  )

  def cond(st):
    return ~st.done & (st.num_evals < max_evals)

  def body(st):
    x = st.x + st.step * st.direction
    value, grad = value_and_grad(x)
    slope = st.grad @ st.direction
    accept = jnp.isfinite(value) & (value <= st.value + c1 * st.step * slope)
    s, y = x - st.x, grad - st.grad
    sy = s @ y
    # Only pairs of positive curvature keep the inverse-Hessian estimate positive definite.
    push = accept & (sy > jnp.finfo(sy.dtype).eps * jnp.linalg.norm(s) * jnp.linalg.norm(y))

    def shift(buf, new):  # drop the oldest pair, append the newest
      return jnp.where(push, jnp.concatenate([buf[1:], new[None]]), buf)

    mem_s, mem_y = shift(st.s, s), shift(st.y, y)
    mem_rho = shift(st.rho, 1.0 / jnp.where(push, sy, 1.0))
    direction = _lbfgs_direction(grad, mem_s, mem_y, mem_rho)
    direction = jnp.where(direction @ grad < 0, direction, -grad / jnp.linalg.norm(grad))
    quad = -slope * st.step**2 / (2.0 * (value - st.value - slope * st.step))
    shrunk = jnp.where(
        jnp.isfinite(quad), jnp.clip(quad, 0.1 * st.step, 0.5 * st.step), 0.1 * st.step
    )
    rejected = jnp.where(accept, 0, st.num_rejected + 1)
    stalled = accept & (st.value - value <= ftol * jnp.abs(value))
    return _LbfgsState(
        x=jnp.where(accept, x, st.x),
        value=jnp.where(accept, value, st.value),
        grad=jnp.where(accept, grad, st.grad),
        direction=jnp.where(accept, direction, st.direction),
        step=jnp.where(accept, jnp.ones_like(st.step), shrunk),
        s=mem_s, y=mem_y, rho=mem_rho,
        num_evals=st.num_evals + 1,
        num_rejected=rejected,
        done=stalled | (rejected >= max_rejected),
    )

  final = lax.while_loop(cond, body, state)
  return final.x, final.value, final.num_evals


# -----------------------------------------------------------------------------
# Models and the shared fitting engine
# -----------------------------------------------------------------------------


class _Model(NamedTuple):
  names: tuple[str, ...]  # natural parameter names, in the order of theta
  grid_names: tuple[str, ...]  # names of the optimised coordinates theta
  is_log: tuple[bool, ...]  # natural = exp(theta) where True
  log_terms: Callable  # (theta, features) -> (num_terms, num_points)
  intercepts: tuple[int, ...]  # the constant parameter of each term
  default_grid: Mapping[str, Sequence[float]]


def _chinchilla_terms(theta, features):
  a, b, e, alpha, beta = theta
  log_n, log_d = features
  return jnp.stack([a - alpha * log_n, b - beta * log_d, jnp.broadcast_to(e, log_n.shape)])


def _sparse_terms(theta, features):
  log_a, b, log_c, d, log_e, f, log_g = theta
  log_density, log_n, log_d = features
  return jnp.stack([
      log_a + b * log_density - d * log_n,
      log_c - d * log_n,
      log_e - f * log_d,
      jnp.broadcast_to(log_g, log_n.shape),
  ])


_CHINCHILLA = _Model(
    names=("A", "B", "E", "alpha", "beta"),
    grid_names=("a", "b", "e", "alpha", "beta"),
    is_log=(True, True, True, False, False),
    log_terms=_chinchilla_terms,
    intercepts=(0, 1, 2),
    default_grid={
        "a": np.arange(0.0, 26.0, 5.0),
        "b": np.arange(0.0, 26.0, 5.0),
        "e": np.arange(-1.0, 1.01, 0.5),
        "alpha": np.arange(0.0, 2.01, 0.5),
        "beta": np.arange(0.0, 2.01, 0.5),
    },
)

_SPARSE = _Model(
    names=("a", "b", "c", "d", "e", "f", "g"),
    grid_names=("log_a", "b", "log_c", "d", "log_e", "f", "log_g"),
    is_log=(True, False, True, False, True, False, True),
    log_terms=_sparse_terms,
    intercepts=(0, 2, 4, 6),
    default_grid={
        "log_a": (0.0, 5.0, 10.0),
        "b": (0.5, 1.5),
        "log_c": (0.0, 5.0, 10.0),
        "d": (0.25, 0.5, 1.0),
        "log_e": (0.0, 5.0, 10.0),
        "f": (0.25, 0.5, 1.0),
        "log_g": (-1.0, 0.0, 1.0),
    },
)


def _grid_starts(model: _Model, grid: Mapping[str, Sequence[float]] | None) -> np.ndarray:
  """Cartesian product of the grid values, (num_starts, P); ``grid`` overrides defaults."""
  grid = dict(grid or {})
  unknown = set(grid) - set(model.grid_names)
  if unknown:
    raise ValueError(
        f"Unknown `grid` keys {sorted(unknown)}; expected some of {list(model.grid_names)}."
    )
  axes = []
  for name in model.grid_names:
    values = np.atleast_1d(np.asarray(grid.get(name, model.default_grid[name]), np.float64))
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
      raise ValueError(f"`grid[{name!r}]` must be a non-empty list of finite numbers.")
    axes.append(values)
  return np.array(list(itertools.product(*axes)))


def _centring(log_terms: Callable, intercepts: tuple[int, ...], features, num_params: int):
  """Matrix U with optimised coordinates phi = (I + U) theta, theta = (I - U) phi.

  Each term's constant absorbs the mean of the term's other parts, e.g.
  a' = a - alpha mean(log N). The objective is the same; L-BFGS (not affine
  invariant) needs far fewer steps because a and alpha are otherwise almost
  collinear (log N spans ~14 to 21 around ~17). U is non-zero only in
  constants' rows and only in non-constants' columns, so U @ U = 0.
  """
  jac = jax.jacfwd(log_terms)(jnp.zeros(num_params, features[0].dtype), features)
  u = jnp.zeros((num_params, num_params), jac.dtype)
  for term, i in enumerate(intercepts):
    u = u.at[i].set(jnp.mean(jac[term], axis=0).at[i].set(0.0))
  return u


@functools.partial(jax.jit, static_argnames=("log_terms", "intercepts"))
def _solve(starts, weights, features, log_loss, delta, max_evals, ftol, *, log_terms, intercepts):
  """L-BFGS from each row of ``starts`` (model parameters theta), vmapped.

  ``weights`` is (num_points,) for all starts or (num_starts, num_points).
  Returns final thetas, objectives, evaluation counts and log residuals.
  """
  eye = jnp.eye(starts.shape[1], dtype=starts.dtype)
  u = _centring(log_terms, intercepts, features, starts.shape[1])
  to_theta = eye - u

  def solve_one(theta0, w):
    def terms(phi):
      return log_terms(to_theta @ phi, features)

    def value_and_grad(phi):
      return _value_and_grad(terms, phi, log_loss, w, delta)

    phi, value, num_evals = _lbfgs(value_and_grad, (eye + u) @ theta0, max_evals, ftol)
    residuals = jax.nn.logsumexp(terms(phi), axis=0) - log_loss
    return to_theta @ phi, value, num_evals, residuals

  return jax.vmap(solve_one, in_axes=(0, None if weights.ndim == 1 else 0))(starts, weights)


class _Solution(NamedTuple):
  theta: np.ndarray  # (P,) parameters of the best fit
  objective: float
  residuals: np.ndarray  # log L-hat - log L
  samples: np.ndarray | None  # (bootstrap, P) parameters of the bootstrap fits


_SCREEN_FTOL = 1e-5  # float32 screen: a start stops when a step gains < 1e-5 relative
_POLISH_EVALS = 2000


def _fit_log_sum_exp(
    model: _Model,
    features: tuple[np.ndarray, ...],
    log_loss: np.ndarray,
    *,
    grid,
    delta: float,
    max_evals: int,
    refine: int,
    bootstrap: int,
    bootstrap_starts: int,
    seed: int,
) -> _Solution:
  """Huber-on-log-L fit from a grid of starts, with optional bootstrap.

  1. Screen: L-BFGS in float32 from every grid start, at most ``max_evals``
     objective evaluations each.
  2. Polish: the ``refine`` screened starts with the lowest objective go on
     in float64 until no step decreases the objective (at most 2000
     evaluations); the lowest objective wins.
  3. Bootstrap: each resample (points drawn with replacement, as integer
     weights) is fitted in float64 from the full-data optimum and the
     ``bootstrap_starts - 1`` grid points whose screened runs ended lowest;
     the lowest objective per resample wins.
  """
  starts = _grid_starts(model, grid)
  n = log_loss.size

  def solve(theta, weights, dtype, max_evals, ftol):
    def cast(x):
      return jnp.asarray(x, dtype)

    out = _solve(
        cast(theta), cast(weights), tuple(map(cast, features)), cast(log_loss), cast(delta),
        jnp.int32(max_evals), cast(ftol), log_terms=model.log_terms, intercepts=model.intercepts,
    )
    return tuple(np.asarray(x, np.float64) for x in out)

  with jax.enable_x64(True):
    theta, value, _, _ = solve(starts, np.ones(n), jnp.float32, max_evals, _SCREEN_FTOL)
    order = np.argsort(np.where(np.isfinite(value), value, np.inf), kind="stable")
    theta, value, evals, residuals = solve(
        theta[order[:refine]], np.ones(n), jnp.float64, _POLISH_EVALS, 0.0
    )
    if not np.any(np.isfinite(value)):
      raise ValueError("The objective is not finite at any start; check the data and `grid`.")
    best = int(np.nanargmin(value))
    if evals[best] >= _POLISH_EVALS:
      warnings.warn(
          "L-BFGS hit its evaluation cap while polishing; the fit may not have converged.",
          stacklevel=4,
      )
    samples = None
    if bootstrap:
      counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=bootstrap)
      boot_starts = np.concatenate([theta[best][None], starts[order[: bootstrap_starts - 1]]])
      k = boot_starts.shape[0]
      samples, value_b, _, _ = solve(
          np.tile(boot_starts, (bootstrap, 1)), np.repeat(counts, k, axis=0),
          jnp.float64, _POLISH_EVALS, 0.0,
      )
      value_b = np.where(np.isfinite(value_b), value_b, np.inf).reshape(bootstrap, k)
      samples = samples.reshape(bootstrap, k, -1)[np.arange(bootstrap), np.argmin(value_b, 1)]
  return _Solution(theta[best], float(value[best]), residuals[best], samples)


def _natural(model: _Model, theta: np.ndarray) -> dict[str, np.ndarray]:
  return {
      name: np.exp(theta[..., i]) if is_log else theta[..., i]
      for i, (name, is_log) in enumerate(zip(model.names, model.is_log, strict=True))
  }


def _intervals(model: _Model, samples: np.ndarray | None):
  """Percentile 95% intervals of the natural parameters over bootstrap fits."""
  if samples is None:
    return None, None
  natural = _natural(model, samples)
  finite = np.all([np.isfinite(v) for v in natural.values()], axis=0)
  if not np.all(finite):
    warnings.warn(
        f"Dropped {np.sum(~finite)} bootstrap fits with non-finite parameters.", stacklevel=4
    )
  natural = {k: v[finite] for k, v in natural.items()}
  intervals = {
      k: tuple(float(q) for q in np.percentile(v, [2.5, 97.5])) for k, v in natural.items()
  }
  return intervals, natural


def _summary(fit, names: Sequence[str]) -> dict[str, float]:
  out = {name: float(getattr(fit, name)) for name in names}
  for name, (lo, hi) in (fit.intervals or {}).items():
    out[f"{name}_lo"], out[f"{name}_hi"] = lo, hi
  out.update(objective=fit.objective, rmse_log=fit.rmse_log, num_points=fit.residuals.size)
  return out


class ScalingFit(NamedTuple):
  """A fitted Chinchilla law L = E + A / N^alpha + B / D^beta.

  ``intervals`` maps each parameter to its percentile-bootstrap 95% interval
  (None without bootstrap); ``samples`` holds the bootstrap fits.
  ``residuals`` are log L-hat - log L on the fitted points, ``rmse_log`` their
  root mean square and ``objective`` the summed Huber loss at the optimum.
  """

  E: float
  A: float
  B: float
  alpha: float
  beta: float
  intervals: dict[str, tuple[float, float]] | None
  residuals: np.ndarray
  rmse_log: float
  objective: float
  samples: dict[str, np.ndarray] | None = None

  def predict(self, N, D) -> np.ndarray:
    """E + A / N^alpha + B / D^beta."""
    N, D = np.asarray(N, np.float64), np.asarray(D, np.float64)
    return self.E + self.A / N**self.alpha + self.B / D**self.beta

  def as_dict(self) -> dict[str, float]:
    """Parameters, interval bounds (``A_lo``, ``A_hi``, ...), objective, rmse_log, num_points."""
    return _summary(self, ("E", "A", "B", "alpha", "beta"))


class SparseScalingFit(NamedTuple):
  """A fitted sparse law L = (a (1 - S)^b + c) N^-d + e D^-f + g; fields as :class:`ScalingFit`."""

  a: float
  b: float
  c: float
  d: float
  e: float
  f: float
  g: float
  intervals: dict[str, tuple[float, float]] | None
  residuals: np.ndarray
  rmse_log: float
  objective: float
  samples: dict[str, np.ndarray] | None = None

  def predict(self, S, N, D) -> np.ndarray:
    """(a (1 - S)^b + c) N^-d + e D^-f + g."""
    S, N, D = (np.asarray(x, np.float64) for x in (S, N, D))
    return (self.a * (1.0 - S) ** self.b + self.c) / N**self.d + self.e / D**self.f + self.g

  def as_dict(self) -> dict[str, float]:
    """Parameters, interval bounds (``a_lo``, ``a_hi``, ...), objective, rmse_log, num_points."""
    return _summary(self, _SPARSE.names)


def _check_fit_options(*, grid, delta, max_evals, refine, bootstrap, bootstrap_starts, seed):
  del grid  # checked by _grid_starts
  if not (isinstance(delta, numbers.Real) and delta > 0 and math.isfinite(delta)):
    raise ValueError(f"`delta` must be a positive number, got {delta!r}.")
  _checks.check_int("max_iter", max_evals, minimum=1)
  _checks.check_int("refine", refine, minimum=1)
  _checks.check_int("bootstrap", bootstrap, minimum=0)
  _checks.check_int("bootstrap_starts", bootstrap_starts, minimum=1)
  _checks.check_int("seed", seed, minimum=0)


def _clean(columns: Mapping[str, object], num_params: int) -> dict[str, np.ndarray]:
  """Host-side checks; rows with a NaN in any column are dropped with a warning."""
  arrays = {name: np.ravel(np.asarray(v, np.float64)) for name, v in columns.items()}
  lengths = {name: a.size for name, a in arrays.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"{_names(arrays)} must have the same length, got {lengths}.")
  nan = np.any([np.isnan(a) for a in arrays.values()], axis=0)
  if np.any(nan):
    rows = np.flatnonzero(nan).tolist()
    warnings.warn(
        f"Dropped {len(rows)} of {nan.size} rows with NaN in {_names(arrays)}: rows {rows}.",
        stacklevel=4,
    )
    arrays = {name: a[~nan] for name, a in arrays.items()}
  for name, a in arrays.items():
    if name == "S":
      bad, rule = ~((a >= 0) & (a < 1)), "in [0, 1)"
    else:
      bad, rule = ~((a > 0) & np.isfinite(a)), "positive and finite"
    if np.any(bad):
      raise ValueError(
          f"`{name}` must be {rule}; rows {np.flatnonzero(bad).tolist()} are not: "
          f"{a[bad].tolist()}."
      )
  n = next(iter(arrays.values())).size
  if n < num_params:
    raise ValueError(
        f"Need at least {num_params} points to fit {num_params} parameters, got {n}"
        f"{' after dropping NaN rows' if np.any(nan) else ''}."
    )
  return arrays


def _names(arrays) -> str:
  names = [f"`{k}`" for k in arrays]
  return ", ".join(names[:-1]) + " and " + names[-1]


def fit(
    N,
    D,
    loss,
    *,
    delta: float = 1e-3,
    grid: Mapping[str, Sequence[float]] | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    max_iter: int = 300,
    refine: int = 32,
    bootstrap_starts: int = 4,
) -> ScalingFit:
  """Fits L(N, D) = E + A / N^alpha + B / D^beta, Hoffmann et al. (2022) approach 3.

  With a = log A, b = log B, e = log E, minimises

  .. math::
      \\sum_i \\mathrm{Huber}_\\delta\\big(\\mathrm{LSE}(a - \\alpha \\log N_i,\\,
      b - \\beta \\log D_i,\\, e) - \\log L_i\\big)

  (summed, :func:`huber_objective`) by L-BFGS from every point of the grid
  alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in
  {0, 5, ..., 25} (4500 starts), vmapped and jitted, keeping the lowest final
  objective. L-BFGS (memory 10, Armijo backtracking, one objective evaluation
  per loop step so that it vmaps; see :func:`_lbfgs`) runs in two passes:

  1. every start in float32, until a step gains less than 1e-5 of the
     objective, 30 trial steps in a row fail, or ``max_iter`` evaluations;
  2. the ``refine`` lowest of those continue in float64 until 30 trial steps
     in a row fail to decrease the objective (at most 2000 evaluations).

  The float32 pass only ranks starts; the reported fit is float64. L-BFGS
  works in centred coordinates (a - alpha mean log N, ...): same objective,
  better conditioned.

  Bootstrap (``bootstrap`` > 0): points are resampled with replacement
  ``bootstrap`` times; each resample is refitted in float64 from the
  full-data optimum and the ``bootstrap_starts - 1`` grid points whose runs
  ended lowest (not the whole grid), and ``intervals`` holds percentile 95%
  intervals. Besiroglu et al. (2024) trace Hoffmann et al.'s poor fit and
  implausibly narrow intervals to an optimiser that stopped before
  convergence because of the loss scale; here the objective is summed and
  every stopping rule is relative to it (no absolute tolerance).

  Args:
    N: parameter counts (for sparse training, :func:`average_param_count`).
    D: training tokens.
    loss: final losses. N, D, loss: positive, same length, >= 5 points; rows
      with a NaN are dropped with a warning.
    delta: Huber threshold on log residuals, > 0.
    grid: overrides for the starting grid, a mapping from any of ``a``,
      ``b``, ``e``, ``alpha``, ``beta`` to the values to try.
    bootstrap: number of bootstrap resamples (0: no intervals).
    seed: seed of the resampling.
    max_iter: objective evaluations per start in the float32 screen.
    refine: how many screened starts are polished in float64.
    bootstrap_starts: starts per bootstrap resample.
  """
  fields = _fit_model(
      _CHINCHILLA, {"N": N, "D": D, "loss": loss},
      lambda data: (np.log(data["N"]), np.log(data["D"])),
      grid=grid, delta=delta, max_evals=max_iter, refine=refine, bootstrap=bootstrap,
      bootstrap_starts=bootstrap_starts, seed=seed,
  )
  return ScalingFit(**fields)


def fit_sparse_form(
    S,
    N,
    D,
    loss,
    *,
    delta: float = 1e-3,
    grid: Mapping[str, Sequence[float]] | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    max_iter: int = 300,
    refine: int = 32,
    bootstrap_starts: int = 4,
) -> SparseScalingFit:
  """Fits the sparse law of Frantar et al. (2023), the form in JaxPruner's scaling notebook.

  .. math::
      L(S, N, D) = \\big(a (1 - S)^b + c\\big) N^{-d} + e D^{-f} + g

  with S the sparsity and N the number of non-zero parameters. a, c, e,
  g > 0 are optimised as logs, b, d, f are free, so that log L-hat is again a
  log-sum-exp of linear terms,

  .. math::
      \\log \\hat L = \\mathrm{LSE}(\\log a + b \\log(1 - S) - d \\log N,\\,
      \\log c - d \\log N,\\, \\log e - f \\log D,\\, \\log g),

  and the method is exactly :func:`fit`'s: summed Huber_delta on log L, L-BFGS
  from a grid (default log a, log c, log e in {0, 5, 10}, b in {0.5, 1.5},
  d, f in {0.25, 0.5, 1}, log g in {-1, 0, 1}: 1458 starts), float32 screen,
  float64 polish, optional bootstrap. a and c are only separately
  identifiable with several sparsities in the data.

  Args:
    S: sparsity of each run, in [0, 1).
    N, D, loss: as in :func:`fit`; >= 7 points.
    grid: overrides, a mapping from any of ``log_a``, ``b``, ``log_c``,
      ``d``, ``log_e``, ``f``, ``log_g`` to the values to try.
    delta, bootstrap, seed, max_iter, refine, bootstrap_starts: as in :func:`fit`.
  """
  fields = _fit_model(
      _SPARSE, {"S": S, "N": N, "D": D, "loss": loss},
      lambda data: (np.log1p(-data["S"]), np.log(data["N"]), np.log(data["D"])),
      grid=grid, delta=delta, max_evals=max_iter, refine=refine, bootstrap=bootstrap,
      bootstrap_starts=bootstrap_starts, seed=seed,
  )
  return SparseScalingFit(**fields)


def _fit_model(model: _Model, columns: Mapping[str, object], features_of: Callable, **options):
  """Checks the input, fits ``model`` and returns the fields of its result."""
  _check_fit_options(**options)
  data = _clean(columns, len(model.names))
  sol = _fit_log_sum_exp(model, features_of(data), np.log(data["loss"]), **options)
  residuals = sol.residuals
  intervals, samples = _intervals(model, sol.samples)
  return dict(
      **{k: float(v) for k, v in _natural(model, sol.theta).items()},
      intervals=intervals,
      residuals=residuals,
      rmse_log=float(np.sqrt(np.mean(residuals**2))),
      objective=sol.objective,
      samples=samples,
  )


# -----------------------------------------------------------------------------
# CSV
# -----------------------------------------------------------------------------

REQUIRED_COLUMNS = ("N", "D", "loss")


def _check_columns(names, source: str) -> None:
  missing = [c for c in REQUIRED_COLUMNS if c not in names]
  if missing:
    raise ValueError(
        f"{source} is missing required column(s) {missing}; it has {list(names)}."
    )


def read_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads scaling-law data: column name -> array.

  Required columns ``N``, ``D``, ``loss`` (numeric); any others (``sparsity``,
  ``N_avg``, ``N_final``, schedule fields, ...) are float64 arrays if every
  non-empty cell parses as a number, else arrays of strings. Empty numeric
  cells become NaN (dropped with a warning by :func:`fit`).
  """
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    names = reader.fieldnames or []
    _check_columns(names, f"CSV file {os.fspath(path)!r}")
    rows = list(reader)
  out = {}
  for name in names:
    cells = [row[name] if row[name] is not None else "" for row in rows]
    try:
      out[name] = np.array([float(c) if c.strip() else np.nan for c in cells], np.float64)
    except ValueError:
      if name in REQUIRED_COLUMNS:
        raise ValueError(f"Column {name!r} of {os.fspath(path)!r} must be numeric.") from None
      out[name] = np.array(cells, dtype=str)
  return out


def write_csv(
    path: str | os.PathLike, rows: Mapping[str, Sequence] | Sequence[Mapping[str, object]]
) -> None:
  """Writes scaling-law data read back exactly by :func:`read_csv`.

  Args:
    path: file to (over)write.
    rows: columns (name -> values, as :func:`read_csv` returns) or records
      (a list of dicts, e.g. one per run; missing cells are left empty). Must
      contain ``N``, ``D`` and ``loss``. Floats are written with ``repr`` (exact
      round trip) and NaN as an empty cell.
  """
  if isinstance(rows, Mapping):
    names = list(rows)
    columns = [list(np.ravel(np.asarray(rows[name], dtype=object))) for name in names]
    lengths = {name: len(c) for name, c in zip(names, columns, strict=True)}
    if len(set(lengths.values())) > 1:
      raise ValueError(f"`rows` columns must have the same length, got {lengths}.")
    records = [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]
  else:
    records = [dict(r) for r in rows]
    names = list(dict.fromkeys(k for r in records for k in r))
  _check_columns(names, "`rows`")
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=names)
    writer.writeheader()
    for record in records:
      writer.writerow({k: _cell(v) for k, v in record.items()})


def _cell(value) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, (bool, np.bool_)):
    return str(bool(value))
  if isinstance(value, numbers.Integral):
    return str(int(value))
  if isinstance(value, numbers.Real):
    return "" if math.isnan(value) else repr(float(value))
  return str(value)
