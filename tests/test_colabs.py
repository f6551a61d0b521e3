"""The Colab notebooks in ``colabs/``: committed without outputs, and each runs top to bottom.

Every notebook is executed offline with nbclient on the interpreter that runs the tests, with
small sizes put in a cell inserted after its ``parameters`` cell (papermill's convention), so
that each takes seconds to tens of seconds. The notebooks assert their own results (2:4
validity, sparsity, S->Q against Q->S, exported size, finite fits); the tests then check that
no cell failed, that every plotting cell showed a PNG, and a few values read back from the
kernel. Jupyter's data, runtime and config directories, IPython's, matplotlib's and the
temporary directory are folders under pytest's ``tmp_path``, so nothing of the user's setup leaks
in and the notebooks write nothing elsewhere; the virtual environment is taken off ``PATH``, as
in CI, and the kernel must still run the tests' own interpreter.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLABS = ROOT / "colabs"
CELL_TIMEOUT_S = 300

# The small sizes of each notebook (every name must be set in its `parameters` cell).
SMALL = {
    "quickstart": {"STEPS": 60, "BATCH": 64, "WIDTH": 64},
    "nm_sparsity": {"STEPS": 24, "WIDTH": 32, "DEPTH": 1, "CONTEXT": 32, "BATCH": 8,
                    "EVALS": 3, "EVAL_BATCHES": 2},
    "sparsity_and_quantization": {"STEPS": 30, "QAT_STEPS": 12, "WIDTH": 32, "DEPTH": 1,
                                  "CONTEXT": 32, "BATCH": 8, "EVAL_BATCHES": 2},
    "scaling_laws": {"BOOTSTRAP": 8, "LEAVE_ONE_OUT": False, "CHECKOUT": str(ROOT)},
}

# Values read back from each notebook's kernel after its last cell: a dict expression.
PROBES = {
    "quickstart": """{
        "nm_ok": summary.nm_ok, "sparsity_24": summary.prunable_sparsity,
        "sparsity_gmp": gmp_summary.prunable_sparsity, "final_sparsity": FINAL_SPARSITY,
        "mse": results, "zero_mse": zero_mse}""",
    "nm_sparsity": """{
        "runs": {f"{method} {n}:{m}": {"nm_ok": r["nm_ok"], "val": r["val"][-1],
                                        "flips": [int(f) for f in r["flips"]]}
                 for (method, n, m), r in runs.items()},
        "asp_prune_step": asp_prune_step}""",
    "sparsity_and_quantization": """{
        "cells": [[c["format"], c["sparsity"], c["eps_sq"], c["eps_qs"]] for c in cells],
        "stored_bytes": sizes.stored_bytes, "dense_bytes": sizes.dense_bytes,
        "qat_exact": qat_exact, "qat_loss": qat_loss, "loaded_loss": loaded_loss}""",
    "scaling_laws": """{
        "fits": {k: f.as_dict() for k, f in fits.items()},
        "status": status, "runs": int(data["loss"].size)}""",
}


def notebook_paths() -> list[pathlib.Path]:
  return sorted(COLABS.glob("*.ipynb"))


def read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(COLABS / f"{name}.ipynb", as_version=4)


def parameters_index(nb) -> int:
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"want exactly one cell tagged 'parameters', got {tagged}"
  return tagged[0]


def assigned_names(source: str) -> set[str]:
  return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
          for t in node.targets if isinstance(t, ast.Name)}


def test_every_notebook_has_small_sizes_and_a_probe():
  assert sorted(p.stem for p in notebook_paths()) == sorted(SMALL) == sorted(PROBES)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_committed_without_outputs(name):
  nb = read(name)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  code = [c for c in nb.cells if c.cell_type == "code"]
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, (
        f"{name}.ipynb is committed with outputs: clear them (cell {cell.id!r})")
  # The first code cell installs jaxprune with pip, but only when it is not importable.
  install = code[0].source
  for needle in ("JAXPRUNE_SOURCE = ", 'find_spec("jaxprune") is None', '"pip", "install"'):
    assert needle in install, f"{name}: the first code cell lacks {needle!r}"
  index = parameters_index(nb)
  params = nb.cells[index]
  assert params.cell_type == "code" and index > nb.cells.index(code[0])
  assert not params.source.lstrip().startswith(("import", "%")), "parameters: values only"
  missing = set(SMALL[name]) - assigned_names(params.source)
  assert not missing, f"{name}: the parameters cell does not set {sorted(missing)}"


def install_requirement(name: str, source: str | None = None) -> list[str] | None:
  """The pip command the first code cell runs where jaxprune is not importable (as on Colab),
  with ``JAXPRUNE_SOURCE`` set to ``source``; ``None`` where it is importable."""
  cell = next(c for c in read(name).cells if c.cell_type == "code").source
  if source is not None:
    cell = re.sub(r"^JAXPRUNE_SOURCE = .*$", f"JAXPRUNE_SOURCE = {source!r}", cell, count=1,
                  flags=re.M)
  calls = []
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(importlib.util, "find_spec", lambda name, *a: None)
    mp.setattr(subprocess, "check_call", calls.append)
    exec(compile(cell, f"{name}.ipynb", "exec"), {})  # noqa: S102 (the notebook's own cell)
  return calls[0] if calls else None


@pytest.mark.parametrize("name", sorted(SMALL))
def test_install_cell_uses_the_one_source(name):
  """The default installs the repository; a local checkout (the offline path) installs it
  from disk; the rest of the cell never names a repository."""
  default = install_requirement(name)
  assert default[-1] == "jaxprune[plots] @ git+https://github.com/jaxprune/jaxprune"
  assert default[:4] == [sys.executable, "-m", "pip", "install"]
  assert install_requirement(name, str(ROOT))[-1] == f"{ROOT}[plots]"
  fork = "git+https://example.org/me/jaxprune@branch"
  assert install_requirement(name, fork)[-1] == f"jaxprune[plots] @ {fork}"
  cell = next(c for c in read(name).cells if c.cell_type == "code").source
  assert cell.count("github.com") == 1, "the repository is named in one place"


@pytest.fixture(scope="module")
def jupyter_env(tmp_path_factory):
  """Temporary Jupyter, IPython, matplotlib and temp directories; a kernel on sys.executable."""
  root = tmp_path_factory.mktemp("jupyter")
  with pytest.MonkeyPatch.context() as mp:
    for var, sub in (("JUPYTER_DATA_DIR", "data"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTER_CONFIG_DIR", "config"), ("IPYTHONDIR", "ipython"),
                     ("MPLCONFIGDIR", "matplotlib"), ("TMPDIR", "tmp")):  # The notebooks' files.
      (root / sub).mkdir()
      mp.setenv(var, str(root / sub))
    # The kernel the notebooks ask for ("python3"), on this interpreter. JUPYTER_PATH is
    # searched first, before the user's and the environment's kernel specs.
    spec = root / "path" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)", "language": "python"}))
    mp.setenv("JUPYTER_PATH", str(root / "path"))
    mp.delenv("JUPYTER_CONFIG_PATH", raising=False)
    mp.setenv("JUPYTER_PLATFORM_DIRS", "1")
    mp.delenv("MPLBACKEND", raising=False)  # The kernel's default, inline.
    # As in CI, where the virtual environment is not activated: it is not on PATH.
    bin_dir = pathlib.Path(sys.executable).parent
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and pathlib.Path(p) != bin_dir]
    mp.setenv("PATH", os.pathsep.join(path))
    yield root


def execute(name: str) -> tuple[nbformat.NotebookNode, dict]:
  """Runs the notebook with its small sizes; returns it with outputs and the probe's values."""
  from nbclient import NotebookClient

  nb = read(name)
  small = "\n".join(f"{k} = {v!r}" for k, v in SMALL[name].items())
  injected = nbformat.v4.new_code_cell(
      f"# Injected by tests/test_colabs.py: small sizes.\n{small}",
      metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(parameters_index(nb) + 1, injected)
  probe = nbformat.v4.new_code_cell(
      "import json as _json\nimport sys as _sys\n"
      f"print(_json.dumps({{'executable': _sys.executable, 'values': {PROBES[name]}}}))")
  nb.cells.append(probe)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(COLABS)}})
  start = time.perf_counter()
  client.execute()
  print(f"{name}: {time.perf_counter() - start:.1f} s")
  text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
  return nb, json.loads(text.strip().splitlines()[-1])


