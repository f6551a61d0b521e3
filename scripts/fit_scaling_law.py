r"""Fit scaling laws to a sweep and ask Jin et al.'s question: does N_avg unify sparse and dense?

    python scripts/fit_scaling_law.py /tmp/sweep/sweep.csv              # writes beside the CSV
    python scripts/fit_scaling_law.py sweep.csv --out report/ --bootstrap 200 --seed 0

Reads a CSV written by ``scripts/sweep.py`` (needs ``N``, ``D``, ``loss``, ``N_dense``,
``N_final``, ``N_avg``, ``sparsity``; uses ``run``, ``in_grid``, ``in_windows``,
``window_begin``, ``window_end`` and ``config`` when present) and fits, side by side:

* the Chinchilla law L(N, D) = E + A / N^alpha + B / D^beta (:func:`jaxprune.scaling.fit`,
  Hoffmann et al. 2022 approach 3) with N = ``N_final``, the non-zero parameters at the end,
  and with N = ``N_avg``, their mean over training (Jin et al. 2025, "The Journey Matters");
* the sparse law of Frantar et al. (2023), L = (a (1 - S)^b + c) N^-d + e D^-f + g with
  S = ``sparsity`` and N = ``N_final`` (:func:`jaxprune.scaling.fit_sparse_form`).

Every fit has percentile-bootstrap 95% intervals over resampled runs (``--bootstrap``). Fit
quality is the RMSE of log L on the fitted runs and leaving one model size out (refit without
the runs of one ``N_dense``, predict them), each with a 95% interval from resampling the runs'
residuals (the fits held fixed); N_avg and N_final are compared on the same resamples (paired).
The noise floor is the pooled standard deviation of log L between runs that differ only in
their seed (their ``config`` equal once every ``seed`` key is removed), with a chi-square 95%
interval: no law can fit below it. For the window sweep (``in_windows``, equal compute) the
windows are ranked, and a gap counts only if it exceeds the noise of a difference of two runs.

A fit is degenerate when :func:`jaxprune.scaling.degeneracies` finds a reason (a term or an
exponent at its bound 0, a 95% interval more than ``--interval-factor`` wide or of both signs,
a non-finite value) or fitting it raised a warning (overflow, dropped bootstrap fits, the
evaluation cap). Degenerate fits are shown, marked, and never used for the verdict. Writes
``scaling_report.md`` (fits, health, quality, noise floor, verdict, windows),
``loss_vs_n_avg.png`` (loss against N per law: runs coloured by sparsity, marker by training
length; the fitted law as smooth curves) and ``predicted_vs_actual.png`` to ``--out``. Rows
with a missing or non-finite value are dropped with a warning and listed in the report.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pathlib
import sys
import warnings
from typing import NamedTuple

import numpy as np

from jaxprune import scaling

NEEDED = ("N", "D", "loss", "N_dense", "N_final", "N_avg", "sparsity")
FITS = ("N_final", "N_avg")  # The Chinchilla law with N = each of these columns.
SPARSE = "sparse"  # The key of the Frantar et al. (2023) fit.
NUM_PARAMS = 5  # E, A, B, alpha, beta.
SPARSE_PARAMS = 7  # a, b, c, d, e, f, g.
REPORT, LOSS_PLOT, PRED_PLOT = "scaling_report.md", "loss_vs_n_avg.png", "predicted_vs_actual.png"
RESAMPLES = 2000  # Residual resamples for the intervals on RMSE.
# Okabe & Ito (2008), distinguishable with every common colour-vision deficiency; yellow last.
OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7",
             "#F0E442")
LABELS = {"N_final": "Chinchilla, N = N_final", "N_avg": "Chinchilla, N = N_avg",
          SPARSE: "Frantar et al., (S, N_final)"}


def read_sweep(path: pathlib.Path) -> tuple[dict[str, np.ndarray], list[str]]:
  """The sweep's columns, rows with missing values dropped; and the names of dropped runs."""
  if not path.is_file():
    raise ValueError(f"no such file: {str(path)!r}")
  with open(path, newline="") as f:
    header = next(csv.reader(f), [])
  missing = [c for c in NEEDED if c not in header]
  if missing:
    raise ValueError(f"{str(path)!r} is missing column(s) {missing} that a sweep CSV "
                     f"(scripts/sweep.py) has; it has {header}.")
  data = scaling.read_csv(path)
  for name in NEEDED:
    if data[name].dtype.kind != "f":
      raise ValueError(f"column {name!r} of {str(path)!r} must be numeric.")
  n = data["loss"].size
  if "run" not in data:
    data["run"] = np.array([f"row {i + 2}" for i in range(n)])  # As numbered in the file.
  for flag in ("in_grid", "in_windows"):
    if flag not in data:
      data[flag] = np.full(n, 1.0 if flag == "in_grid" else 0.0)
  bad = ~np.all([np.isfinite(data[c]) for c in NEEDED], axis=0)
  dropped = data["run"][bad].tolist()
  if dropped:
    warnings.warn(f"dropped {len(dropped)} of {n} rows with a missing or non-finite value in "
                  f"{list(NEEDED)}: {dropped}", stacklevel=2)
  return {k: v[~bad] for k, v in data.items()}, dropped


