"""Quantization-aware training: closed forms, exact representability after every step,
S->Q vs Q->S, composition with pruning and master-weight transforms, loops and bad input."""

import functools
from fractions import Fraction

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marks import quick_sample

import jaxprune
from jaxprune import qat, quant

try:
  from .nnx_models import Net, mse_step
except ImportError:
  from nnx_models import Net, mse_step

MX = tuple(f for f in quant.FORMATS if f.startswith("mx"))
NEG_ZERO = np.int32(-(2**31))


def bits(x) -> np.ndarray:
  return np.asarray(x, np.float32).view(np.int32)


@functools.cache
def quantizer(fmt, axis, granularity):
  return jax.jit(lambda x: quant.quantize(x, fmt, axis=axis, granularity=granularity))


def assert_on_grid(p, fmt, *, axis=0, granularity=None):
  """quantize(p) == p bit for bit, and every zero is +0.0."""
  np.testing.assert_array_equal(bits(quantizer(fmt, axis, granularity)(p)), bits(p))
  assert not (bits(p) == NEG_ZERO).any()


def assert_nm(p, n, m, axis=0):
  groups = np.moveaxis(np.asarray(p) != 0, axis, 0)
  groups = groups.reshape(groups.shape[0] // m, m, -1).sum(1)
  assert (groups <= n).all()


def run(tx, params, grads_fn, steps, check=None, update=None, project=None):
  """The user's loop: tx.view once, then update + apply_updates; checks after every step.

  ``project`` maps ``tx.view`` of the master onto the params' grid (for bfloat16 params
  whose master is float32)."""
  state = tx.init(params)
  params = tx.view(params)
  update = update or jax.jit(tx.update)
  for t in range(steps):
    before = int(qat.quantization_corrections(state))
    updates, state = update(grads_fn(params, state, t), state, params)
    params = optax.apply_updates(params, updates)
    if check is not None:
      check(params, state)
    # Nothing is silent: entries off the view of the master are exactly the corrections.
    # (This transform's own master: master_params would read an inner SR-STE's.)
    master = jax.tree.map(lambda w, p: p if np.ndim(w) == 0 else w, state.master, params)
    view = tx.view(master)
    if project is not None:
      view = project(view)
    off = sum(int((bits(a) != bits(b)).sum()) for a, b in zip(
        jax.tree.leaves(params), jax.tree.leaves(view), strict=True))
    assert off == int(qat.quantization_corrections(state)) - before
  return params, state


def test_scale_bits():
  assert [qat.scale_bits(f"int{k}") for k in range(2, 9)] == [20, 19, 18, 17, 16, 15, 14]
  assert (qat.scale_bits("fp8_e4m3"), qat.scale_bits("fp8_e5m2")) == (8, 9)
  assert all(qat.scale_bits(f) is None for f in MX)
  assert qat.scale_bits("nvfp4") == 14  # NVFP4's per-tensor scale


def significant_bits(x: float) -> int:
  m, _ = np.frexp(np.float32(x))
  k = 0
  while m != np.round(m):
    m, k = m * 2, k + 1
  return k


@functools.cache
def snapped(fmt, granularity):
  return jax.jit(lambda x: qat.snapped_quantize(x, fmt, axis=0, granularity=granularity))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(["int2", "int4", "int8", "fp8_e4m3", "fp8_e5m2"]),
       channel=st.booleans(), data=st.data())