def check_outputs(nb) -> None:
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    errors = [o for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"cell {cell.id!r} failed: {errors[0].get('ename')}"
    if "plt.show()" in cell.source or "display(Image(" in cell.source:
      assert any("image/png" in o.get("data", {}) for o in cell.outputs), (
          f"cell {cell.id!r} plots but showed no PNG inline:\n{cell.source[:200]}")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs(name, jupyter_env):
  nb, probe = execute(name)
  check_outputs(nb)
  assert probe["executable"] == sys.executable  # The kernel runs the tests' interpreter.
  CHECKS[name](probe["values"])


def check_quickstart(v):
  assert v["nm_ok"] is True and v["sparsity_24"] == 0.5
  assert abs(v["sparsity_gmp"] - v["final_sparsity"]) < 1e-4
  assert all(math.isfinite(mse) and mse < v["zero_mse"] for mse in v["mse"].values())


def check_nm_sparsity(v):
  runs = v["runs"]
  assert sorted(runs) == sorted(f"{method} {p}" for method in
                                ("nm_asp", "sr_ste", "step", "gradient_flow")
                                for p in ("2:4", "1:8"))
  for label, r in runs.items():
    assert r["nm_ok"] is True and math.isfinite(r["val"]), label
  for p in ("2:4", "1:8"):
    # ASP holds its one-shot mask: no flip after the step that prunes.
    flips = runs[f"nm_asp {p}"]["flips"]
    assert sum(flips[v["asp_prune_step"] + 1:]) == 0 and sum(flips) > 0, flips


def check_sparsity_and_quantization(v):
  for fmt, sparsity, eps_sq, eps_qs in v["cells"]:
    if ":" in sparsity:  # N:M groups inside the scaling groups: S->Q is never worse.
      assert eps_sq <= eps_qs, (fmt, sparsity)
  assert v["stored_bytes"] < v["dense_bytes"]
  assert v["qat_exact"] is True and v["loaded_loss"] == v["qat_loss"]


def check_scaling_laws(v):
  assert v["runs"] > 5
  for fit in v["fits"].values():
    assert all(math.isfinite(fit[k]) for k in ("E", "A", "B", "alpha", "beta", "rmse_log"))
  # The notebook says which fits are degenerate: the N_avg fit's E sits at its bound 0 (as in
  # the committed report), whatever the number of bootstrap resamples.
  assert sorted(v["status"]) == sorted(v["fits"])
  assert any("term E at its bound 0" in reason for reason in v["status"]["N_avg"]), v["status"]


CHECKS = {
    "quickstart": check_quickstart,
    "nm_sparsity": check_nm_sparsity,
    "sparsity_and_quantization": check_sparsity_and_quantization,
    "scaling_laws": check_scaling_laws,
}
