"""Several devices and several processes: a sharded run matches the one-device run (CPU).

Every check runs in subprocesses, because the CPU device count
(``--xla_force_host_platform_device_count``) and ``jax.distributed.initialize`` must be set
before JAX starts its backend. ``_DRIVER`` trains ``recipes/<name>.py:tiny`` on a given
``(data, model)`` mesh and saves what the tests compare: the eval losses, the final params and
the sharding of every leaf of the training state, taken from the arrays the loop checkpoints.

Tolerances. A mesh changes the order of float32 sums, not what is summed: over ``data`` the
gradient and the loss are sums of per-device partial sums, and over ``model`` XLA splits the
matmuls and the global-norm clipping. So results agree to rounding, not bitwise. Measured over
the 40 steps of the tiny preset (jax 0.10.2 and 0.12, four recipes, both meshes): eval losses
within 8.4e-7 (2.5e-7 relative), params within 1e-5 (5e-5 for STEP at XLA's default
optimisation level). Asserted: eval losses to ``EVAL_RTOL`` = 1e-5 and params to
``PARAM_ATOL`` = 2e-4, far below one AdamW step (up to lr = 3e-3) and far below what a wrong
split of the batch or a missing all-reduce gives (~1e-2); the sparsity invariants (exact zero
counts, N:M) hold exactly, and the sparsity pattern equals the one-device run's.

The subprocesses compile with ``--xla_backend_optimization_level=0``: LLVM's optimisation of
each device's code is most of the CPU compile time; it does not change how the program is
partitioned, which is what is tested, and every run here uses it.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

# Multi-device runs train whole models on 8 forced CPU devices: end to end, in the slow suite.
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
RECIPES = ("dense", "gmp", "sr_ste_2of4", "step_2of4")
MESHES = ((8, 1), (4, 2))
EVAL_RTOL = 1e-5
PARAM_ATOL = 2e-4
# The state leaves shaped like each kernel of the block, which must shard like it: Adam's
# moments, and the method's own masks (gmp) or dense master weights (SR-STE, STEP), and STEP's
# per-entry flags of the entries whose v was 0 at the switch (StepState.adam_v).
KINDS = {"dense": {"mu", "nu"}, "gmp": {"mu", "nu", "masks"},
         "sr_ste_2of4": {"mu", "nu", "master"}, "step_2of4": {"mu", "nu", "master", "adam_v"}}
# One checkpoint per run instead of two (checkpoint_every is result-independent): the first
# Orbax save of 8-way sharded state costs seconds of eager slicing on CPU.
ONE_CHECKPOINT = {"checkpoint_every": 40}

_DRIVER = r'''
import json, os, pathlib, runpy, sys

spec = json.loads(sys.argv[1])
out = pathlib.Path(spec["out"])
if "script" in spec:  # One process of a multi-process run: scripts/train.py, its writes noted.
  workdir, writes = os.path.abspath(spec["workdir"]), []

  def audit(event, args):
    try:
      if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if mode else flags & (os.O_WRONLY | os.O_RDWR)
      elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
        path, writing = args[1 if event == "os.rename" else 0], True
      else:
        return
      path = os.path.abspath(os.fsdecode(path))
      if writing and (path + os.sep).startswith(workdir + os.sep):
        writes.append(os.path.relpath(path, workdir))
    except Exception:  # A file descriptor, not a path: never break the run being watched.
      pass

  sys.argv = ["scripts/train.py", *spec["script"]]
  sys.addaudithook(audit)
  code = 0
  try:
    runpy.run_path("scripts/train.py", run_name="__main__")
  except SystemExit as e:
    code = e.code
  finally:
    (out / f"writes.{os.environ['JAX_PROCESS_ID']}.json").write_text(json.dumps(writes))
  sys.exit(code)

import jax
import numpy as np

import jaxprune
from jaxprune import checkpoint, train

captured = {}
_save, _restore = checkpoint.save, checkpoint.restore_latest


def save(mngr, step, state, *args, **kwargs):
  captured["state"] = state  # The loop's own arrays, as its jitted step sharded them.
  _save(mngr, step, state, *args, **kwargs)


def restore_latest(*args, **kwargs):
  restored = _restore(*args, **kwargs)
  if restored is not None:
    captured["restored_step"], captured["state"] = restored[0], restored[1]
  return restored


checkpoint.save, checkpoint.restore_latest = save, restore_latest


def flat(tree):
  return {jax.tree_util.keystr(k, simple=True, separator="/"): v
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def recipe(name, overrides):
  config = runpy.run_path(f"recipes/{name}.py")["get_config"]("tiny")
  config.progress = False
  config.update_from_flattened_dict(overrides)
  return config


if "errors" in spec:
  errors = {}
  for name, overrides in spec["errors"].items():
    try:
      errors[name] = dict(train.make_mesh(recipe("dense", overrides)).shape)
    except Exception as e:
      errors[name] = f"{type(e).__name__}: {e}"
  (out / "errors.json").write_text(json.dumps(errors))

for run in spec.get("runs", []):
  config = recipe(run["recipe"], run["overrides"])
  captured.clear()
  report = train.train(config, run["workdir"])
  state = captured["state"]
  params = jax.device_get(state["params"])
  specs = (jaxprune.resolve(train.selection(config), params, config.sparsity)
           if config.method != "dense" else [None] * len(jax.tree.leaves(params)))
  metrics = pathlib.Path(run["workdir"], "metrics.jsonl").read_text().splitlines()
  mesh = jax.tree.leaves(state)[0].sharding.mesh
  np.savez(out / f"{run['name']}.npz", **flat(params))
  (out / f"{run['name']}.json").write_text(json.dumps({
      "eval_losses": [m["eval_loss"] for m in map(json.loads, metrics) if "eval_loss" in m],
      "nm_valid": report["nm_valid"],
      "restored_step": captured.get("restored_step"),
      "prunable": [k for k, s in zip(flat(params), specs, strict=True) if s is not None],
      "mesh": [dict(mesh.shape), [str(t) for t in mesh.axis_types]],
      "state": {k: [type(v.sharding).__name__, list(v.sharding.spec), list(v.shape)]
                for k, v in flat(state).items()},
  }))
'''


def _env(devices: int, **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
  path = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, "PYTHONPATH": path, **extra}


def _start(spec: dict, devices: int, log: pathlib.Path, **env: str) -> subprocess.Popen:
  with log.open("w") as f:  # A file, not a pipe: gloo and Orbax log a lot.
    return subprocess.Popen([sys.executable, "-c", _DRIVER, json.dumps(spec)], cwd=REPO,
                            env=_env(devices, **env), stdout=f, stderr=subprocess.STDOUT)


def _wait(procs: list[subprocess.Popen], logs: list[pathlib.Path], timeout: float) -> None:
  """Waits for all; once one fails (or the time is up) the others are stopped, not awaited."""
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    if any(p.poll() for p in procs):
      break
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  for p, log in zip(procs, logs, strict=True):
    if p.returncode:
      pytest.fail(f"{log.name} exited with {p.returncode}:\n{log.read_text()[-6000:]}")


def _load(out: pathlib.Path, name: str) -> tuple[dict, dict[str, np.ndarray]]:
  with np.load(out / f"{name}.npz") as params:
    return json.loads((out / f"{name}.json").read_text()), dict(params)


def _runs(tmp: pathlib.Path, prefix: str, meshes, overrides: dict) -> list[dict]:
  return [{"name": f"{r}-{d}x{m}", "recipe": r, "workdir": str(tmp / f"{prefix}-{r}-{d}x{m}"),
           "overrides": {"mesh.data": d, "mesh.model": m, **overrides}}
          for r in RECIPES for d, m in meshes]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> pathlib.Path:
  """Every recipe on one device and on each mesh of 8 devices: three processes side by side."""
  tmp = tmp_path_factory.mktemp("distributed")
  specs = [{"out": str(tmp), "runs": _runs(tmp, "one", [(1, 1)], ONE_CHECKPOINT)}]
  specs += [{"out": str(tmp), "runs": _runs(tmp, "eight", [mesh], ONE_CHECKPOINT)}
            for mesh in MESHES]
  specs[1]["errors"] = {
      "indivisible_batch": {"batch_size": 12, "mesh.data": 8},
      "unused_devices": {"mesh.data": 4, "mesh.model": 1},
      "indivisible_model": {"mesh.data": -1, "mesh.model": 3},
      "all_devices": {"mesh.data": -1, "mesh.model": 2}}
  logs = [tmp / f"driver{i}.log" for i in range(len(specs))]
  _wait([_start(spec, 1 if i == 0 else 8, log)
         for i, (spec, log) in enumerate(zip(specs, logs, strict=True))], logs, timeout=600)
  return tmp


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
@pytest.mark.parametrize("recipe", RECIPES)
def test_mesh_matches_one_device(runs, recipe, mesh):
  ref, ref_params = _load(runs, f"{recipe}-1x1")
  got, params = _load(runs, f"{recipe}-{mesh[0]}x{mesh[1]}")
  assert got["mesh"] == [{"data": mesh[0], "model": mesh[1]}, ["AxisType.Auto"] * 2]
  assert len(ref["eval_losses"]) == 2  # Steps 20 and 40.
  np.testing.assert_allclose(got["eval_losses"], ref["eval_losses"], rtol=EVAL_RTOL)
  assert params.keys() == ref_params.keys()
  for k, ref_p in ref_params.items():
    np.testing.assert_allclose(params[k], ref_p, rtol=0, atol=PARAM_ATOL, err_msg=k)
  for k in ref["prunable"]:
    np.testing.assert_array_equal(params[k] == 0, ref_params[k] == 0, err_msg=k)


@pytest.mark.parametrize("recipe", ["gmp", "sr_ste_2of4", "step_2of4"])
def test_sparsity_holds_exactly_on_every_mesh(runs, recipe):
  for d, m in [(1, 1), *MESHES]:
    summary, params = _load(runs, f"{recipe}-{d}x{m}")
    assert len(summary["prunable"]) == 6  # q, k, v, output, up, down of the one block.
    for k in summary["prunable"]:
      p = params[k]
      if recipe == "gmp":  # Exactly round(0.75 * size) zeros: magnitude_mask's count.
        assert np.sum(p == 0) == round(0.75 * p.size), (d, m, k)
      else:  # At most 2 nonzeros in every 4 consecutive inputs (axis 0) of every output.
        groups = (p.reshape(p.shape[0] // 4, 4, p.shape[1]) != 0).sum(axis=1)
        assert groups.max() <= 2 and np.sum(p == 0) >= p.size // 2, (d, m, k)
    assert summary["nm_valid"] is (None if recipe == "gmp" else True)


@pytest.mark.parametrize("recipe", RECIPES)
def test_state_shards_like_its_parameter(runs, recipe):
  """Masks, master weights and moments of a block's kernel carry the kernel's sharding."""
  for d, m in MESHES:
    summary, _ = _load(runs, f"{recipe}-{d}x{m}")
    state = summary["state"]
    assert {t for t, _, _ in state.values()} == {"NamedSharding"}
    params = {k.removeprefix("params/"): v for k, v in state.items() if k.startswith("params/")}
    for name, (_, spec, shape) in params.items():  # The rule: a 2-D leaf's output axis.
      assert spec == ([None, "model"] if m > 1 and len(shape) == 2 else []), name
    kernels = [k for k in params if k.startswith("layers/") and k.endswith("/kernel")]
    assert len(kernels) == 6  # q, k, v, output, up, down of the one block.
    for name in kernels:
      kinds = set()
      for k, (_, spec, shape) in state.items():
        if k.endswith("/" + name) and not k.startswith("params/") and shape == params[name][2]:
          assert spec == params[name][1], (k, spec, params[name][1])
          kinds.add(k.removesuffix("/" + name).rsplit("/", 1)[-1])
      assert kinds == KINDS[recipe], (name, kinds)


def test_mesh_errors(runs):
  errors = json.loads((runs / "errors.json").read_text())
  assert errors["indivisible_batch"] == (
      "ValueError: `config.batch_size` = 12 must be divisible by the 8 devices of the 'data' "
      "mesh axis.")
  for name, data in [("unused_devices", 4), ("indivisible_model", -1)]:
    assert errors[name].startswith(f"ValueError: `config.mesh` data={data} x model="), name
    assert "must use all 8 devices" in errors[name], name
  assert errors["all_devices"] == {"data": 4, "model": 2}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(runs, tmp_path):
  """scripts/train.py --distributed, twice on loopback (gloo), each with 2 CPU devices.

  The mesh is data=2 (across the processes) x model=2 (within each): every process holds both
  halves of each kernel, as the report's ``jax.device_get`` of the params needs.
  """
  workdir, recipe = tmp_path / "run", "sr_ste_2of4"
  argv = ["--distributed", f"--config=recipes/{recipe}.py:tiny", f"--workdir={workdir}",
          "--config.mesh.model=2", "--config.progress=false"]
  spec = {"out": str(tmp_path), "workdir": str(workdir), "script": argv}
  # JAX reads JAX_COORDINATOR_ADDRESS itself; scripts/train.py passes on the other two.
  env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}", "JAX_NUM_PROCESSES": "2"}
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  _wait([_start(spec, 2, logs[i], JAX_PROCESS_ID=str(i), **env) for i in range(2)], logs,
        timeout=300)

  # Only process 0 writes metrics, reports and checkpoint metadata; process 1 writes only its
  # own shards (tensorstore, not seen here) and their metadata.
  writes = [json.loads((tmp_path / f"writes.{i}.json").read_text()) for i in range(2)]
  assert {"metrics.jsonl", "report.json", "report.md"} <= set(writes[0])
  other = [w for w in writes[1] if w != "." and not w.startswith(".write-test-")]
  assert other and all(w.endswith("/array_metadatas/process_1") for w in other), writes[1]
  assert "# jaxprune training report" in logs[0].read_text()
  assert "# jaxprune training report" not in logs[1].read_text()
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics] == [10, 20, 30, 40]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["20", "40"]  # No temporary steps.

  ref, ref_params = _load(runs, f"{recipe}-1x1")
  report = json.loads((workdir / "report.json").read_text())
  assert report["devices"] == 4 and report["nm_valid"] is True
  np.testing.assert_allclose(report["eval_loss"], ref["eval_losses"][-1], rtol=EVAL_RTOL)

  # Restorable by one process with 4 devices: train() on a copy resumes at step 40.
  shutil.copytree(workdir, tmp_path / "resumed")
  resume = {"out": str(tmp_path), "runs": [{
      "name": "resumed", "recipe": recipe, "workdir": str(tmp_path / "resumed"),
      "overrides": {"mesh.data": -1, "mesh.model": 2}}]}
  _wait([_start(resume, 4, tmp_path / "resume.log")], [tmp_path / "resume.log"], timeout=300)
  got, params = _load(tmp_path, "resumed")
  assert got["restored_step"] == 40
  np.testing.assert_allclose(got["eval_losses"], ref["eval_losses"], rtol=EVAL_RTOL)
  for k, ref_p in ref_params.items():
    np.testing.assert_allclose(params[k], ref_p, rtol=0, atol=PARAM_ATOL, err_msg=k)