def test_snapped_quantize_short_scale_and_fixed_point(fmt, channel, data):
  x = data.draw(hnp.arrays(np.float32, (32, 8), elements=st.floats(
      -8, 8, width=32, allow_subnormal=False)))
  # Near-ties at the top: an entry a relative 2^-20 below the largest (rounded up to
  # max_normal * s~ when s~ is rounded down, so it must be clipped to it).
  x[1, 0] = np.float32(np.abs(x[:, 0]).max() * (1 - 2.0**-20))
  granularity = "channel" if channel else "tensor"
  y = np.asarray(snapped(fmt, granularity)(x))
  assert_on_grid(y, fmt, granularity=granularity)
  f, b = quant.get_format(fmt), qat.scale_bits(fmt)
  cols = list(y.T) if channel else [y.ravel()]
  xs = list(x.T) if channel else [x.ravel()]
  for yc, xc in zip(cols, xs, strict=True):
    if np.abs(xc).max() == 0:
      continue
    s_snapped = np.abs(yc).max() / f.max_normal  # exact: the top entry is +-max_normal * s~
    if s_snapped >= np.finfo(np.float32).tiny:  # (tiny groups: quantize's subnormal scales)
      assert significant_bits(s_snapped) <= b
      assert abs(s_snapped / (np.abs(xc).max() / f.max_normal) - 1) <= 2.0**-b


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), exponent=st.integers(-100, 100), bf16=st.booleans())
def test_nvfp4_snapped_quantize_is_a_fixed_point(data, exponent, bf16):
  """Plain NVFP4 is not idempotent in float32 (s_t = amax / 2688 is recomputed from
  fl(6 fl(448 s_t))); the QAT view, with s_t rounded to 14 significant bits, is, and so is
  quantize in bfloat16. Blocks of very different sizes exercise the clamped block scales."""
  x = data.draw(hnp.arrays(np.float32, (32, 8), elements=st.floats(
      -8, 8, width=32, allow_subnormal=False)))
  x = x * np.float32(2.0**exponent) * np.exp2(np.arange(8) * -3.0).astype(np.float32)
  x[1, 0] = np.float32(np.abs(x).max() * (1 - 2.0**-20))  # a near-tie at the top
  if bf16:
    x = jnp.asarray(x, jnp.bfloat16)
  y = snapped("nvfp4", None)(x)
  np.testing.assert_array_equal(np.asarray(quantizer("nvfp4", 0, None)(y)).view(np.uint16 if bf16
                                else np.int32), np.asarray(y).view(np.uint16 if bf16 else np.int32))
  amax = float(np.abs(np.asarray(x, np.float32)).max())
  if not bf16 and amax / 2688 >= 2.0**-100:
    s_t = float(np.abs(np.asarray(y)).max()) / 2688  # exact: the top entry is 2688 s~
    assert significant_bits(s_t) <= 14 and abs(s_t / (amax / 2688) - 1) <= 2.0**-14