def setting(config: str) -> str:
  """A run's config (JSON) without any ``seed`` key, at any depth: equal for seed replicas."""
  def strip(x):
    if isinstance(x, dict):
      return {k: strip(v) for k, v in x.items() if k != "seed"}
    return x

  return json.dumps(strip(json.loads(config)), sort_keys=True)


def caught(fn, *args, **kwargs):
  """``fn(*args, **kwargs)`` and the distinct messages of the warnings it raised."""
  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    out = fn(*args, **kwargs)
  return out, list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in seen))


def points(data, key: str, rows=slice(None)) -> tuple[np.ndarray, ...]:
  """The inputs of fit ``key`` for ``rows``: (N, D) or, for the sparse law, (S, N_final, D)."""
  if key == SPARSE:
    return data["sparsity"][rows], data["N_final"][rows], data["D"][rows]
  return data[key][rows], data["D"][rows]


def fit_one(data, key: str, rows=slice(None), **options):
  """Fits law ``key`` to ``rows``; returns the fit and the warnings fitting raised."""
  fn = scaling.fit_sparse_form if key == SPARSE else scaling.fit
  return caught(fn, *points(data, key, rows), data["loss"][rows], **options)


def leave_one_size_out(data, n_column: str, seen: list | None = None):
  """Per model size (``N_dense``): log residuals of a fit without that size, or why none.

  ``n_column`` is one of :data:`FITS` (the Chinchilla law) or :data:`SPARSE`; the warnings
  of the refits are appended to ``seen`` when given.
  """
  sizes, out = np.unique(data["N_dense"]), {}
  params = SPARSE_PARAMS if n_column == SPARSE else NUM_PARAMS
  for size in sizes:
    held = data["N_dense"] == size
    kept = int(np.sum(~held))
    if len(sizes) < 2:
      out[size] = "n/a: a single model size"
    elif kept <= params:
      out[size] = f"under-determined: {kept} runs left for {params} parameters"
    else:
      f, w = fit_one(data, n_column, ~held)
      if seen is not None:
        seen += [x for x in w if x not in seen]
      out[size] = np.log(f.predict(*points(data, n_column, held))) - np.log(data["loss"][held])
  return out


def pooled(loso) -> np.ndarray:
  """The held-out residuals of every size that could be predicted, together."""
  return np.concatenate([r for r in loso.values() if not isinstance(r, str)] or [np.zeros(0)])


def health(data, fits, fit_warnings, factor=scaling.INTERVAL_FACTOR) -> dict[str, list[str]]:
  """Per fit, the reasons it is degenerate (empty: a result): its own and its warnings."""
  return {k: scaling.degeneracies(f, *points(data, k), interval_factor=factor) +
          [f"warning: {w}" for w in fit_warnings.get(k, [])] for k, f in fits.items()}


