"""Tests for jaxprune.quant: hand-computed answers, the microxcaling oracle, invariants, errors."""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxprune import quant
from jaxprune.quant import FORMATS, Format, get_format, int_format, quantize

try:
  from . import mx_reference
except ImportError:
  import mx_reference

MX = tuple(f for f in FORMATS if f.startswith("mx"))
INTS = tuple(f"int{k}" for k in range(2, 9))
FP8 = ("fp8_e4m3", "fp8_e5m2")
F32 = np.float32
HYPOTHESIS = settings(max_examples=20, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _jit(fmt, **kwargs):
  return jax.jit(functools.partial(quantize, fmt=fmt, **kwargs))


def q(x, fmt, **kwargs):
  return np.asarray(_jit(fmt, **kwargs)(np.asarray(x, F32)))


def bits(a, signed_zeros=True):
  """float32 bit patterns with every NaN made the same, for exact comparisons."""
  a = np.asarray(a, F32)
  b = a.view(np.uint32).copy()
  b[np.isnan(a)] = 0x7FC00000
  if not signed_zeros:
    b[a == 0] = 0
  return b


def assert_bits_equal(actual, expected, signed_zeros=True):
  actual, expected = np.asarray(actual, F32), np.asarray(expected, F32)
  bad = bits(actual, signed_zeros) != bits(expected, signed_zeros)
  assert not bad.any(), (
    f"{bad.sum()} differ: x-index {np.argwhere(bad)[:4].tolist()}, "
    f"got {actual[bad][:4]}, expected {expected[bad][:4]}")


# ---------------------------------------------------------------------------
# Formats.
# ---------------------------------------------------------------------------
def test_format_table():
  assert FORMATS == (*INTS, *FP8, "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3",
                     "mxfp4_e2m1", "mxint8", "nvfp4")
  assert get_format("nvfp4")[1:] == ("nvfp4", 4, 2, 1, 2, 0, 6.0)  # E2M1 elements
  emax = {"mxfp8_e4m3": 8, "mxfp8_e5m2": 15, "mxfp6_e3m2": 4, "mxfp6_e2m3": 2,
          "mxfp4_e2m1": 2, "mxint8": 0, "fp8_e4m3": 8, "fp8_e5m2": 15}
  max_normal = {"mxfp8_e4m3": 448, "mxfp8_e5m2": 57344, "mxfp6_e3m2": 28, "mxfp6_e2m3": 7.5,
                "mxfp4_e2m1": 6, "mxint8": 1.984375, "fp8_e4m3": 448, "fp8_e5m2": 57344}
  for name, e in emax.items():
    f = get_format(name)
    assert isinstance(f, Format) and f.name == name
    assert (f.emax, f.max_normal) == (e, max_normal[name])
  assert get_format("mxfp4_e2m1")[2:5] == (4, 2, 1)  # bits, ebits, mbits
  assert get_format("mxfp6_e2m3").emin == 0 and get_format("fp8_e5m2").emin == -14
  assert int_format(4) == get_format("int4") and get_format("int4").max_normal == 7
  assert get_format(get_format("mxint8")) is get_format("mxint8")


def test_element_formats_match_ml_dtypes():
  # Largest normal and smallest subnormal of each element format, against ml_dtypes.
  for name, dtype in [("fp8_e4m3", ml_dtypes.float8_e4m3fn), ("fp8_e5m2", ml_dtypes.float8_e5m2),
                      ("mxfp6_e3m2", ml_dtypes.float6_e3m2fn),
                      ("mxfp6_e2m3", ml_dtypes.float6_e2m3fn),
                      ("mxfp4_e2m1", ml_dtypes.float4_e2m1fn)]:
    f, info = get_format(name), ml_dtypes.finfo(dtype)
    assert f.max_normal == float(info.max) and f.emin == int(np.log2(float(info.smallest_normal)))
    assert f.mbits == info.nmant and f.bits == info.bits


# ---------------------------------------------------------------------------
# Hand-computed answers.
# ---------------------------------------------------------------------------
def test_int4_per_tensor():
  # amax = 7, so s = 1: round half to even, then * s.
  x = [7.0, -3.5, 2.5, 0.5, -1.5, 1.49, 0.0, -0.25]
  assert_bits_equal(q(x, "int4"), [7, -4, 2, 0, -2, 1, 0, -0.0])
  assert_bits_equal(q(np.multiply(x, 0.25), "int4"), np.multiply([7, -4, 2, 0, -2, 1, 0, -0.0],
                                                                  0.25))


def test_int2_is_ternary():
  assert_bits_equal(q([-1.0, 0.4, 0.6, -0.5], "int2"), [-1, 0, 1, -0.0])


def test_int8_per_channel_and_block():
  x = np.array([[127.0, 63.5, -1.0, 0.2], [0.0, 0.0, -0.0, 0.0], [254.0, 1.0, -1.0, 3.0]], F32)
  # Rows are channels (reduce over axis=-1): s = 1, 0, 2.
  assert_bits_equal(q(x, "int8", granularity="channel"),
                    [[127, 64, -1, 0], [0, 0, -0.0, 0], [254, 0, -0.0, 4]])
  # Columns are channels with axis=0.
  expect = np.round(x / (np.abs(x).max(0) / F32(127))) * (np.abs(x).max(0) / F32(127))
  np.testing.assert_array_equal(q(x, "int8", granularity="channel", axis=0), expect)
  # Blocks of 2 along the last axis: [127, 63.5] has s = 1, [-1, 0.2] has s = 1/127, ...
  blocks = q(x, "int8", block_size=2)
  assert_bits_equal(blocks[0, :2], [127, 64])
  assert_bits_equal(blocks[2, :2], [254, 0])
  for row in (0, 2):
    s = np.abs(x[row, 2:]).max() / F32(127)
    assert_bits_equal(blocks[row, 2:], np.round(x[row, 2:] / s) * s)


def test_int_asymmetric():
  assert_bits_equal(q([0.0, 3.0], "int2", symmetric=False), [0, 3])
  # lo = -1, hi = 2, s = 1, z = 1: codes 0..3 represent -1..2.
  assert_bits_equal(q([-1.0, 0.5, 2.0, 1.5], "int2", symmetric=False), [-1, 0, 2, 2])
  # All positive: lo is taken as 0 so that 0 stays exact; s = 15 / 15.
  assert_bits_equal(q([15.0, 7.5, 0.4, 0.0], "int4", symmetric=False), [15, 8, 0, 0])


def test_fp8_ties_and_subnormals():
  # amax = 448 (57344) so s = 1 and the values are rounded to the format directly.
  x = [448.0, 17.0, 19.0, -17.0, 2.0**-10, 3 * 2.0**-10, 5 * 2.0**-11, 0.1, -0.0]
  e4m3 = [448, 16, 20, -16, 0, 2**-8, 2**-9, 0.1015625, -0.0]
  assert_bits_equal(q(x, "fp8_e4m3"), e4m3)
  x = [57344.0, 9.0, 11.0, 2.0**-17, 3 * 2.0**-17, 0.1]
  assert_bits_equal(q(x, "fp8_e5m2"), [57344, 8, 12, 0, 2**-15, 0.09375])


def test_int_fp8_subnormal_groups_are_exact():
  # Scales of 2^-149 and subnormal outputs, computed exactly despite XLA:CPU flushing subnormals.
  tiny = F32(2.0**-149)
  assert_bits_equal(q(np.array([127, 64, -1, 3], F32) * tiny, "int8"),
                    np.array([127, 64, -1, 3], F32) * tiny)
  assert_bits_equal(q(np.array([448, 17, -19, 1], F32) * tiny, "fp8_e4m3"),
                    np.array([448, 16, -20, 1], F32) * tiny)
  # A subnormal scale: s and n * s would lose bits in float32, the result is still as close as
  # float32 allows (computed as 2^-127 * (n * (2^127 amax / 7))).
  x = np.array([1e-38, -3e-39, 1e-40, 0.0], F32)
  s = np.float64(x[0]) / 7
  expect = np.round(x / s) * s
  np.testing.assert_allclose(q(x, "int4"), expect, rtol=0, atol=2.0**-150)


@pytest.mark.parametrize("fmt,dtype", [("fp8_e4m3", ml_dtypes.float8_e4m3fn),
                                       ("fp8_e5m2", ml_dtypes.float8_e5m2)])
def test_fp8_matches_ml_dtypes_cast(fmt, dtype):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((8, 64)) * np.exp2(rng.integers(-20, 20, (8, 1)))).astype(F32)
  s = np.abs(x).max(-1, keepdims=True) / F32(get_format(fmt).max_normal)
  m = F32(get_format(fmt).max_normal)
  expect = np.clip(x / s, -m, m).astype(dtype).astype(F32) * s
  np.testing.assert_array_equal(q(x, fmt, granularity="channel"), expect)


