r"""Fit the Chinchilla law to a sweep twice, with N = N_final and N = N_avg; report and plot.

    python scripts/fit_scaling_law.py /tmp/sweep/sweep.csv              # writes beside the CSV
    python scripts/fit_scaling_law.py sweep.csv --out report/ --bootstrap 200 --seed 0

Reads a CSV written by ``scripts/sweep.py`` (needs ``N``, ``D``, ``loss``, ``N_dense``,
``N_final``, ``N_avg``, ``sparsity``; uses ``run``, ``in_grid``, ``in_windows``,
``window_begin``, ``window_end`` when present) and fits

    L(N, D) = E + A / N^alpha + B / D^beta

with :func:`jaxprune.scaling.fit` (Hoffmann et al. 2022 approach 3; percentile-bootstrap 95%
intervals over resampled runs) twice: N = ``N_final``, the non-zero parameters at the end, and
N = ``N_avg``, their mean over training (Jin et al. 2025, "The Journey Matters"). If N_avg
unifies sparse and dense runs, its fit has the smaller residuals, no bias by sparsity, and
predicts a model size it has not seen better. Writes to ``--out``:

* ``scaling_report.md``: both fits with intervals; fit quality (RMSE of log L on the fitted
  runs, mean residual per sparsity, and leave-one-model-size-out: refit without the runs of one
  ``N_dense`` and predict them); for the window sweep (``in_windows``, equal sparsity and
  compute), the windows ranked by loss;
* ``loss_vs_n_avg.png``: loss against N_avg, one panel per training length, points and fitted
  values per sparsity (solid: N_avg fit, dashed: N_final fit);
* ``predicted_vs_actual.png``: predicted against measured loss, both fits.

Rows with a missing or non-finite value are dropped with a warning and listed in the report.
"""

from __future__ import annotations

import argparse
import csv
import math
import pathlib
import sys
import warnings

import numpy as np

from jaxprune import scaling

NEEDED = ("N", "D", "loss", "N_dense", "N_final", "N_avg", "sparsity")
FITS = ("N_final", "N_avg")
NUM_PARAMS = 5  # E, A, B, alpha, beta.
REPORT, LOSS_PLOT, PRED_PLOT = "scaling_report.md", "loss_vs_n_avg.png", "predicted_vs_actual.png"


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


def rmse(r) -> float:
  r = np.asarray(r, np.float64)
  return float(np.sqrt(np.mean(r**2))) if r.size else math.nan


def leave_one_size_out(data, n_column: str) -> dict[float, np.ndarray | str]:
  """Per model size (``N_dense``): log residuals of a fit without that size, or why none."""
  sizes = np.unique(data["N_dense"])
  out = {}
  for size in sizes:
    held = data["N_dense"] == size
    kept = int(np.sum(~held))
    if len(sizes) < 2:
      out[size] = "n/a: a single model size"
      continue
    if kept <= NUM_PARAMS:
      out[size] = f"under-determined: {kept} runs left for {NUM_PARAMS} parameters"
      continue
    f = scaling.fit(data[n_column][~held], data["D"][~held], data["loss"][~held])
    out[size] = np.log(f.predict(data[n_column][held], data["D"][held])) - np.log(
        data["loss"][held])
  return out


def pooled(loso) -> np.ndarray:
  """The held-out residuals of every size that could be predicted, together."""
  return np.concatenate([r for r in loso.values() if not isinstance(r, str)] or [np.zeros(0)])


def fmt(x: float) -> str:
  return f"{x:.4g}"


def with_interval(fit, name: str) -> str:
  value = fmt(getattr(fit, name))
  if fit.intervals is None:
    return value
  lo, hi = fit.intervals[name]
  return f"{value} [{fmt(lo)}, {fmt(hi)}]"


def window_sections(data, fits) -> tuple[list[str], list[str]]:
  """Markdown for each (N_dense, D, sparsity) group of window runs, and the best windows."""
  rows = np.flatnonzero(data["in_windows"] == 1)
  have = all(c in data for c in ("window_begin", "window_end"))
  if rows.size == 0 or not have:
    return ["No window sweep in this CSV (no rows with `in_windows` = 1 and window "
            "columns)."], []
  lines, best = [], []
  keys = sorted({(data["N_dense"][i], data["D"][i], data["sparsity"][i]) for i in rows})
  for n_dense, d, s in keys:
    group = [i for i in rows if (data["N_dense"][i], data["D"][i], data["sparsity"][i]) ==
             (n_dense, d, s)]
    group.sort(key=lambda i: data["loss"][i])
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
    best.append(f"best window at N_dense {int(n_dense)}, D {int(d)}, sparsity {s:g}: "
                f"{window[group[0]]} (loss {top:.4f}; next {window[group[1]]}, "
                f"{data['loss'][group[1]] - top:+.4f})")
    lines += ["", f"**Best: {window[group[0]]}**, loss {top:.4f}. One seed per window: a "
              "difference smaller than run-to-run noise (not measured here; compare the fits' "
              "RMSE of log L above) is not a ranking.", ""]
  return lines, best