def rmse(r) -> float:
  r = np.asarray(r, np.float64)
  return float(np.sqrt(np.mean(r**2))) if r.size else math.nan


def rmse_interval(*residuals, seed: int = 0, resamples: int = RESAMPLES):
  """95% percentile intervals of each RMSE, and of each RMSE over the first's, over resamples.

  The runs are resampled with replacement (the same indices for every residual vector, which
  must be of one length: a paired comparison); the fits are held fixed.
  """
  r = np.stack([np.asarray(x, np.float64) for x in residuals])
  idx = np.random.default_rng(seed).integers(0, r.shape[1], size=(resamples, r.shape[1]))
  boot = np.sqrt(np.mean(r[:, idx] ** 2, axis=2))  # (len(residuals), resamples)
  bounds = np.percentile(boot, [2.5, 97.5], axis=1).T
  ratios = np.percentile(boot / boot[0], [2.5, 97.5], axis=1).T
  return [tuple(b) for b in bounds], [tuple(b) for b in ratios]


class NoiseFloor(NamedTuple):
  """Pooled within-setting standard deviation of log L over seed replicas."""

  sd: float
  lo: float  # chi-square 95% interval
  hi: float
  groups: int  # settings run with more than one seed
  runs: int  # runs in those settings
  dof: int  # runs - groups


def noise_floor(data) -> NoiseFloor | None:
  """sqrt(sum_g sum_i (log L_i - mean_g)^2 / sum_g (n_g - 1)) over settings g with n_g >= 2.

  A setting is a run's config without its seeds (:func:`setting`); None when no two runs
  share one (or the CSV has no ``config`` column). The interval is the chi-square interval of a
  normal standard deviation with ``dof`` degrees of freedom.
  """
  if "config" not in data:
    return None
  from scipy import stats

  keys = np.array([setting(c) for c in data["config"]])
  ss, groups, runs = 0.0, 0, 0
  for key in np.unique(keys):
    log_loss = np.log(data["loss"][keys == key])
    if log_loss.size > 1:
      ss += float(np.sum((log_loss - log_loss.mean()) ** 2))
      groups, runs = groups + 1, runs + log_loss.size
  if not groups:
    return None
  dof = runs - groups
  lo, hi = (math.sqrt(ss / stats.chi2.ppf(q, dof)) for q in (0.975, 0.025))
  return NoiseFloor(math.sqrt(ss / dof), lo, hi, groups, runs, dof)


def fmt(x: float) -> str:
  return f"{x:.4g}"


def with_interval(fit, name: str) -> str:
  value = fmt(getattr(fit, name))
  if fit.intervals is None:
    return value
  lo, hi = fit.intervals[name]
  return f"{value} [{fmt(lo)}, {fmt(hi)}]"


def _interval(point: float, bounds) -> str:
  return f"{fmt(point)} [{fmt(bounds[0])}, {fmt(bounds[1])}]"


def _compare(ratio, better: str) -> str:
  lo, hi = ratio
  if hi < 1:
    return f"N_avg {better} (the interval of N_avg / N_final lies below 1)."
  if lo > 1:
    return f"N_final {better} (the interval of N_avg / N_final lies above 1)."
  return "no difference resolved (the interval of N_avg / N_final holds 1)."