def test_mxfp4_block():
  # amax = 6: shared exponent floor(log2 6) - 2 = 0, elements rounded to e2m1:
  # {0, 0.5, 1, 1.5, 2, 3, 4, 6}, ties to even mantissa, saturated at 6.
  row = np.zeros(32, F32)
  row[:10] = [6, 5, 2.5, 0.25, 0.75, 1.25, 1.75, -3.5, 5.9, -0.1]
  out = np.zeros(32, F32)
  out[:10] = [6, 4, 2, 0, 1, 1, 2, -4, 6, -0.0]
  assert_bits_equal(q(row, "mxfp4_e2m1"), out)
  assert_bits_equal(q(row * F32(2.0**-20), "mxfp4_e2m1"), out * F32(2.0**-20))
  # amax = 7.5 -> shared exponent 0 too, 7.5 saturates to 6; amax = 8 -> shared exponent 1.
  assert q(np.r_[7.5, np.zeros(31)], "mxfp4_e2m1")[0] == 6
  assert_bits_equal(q(np.r_[8.0, 3.0, 5.0, np.zeros(29)], "mxfp4_e2m1")[:3], [8, 3, 4])


def test_mxint8_block():
  # amax = 1: X = 1, elements k/64 with |k| <= 127, ties to even.
  row = np.zeros(32, F32)
  row[:6] = [1.0, 1 / 128, 3 / 128, -5 / 128, 1.99, -1.999]
  assert_bits_equal(q(row, "mxint8")[:6], [1, 0, 2 / 64, -2 / 64, 127 / 64, -127 / 64])
  # amax in [1, 2) keeps X = 1: 1.999 * 64 rounds to 128 and saturates at 127.
  assert_bits_equal(q(np.full(32, -1.999, F32), "mxint8"), np.full(32, -127 / 64, F32))


