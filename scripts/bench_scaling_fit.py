r"""Time the scaling-law fits: our vmapped L-BFGS against ``optax.lbfgs`` with its zoom line search.

    python scripts/bench_scaling_fit.py                                  # the committed sweep
    python scripts/bench_scaling_fit.py --epoch svg_extracted_data.csv   # + Epoch AI's data
    python scripts/bench_scaling_fit.py --minimizers armijo/vmap,optax/map --repeats 3

Runs :func:`jaxprune.huber_fit.fit_log_sum_exp` (the engine of :func:`jaxprune.scaling.fit`
and :func:`jaxprune.scaling.fit_sparse_form`: float32 screen of the whole grid, float64 polish
of the best 32, no bootstrap) on each data set with each minimiser, and prints the wall and
process CPU seconds of every repeat (the first includes compilation) and the final objective.

Minimisers: ``armijo`` is :func:`jaxprune.huber_fit.lbfgs_armijo` (ours: one objective
evaluation per loop step); ``optax`` is ``optax.lbfgs`` with ``optax.scale_by_zoom_linesearch``
(20 line-search steps at most), stopped by the same rules (``ftol``, evaluation cap).
``/vmap`` runs all starts as one batch (the library's way); ``/map`` one start after another
(``jax.lax.map``), so that no start waits for the slowest line search of the batch.

Data: the committed sweep (``results/scaling/sweep.csv``; Chinchilla with N = N_avg and
N = N_final, and the sparse law) and, with ``--epoch``, the 245 points that Besiroglu et al.
(2024) extracted from Hoffmann et al.'s figure 4 (``data/svg_extracted_data.csv`` of
github.com/epoch-research/analyzing-chinchilla; not shipped here), with D = FLOP / (6 N) and the
5 highest losses left out, as in their analysis.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import platform
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune import huber_fit, scaling

ROOT = pathlib.Path(__file__).resolve().parents[1]


def lbfgs_optax(value_and_grad, x0, max_evals, ftol, *, memory=10, max_linesearch_steps=20):
  """``optax.lbfgs`` + zoom line search with :func:`jaxprune.huber_fit.lbfgs_armijo`'s contract.

  Stops after ``max_evals`` objective evaluations (line-search steps counted), when a step
  decreases f by at most ``ftol * f`` (kept only if it decreased f), or when a line search
  finds no decrease. The line search gets our hand-written gradient through a custom VJP.
  """
  @jax.custom_vjp
  def f(x):
    return value_and_grad(x)[0]

  f.defvjp(value_and_grad, lambda grad, cotangent: (cotangent * grad,))
  solver = optax.lbfgs(memory_size=memory, linesearch=optax.scale_by_zoom_linesearch(
      max_linesearch_steps=max_linesearch_steps, initial_guess_strategy="one"))
  value0, grad0 = value_and_grad(x0)

  def cond(carry):
    return ~carry[4] & (carry[3] < max_evals)

  def body(carry):
    x, value, state, num_evals, _ = carry
    grad = optax.tree.get(state, "grad")
    updates, state = solver.update(grad, state, x, value=value, grad=grad, value_fn=f)
    new_value = optax.tree.get(state, "value")
    steps = optax.tree.get(state, "num_linesearch_steps").astype(num_evals.dtype)
    decreased = jnp.isfinite(new_value) & (new_value < value)
    done = ~decreased | (value - new_value <= ftol * jnp.abs(new_value))
    return (jnp.where(decreased, x + updates, x), jnp.where(decreased, new_value, value), state,
            num_evals + steps, done)

  state = optax.tree.set(solver.init(x0), value=value0, grad=grad0)
  x, value, _, num_evals, _ = lax.while_loop(
      cond, body, (x0, value0, state, jnp.ones((), jnp.int32), ~jnp.isfinite(value0)))
  return x, value, num_evals


MINIMIZERS = {"armijo": huber_fit.lbfgs_armijo, "optax": lbfgs_optax}


def datasets(epoch: pathlib.Path | None) -> dict[str, tuple]:
  sweep = scaling.read_csv(ROOT / "results" / "scaling" / "sweep.csv")
  out = {}
  if epoch is not None:
    with open(epoch, newline="") as f:
      rows = list(csv.DictReader(f))
    n = np.array([float(r["Model Size"]) for r in rows])
    d = np.array([float(r["Training FLOP"]) for r in rows]) / (6 * n)
    loss = np.array([float(r["loss"]) for r in rows])
    keep = loss < np.sort(loss)[-5]
    out["Epoch Chinchilla (240)"] = (scaling.CHINCHILLA, (np.log(n[keep]), np.log(d[keep])),
                                     np.log(loss[keep]))
  for column in ("N_avg", "N_final"):
    out[f"sweep, N = {column} (53)"] = (
        scaling.CHINCHILLA, (np.log(sweep[column]), np.log(sweep["D"])), np.log(sweep["loss"]))
  out["sweep, sparse law (53)"] = (
      scaling.SPARSE, (np.log1p(-sweep["sparsity"]), np.log(sweep["N_final"]),
                       np.log(sweep["D"])), np.log(sweep["loss"]))
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--epoch", type=pathlib.Path, default=None,
                      help="epoch-research/analyzing-chinchilla's data/svg_extracted_data.csv.")
  parser.add_argument("--minimizers", default="armijo/vmap,armijo/map,optax/map,optax/vmap",
                      help="Comma-separated NAME/BATCHING, NAME in armijo, optax; BATCHING in "
                      "vmap, map.")
  parser.add_argument("--repeats", type=int, default=2, help="Timed runs of each fit (>= 1).")
  args = parser.parse_args(argv)
  variants = args.minimizers.split(",")
  for v in variants:
    name, _, batching = v.partition("/")
    if name not in MINIMIZERS or batching not in ("vmap", "map"):
      sys.exit(f"error: --minimizers: {v!r} is not NAME/BATCHING with NAME in "
               f"{sorted(MINIMIZERS)} and BATCHING in ['map', 'vmap'].")
  if args.repeats < 1:
    sys.exit(f"error: --repeats must be >= 1, got {args.repeats}.")
  if args.epoch is not None and not args.epoch.is_file():
    sys.exit(f"error: --epoch: no such file: {str(args.epoch)!r}")
  print(f"backend {jax.default_backend()}, devices {jax.devices()}, {platform.machine()}, "
        f"jax {jax.__version__}, optax {optax.__version__}", flush=True)
  for data_name, (model, features, log_loss) in datasets(args.epoch).items():
    for v in variants:
      name, _, batching = v.partition("/")
      wall, cpu = [], []
      for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")  # E.g. the sweep's E at its bound: not the point here.
          sol = huber_fit.fit_log_sum_exp(
              model, features, log_loss, grid=None, delta=1e-3, max_evals=300, refine=32,
              bootstrap=0, bootstrap_starts=1, seed=0, minimize=MINIMIZERS[name],
              batch=1 if batching == "map" else None)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
      print(f"{data_name:24s} {v:12s} wall " + " / ".join(f"{x:.1f}" for x in wall) +
            " s, CPU " + " / ".join(f"{x:.1f}" for x in cpu) +
            f" s, objective {sol.objective:.12e}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
