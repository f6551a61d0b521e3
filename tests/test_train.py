"""The training loop, recipes, checkpoints and exact resume (tiny preset)."""

from __future__ import annotations

import importlib.util
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
import ml_collections
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
  width, context = config.model.width, config.model.context
  matmul_params = report["params_total"] - 256 * width - context * width   # less the embeddings
  assert report["model_flops_per_token"] == (6 * matmul_params
                                             + 12 * config.model.depth * width * context)
  known = train.peak_flops(jax.devices()[0].device_kind) is not None
  assert (report["mfu"] > 0) if known else (report["mfu"] is None)   # CPU: no known peak.
  assert report["compile_time_s"] > 0
  md = (workdir / "report.md").read_text()
  assert "Sparsity per layer" in md and report["corpus"]["sha256"] in md
  assert json.loads((workdir / "report.json").read_text())["eval_loss"] == report["eval_loss"]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
  with pytest.raises(ValueError, match=r"unknown preset 'huge'.*'small', 'base'"):
    load_recipe("dense", "tiny+huge")
  with pytest.raises(ValueError, match=r"`config.model.dtype` must be one of \('float32', "
                     r"'bfloat16'\), got 'bf16'"):
    _bad(tmp_path, **{"model.dtype": "bf16"})()
  with pytest.raises(ValueError, match=r"`config.model.param_dtype` must be one of"):
    _bad(tmp_path, **{"model.param_dtype": "float64"})()
  with pytest.raises(ValueError, match=r"`config.checkpoint_every` must be an integer >= 0"):
    _bad(tmp_path, checkpoint_every=-1)()
  with pytest.raises(ValueError, match=r"`config.peak_flops` must be a number >= 0"):
    _bad(tmp_path, peak_flops=-1.0)()


def test_presets_small_base_and_bf16():
  for preset, count, context in (("small", 19_308_800, 256), ("base", 86_235_904, 1024)):
    config = load_recipe("sr_ste_2of4", preset)
    assert jaxprune.models.param_count(**config.model.to_dict()) == count
    assert (config.model.context, config.model.dtype, config.model.param_dtype) == (
        context, "bfloat16", "float32")
    assert config.method == "sr_ste"                  # The recipe's own fields are kept.
  plain, bf16 = load_recipe("gmp", ""), load_recipe("gmp", "bf16")
  plain.model.dtype = "bfloat16"
  assert plain.to_dict() == bf16.to_dict()            # bf16 changes only the compute dtype.
  both = load_recipe("dense", "tiny+bf16")
  assert (both.model.width, both.steps, both.model.dtype) == (32, 40, "bfloat16")


def test_model_flops_per_token_by_hand_peak_table_and_mfu():
  small = load_recipe("dense", "small").model.to_dict()
  n = 19_308_800 - 256 * 512 - 256 * 512            # less token and position embeddings
  assert train.model_flops_per_token(small) == 6 * n + 12 * 6 * 512 * 256 == 123_717_120
  assert train.peak_flops("NVIDIA H200") == train.peak_flops("NVIDIA H100 80GB HBM3") == 989.5e12
  assert train.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert train.peak_flops("NVIDIA L4") == 121e12
  assert train.peak_flops("TPU v4") == 275e12
  assert train.peak_flops("TPU v5 lite") == 197e12
  assert train.peak_flops("TPU v5p") == train.peak_flops("TPU v5") == 459e12
  assert train.peak_flops("TPU v6 lite") == 918e12
  for unknown in ("cpu", "NVIDIA H200 NVL", "NVIDIA GeForce RTX 4090"):
    assert train.peak_flops(unknown) is None
  assert train.peak_flops("cpu", 2e12) == 2e12       # config.peak_flops wins.
  assert train.mfu(1e9, 1e5, 1e15, 2) == pytest.approx(0.05)
  assert train.mfu(1e9, 1e5, None, 1) is None and train.mfu(1e9, None, 1e15, 1) is None


@pytest.mark.slow
def test_compilation_cache_start_up_lines_and_the_peak_flag(tmp_path, capsys):
  cache = tmp_path / "cache"
  config = _config(steps=6, eval_every=3, log_every=3, checkpoint_every=0,
                   compilation_cache=str(cache), peak_flops=1e12)
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  report = train.train(config, tmp_path / "a")
  assert (jax.config.jax_compilation_cache_dir,
          jax.config.jax_persistent_cache_min_compile_time_secs) == before   # Restored.
  entries = set(cache.iterdir())
  assert entries                                      # The train step (and more) was written.
  err = capsys.readouterr().err
  for line in ("jaxprune: loading the corpus", "jaxprune: model: 30,432 parameters (float32 "
               "compute, float32 params)", f"compiling the train step (cache: {cache})",
               "jaxprune: compiled in"):
    assert line in err
  assert report["mfu"] == pytest.approx(
      report["model_flops_per_token"] * report["tokens_per_s"] / (1e12 * jax.device_count()))
  assert not list((tmp_path / "a" / "checkpoints").glob("[0-9]*"))   # checkpoint_every=0
  again = train.train(config, tmp_path / "b")         # The same programs: all loaded.
  assert set(cache.iterdir()) == entries
  assert again["eval_loss"] == report["eval_loss"]


@pytest.mark.slow
def test_accelerator_table_script_on_cpu(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location(
      "accelerator_table", ROOT / "scripts" / "accelerator_table.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  out = tmp_path / "rows.json"
  script.main(["--preset", "tiny", "--steps", "6", "--recipes", "sr_ste_2of4,dense",
               "--compilation_cache", "off", "--out", str(out)])
  table = capsys.readouterr().out
  rows = json.loads(out.read_text())
  assert [r["recipe"] for r in rows] == ["dense", "sr_ste_2of4"]   # dense first
  assert f"backend {jax.default_backend()}" in table and "preset 'tiny', 6 steps" in table
  ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
  assert f"| sr_ste_2of4 | {rows[1]['tokens_per_s']:,.0f} | {ratio:.3f}x |" in table
  assert "| dense |" in table and "| 1.000x |" in table
  for r in rows:
    assert 1 < r["eval_perplexity"] < 256 and r["compile_time_s"] > 0


@pytest.mark.slow
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


def test_vocab_size_of_a_config_saved_before_data_format(tmp_path):
  """The committed sweep's configs predate `data.format`: they describe byte corpora."""
  config = train.default_config()
  assert train.vocab_size(config) == 256
  old = ml_collections.ConfigDict(config.to_dict())
  del old.data["format"]
  assert train.vocab_size(old) == 256
  config.data.format = "tokens"
  config.data.path = str(tmp_path)
  with pytest.raises(ValueError, match="tokenizer.json is missing"):
    train.vocab_size(config)