def verdict(fits, held_out, status=None, noise: NoiseFloor | None = None) -> str:
  """Jin et al.'s question, N_avg against N_final, with paired 95% intervals.

  ``held_out`` maps each of :data:`FITS` to its pooled leave-one-size-out residuals;
  ``status`` (from :func:`health`) turns the answer into a record when a fit is degenerate.
  """
  a, f = fits["N_avg"], fits["N_final"]
  (_, ci_a), (_, ratio) = rmse_interval(f.residuals, a.residuals)
  text = (f"RMSE of log L on the fitted runs: N_avg {_interval(a.rmse_log, ci_a)}, N_final "
          f"{fmt(f.rmse_log)}; N_avg / N_final {fmt(a.rmse_log / f.rmse_log)} "
          f"[{fmt(ratio[0])}, {fmt(ratio[1])}]: {_compare(ratio, 'fits better')}")
  pa, pf = held_out["N_avg"], held_out["N_final"]
  if pa.size and pa.size == pf.size:
    (_, ci_pa), (_, ratio) = rmse_interval(pf, pa)
    text += (f" Leave one model size out: N_avg {_interval(rmse(pa), ci_pa)}, N_final "
             f"{fmt(rmse(pf))}; N_avg / N_final {fmt(rmse(pa) / rmse(pf))} "
             f"[{fmt(ratio[0])}, {fmt(ratio[1])}]: "
             f"{_compare(ratio, 'predicts unseen sizes better')}")
  else:
    text += " Leave one model size out: n/a (too few runs per fit)."
  if noise is not None:
    text += (f" Noise floor (seed replicas): {_interval(noise.sd, (noise.lo, noise.hi))}; a law "
             "cannot fit below it, and RMSEs within it leave nothing for N to explain.")
  else:
    text += " Noise floor: not measured (no runs that differ only in seed)."
  bad = [k for k in FITS if status and status.get(k)]
  if bad:
    text = (f"Not a result: the {' and '.join(bad)} fit{'s are' if len(bad) > 1 else ' is'} "
            "degenerate (see Fit health). For the record only: " + text)
  return text


def window_sections(data, fits, noise: NoiseFloor | None = None) -> tuple[list[str], list[str]]:
  """Markdown for each (N_dense, D, sparsity) group of window runs, and the best windows.

  A window is ahead of the next only if the loss gap exceeds 1.96 sqrt(2) noise.sd L (the 95%
  half-width of a difference of two single runs), when the noise floor is measured.
  """
  rows = np.flatnonzero(data["in_windows"] == 1)
  if rows.size == 0 or not all(c in data for c in ("window_begin", "window_end")):
    return ["No window sweep in this CSV (no rows with `in_windows` = 1 and window "
            "columns)."], []
  lines, best = [], []
  keys = sorted({(data["N_dense"][i], data["D"][i], data["sparsity"][i]) for i in rows})
  for n_dense, d, s in keys:
    group = sorted((i for i in rows if (data["N_dense"][i], data["D"][i], data["sparsity"][i])
                    == (n_dense, d, s)), key=lambda i: data["loss"][i])
    lines += [f"N_dense = {int(n_dense)}, D = {int(d)} tokens, final sparsity {s:g} "
              f"({len(group)} windows, equal compute):", ""]
    if len(group) < 2:
      lines += ["Only one window: nothing to compare.", ""]
      continue
    top = data["loss"][group[0]]
    window = {i: f"[{data['window_begin'][i]:g}, {data['window_end'][i]:g}]" for i in group}
    lines += ["| window | N_avg | N_final | loss | loss - best | N_avg fit | N_final fit |",
              "|---|---|---|---|---|---|---|"]
    for i in group:
      pred = {k: fits[k].predict(data[k][i], d) for k in FITS}
      lines.append(f"| {window[i]} | {data['N_avg'][i]:.0f} | {data['N_final'][i]:.0f} | "
                   f"{data['loss'][i]:.4f} | {data['loss'][i] - top:+.4f} | "
                   f"{pred['N_avg']:.4f} | {pred['N_final']:.4f} |")
    gap = data["loss"][group[1]] - top
    if noise is None:
      judged = ("Run-to-run noise is not measured here (no seed replicas), so this is the "
                "lowest loss, not a ranking.")
    else:
      margin = 1.96 * math.sqrt(2) * noise.sd * top
      judged = (f"The gap to the next window, {gap:.4f}, is {'above' if gap > margin else 'within'}"
                f" the 95% noise of a difference of two runs ({margin:.4f}, from the noise floor)"
                f"{'' if gap > margin else ': not a ranking'}.")
    best.append(f"best window at N_dense {int(n_dense)}, D {int(d)}, sparsity {s:g}: "
                f"{window[group[0]]} (loss {top:.4f}; next {window[group[1]]}, {gap:+.4f})")
    lines += ["", f"**Best: {window[group[0]]}**, loss {top:.4f}. {judged}", ""]
  return lines, best


