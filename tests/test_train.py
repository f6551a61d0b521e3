"""The training loop, recipes, checkpoints and exact resume (tiny preset)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxprune
from jaxprune import scaling, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "scripts" / "train.py")
def load_recipe(name, preset="tiny"):
  return train.load_recipe(name, preset, directory=ROOT / "recipes")


RECIPES = ("dense", "gmp", "static_random", "set", "rigl", "nm_2of4_asp", "sr_ste_2of4",
           "step_2of4", "gradient_flow_1of8")
UNSTRUCTURED = ("dense", "gmp", "static_random", "set", "rigl")


def _metrics(workdir) -> list[dict]:
  return [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().split("\n")
          if x]


def _deterministic(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def _final_state(workdir) -> dict:
  """The newest checkpoint's arrays, as numpy, without a target structure."""
  with ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints",
                             item_names=("state", "meta")) as mngr:
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  return jax.tree.map(np.asarray, restored["state"])


def _assert_trees_equal(a, b) -> None:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_array_equal(x, y)   # Bit for bit (NaN-aware, exact).


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
  """Every recipe's tiny preset, trained once, in-process."""
  runs = {}
  for name in RECIPES:
    workdir = tmp_path_factory.mktemp(name)
    runs[name] = (workdir, train.train(load_recipe(name, "tiny"), workdir))
  return runs


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_invariants(tiny_runs, name):
  workdir, report = tiny_runs[name]
  config = load_recipe(name, "tiny")
  assert report["eval_loss"] < math.log(256)          # Better than uniform bytes.
  assert report["eval_perplexity"] == pytest.approx(math.exp(report["eval_loss"]))
  expected = 0.0 if name == "dense" else (
      config.sparsity if name in UNSTRUCTURED else 1 - config.n / config.m)
  assert report["prunable_sparsity"] == expected      # Exactly: every kernel divides.
  assert report["nm_valid"] is (None if name in UNSTRUCTURED else True)
  assert report["tokens_seen"] == config.steps * config.batch_size * config.model.context
  assert report["params_total"] == jaxprune.models.param_count(**config.model.to_dict())
  rows = report["sparsity_table"]["rows"]
  for row in rows:  # Only attention and MLP kernels are (or, dense, would be) pruned.
    pruned = row["path"].endswith("kernel") and "head" not in row["path"]
    assert row["selected"] == pruned, row
  records = _metrics(workdir)
  assert [r["step"] for r in records] == list(range(10, 41, 10))
  assert [r["step"] for r in records if "eval_loss" in r] == [20, 40]
  assert records[-1]["eval_loss"] == report["eval_loss"]
  md = (workdir / "report.md").read_text()
  assert "Sparsity per layer" in md and report["corpus"]["sha256"] in md
  assert json.loads((workdir / "report.json").read_text())["eval_loss"] == report["eval_loss"]


def test_sparse_quant_recipe_is_2of4_and_on_the_mxfp4_grid(tmp_path):
  config = load_recipe("sparse_quant", "tiny")
  report = train.train(config, tmp_path)
  params = _final_state(tmp_path)["params"]
  kernels = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if jaxprune.path_str(path).endswith("kernel") and "head" not in
             jaxprune.path_str(path)]
  assert len(kernels) == 6 and report["nm_valid"] is True
  assert report["prunable_sparsity"] >= 0.5          # MXFP4 may round kept weights to 0 too.
  for path, kernel in kernels:
    # Exactly representable: MX blocks of 32 along the input axis (axis 0 of a Flax kernel).
    np.testing.assert_array_equal(
        np.asarray(jaxprune.quant.quantize(kernel, "mxfp4_e2m1", axis=0)), kernel, str(path))
  assert report["quant_corrections"] == 0
  assert report["eval_loss"] < math.log(256)


def test_average_param_count_matches_scaling_library(tiny_runs):
  """The loop's measured mean of n_active(t) is the schedule's realised mean."""
  _, report = tiny_runs["gmp"]
  config = load_recipe("gmp", "tiny")
  sizes = [r["size"] for r in report["sparsity_table"]["rows"] if r["selected"]]
  schedule = jaxprune.polynomial_schedule(
      0.0, 0.75, int(0.25 * config.steps), int(0.75 * config.steps),
      frequency=config.prune.frequency)
  expected = scaling.average_param_count(config.steps, sizes, schedule=schedule,
                                         fixed_params=report["params_total"] - sum(sizes))
  assert report["params_active_mean"] == pytest.approx(expected, abs=1e-9)
  assert report["params_active_final"] == report["params_total"] - 0.75 * sum(sizes)


