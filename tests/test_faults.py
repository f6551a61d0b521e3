"""Fault injection: kills during a save and a log append, flipped bytes, torn and lost logs.

Each case damages a tiny run the way a crash, a full disk or a bad sector would, then checks
that the next run either recovers exactly (same metrics, same params, same report as an
uninterrupted run) or stops with a clear message; never a plausible-looking wrong result.
The table of bad inputs is in tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxprune import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = {"steps": 40, "checkpoint_every": 20, "log_every": 10, "eval_every": 20}

# Runs train() in a fresh process and SIGKILLs it at a chosen point (the patch names it).
_DRIVER = r"""
import os, signal, sys, json
from jaxprune import checkpoint, train
import orbax.checkpoint as ocp
where, workdir = sys.argv[1], sys.argv[2]
config = train.load_recipe("gmp", "tiny")
config.update(json.loads(sys.argv[3]))
if where == "append":          # Half of the step-30 line reaches the file, then the kill.
  original = train._append_line
  def append(path, record):
    if record["step"] == 30:
      with path.open("a") as f:
        f.write(json.dumps(record)[:25])
      os.kill(os.getpid(), signal.SIGKILL)
    original(path, record)
  train._append_line = append
elif where == "save":          # Step 40's array writes are under way when the kill comes.
  original = ocp.StandardCheckpointHandler.async_save
  async def async_save(self, directory, *args, **kwargs):
    futures = await original(self, directory, *args, **kwargs)
    if "/40" in str(getattr(directory, "path", directory)):
      os.kill(os.getpid(), signal.SIGKILL)
    return futures
  ocp.StandardCheckpointHandler.async_save = async_save
train.train(config, workdir)
"""


def _config():
  config = train.load_recipe("gmp", "tiny")
  config.update(FLAGS)
  return config


def _metrics(workdir) -> list[dict]:
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines if x]


def _state(workdir):
  with ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints",
                             item_names=("state", "meta")) as mngr:
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  return jax.tree.map(np.asarray, restored["state"])


def _same_run(workdir, reference) -> None:
  assert _metrics(workdir) == _metrics(reference)
  a, b = _state(workdir), _state(reference)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  ra = json.loads((pathlib.Path(workdir) / "report.json").read_text())
  rb = json.loads((pathlib.Path(reference) / "report.json").read_text())
  for key in ("eval_loss", "params_active_mean", "tokens_seen", "sparsity_table"):
    assert ra[key] == rb[key], key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  train.train(_config(), workdir)
  return workdir


def _killed_run(where: str, workdir: pathlib.Path) -> None:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, "-c", _DRIVER, where, str(workdir), json.dumps(FLAGS)],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.mark.slow
def test_sigkill_during_a_log_append_resumes_exactly(tmp_path, reference):
  _killed_run("append", tmp_path)
  torn = (tmp_path / "metrics.jsonl").read_text()
  assert not torn.endswith("\n")   # The kill left half a line.
  with pytest.warns(UserWarning, match="dropped 1 torn or unreadable line"):
    train.train(_config(), tmp_path)
  _same_run(tmp_path, reference)


@pytest.mark.slow
def test_sigkill_during_a_save_resumes_exactly(tmp_path, reference):
  _killed_run("save", tmp_path)
  from jaxprune import checkpoint
  assert checkpoint.manager(tmp_path, keep=2).all_steps() == [20]   # 40 never became one.
  train.train(_config(), tmp_path)
  _same_run(tmp_path, reference)


def test_flipped_bytes_in_the_latest_checkpoint_fall_back(tmp_path, reference, caplog):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  (tmp_path / "report.json").unlink()
  data = max((p for p in (tmp_path / "checkpoints" / "40" / "state").rglob("*")
              if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  for pos in range(64, len(raw), max(len(raw) // 16, 1)):
    raw[pos] ^= 0x10
  data.write_bytes(bytes(raw))
  with caplog.at_level("WARNING"):
    train.train(_config(), tmp_path)    # Step 40 is moved aside; 21..40 are redone.
  assert "checkpoint step 40 is unreadable" in caplog.text
  assert [p.name.split(".")[0] for p in (tmp_path / "corrupt_checkpoints").iterdir()] == ["40"]
  _same_run(tmp_path, reference)


def test_garbage_line_in_the_log_is_dropped(tmp_path, reference):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
  lines.insert(1, "\x00\x00garbage {not json\n")
  (tmp_path / "metrics.jsonl").write_text("".join(lines))
  with pytest.warns(UserWarning, match="dropped 1 torn or unreadable line"):
    report = train.train(_config(), tmp_path)
  assert report["eval_loss"] == json.loads((reference / "report.json").read_text())["eval_loss"]
  assert _metrics(tmp_path) == _metrics(reference)   # Rewritten whole, without the garbage.


def test_lost_log_of_a_finished_run_is_recomputed_and_said(tmp_path, reference):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  (tmp_path / "metrics.jsonl").unlink()
  report = train.train(_config(), tmp_path)
  expected = json.loads((reference / "report.json").read_text())
  assert report["eval_loss"] == expected["eval_loss"]
  assert report["params_active_final"] == expected["params_active_final"]
  assert report["final_train_loss"] is None
  assert any("metrics.jsonl was missing" in n and "final_train_loss" in n
             for n in report["notes"])


def test_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path):
  config = _config()
  config.optimizer.update(lr=1e4, warmup_steps=30)   # Finite until the warm-up gets steep.
  with pytest.raises(train.TrainingDiverged, match=r"training diverged: the (train|validation) "
                     r"loss is (nan|-?inf) at step \d+ .* Lower `config.optimizer.lr`"):
    train.train(config, tmp_path)
  assert not (tmp_path / "report.json").exists()
  if any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir()):
    params = _state(tmp_path)["params"]   # What was saved is from before the divergence.
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_perplexity_of_a_huge_loss_is_inf_not_a_crash():
  assert train.perplexity(709.0) == pytest.approx(np.exp(709.0))
  assert train.perplexity(710.0) == float("inf")
  assert train.perplexity(None) is None
