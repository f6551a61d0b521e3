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
(2023), "Scaling Laws for Sparsely-Connected Foundation Models". Both laws
are a log-sum-exp of terms linear in the parameters and share one fitting
engine, :mod:`jaxprune.huber_fit`; :func:`degeneracies` says when a fit is
not a result.

:func:`read_csv` and :func:`write_csv` (:mod:`jaxprune.scaling_csv`) move the
data (columns ``N``, ``D``, ``loss`` and anything else, e.g. ``sparsity``,
``N_avg``, schedule fields).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxprune import _checks, huber_fit, schedules
from jaxprune.huber_fit import huber_objective
from jaxprune.scaling_csv import REQUIRED_COLUMNS, read_csv, write_csv

__all__ = [
    "CHINCHILLA", "INTERVAL_FACTOR", "REQUIRED_COLUMNS", "SPARSE", "ScalingFit", "SparseScalingFit",
    "average_param_count", "degeneracies", "fit", "fit_sparse_form", "huber_objective",
    "read_csv", "write_csv",
]

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

  What is counted: ``fixed_params`` (at every step) plus the unpruned entries
  of the ``prunable_sizes`` layers, one count per optimizer step
  :math:`t = 0, \\dots, T - 1` (the parameters step :math:`t` produces, its mask
  included), averaged with equal weights: an average over tokens when every
  step sees as many tokens, as in :func:`jaxprune.train.train`. The caller
  picks the parameters: ``scripts/sweep.py`` passes them all (its ``N_avg``
  includes embeddings, the output head, norms, biases); ``fixed_params=0``
  counts the prunable kernels only.

  Jin et al. (2025), "The Journey Matters", define
  :math:`N_{avg} = \\frac{1}{D} \\int_0^D N(d)\\, \\mathrm{d}d` over tokens, the
  same average for a constant batch. Their code (tjingrant/sparse-llm-code,
  ``MaxText/train.py``, ``max_utils.py``) logs after each step the mask sum
  of every ``DenseGeneral`` kernel (``pruning/nonzero_prunable``: attention,
  MLP and the output head ``logits_dense``; the token embedding is never
  pruned) and, apart, the total parameter count; the average is taken outside
  that code, and the paper describes models by their "prunable parameters in
  the linear layers". So this repository's sweep differs twice: its
  ``N_avg`` adds the unpruned parameters (embeddings, norms), and its default
  selection (:func:`jaxprune.select`) keeps the output head dense. Their
  pruning keeps ``int(keep * n)`` weights under one global threshold (floor,
  pooled over kernels), not a per-layer round half to even: pass the pooled
  size as one layer to count it so (at most one parameter per layer and step
  apart).

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
# The laws
# -----------------------------------------------------------------------------


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