def test_mx_small_blocks_and_axis():
  x = np.arange(1, 17, dtype=F32).reshape(4, 4)
  # Blocks of 2 down the columns: [1, 5], [9, 13], ... in mxfp4.
  out = q(x, "mxfp4_e2m1", axis=0, block_size=2)
  for col in range(4):
    for top in (0, 2):
      assert_bits_equal(out[top:top + 2, col],
                        q(x[top:top + 2, col], "mxfp4_e2m1", block_size=2))


# ---------------------------------------------------------------------------
# Details of the reference that differ from the spec's text.
# ---------------------------------------------------------------------------
def test_mx_shared_exponent_uses_float32_log2():
  # log2(8 (1 - 2^-24)) = 3 - 8.6e-8 rounds to 3.0 in float32: the reference's shared exponent
  # is 3 - emax = 1, not 0. The max rounds to 8 (not 6); 1.5 becomes 0.75 -> 1 (tie) -> 2.
  row = np.zeros(32, F32)
  row[:2] = [np.nextafter(F32(8), F32(0)), 1.5]
  assert_bits_equal(q(row, "mxfp4_e2m1")[:2], [8, 2])
  row[0] = F32(7.9)  # no float32 rounding: shared exponent 0, 7.9 saturates at 6
  assert_bits_equal(q(row, "mxfp4_e2m1")[:2], [6, 1.5])
  # Just below 2^2, log2 = 2 - 8.6e-8 stays below 2 in float32: shared exponent -1, so the max
  # (7.9999995 in elements) saturates at 6 -> 3.
  row[:2] = [np.nextafter(F32(4), F32(0)), 0.75]
  assert_bits_equal(q(row, "mxfp4_e2m1")[:2], [3, 0.75])


def test_mx_shared_exponent_table_matches_float32_log2():
  # The rounded-up shared exponent is exactly floor(np.float32 log2): checked exhaustively over
  # every float32 once; here on the 64 floats below each power of two and random ones.
  below = np.arange(1, 65, dtype=np.int64)
  powers = np.exp2(np.arange(-120, 128, dtype=np.float64)).astype(F32).view(np.int32)
  b = (powers[:, None].astype(np.int64) - below).ravel()
  b = np.concatenate([b, np.int64(0x7F800000) - below,
                      np.random.default_rng(0).integers(1, 0x7F800000, 20000)])
  x = b.astype(np.int32).view(F32)
  e = np.frexp(x.astype(np.float64))[1] - 1
  ours = e + (b >= quant._LOG2_ROUND_UP[e + 149])
  np.testing.assert_array_equal(ours, np.floor(np.log2(x)))


