"""scripts/oneshot.py on a trained run (tiny preset): load, prune, report, fine-tune; workdirs
that hold no finished run."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxprune import quant, train
from jaxprune.oneshot import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "oneshot.py")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("oneshot_cli") / "dense"
  config = train.load_recipe("dense", "tiny", directory=ROOT / "recipes")
  config.progress = False
  train.train(config, workdir)
  return workdir


def _cli(*args) -> subprocess.CompletedProcess:
  path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)   # this checkout's jaxprune
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=900, env=env)


@pytest.mark.slow
def test_cli_prunes_reports_and_fine_tunes(tiny_run, tmp_path):
  out, saved = tmp_path / "out.jsonl", tmp_path / "params.npz"
  done = _cli(f"--from={tiny_run}", "--method=sparsegpt", "--nm=2:4", "--quantize=int4",
              "--calibration=16", "--calibration_batch=8", "--finetune_steps=3",
              f"--json={out}", f"--save={saved}")
  assert done.returncode == 0, done.stderr[-4000:]
  assert "layers/0/mlp/down/kernel" in done.stdout and "sparsegpt 2:4+int4" in done.stdout
  result = json.loads(out.read_text())
  report = json.loads((tiny_run / "report.json").read_text())
  assert result["dense_loss"] == pytest.approx(report["eval_loss"], rel=1e-6)
  assert len(result["layers"]) == 6 and all(r["tokens"] == 16 * 32 for r in result["layers"])
  assert all(r["sparsity"] >= 0.5 for r in result["layers"])
  assert result["finetune_nm_valid"] is True and result["finetune_sparsity"] >= 0.5
  assert math.isfinite(result["oneshot_perplexity"]) and math.isfinite(
      result["finetune_perplexity"])
  # The fine-tune was quantization-aware and kept the 2:4 masks: still on the int4 grid.
  with np.load(saved) as params:
    kernels = [k for k in params.files if k.startswith("layers/") and k.endswith("/kernel")]
    assert len(kernels) == 6
    for k in kernels:
      p = params[k]
      np.testing.assert_array_equal(quant.quantize(p, "int4", axis=0, granularity="channel"), p)
      assert np.all((p != 0).reshape(p.shape[0] // 4, 4, -1).sum(1) <= 2), k


def test_load_run_refuses_a_workdir_without_a_finished_run(tiny_run, tmp_path):
  with pytest.raises(ValueError, match="holds no finished run.*no report.json"):
    workdir_lib.load_run(tmp_path)
  unfinished = tmp_path / "unfinished"
  shutil.copytree(tiny_run, unfinished)
  shutil.rmtree(unfinished / "checkpoints" / "40")
  with pytest.raises(ValueError, match="holds no finished run: step 20, the run has 40 steps"):
    workdir_lib.load_run(unfinished)
  run = workdir_lib.load_run(tiny_run)
  assert workdir_lib.evaluate(run) == pytest.approx(
      json.loads((tiny_run / "report.json").read_text())["eval_loss"], rel=1e-6)
  batches = workdir_lib.calibration_batches(run, 20, 8)
  assert [b.shape for b in batches] == [(8, 32), (8, 32), (4, 32)]
  assert jax.tree.leaves(batches)[0].dtype == np.int32


@pytest.mark.slow
def test_cli_error_for_an_unfinished_workdir(tmp_path):
  done = _cli(f"--from={tmp_path}", "--method=wanda", "--sparsity=0.5")
  assert done.returncode != 0 and "holds no finished run" in done.stderr


@pytest.mark.slow
def test_finetune_holds_the_one_shot_masks_or_refines_them_with_sr_ste(tiny_run):
  from flax import nnx

  import jaxprune
  from jaxprune import oneshot
  from jaxprune.oneshot import finetune as finetune_lib

  for method in ("mask", "sr_ste"):
    run = workdir_lib.load_run(tiny_run)
    result = oneshot.prune(run.model, None, method="magnitude", nm=(2, 4))
    losses = finetune_lib.finetune(run, run.model, result.masks, steps=3, lr=1e-3,
                                   method=method, nm=(2, 4))
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    params = nnx.state(run.model, nnx.Param)
    assert jaxprune.sparsity_summary(params, nm=(2, 4), select=jaxprune.select()).nm_ok
    kernels = dict(zip(jaxprune.leaf_paths(params), jax.tree.leaves(params), strict=True))
    for path, kept in result.masks.items():
      if method == "mask":   # Exactly the one-shot zeros, and the kept weights moved.
        np.testing.assert_array_equal(np.asarray(kernels[path]) != 0, kept)
  with pytest.raises(ValueError, match="needs `nm`|give `nm`"):
    finetune_lib.finetune(run, run.model, {}, steps=1, method="sr_ste")
