"""Tests for jaxprune.compress: known answers, the S->Q theorem, bit-exact export, sizes, errors."""

from __future__ import annotations

import functools
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxprune import masks, quant
from jaxprune import selection as sel
from jaxprune.compress import (
    compress,
    compressed_size_report,
    decompress,
    error_analysis,
    export_compressed,
    load_compressed,
    save_compressed,
    uniform_quantize,
)

F32 = np.float32
HYPOTHESIS = settings(max_examples=15, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow])
STEP_QUARTER = functools.partial(uniform_quantize, step=0.25)


def bits(a) -> np.ndarray:
  a = np.ascontiguousarray(a)
  return a.view(np.dtype(f"uint{8 * a.dtype.itemsize}"))


def assert_bits_equal(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.dtype == expected.dtype and actual.shape == expected.shape
  bad = bits(actual) != bits(expected)
  assert not bad.any(), f"{bad.sum()} differ: got {actual[bad][:4]}, expected {expected[bad][:4]}"


def l1(x, y) -> float:
  return float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).sum())


def l2(x, y) -> float:
  return float(np.sqrt(((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2).sum()))


# ---------------------------------------------------------------------------
# compress: known answers.
# ---------------------------------------------------------------------------
X_PAPER = np.array([0.24, 0.26, 1.0, 0.0], F32)


@pytest.mark.parametrize("fmt, kwargs", [
    # A fixed grid of step 0.25: Q(x) = 0.25 * RNE(4 x).
    (STEP_QUARTER, {}),
    # mxfp4 with one block of 4: amax = 1 gives the shared exponent e = 0 - emax = -2, so the
    # grid is 0.25 * {0, 0.5, 1, 1.5, 2, ...}; 0.24 and 0.26 both round to 0.25 (element 1.0).
    ("mxfp4_e2m1", {"block_size": 4}),
])
def test_known_answer_order(fmt, kwargs):
  # Q->S: Q(x) = [0.25, 0.25, 1, 0]; the tied 0.25s keep the lower index -> [0.25, 0, 1, 0],
  # L1 error 0.01 + 0.26 = 0.27. S->Q: keep 1.0 and 0.26 -> [0, 0.25, 1, 0], error 0.24 + 0.01.
  qs = compress(X_PAPER, fmt, nm=(2, 4), order="qs", **kwargs)
  sq = compress(X_PAPER, fmt, nm=(2, 4), order="sq", **kwargs)
  np.testing.assert_array_equal(qs, [0.25, 0.0, 1.0, 0.0])
  np.testing.assert_array_equal(sq, [0.0, 0.25, 1.0, 0.0])
  assert l1(X_PAPER, qs) == pytest.approx(0.27, abs=1e-6)
  assert l1(X_PAPER, sq) == pytest.approx(0.25, abs=1e-6)


def test_qs_tie_rules_follow_masks():
  x = np.array([0.26, 0.24, 0.3, 0.2], F32)  # All quantize to 0.25: a four-way tie.
  np.testing.assert_array_equal(compress(x, STEP_QUARTER, nm=(2, 4), order="qs"),
                                [0.25, 0.25, 0, 0])  # N:M keeps the lower indices.
  np.testing.assert_array_equal(compress(x, STEP_QUARTER, sparsity=0.5, order="qs"),
                                [0.25, 0.25, 0, 0])  # Unstructured prunes higher indices first.
  np.testing.assert_array_equal(compress(x, STEP_QUARTER, nm=(2, 4)), [0.25, 0, 0.25, 0])


def test_zeros_are_positive():
  # int4, one tensor scale. 3:4 keeps -0.002, which rounds to zero:
  # quantize gives -0.0, compress +0.0. Pruned entries are exactly +0.0 too.
  x = np.array([1.4, -0.002, -0.001, 0.6], F32)
  y = np.asarray(compress(x, "int4", nm=(3, 4)))
  np.testing.assert_allclose(y, [1.4, 0.0, 0.0, 0.6], rtol=1e-6)
  assert not np.signbit(y).any()
  assert np.signbit(jax.jit(quant.quantize, static_argnums=1)(x[:2], "int4"))[1]


def test_compress_is_the_composition_of_masks_and_quantize():
  x = np.random.default_rng(0).normal(size=(16, 8)).astype(F32)

  @jax.jit
  def by_hand(x):
    q = functools.partial(quant.quantize, fmt="mxfp4_e2m1", axis=0, block_size=8)
    m = masks.nm_mask(jnp.abs(x), 2, 4, axis=0)
    qx = q(x)
    return (jnp.where(m, q(jnp.where(m, x, 0.0)), 0.0),
            jnp.where(masks.magnitude_mask(jnp.abs(qx), 0.75), qx, 0.0), jnp.where(m, x, 0.0), qx)

  sq, qs, s, qx = by_hand(x)
  np.testing.assert_array_equal(compress(x, "mxfp4_e2m1", nm=(2, 4), axis=0, block_size=8), sq)
  np.testing.assert_array_equal(
      compress(x, "mxfp4_e2m1", sparsity=0.75, axis=0, block_size=8, order="qs"), qs)
  # No fmt: sparsity only; no sparsity: quantization only (with +0.0 zeros).
  np.testing.assert_array_equal(compress(x, None, nm=(2, 4), axis=0), s)
  np.testing.assert_array_equal(compress(x, "mxfp4_e2m1", axis=0, block_size=8), qx)


@pytest.mark.parametrize("order", ["sq", "qs"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_nan_in_its_group_never_silent(order, bad):
  # One int8 scale per row (channel): row 0 holds the non-finite value, row 1 does not.
  x = np.array([[1.0, bad, 0.5, 0.25], [1.0, 0.1, 0.5, 0.25]], F32)
  y = np.asarray(compress(x, "int8", nm=(2, 4), granularity="channel", order=order))
  # The non-finite entry and the largest finite one are kept and NaN; pruned ones stay 0.
  np.testing.assert_array_equal(np.isnan(y[0]), [True, True, False, False])
  assert (y[0, 2:] == 0).all()
  np.testing.assert_allclose(y[1], [1.0, 0.0, 0.5, 0.0], rtol=1e-2)


@pytest.mark.parametrize("call, message", [
    (lambda x: compress(x, "int9", nm=(2, 4)), "Unknown format `fmt`='int9'"),
    (lambda x: compress(x, "int8", nm=(2, 4), sparsity=0.5), "not both"),
    (lambda x: compress(x, "int8", order="q->s"), "`order` must be one of"),
    (lambda x: compress(x.astype(np.int32), "int8"), "floating-point input, got dtype int32"),
    (lambda x: compress(x, None), "nothing to do"),
    (lambda x: compress(x, STEP_QUARTER, block_size=4), "settings of a named `fmt`"),
    (lambda x: compress(x, "int8", nm=2), "`nm` must be a pair"),
    (lambda x: compress(x, "int8", nm=(5, 4)), "`n` must be in [1, m]"),
    (lambda x: compress(x, "int8", nm=(2, 3)), "`m` = 3 must divide the size 8"),
    (lambda x: compress(x, "int8", sparsity=1.0), "`sparsity` must be in [0, 1)"),
    (lambda x: compress(x, "int8", block_size=3), "`block_size`=3 must divide"),
])
def test_compress_bad_input(call, message):
  with pytest.raises(ValueError) as e:
    call(np.ones((2, 8), F32))
  assert message in str(e.value)


# ---------------------------------------------------------------------------
# The theorem: S->Q is never worse than Q->S.
# ---------------------------------------------------------------------------
# (fmt, quantize settings, structure): every N:M group lies inside one scaling group (a block
# of the same axis that m divides, a channel or the tensor); unstructured sparsity only with one
# scale for the whole tensor (or a fixed grid), as the theorem needs.
THEOREM_CASES = [
    ("int4", {}, {"nm": (2, 4)}),
    ("int3", {"granularity": "channel"}, {"nm": (1, 4)}),
    ("int8", {"block_size": 8}, {"nm": (2, 8)}),
    ("fp8_e4m3", {"block_size": 4}, {"nm": (2, 4)}),
    ("mxfp4_e2m1", {"block_size": 8}, {"nm": (2, 4)}),
    ("mxfp6_e3m2", {"block_size": 16}, {"nm": (1, 4)}),
    ("mxint8", {"block_size": 8}, {"nm": (2, 4)}),
    ("nvfp4", {}, {"nm": (2, 4)}),  # blocks of 16 and the tensor: both hold whole groups
    ("int4", {}, {"sparsity": 0.5}),
    (STEP_QUARTER, {}, {"sparsity": 0.75}),
]

# Values on a coarse grid give many ties, in |x| and after quantization.
_ELEMENTS = st.one_of(
    st.floats(-4, 4, width=32, allow_subnormal=False),
    st.integers(-16, 16).map(lambda i: i / 8),
)


@pytest.mark.parametrize("fmt, qkw, skw", THEOREM_CASES,
                         ids=[f"{getattr(f, 'func', f).__name__ if callable(f) else f}-{s}"
                              for f, _, s in THEOREM_CASES])
@HYPOTHESIS
@given(x=hnp.arrays(F32, (4, 16), elements=_ELEMENTS))
def test_sq_never_worse_than_qs(fmt, qkw, skw, x):
  """Harma et al. 2024: ||x - SQ(x)||_1 <= ||x - QS(x)||_1 (L1, the paper's error; L2 too)."""
  sq = compress(x, fmt, order="sq", **qkw, **skw)
  qs = compress(x, fmt, order="qs", **qkw, **skw)
  scale = float(np.abs(x).sum()) + 1.0
  assert l1(x, sq) <= l1(x, qs) + 1e-6 * scale
  assert l2(x, sq) <= l2(x, qs) + 1e-6 * scale


def test_theorem_needs_groups_inside_scaling_groups():
  # Unstructured 50% with int2 blocks of 2: S->Q keeps 1.0 and 0.5 (block A, where 0.5 rounds
  # to 0) and prunes block B; Q->S keeps 0.45 (exact in block B's own scale) instead.
  x = np.array([1.0, 0.5, 0.45, 0.001], F32)
  sq = compress(x, "int2", sparsity=0.5, block_size=2)
  qs = compress(x, "int2", sparsity=0.5, block_size=2, order="qs")
  np.testing.assert_array_equal(sq, [1, 0, 0, 0])
  np.testing.assert_array_equal(qs, [1, 0, x[2], 0])
  assert l1(x, sq) == pytest.approx(0.951) and l1(x, qs) == pytest.approx(0.501)


# ---------------------------------------------------------------------------
# Error analysis.
# ---------------------------------------------------------------------------
def test_error_analysis_known_answer():
  # One (in=4, out=1) kernel; 2:4 along the input axis; mxfp4 with a block of 4 acts as the
  # 0.25 grid above. ||W||^2 = 0.24^2 + 0.26^2 + 1 = 1.1252. Errors^2:
  # S: 0.24^2; Q: 2 * 0.01^2; S->Q: 0.24^2 + 0.01^2; Q->S: 0.01^2 + 0.26^2.
  params = {"dense": {"kernel": X_PAPER[:, None], "bias": np.zeros(1, F32)}}
  x = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], F32)  # Outputs y = [0.24, 0.26].
  res = error_analysis(params, "mxfp4_e2m1", nm=(2, 4), block_size=4,
                       inputs={"dense/kernel": x})
  (row,) = res.rows
  assert row.path == "dense/kernel" and row.shape == (4, 1)
  err2 = np.array([0.24**2, 2e-4, 0.24**2 + 1e-4, 1e-4 + 0.26**2])
  expected = np.sqrt(err2 / 1.1252)
  np.testing.assert_allclose([row.eps_s, row.eps_q, row.eps_sq, row.eps_qs], expected, rtol=1e-5)
  assert row.gap == pytest.approx(expected[2] - expected[0] - expected[1], rel=1e-5)
  np.testing.assert_allclose([row.out_eps_s, row.out_eps_q, row.out_eps_sq, row.out_eps_qs],
                             np.sqrt(err2 / (0.24**2 + 0.26**2)), rtol=1e-5)
  assert res.total[2:] == pytest.approx(row[2:])
  table = res.table()
  assert "mxfp4_e2m1, 2:4" in table and "dense/kernel" in table and "out_eps_qs" in table
  assert "total" in table.splitlines()[-1]


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_error_analysis_matches_compress_and_pools_totals(fmt):
  rng = np.random.default_rng(2)
  params = {"a": {"kernel": rng.normal(size=(16, 8)).astype(F32)},
            "b": {"kernel": 3 * rng.normal(size=(16, 8)).astype(F32)},
            "embed": {"embedding": rng.normal(size=(8, 8)).astype(F32)}}
  # The default selection leaves the output head (the last kernel, b) dense.
  assert [r.path for r in error_analysis(params, "int4", sparsity=0.5).rows] == ["a/kernel"]
  res = error_analysis(params, fmt, sparsity=0.5, select=sel.select(head=None))
  assert [r.path for r in res.rows] == ["a/kernel", "b/kernel"]
  num, den = np.zeros(4), 0.0
  for r in res.rows:
    w = params[r.path.split("/")[0]]["kernel"]
    outs = [compress(w, None, sparsity=0.5), compress(w, fmt, axis=0),
            compress(w, fmt, sparsity=0.5, axis=0),
            compress(w, fmt, sparsity=0.5, axis=0, order="qs")]
    e2 = np.array([l2(w, c) ** 2 for c in outs])
    np.testing.assert_allclose(r[2:6], np.sqrt(e2) / np.linalg.norm(w), rtol=1e-6)
    assert r.out_eps_s is None
    num, den = num + e2, den + float((w.astype(np.float64) ** 2).sum())
  np.testing.assert_allclose(res.total[2:6], np.sqrt(num / den), rtol=1e-6)
  assert res.rows[0].eps_sq <= res.rows[0].eps_qs


@pytest.mark.parametrize("kwargs, message", [
    ({"inputs": {"embed/embedding": np.ones((2, 8))}}, "is not a selected leaf"),
    ({"inputs": {"a/kernel": np.ones((2, 3))}}, "must be (batch, 16)"),
    ({"fmt": None}, "needs a quantization `fmt`"),
    ({"fmt": "fp4"}, "Unknown format"),
    ({"nm": (2, 3)}, "m=3 does not divide size 16 of axis 0"),
])
def test_error_analysis_bad_input(kwargs, message):
  params = {"a": {"kernel": np.ones((16, 8), F32)}, "embed": {"embedding": np.ones((8, 8), F32)}}
  kwargs = {"fmt": "int8", "nm": (2, 4), **kwargs}
  with pytest.raises(ValueError) as e:
    error_analysis(params, kwargs.pop("fmt"), **kwargs)
  assert message in str(e.value)


def test_error_analysis_refuses_non_finite_weights():
  params = {"a": {"kernel": np.ones((16, 8), F32)}}
  params["a"]["kernel"][0, 0] = np.nan
  with pytest.raises(ValueError, match="a/kernel: non-finite weights"):
    error_analysis(params, "int8", nm=(2, 4))


# ---------------------------------------------------------------------------
# Export: bit-exact round trips.
# ---------------------------------------------------------------------------
def _params(shape=(64, 8), dtype=F32, seed=0):
  rng = np.random.default_rng(seed)
  return {"layer": {"kernel": rng.normal(size=shape).astype(dtype),
                    "bias": rng.normal(size=shape[-1:]).astype(dtype)}}


STRUCTURES = {"2:4": {"nm": (2, 4)}, "1:4": {"nm": (1, 4)},
              "50%": {"sparsity": 0.5}, "75%": {"sparsity": 0.75}}
FMT_CASES = {  # Formats and scale granularities; the N:M axis is the kernel's input axis 0.
    "int8": {}, "int4-block16": {"block_size": 16}, "fp8_e4m3-channel": {"granularity": "channel"},
    "mxfp4_e2m1": {}, "mxfp6_e3m2": {}, "mxint8": {}, "nvfp4": {},
}


def _check_round_trip(params, fmt, qkw, skw, dtype=F32):
  c = export_compressed(params, fmt=fmt, **qkw, **skw)
  out = decompress(c)
  kernel = params["layer"]["kernel"]
  assert_bits_equal(out["layer"]["kernel"], compress(kernel, fmt, axis=0, **qkw, **skw))
  assert_bits_equal(out["layer"]["bias"], params["layer"]["bias"])  # Not selected: as is.
  assert out["layer"]["kernel"].dtype == dtype
  return c


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("case", FMT_CASES)
def test_export_round_trip_bit_exact(case, structure):
  fmt = case.split("-")[0]
  c = _check_round_trip(_params(), fmt, FMT_CASES[case], STRUCTURES[structure])
  fields = c.leaves[1]  # Leaves in tree order: layer/bias, layer/kernel.
  f = quant.get_format(fmt)
  kept = 64 * 8 // 4 * {"2:4": 2, "1:4": 1, "50%": 2, "75%": 1}[structure]
  assert fields["values"].nbytes == kept * f.bits // 8
  assert fields["values"].dtype == (np.int8 if fmt in ("int8", "mxint8") else np.uint8)
  if structure in ("2:4", "1:4"):
    assert fields["index"].dtype == np.uint8 and fields["index"].nbytes == kept * 2 // 8
  else:
    assert fields["mask"].dtype == np.uint8 and fields["mask"].nbytes == 64 * 8 // 8
  scales = {"int8": (1, 1), "int4-block16": (8, 4), "fp8_e4m3-channel": (8, 1),
            "nvfp4": (8, 4)}.get(case, (8, 2))
  assert fields["scales"].shape == scales
  assert fields["scales"].dtype == (np.float32 if f.kind in ("int", "fp") else np.uint8)
  if f.kind == "nvfp4":  # E4M3 block scales and one float32 per tensor
    assert fields["tensor_scale"].shape == (1,) and fields["tensor_scale"].dtype == np.float32
  else:
    assert "tensor_scale" not in fields


@pytest.mark.parametrize("fmt, skw", [
    ("int2", {"nm": (3, 8)}), ("int3", {"nm": (1, 2)}), ("int5", {}),
    ("int6", {"nm": (2, 4)}), ("int7", {"nm": (4, 16)}), ("fp8_e5m2", {"nm": (2, 4)}),
    ("mxfp8_e4m3", {}), ("mxfp8_e5m2", {"nm": (2, 4)}),
    ("mxfp6_e2m3", {"nm": (2, 4)}), (None, {"nm": (2, 4)}), (None, {"sparsity": 0.6}),
])
def test_export_round_trip_other_formats(fmt, skw):
  _check_round_trip(_params(), fmt, {}, skw)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
def test_export_round_trip_low_precision_leaves(dtype):
  _check_round_trip(_params(dtype=dtype), "int4", {}, {"nm": (2, 4)}, dtype=dtype)


def test_nvfp4_export_round_trip_bfloat16_and_zero_leaves():
  _check_round_trip(_params(dtype=jnp.bfloat16), "nvfp4", {}, {"nm": (2, 4)},
                    dtype=jnp.bfloat16)
  # A zero kernel (s_t = 0): zero scales, and it decodes to +0.0 as compress gives.
  params = {"layer": {"kernel": np.zeros((64, 8), F32), "bias": np.ones(8, F32)}}
  fields = _check_round_trip(params, "nvfp4", {}, {}).leaves[1]
  assert fields["tensor_scale"][0] == 0 and not fields["scales"].any()


def test_export_known_layout():
  # An (in=8, out=1) kernel, 2:4 along the input axis, int4 with one tensor scale 7 / 7 = 1.
  w = np.array([7, 1, -2, 0, 0, 3, 0, -7], F32)[:, None]
  c = export_compressed({"k": w}, fmt="int4", nm=(2, 4))
  fields = c.leaves[0]
  # Kept: 7, -2 (positions 0, 2) and 3, -7 (positions 1, 3). Nibbles low first: 0xE7, 0x93.
  np.testing.assert_array_equal(fields["values"], [0xE7, 0x93])
  np.testing.assert_array_equal(fields["index"], [0 | 2 << 2 | 1 << 4 | 3 << 6])
  np.testing.assert_array_equal(fields["scales"], [[1.0]])
  # Unstructured 50%: the bitmask of positions 0, 2, 5, 7 (little-endian bits), same values.
  fields = export_compressed({"k": w}, fmt="int4", sparsity=0.5).leaves[0]
  np.testing.assert_array_equal(fields["mask"], [1 | 1 << 2 | 1 << 5 | 1 << 7])
  np.testing.assert_array_equal(fields["values"], [0xE7, 0x93])
  # MX: amax 1 in a block of 32 gives the E8M0 exponent e = 0 - emax = -2, stored as 125;
  # mxfp4 codes are float4_e2m1fn bit patterns: w / 2^e = 4 -> 0b0110.
  w = np.zeros((32, 1), F32)
  w[0] = 1.0
  fields = export_compressed({"k": w}, fmt="mxfp4_e2m1").leaves[0]
  np.testing.assert_array_equal(fields["scales"], [[125]])
  assert fields["values"][0] == np.array(4.0, ml_dtypes.float4_e2m1fn).view(np.uint8) == 0b0110


def test_nvfp4_export_known_layout():
  # An (in=32, out=1) kernel: amax 2688 gives s_t = 2688 / (448 * 6) = 1. Block 0 (max 2688):
  # s_b = 448, E4M3 0b0_1111_110 = 0x7E; block 1 (max 96): s_b = 16, 0b0_1011_000 = 0x58.
  # Codes (E2M1 bit patterns, sign exponent(bias 1) mantissa): 2688 / 448 = 6 -> 0b0111;
  # -896 / 448 = -2 -> 0b1100;
  # 96 / 16 = 6 -> 0b0111; 40 / 16 = 2.5 -> 2 (ties to even) -> 0b0100. Nibbles low first.
  w = np.zeros((32, 1), F32)
  w[[0, 1, 16, 17], 0] = [2688, -896, 96, 40]
  c = export_compressed({"k": w}, fmt="nvfp4")
  fields = c.leaves[0]
  np.testing.assert_array_equal(fields["tensor_scale"], [1.0])
  np.testing.assert_array_equal(fields["scales"], [[0x7E, 0x58]])
  np.testing.assert_array_equal(fields["values"], [0xC7] + [0] * 7 + [0x47] + [0] * 7)
  np.testing.assert_array_equal(decompress(c)["k"][[0, 1, 16, 17], 0], [2688, -896, 96, 32])


def test_export_selection_axis_and_structure():
  rng = np.random.default_rng(3)
  params = {"a": {"kernel": rng.normal(size=(8, 16)).astype(F32)},
            "embed": {"embedding": rng.normal(size=(4, 8)).astype(F32)},
            "conv": {"kernel": rng.normal(size=(3, 3, 8, 4)).astype(F32)},
            "steps": np.int32(3)}
  select = sel.select(overrides={"a/kernel": {"axis": 1}}, head=None)   # conv is the last kernel
  c = export_compressed(params, fmt="mxfp4_e2m1", nm=(2, 4), block_size=8, select=select)
  assert [lay.axis for lay in c.layouts] == [1, 2, None, None]  # conv: the I of HWIO.
  out = decompress(c)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  for path, axis in [("a", 1), ("conv", 2)]:
    w = params[path]["kernel"]
    assert_bits_equal(out[path]["kernel"],
                      compress(w, "mxfp4_e2m1", nm=(2, 4), axis=axis, block_size=8))
  assert_bits_equal(out["embed"]["embedding"], params["embed"]["embedding"])
  assert out["steps"] == 3
  assert len(jax.tree.leaves(c)) == sum(len(f) for f in c.leaves)  # A pytree of its arrays.


def test_compress_jit_traced_sparsity_and_gradient():
  # Placed after the export tests, whose jit cache entries (same shape and settings) it reuses.
  x = _params()["layer"]["kernel"]
  jitted = jax.jit(compress, static_argnames=("fmt", "nm", "axis", "order"))
  expected = compress(x, "int8", nm=(2, 4), axis=0)
  np.testing.assert_array_equal(jitted(x, "int8", nm=(2, 4), axis=0), expected)
  traced = jax.jit(lambda x, s: compress(x, "int8", sparsity=s))(x, 0.5)
  np.testing.assert_array_equal(traced, compress(x, "int8", sparsity=0.5))
  # d/dx sum(S->Q(x)) is the mask: straight through the quantizer, zero where pruned.
  grad = jax.grad(lambda x: compress(x, "int8", nm=(2, 4), axis=0).sum())(x)
  np.testing.assert_array_equal(grad, expected != 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"fmt": STEP_QUARTER, "nm": (2, 4)}, "must be a name in quant.FORMATS"),
    ({"fmt": "int4", "nm": (2, 4), "sparsity": 0.5}, "not both"),
    ({}, "nothing to do"),
    ({"fmt": "int9"}, "Unknown format"),
    ({"nm": (2, 4), "block_size": 8}, "need a `fmt`"),
    ({"fmt": "int8", "nm": (2, 3), "axis": 0}, "a/kernel: `m` = 3 must divide"),
    ({"fmt": "int8", "block_size": 5}, "a/kernel: `block_size`=5 must divide"),
])
def test_export_bad_input(kwargs, message):
  with pytest.raises(ValueError) as e:
    export_compressed({"a": {"kernel": np.ones((8, 4), F32)}}, **kwargs)
  assert message in str(e.value)