def _health_lines(status, fit_warnings, loso_warnings, bootstrap: bool = True,
                  factor: float = scaling.INTERVAL_FACTOR) -> list[str]:
  lines = ["## Fit health", "",
           f"A fit is degenerate when a term or an exponent sits at its bound 0, a 95% interval "
           f"holds both signs or spans more than {factor:g}x, a value is not "
           "finite, or fitting raised a warning (`jaxprune.scaling.degeneracies`). Degenerate "
           "fits are shown but are not results." + ("" if bootstrap else " Without bootstrap "
           "(`--bootstrap 0`) the interval rule cannot run: a fit marked ok may still be "
           "degenerate."), ""]
  for k, reasons in status.items():
    lines.append(f"- {LABELS[k]}: " + ("ok." if not reasons else "**degenerate**: " +
                                       "; ".join(r.rstrip(".") for r in reasons) + "."))
  seen = sorted({w for ws in [*fit_warnings.values(), *loso_warnings.values()] for w in ws})
  lines += ["", "Warnings while fitting: " + (
      "none." if not seen else f"{len(seen)} distinct: " + "; ".join(seen) +
      " (overflow: a bootstrap or leave-one-out fit ran to extreme coefficients; dropped "
      "bootstrap fits: their parameters were not finite, so the intervals rest on the rest).")]
  return lines


def _quality_lines(data, fits, loso, noise) -> list[str]:
  held_out = {k: pooled(v) for k, v in loso.items()}
  lines = ["## Fit quality", "",
           "RMSE of log L (about the relative error of the predicted loss). Leave one model "
           "size out: for each N_dense, fit the runs of the other sizes and predict its runs; "
           "the pooled RMSE is over all predicted runs.", "",
           "| N | RMSE log L, fitted runs | RMSE log L, leave one size out | Huber objective |",
           "|---|---|---|---|"]
  for k in fits:
    lines.append(f"| {k} | {fmt(fits[k].rmse_log)} | "
                 f"{fmt(rmse(held_out[k])) if held_out[k].size else 'n/a'} | "
                 f"{fmt(fits[k].objective)} |")
  lines += ["", f"With 95% intervals ({RESAMPLES} resamples of the runs' residuals, fits held "
            "fixed):", "", "| law | RMSE log L, fitted runs | leave one size out |",
            "|---|---|---|"]
  for k in fits:
    (ci,), _ = rmse_interval(fits[k].residuals)
    cell = "n/a"
    if held_out[k].size:
      (ci_l,), _ = rmse_interval(held_out[k])
      cell = _interval(rmse(held_out[k]), ci_l)
    lines.append(f"| {LABELS[k]} | {_interval(fits[k].rmse_log, ci)} | {cell} |")
  if noise is None:
    lines += ["", "Noise floor: not measured: no two runs differ only in seed."]
  else:
    lines += ["", f"Noise floor: SD of log L between seed replicas {fmt(noise.sd)} "
              f"[{fmt(noise.lo)}, {fmt(noise.hi)}] ({noise.runs} runs in {noise.groups} "
              f"settings, {noise.dof} degrees of freedom; chi-square 95% interval)."]
  lines += ["", "Per held-out model size (RMSE of log L of its runs):", "",
            "| N_dense | runs | " + " | ".join(loso) + " |", "|---|---|" + "---|" * len(loso)]
  for size in loso["N_avg"]:
    cells = [fmt(rmse(v[size])) if not isinstance(v[size], str) else v[size]
             for v in loso.values()]
    lines.append(f"| {int(size)} | {int(np.sum(data['N_dense'] == size))} | " +
                 " | ".join(cells) + " |")
  lines += ["", "Per sparsity, fitted runs: mean residual log(predicted / measured) (a bias "
            "shows a law that does not treat sparse and dense runs alike) and RMSE:", "",
            "| sparsity | runs | " + " | ".join(f"{k} mean | {k} RMSE" for k in fits) + " |",
            "|---|---|" + "---|---|" * len(fits)]
  for s in np.unique(data["sparsity"]):
    sel = data["sparsity"] == s
    cells = [f"{np.mean(f.residuals[sel]):+.4f} | {fmt(rmse(f.residuals[sel]))}"
             for f in fits.values()]
    lines.append(f"| {s:g} | {int(np.sum(sel))} | " + " | ".join(cells) + " |")
  return lines