def markdown(path, data, dropped, fits, loso, window_lines) -> str:
  n = data["loss"].size
  sparsities = np.unique(data["sparsity"])
  lines = [
      "# Sparse scaling law: N_final vs N_avg", "",
      f"Data: `{path}`: {n} runs, {np.unique(data['N_dense']).size} model sizes "
      f"(N_dense {', '.join(str(int(x)) for x in np.unique(data['N_dense']))}), "
      f"{np.unique(data['D']).size} training lengths "
      f"(D {', '.join(str(int(x)) for x in np.unique(data['D']))} tokens), "
      f"final sparsities {', '.join(f'{s:g}' for s in sparsities)}.",
  ]
  if dropped:
    lines += ["", f"Dropped {len(dropped)} rows with missing or non-finite values: "
              f"{', '.join(dropped)}."]
  lines += [
      "", "Model: L(N, D) = E + A / N^alpha + B / D^beta, fitted by `jaxprune.scaling.fit` "
      "(Huber loss on log L, delta 1e-3, L-BFGS from a grid; Hoffmann et al. 2022, approach 3), "
      "once with N = N_final (non-zero parameters at the end) and once with N = N_avg (non-zero "
      "parameters averaged over training steps; Jin et al. 2025).", "",
      "## Coefficients", "",
      ("95% percentile-bootstrap intervals over resampled runs in brackets." if
       fits["N_avg"].intervals else "No bootstrap (`--bootstrap 0`)."), "",
      "| N | E | A | B | alpha | beta |", "|---|---|---|---|---|---|",
  ]
  for k in FITS:
    lines.append(f"| {k} | " + " | ".join(with_interval(fits[k], p) for p in
                                         ("E", "A", "B", "alpha", "beta")) + " |")
  held_out = {k: pooled(loso[k]) for k in FITS}
  lines += ["", "## Fit quality", "",
            "RMSE of log L (about the relative error of the predicted loss). Leave one model "
            "size out: for each N_dense, fit the runs of the other sizes and predict its runs; "
            "the pooled RMSE is over all predicted runs.", "",
            "| N | RMSE log L, fitted runs | RMSE log L, leave one size out | Huber objective |",
            "|---|---|---|---|"]
  for k in FITS:
    loso_rmse = fmt(rmse(held_out[k])) if held_out[k].size else "n/a"
    lines.append(f"| {k} | {fmt(fits[k].rmse_log)} | {loso_rmse} | {fmt(fits[k].objective)} |")
  lines += ["", "Per held-out model size (RMSE of log L of its runs):", "",
            "| N_dense | runs | " + " | ".join(FITS) + " |", "|---|---|---|---|"]
  for size in loso["N_avg"]:
    cells = [(fmt(rmse(loso[k][size])) if not isinstance(loso[k][size], str) else
              loso[k][size]) for k in FITS]
    lines.append(f"| {int(size)} | {int(np.sum(data['N_dense'] == size))} | " +
                 " | ".join(cells) + " |")
  lines += ["", "Per sparsity, fitted runs: mean residual log(predicted / measured) (a bias "
            "shows a law that does not treat sparse and dense runs alike) and RMSE:", "",
            "| sparsity | runs | " + " | ".join(f"{k} mean | {k} RMSE" for k in FITS) + " |",
            "|---|---|" + "---|---|" * len(FITS)]
  for s in sparsities:
    sel = data["sparsity"] == s
    cells = [f"{np.mean(fits[k].residuals[sel]):+.4f} | {fmt(rmse(fits[k].residuals[sel]))}"
             for k in FITS]
    lines.append(f"| {s:g} | {int(np.sum(sel))} | " + " | ".join(cells) + " |")
  lines += ["", "## Verdict", "", verdict(fits, held_out), "", "## Pruning windows", "",
            *window_lines, "", "## Plots", "", f"![loss against N_avg]({LOSS_PLOT})", "",
            f"![predicted against measured]({PRED_PLOT})", ""]
  return "\n".join(lines)