@pytest.mark.parametrize("fmt", ["int2", "int4", "int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_snapped_quantize_fast_path_is_the_general_path(fmt, granularity):
  """Groups with amax >= 2^-60 take a fast path (exact comparisons with the rounding
  boundaries h s); scaled by 2^-70 the same tensor takes quantize's general path. Inputs on,
  next to, and one or two float32 steps from the boundaries."""
  rng = np.random.default_rng(len(fmt) + len(granularity))
  x = rng.standard_normal((64, 32)).astype(np.float32)
  y = np.asarray(snapped(fmt, granularity)(x))
  grid = np.unique(np.abs(y))
  mids = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)
  for candidate in (mids, np.nextafter(mids, np.float32(1e9)), np.nextafter(mids, np.float32(0)),
                    grid, np.nextafter(np.nextafter(mids, np.float32(0)), np.float32(0))):
    adversarial = np.resize(candidate, x.size).reshape(x.shape) * np.sign(x)
    adversarial[0] = x[0]  # keeps the scales' largest entries
    fast = np.asarray(snapped(fmt, granularity)(adversarial))
    general = np.asarray(snapped(fmt, granularity)(adversarial * np.float32(2.0**-70)))
    np.testing.assert_array_equal(bits(fast), bits(general * np.float32(2.0**70)))


@pytest.mark.parametrize("fmt", ["int4", "fp8_e4m3"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fast_amax_routing_matches_general_path(fmt, granularity):
  """The float max of |g| that picks the fast path (``qat_grid._fast_amax``) hands every tensor
  with a zero, subnormal, tiny (< 2^-60), infinite or NaN group to the integer check, and the
  result is the general path's, bit for bit, whether or not the backend flushes subnormals."""
  from jaxprune import qat_grid
  rng = np.random.default_rng(3)
  base = rng.standard_normal((16, 8)).astype(np.float32)
  specials = {"zero": 0.0, "subnormal": 1e-40, "tiny": 2.0**-80, "inf": np.inf, "nan": np.nan}
  spec = quant.make_spec(fmt, base.shape, jnp.float32, 0, None, granularity, True)
  quantize = jax.jit(functools.partial(qat_grid.grid_quantize, spec=spec,
                                       bits=qat.scale_bits(fmt)))
  general = jax.jit(functools.partial(qat_grid.general_grid_quantize, spec=spec,
                                      bits=qat.scale_bits(fmt)))
  for name, value in specials.items():
    x = base.copy()
    x[:, 3] = value * np.sign(base[:, 3])  # one channel (the whole tensor's max for inf/nan)
    x[0, 5] = np.float32(value)            # and one entry of another
    ok, amax = qat_grid._fast_amax(jnp.asarray(x), None if granularity == "tensor" else 0)
    int_amax = np.max(np.abs(x).view(np.int32) & 0x7FFFFFFF, axis=None if granularity ==
                      "tensor" else 0, keepdims=True)
    fast = (int_amax < 0x7F800000) & ((int_amax == 0) | (int_amax >= 0x21800000))  # 2^-60
    assert bool(ok) == bool(np.all(fast)), name
    if np.all(fast):
      np.testing.assert_array_equal(np.asarray(amax), int_amax, err_msg=name)
    np.testing.assert_array_equal(bits(quantize(x)), bits(general(x)), err_msg=name)


def test_closed_form_first_update():
  """A 4x1 kernel, 2:4 + int4, SGD(1/8): every number below is computed by hand."""
  w = jnp.array([[1.75], [-0.5], [0.25], [1.0]])
  x = jnp.array([1.0, 2.0, -1.0, 0.5])
  tx = qat.quantization(optax.sgd(0.125), "int4", nm=(2, 4), select="w")
  state = tx.init({"w": w})
  params = tx.view({"w": w})
  # S keeps 1.75 and 1.0; the int4 scale 1.75 / 7 = 1/4 needs one bit; 1.0 = 4 / 4.
  np.testing.assert_array_equal(params["w"][:, 0], [1.75, 0.0, 0.0, 1.0])
  grads = jax.grad(lambda p: 0.5 * jnp.sum(x @ p["w"]) ** 2)(params)
  np.testing.assert_array_equal(grads["w"][:, 0], [2.25, 4.5, -2.25, 1.125])  # (x . v) x
  jitted, _ = jax.jit(tx.update)(grads, state, params)
  updates, state = tx.update(grads, state, params)  # eager
  np.testing.assert_array_equal(bits(jitted["w"]), bits(updates["w"]))
  params = optax.apply_updates(params, updates)
  w1 = np.array([1.46875, -1.0625, 0.53125, 0.859375])  # w - g / 8, exact
  np.testing.assert_array_equal(jaxprune.master_params(state)["w"][:, 0], w1)
  # S keeps 1.46875 and -1.0625. Scale 1.46875 / 7 = 47/224 = 0.2098..., in [1/8, 1/4),
  # rounded to 18 significant bits: a multiple of 2^-20.
  k = round(Fraction(47, 224) * 2**20)
  assert k == 220014
  expected = np.array([7 * k, -5 * k, 0, 0]) / 2.0**20  # -1.0625 / s = -5.06 -> -5
  np.testing.assert_array_equal(params["w"][:, 0], expected)
  np.testing.assert_array_equal(updates["w"][:, 0], expected - [1.75, 0.0, 0.0, 1.0])
  assert_on_grid(params["w"], "int4")
  assert int(qat.quantization_corrections(state)) == 0
  # The plain int4 scale is 1.46875 / 7 itself: the QAT one is within 2^-18 of it.
  plain = np.asarray(quant.quantize(jnp.asarray([[1.46875], [-1.0625], [0.0], [0.0]]), "int4"))
  assert abs(plain[0, 0] / expected[0] - 1) < 2.0**-18


def test_sq_and_qs_views_differ_on_a_tie():
  """int4 per tensor (scale 1/4), 2:4 along axis 0: Q rounds 0.2 and 0.3 both to 0.25."""
  w = {"w": jnp.array([[1.75], [0.2], [0.3], [0.0]])}
  sq = qat.quantization(optax.sgd(0.1), "int4", nm=(2, 4), select="w").view(w)
  qs = qat.quantization(optax.sgd(0.1), "int4", nm=(2, 4), order="qs", select="w").view(w)
  # S->Q keeps the larger |w| = 0.3 (index 2); Q->S sees a tie of 0.25 and keeps index 1.
  np.testing.assert_array_equal(sq["w"][:, 0], [1.75, 0.0, 0.25, 0.0])
  np.testing.assert_array_equal(qs["w"][:, 0], [1.75, 0.25, 0.0, 0.0])


def random_grads(lr):
  def grads(params, state, t):
    return jax.tree.map(lambda p: lr * jax.random.normal(jax.random.key(t), p.shape), params)
  return grads


# (order, structure, granularity): together both orders, every structure, per-tensor and
# per-channel scales, and every element family.
CONFIGS = {
    "int2": ("sq", None, "tensor"),
    "int4": ("qs", "nm", "channel"),
    "int8": ("sq", "unstructured", "channel"),
    "fp8_e4m3": ("qs", "unstructured", "tensor"),
    "fp8_e5m2": ("sq", "nm", "channel"),
    "mxfp8_e4m3": ("sq", "nm", None),
    "mxfp8_e5m2": ("qs", None, None),
    "mxfp6_e3m2": ("qs", "nm", None),
    "mxfp4_e2m1": ("sq", "unstructured", None),
    "mxint8": ("qs", "unstructured", None),
    "nvfp4": ("qs", "nm", None),
}


@functools.cache
def transform(fmt):
  """Built once per format, so that hypothesis examples reuse the compiled update."""
  order, structure, granularity = CONFIGS[fmt]
  kw = {"sparsity": 0.6} if structure == "unstructured" else (
      {"nm": (2, 4)} if structure == "nm" else {})
  tx = qat.quantization(optax.sgd(1.0), fmt, order=order, granularity=granularity,
                        select="w", **kw)
  return tx, jax.jit(tx.update), structure, granularity


@pytest.mark.parametrize("fmt", CONFIGS)
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), lr=st.sampled_from([0.3, 3.0]))
def test_invariants_after_every_step(fmt, seed, lr):
  """Random steps of 0.3 or 3 standard deviations of the weights (many grid steps)."""
  tx, update, structure, granularity = transform(fmt)
  w = jax.random.normal(jax.random.key(seed), (32, 8))

  def check(params, state):
    p = params["w"]
    assert_on_grid(p, fmt, granularity=granularity)
    if structure == "nm":
      assert_nm(p, 2, 4)
    if structure == "unstructured":
      assert int((np.asarray(p) == 0).sum()) >= round(0.6 * p.size)

  _, state = run(tx, {"w": w}, random_grads(lr), 3, check, update)
  if fmt in MX and fmt != "mxfp8_e5m2":
    # Guaranteed: a block's shared exponent moves by far less than 6 binades per step.
    assert int(qat.quantization_corrections(state)) == 0


def scaled_by(factors):
  """Grads for optax.identity that multiply the master by factors[t], plus a little noise."""
  def grads(params, state, t):
    w = jaxprune.master_params(state)["w"]
    target = w * factors[t]
    noise = 0.1 * jnp.std(target) * jax.random.normal(jax.random.key(t), w.shape)
    return {"w": target + noise - w}
  return grads


@functools.cache
def scaled_transform(fmt):
  tx = qat.quantization(optax.identity(), fmt, select="w")
  return tx, jax.jit(tx.update)


@pytest.mark.parametrize("fmt, factor", [("int8", 3.5), ("int4", 7.0)])
def test_int_scale_changes_within_the_bound_land_exactly(fmt, factor):
  """The int theorem: exact while each step changes the scale by at most 4x (8x for <= int4);
  the noise keeps these factors below the bounds."""
  tx, update = scaled_transform(fmt)
  w = jax.random.normal(jax.random.key(2), (32, 16))
  factors = [factor, 1 / factor, 1 / factor, factor, 0.9 * factor, 1 / (0.9 * factor)]
  _, state = run(tx, {"w": w}, scaled_by(factors), len(factors),
                 lambda params, state: assert_on_grid(params["w"], fmt), update)
  assert int(qat.quantization_corrections(state)) == 0


def test_nvfp4_scale_changes_within_the_bound_land_exactly():
  """NVFP4: exact while each block's s_b s~ moves by at most two binades per step (here the
  tensor by up to 3x, with noise); then a 1000x shrink, which misses and is counted."""
  tx, update = scaled_transform("nvfp4")
  w = jax.random.normal(jax.random.key(2), (32, 16))
  factors = [3.0, 1 / 3, 1 / 2.5, 2.5, 0.5, 2.0]
  check = lambda params, state: assert_on_grid(params["w"], "nvfp4")  # noqa: E731
  params, state = run(tx, {"w": w}, scaled_by(factors), len(factors), check, update)
  assert int(qat.quantization_corrections(state)) == 0
  # v - p of the largest entry needs v's fine bits and p's high bits: the per-tensor scale
  # cannot land, so the tensor lands on 0 (and the next step lands from there).
  params, state = run(tx, params, scaled_by([1e-3]), 1, check, update)
  v = np.asarray(tx.view(jaxprune.master_params(state))["w"])
  assert not np.asarray(params["w"]).any()
  assert int(qat.quantization_corrections(state)) == (v != 0).sum() > 400
  before = int(qat.quantization_corrections(state))
  updates, state = update(scaled_by([1.0])(params, state, 0), state, params)  # from 0: lands
  params = optax.apply_updates(params, updates)
  assert int(qat.quantization_corrections(state)) == before
  np.testing.assert_array_equal(params["w"], tx.view(jaxprune.master_params(state))["w"])
  assert np.asarray(params["w"]).any()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_1000x_shrink_keeps_the_codes_on_a_coarser_scale(fmt):
  """v - p needs the fine bits of the new scale and the high bits of p: no landing.
  The group keeps its codes on a scale rounded to a coarser power of two, and is counted."""
  tx, update = scaled_transform(fmt)
  w = jax.random.normal(jax.random.key(3), (32, 16))
  p0 = np.asarray(tx.view({"w": w})["w"])
  params, state = run(tx, {"w": w}, scaled_by([1e-3]), 1,
                      lambda params, state: assert_on_grid(params["w"], fmt), update)
  p = np.asarray(params["w"])
  v = np.asarray(tx.view(jaxprune.master_params(state))["w"])
  assert int(qat.quantization_corrections(state)) == (v != 0).sum()
  q_max = quant.get_format(fmt).max_normal
  codes = lambda x: np.round(x / (np.abs(x).max() / q_max))  # noqa: E731
  np.testing.assert_array_equal(codes(p), codes(v))
  # A shrink by F moves the scale by at most a relative F 2^-(b + 1).
  shrink = np.abs(p0).max() / np.abs(v).max()
  assert 500 < shrink < 2000
  bound = shrink * 2.0 ** -(qat.scale_bits(fmt) + 1)
  assert 0 < np.abs(p - v).max() <= bound * np.abs(v).max()


def test_a_collapse_that_no_addition_reaches_lands_on_zero_and_is_counted():
  """fp8_e5m2 (scale with 9 significant bits): the master goes from [56, 28] to [57, 2^-19].
  Scale 57 / 57344 -> 261 * 2^-18, so the view is [57344, 2^-9] * 261 * 2^-18; its small
  entry has bits down to 2^-27 while every fl(28 + u) near 0 is a multiple of 2^-19."""
  w0 = jnp.array([[56.0], [28.0]])  # 56 / 57344 = 2^-10: the first view is w0 itself
  tx = qat.quantization(optax.identity(), "fp8_e5m2", select="w")
  state = tx.init({"w": w0})
  params = tx.view({"w": w0})
  np.testing.assert_array_equal(params["w"][:, 0], [56.0, 28.0])
  updates, state = jax.jit(tx.update)({"w": jnp.array([[1.0], [2.0**-19 - 28.0]])}, state,
                                     params)
  params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(jaxprune.master_params(state)["w"][:, 0], [57.0, 2.0**-19])
  view = [57344 * 261 * 2.0**-18, 261 * 2.0**-27]
  np.testing.assert_array_equal(tx.view(jaxprune.master_params(state))["w"][:, 0], view)
  np.testing.assert_array_equal(params["w"][:, 0], [view[0], 0.0])  # off by 2e-6 < 2^-11 * 28
  assert int(qat.quantization_corrections(state)) == 1
  assert_on_grid(params["w"], "fp8_e5m2")


def test_plain_scales_would_miss():
  """Why the scales are snapped: with quantize's own int8 scale, p + (v - p) misses v."""
  w = jax.random.normal(jax.random.key(4), (32, 8))
  missed = 0
  p = np.asarray(quant.quantize(w, "int8"))
  for t in range(3):
    w = w - jax.random.normal(jax.random.key(t), w.shape)
    v = np.asarray(quant.quantize(w, "int8"))
    missed += int((p + (v - p) != v).sum())
    p = v
  assert missed > 0


def test_composition_with_nm_pruning():
  """The inner pruning transform owns the 2:4 mask; quantization only quantizes."""
  tx = qat.quantization(jaxprune.nm_pruning(optax.adam(0.05), 2, 4), "int4",
                        granularity="channel")
  params = {"w": jax.random.normal(jax.random.key(5), (32, 8)), "b": jnp.ones(8)}

  def check(params, state):
    mask = np.asarray(state.inner_state.masks["w"])
    p = np.asarray(params["w"])
    assert (p[~mask] == 0).all() and (np.asarray(state.master["w"])[~mask] == 0).all()
    assert_nm(p, 2, 4)
    assert_on_grid(p, "int4", granularity="channel")
    assert np.ndim(state.master["b"]) == 0  # the bias is not selected: trained as is

  params, state = run(tx, params, random_grads(1.0), 5, check)
  assert not np.any(np.asarray(params["b"]) == 1.0)
  # Scales are those of the sparse master: exactly the QAT quantizer of it.
  np.testing.assert_array_equal(
      params["w"], qat.snapped_quantize(state.master["w"], "int4", axis=0, granularity="channel"))


def test_composition_with_magnitude_pruning_mx():
  tx = qat.quantization(jaxprune.magnitude_pruning(optax.sgd(0.5), 0.75), "mxfp4_e2m1")
  params = {"w": jax.random.normal(jax.random.key(6), (64, 8))}

  def check(params, state):
    p = np.asarray(params["w"])
    assert int((p == 0).sum()) >= 0.75 * p.size
    assert (p[~np.asarray(state.inner_state.masks["w"])] == 0).all()
    assert_on_grid(p, "mxfp4_e2m1")

  run(tx, params, random_grads(1.0), 4, check)


def test_composition_with_sr_ste_and_master_params():
  tx = qat.quantization(jaxprune.sr_ste(optax.adam(0.05), 2, 4, decay=0.01), "mxfp4_e2m1")
  w = jax.random.normal(jax.random.key(7), (64, 8))
  e = jaxprune.nm_mask(jnp.abs(w), 2, 4, axis=0)
  params = tx.view({"w": w})
  np.testing.assert_array_equal(params["w"], quant.quantize(jnp.where(e, w, 0.0),
                                                           "mxfp4_e2m1", axis=0))

  def check(params, state):
    dense = jaxprune.master_params(state)["w"]  # the innermost: SR-STE's dense weights
    assert int((dense == 0).sum()) == 0
    sparse = jnp.where(jaxprune.nm_mask(jnp.abs(dense), 2, 4, axis=0), dense, 0.0)
    np.testing.assert_array_equal(state.master["w"] == 0, sparse == 0)
    assert_nm(params["w"], 2, 4)
    assert_on_grid(params["w"], "mxfp4_e2m1")

  run(tx, {"w": w}, random_grads(1.0), 4, check)


def test_chain_nnx_optimizer_and_jit():
  model = Net(nnx.Rngs(0), hidden=32)
  tx = qat.quantization(optax.adamw(1e-2), "int4", nm=(2, 4), granularity="channel",
                        select=jaxprune.select(head=None))   # both kernels, the head included
  nnx.update(model, tx.view(nnx.state(model, nnx.Param)))
  optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), tx),
                            wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (64, 8))
  y = jax.random.normal(jax.random.key(2), (64, 4))

  step = mse_step(x, y)

  losses = []
  for _ in range(10):
    losses.append(float(step(model, optimizer)))
    for kernel in (model.a.kernel[...], model.b.kernel[...]):
      assert_on_grid(kernel, "int4", granularity="channel")
      assert_nm(kernel, 2, 4)
  assert losses[-1] < losses[0]
  assert int(qat.quantization_corrections(optimizer.opt_state)) == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(fmt="int9"), "Unknown format `fmt`='int9'; valid names: int2, int3"),
    (dict(fmt="int4", sparsity=0.5, nm=(2, 4)), "either `sparsity`"),
    (dict(fmt="int4", sparsity=1.0), r"`sparsity` must be in \[0, 1\)"),
    (dict(fmt="int4", sparsity=-0.1), r"`sparsity` must be in \[0, 1\)"),
    (dict(fmt="int4", order="sqq"), "`order` must be one of"),
    (dict(fmt="int4", nm=(5, 4)), r"`n` must be in \[1, m\]"),
    (dict(fmt="mxint8", granularity="tensor"), "MX format 'mxint8' scales blocks"),
    (dict(fmt="int4", block_size=0), "`block_size` must be a positive integer"),
    (dict(fmt="int8", nm=(2, 3), order="qs", block_size=32), "m = 3 must divide"),
])
def test_construction_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    qat.quantization(optax.sgd(1.0), **kwargs)