def markdown(path, data, dropped, fits, loso, window_lines, *, status, fit_warnings,
             loso_warnings, noise, factor=scaling.INTERVAL_FACTOR) -> str:
  sizes, lengths = np.unique(data["N_dense"]), np.unique(data["D"])
  lines = [
      "# Sparse scaling laws: N_final vs N_avg, and the sparse law", "",
      f"Data: `{path}`: {data['loss'].size} runs, {sizes.size} model sizes "
      f"(N_dense {', '.join(str(int(x)) for x in sizes)}), {lengths.size} training lengths "
      f"(D {', '.join(str(int(x)) for x in lengths)} tokens), final sparsities "
      f"{', '.join(f'{s:g}' for s in np.unique(data['sparsity']))}.",
  ]
  if dropped:
    lines += ["", f"Dropped {len(dropped)} rows with missing or non-finite values: "
              f"{', '.join(dropped)}."]
  lines += [
      "", "Laws, each fitted by Huber loss on log L (delta 1e-3) with L-BFGS from a grid of "
      "starts (Hoffmann et al. 2022, approach 3; `jaxprune.scaling`):", "",
      "- Chinchilla, L(N, D) = E + A / N^alpha + B / D^beta, once with N = N_final (non-zero "
      "parameters at the end) and once with N = N_avg (non-zero parameters averaged over the "
      "training steps; Jin et al. 2025);",
      "- Frantar et al. (2023), L(S, N, D) = (a (1 - S)^b + c) / N^d + e / D^f + g, with S the "
      "final sparsity and N = N_final.", "",
      *_health_lines(status, fit_warnings, loso_warnings, fits["N_avg"].intervals is not None,
                     factor),
      "", "## Coefficients", "",
      ("95% percentile-bootstrap intervals over resampled runs in brackets." if
       fits["N_avg"].intervals else "No bootstrap (`--bootstrap 0`)."), "",
      "| N | E | A | B | alpha | beta | status |", "|---|---|---|---|---|---|---|",
  ]
  for k in FITS:
    lines.append(f"| {k} | " + " | ".join(with_interval(fits[k], p) for p in
                                         ("E", "A", "B", "alpha", "beta")) +
                 f" | {'degenerate' if status[k] else 'ok'} |")
  if SPARSE in fits:
    names = scaling.SPARSE.names
    lines += ["", "| law | " + " | ".join(names) + " | status |", "|---" * (len(names) + 2) + "|",
              f"| {LABELS[SPARSE]} | " + " | ".join(with_interval(fits[SPARSE], p)
                                                   for p in names) +
              f" | {'degenerate' if status[SPARSE] else 'ok'} |"]
  lines += ["", *_quality_lines(data, fits, loso, noise), "",
            "## Verdict: does N_avg put sparse and dense runs on one curve?", "",
            verdict(fits, {k: pooled(loso[k]) for k in FITS}, status, noise), "",
            "## Pruning windows at equal compute", "", *window_lines, "", "## Plots", "",
            f"![loss against N]({LOSS_PLOT})", "", f"![predicted against measured]({PRED_PLOT})",
            ""]
  return "\n".join(lines)


def _tokens(d: float) -> str:
  return f"{d / 1e9:.3g}B" if d >= 1e9 else f"{d / 1e6:.3g}M" if d >= 1e6 else f"{d / 1e3:.3g}k"