def test_mx_rounding_quirk_at_half_minus_ulp():
  # floor(t + 1/2) in float32 rounds t = 1/2 - 2^-25 up: mxint8 element (1/2 - 2^-25) / 64.
  row = np.zeros(32, F32)
  row[:2] = [1.0, (0.5 - 2.0**-25) / 64]
  assert_bits_equal(q(row, "mxint8")[:2], [1, 1 / 64])
  row[1] = (0.5 - 2.0**-24) / 64
  assert_bits_equal(q(row, "mxint8")[:2], [1, 0])


def test_mx_signed_zeros_and_nan_near_float_max():
  row = np.zeros(32, F32)
  row[:4] = [1e30, -1.0, -1e-40, -0.0]
  # -1 / 2^e rounds to -0 in the element: -0.0; -1e-40 / 2^e underflows float32: +0.0;
  # -0.0 gives +0.0 (torch.sign(-0.0) == 0).
  assert_bits_equal(q(row, "mxfp8_e4m3")[1:4], [-0.0, 0.0, 0.0])
  # floor(fl32(log2 amax)) = 128 for amax among the 44 largest float32: mxint8 gives NaN
  # (shared exponent 128 > 127), float elements that round up to 2^emax give 2^128 = inf.
  fmax = np.finfo(F32).max
  below = np.int32(0x7F800000 - 45).view(F32)
  assert np.isnan(q(np.full(32, fmax), "mxint8")).all()
  assert np.isfinite(q(np.full(32, below), "mxint8")).all()
  assert np.isposinf(q(np.full(32, fmax), "mxfp4_e2m1")).all()
  assert_bits_equal(q(np.full(32, below), "mxfp4_e2m1"), np.full(32, 6 * 2.0**125, F32))
  for fmt in ("mxint8", "mxfp4_e2m1"):
    expect = mx_reference.quantize_mx(np.r_[fmax, -below, np.zeros(30, F32)], 8,
                                      mx_reference.ELEM_FORMAT[fmt], axes=[-1], block_size=32,
                                      round="even")
    assert_bits_equal(q(np.r_[fmax, -below, np.zeros(30, F32)], fmt), expect)


# ---------------------------------------------------------------------------
# Bit-for-bit agreement with the microxcaling oracle.
# ---------------------------------------------------------------------------
def _mixed(rng, shape):
  """Random float32 with zeros, subnormals, tiny and huge values, powers of two and rows
  whose max is a few ulps below a power of two."""
  n = int(np.prod(shape))
  kind = rng.integers(0, 10, n)
  x = np.exp2(rng.uniform(-30, 30, n))
  x = np.where(kind == 0, 0.0, x)
  x = np.where(kind == 1, rng.uniform(0, 1e-38, n), x)
  x = np.where(kind == 2, 1e30 * rng.uniform(0, 3, n), x)
  x = np.where(kind == 3, np.exp2(rng.integers(-149, 128, n).astype(float)), x)
  x = np.where(kind == 4, 1e-30 * rng.uniform(0, 3, n), x)
  x = np.where(kind == 5, rng.standard_normal(n), x)
  x = (x * rng.choice([-1.0, 1.0], n)).astype(F32).reshape(shape)
  # The first rows: max a few ulps below 2^k, other elements on ties of the element grid.
  rows = x.reshape(-1, shape[-1])[:16]
  k = rng.integers(-140, 128, len(rows))
  top = np.exp2(k.astype(float)).astype(F32).view(np.int32) - rng.integers(1, 60, len(rows))
  rows[:] = (np.exp2(k[:, None] - rng.integers(1, 9, rows.shape))
             * (rng.integers(1, 64, rows.shape) / 64))
  rows[:, 0] = top.astype(np.int32).view(F32)
  # Then blocks of subnormals and of the smallest normals.
  rows = x.reshape(-1, shape[-1])[16:22]
  rows[:] = rng.uniform(-2e-38, 2e-38, rows.shape)
  rows[4:] *= F32(2.0**-20)
  return x