# bfloat16 params: the view is quantize in bfloat16, whose results are its fixed points.
BF16_CONFIGS = {
    "int4": ("sq", "nm", "channel"),
    "mxfp8_e4m3": ("qs", "unstructured", None),
    "int8": ("qs", "unstructured", "tensor"),
    "fp8_e4m3": ("sq", None, "channel"),
    "fp8_e5m2": ("qs", "nm", "tensor"),
    "mxfp4_e2m1": ("sq", "nm", None),
    "mxint8": ("sq", None, None),
    "nvfp4": ("sq", "unstructured", None),
}


@functools.cache
def bf16_transform(fmt):
  order, structure, granularity = BF16_CONFIGS[fmt]
  kw = {"sparsity": 0.6} if structure == "unstructured" else (
      {"nm": (2, 4)} if structure == "nm" else {})
  tx = qat.quantization(optax.adam(0.05), fmt, order=order, granularity=granularity,
                        select="w", **kw)
  return tx, jax.jit(tx.update), structure, granularity


@pytest.mark.parametrize("fmt", quick_sample(BF16_CONFIGS, 1))
def test_bfloat16_params_stay_on_the_grid(fmt):
  """Holds whether the master weights are bfloat16 (like the params) or float32."""
  tx, update, structure, granularity = bf16_transform(fmt)
  w = jax.random.normal(jax.random.key(11), (32, 16)).astype(jnp.bfloat16)

  def check(params, state):
    p = params["w"]
    assert p.dtype == jnp.bfloat16
    on_grid = quantizer(fmt, 0, granularity)(p)
    np.testing.assert_array_equal(np.asarray(on_grid).view(np.uint16),
                                  np.asarray(p).view(np.uint16))
    assert not (np.asarray(p).view(np.uint16) == 0x8000).any()  # no -0.0
    if structure == "nm":
      assert_nm(np.asarray(p, np.float32), 2, 4)
    if structure == "unstructured":
      assert int((np.asarray(p, np.float32) == 0).sum()) >= round(0.6 * p.size)

  def project(view):  # the bfloat16 grid point of a (float32 or bfloat16) view
    return {"w": qat.snapped_quantize(jnp.asarray(view["w"], jnp.bfloat16), fmt, axis=0,
                                      granularity=granularity)}

  def grads(params, state, t):  # the gradient of a regression towards fixed targets
    target = jax.random.normal(jax.random.key(100), (32, 16))
    return {"w": (params["w"].astype(jnp.float32) - target).astype(jnp.bfloat16)}

  params, state = run(tx, {"w": w}, grads, 6, check, update, project)
  assert np.asarray(params["w"], np.float32).any()