def _styles(data):
  """Colour per sparsity (Okabe-Ito), marker and line style per training length."""
  sparsities, lengths = np.unique(data["sparsity"]), np.unique(data["D"])
  colour = {s: OKABE_ITO[i % len(OKABE_ITO)] for i, s in enumerate(sparsities)}
  marker = {d: "osD^v<>p"[i % 8] for i, d in enumerate(lengths)}
  line = {d: ("-", "--", ":", "-.")[i % 4] for i, d in enumerate(lengths)}
  return sparsities, lengths, colour, marker, line


def _title(key, status) -> str:
  return LABELS[key] + ("\n(degenerate: not a result)" if status and status.get(key) else "")


def _loss_panel(ax, data, key, fit, styles) -> None:
  """Runs as points; the fitted law as smooth curves over a fine grid of N."""
  sparsities, lengths, colour, marker, line = styles
  x_col = "N_final" if key == SPARSE else key
  x = data[x_col]
  grid = np.geomspace(x.min() / 1.15, x.max() * 1.15, 200)
  for s in sparsities:
    for d in lengths:
      sel = (data["sparsity"] == s) & (data["D"] == d)
      in_grid = sel & (data["in_grid"] == 1)
      ax.scatter(x[in_grid], data["loss"][in_grid], color=colour[s], marker=marker[d], s=30,
                 zorder=3)
      other = sel & (data["in_grid"] != 1)
      ax.scatter(x[other], data["loss"][other], facecolors="none", edgecolors=colour[s],
                 marker=marker[d], s=30, zorder=3)
      if key == SPARSE and np.any(sel):  # One curve per sparsity and length.
        ax.plot(grid, fit.predict(s, grid, d), line[d], color=colour[s], lw=1.2)
  if key != SPARSE:  # The law does not see sparsity: one curve per length.
    for d in lengths:
      ax.plot(grid, fit.predict(grid, d), line[d], color="0.35", lw=1.4)
  ax.set(xscale="log", xlabel=f"{x_col} (non-zero parameters)")
  _log_ticks(ax)


def _log_ticks(ax) -> None:
  from matplotlib import ticker

  ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(
      lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k"))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # Labels at 1, 2, 5 only: no overlap.
  ax.grid(True, which="major", color="0.9", lw=0.8)


def _legend(fig, data, styles, title: str, lines: bool = True) -> None:
  from matplotlib.lines import Line2D

  sparsities, lengths, colour, marker, line = styles
  handles = [Line2D([], [], color=colour[s], marker="o", ls="", label=f"sparsity {s:g}")
             for s in sparsities]
  handles += [Line2D([], [], color="0.35", marker=marker[d], ls=line[d] if lines else "",
                      label=f"D = {_tokens(d)} tokens") for d in lengths]
  if np.any(data["in_grid"] != 1):
    handles.append(Line2D([], [], color="0.35", marker="o", mfc="none", ls="",
                          label="window runs"))
  ncol = min(len(handles), 3 * len(fig.axes))  # One row when it fits the figure's width.
  fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=10,
             frameon=False, title=title, title_fontsize=10)


