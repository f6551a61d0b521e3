"""The fitting engine of the scaling laws: Huber on log L, multi-start L-BFGS, bootstrap.

A scaling law whose prediction is a sum of positive power-law terms,
:math:`\\hat L = \\sum_k \\exp(\\tau_k(\\theta))` with each :math:`\\tau_k` linear in the
parameters :math:`\\theta`, is fitted as Hoffmann et al. (2022) fit the Chinchilla law
(approach 3): minimise

.. math::
    \\sum_i w_i\\, \\mathrm{Huber}_\\delta\\big(\\mathrm{LSE}_k\\, \\tau_{ik}(\\theta)
    - \\log L_i\\big)

by L-BFGS from every point of a grid of starts and keep the lowest, as re-examined by
Besiroglu et al. (2024), "Chinchilla Scaling: A replication attempt". Here the starts are
vmapped and jitted (thousands at once), and percentile-bootstrap intervals come from refits
on resampled points. :mod:`jaxprune.scaling` defines the laws (a :class:`LogSumExpModel`
each) on top of this module.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import _checks

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


def value_and_grad(log_terms: Callable, theta, log_loss, weights, delta):
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


def lbfgs_armijo(value_and_grad, x0, max_evals, ftol, *, memory=10, c1=1e-4, max_rejected=30):
  """Minimises with L-BFGS and a backtracking (Armijo) line search.

  Each loop iteration makes exactly one objective evaluation: a trial step t
  along the L-BFGS direction is accepted if f(x + t d) <= f(x) + c1 t g.d,
  else t shrinks by safeguarded quadratic interpolation (to [0.1 t, 0.5 t]).
  A pair (s, y) enters the memory only if s.y > eps |s| |y|. Stops after
  ``max_evals`` evaluations, when an accepted step decreases f by at most
  ``ftol * f``, or after ``max_rejected`` rejected trials in a row (no
  decrease possible at this precision).

  Why not ``optax.lbfgs``: its zoom line search (strong Wolfe) is a nested
  while loop, so under vmap every outer step waits for the slowest start's
  line search. Measured with ``scripts/bench_scaling_fit.py`` (screen of the
  whole grid + float64 polish, no bootstrap; process CPU seconds of a second,
  warm run unless marked cold; 2 shared x86-64 cores, load ~12, jax 0.10.2,
  optax 0.2.8), the final objectives agree to 12 significant digits:

  ==========================  =========  ==========  =======  =======
  fit (points)                ours vmap  optax vmap  ours    optax
                                                     lax.map lax.map
  ==========================  =========  ==========  =======  =======
  Epoch AI Chinchilla (240)   4.1        156.9       1.2      2.8
  sweep, N = N_avg (53)       5.2 cold   57.0 cold   1.3      5.8
  sweep, N = N_final (53)     1.5        40.7        1.2      4.2
  sweep, sparse law (53)      5.1 cold   28.6 cold   1.0      2.9
  ==========================  =========  ==========  =======  =======

  so this loop is 6x to 38x faster under vmap and 2.3x to 4.5x faster one
  start after another (``jax.lax.map``), at equal objective. (On these CPUs
  our loop one start at a time is as fast as vmapped or faster; the engine
  vmaps, which is what an accelerator wants.)

  Returns the final x, f(x) and the number of evaluations.
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
# Models, starts, and the vmapped solve
# -----------------------------------------------------------------------------


class LogSumExpModel(NamedTuple):
  """A law with log L-hat = LSE_k(log_terms(theta, features)_k), each term linear in theta.

  ``names`` are the natural parameters, in the order of theta; the optimiser sees
  ``grid_names`` (log of those with ``is_log``). ``intercepts`` holds, per term, the index
  of its constant; ``default_grid`` the starting values of each optimised coordinate.
  """

  names: tuple[str, ...]
  grid_names: tuple[str, ...]
  is_log: tuple[bool, ...]
  log_terms: Callable  # (theta, features) -> (num_terms, num_points)
  intercepts: tuple[int, ...]
  default_grid: Mapping[str, Sequence[float]]


def grid_starts(model: LogSumExpModel, grid: Mapping[str, Sequence[float]] | None) -> np.ndarray:
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


@functools.partial(jax.jit, static_argnames=("log_terms", "intercepts", "minimize", "batch"))
def _solve(starts, weights, features, log_loss, delta, max_evals, ftol, *, log_terms,
           intercepts, minimize, batch=None):
  """``minimize`` from each row of ``starts`` (model parameters theta).

  ``weights`` is (num_points,) for all starts or (num_starts, num_points).
  ``batch`` None vmaps over the starts; an int runs them ``batch`` at a time
  (``jax.lax.map``). Returns final thetas, objectives, evaluation counts and
  log residuals.
  """
  eye = jnp.eye(starts.shape[1], dtype=starts.dtype)
  u = _centring(log_terms, intercepts, features, starts.shape[1])
  to_theta = eye - u

  def solve_one(theta0, w):
    def terms(phi):
      return log_terms(to_theta @ phi, features)

    def objective(phi):
      return value_and_grad(terms, phi, log_loss, w, delta)

    phi, value, num_evals = minimize(objective, (eye + u) @ theta0, max_evals, ftol)
    residuals = jax.nn.logsumexp(terms(phi), axis=0) - log_loss
    return to_theta @ phi, value, num_evals, residuals

  if batch is None:
    return jax.vmap(solve_one, in_axes=(0, None if weights.ndim == 1 else 0))(starts, weights)
  if weights.ndim == 1:
    weights = jnp.broadcast_to(weights, (starts.shape[0], weights.size))
  return lax.map(lambda sw: solve_one(*sw), (starts, weights), batch_size=batch)