def test_init_errors():
  w = jnp.ones((16, 8))
  with pytest.raises(ValueError, match=r"layer/kernel: `block_size`=32 must divide the size 16"):
    qat.quantization(optax.sgd(1.0), "mxfp4_e2m1").init({"layer": {"kernel": w}})
  with pytest.raises(ValueError, match="w: quantization-aware training needs float32 or "
                     "bfloat16 params, got float16"):
    qat.quantization(optax.sgd(1.0), "int4").init({"w": w.astype(jnp.float16)})
  with pytest.raises(ValueError, match="order='qs' masks the quantized weights"):
    qat.quantization(jaxprune.nm_pruning(optax.sgd(1.0)), "int4", order="qs").init(
        {"w": w})
  with pytest.raises(ValueError, match="not both"):
    qat.quantization(jaxprune.magnitude_pruning(optax.sgd(1.0), 0.5), "int4",
                     sparsity=0.5).init({"w": w})
  # A master-weight inner is known at construction.
  with pytest.raises(ValueError, match="not both"):
    qat.quantization(jaxprune.sr_ste(optax.sgd(1.0)), "int4", nm=(2, 4))
  with pytest.raises(ValueError, match="order='qs' masks the quantized weights"):
    qat.quantization(jaxprune.sr_ste(optax.sgd(1.0)), "int4", order="qs")
  with pytest.raises(ValueError, match="holds no jaxprune.quantization state"):
    qat.quantization_corrections(jaxprune.sr_ste(optax.sgd(1.0)).init({"w": w}))