@pytest.mark.parametrize("fmt", MX)
def test_mx_matches_microxcaling(fmt):
  rng = np.random.default_rng(list(FORMATS).index(fmt))
  x = _mixed(rng, (64, 128))
  elem = mx_reference.ELEM_FORMAT[fmt]
  for axis, block_size in [(-1, 32), (0, 16)]:
    expect = mx_reference.quantize_mx(x, 8, elem, axes=[axis], block_size=block_size,
                                      round="even")
    assert_bits_equal(q(x, fmt, axis=axis, block_size=block_size), expect)


def test_mx_nonfinite_blocks_are_nan():
  x = np.ones((3, 64), F32)
  x[0, 5], x[1, 40], x[2, 0] = np.nan, np.inf, -np.inf
  for fmt in ("mxfp8_e4m3", "mxint8"):
    out = q(x, fmt)
    expect = mx_reference.quantize_mx(x, 8, mx_reference.ELEM_FORMAT[fmt], axes=[-1],
                                      block_size=32, round="even")
    assert_bits_equal(out, expect)
    assert np.isnan(out[0, :32]).all() and np.isnan(out[1, 32:]).all()
    assert np.isnan(out[2, :32]).all()
    assert (out[0, 32:] == 1).all() and (out[1, :32] == 1).all() and (out[2, 32:] == 1).all()


def test_int_and_fp8_nonfinite_groups_are_nan():
  x = np.ones((3, 8), F32)
  x[1, 2] = np.inf
  x[2, 7] = np.nan
  for fmt in ("int8", "fp8_e4m3"):
    out = q(x, fmt, granularity="channel")
    assert (out[0] == 1).all() and np.isnan(out[1:]).all()
    assert np.isnan(q(x, fmt)).all()
  out = q(x, "int4", symmetric=False, block_size=4)
  assert (out[0] == 1).all() and np.isnan(out[1, :4]).all() and (out[1, 4:] == 1).all()


# ---------------------------------------------------------------------------
# Invariants.
# ---------------------------------------------------------------------------
def _finite32(**kwargs):
  return st.floats(width=32, allow_nan=False, allow_infinity=False, **kwargs)


# Arrays of 4 groups of 32 (channels along the last axis, or MX blocks): mostly moderate values,
# with zeros, subnormals and a few extremes.
ELEMENTS = st.one_of(_finite32(min_value=-1e4, max_value=1e4),
                     st.sampled_from([0.0, -0.0, 1e-40, -3e-39, 1e-30, -1e30, 2.0**-126]))
ARRAYS = hnp.arrays(F32, (4, 32), elements=ELEMENTS)
# Stops short of the 44 largest float32, where MX outputs may be NaN or inf (tested above).
BIG = float(F32(1e38))
ANY_FINITE = hnp.arrays(F32, (4, 32), elements=_finite32(min_value=-BIG, max_value=BIG))


def _element_values(fmt: Format) -> np.ndarray:
  """All nonnegative values of an MX element format."""
  if fmt.name == "mxint8":
    return np.arange(128) / 64
  dtype = {"mxfp8_e4m3": ml_dtypes.float8_e4m3fn, "mxfp8_e5m2": ml_dtypes.float8_e5m2,
           "mxfp6_e3m2": ml_dtypes.float6_e3m2fn, "mxfp6_e2m3": ml_dtypes.float6_e2m3fn,
           "mxfp4_e2m1": ml_dtypes.float4_e2m1fn}[fmt.name]
  v = np.arange(2 ** fmt.bits, dtype=np.uint8).view(dtype).astype(np.float64)
  return np.unique(np.abs(v[np.isfinite(v)]))


@pytest.mark.parametrize("fmt", INTS + FP8)
@HYPOTHESIS
@given(x=ARRAYS)
def test_int_fp8_invariants(fmt, x):
  f = get_format(fmt)
  out = q(x, fmt, granularity="channel")
  assert_bits_equal(q(out, fmt, granularity="channel"), out)  # idempotent
  s = np.abs(x).max(-1, keepdims=True) / F32(f.max_normal)
  assert (np.signbit(out) == np.signbit(x)).all()
  ok = s[:, 0] >= 1e-30  # outputs are normal float32: exactly fl(n * s)
  x, out, s = x[ok], out[ok], s[ok]
  n = np.round(out / s)
  if f.kind == "int":
    assert (np.abs(n) <= f.max_normal).all()
    np.testing.assert_array_equal(out, n * s)
    assert (np.abs(x - out) <= s / 2 + 4 * np.spacing(np.abs(x))).all()
  else:
    dtype = ml_dtypes.float8_e4m3fn if fmt == "fp8_e4m3" else ml_dtypes.float8_e5m2
    v = (out / s).astype(dtype).astype(F32)
    np.testing.assert_array_equal(out, v * s)