def plot(out: pathlib.Path, data, fits, status=None) -> None:
  """Writes :data:`LOSS_PLOT` and :data:`PRED_PLOT` (one panel per fit in ``fits``)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  styles = _styles(data)
  keys = list(fits)
  with plt.rc_context({"font.size": 11, "axes.titlesize": 11, "axes.labelsize": 11}):
    fig, axes = plt.subplots(1, len(keys), figsize=(4.8 * len(keys), 5.2), sharey=True,
                             squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
      _loss_panel(ax, data, k, fits[k], styles)
      ax.set_title(_title(k, status))
    axes[0, 0].set_ylabel("validation loss (nats/byte)")
    _legend(fig, data, styles, "points: runs; curves: the fitted law at each D")
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(out / LOSS_PLOT, dpi=110)
    plt.close(fig)

    sparsities, lengths, colour, marker, _ = styles
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 4.9), sharex=True,
                             sharey=True, squeeze=False)
    lo, hi = data["loss"].min(), data["loss"].max()
    for ax, k in zip(axes[0], keys, strict=True):
      predicted = fits[k].predict(*points(data, k))
      for s in sparsities:
        for d in lengths:
          sel = (data["sparsity"] == s) & (data["D"] == d)
          full = sel & (data["in_grid"] == 1)
          ax.scatter(data["loss"][full], predicted[full], color=colour[s], marker=marker[d], s=26)
          ax.scatter(data["loss"][sel & ~full], predicted[sel & ~full], facecolors="none",
                     edgecolors=colour[s], marker=marker[d], s=26)
      ax.plot([lo, hi], [lo, hi], color="0.5", ls=":", lw=1)
      ax.set(xlabel="measured loss", title=_title(k, status) +
             f"\nRMSE log L {fits[k].rmse_log:.3g}")
      ax.grid(True, color="0.9", lw=0.8)
    axes[0, 0].set_ylabel("predicted loss")
    _legend(fig, data, styles, "dotted line: predicted = measured", lines=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out / PRED_PLOT, dpi=110)
    plt.close(fig)


def fit_everything(data, bootstrap: int, seed: int):
  """The three fits with intervals, their leave-one-size-out residuals, and every warning."""
  keys = [*FITS, SPARSE] if data["loss"].size > SPARSE_PARAMS else list(FITS)
  fits, fit_warnings, loso, loso_warnings = {}, {}, {}, {}
  for k in keys:
    fits[k], fit_warnings[k] = fit_one(data, k, bootstrap=bootstrap, seed=seed)
    loso_warnings[k] = []
    loso[k] = leave_one_size_out(data, k, loso_warnings[k])
  return fits, fit_warnings, loso, loso_warnings


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("csv", type=pathlib.Path, help="A sweep CSV (scripts/sweep.py).")
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help="Directory for the report and plots (default: the CSV's).")
  parser.add_argument("--bootstrap", type=int, default=200, help="Bootstrap resamples (0: none).")
  parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap resampling.")
  parser.add_argument("--interval-factor", type=float, default=scaling.INTERVAL_FACTOR,
                      help="A fit whose 95%% interval has hi / lo above this is degenerate.")
  args = parser.parse_args(argv)
  out = args.out or args.csv.parent
  try:
    if args.bootstrap < 0:
      raise ValueError(f"--bootstrap must be >= 0, got {args.bootstrap}.")
    if not args.interval_factor > 1:  # Also rejects NaN.
      raise ValueError(f"--interval-factor must be > 1, got {args.interval_factor}.")
    data, dropped = read_sweep(args.csv)
    n = data["loss"].size
    if n <= NUM_PARAMS:
      raise ValueError(f"{n} usable runs for the {NUM_PARAMS} parameters of the law: the fit is "
                       f"under-determined; it needs at least {NUM_PARAMS + 1}.")
    fits, fit_warnings, loso, loso_warnings = fit_everything(data, args.bootstrap, args.seed)
    noise = noise_floor(data)
  except ValueError as e:
    sys.exit(f"error: {e}")
  status = health(data, fits, fit_warnings, args.interval_factor)
  window_lines, best = window_sections(data, fits, noise)
  out.mkdir(parents=True, exist_ok=True)
  plot(out, data, fits, status)
  (out / REPORT).write_text(markdown(args.csv, data, dropped, fits, loso, window_lines,
                                     status=status, fit_warnings=fit_warnings,
                                     loso_warnings=loso_warnings, noise=noise,
                                     factor=args.interval_factor))
  for k, reasons in status.items():
    if reasons:
      print(f"{LABELS[k]}: degenerate, not a result: {'; '.join(reasons)}")
  print(verdict(fits, {k: pooled(loso[k]) for k in FITS}, status, noise))
  for line in best:
    print(line)
  print(f"wrote {out / REPORT}, {out / LOSS_PLOT}, {out / PRED_PLOT}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
