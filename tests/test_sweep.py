"""scripts/sweep.py (quick preset, end to end) and scripts/fit_scaling_law.py on its CSV."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import jaxprune
from jaxprune import scaling, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP = ROOT / "scripts" / "sweep.py"
FIT = ROOT / "scripts" / "fit_scaling_law.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COLUMNS = ("run", "method", "N", "D", "loss", "N_dense", "N_final", "N_avg", "N_prunable",
           "sparsity", "sparsity_final", "window_begin", "window_end", "prune_begin_step",
           "prune_end_step", "prune_power", "prune_frequency", "schedule", "seed", "in_seeds",
           "N_nonembedding", "loss_per_byte", "width", "depth", "heads", "context",
           "batch_size", "steps", "in_grid", "in_windows", "final_train_loss", "wall_time_s",
           "tokens_per_s", "workdir", "config")


def _module(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(script, *args) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(script), *map(str, args)], env=env,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
  """The quick sweep, run once: (output directory, stdout, seconds)."""
  out = tmp_path_factory.mktemp("sweep")
  start = time.perf_counter()
  proc = _run(SWEEP, "--quick", "--out", out)
  return out, proc.stdout, time.perf_counter() - start


def _rows(path) -> list[dict]:
  data = scaling.read_csv(path)
  return [{k: v[i] for k, v in data.items()} for i in range(data["loss"].size)]


def _cells(text: str) -> list[dict[str, str]]:
  return list(csv.DictReader(io.StringIO(text)))


def _prunable_sizes(config) -> tuple[int, list[int]]:
  """All parameters and the sizes of the pruned leaves, from the config alone."""
  model = nnx.eval_shape(lambda: train.make_model(config))
  params = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
  leaves = jax.tree.leaves(params)
  specs = jaxprune.resolve(train.selection(config), params, config.sparsity)
  return (sum(math.prod(x.shape) for x in leaves),
          [math.prod(x.shape) for x, s in zip(leaves, specs, strict=True) if s is not None])


@pytest.mark.slow
def test_quick_sweep_csv(quick_sweep):
  out, stdout, seconds = quick_sweep
  print(f"quick sweep: {seconds:.0f} s")
  sweep = _module(SWEEP)
  plan = sweep.plan(sweep.PRESETS["quick"])
  header = (out / "sweep.csv").read_text().splitlines()[0].split(",")
  assert header == list(COLUMNS)
  rows = _rows(out / "sweep.csv")
  assert [r["run"] for r in rows] == [run.name for run in plan]
  assert stdout.count("trained in") == len(plan)
  assert sum(r["in_grid"] for r in rows) == 12 and sum(r["in_windows"] for r in rows) == 2
  for row in rows:
    config = ml_collections.ConfigDict(json.loads(row["config"]))
    steps, s = config.steps, row["sparsity"]
    assert (row["steps"], row["width"]) == (steps, config.model.width)
    assert row["D"] == steps * config.batch_size * config.model.context
    assert 0 < row["loss"] < math.log(256)             # Better than uniform bytes.
    assert row["N"] == row["N_avg"]
    total, sizes = _prunable_sizes(config)
    assert row["N_dense"] == total
    assert row["N_final"] <= row["N_avg"] <= row["N_dense"]
    if s == 0:
      assert config.method == "dense"
      assert row["N_avg"] == row["N_final"] == row["N_dense"]
      assert row["sparsity_final"] == 0 and np.isnan(row["window_begin"])
      continue
    assert config.method == "gmp" and row["N_prunable"] == sum(sizes)
    begin, end = int(config.prune.begin_fraction * steps), int(config.prune.end_fraction * steps)
    assert begin == row["prune_begin_step"] and end == row["prune_end_step"] <= steps - 1
    schedule = jaxprune.polynomial_schedule(0.0, s, begin, end, power=config.prune.power,
                                            frequency=config.prune.frequency)
    expected = scaling.average_param_count(steps, sizes, schedule=schedule,
                                           fixed_params=total - sum(sizes))
    assert row["N_avg"] == pytest.approx(expected, rel=1e-9)
    assert row["N_final"] == total - sum(int(np.rint(s * n)) for n in sizes)
    assert row["sparsity_final"] == pytest.approx(s, abs=1e-3)
    assert row["N_avg"] > row["N_final"]                # Dense for a quarter of training.


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_resumes_the_rest(quick_sweep):
  out, _, first = quick_sweep
  csv_path = out / "sweep.csv"
  before = csv_path.read_text()
  reports = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/report.json")}
  start = time.perf_counter()
  proc = _run(SWEEP, "--quick", "--out", out)
  seconds = time.perf_counter() - start
  assert proc.stdout.count("(finished earlier;") == len(reports) == 13
  assert "trained in" not in proc.stdout
  assert seconds < min(60.0, first / 2), (seconds, first)
  assert csv_path.read_text() == before
  assert reports == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/report.json")}

  # A run without its report resumes from its (final) checkpoint; a deleted run is retrained,
  # to the same numbers (deterministic on CPU). Only timings may change.
  rows = _rows(csv_path)
  resumed, retrained = rows[3]["run"], rows[-1]["run"]
  (out / "runs" / resumed / "report.json").unlink()
  shutil.rmtree(out / "runs" / retrained)
  proc = _run(SWEEP, "--quick", "--out", out)
  assert re.search(rf"{resumed}: .*resumed and trained in", proc.stdout)
  assert re.search(rf"{retrained}: .*\(trained in", proc.stdout)
  assert proc.stdout.count("(finished earlier;") == 11
  timing = ("wall_time_s", "tokens_per_s")
  for a, b in zip(_cells(before), _cells(csv_path.read_text()), strict=True):
    assert {k: v for k, v in a.items() if k not in timing} == {
        k: v for k, v in b.items() if k not in timing}, a["run"]


@pytest.mark.slow
def test_fit_script_report_and_plots(quick_sweep, tmp_path):
  out, _, _ = quick_sweep
  proc = _run(FIT, out / "sweep.csv", "--out", tmp_path, "--bootstrap", 10)
  md = (tmp_path / "scaling_report.md").read_text()
  number = r"[-+]?\d[\d.]*(?:e[-+]?\d+)?"
  for n in ("N_final", "N_avg"):
    assert re.search(rf"^\| {n} \| {number} \[{number}, {number}\] \|", md, re.M), n
    fit_rmse, loso_rmse = re.search(rf"^\| {n} \| ({number}) \| ({number}) \| {number} \|$",
                                    md, re.M).groups()
    assert 0 < float(fit_rmse) < 1 and 0 < float(loso_rmse) < 1
  # The report's RMSE is the library's fit of the same data (bootstrap does not change it).
  data = scaling.read_csv(out / "sweep.csv")
  fit = scaling.fit(data["N_avg"], data["D"], data["loss"])
  assert re.search(rf"^\| N_avg \| {fit.rmse_log:.4g} \|", md, re.M)
  assert "Leave one model size out" in proc.stdout
  assert re.search(r"\*\*Best: \[[\d.]+, [\d.]+\]\*\*", md)
  for name in ("loss_vs_n_avg.png", "predicted_vs_actual.png"):
    png = (tmp_path / name).read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000, name


def _write(path, header, rows) -> pathlib.Path:
  path.write_text("\n".join([",".join(header), *(",".join(map(str, r)) for r in rows)]) + "\n")
  return path


def test_fit_script_rejects_csv_without_sweep_columns(tmp_path):
  fit_script = _module(FIT)
  rows = [(1e4 * (i + 1), 1e5, 3.0 - 0.1 * i) for i in range(8)]
  path = _write(tmp_path / "plain.csv", ("N", "D", "loss"), rows)
  with pytest.raises(SystemExit, match=r"missing column\(s\) \['N_dense', 'N_final', 'N_avg', "
                     r"'sparsity'\] that a sweep CSV"):
    fit_script.main([str(path)])
  path = _write(tmp_path / "no_loss.csv", ("N", "D"), [r[:2] for r in rows])
  with pytest.raises(SystemExit, match=r"missing column\(s\) \['loss', 'N_dense'"):
    fit_script.main([str(path)])
  with pytest.raises(SystemExit, match="no such file"):
    fit_script.main([str(tmp_path / "absent.csv")])
  assert not list(tmp_path.glob("*.md")) and not list(tmp_path.glob("*.png"))


def test_fit_script_under_determined_after_dropping_nan(tmp_path):
  fit_script = _module(FIT)
  header = ("run", "N", "D", "loss", "N_dense", "N_final", "N_avg", "sparsity")
  rows = [(f"r{i}", 1e4 * (i + 1), 1e5, 3.0 - 0.1 * i, 1e4 * (i + 1), 1e4 * (i + 1),
           1e4 * (i + 1), 0.0) for i in range(6)]
  rows[2] = (*rows[2][:3], "", *rows[2][4:])   # No loss: dropped, 5 runs for 5 parameters.
  path = _write(tmp_path / "small.csv", header, rows)
  with (pytest.warns(UserWarning, match=r"dropped 1 of 6 rows .*\['r2'\]"),
        pytest.raises(SystemExit, match="5 usable runs for the 5 parameters of the law: the "
                      "fit is under-determined; it needs at least 6")):
    fit_script.main([str(path)])


def test_accelerator_preset_covers_what_the_study_needs():
  sweep = _module(SWEEP)
  preset = sweep.PRESETS["accelerator"]
  sweep.check_preset(preset)
  runs = sweep.plan(preset)
  sizes = []
  for width in preset.widths:
    config = json.loads(sweep.run_config(preset, sweep.Run(width, 250, 0.0, None)).to_json())
    sizes.append(sweep._nonembedding(config))
  assert max(sizes) / min(sizes) >= 30 and min(sizes) <= 1.5e6 and max(sizes) >= 30e6
  grid = [r for r, s in runs.items() if "grid" in s]
  assert {r.sparsity for r in grid} == {0.0, 0.5, 0.75, 0.9}
  assert {r.schedule for r in grid if r.window} == {"polynomial", "geometric"}
  for width in preset.widths:   # 2 or 3 token budgets per size, each with the full grid
    budgets = {r.steps for r in grid if r.width == width}
    assert 2 <= len(budgets) <= 3
    assert all(sum(r.width == width and r.steps == t for r in grid) == 7 for t in budgets)
  seeds = [r for r, s in runs.items() if "seeds" in s]
  assert seeds and all(r.seed == 1 for r in seeds)
  assert all(r._replace(seed=0) in runs for r in seeds)   # each repeats a grid run
  config = sweep.run_config(preset, grid[1], "/data/tokens")
  assert config.share_compilation and config.model.dtype == "bfloat16"
  assert config.data.format == "tokens" and config.data.path == "/data/tokens"
  geometric = sweep.run_config(preset, next(r for r in grid if r.schedule == "geometric"))
  assert (geometric.prune.schedule, geometric.prune.scope) == ("geometric", "global")


def test_too_few_sizes_and_missing_token_data_are_refused(tmp_path):
  sweep = _module(SWEEP)
  with pytest.raises(ValueError, match="2 distinct model sizes; the fits need at least 3"):
    sweep.check_preset(sweep.PRESETS["quick"]._replace(widths=(16, 32)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(SWEEP), "--preset", "accelerator", "--out",
                         str(tmp_path / "o")], env=env, capture_output=True, text=True)
  assert proc.returncode == 2 and "--data: the accelerator preset trains on a token corpus" in (
      proc.stderr)


@pytest.mark.slow
def test_token_sweep_with_both_schedules_seeds_and_shared_compilation(tmp_path, monkeypatch):
  """The accelerator preset's machinery at CPU size: tokens, geometric global GMP, seeds."""
  from jaxprune import tokens

  text = tmp_path / "text"
  text.mkdir()
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "import", "x", "=", "(", ")", "for", "in"]
  for i in range(30):
    (text / f"f{i}.py").write_text("\n".join(" ".join(rng.choice(words, 9)) for _ in range(40)))
  tokens.prepare_token_corpus(tmp_path / "tok", path=text, vocab_size=300)
  sweep = _module(SWEEP)
  tiny = sweep.PRESETS["accelerator"]._replace(
      widths=(16, 24, 32), depths=(1, 1, 1), head_dim=8, context=16, batch_size=4, steps=(8,),
      sparsities=(0.0, 0.5), window_width=16, window_steps=8, windows=((0.0, 0.5),),
      repeats=((16, 8, 0.5, "geometric"),), dtype="float32", eval_batches=2, prune_frequency=2)
  monkeypatch.setitem(sweep.PRESETS, "tiny_tokens", tiny)
  monkeypatch.setenv("JAXPRUNE_CACHE_DIR", str(tmp_path / "cache"))
  assert sweep.main(["--out", str(tmp_path / "out"), "--preset", "tiny_tokens",
                     "--data", str(tmp_path / "tok")]) == 0
  rows = _rows(tmp_path / "out" / sweep.CSV_NAME)
  assert len(rows) == len(sweep.plan(tiny)) == 3 * 3 + 1 + 1
  cells = _cells((tmp_path / "out" / sweep.CSV_NAME).read_text())
  assert {c["schedule"] for c in cells} == {"", "polynomial", "geometric"}
  assert sorted({c["seed"] for c in cells}) == ["0", "1"]
  for row, cell in zip(rows, cells, strict=True):
    assert row["loss_per_byte"] < row["loss"]              # a BPE token is > 1 byte
    assert row["N_nonembedding"] < row["N_dense"]
    if cell["schedule"]:
      assert abs(row["sparsity_final"] - row["sparsity"]) < 1e-3