@pytest.mark.parametrize("fmt", INTS[::3])
@HYPOTHESIS
@given(x=ARRAYS)
def test_int_asymmetric_invariants(fmt, x):
  f = get_format(fmt)
  out = q(x, fmt, block_size=32, symmetric=False)
  # Idempotent up to the float32 rounding of the recomputed scale (codes and zero point repeat).
  again = q(out, fmt, block_size=32, symmetric=False)
  assert (np.abs(again - out) <= 2 * np.spacing(np.abs(out))).all()
  lo, hi = np.minimum(x.min(-1, keepdims=True), 0), np.maximum(x.max(-1, keepdims=True), 0)
  s = (hi - lo) / F32(2**f.bits - 1)
  ok = s[:, 0] >= 1e-30
  err = np.abs(x - out)[ok]
  assert (err <= s[ok] / 2 * (1 + 1e-5) + 4 * np.spacing(np.abs(x[ok]))).all()
  assert (np.signbit(out) == np.signbit(x)).all()


@pytest.mark.parametrize("fmt", MX)
@HYPOTHESIS
@given(x=ANY_FINITE)
def test_mx_invariants(fmt, x):
  f = get_format(fmt)
  out = q(x, fmt)
  assert_bits_equal(q(out, fmt), out, signed_zeros=False)  # idempotent, but -0.0 gives +0.0
  assert_bits_equal(out, mx_reference.quantize_mx(x, 8, mx_reference.ELEM_FORMAT[fmt], axes=[-1],
                                                  block_size=32, round="even"))
  nonzero = out != 0
  assert (np.signbit(out[nonzero]) == np.signbit(x[nonzero])).all()
  out = out.astype(np.float64)
  amax = np.abs(out).max(-1, keepdims=True)
  e = np.maximum(np.floor(np.log2(np.where(amax > 0, amax, 1))) - f.emax, -127)
  v = np.abs(out) / np.exp2(e)  # exact in float64
  assert np.isin(v, _element_values(f)).all()


@pytest.mark.parametrize("fmt,kwargs", [("int4", {}), ("fp8_e5m2", {"granularity": "channel"}),
                                        ("mxfp6_e2m3", {}), ("int8", {"symmetric": False})])