def test_resume_is_exact_after_sigkill(tmp_path):
  """A run killed between checkpoints and resumed equals an uninterrupted one, bit for bit."""
  flags = ["--config.steps=300", "--config.checkpoint_every=100", "--config.log_every=10",
           "--config.eval_every=50", "--config.model.width=64", "--config.batch_size=16"]
  recipe = f"{ROOT / 'recipes' / 'sr_ste_2of4.py'}:tiny"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  subprocess.run([sys.executable, TRAIN, "--config", recipe, "--workdir", str(straight), *flags],
                 check=True, env=env, capture_output=True)

  proc = subprocess.Popen([sys.executable, TRAIN, "--config", recipe, "--workdir", str(killed),
                           *flags], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  try:
    # Kill once a log line past the first checkpoint exists: that line must be recomputed.
    while time.monotonic() < deadline and proc.poll() is None:
      path = killed / "metrics.jsonl"
      if path.exists() and any(r["step"] > 110 for r in _metrics(killed)):
        break
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  steps_saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
  assert steps_saved and steps_saved[-1] < 300
  subprocess.run([sys.executable, TRAIN, "--config", recipe, "--workdir", str(killed), *flags],
                 check=True, env=env, capture_output=True)

  assert _deterministic(_metrics(killed)) == _deterministic(_metrics(straight))
  _assert_trees_equal(_final_state(killed), _final_state(straight))
  a = json.loads((killed / "report.json").read_text())
  b = json.loads((straight / "report.json").read_text())
  for key in ("eval_loss", "params_active_mean", "tokens_seen", "sparsity_table"):
    assert a[key] == b[key], key


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
  config = load_recipe("gmp", "tiny")
  straight = train.train(config, tmp_path / "straight")
  workdir = tmp_path / "run"
  shutil.copytree(tmp_path / "straight", workdir)
  for f in (workdir / "checkpoints" / "40" / "state").rglob("*"):
    if f.is_file():                     # Truncate every file of the latest step's arrays.
      f.write_bytes(b"")
  with caplog.at_level("WARNING"):
    resumed = train.train(config, workdir)   # Falls back to step 20 and redoes 21..40.
  assert "checkpoint step 40 is unreadable" in caplog.text
  moved = list((workdir / "corrupt_checkpoints").iterdir())   # Moved aside, not deleted.
  assert len(moved) == 1 and moved[0].name.startswith("40.")
  assert resumed["eval_loss"] == straight["eval_loss"]
  assert _deterministic(_metrics(workdir)) == _deterministic(_metrics(tmp_path / "straight"))
  _assert_trees_equal(_final_state(workdir), _final_state(tmp_path / "straight"))


def test_resume_refuses_a_different_config(tmp_path):
  config = load_recipe("dense", "tiny")
  config.steps = 20
  first = train.train(config, tmp_path)
  config.optimizer.lr = 1e-3
  config.model.width = 64
  with pytest.raises(ValueError, match=r"(?s)model\.width.*optimizer\.lr"):
    train.train(config, tmp_path)
  config = load_recipe("dense", "tiny")
  with pytest.raises(ValueError, match="steps: checkpoint 20 vs now 40"):
    train.train(config, tmp_path)     # Schedules depend on the length: not an extension.
  assert not (tmp_path / "corrupt_checkpoints").exists()
  config = load_recipe("dense", "tiny")
  config.steps, config.log_every = 20, 5       # Logging cadence may change.
  again = train.train(config, tmp_path)        # A finished run re-reports, trains no more.
  assert again["eval_loss"] == first["eval_loss"] and again["tokens_seen"] == 20 * 8 * 32


def _config(**changes):
  """The tiny dense recipe with dotted fields changed."""
  config = load_recipe("dense", "tiny")
  for key, value in changes.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def _bad(tmp_path, **changes):
  config = _config(**changes)
  return lambda: train.train(config, tmp_path / "w")


def test_bad_input(tmp_path):
  with pytest.raises(ValueError, match=r"unknown recipe 'nope'.*'gmp'"):
    load_recipe("nope")
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    load_recipe("dense", "huge")
  with pytest.raises(ValueError, match=r"method.*one of"):
    _bad(tmp_path, method="lottery")()
  with pytest.raises(ValueError, match=r"prune.score.*one of.*'saliency'"):
    train.make_optimizer(_config(method="gmp", **{"prune.score": "hessian"}))
  with pytest.raises(ValueError, match=r"`drop_fraction` must be in \[0, 1\]"):
    train.make_optimizer(_config(method="rigl", **{"dst.drop_fraction": 2.0}))
  with pytest.raises(ValueError, match="does not exist"):
    _bad(tmp_path, **{"data.path": str(tmp_path / "missing")})()
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="empty"):
    _bad(tmp_path, **{"data.path": str(tmp_path / "empty.txt")})()
  (tmp_path / "short.txt").write_text("x" * 200)
  with pytest.raises(ValueError, match="context"):
    _bad(tmp_path, **{"data.path": str(tmp_path / "short.txt"), "model.context": 64})()
  with pytest.raises(ValueError, match="steps"):
    _bad(tmp_path, steps=0)()
  blocked = tmp_path / "file"
  blocked.write_text("")
  config = load_recipe("dense", "tiny")
  with pytest.raises(ValueError, match="not writable"):
    train.train(config, blocked / "sub")
  config.unknown_field = 1
  with pytest.raises(ValueError, match=r"unknown config field.*unknown_field.*valid fields"):
    train.train(config, tmp_path / "w")


def test_cli_rejects_unknown_field_and_overrides_known_ones(tmp_path):
  recipe = f"{ROOT / 'recipes' / 'dense.py'}:tiny"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  bad = subprocess.run([sys.executable, TRAIN, "--config", recipe, "--workdir", str(tmp_path),
                        "--config.sparsityy=0.9"], env=env, capture_output=True, text=True)
  assert bad.returncode != 0 and "sparsityy" in bad.stderr
  assert "sparsity" in bad.stderr.split("sparsityy", 1)[1]   # The valid fields are listed.
  ok = subprocess.run([sys.executable, TRAIN, "--config", recipe, "--workdir", str(tmp_path),
                       "--config.steps=10", "--config.eval_every=5"],
                      env=env, capture_output=True, text=True, check=True)
  assert "eval_perplexity" in ok.stdout
  assert [r["step"] for r in _metrics(tmp_path) if "eval_loss" in r] == [5, 10]