CHINCHILLA = huber_fit.LogSumExpModel(
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

SPARSE = huber_fit.LogSumExpModel(
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


def _summary(fit, names: Sequence[str]) -> dict[str, float]:
  out = {name: float(getattr(fit, name)) for name in names}
  for name, (lo, hi) in (fit.intervals or {}).items():
    out[f"{name}_lo"], out[f"{name}_hi"] = lo, hi
  out.update(objective=fit.objective, rmse_log=fit.rmse_log, num_points=fit.residuals.size)
  return out


def _log_coefficient(fit, model: huber_fit.LogSumExpModel, name: str) -> np.ndarray:
  """``log`` of a log-parametrised coefficient: ``log(value)`` while the value is a finite
  positive float, else the fitted log itself (``fit.theta``), which a degenerate fit can take
  past float64's range (``exp`` overflows to inf) while its predictions stay finite."""
  value = np.float64(getattr(fit, name))
  if (not np.isfinite(value) or value <= 0) and fit.theta is not None:
    return np.float64(fit.theta[model.names.index(name)])
  with np.errstate(divide="ignore"):
    return np.log(value)


def _exp_sum(log_terms) -> np.ndarray:
  """``sum_k exp(log_terms[k])`` without overflow in the intermediate terms."""
  return np.exp(functools.reduce(np.logaddexp, log_terms))


class ScalingFit(NamedTuple):
  """A fitted Chinchilla law L = E + A / N^alpha + B / D^beta.

  ``intervals`` maps each parameter to its percentile-bootstrap 95% interval
  (None without bootstrap); ``samples`` holds the bootstrap fits.
  ``residuals`` are log L-hat - log L on the fitted points, ``rmse_log`` their
  root mean square and ``objective`` the summed Huber loss at the optimum.
  ``theta`` is the optimum as fitted, ``(log A, log B, log E, alpha, beta)``:
  predictions are computed in log space from it where a coefficient overflowed
  (a degenerate fit, e.g. ``B = inf`` with ``beta = 170``), and from the fields
  otherwise (so that ``_replace`` of a field changes the predictions).
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
  theta: np.ndarray | None = None

  def _log_terms(self, N, D) -> dict[str, np.ndarray]:
    log_n, log_d = np.log(np.asarray(N, np.float64)), np.log(np.asarray(D, np.float64))
    shape = np.broadcast_shapes(log_n.shape, log_d.shape)
    log = functools.partial(_log_coefficient, self, CHINCHILLA)
    return {"A / N^alpha": np.broadcast_to(log("A") - self.alpha * log_n, shape),
            "B / D^beta": np.broadcast_to(log("B") - self.beta * log_d, shape),
            "E": np.full(shape, log("E"))}

  def predict(self, N, D) -> np.ndarray:
    """E + A / N^alpha + B / D^beta, summed in log space."""
    return _exp_sum(list(self._log_terms(N, D).values()))

  def terms(self, N, D) -> dict[str, np.ndarray]:
    """The three terms of the law, by name, at each point."""
    return {k: np.exp(v) for k, v in self._log_terms(N, D).items()}

  def as_dict(self) -> dict[str, float]:
    """Parameters, interval bounds (``A_lo``, ``A_hi``, ...), objective, rmse_log, num_points."""
    return _summary(self, ("E", "A", "B", "alpha", "beta"))


class SparseScalingFit(NamedTuple):
  """A fitted sparse law L = (a (1 - S)^b + c) N^-d + e D^-f + g; fields as :class:`ScalingFit`
  (``theta``: ``(log a, b, log c, d, log e, f, log g)``)."""

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
  theta: np.ndarray | None = None

  def _log_terms(self, S, N, D) -> dict[str, np.ndarray]:
    S, N, D = (np.asarray(x, np.float64) for x in (S, N, D))
    shape = np.broadcast_shapes(S.shape, N.shape, D.shape)
    log = functools.partial(_log_coefficient, self, SPARSE)
    with np.errstate(divide="ignore"):
      log_density = np.log1p(-S)
    size = -self.d * np.log(N)
    return {"a (1 - S)^b / N^d": np.broadcast_to(log("a") + self.b * log_density + size, shape),
            "c / N^d": np.broadcast_to(log("c") + size, shape),
            "e / D^f": np.broadcast_to(log("e") - self.f * np.log(D), shape),
            "g": np.full(shape, log("g"))}

  def predict(self, S, N, D) -> np.ndarray:
    """(a (1 - S)^b + c) N^-d + e D^-f + g, summed in log space."""
    return _exp_sum(list(self._log_terms(S, N, D).values()))

  def terms(self, S, N, D) -> dict[str, np.ndarray]:
    """The four terms of the law, by name, at each point."""
    return {k: np.exp(v) for k, v in self._log_terms(S, N, D).items()}

  def as_dict(self) -> dict[str, float]:
    """Parameters, interval bounds (``a_lo``, ``a_hi``, ...), objective, rmse_log, num_points."""
    return _summary(self, SPARSE.names)


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
  per loop step so that it vmaps; see :func:`jaxprune.huber_fit.lbfgs_armijo`) runs in two
  passes:

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
      CHINCHILLA, {"N": N, "D": D, "loss": loss},
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
      SPARSE, {"S": S, "N": N, "D": D, "loss": loss},
      lambda data: (np.log1p(-data["S"]), np.log(data["N"]), np.log(data["D"])),
      grid=grid, delta=delta, max_evals=max_iter, refine=refine, bootstrap=bootstrap,
      bootstrap_starts=bootstrap_starts, seed=seed,
  )
  return SparseScalingFit(**fields)


def _fit_model(
    model: huber_fit.LogSumExpModel, columns: Mapping[str, object], features_of: Callable,
    **options,
):
  """Checks the input, fits ``model`` and returns the fields of its result."""
  huber_fit.check_fit_options(**options)
  data = huber_fit.clean(columns, len(model.names))
  sol = huber_fit.fit_log_sum_exp(model, features_of(data), np.log(data["loss"]), **options)
  residuals = sol.residuals
  intervals, samples = huber_fit.intervals(model, sol.samples)
  return dict(
      **{k: float(v) for k, v in huber_fit.natural(model, sol.theta).items()},
      intervals=intervals,
      residuals=residuals,
      rmse_log=float(np.sqrt(np.mean(residuals**2))),
      objective=sol.objective,
      samples=samples,
      theta=np.asarray(sol.theta, np.float64),
  )


# -----------------------------------------------------------------------------
# When a fit is not a result
# -----------------------------------------------------------------------------

INTERVAL_FACTOR = 100.0  # a 95% interval with hi / lo above this does not measure the parameter
NEGLIGIBLE_TERM = 1e-3  # a term below this fraction of every predicted loss has left the law
_EXPONENTS = {ScalingFit: ("alpha", "beta"), SparseScalingFit: ("d", "f")}


def degeneracies(
    fit: ScalingFit | SparseScalingFit,
    *points,
    interval_factor: float = INTERVAL_FACTOR,
    negligible: float = NEGLIGIBLE_TERM,
) -> list[str]:
  """Why a fit is degenerate, one sentence per reason; empty when it is not.

  A degenerate fit describes the data but does not measure the law: show it,
  never report its coefficients (or a comparison resting on them) as a result.
  The rules, with ``points`` the fitted inputs, ``(N, D)`` for :class:`ScalingFit`
  and ``(S, N, D)`` for :class:`SparseScalingFit`:

  1. a term at its bound 0: the constants (A, B, E; a, c, e, g) are positive and
     fitted as logs, so a term whose largest value over the points is below
     ``negligible`` times the smallest predicted loss has had its log driven
     towards minus infinity: the law has lost that term (e.g. E = 2e-14);
  2. a power-law exponent (alpha, beta; d, f) at or below its bound 0: the term
     no longer falls with N or D;
  3. a 95% bootstrap interval that does not pin a parameter down: it holds both
     signs (lo <= 0 < hi), or hi / lo > ``interval_factor`` (default 100: two
     orders of magnitude. On the 240 Chinchilla points of Besiroglu et al.
     (2024), :func:`fit` with 200 resamples gives A in [290, 684] (2.4x) and
     B in [1079, 6336] (5.9x), and no rule fires);
  4. a non-finite parameter or prediction (an overflow).

  Warnings raised while fitting (overflow, bootstrap fits dropped, evaluation
  cap) are the caller's to catch; ``scripts/fit_scaling_law.py`` adds them.
  """
  names = SPARSE.names if isinstance(fit, SparseScalingFit) else CHINCHILLA.names
  reasons = []
  values = {name: float(getattr(fit, name)) for name in names}
  bad = [name for name, v in values.items() if not np.isfinite(v)]
  if bad:
    reasons.append(f"non-finite {', '.join(bad)} (overflow)")
    return reasons
  with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
    terms = fit.terms(*points)
    predicted = fit.predict(*points)
  if not np.all(np.isfinite(predicted)):
    reasons.append("non-finite predicted loss at some points (overflow)")
    return reasons
  floor = negligible * float(np.min(predicted))
  for term, value in terms.items():
    if float(np.max(value)) < floor:
      reasons.append(f"term {term} at its bound 0 (at most {float(np.max(value)):.3g}, "
                     f"under {negligible:g} of the loss)")
  for name in _EXPONENTS[type(fit)]:
    if values[name] <= 0:
      reasons.append(f"exponent {name} = {values[name]:.3g} at or below its bound 0")
  for name, (lo, hi) in (fit.intervals or {}).items():
    if not (np.isfinite(lo) and np.isfinite(hi)):
      reasons.append(f"{name} interval [{lo:.3g}, {hi:.3g}] is not finite")
    elif lo <= 0 < hi:
      reasons.append(f"{name} interval [{lo:.3g}, {hi:.3g}] holds both signs")
    elif lo > 0 and hi / lo > interval_factor:
      reasons.append(f"{name} interval [{lo:.3g}, {hi:.3g}] spans {hi / lo:.4g}x "
                     f"(> {interval_factor:g}x)")
  return reasons