def test_straight_through_gradient(fmt, kwargs):
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(2).standard_normal((4, 32)), jnp.float32)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(quantize(x, fmt, **kwargs) * w)))(x)
  np.testing.assert_array_equal(grad, w)
  vjp = jax.jit(lambda x, w: jax.vjp(lambda x: quantize(x, fmt, **kwargs), x)[1](w))
  (g,) = vjp(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert g.dtype == jnp.bfloat16
  np.testing.assert_array_equal(g, w.astype(jnp.bfloat16))
  jvp = jax.jit(lambda x, t: jax.jvp(lambda x: quantize(x, fmt, **kwargs), (x,), (t,)))
  out, tangent = jvp(x, w)
  np.testing.assert_array_equal(out, q(x, fmt, **kwargs))
  np.testing.assert_array_equal(tangent, w)


def test_vmap_matches_batched_call():
  # vmap must not change any rounding (it re-broadcasts divisors, which XLA likes to turn into
  # multiplications by a reciprocal).
  x = _mixed(np.random.default_rng(5), (3, 4, 32))
  for fmt in ("int8", "mxfp6_e3m2"):
    batched = jax.jit(jax.vmap(functools.partial(quantize, fmt=fmt, axis=-1, granularity=None
                                                 if fmt.startswith("mx") else "channel")))(x)
    assert_bits_equal(batched, q(x, fmt, **({} if fmt.startswith("mx") else
                                            {"granularity": "channel"})))


def test_jit_matches_eager():
  # One format: op-by-op execution compiles every primitive (seconds). The int and FP8 paths'
  # jitted divisions are checked against NumPy in test_int_fp8_invariants.
  x = _mixed(np.random.default_rng(3), (2, 32))
  assert_bits_equal(quantize(x, "mxfp8_e5m2"), q(x, "mxfp8_e5m2"))


def test_half_precision_inputs():
  x = np.random.default_rng(4).standard_normal((2, 64)).astype(F32)
  for dtype in (jnp.bfloat16, jnp.float16):
    xh = jnp.asarray(x, dtype)
    out = _jit("mxfp4_e2m1")(xh)
    assert out.dtype == dtype
    # MX values of bfloat16 / float16 inputs are exact in the input dtype here.
    np.testing.assert_array_equal(np.asarray(out, F32), q(np.asarray(xh, F32), "mxfp4_e2m1"))
  assert _jit("int8")(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("fmt,kwargs", [
    ("int2", {"block_size": 8}), ("int4", {"granularity": "channel"}), ("int8", {}),
    ("fp8_e4m3", {"granularity": "channel"}), ("fp8_e5m2", {}), ("mxfp8_e4m3", {}),
    ("mxfp4_e2m1", {}), ("mxint8", {}), ("nvfp4", {})])
def test_bfloat16_results_are_fixed_points(fmt, kwargs):
  # Q(Q(x)) == Q(x) in bfloat16 (module docstring): quantized bfloat16 params stay on the grid.
  rng = np.random.default_rng(7)
  x = rng.standard_normal((16, 64)) * np.exp2(rng.integers(-30, 30, (16, 1)))
  x[0, :32] = 1.0  # a constant group: amax / q_max * q_max must give amax back
  quantizer = jax.jit(functools.partial(quantize, fmt=fmt, **kwargs))
  y = quantizer(jnp.asarray(x, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  def bits16(a):  # MX maps -0.0 to +0.0 (see test_mx_invariants)
    b = np.asarray(a).view(np.uint16).copy()
    b[(b & 0x7FFF) == 0] = 0 if fmt in MX else b[(b & 0x7FFF) == 0]
    return b

  np.testing.assert_array_equal(bits16(quantizer(y)), bits16(y))
  # And y is the float32 result rounded to bfloat16.
  expect = q(np.asarray(jnp.asarray(x, jnp.bfloat16), F32), fmt, **kwargs)
  np.testing.assert_array_equal(np.asarray(y).view(np.uint16),
                                expect.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_scalars_and_empty_arrays():
  assert_bits_equal(q(F32(-127.0), "int8"), F32(-127.0))
  assert quantize(jnp.zeros((0, 32)), "mxint8").shape == (0, 32)
  assert quantize(jnp.zeros((3, 0)), "int8", granularity="channel").shape == (3, 0)


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------
X = jnp.ones((4, 64))


@pytest.mark.parametrize("call,match", [
  (lambda: quantize(X, "int9"), r"`fmt`='int9'.*int2, int3.*mxint8"),
  (lambda: quantize(X, "fp4"), r"`fmt`"),
  (lambda: get_format(None), r"`fmt`"),
  (lambda: int_format(1), r"`bits`.*\[2, 8\]"),
  (lambda: int_format(9), r"`bits`"),
  (lambda: int_format(4.0), r"`bits`"),
  (lambda: quantize(jnp.ones((4, 48)), "mxfp4_e2m1"),
   r"`block_size`=32 must divide the size 48 of `axis`=-1"),
  (lambda: quantize(X, "int8", axis=0, block_size=3),
   r"`block_size`=3 must divide the size 4 of `axis`=0"),
  (lambda: quantize(jnp.ones((4, 64), jnp.int32), "int8"), r"floating-point input.*int32"),
  (lambda: quantize([1, 2], "mxint8"), r"floating-point input"),
  (lambda: quantize(X, "int8", granularity="row"), r"`granularity`"),
  (lambda: quantize(X, "mxint8", granularity="channel"), r"`granularity`"),
  (lambda: quantize(X, "int8", granularity="block"), r"`block_size`"),
  (lambda: quantize(X, "int8", granularity="channel", block_size=8), r"`block_size`"),
  (lambda: quantize(X, "mxint8", block_size=0), r"`block_size`"),
  (lambda: quantize(X, "int8", block_size=2.0), r"`block_size`"),
  (lambda: quantize(X, "int8", granularity="channel", axis=2), r"`axis`=2"),
  (lambda: quantize(X, "mxint8", axis=-3), r"`axis`=-3"),
  (lambda: quantize(X, "fp8_e4m3", symmetric=False), r"`symmetric`"),
  (lambda: quantize(X, "mxint8", symmetric=False), r"`symmetric`"),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