def verdict(fits, held_out) -> str:
  a, f = fits["N_avg"].rmse_log, fits["N_final"].rmse_log
  text = f"RMSE of log L on the fitted runs: N_avg {fmt(a)}, N_final {fmt(f)}: " + _compare(
      a, f, "fits better")
  if held_out["N_avg"].size and held_out["N_final"].size:
    pa, pf = rmse(held_out["N_avg"]), rmse(held_out["N_final"])
    text += (f" Leave one model size out: N_avg {fmt(pa)}, N_final {fmt(pf)}: " +
             _compare(pa, pf, "predicts unseen sizes better"))
  else:
    text += " Leave one model size out: n/a (too few runs per fit)."
  return text


def _compare(avg: float, final: float, better: str) -> str:
  ratio = max(avg, final) / min(avg, final)
  if ratio < 1.05:  # Seed noise is not estimated here: no winner on a margin this small.
    return f"no clear difference ({fmt(ratio)}x)."
  return f"{'N_avg' if avg < final else 'N_final'} {better} ({fmt(ratio)}x)."


def plot(out: pathlib.Path, data, fits) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  sparsities = np.unique(data["sparsity"])
  colors = {s: plt.get_cmap("viridis")(i / max(len(sparsities) - 1, 1))
            for i, s in enumerate(sparsities)}
  lengths = np.unique(data["D"])
  fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 4), squeeze=False,
                           sharey=True)
  for ax, d in zip(axes[0], lengths, strict=True):
    for s in sparsities:
      sel = (data["D"] == d) & (data["sparsity"] == s)
      grid = sel & (data["in_grid"] == 1)
      order = np.flatnonzero(grid)[np.argsort(data["N_avg"][grid])]
      ax.scatter(data["N_avg"][grid], data["loss"][grid], color=colors[s], label=f"s={s:g}")
      other = sel & (data["in_grid"] != 1)
      ax.scatter(data["N_avg"][other], data["loss"][other], facecolors="none",
                 edgecolors=colors[s])
      for k, style in (("N_avg", "-"), ("N_final", "--")):
        ax.plot(data["N_avg"][order], fits[k].predict(data[k][order], d), style,
                color=colors[s], lw=1)
    ax.set(xscale="log", xlabel="N_avg (mean non-zero parameters)", title=f"D = {d:.3g} tokens")
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x / 1e3:g}k"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # Labels at 1, 2, 5 only: no overlap.
  axes[0, 0].set_ylabel("validation loss (nats/byte)")
  axes[0, 0].legend(title="points; solid: N_avg fit,\ndashed: N_final fit; hollow: windows",
                    fontsize=8, title_fontsize=7)
  fig.tight_layout()
  fig.savefig(out / LOSS_PLOT, dpi=100)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(FITS), figsize=(9, 4.2), sharex=True, sharey=True)
  lo, hi = data["loss"].min(), data["loss"].max()
  for ax, k in zip(axes, FITS, strict=True):
    predicted = fits[k].predict(data[k], data["D"])
    for s in sparsities:
      sel = data["sparsity"] == s
      ax.scatter(data["loss"][sel], predicted[sel], color=colors[s], label=f"s={s:g}", s=16)
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set(xlabel="measured loss", title=f"N = {k}: RMSE log L {fits[k].rmse_log:.3g}")
  axes[0].set_ylabel("predicted loss")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / PRED_PLOT, dpi=100)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("csv", type=pathlib.Path, help="A sweep CSV (scripts/sweep.py).")
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help="Directory for the report and plots (default: the CSV's).")
  parser.add_argument("--bootstrap", type=int, default=200, help="Bootstrap resamples (0: none).")
  parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap resampling.")
  args = parser.parse_args(argv)
  out = args.out or args.csv.parent
  try:
    data, dropped = read_sweep(args.csv)
    n = data["loss"].size
    if n <= NUM_PARAMS:
      raise ValueError(f"{n} usable runs for the {NUM_PARAMS} parameters of the law: the fit is "
                       f"under-determined; it needs at least {NUM_PARAMS + 1}.")
    fits = {k: scaling.fit(data[k], data["D"], data["loss"], bootstrap=args.bootstrap,
                           seed=args.seed) for k in FITS}
    loso = {k: leave_one_size_out(data, k) for k in FITS}
  except ValueError as e:
    sys.exit(f"error: {e}")
  window_lines, best = window_sections(data, fits)
  out.mkdir(parents=True, exist_ok=True)
  plot(out, data, fits)
  (out / REPORT).write_text(markdown(args.csv, data, dropped, fits, loso, window_lines))
  print(verdict(fits, {k: pooled(loso[k]) for k in FITS}))
  for line in best:
    print(line)
  print(f"wrote {out / REPORT}, {out / LOSS_PLOT}, {out / PRED_PLOT}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
