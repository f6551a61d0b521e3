"""One-shot calibration data-parallel over 8 CPU devices matches one device.

As in tests/test_distributed.py, each run is a subprocess, because the CPU device count
(``--xla_force_host_platform_device_count``) must be set before JAX starts. The driver prunes
a small transformer with SparseGPT (unstructured and 2:4) and quantizes one with GPTQ, with the
calibration batches split over a ``('data',)`` mesh of all devices, and saves the params, the
masks and the report. The Hessian sums are all-reduced across devices, so they agree with one
device to float32 rounding (sums in another order), not bitwise: asserted are identical masks
and zero patterns, params within ``ATOL`` and relative errors within ``RTOL``.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

# Calibration on 8 forced CPU devices against one: end to end, in the slow suite.
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
ATOL = 1e-5
RTOL = 1e-4

_DRIVER = r'''
import json, pathlib, sys
import jax, numpy as np
from flax import nnx
from jaxprune import oneshot
from jaxprune.models import Transformer

out = pathlib.Path(sys.argv[1])
rng = np.random.default_rng(0)
batches = [rng.integers(0, 64, (8, 8)).astype(np.int32) for _ in range(3)]
devices = jax.devices()
mesh = jax.make_mesh((len(devices),), ("data",)) if len(devices) > 1 else None
runs = {"sgpt50": dict(method="sparsegpt", sparsity=0.5),
        "sgpt24": dict(method="sparsegpt", nm=(2, 4)),
        "gptq4": dict(method=None, quantize="int4")}
for name, kwargs in runs.items():
  model = Transformer(vocab_size=64, context=8, width=16, depth=1, heads=2, rngs=nnx.Rngs(0))
  result = oneshot.prune(model, batches, mesh=mesh, **kwargs)
  flat = {k: np.asarray(v) for k, v in result.masks.items()}
  params = {"/".join(map(str, p)): np.asarray(v)
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  np.savez(out / f"{name}-{len(devices)}.npz", **{"mask:" + k: v for k, v in flat.items()},
           **{"param:" + k: v for k, v in params.items()})
  (out / f"{name}-{len(devices)}.json").write_text(json.dumps(result.report.as_dict()))
'''


def _run(devices: int, out: pathlib.Path, log: pathlib.Path) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(filter(None, [
      str(REPO), env.get("PYTHONPATH")])),
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                "--xla_backend_optimization_level=0")
  with log.open("w") as f:
    return subprocess.Popen([sys.executable, "-c", _DRIVER, str(out)], cwd=REPO, env=env,
                            stdout=f, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("oneshot_distributed")
  logs = [out / "one.log", out / "eight.log"]
  procs = [_run(1, out, logs[0]), _run(8, out, logs[1])]
  for p, log in zip(procs, logs, strict=True):
    try:
      p.wait(timeout=900)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
    if p.returncode:
      pytest.fail(f"{log.name} exited with {p.returncode}:\n{log.read_text()[-6000:]}")
  return out


@pytest.mark.parametrize("name", ["sgpt50", "sgpt24", "gptq4"])
def test_eight_devices_match_one(runs, name):
  one, eight = (np.load(runs / f"{name}-{n}.npz") for n in (1, 8))
  assert one.files == eight.files
  for k in one.files:
    if k.startswith("mask:"):
      np.testing.assert_array_equal(eight[k], one[k], err_msg=k)
    else:
      np.testing.assert_array_equal(eight[k] == 0, one[k] == 0, err_msg=k)
      np.testing.assert_allclose(eight[k], one[k], rtol=0, atol=ATOL, err_msg=k)
  reports = [json.loads((runs / f"{name}-{n}.json").read_text()) for n in (1, 8)]
  assert [r["devices"] for r in reports] == [1, 8]
  for a, b in zip(reports[0]["layers"], reports[1]["layers"], strict=True):
    assert a["path"] == b["path"] and a["tokens"] == b["tokens"] == 3 * 8 * 8
    assert b["error"] == pytest.approx(a["error"], rel=RTOL)
  assert any(k.startswith("mask:") for k in one.files) == (name != "gptq4")
