"""Tests for jaxprune.report: per-layer counts, N:M validity, table."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import selection as sel
from jaxprune.report import nm_valid, sparsity_summary


def two_four_kernel():
  # (in=8, out=2) Dense kernel; 2:4 along axis 0 (the input axis).
  k = np.arange(1, 17, dtype=np.float32).reshape(8, 2)
  k[[0, 3, 5, 6], 0] = 0  # Groups rows 0-3 and 4-7 each keep 2.
  k[[1, 2, 4, 7], 1] = 0
  return k


def test_nm_valid_known_answer():
  k = two_four_kernel()
  assert nm_valid(k, 2, 4, axis=0) is True
  bad = k.copy()
  bad[3, 0] = 1.0  # Rows 0-3 of column 0 now hold 3 non-zeros.
  assert nm_valid(bad, 2, 4, axis=0) is False
  assert nm_valid(bad, 3, 4, axis=0) is True
  # Along axis 1 pairs are (x, 0) or (0, x): 1:2.
  assert nm_valid(k, 1, 2, axis=1) is True
  assert nm_valid(k, 2, 4, axis=1) is None  # 2 % 4 != 0.
  assert nm_valid(np.ones(8), 2, 4, axis=0) is None  # Not a kernel.


def test_nm_valid_conv_input_axis():
  k = np.zeros((3, 3, 8, 4), np.float32)
  k[:, :, ::4] = 1.0
  k[:, :, 1::4] = 1.0
  assert nm_valid(k, 2, 4, axis=2) is True
  k[0, 0, 2, 0] = 1.0
  assert nm_valid(k, 2, 4, axis=2) is False


def test_summary_counts_and_nm():
  k = two_four_kernel()
  bad = k.copy()
  bad[3, 0] = 1.0
  params = {"params": {
      "Dense_0": {"kernel": k, "bias": np.array([1.0, 0.0], np.float32)},
      "Dense_1": {"kernel": bad},
      "Dense_2": {"kernel": np.ones((8, 2), np.float32)},  # The output head: dense.
      "step": np.int32(3),  # Scalar: no row.
  }}
  s = sparsity_summary(params, nm=(2, 4))
  rows = {r.path: r for r in s.rows}
  assert list(rows) == ["params/Dense_0/bias", "params/Dense_0/kernel", "params/Dense_1/kernel",
                        "params/Dense_2/kernel"]
  assert rows["params/Dense_0/kernel"][1:] == ((8, 2), 16, 8, 0.5, True, True, "")
  assert rows["params/Dense_1/kernel"][1:] == ((8, 2), 16, 9, 7 / 16, False, True, "")
  assert rows["params/Dense_0/bias"][1:] == ((2,), 2, 1, 0.5, None, False, "")
  # The head is listed, not pruned and not checked.
  assert rows["params/Dense_2/kernel"][1:] == ((8, 2), 16, 16, 0.0, None, False, "head")
  assert (s.total_size, s.total_nnz) == (50, 34)
  assert s.total_sparsity == pytest.approx(16 / 50)
  assert (s.prunable_size, s.prunable_nnz) == (32, 17)
  assert s.prunable_sparsity == pytest.approx(15 / 32)
  assert s.nm_ok is False


def test_summary_without_nm_and_jax_arrays():
  s = sparsity_summary({"w": jnp.eye(4), "b": jnp.zeros(4)})
  assert [r.nm_ok for r in s.rows] == [None, None]
  assert [(r.path, r.nnz) for r in s.rows] == [("b", 0), ("w", 4)]
  assert s.prunable_sparsity == 0.75
  assert "2:4" not in s.table()


def test_summary_with_selection_and_axis_override():
  k = two_four_kernel()
  params = {"a": k, "b": k.T.copy(), "c": np.ones((4, 4), np.float32)}
  selection = sel.select("a|b", overrides={"b": {"axis": 1}})
  s = sparsity_summary(params, nm=(2, 4), select=selection)
  rows = {r.path: r for r in s.rows}
  assert list(rows) == ["a", "b"]
  assert rows["a"].nm_ok is True and rows["b"].nm_ok is True  # b is checked along axis 1.
  assert s.prunable_size == s.total_size == 32
  # Without the override, b (2, 8) would be checked along axis 0 (size 2): not applicable.
  assert sparsity_summary(params, nm=(2, 4)).rows[1].nm_ok is None


def test_summary_nnx_state():
  class M(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(8, 4, rngs=rngs)
      self.norm = nnx.LayerNorm(4, rngs=rngs)

  s = sparsity_summary(nnx.state(M(nnx.Rngs(0))), nm=(2, 4))
  assert [r.path for r in s.rows] == ["fc/bias", "fc/kernel", "norm/bias", "norm/scale"]
  assert [r.selected for r in s.rows] == [False, True, False, False]
  assert s.rows[1].nm_ok is False  # A dense random kernel is not 2:4.


def test_table_and_as_dict():
  k = two_four_kernel()
  s = sparsity_summary({"layer/kernel": k, "layer/bias": np.ones(2, np.float32)}, nm=(2, 4))
  text = str(s)
  assert text == s.table()
  for needle in ("layer/kernel", "layer/bias", "50.00%", "0.00%", "8/16", "2:4 ok", "yes",
                 "total", "(8, 2)"):
    assert needle in text
  lines = text.splitlines()
  assert len({len(line) for line in lines if line.startswith("-")}) == 1
  # Columns are aligned: "shape" starts at the same offset as each shape.
  col = lines[0].index("shape")
  assert lines[2][col:].startswith("(2,)") and lines[3][col:].startswith("(8, 2)")
  d = json.loads(json.dumps(s.as_dict()))
  assert d["total_nnz"] == 10 and d["prunable_sparsity"] == 0.5 and d["nm"] == [2, 4]
  assert d["rows"][1] == {"path": "layer/kernel", "shape": [8, 2], "size": 16, "nnz": 8,
                          "sparsity": 0.5, "nm_ok": True, "selected": True, "note": ""}


def test_nm_argument_checked():
  with pytest.raises(ValueError, match=r"`n` must be in \[1, m\]"):
    sparsity_summary({"w": np.ones((4, 4))}, nm=(5, 4))
