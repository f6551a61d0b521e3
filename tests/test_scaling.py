"""Scaling laws: average parameter count, Huber objective, fits, bootstrap, CSV, errors.

Chinchilla fits share one data shape (100 points, default grid) so that the
jitted solver compiles once per stage for the whole file.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import huber_fit, scaling, schedules

TRUE = dict(E=1.82, A=482.0, B=2085.0, alpha=0.348, beta=0.366)  # Besiroglu et al. (2024)
SPARSE_TRUE = dict(a=300.0, b=1.0, c=182.0, d=0.348, e=2085.0, f=0.366, g=1.82)


def chinchilla_data(noise, seed=0):
  N, D = (x.ravel() for x in np.meshgrid(np.geomspace(1e6, 1e9, 10), np.geomspace(1e8, 1e11, 10)))
  loss = TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"]
  return N, D, loss * np.exp(noise * np.random.default_rng(seed).standard_normal(loss.shape))


def sparse_data(noise, seed=0):
  grids = ([0.0, 0.5, 0.75, 0.875], np.geomspace(1e6, 1e9, 5), np.geomspace(1e8, 1e11, 5))
  S, N, D = (x.ravel() for x in np.meshgrid(*grids, indexing="ij"))
  t = SPARSE_TRUE
  loss = (t["a"] * (1 - S) ** t["b"] + t["c"]) / N ** t["d"] + t["e"] / D ** t["f"] + t["g"]
  return S, N, D, loss * np.exp(noise * np.random.default_rng(seed).standard_normal(loss.shape))


def relative_errors(fit, true):
  return {k: abs(getattr(fit, k) / v - 1) for k, v in true.items()}


# --- average_param_count -------------------------------------------------------


def test_average_param_count_one_shot_by_hand():
  # Layers of 10 and 7, pruned to 50% at step 2 of 4; 3 fixed parameters.
  # Steps 0, 1: 3 + 17 = 20. Steps 2, 3: 3 + (10 - 5) + (7 - round(3.5) = 3) = 11
  # (round half to even). Mean: (20 + 20 + 11 + 11) / 4 = 15.5.
  sched = schedules.one_shot_schedule(0.5, step=2)
  assert scaling.average_param_count(4, [10, 7], schedule=sched, fixed_params=3) == 15.5
  per_step = [0.0, 0.0, 0.5, 0.5]
  assert scaling.average_param_count(4, [10, 7], sparsity_per_step=per_step, fixed_params=3) == 15.5


def test_average_param_count_uses_realised_integer_counts():
  # 3 weights at 50%: round(1.5) = 2 pruned, 1 kept, not the continuous 1.5.
  assert scaling.average_param_count(2, 3, sparsity_per_step=[0.5, 0.5]) == 1.0


def test_average_param_count_per_layer_targets():
  # Layer 0 (size 10) at 0.2 from step 1, layer 1 (size 4) at 0.5 from step 2, 3 steps:
  # layer 0 keeps 10, 8, 8; layer 1 keeps 4, 4, 2 -> (14 + 12 + 10) / 3 = 12.
  targets = np.array([[0.0, 0.0], [0.2, 0.0], [0.2, 0.5]])
  assert scaling.average_param_count(3, [10, 4], sparsity_per_step=targets) == 12.0
  scheds = [schedules.one_shot_schedule(0.2, 1), schedules.one_shot_schedule(0.5, 2)]
  assert scaling.average_param_count(3, [10, 4], schedule=scheds) == 12.0


@pytest.mark.parametrize("final", [0.75, 0.9, 0.97])
def test_average_param_count_is_what_magnitude_pruning_keeps(final):
  # Sizes where final * n is not an integer: the transform prunes
  # round(s_t / s_f * round(s_f n)), not round(s_t n), during the ramp.
  import jax
  import optax

  import jaxprune

  sizes, steps = [37 * 11, 101 * 3, 64 * 7], 30
  params = {f"l{i}": jax.random.normal(jax.random.key(i), (n // s, s))
            for i, (n, s) in enumerate(zip(sizes, (11, 3, 7), strict=True))}
  sched = schedules.polynomial_schedule(0.0, final, 3, 24, frequency=2)
  tx = jaxprune.magnitude_pruning(optax.sgd(0.0), sched, select=".")
  state, update, kept = tx.init(params), jax.jit(tx.update), 0
  for _ in range(steps):
    _, state = update(jax.tree.map(np.zeros_like, params), state, params)
    kept += sum(int(m.sum()) for m in jax.tree.leaves(state.masks))
  assert scaling.average_param_count(steps, sizes, schedule=sched) == kept / steps


@pytest.mark.parametrize("final", [0.5, 0.8, 0.9])
def test_cubic_ramp_over_middle_half_has_mean_sparsity_0625_final(final):
  T, size = 1000, 1_000_000
  sched = schedules.polynomial_schedule(0.0, final, T // 4, 3 * T // 4)
  mean_sparsity = 1 - scaling.average_param_count(T, size, schedule=sched) / size
  assert mean_sparsity == pytest.approx(0.625 * final, rel=1e-3)
  # The discrete sum: (sum_{j=0}^{500} (1 - (1 - j/500)^3) + 249) / 1000 = 0.6244995,
  # up to float32 schedule values and per-step rounding of 1e6 * s (<= 5e-7).
  assert mean_sparsity == pytest.approx(0.6244995 * final, abs=2e-6)


def test_average_param_count_errors():
  sched = schedules.constant_schedule(0.5)
  with pytest.raises(ValueError, match="exactly one of `schedule` and `sparsity_per_step`"):
    scaling.average_param_count(4, [10], schedule=sched, sparsity_per_step=[0.5] * 4)
  with pytest.raises(ValueError, match="exactly one"):
    scaling.average_param_count(4, [10])
  with pytest.raises(ValueError, match=r"shape \(4,\) or \(4, 2\)"):
    scaling.average_param_count(4, [10, 5], sparsity_per_step=[0.5] * 3)
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    scaling.average_param_count(2, [10], sparsity_per_step=[0.5, 1.5])
  with pytest.raises(ValueError, match="`prunable_sizes` must be non-negative integers"):
    scaling.average_param_count(2, [10, -1], schedule=sched)
  with pytest.raises(ValueError, match="2 schedules for 1"):
    scaling.average_param_count(2, [10], schedule=[sched, sched])
  with pytest.raises(ValueError, match="`num_steps` must be >= 1"):
    scaling.average_param_count(0, [10], schedule=sched)


# --- objective -----------------------------------------------------------------


def test_huber_objective_by_hand():
  # Log residuals 5e-4 (quadratic: 0.5 * 2.5e-7 = 1.25e-7), -2e-3 (linear:
  # 1e-3 * (2e-3 - 5e-4) = 1.5e-6) and 0: 1.625e-6 in total.
  loss = np.array([2.0, 3.0, 4.0])
  predicted = loss * np.exp([5e-4, -2e-3, 0.0])
  assert scaling.huber_objective(predicted, loss) == pytest.approx(1.625e-6, rel=1e-9)
  # delta = 1e-2: all quadratic, 0.5 * (2.5e-7 + 4e-6) = 2.125e-6.
  assert scaling.huber_objective(predicted, loss, delta=1e-2) == pytest.approx(2.125e-6, rel=1e-9)
  # Weights are bootstrap counts.
  assert scaling.huber_objective(predicted, loss, weights=[2, 0, 1]) == pytest.approx(2.5e-7)


def test_solver_gradient_matches_autodiff():
  rng = np.random.default_rng(0)
  N, D, loss = chinchilla_data(1e-3)
  features, log_loss = (np.log(N), np.log(D)), np.log(loss)
  weights = rng.integers(0, 3, N.size).astype(float)

  def naive(theta):
    log_pred = jax.nn.logsumexp(scaling.CHINCHILLA.log_terms(theta, features), axis=0)
    r = log_pred - log_loss
    return jnp.sum(weights * jnp.where(jnp.abs(r) <= 1e-3, r**2 / 2, 1e-3 * (jnp.abs(r) - 5e-4)))

  @jax.jit
  def handwritten(theta):
    terms = lambda t: scaling.CHINCHILLA.log_terms(t, features)  # noqa: E731
    return huber_fit.value_and_grad(terms, theta, log_loss, weights, 1e-3)

  with jax.enable_x64(True):
    # Far from the fit (all points on the linear Huber branch) and near it (about half quadratic).
    for theta in ([6.0, 7.5, 0.6, 0.35, 0.37], [6.18, 7.64, 0.6, 0.348, 0.366]):
      value, grad = handwritten(jnp.asarray(theta))
      expected_value, expected_grad = jax.jit(jax.value_and_grad(naive))(jnp.asarray(theta))
      np.testing.assert_allclose(value, expected_value, rtol=1e-12)
      np.testing.assert_allclose(grad, expected_grad, rtol=1e-9, atol=1e-15)


# --- Chinchilla fit -------------------------------------------------------------


def test_fit_recovers_noise_free_parameters():
  fit = scaling.fit(*chinchilla_data(0.0))
  assert max(relative_errors(fit, TRUE).values()) < 1e-6
  assert fit.rmse_log < 1e-8


@pytest.mark.slow
def test_fit_from_a_single_start():
  # A one-point grid (overriding every default) still converges to the optimum.
  grid = {"a": [5.0], "b": [5.0], "e": [0.0], "alpha": [0.5], "beta": [0.5]}
  fit = scaling.fit(*chinchilla_data(0.0), grid=grid)
  assert max(relative_errors(fit, TRUE).values()) < 1e-6


def test_fit_known_answer_with_noise():
  N, D, loss = chinchilla_data(1e-3)
  fit = scaling.fit(N, D, loss)
  err = relative_errors(fit, TRUE)
  # 0.1% noise on 100 points: E, alpha, beta to 1%; A and B (sampling sd ~1%,
  # bootstrap intervals +-3% for B) to 2.5%.
  assert max(err["E"], err["alpha"], err["beta"]) < 0.01, err
  assert max(err["A"], err["B"]) < 0.025, err
  assert fit.rmse_log == pytest.approx(1e-3, rel=0.2)
  # The reported objective and residuals are those of the reported parameters.
  np.testing.assert_allclose(fit.residuals, np.log(fit.predict(N, D)) - np.log(loss), atol=1e-12)
  assert fit.objective == pytest.approx(scaling.huber_objective(fit.predict(N, D), loss), rel=1e-9)
  # The true parameters score worse than the fit (it is a minimum).
  true_fit = fit._replace(**TRUE)
  assert fit.objective <= scaling.huber_objective(true_fit.predict(N, D), loss)


@pytest.mark.slow
def test_fit_bootstrap_intervals_contain_truth():
  fit = scaling.fit(*chinchilla_data(1e-3), bootstrap=200, seed=0)
  assert set(fit.intervals) == set(TRUE)
  for name, true in TRUE.items():
    lo, hi = fit.intervals[name]
    assert lo < getattr(fit, name) < hi, name
    assert lo < true < hi, (name, lo, true, hi)
    assert hi / lo - 1 < 0.1, name  # informative, not vacuous
    assert fit.samples[name].shape == (200,)
  out = fit.as_dict()
  assert out["alpha_lo"] == fit.intervals["alpha"][0] and out["num_points"] == 100


def test_fit_drops_nan_rows_with_a_warning():
  N, D, loss = chinchilla_data(1e-3)
  N_nan, D_nan, loss_nan = np.insert(N, 3, np.nan), np.insert(D, 3, 1e9), np.insert(loss, 3, 2.0)
  N_nan, D_nan, loss_nan = np.append(N_nan, 1e7), np.append(D_nan, 1e9), np.append(loss_nan, np.nan)
  with pytest.warns(UserWarning, match=r"Dropped 2 of 102 rows with NaN .*rows \[3, 101\]"):
    fit = scaling.fit(N_nan, D_nan, loss_nan)
  reference = scaling.fit(N, D, loss)
  assert fit.as_dict() == reference.as_dict()


# --- sparse form ----------------------------------------------------------------


def test_fit_sparse_form_recovers_parameters():
  fit = scaling.fit_sparse_form(*sparse_data(0.0))
  assert max(relative_errors(fit, SPARSE_TRUE).values()) < 1e-6
  S, N, D, loss = sparse_data(1e-3)
  fit = scaling.fit_sparse_form(S, N, D, loss)
  err = relative_errors(fit, SPARSE_TRUE)
  assert max(err.values()) < 0.05, err
  np.testing.assert_allclose(fit.residuals, np.log(fit.predict(S, N, D) / loss), atol=1e-12)
  assert set(fit.as_dict()) >= set(SPARSE_TRUE) | {"objective", "rmse_log"}


# --- CSV ------------------------------------------------------------------------


def test_csv_round_trip(tmp_path):
  columns = {
      "N": np.array([1e6, 2.5e7, 123456789.0]),
      "D": np.array([1e9, 3e10, 7.123456789e11]),
      "loss": np.array([3.1, 2.75, math.pi]),
      "sparsity": np.array([0.0, 0.5, np.nan]),
      "schedule": np.array(["dense", "cubic", "one_shot,0.5"]),
  }
  path = tmp_path / "runs.csv"
  scaling.write_csv(path, columns)
  back = scaling.read_csv(path)
  assert list(back) == list(columns)
  for name, values in columns.items():
    if values.dtype.kind == "f":
      np.testing.assert_array_equal(back[name], values)  # exact, NaN included
    else:
      assert back[name].tolist() == values.tolist()
  # Records (one dict per run) write the same file.
  records = [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]
  scaling.write_csv(tmp_path / "records.csv", records)
  assert (tmp_path / "records.csv").read_text() == path.read_text()


def test_csv_missing_columns(tmp_path):
  path = tmp_path / "bad.csv"
  path.write_text("N,loss,sparsity\n1e6,3.0,0.5\n")
  with pytest.raises(ValueError, match=r"missing required column\(s\) \['D'\]"):
    scaling.read_csv(path)
  with pytest.raises(ValueError, match=r"missing required column\(s\) \['D', 'loss'\]"):
    scaling.write_csv(path, {"N": [1.0]})
  path.write_text("N,D,loss\n1e6,1e9,high\n")
  with pytest.raises(ValueError, match="'loss' .* must be numeric"):
    scaling.read_csv(path)


# --- bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (([1e6] * 4, [1e9] * 4, [3.0] * 4), "at least 5 points to fit 5 parameters, got 4"),
        (([1e6, 0, 1e7, 1e8, 1e9], [1e9] * 5, [3.0] * 5), r"`N` must be positive .* rows \[1\]"),
        (([1e6] * 5, [1e9, 1e9, -1, 1e9, 1e9], [3.0] * 5), r"`D` must be positive .* rows \[2\]"),
        (([1e6] * 5, [1e9] * 5, [3.0, 3.0, 3.0, 3.0, 0.0]), r"`loss` must be positive"),
        (([1e6] * 5, [1e9] * 5, [3.0, np.inf, 3.0, 3.0, 3.0]), r"`loss` must be .*finite"),
        (([1e6] * 5, [1e9] * 6, [3.0] * 5), r"same length, got \{'N': 5, 'D': 6, 'loss': 5\}"),
    ],
)
def test_fit_bad_input(args, message):
  with pytest.raises(ValueError, match=message):
    scaling.fit(*args)


def test_fit_too_few_points_after_nan():
  with pytest.warns(UserWarning, match=r"rows \[0\]"):
    with pytest.raises(ValueError, match="at least 5 points .* got 4 after dropping NaN rows"):
      scaling.fit([np.nan, 1e6, 1e7, 1e8, 1e9], [1e9] * 5, [3.0] * 5)


def test_fit_bad_options():
  N, D, loss = chinchilla_data(0.0)
  with pytest.raises(ValueError, match="Unknown `grid` keys \\['gamma'\\]"):
    scaling.fit(N, D, loss, grid={"gamma": [1.0]})
  with pytest.raises(ValueError, match="`grid\\['a'\\]` must be a non-empty"):
    scaling.fit(N, D, loss, grid={"a": []})
  with pytest.raises(ValueError, match="`delta` must be a positive number"):
    scaling.fit(N, D, loss, delta=0.0)
  with pytest.raises(ValueError, match="`bootstrap` must be >= 0"):
    scaling.fit(N, D, loss, bootstrap=-1)


def test_fit_sparse_form_bad_input():
  S, N, D, loss = (x[:6] for x in sparse_data(0.0))
  with pytest.raises(ValueError, match="at least 7 points to fit 7 parameters, got 6"):
    scaling.fit_sparse_form(S, N, D, loss)
  S, N, D, loss = (x[:10] for x in sparse_data(0.0))
  with pytest.raises(ValueError, match=r"`S` must be in \[0, 1\); rows \[0\]"):
    scaling.fit_sparse_form(np.where(np.arange(10) == 0, 1.0, S), N, D, loss)
  with pytest.raises(ValueError, match="same length"):
    scaling.fit_sparse_form(S[:9], N, D, loss)


# --- degenerate fits ------------------------------------------------------------


def _chinchilla_fit(intervals=None, **params):
  return scaling.ScalingFit(**{**TRUE, **params}, intervals=intervals, residuals=np.zeros(1),
                            rmse_log=0.0, objective=0.0)


def test_degeneracies_by_hand():
  N, D, _ = chinchilla_data(0.0)
  assert scaling.degeneracies(_chinchilla_fit(), N, D) == []
  # E = 2e-14 is at its bound 0 (the loss is > 1.8 everywhere); a negative exponent is past it.
  assert scaling.degeneracies(_chinchilla_fit(E=2e-14), N, D) == [
      "term E at its bound 0 (at most 2e-14, under 0.001 of the loss)"]
  assert scaling.degeneracies(_chinchilla_fit(B=1e-3, beta=-0.1), N, D) == [
      "exponent beta = -0.1 at or below its bound 0"]
  # A term is judged over the fitted points: at D = 1e8 B / D^beta is 2.46e-3, above 1e-3 of
  # the smallest loss (2.17), but it is at most 2.085 / (2.15e10)^0.366 = 3.44e-4 for D > 1e10.
  tiny_b = TRUE["B"] * 1e-3
  assert scaling.degeneracies(_chinchilla_fit(B=tiny_b), N, D) == []
  assert scaling.degeneracies(_chinchilla_fit(B=tiny_b), N[D > 1e10], D[D > 1e10]) == [
      "term B / D^beta at its bound 0 (at most 0.000344, under 0.001 of the loss)"]
  # Intervals: 100x is the limit; both signs and non-finite bounds never pass.
  intervals = {"E": (1.7, 1.9), "A": (10.0, 1000.0), "B": (10.0, 1001.0),
               "alpha": (-0.1, 0.5), "beta": (0.3, np.inf)}
  assert scaling.degeneracies(_chinchilla_fit(intervals), N, D) == [
      "B interval [10, 1e+03] spans 100.1x (> 100x)",
      "alpha interval [-0.1, 0.5] holds both signs",
      "beta interval [0.3, inf] is not finite"]
  assert scaling.degeneracies(_chinchilla_fit(intervals), N, D, interval_factor=1e3) == [
      "alpha interval [-0.1, 0.5] holds both signs", "beta interval [0.3, inf] is not finite"]
  with np.errstate(over="ignore"):
    assert scaling.degeneracies(_chinchilla_fit(A=np.inf), N, D) == ["non-finite A (overflow)"]
    assert scaling.degeneracies(_chinchilla_fit(A=1e300, alpha=-2.0), N, D)[0] == (
        "non-finite predicted loss at some points (overflow)")


def test_degeneracies_sparse_form():
  S, N, D, _ = sparse_data(0.0)
  fit = scaling.SparseScalingFit(**{**SPARSE_TRUE, "c": 1e-12, "d": 0.0}, intervals=None,
                                 residuals=np.zeros(1), rmse_log=0.0, objective=0.0)
  reasons = scaling.degeneracies(fit, S, N, D)
  assert reasons[0].startswith("term c / N^d at its bound 0") and len(reasons) == 2
  assert reasons[1] == "exponent d = 0 at or below its bound 0"


def test_degenerate_fit_of_a_law_without_irreducible_loss():
  # Data with E = 0: the fit drives log E towards minus infinity, and is flagged.
  N, D, _ = chinchilla_data(0.0)
  loss = TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"]
  fit = scaling.fit(N, D, loss)
  assert fit.E < 1e-4 and fit.rmse_log < 1e-6  # E -> 0: 1e-6 on jax 0.12, 6e-15 on 0.10
  assert scaling.degeneracies(fit, N, D)[0].startswith("term E at its bound 0")


def test_predictions_of_an_overflowed_fit_are_computed_in_log_space():
  """A degenerate fit can take log B past float64's range (B = exp(2000) = inf, beta = 170; a
  leave-one-size-out refit of the quick sweep did); B / D^beta = exp(2000 - 170 log D) is still
  finite, and predict and terms give it instead of inf / inf = NaN."""
  D = np.array([1.0e5, 1.286e5, 2.0e5])
  N = np.array([3e4, 3e4, 5e4])
  theta = np.array([math.log(482.0), 2000.0, math.log(1.82), 0.348, 170.0])
  fit = _chinchilla_fit(B=math.inf, beta=170.0)._replace(theta=theta)
  want = [1.82 + 482.0 / n**0.348 + math.exp(2000.0 - 170.0 * math.log(d))
          for n, d in zip(N, D, strict=True)]
  np.testing.assert_allclose(fit.predict(N, D), want, rtol=1e-12)
  np.testing.assert_allclose(fit.terms(N, D)["B / D^beta"],
                             [math.exp(2000.0 - 170.0 * math.log(d)) for d in D], rtol=1e-12)
  # Finite fields are the source of truth (theta is only used where a field overflowed).
  np.testing.assert_allclose(fit._replace(A=1.0).predict(N, D), np.array(want) - np.array(
      [482.0 / n**0.348 - 1.0 / n**0.348 for n in N]), rtol=1e-12)
  sparse = scaling.SparseScalingFit(**{**SPARSE_TRUE, "e": math.inf, "f": 170.0}, intervals=None,
                                    residuals=np.zeros(1), rmse_log=0.0, objective=0.0,
                                    theta=np.array([math.log(300.0), 1.0, math.log(182.0), 0.348,
                                                    2000.0, 170.0, math.log(1.82)]))
  S = np.array([0.0, 0.5, 0.9])
  want = [(300.0 * (1 - s) + 182.0) / n**0.348 + math.exp(2000.0 - 170.0 * math.log(d)) + 1.82
          for s, n, d in zip(S, N, D, strict=True)]
  np.testing.assert_allclose(sparse.predict(S, N, D), want, rtol=1e-12)


def test_fits_keep_their_optimum():
  N, D, loss = chinchilla_data(0.0)
  fit = scaling.fit(N, D, loss)
  np.testing.assert_allclose(np.exp(fit.theta[:3]), [fit.A, fit.B, fit.E], rtol=1e-12)
  np.testing.assert_allclose(fit.theta[3:], [fit.alpha, fit.beta])