class Solution(NamedTuple):
  """The result of :func:`fit_log_sum_exp`."""

  theta: np.ndarray  # (P,) parameters of the best fit
  objective: float
  residuals: np.ndarray  # log L-hat - log L
  samples: np.ndarray | None  # (bootstrap, P) parameters of the bootstrap fits


SCREEN_FTOL = 1e-5  # float32 screen: a start stops when a step gains < 1e-5 relative
POLISH_EVALS = 2000


def fit_log_sum_exp(
    model: LogSumExpModel,
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
    minimize: Callable = lbfgs_armijo,
    batch: int | None = None,
) -> Solution:
  """Huber-on-log-L fit from a grid of starts, with optional bootstrap.

  1. Screen: L-BFGS in float32 from every grid start, at most ``max_evals``
     objective evaluations each, until a step gains less than 1e-5 of the
     objective.
  2. Polish: the ``refine`` screened starts with the lowest objective go on
     in float64 until no step decreases the objective (at most 2000
     evaluations); the lowest objective wins.
  3. Bootstrap: each resample (points drawn with replacement, as integer
     weights) is fitted in float64 from the full-data optimum and the
     ``bootstrap_starts - 1`` grid points whose screened runs ended lowest;
     the lowest objective per resample wins.

  L-BFGS works in centred coordinates (:func:`_centring`). Warns if the best
  polished start hit the evaluation cap. ``minimize`` (a function like
  :func:`lbfgs_armijo`) and ``batch`` (None: vmap the starts; k: run them k at
  a time) are for ``scripts/bench_scaling_fit.py``, which compares minimisers.
  """
  starts = grid_starts(model, grid)
  n = log_loss.size

  def solve(theta, weights, dtype, max_evals, ftol):
    def cast(x):
      return jnp.asarray(x, dtype)

    out = _solve(
        cast(theta), cast(weights), tuple(map(cast, features)), cast(log_loss), cast(delta),
        jnp.int32(max_evals), cast(ftol), log_terms=model.log_terms, intercepts=model.intercepts,
        minimize=minimize, batch=batch,
    )
    return tuple(np.asarray(x, np.float64) for x in out)

  with jax.enable_x64(True):
    theta, value, _, _ = solve(starts, np.ones(n), jnp.float32, max_evals, SCREEN_FTOL)
    order = np.argsort(np.where(np.isfinite(value), value, np.inf), kind="stable")
    theta, value, evals, residuals = solve(
        theta[order[:refine]], np.ones(n), jnp.float64, POLISH_EVALS, 0.0
    )
    if not np.any(np.isfinite(value)):
      raise ValueError("The objective is not finite at any start; check the data and `grid`.")
    best = int(np.nanargmin(value))
    if evals[best] >= POLISH_EVALS:
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
          jnp.float64, POLISH_EVALS, 0.0,
      )
      value_b = np.where(np.isfinite(value_b), value_b, np.inf).reshape(bootstrap, k)
      samples = samples.reshape(bootstrap, k, -1)[np.arange(bootstrap), np.argmin(value_b, 1)]
  return Solution(theta[best], float(value[best]), residuals[best], samples)


# -----------------------------------------------------------------------------
# From a solution to a result: natural parameters, intervals, input checks
# -----------------------------------------------------------------------------


def natural(model: LogSumExpModel, theta: np.ndarray) -> dict[str, np.ndarray]:
  """The model's parameters by name: exp of the log-parametrised coordinates."""
  return {
      name: np.exp(theta[..., i]) if is_log else theta[..., i]
      for i, (name, is_log) in enumerate(zip(model.names, model.is_log, strict=True))
  }


def intervals(model: LogSumExpModel, samples: np.ndarray | None):
  """Percentile 95% intervals of the natural parameters over bootstrap fits, and the fits.

  Bootstrap fits with a non-finite parameter are dropped with a warning.
  """
  if samples is None:
    return None, None
  values = natural(model, samples)
  finite = np.all([np.isfinite(v) for v in values.values()], axis=0)
  if not np.all(finite):
    warnings.warn(
        f"Dropped {np.sum(~finite)} bootstrap fits with non-finite parameters.", stacklevel=4
    )
  values = {k: v[finite] for k, v in values.items()}
  bounds = {
      k: tuple(float(q) for q in np.percentile(v, [2.5, 97.5])) for k, v in values.items()
  }
  return bounds, values


def check_fit_options(*, grid, delta, max_evals, refine, bootstrap, bootstrap_starts, seed):
  """Raises a ValueError naming the first bad option (``grid`` is checked by grid_starts)."""
  del grid
  if not (isinstance(delta, numbers.Real) and delta > 0 and math.isfinite(delta)):
    raise ValueError(f"`delta` must be a positive number, got {delta!r}.")
  _checks.check_int("max_iter", max_evals, minimum=1)
  _checks.check_int("refine", refine, minimum=1)
  _checks.check_int("bootstrap", bootstrap, minimum=0)
  _checks.check_int("bootstrap_starts", bootstrap_starts, minimum=1)
  _checks.check_int("seed", seed, minimum=0)


def clean(columns: Mapping[str, object], num_params: int) -> dict[str, np.ndarray]:
  """Host-side checks; rows with a NaN in any column are dropped with a warning.

  ``S`` must be in [0, 1), every other column positive and finite; at least
  ``num_params`` rows must remain.
  """
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
