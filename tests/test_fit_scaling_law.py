"""scripts/fit_scaling_law.py on small synthetic sweeps: recovery, degeneracy, LOSO, noise."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import warnings

import numpy as np
import pytest

from jaxprune import scaling

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRUE = dict(E=1.82, A=482.0, B=2085.0, alpha=0.348, beta=0.366)  # Besiroglu et al. (2024)


def _script():
  spec = importlib.util.spec_from_file_location("fit_scaling_law",
                                                ROOT / "scripts" / "fit_scaling_law.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


fsl = _script()


def chinchilla(N, D, E=TRUE["E"], A=TRUE["A"], B=TRUE["B"], alpha=TRUE["alpha"],
               beta=TRUE["beta"]):
  return E + A / N**alpha + B / D**beta


def sweep(law=chinchilla, sizes=(1e6, 3e7, 1e9), lengths=(1e9, 1e10, 1e11),
          sparsities=(0.0, 0.9)):
  """A sweep whose losses follow ``law`` exactly in N = N_avg; cubic-ramp N_avg."""
  rows = [(n, d, s) for n in sizes for d in lengths for s in sparsities]
  n_dense, D, S = (np.array(x, np.float64) for x in zip(*rows, strict=True))
  n_avg, n_final = n_dense * (1 - 0.625 * S), n_dense * (1 - S)
  return {"N": n_avg, "D": D, "loss": law(n_avg, D), "N_dense": n_dense, "N_final": n_final,
          "N_avg": n_avg, "sparsity": S, "in_grid": np.ones(S.size),
          "in_windows": np.zeros(S.size), "run": np.array([f"r{i}" for i in range(S.size)])}


@pytest.fixture(scope="module")
def exact():
  """The noise-free sweep and its two Chinchilla fits (no bootstrap)."""
  data = sweep()
  fits = {k: fsl.fit_one(data, k)[0] for k in fsl.FITS}
  return data, fits


def test_known_parameters_recovered_and_n_avg_preferred(exact):
  data, fits = exact
  for name, true in TRUE.items():
    assert getattr(fits["N_avg"], name) == pytest.approx(true, rel=1e-5), name
  assert fits["N_avg"].rmse_log < 1e-8 < 1e-3 < fits["N_final"].rmse_log
  assert fsl.health(data, fits, {}) == {"N_final": [], "N_avg": []}
  text = fsl.verdict(fits, {k: np.zeros(0) for k in fsl.FITS})
  assert "N_avg fits better (the interval of N_avg / N_final lies below 1)" in text
  assert "Not a result" not in text and "Noise floor: not measured" in text


@pytest.mark.slow
def test_leave_one_size_out_refits_without_each_size(exact, monkeypatch):
  data, _ = exact
  calls = []
  real_fit = scaling.fit

  def recording_fit(N, D, loss, **kw):
    calls.append(np.asarray(N).copy())
    return real_fit(N, D, loss, **kw)

  monkeypatch.setattr(fsl.scaling, "fit", recording_fit)
  loso = fsl.leave_one_size_out(data, "N_avg")
  sizes = np.unique(data["N_dense"])
  assert list(loso) == list(sizes) and len(calls) == sizes.size
  for size, used in zip(sizes, calls, strict=True):
    held = data["N_dense"] == size
    np.testing.assert_array_equal(used, data["N_avg"][~held])  # exactly the other sizes
    assert loso[size].shape == (int(held.sum()),)
    # The law is exact, so a fit on the other sizes predicts the held-out size exactly.
    np.testing.assert_allclose(loso[size], 0.0, atol=1e-6)
  # With N_final the law is wrong for sparse runs: held-out residuals are those of a direct
  # refit on the remaining rows, in row order.
  monkeypatch.setattr(fsl.scaling, "fit", real_fit)
  loso = fsl.leave_one_size_out(data, "N_final")
  held = data["N_dense"] == sizes[1]
  direct = real_fit(data["N_final"][~held], data["D"][~held], data["loss"][~held])
  expected = np.log(direct.predict(data["N_final"][held], data["D"][held]) / data["loss"][held])
  np.testing.assert_allclose(loso[sizes[1]], expected, rtol=1e-12, atol=1e-15)
  assert fsl.rmse(fsl.pooled(loso)) > 1e-3


def test_leave_one_size_out_says_why_not():
  data = sweep(sizes=(1e6,))
  assert fsl.leave_one_size_out(data, "N_avg") == {1e6: "n/a: a single model size"}
  data = sweep(sizes=(1e6, 1e7), lengths=(1e9, 1e10), sparsities=(0.0, 0.5))
  loso = fsl.leave_one_size_out(data, fsl.SPARSE)  # 4 runs left for 7 parameters
  assert loso[1e6] == "under-determined: 4 runs left for 7 parameters"


def test_degenerate_fit_is_flagged_and_not_a_result():
  # No irreducible loss: E runs to its bound 0 (log E to minus infinity).
  data = sweep(law=lambda N, D: chinchilla(N, D, E=0.0))
  fits = {k: fsl.fit_one(data, k)[0] for k in fsl.FITS}
  status = fsl.health(data, fits, {"N_final": ["RuntimeWarning: overflow encountered in exp"]})
  assert any(r.startswith("term E at its bound 0") for r in status["N_avg"]), status
  assert "warning: RuntimeWarning: overflow encountered in exp" in status["N_final"]
  text = fsl.verdict(fits, {k: np.zeros(0) for k in fsl.FITS}, status)
  assert text.startswith("Not a result: the N_final and N_avg fits are degenerate")


def test_warnings_are_caught_and_reported():
  def noisy():
    warnings.warn("Dropped 3 bootstrap fits with non-finite parameters.", stacklevel=1)
    with np.errstate(over="warn"):
      np.exp(np.float64(1e4))
    warnings.warn("Dropped 3 bootstrap fits with non-finite parameters.", stacklevel=1)
    return 7

  out, seen = fsl.caught(noisy)
  assert out == 7
  assert seen == ["UserWarning: Dropped 3 bootstrap fits with non-finite parameters.",
                  "RuntimeWarning: overflow encountered in exp"]
  lines = fsl._health_lines({"N_avg": []}, {"N_avg": seen}, {"N_avg": []})
  assert "Warnings while fitting: 2 distinct: RuntimeWarning: overflow" in lines[-1]


def _config(width, seed, data_seed=0):
  return json.dumps({"model": {"width": width}, "seed": seed, "data": {"seed": data_seed}})


def test_noise_floor_from_seed_replicas():
  # Setting w8: log L = 1 +- 0.01 (2 seeds); w16: 0.5 + (-0.02, 0, 0.02) (3 seeds, one of them
  # with another data seed: still a replica); w32 has one run and does not count.
  log_loss = [1.01, 0.99, 0.48, 0.5, 0.52, 0.7]
  configs = [_config(8, 0), _config(8, 1), _config(16, 0), _config(16, 1), _config(16, 2, 5),
             _config(32, 0)]
  floor = fsl.noise_floor({"loss": np.exp(log_loss), "config": np.array(configs)})
  # (2 * 0.01^2 + 2 * 0.02^2) / ((2 - 1) + (3 - 1)) = 0.001 / 3.
  assert floor.sd == pytest.approx(math.sqrt(0.001 / 3), rel=1e-9)
  assert (floor.groups, floor.runs, floor.dof) == (2, 5, 3)
  # Chi-square 95% interval with 3 degrees of freedom: quantiles 0.2158 and 9.348.
  assert floor.lo == pytest.approx(math.sqrt(0.001 / 9.348), rel=1e-3)
  assert floor.hi == pytest.approx(math.sqrt(0.001 / 0.2158), rel=1e-3)
  no_replicas = {"loss": np.ones(2), "config": np.array([_config(8, 0), _config(16, 0)])}
  assert fsl.noise_floor(no_replicas) is None
  assert fsl.noise_floor({"loss": np.ones(2)}) is None


def test_rmse_intervals_are_paired():
  r = np.random.default_rng(0).standard_normal(50)
  (ci_a, ci_b), (one, ratio) = fsl.rmse_interval(r, 2 * r)
  assert ci_a[0] < fsl.rmse(r) < ci_a[1]
  np.testing.assert_allclose(ci_b, 2 * np.array(ci_a))
  np.testing.assert_allclose(one, (1.0, 1.0))
  np.testing.assert_allclose(ratio, (2.0, 2.0))  # paired: the same resampled runs


def test_windows_ranked_against_the_noise_floor():
  data = sweep(sizes=(1e6,), lengths=(1e9,), sparsities=(0.5, 0.5, 0.5))
  data.update(in_windows=np.ones(3), window_begin=np.array([0.0, 0.25, 0.5]),
              window_end=np.array([0.5, 0.75, 1.0]), loss=np.array([3.0, 2.9, 2.95]))
  fits = {k: scaling.ScalingFit(**TRUE, intervals=None, residuals=np.zeros(1), rmse_log=0.0,
                                objective=0.0) for k in fsl.FITS}
  lines, best = fsl.window_sections(data, fits, None)
  assert "**Best: [0.25, 0.75]**, loss 2.9000. Run-to-run noise is not measured" in "\n".join(lines)
  assert best == ["best window at N_dense 1000000, D 1000000000, sparsity 0.5: [0.25, 0.75] "
                  "(loss 2.9000; next [0.5, 1], +0.0500)"]
  # Margin 1.96 sqrt(2) sd L: sd 0.01 gives 0.0804 > 0.05 (within noise); sd 0.001: 0.0080.
  for sd, verdict in ((0.01, "within"), (0.001, "above")):
    noise = fsl.NoiseFloor(sd, sd / 2, sd * 2, 1, 2, 1)
    text = "\n".join(fsl.window_sections(data, fits, noise)[0])
    assert f"is {verdict} the 95% noise of a difference of two runs" in text