def test_export_refuses_what_it_cannot_store():
  w = np.ones((8, 4), F32)
  w[1, 1] = np.inf
  with pytest.raises(ValueError, match="a/kernel: non-finite weights"):
    export_compressed({"a": {"kernel": w}}, fmt="int8", nm=(2, 4))
  # An int8 scale amax / 127 below 2^-126 would not round-trip bit for bit: refused, not stored.
  tiny = (np.random.default_rng(0).normal(size=(8, 4)) * 1e-38).astype(F32)
  with pytest.raises(ValueError, match="would not decode to compress"):
    export_compressed({"a": {"kernel": tiny}}, fmt="int8", nm=(2, 4))


def test_orbax_save_load_round_trip(tmp_path):
  params = _params(shape=(32, 4))
  params["empty"] = {"kernel": np.zeros((0, 4), F32)}
  c = export_compressed(params, fmt="mxfp6_e3m2", sparsity=0.5)
  save_compressed(tmp_path / "ckpt", c)
  loaded = load_compressed(tmp_path / "ckpt")
  assert loaded.layouts == c.layouts
  for a, b in zip(loaded.leaves, c.leaves, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      assert_bits_equal(a[k], b[k])
  expected = decompress(c)
  out = decompress(loaded)  # Nested dicts from the paths: here the same structure.
  for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
    assert_bits_equal(x, y)
  like = load_compressed(tmp_path / "ckpt", like=params)
  assert jax.tree.structure(decompress(like)) == jax.tree.structure(params)
  with pytest.raises(ValueError, match="`like` has leaf paths"):
    load_compressed(tmp_path / "ckpt", like={"other": 1})


# ---------------------------------------------------------------------------
# Sizes.
# ---------------------------------------------------------------------------
def test_size_report_hand_computed():
  params = _params()  # (64, 8) float32 kernel, 2048 bytes, and an (8,) bias, 32 bytes.
  # 2:4 + int4: 256 kept * 4 bits = 128 B, 256 indices * 2 bits = 64 B, one float32 scale.
  row = compressed_size_report(export_compressed(params, fmt="int4", nm=(2, 4))).rows[1]
  assert (row.dense_bytes, row.value_bytes, row.index_bytes, row.scale_bytes) == (2048, 128, 64, 4)
  # 1:4 + mxfp6: 128 kept * 6 bits = 96 B, 128 * 2 bits = 32 B, 64 / 32 * 8 = 16 E8M0 bytes.
  report = compressed_size_report(export_compressed(params, fmt="mxfp6_e3m2", nm=(1, 4)))
  assert report.rows[1][3:] == (2048, 96, 32, 16)
  assert report.rows[0][2:] == ("dense", 32, 32, 0, 0)
  assert report.total.stored_bytes == 32 + 144 and report.total_compressed.stored_bytes == 144
  # 75% unstructured, no quantization: 128 float32 values, a 512-bit mask.
  row = compressed_size_report(export_compressed(params, sparsity=0.75)).rows[1]
  assert (row.value_bytes, row.index_bytes, row.scale_bytes) == (512, 64, 0)
  table = report.table()
  assert "1:4 mxfp6_e3m2 block 32" in table and "total (compressed)" in table


def test_size_report_1024_kernel():
  kernel = np.random.default_rng(4).normal(size=(1024, 1024)).astype(F32)
  dense = 1024 * 1024 * 4
  cases = {  # (fmt, structure): stored bytes
      ("int4", (2, 4)): 1024 * 512 // 2 + 1024 * 512 // 4 + 4,  # (0.5*4 + 0.5*2)/32 + a scale
      ("mxfp4_e2m1", (2, 4)): 1024 * 512 // 2 + 1024 * 512 // 4 + 1024 * 1024 // 32,
      # NVFP4: 4.5 bits per weight (an E4M3 byte per 16) and a float32 per tensor.
      ("nvfp4", None): 1024 * 1024 // 2 + 1024 * 1024 // 16 + 4,
      ("nvfp4", (2, 4)): 1024 * 512 // 2 + 1024 * 512 // 4 + 1024 * 1024 // 16 + 4,
  }
  for (fmt, nm), stored in cases.items():
    c = export_compressed({"d": {"kernel": kernel}}, fmt=fmt, nm=nm)
    row = compressed_size_report(c).rows[0]
    assert (row.dense_bytes, row.stored_bytes) == (dense, stored)
  assert math.isclose(cases["int4", (2, 4)] / dense, (0.5 * 4 + 0.5 * 2) / 32, rel_tol=1e-4)
