r"""Scaling-law sweep: tiny byte-level transformers, dense and gradual magnitude pruning.

    python scripts/sweep.py --out /tmp/sweep            # 53 runs, ~25 min on 2 idle CPU cores
    python scripts/sweep.py --out /tmp/sweep --quick    # 13 runs, ~2 min (the tests run it)
    python scripts/sweep.py --out /tmp/sweep --list     # print the plan, train nothing
    python scripts/sweep.py --out /tmp/sweep --match 'w128_.*T600'   # only runs whose name matches
    python scripts/fit_scaling_law.py /tmp/sweep/sweep.csv

Two sweeps, run one after the other in this process (:func:`jaxprune.train.train`
per run), each run in ``<out>/runs/<name>/``:

1. **grid**: model widths x final sparsity x training lengths. Sparsity 0 is
   ``recipes/dense.py``; any other is ``recipes/gmp.py`` (cubic ramp from 25%
   to 75% of training, Zhu & Gupta 2017) with that final sparsity.
2. **windows**: one width, one sparsity, one length (equal compute: the same
   steps and tokens), GMP ramps over different fractions of training, e.g.
   [0, 0.5], [0.25, 0.75], [0.5, 1]. The grid's run with the same width,
   length and sparsity is shared, not trained twice.

Default preset: widths 32 / 64 / 96 / 128 (depth 2, 16-wide heads, 44k to 471k
parameters), 150 / 300 / 600 steps of 16 x 64 bytes (D = 154k / 307k / 614k
tokens), sparsity 0 / 0.5 / 0.75 / 0.9; windows at width 64, 600 steps, sparsity
0.9: [0, 0.5], [0, 1], [0.1, 0.9], [0.25, 0.75], [0.5, 1], [0.75, 1]. ``--quick``:
widths 16 / 32 / 48 (depth 1), 40 / 80 steps of 8 x 32 bytes, sparsity 0 / 0.75;
windows [0, 0.5], [0.25, 0.75] at width 32, 80 steps.

Every run of a sweep uses the same context and batch size, hence the same
validation windows (:func:`jaxprune.data.eval_batches`); the learning rate
warms up over the first 10% of steps and decays (cosine) to the run's own end.

Resumable: a run whose ``report.json`` exists is read back, not trained (its
config and corpus must be the ones planned now, else the sweep stops with the
fields that differ: use a new ``--out``); a run stopped half-way resumes from
its newest checkpoint (``train.train`` does that). ``<out>/sweep.csv`` is
rewritten after every run (:func:`jaxprune.scaling.write_csv`), one row per
finished run:

* ``N``, ``D``, ``loss``: the average non-zero parameter count over training
  (``N_avg``), tokens seen, final validation loss (nats per byte);
* ``N_dense`` (all parameters), ``N_final`` (non-zero at the end), ``N_avg``
  (mean over steps of the non-zero count, Jin et al. 2025), ``N_prunable``;
* ``sparsity`` (the final target over the pruned kernels), ``sparsity_final``
  (measured), ``window_begin``, ``window_end`` (fractions of training; empty
  for dense runs), ``prune_begin_step``, ``prune_end_step``, ``prune_power``,
  ``prune_frequency``;
* ``width``, ``depth``, ``heads``, ``context``, ``batch_size``, ``steps``,
  ``in_grid``, ``in_windows`` (1 or 0), ``final_train_loss``, ``wall_time_s``,
  ``tokens_per_s``, ``workdir`` (relative to the CSV) and ``config`` (the
  run's full config, JSON).

A window that ends at 1.0 ends at the last step, ``T - 1``:
:func:`jaxprune.train.make_optimizer` ends the ramp at ``int(end_fraction * T)``
and a ramp ending at step ``T`` would never reach its final sparsity.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import time
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSV_NAME = "sweep.csv"


class Preset(NamedTuple):
  """The two sweeps: a grid, and pruning windows at one size, sparsity and length."""

  widths: tuple[int, ...]
  depth: int
  context: int
  batch_size: int
  steps: tuple[int, ...]
  sparsities: tuple[float, ...]
  grid_window: tuple[float, float]
  window_width: int
  window_steps: int
  window_sparsity: float
  windows: tuple[tuple[float, float], ...]
  prune_frequency: int
  eval_batches: int
  checkpoint_every: int
  # Only the accelerator preset sets these (the CPU presets keep their runs and names).
  depths: tuple[int, ...] | None = None      # per width; None: `depth` for every width
  head_dim: int = 16
  schedules: tuple[str, ...] = ("polynomial",)   # GMP: cubic per layer; 'geometric': Jin et al.
  repeats: tuple[tuple[int, int, float, str], ...] = ()   # (width, steps, sparsity, schedule)
  seeds: tuple[int, ...] = (0,)               # extra seeds of the `repeats` runs
  data_format: str = "bytes"
  dtype: str = "float32"
  share_compilation: bool = False
  lr: float | None = None


PRESETS = {
    # 48 grid runs + 5 window runs (sizes: 44k / 137k / 279k / 471k parameters). Measured on
    # the 2-core reference machine, jax 0.10.2, with other jobs running: ~8 s (dense) to ~12 s
    # (GMP) per run to build, compile, evaluate and checkpoint, then ~10-20 / 20-25 / 50 /
    # 75-90 ms per step at width 32 / 64 / 96 / 128. Sum: ~23 min on an otherwise idle
    # machine; ~50 min when load is as high as during those measurements (wall = 2x CPU).
    "default": Preset(
        widths=(32, 64, 96, 128), depth=2, context=64, batch_size=16,
        steps=(150, 300, 600), sparsities=(0.0, 0.5, 0.75, 0.9), grid_window=(0.25, 0.75),
        window_width=64, window_steps=600, window_sparsity=0.9,
        windows=((0.0, 0.5), (0.0, 1.0), (0.1, 0.9), (0.25, 0.75), (0.5, 1.0), (0.75, 1.0)),
        prune_frequency=10, eval_batches=32, checkpoint_every=200),
    # 12 grid runs + 1 window run, ~7 s each (compilation): 94 s CPU, 116-167 s wall on the
    # busy 2-core machine. 3 sizes, so that leaving one size out still leaves 8 runs for the
    # 5 parameters of the law.
    "quick": Preset(
        widths=(16, 32, 48), depth=1, context=32, batch_size=8,
        steps=(40, 80), sparsities=(0.0, 0.75), grid_window=(0.25, 0.75),
        window_width=32, window_steps=80, window_sparsity=0.75,
        windows=((0.0, 0.5), (0.25, 0.75)),
        prune_frequency=2, eval_batches=8, checkpoint_every=1000),
    # One accelerator (scripts/device_sweep.sh): BPE tokens (vocabulary 4,096), context 256,
    # batch 64 (16,384 tokens per step), bfloat16 compute, 64-wide heads. Four sizes of
    # 0.9M / 4.9M / 18.9M / 42.5M non-embedding parameters (48x), two budgets per size
    # (4.1M and 12.3M tokens), dense and GMP to 50 / 75 / 90% with both the cubic per-layer
    # ramp and Jin et al.'s global geometric schedule over 25%-75% of training: 56 runs;
    # 3 more pruning windows at equal compute; 4 runs repeated with seed 1 for the noise
    # floor. Runs of one size and method share one compiled program (share_compilation).
    "accelerator": Preset(
        widths=(192, 320, 512, 768), depth=6, depths=(2, 4, 6, 6), head_dim=64,
        context=256, batch_size=64, steps=(250, 750), sparsities=(0.0, 0.5, 0.75, 0.9),
        grid_window=(0.25, 0.75), schedules=("polynomial", "geometric"),
        window_width=320, window_steps=750, window_sparsity=0.9,
        windows=((0.0, 0.5), (0.0, 1.0), (0.5, 1.0)),
        repeats=((192, 750, 0.0, "polynomial"), (192, 750, 0.75, "polynomial"),
                 (512, 750, 0.0, "polynomial"), (512, 750, 0.75, "polynomial")),
        seeds=(1,), prune_frequency=10, eval_batches=16, checkpoint_every=0,
        data_format="tokens", dtype="bfloat16", share_compilation=True, lr=1e-3),
}
#: The fits need at least this many distinct model sizes (leave-one-size-out keeps two).
MIN_SIZES = 3


class Run(NamedTuple):
  width: int
  steps: int
  sparsity: float
  window: tuple[float, float] | None  # None: dense.
  schedule: str = "polynomial"        # 'geometric': Jin et al.'s global schedule.
  seed: int = 0

  @property
  def name(self) -> str:
    base = f"w{self.width}_T{self.steps}"
    if self.window is None:
      name = base + "_dense"
    else:
      name = base + f"_s{self.sparsity:g}_{self.window[0]:g}-{self.window[1]:g}"
      name += "_geo" if self.schedule == "geometric" else ""
    return name + (f"_seed{self.seed}" if self.seed else "")


def plan(preset: Preset) -> dict[Run, set[str]]:
  """Every distinct run, in order, with the sweeps it belongs to ('grid', 'windows', 'seeds')."""
  runs: dict[Run, set[str]] = {}
  for width in preset.widths:
    for steps in preset.steps:
      for s in preset.sparsities:
        for schedule in (preset.schedules if s else ("polynomial",)):
          run = Run(width, steps, s, preset.grid_window if s else None, schedule)
          runs.setdefault(run, set()).add("grid")
  for window in preset.windows:
    run = Run(preset.window_width, preset.window_steps, preset.window_sparsity, window)
    runs.setdefault(run, set()).add("windows")
  for seed in preset.seeds if preset.repeats else ():
    for width, steps, s, schedule in preset.repeats:
      run = Run(width, steps, s, preset.grid_window if s else None, schedule, seed)
      runs.setdefault(run, set()).add("seeds")
  return runs


def check_preset(preset: Preset) -> None:
  """Raises unless the grid has enough sizes for the fits, and its parts are consistent."""
  if len(set(preset.widths)) < MIN_SIZES:
    raise ValueError(f"the sweep grid has {len(set(preset.widths))} distinct model sizes; the "
                     f"fits need at least {MIN_SIZES} (leaving one size out must leave two).")
  if preset.depths is not None and len(preset.depths) != len(preset.widths):
    raise ValueError(f"`depths` has {len(preset.depths)} entries for {len(preset.widths)} "
                     "widths.")


def depth_of(preset: Preset, width: int) -> int:
  if preset.depths is None:
    return preset.depth
  return preset.depths[preset.widths.index(width)]


def end_fraction(end: float, steps: int) -> float:
  """``config.prune.end_fraction`` for a ramp ending at fraction ``end``; 1 is step T - 1."""
  return end if int(end * steps) < steps else (steps - 0.5) / steps


def run_config(preset: Preset, run: Run, data_path: str | None = None):
  """The run's training config: the dense or GMP recipe, resized."""
  from jaxprune import train

  config = train.load_recipe("dense" if run.window is None else "gmp")
  config.model.update(width=run.width, depth=depth_of(preset, run.width), context=preset.context,
                      heads=max(run.width // preset.head_dim, 1), dtype=preset.dtype)
  config.update(steps=run.steps, batch_size=preset.batch_size, eval_every=run.steps,
                eval_batches=preset.eval_batches, log_every=max(run.steps // 10, 1),
                checkpoint_every=min(preset.checkpoint_every, run.steps), progress=False,
                seed=run.seed, share_compilation=preset.share_compilation)
  config.optimizer.warmup_steps = max(run.steps // 10, 1)
  if preset.lr is not None:
    config.optimizer.lr = preset.lr
  config.data.format = preset.data_format
  if data_path:
    config.data.path = str(data_path)
  if run.window is None:
    config.sparsity = 0.0  # Unused by the dense method; recorded as what the run is.
  else:
    config.sparsity = run.sparsity
    config.prune.update(begin_fraction=run.window[0],
                        end_fraction=end_fraction(run.window[1], run.steps),
                        frequency=preset.prune_frequency, schedule=run.schedule,
                        scope="global" if run.schedule == "geometric" else "layer")
  return config


def _check_finished(report: dict, config_dict: dict, corpus: dict, workdir) -> None:
  """A finished run is reused only if it is the run planned now, on the same corpus."""
  from jaxprune import train

  # The same rule as resuming from a checkpoint: only logging and checkpoint cadence may differ.
  diff = train.config_diff(report["config"], config_dict)
  if diff:
    sys.exit(f"error: {workdir} holds a finished run with a different config ('checkpoint': "
             "that run's value):\n  " +
             "\n  ".join(diff) + "\nUse a new --out (or delete that run).")
  if report["corpus"]["sha256"] != corpus["sha256"]:
    sys.exit(f"error: {workdir} was trained on a different corpus ({report['corpus']} vs "
             f"{corpus}); use a new --out.")


def csv_row(run: Run, sweeps: set[str], report: dict, workdir: str) -> dict:
  """One CSV row (columns in the module docstring); NaN (an empty cell) where not applicable."""
  nan = float("nan")
  rows = report["sparsity_table"]["rows"]
  prunable = sum(r["size"] for r in rows if r["selected"])
  config = report["config"]
  sparse = run.window is not None
  steps = run.steps
  return {
      "run": run.name,
      "method": report["method"],
      "N": report["params_active_mean"],
      "D": report["tokens_seen"],
      "loss": report["eval_loss"],
      "N_dense": report["params_total"],
      "N_final": report["params_active_final"],
      "N_avg": report["params_active_mean"],
      "N_prunable": prunable,
      "sparsity": run.sparsity,
      "sparsity_final": report["prunable_sparsity"],
      "window_begin": run.window[0] if sparse else nan,
      "window_end": run.window[1] if sparse else nan,
      "prune_begin_step": int(config["prune"]["begin_fraction"] * steps) if sparse else nan,
      "prune_end_step": int(config["prune"]["end_fraction"] * steps) if sparse else nan,
      "prune_power": config["prune"]["power"] if sparse else nan,
      "prune_frequency": config["prune"]["frequency"] if sparse else nan,
      "schedule": run.schedule if sparse else "",
      "seed": run.seed,
      "in_seeds": int("seeds" in sweeps),
      "N_nonembedding": _nonembedding(config),
      "loss_per_byte": report.get("eval_loss_per_byte") or report["eval_loss"],
      "width": run.width,
      "depth": config["model"]["depth"],
      "heads": config["model"]["heads"],
      "context": config["model"]["context"],
      "batch_size": config["batch_size"],
      "steps": steps,
      "in_grid": int("grid" in sweeps),
      "in_windows": int("windows" in sweeps),
      "final_train_loss": report["final_train_loss"],
      "wall_time_s": report["wall_time_s"],
      "tokens_per_s": report["tokens_per_s"],
      "workdir": workdir,
      "config": json.dumps(config, sort_keys=True, separators=(",", ":")),
  }


def _nonembedding(config: dict) -> int:
  """Parameters of the blocks (attention, MLP, their norms): what scaling studies call N."""
  from jaxprune.models import transformer

  m = {k: config["model"][k] for k in ("context", "width", "heads", "mlp_ratio", "positions")}
  block = (transformer.param_count(vocab_size=256, depth=2, **m)
           - transformer.param_count(vocab_size=256, depth=1, **m))
  return config["model"]["depth"] * block


def _write_rows(path: pathlib.Path, rows: list[dict]) -> None:
  from jaxprune import scaling

  if not rows:
    return
  tmp = path.with_name(path.name + ".tmp")
  scaling.write_csv(tmp, rows)
  os.replace(tmp, path)   # A sweep killed mid-write leaves the previous CSV whole.


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="Directory for runs/ and sweep.csv.")
  parser.add_argument("--quick", action="store_true", help="The tiny preset (tests, smoke).")
  parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="default (CPU), quick (--quick) or accelerator (one GPU; needs --data).")
  parser.add_argument("--data", default=None,
                      help="A token corpus directory (scripts/prepare_data.py) for presets that "
                           "train on tokens.")
  parser.add_argument("--match", default="", help="Only train runs whose name matches (regex).")
  parser.add_argument("--list", action="store_true", help="Print the plan; train nothing.")
  args = parser.parse_args(argv)

  from absl import logging

  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  from jaxprune import train

  name = args.preset or ("quick" if args.quick else "default")
  if args.quick and args.preset not in (None, "quick"):
    parser.exit(2, f"error: --quick and --preset {args.preset} contradict each other.\n")
  preset = PRESETS[name]
  try:
    check_preset(preset)
  except ValueError as e:
    parser.exit(2, f"error: preset {name}: {e}\n")
  if preset.data_format == "tokens" and not args.data and not args.list:
    parser.exit(2, f"error: --data: the {name} preset trains on a token corpus; write one with "
                   "scripts/prepare_data.py --out DIR and pass --data DIR.\n")
  runs = plan(preset)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  pattern = re.compile(args.match)
  todo = [r for r in runs if pattern.search(r.name)]
  done_before = sum((out / "runs" / r.name / "report.json").exists() for r in todo)
  print(f"sweep {name}: {len(runs)} runs "
        f"({sum('grid' in s for s in runs.values())} grid, "
        f"{sum('windows' in s for s in runs.values())} windows, "
        f"{sum('seeds' in s for s in runs.values())} repeated seeds), {len(todo)} selected, "
        f"{done_before} of them finished earlier; results in {out / CSV_NAME}", flush=True)
  if args.list:
    for run in todo:
      state = "finished" if (out / "runs" / run.name / "report.json").exists() else "to do"
      print(f"  {run.name:<32} {'+'.join(sorted(runs[run])):<13} {state}")
    return 0

  corpus = None
  start = time.perf_counter()
  for i, run in enumerate(todo, 1):
    workdir = out / "runs" / run.name
    config = run_config(preset, run, args.data)
    report_path = workdir / "report.json"
    print(f"[{i}/{len(todo)}] {run.name} ...", flush=True)
    if report_path.exists():
      report = json.loads(report_path.read_text())
      if corpus is None:  # The corpus that train.train would load for this config.
        corpus = train.load_corpus(config.data.path, config.data.valid_fraction,
                                   config.data.include_tests, config.data.format).fingerprint
      _check_finished(report, json.loads(config.to_json()), corpus, workdir)
      how = "finished earlier"
    else:
      resumed = (workdir / "checkpoints").is_dir()
      mark = time.perf_counter()
      report = train.train(config, workdir)
      how = f"{'resumed and ' if resumed else ''}trained in {time.perf_counter() - mark:.1f} s"
    print(f"[{i}/{len(todo)}] {run.name}: loss {report['eval_loss']:.4f}  "
          f"N_dense {report['params_total']}  N_final {report['params_active_final']}  "
          f"N_avg {report['params_active_mean']:.1f}  ({how}; "
          f"{time.perf_counter() - start:.0f} s elapsed)", flush=True)
    rows = []  # Every finished run of the plan, also those outside --match.
    for r, sweeps in runs.items():
      path = out / "runs" / r.name / "report.json"
      if path.exists():
        rows.append(csv_row(r, sweeps, json.loads(path.read_text()),
                            str(path.parent.relative_to(out))))
    _write_rows(out / CSV_NAME, rows)
  print(f"done: {len(todo)} runs in {time.perf_counter() - start:.0f} s; {out / CSV_NAME}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
