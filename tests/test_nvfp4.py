"""NVFP4 (``quantize(x, 'nvfp4')``): hand-computed cases, the torchao oracle, invariants, errors.

The oracle is ``tests/nvfp4_reference.py``, a NumPy port of torchao's NVFP4
(``per_tensor_amax_to_scale``, ``nvfp4_quantize``, ``NVFP4Tensor.dequantize``).
Every test here compares bits, so the whole file also runs under XLA's fast math
(tests/test_fast_math.py).
"""

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
from jaxprune import quant_bits as qb

try:
  from . import nvfp4_reference as ref
except ImportError:
  import nvfp4_reference as ref

F32 = np.float32
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
HYPOTHESIS = settings(max_examples=25, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _jit(**kwargs):
  return jax.jit(functools.partial(quant.quantize, fmt="nvfp4", **kwargs))


def q(x, **kwargs):
  x = np.asarray(x)
  return np.asarray(_jit(**kwargs)(x if x.dtype == ml_dtypes.bfloat16 else x.astype(F32)))


def bits(a):
  a = np.asarray(a)
  b = a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32).copy()
  b[np.isnan(a.astype(F32))] = 0
  return b


def assert_bits_equal(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.dtype == expected.dtype
  bad = bits(actual) != bits(expected)
  assert not bad.any(), (f"{bad.sum()} differ at {np.argwhere(bad)[:4].tolist()}: got "
                         f"{actual[bad][:4]}, expected {expected[bad][:4]}")


def reference(x, axis=-1):
  """torchao's result for blocks along ``axis`` (it quantizes along the last axis of 2-D)."""
  moved = np.moveaxis(np.asarray(x), axis, -1)
  with np.errstate(all="ignore"):
    out = ref.fake_quantize(moved.reshape(-1, moved.shape[-1]))
  return np.moveaxis(out.reshape(moved.shape), -1, axis)


@functools.cache
def _batched():
  return jax.jit(jax.vmap(functools.partial(quant.quantize, fmt="nvfp4")))


def tensor_scale(x):
  return F32(np.abs(np.asarray(x, F32)).max()) / F32(2688)


# ---------------------------------------------------------------------------
# Hand-computed answers.
# ---------------------------------------------------------------------------
def test_nvfp4_hand_computed():
  # amax = 2688, so the per-tensor scale s_t = 2688 / (448 * 6) = 1 and the block scale is
  # e4m3(clip(b_amax / 6, 2^-6, 448)); elements are x * fl(1 / s_b) rounded to e2m1.
  x = np.zeros((5, 16), F32)  # blocks, as rows; quantized as 4 x 32 (with 3 zero blocks)
  # s_b = 448: 2688 -> 6; 1000 * fl(1/448) = 2.23 -> 2; 2240 = 5 * 448 -> tie 5 -> 4.
  x[0, :3] = [2688, -1000, 2240]
  # s_b = 16 (exact reciprocal): ties to even 2.5 -> 2, 3.5 -> 4, 0.25 -> 0, 0.75 -> 1, 5 -> 4;
  # 5.5 -> 6.
  x[1, :8] = [96, 40, 56, 4, -12, 8, 80, 88]
  # s_b = 15: fl(1/15) is rounded up, so 37.5 * fl(1/15) lands above the tie 2.5 and rounds to
  # 3 (a quotient would give 2); 18.75 likewise above the tie 1.25 -> 1.5.
  assert F32(37.5) * (F32(1) / F32(15)) > 2.5 and F32(18.75) * (F32(1) / F32(15)) > 1.25
  x[2, :4] = [90, 37.5, 18.75, -7.5]
  # A tiny block: b_amax / 6 = 0.0083 < 2^-6, clamped to s_b = 2^-6 (no E4M3 subnormals), so
  # elements are x * 64: 3.2 -> 3, 0.064 -> 0, -0.2496 -> -0, 0.256 -> 0.5.
  x[3, :4] = [0.05, 0.001, -0.0039, 0.004]
  x[4, :2] = [-0.0, 0.0]  # an all-zero block keeps its zeros' signs
  expect = np.zeros((5, 16), F32)
  expect[0, :3] = [2688, -896, 1792]
  expect[1, :8] = [96, 32, 64, 0, -16, 8, 64, 96]
  expect[2, :4] = [90, 45, 22.5, -7.5]
  expect[3, :4] = [3 / 64, 0, -0.0, 0.5 / 64]
  expect[4, :2] = [-0.0, 0.0]
  x, expect = (np.r_[a, np.zeros((3, 16), F32)].reshape(4, 32) for a in (x, expect))
  assert_bits_equal(q(x), expect)
  assert_bits_equal(reference(x), expect)
  # Scaling by a power of two scales s_t and every output exactly (all normal here).
  assert_bits_equal(q(x * F32(2.0**-40)), expect * F32(2.0**-40))
  # Blocks run along `axis`: the transpose with axis=0 gives the transposed result.
  assert_bits_equal(q(x.T, axis=0), expect.T)


def test_nvfp4_largest_block_saturates_at_448():
  # s_t = fl(amax / 2688) is rounded, so b_amax / 6 / s_t of the largest block lands a few ulps
  # off 448: above it is clamped, below it rounds to 448 (E4M3's spacing there is 32). Either
  # way its scale is 448 and its largest element 6: max |Q| = fl(6 fl(448 s_t)).
  rng = np.random.default_rng(0)
  amax = rng.uniform(1, 2, 200).astype(F32)
  unscaled = amax / F32(6) / (amax / F32(2688))
  assert unscaled.min() < 448 < unscaled.max()  # both sides of 448 occur
  x = rng.uniform(-1, 1, (200, 4, 32)).astype(F32)
  x[:, 0, 0] = amax
  out = np.asarray(_batched()(x))  # one tensor (one s_t) per amax
  np.testing.assert_array_equal(np.abs(out).max(axis=(1, 2)),
                                F32(6) * (F32(448) * (amax / F32(2688))))


# ---------------------------------------------------------------------------
# Bit-for-bit agreement with torchao.
# ---------------------------------------------------------------------------
def _mixed(rng, shape):
  """Random float32 tensors with blocks of very different magnitudes (so that many block
  scales are clamped to 2^-6 or rounded in E4M3's lowest binades), zeros, all-zero blocks,
  subnormal entries and E2M1 near-ties."""
  rows, cols = shape
  block_exp = rng.integers(-24, 1, (rows, cols // 16, 1))
  x = rng.standard_normal((rows, cols // 16, 16)) * np.exp2(block_exp)
  kind = rng.integers(0, 12, x.shape)
  x = np.where(kind == 0, 0.0, x)
  x = np.where(kind == 1, rng.uniform(-1e-39, 1e-39, x.shape), x)
  # Near-ties of the element grid in units of the block's max / 6.
  tie = rng.choice([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], x.shape)
  x = np.where(kind == 2, tie / 6 * np.abs(x).max(-1, keepdims=True), x)
  x[rng.random((rows, cols // 16)) < 0.05] = 0.0
  return (x.reshape(rows, cols) * np.exp2(rng.uniform(-60, 60))).astype(F32)


@pytest.mark.parametrize("seed", range(3))
def test_nvfp4_matches_torchao(seed):
  rng = np.random.default_rng(seed)
  x = _mixed(rng, (32, 64))
  assert_bits_equal(q(x), reference(x))
  x3 = x.reshape(2, 16, 64)  # 3-D, blocks along axis 1, one per-tensor scale for all of it
  assert_bits_equal(q(x3, axis=1), reference(x3, axis=1))


def test_nvfp4_bfloat16_matches_torchao():
  rng = np.random.default_rng(10)
  x = _mixed(rng, (32, 64)).astype(ml_dtypes.bfloat16)
  out = q(x)
  assert out.dtype == ml_dtypes.bfloat16
  assert_bits_equal(out, reference(x))
  assert_bits_equal(q(out), out)  # a fixed point in bfloat16


def test_nvfp4_extreme_tensors_match_torchao():
  fmax = np.finfo(F32).max
  rng = np.random.default_rng(3)
  # The top of the range (the result may round to inf, as in the reference), the smallest
  # tensors torchao computes finitely (s_t just above 2^-120), and tiny blocks with
  # subnormal outputs.
  for scale in (fmax / 4, fmax, 2688 * 2.0**-119, 2688 * 2.0**-100):
    x = (rng.uniform(-1, 1, (4, 32)) * np.float64(scale)).astype(F32)
    x[1, :16] *= F32(2.0**-20)
    x[0, 0] = F32(scale)
    assert_bits_equal(q(x), reference(x))


def test_nvfp4_zero_and_tiny_tensors_give_signed_zeros():
  # Deliberate difference: torchao divides by s_t = 0 and returns NaN for an all-zero tensor;
  # here every tensor with s_t < 2^-120 gives zeros with x's signs.
  zeros = np.array([[0.0, -0.0] * 16] * 4, F32)
  assert np.isnan(reference(zeros)).all()
  assert_bits_equal(q(zeros), zeros)
  tiny = np.full((4, 32), 3e-35, F32)
  tiny[0, :2] = [2e-33, -1e-40]
  assert tensor_scale(tiny) < 2.0**-120
  assert_bits_equal(q(tiny), np.where(tiny < 0, F32(-0.0), F32(0)))
  assert q(tiny * F32(2)).any()  # s_t >= 2^-120: quantized as the reference does
  assert_bits_equal(q(tiny * F32(2)), reference(tiny * F32(2)))


def test_nvfp4_nonfinite_tensors_are_nan():
  # NaN or inf anywhere: s_t is NaN or inf and the whole tensor is NaN, as in torchao.
  for bad in (np.nan, np.inf, -np.inf):
    x = np.ones((4, 32), F32)
    x[1, 20] = bad
    assert np.isnan(q(x)).all()
    assert np.isnan(reference(x)).all()


# ---------------------------------------------------------------------------
# Invariants.
# ---------------------------------------------------------------------------
ELEMENTS = st.one_of(
    st.floats(-1e4, 1e4, width=32),
    st.sampled_from([0.0, -0.0, 1e-40, -3e-39, 1e-30, -1e30, 2.0**-126]))
ARRAYS = hnp.arrays(F32, (4, 32), elements=ELEMENTS)


def _e4m3_values():
  v = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(F32)
  return v[np.isfinite(v) & (v >= 2.0**-6)]


@HYPOTHESIS
@given(x=ARRAYS)
def test_nvfp4_invariants(x):
  out = q(x)
  expect = reference(x)
  if tensor_scale(x) >= 2.0**-120:
    assert_bits_equal(out, expect)
  assert (np.signbit(out) == np.signbit(x)).all()
  s_t = tensor_scale(x)
  if s_t < 2.0**-120:
    assert not out.any()
    return
  # Every output is fl(c * fl(s_t s_b)) with c in E2M1 and s_b an E4M3 value in [2^-6, 448].
  blocks = np.abs(out).reshape(8, 16)
  fits = np.zeros(8, bool)
  for s_b in _e4m3_values():
    grid = E2M1.astype(F32) * (s_t * s_b)  # float32 products, as the definition rounds them
    fits |= np.all(np.isin(blocks, grid), axis=-1)
  assert fits.all()
  # Not idempotent in float32 (s_t is recomputed from fl(6 fl(448 s_t))), but close: the codes
  # repeat, the values move by at most an ulp of s_t s_b times the code.
  again = q(out)
  assert (np.abs(again.astype(np.float64) - out) <= 2 * np.spacing(np.abs(out))).all()


@HYPOTHESIS
@given(x=ARRAYS)
def test_nvfp4_bfloat16_fixed_points(x):
  xb = x.astype(ml_dtypes.bfloat16)
  out = q(xb)
  if tensor_scale(xb) >= 2.0**-100:
    assert_bits_equal(out, reference(xb))
    assert_bits_equal(q(out), out)


def test_nvfp4_float32_is_not_always_idempotent():
  # Documented: about a third of all s_t do not survive fl(fl(6 fl(448 s_t)) / 2688).
  s_t = np.random.default_rng(1).uniform(1, 2, 10000).astype(F32)
  again = F32(6) * (F32(448) * s_t) / F32(2688)
  assert 0.2 < np.mean(again != s_t) < 0.5
  x = np.zeros((4, 32), F32)
  x[0, 0] = s_t[again != s_t][0] * F32(2688)
  once = q(x)
  assert tensor_scale(once) != tensor_scale(x)


def test_nvfp4_multiply_is_ieee():
  # quant_bits.multiply: IEEE products (subnormal results included), on integers.
  rng = np.random.default_rng(0)
  a = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(F32)
  b = (rng.standard_normal(20000) * np.exp2(rng.integers(-140, 20, 20000))).astype(F32)
  with np.errstate(all="ignore"):
    expect = a * b
  assert_bits_equal(np.asarray(jax.jit(qb.multiply)(a, b)), expect)


def test_computed_once_returns_every_bit_pattern_unchanged():
  # quant_bits.computed_once divides bit patterns by a 1 that XLA cannot fold: NaNs with
  # payloads, infinities, signed zeros, subnormals and negative numbers (negative int32 bits)
  # must all come back bit for bit, also when the result is broadcast onto a bigger array.
  rng = np.random.default_rng(3)
  x = rng.integers(0, 2**32, (64, 1), dtype=np.uint64).astype(np.uint32)
  x[:8, 0] = [0x80000000, 0, 0x7F800000, 0xFF800000, 0x7FC00001, 0xFFC12345, 1, 0x807FFFFF]
  x = x.view(F32)
  token = jnp.int32(0x7F7FFFFF)

  @jax.jit
  def use(x, y):
    once, again = qb.computed_once(token, x, y)
    return once, jnp.broadcast_to(again, (64, 16))

  once, broadcast = use(x, x[::-1])
  assert_bits_equal(np.asarray(once), x)
  for column in (0, 15):
    assert_bits_equal(np.asarray(broadcast)[:, column:column + 1], x[::-1])


def test_nvfp4_straight_through_gradient():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(2).standard_normal((4, 32)), jnp.float32)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(quant.quantize(x, "nvfp4") * w)))(x)
  np.testing.assert_array_equal(grad, w)


@pytest.mark.parametrize("call,match", [
    (lambda: quant.quantize(jnp.ones((4, 24)), "nvfp4"),
     r"`block_size`=16 must divide the size 24 of `axis`=-1"),
    (lambda: quant.quantize(jnp.ones((24, 32)), "nvfp4", axis=0),
     r"`block_size`=16 must divide the size 24 of `axis`=0"),
    (lambda: quant.quantize(jnp.ones((4, 32)), "nvfp4", block_size=32),
     r"`block_size` must be 16 or None, got 32"),
    (lambda: quant.quantize(jnp.ones((4, 32)), "nvfp4", granularity="channel"),
     r"NVFP4 format 'nvfp4' scales blocks: `granularity`"),
    (lambda: quant.quantize(jnp.ones((4, 32)), "nvfp4", symmetric=False), r"`symmetric`"),
])
def test_nvfp4_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
