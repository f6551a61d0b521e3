"""scripts/compress_report.py end to end on the tiny dense model (trained in the test)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import pathlib

import jax
import numpy as np
import pytest

import jaxprune
from jaxprune.compress import compress_params

# Runs scripts/compress_report.py on a trained model: end to end, in the slow suite.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIELDS = ("eps_s", "eps_q", "eps_sq", "eps_qs", "out_eps_s", "out_eps_q", "out_eps_sq",
          "out_eps_qs")


@pytest.fixture(scope="module")
def script():
  spec = importlib.util.spec_from_file_location("compress_report",
                                                ROOT / "scripts" / "compress_report.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def run(script, tmp_path_factory):
  """``(report, out, workdir)`` of one run with the default grid on the tiny preset."""
  tmp = tmp_path_factory.mktemp("compress_report")
  out, workdir = tmp / "report.md", tmp / "run"
  report = script.run(str(workdir), out=str(out), preset="tiny",
                      formats=script._FORMATS.default, sparsities=script._SPARSITIES.default,
                      eval_batches=2)
  return report, out, workdir


def test_every_cell_is_there_with_sane_errors(script, run):
  report, _, _ = run
  cells = {(c["format"], c["sparsity"]): c for c in report["cells"]}
  assert list(cells) == list(itertools.product(script._FORMATS.default,
                                               script._SPARSITIES.default))
  assert "mxfp6_e2m3" in report["loss_q"] and report["input_rows"] == 8 * 32
  for c in cells.values():
    assert len(c["layers"]) == 6  # q, k, v, output, up, down of the one block.
    for row in [*c["layers"], c["total"]]:
      for field in FIELDS:
        assert math.isfinite(row[field]) and 0.0 <= row[field] <= 1.5, (c["format"], field)
    assert all(math.isfinite(v) for v in c["loss"].values())


def test_sq_never_worse_than_qs_where_the_theorem_applies(run):
  # N:M groups lie along the input axis; MX blocks of 32 and NVFP4 blocks of 16 run along it
  # (m divides both), NVFP4's tensor scale spans every group, and int scales are per output
  # channel (reduced over it): every group is inside one scaling group.
  report, _, _ = run
  covered = [c for c in report["cells"] if c["nm"] and (
      c["format"].startswith("int") or 16 % c["nm"][1] == 0)]
  assert len(covered) == 12
  for c in covered:
    for row in [*c["layers"], c["total"]]:
      assert row["eps_sq"] <= row["eps_qs"] + 1e-12, (c["format"], c["sparsity"], row["path"])


def test_compressed_sizes(run):
  report, _, _ = run
  for c in report["cells"]:
    assert c["stored_bytes"] < c["dense_bytes"], (c["format"], c["sparsity"])
  # MX, kernels with 32 | fan-in: n/m * (element bits + 2-bit index) + an 8-bit scale per 32.
  mxfp4 = {c["sparsity"]: c["bits_per_weight"] for c in report["cells"]
           if c["format"] == "mxfp4_e2m1"}
  assert mxfp4["2:4"] == pytest.approx(0.5 * (4 + 2) + 8 / 32)
  assert mxfp4["1:4"] == pytest.approx(0.25 * (4 + 2) + 8 / 32)
  # NVFP4, next to it: an 8-bit E4M3 scale per 16, and a float32 per kernel (6 kernels).
  nvfp4 = {c["sparsity"]: c["bits_per_weight"] for c in report["cells"]
           if c["format"] == "nvfp4"}
  per_tensor = 32 * len(report["layers"]) / report["weights"]
  assert nvfp4["2:4"] == pytest.approx(0.5 * (4 + 2) + 8 / 16 + per_tensor)
  assert nvfp4["1:4"] == pytest.approx(0.25 * (4 + 2) + 8 / 16 + per_tensor)


def test_markdown_and_json(script, run):
  report, out, _ = run
  text = out.read_text()
  assert "| format | sparsity | eps_s | eps_q | eps_sq | eps_qs | gap |" in text
  for c in report["cells"]:
    assert f"| {c['format']} | {c['sparsity']} |" in text
    assert c["table"] in text  # The per-layer table.
  assert "## Findings" in text and "Finding 1" in text and "Finding 2" in text
  saved = json.loads(out.with_suffix(".json").read_text())
  assert len(saved["cells"]) == len(report["cells"]) and saved["findings"] == report["findings"]


def test_compress_params_is_the_export(script, run):
  # The S->Q losses are taken on compress_params, which must be what the export stores.
  _, _, workdir = run
  _, params, _, _ = script.load_params(workdir)
  sq = compress_params(params, "mxfp4_e2m1", nm=(2, 4))
  exported = jaxprune.decompress(jaxprune.export_compressed(params, fmt="mxfp4_e2m1", nm=(2, 4)))
  assert jaxprune.leaf_paths(sq) == jaxprune.leaf_paths(exported)
  for a, b in zip(jax.tree.leaves(sq), jax.tree.leaves(exported), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_harma_rows(script, run):
  # --int_conventions=absmax,harma: a second row per int format with Harma et al.'s quantizer,
  # whose finer step (2 amax / 15 against amax / 7) gives the smaller int4 error, at equal size.
  _, _, workdir = run
  report = script.evaluate(workdir, ["int4", "mxfp4_e2m1"], ["2:4"], eval_batches=2,
                           int_conventions=["absmax", "harma"])
  cells = {c["format"]: c for c in report["cells"]}
  assert list(cells) == ["int4", "int4 (harma)", "mxfp4_e2m1"]
  ours, harma = cells["int4"], cells["int4 (harma)"]
  assert (harma["element_format"], harma["convention"]) == ("int4", "harma")
  assert harma["total"]["eps_q"] < ours["total"]["eps_q"]
  assert harma["stored_bytes"] == ours["stored_bytes"]
  report["findings"] = script.findings(report)
  assert "| int4 (harma) | 2:4 |" in script.markdown(report)
  with pytest.raises(ValueError, match="`int_conventions`"):
    script.variants(["int4"], ["gptq"])
