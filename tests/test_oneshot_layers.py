"""Layer-level one-shot methods against the reference code (tests/oneshot_reference.py),
closed forms and invariants: SparseGPT, GPTQ, Wanda, the magnitude baseline and OWL.

The ports run in float32 on the PyTorch ``(out, in)`` layout (``W.T`` of a Flax
kernel), with the same Hessian. "Within float32 rounding" below means an
absolute difference under ``ATOL`` for weights of order 1: a sweep of ~100 rows
in float32, with its matmuls summed in another order, moves the last few bits.
"""

import fractions
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import oneshot_reference as ref
import pytest
from marks import quick_sample

from jaxprune import oneshot, quant

ATOL = 2e-5


def _problem(seed: int, n_in: int = 96, n_out: int = 40, tokens: int = 400, dead=()):
  """Correlated inputs with uneven scales (H far from diagonal), a kernel, and H = 2 X^T X."""
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((n_in, n_in)).astype(np.float32) / np.sqrt(n_in)
  x = rng.standard_normal((tokens, n_in)).astype(np.float32) @ mix
  x *= rng.uniform(0.2, 3.0, n_in).astype(np.float32)
  x[:, list(dead)] = 0
  w = rng.standard_normal((n_in, n_out)).astype(np.float32)
  return x, w, (2 * x.T @ x).astype(np.float32)


def _rtn_kwargs(fmt: str, group_size):
  if quant.get_format(fmt).kind == "mx":
    return {"axis": 0, "block_size": group_size or 32}
  if group_size is None:
    return {"axis": 0, "granularity": "channel"}
  return {"axis": 0, "block_size": group_size}


# --------------------------------------------------------------------------- SparseGPT


@pytest.mark.parametrize("seed,sparsity,blocksize", [(0, 0.5, 32), (1, 0.7, 40), (2, 0.5, 128)])
def test_sparsegpt_unstructured_matches_reference(seed, sparsity, blocksize):
  _, w, h = _problem(seed)
  got = oneshot.sparsegpt(w, h, sparsity=sparsity, blocksize=blocksize)
  want, pruned = ref.fasterprune(w.T, h, sparsity, blocksize=blocksize,
                                 count=lambda n: round(n * sparsity))
  np.testing.assert_array_equal(~np.asarray(got.mask), pruned.T)
  np.testing.assert_allclose(got.kernel, want.T, rtol=0, atol=ATOL)
  # Exactly round(s * numel) per block (the last one, 96 % 40 = 16 rows, too).
  for i1 in range(0, w.shape[0], blocksize):
    block = np.asarray(got.mask)[i1:i1 + blocksize]
    assert np.sum(~block) == round(sparsity * block.size)
  assert np.all(np.asarray(got.kernel)[~np.asarray(got.mask)] == 0)


def test_reference_count_is_one_more():
  """The deviation we document: the reference's `<=` threshold prunes int(s * numel) + 1."""
  _, w, h = _problem(3)
  _, pruned = ref.fasterprune(w.T, h, 0.5, blocksize=32)
  assert np.sum(pruned[:, :32]) == 0.5 * 32 * 40 + 1


@pytest.mark.parametrize("n,m,seed", [(2, 4, 0), (1, 4, 1), (4, 8, 2)])
def test_sparsegpt_nm_matches_reference(n, m, seed):
  _, w, h = _problem(seed)
  got = oneshot.sparsegpt(w, h, nm=(n, m), blocksize=32)
  want, pruned = ref.fasterprune(w.T, h, 0, prunen=m - n, prunem=m, blocksize=32)
  np.testing.assert_array_equal(~np.asarray(got.mask), pruned.T)
  np.testing.assert_allclose(got.kernel, want.T, rtol=0, atol=ATOL)
  groups = (np.asarray(got.kernel) != 0).reshape(w.shape[0] // m, m, w.shape[1]).sum(1)
  assert np.all(groups == n)


def test_sparsegpt_two_inputs_closed_form():
  """OBS for one pruned weight: w1' = w1 + w0 h01 / h11 (damped H), w0' = 0."""
  h = np.array([[4.0, 1.5], [1.5, 2.0]], np.float32)
  w = np.array([[0.1], [1.0]], np.float32)
  damp = 0.01
  hd = h + damp * np.mean(np.diag(h)) * np.eye(2, dtype=np.float32)
  got = oneshot.sparsegpt(w, h, sparsity=0.5, damp=damp)
  np.testing.assert_array_equal(got.mask, [[False], [True]])
  np.testing.assert_allclose(got.kernel, [[0.0], [1.0 + 0.1 * hd[0, 1] / hd[1, 1]]], rtol=1e-6)


def test_sparsegpt_diagonal_hessian_prunes_by_saliency_without_updates():
  """With a diagonal H the OBS update vanishes: the kept weights are the original ones and the
  block prunes the smallest w^2 (H_ii + lambda)."""
  rng = np.random.default_rng(4)
  w = rng.standard_normal((64, 8)).astype(np.float32)
  diag = rng.uniform(0.1, 10.0, 64).astype(np.float32)
  got = oneshot.sparsegpt(w, np.diag(diag), sparsity=0.25, blocksize=64)
  score = w**2 * (diag + 0.01 * diag.mean())[:, None]
  kept = score > np.sort(score.ravel())[round(0.25 * w.size) - 1]
  np.testing.assert_array_equal(got.mask, kept)
  np.testing.assert_array_equal(got.kernel, np.where(kept, w, 0))


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_dead_inputs(nm):
  """A singular Hessian (inputs the calibration never excites): no NaN, the reference's fix."""
  dead = (0, 5, 17, 50)
  x, w, h = _problem(5, dead=dead)
  assert np.all(np.diag(h)[list(dead)] == 0)
  kwargs = {"nm": nm} if nm else {"sparsity": 0.5}
  got = oneshot.sparsegpt(w, h, blocksize=32, **kwargs)
  assert np.all(np.isfinite(got.kernel))
  assert np.all(np.asarray(got.kernel)[list(dead)] == 0)
  want, pruned = ref.fasterprune(w.T, h, 0.5 if nm is None else 0, prunen=2 if nm else 0,
                                 prunem=4 if nm else 0, blocksize=32,
                                 count=lambda n: round(n * 0.5))
  np.testing.assert_array_equal(~np.asarray(got.mask), pruned.T)
  np.testing.assert_allclose(got.kernel, want.T, rtol=0, atol=ATOL)


@pytest.mark.parametrize("fmt", ["int4", "mxfp4_e2m1"])
def test_sparsegpt_joint_quantization_matches_reference(fmt):
  """2:4 + 4-bit (the SparseGPT paper's joint setting): same masks and values as the port with
  jaxprune's grid; 2:4 exact; exactly representable."""
  _, w, h = _problem(6, n_in=128)
  got = oneshot.sparsegpt(w, h, nm=(2, 4), blocksize=64, quantize=fmt)
  q = ref.AbsmaxQuantizer(4, pin=True) if fmt == "int4" else _GroupedMX(fmt, 32)
  protect = None
  if fmt == "int4":   # The entry that sets each column's scale: never pruned, +-q_max.
    protect = np.zeros(w.T.shape, bool)
    protect[np.arange(w.shape[1]), np.abs(w).argmax(0)] = True
    unprotected, pruned = ref.fasterprune(w.T, h, 0, prunen=2, prunem=4, blocksize=64,
                                          quantizer=ref.AbsmaxQuantizer(4, pin=True))
    assert np.any(pruned & protect)   # Without it, OBS updates get some of them pruned here.
  want, pruned = ref.fasterprune(w.T, h, 0, prunen=2, prunem=4, blocksize=64, quantizer=q,
                                 protect=protect)
  np.testing.assert_array_equal(~np.asarray(got.mask), pruned.T)
  np.testing.assert_allclose(got.kernel, want.T, rtol=0, atol=ATOL)
  k = np.asarray(got.kernel)
  assert np.all((k != 0).reshape(32, 4, -1).sum(1) <= 2)
  np.testing.assert_array_equal(quant.quantize(k, fmt, **_rtn_kwargs(fmt, None)), k)


def test_sparsegpt_joint_int_keeps_the_scale_entry():
  """An int scale's entry is never pruned, so the sparse kernel keeps the dense scale."""
  _, w, h = _problem(7, n_in=64, n_out=16)
  w[10, 3] = 50.0   # The largest of column 3, with a tiny Hessian weight: a pruning candidate.
  h[10, :] *= 1e-3
  h[:, 10] *= 1e-3
  got = oneshot.sparsegpt(w, h, sparsity=0.5, blocksize=32, quantize="int4")
  assert got.mask[10, 3]
  assert abs(float(got.kernel[10, 3])) == pytest.approx(50.0, rel=1e-6)
  np.testing.assert_array_equal(quant.quantize(got.kernel, "int4", axis=0,
                                               granularity="channel"), got.kernel)
  assert int(np.sum(~np.asarray(got.mask)[:32])) == 32 * 16 // 2


class _GroupedMX:
  """The MX oracle quantizer with static 32-row blocks over the whole (out, in) weight."""

  def __init__(self, fmt, group):
    self.fmt, self.group = fmt, group

  def find_params(self, x, first):
    self.blocks = []
    for i in range(0, x.shape[1], self.group):
      q = ref.MXQuantizer(self.fmt)
      q.find_params(x[:, i:i + self.group], i)
      self.blocks.append(q)

  def quantize(self, x, col):
    return self.blocks[col // self.group].quantize(x, col)


# --------------------------------------------------------------------------- GPTQ

GPTQ_CASES = [
    # fmt, group_size, act_order
    ("int4", None, False), ("int3", 32, True), ("mxfp4_e2m1", None, False),
    ("int3", None, False), ("int4", 32, False), ("int4", None, True), ("int8", 48, False),
    ("mxfp6_e2m3", None, True), ("mxfp8_e4m3", 32, False), ("mxint8", None, False),
]


def _gptq_reference(w, h, fmt, group_size, act_order, blocksize, pin=True):
  kind = quant.get_format(fmt).kind
  if kind == "mx":
    quantizer, group_size = ref.MXQuantizer(fmt), group_size or 32
  else:
    quantizer = ref.AbsmaxQuantizer(quant.get_format(fmt).bits, pin=pin)
  return ref.fasterquant(w.T, h, quantizer, blocksize=blocksize, groupsize=group_size or -1,
                         actorder=act_order, static_groups=act_order and group_size is not None,
                         find_params_before_dead=False).T, quantizer


@pytest.mark.parametrize("fmt,group_size,act_order", quick_sample(GPTQ_CASES, 3))
def test_gptq_matches_reference(fmt, group_size, act_order):
  _, w, h = _problem(8)
  got = np.asarray(oneshot.gptq(w, h, fmt, blocksize=40, group_size=group_size,
                                act_order=act_order))
  want, _ = _gptq_reference(w, h, fmt, group_size, act_order, blocksize=40)
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
  np.testing.assert_array_equal(quant.quantize(got, fmt, **_rtn_kwargs(fmt, group_size)), got)


@pytest.mark.parametrize("fmt,seed", [("int4", 9), ("int3", 10)])
def test_gptq_pin_is_the_only_difference_from_the_reference(fmt, seed):
  """Without jaxprune's pin, the reference agrees on every output column whose scale entry it
  rounds to +-q_max; on the others its result is not what quant.quantize would produce."""
  _, w, h = _problem(seed)
  got = np.asarray(oneshot.gptq(w, h, fmt, blocksize=32))
  want, quantizer = _gptq_reference(w, h, fmt, None, False, blocksize=32, pin=False)
  cols = np.arange(w.shape[1])
  q_max = quantizer.q_max
  pinned_ok = np.round(want[quantizer.pin_col, cols] / quantizer.scale) == np.where(
      want[quantizer.pin_col, cols] < 0, -q_max, q_max)
  assert 0.6 * len(cols) <= pinned_ok.sum() < len(cols)
  np.testing.assert_allclose(got[:, pinned_ok], want[:, pinned_ok], rtol=0, atol=ATOL)
  rtn = np.asarray(quant.quantize(want, fmt, axis=0, granularity="channel"))
  unrepresentable = np.any(rtn != want, axis=0)
  assert not np.any(unrepresentable[pinned_ok])


@pytest.mark.parametrize("fmt,group_size", quick_sample(
    [("int3", 16), ("mxfp4_e2m1", None), ("int4", None), ("mxfp8_e5m2", None), ("mxint8", 64)],
    2))
def test_gptq_with_diagonal_hessian_is_round_to_nearest(fmt, group_size):
  """No correlation between inputs: nothing to compensate, GPTQ is RTN bit for bit."""
  rng = np.random.default_rng(11)
  w = rng.standard_normal((128, 24)).astype(np.float32)
  h = np.diag(rng.uniform(0.5, 2.0, 128)).astype(np.float32)
  got = oneshot.gptq(w, h, fmt, group_size=group_size)
  rtn = quant.quantize(w, fmt, **_rtn_kwargs(fmt, group_size))
  np.testing.assert_array_equal(jax.lax.bitcast_convert_type(got, jnp.int32),
                                jax.lax.bitcast_convert_type(rtn, jnp.int32))


def test_gptq_two_inputs_closed_form():
  """One rounding step: w1' = w1 + (w0 - Q(w0)) h01 / h11 (damped H), then Q(w1')."""
  h = np.array([[4.0, -1.5], [-1.5, 2.0]], np.float32)
  w = np.array([[0.33, -0.2], [0.8, 0.7]], np.float32)
  hd = h + 0.01 * np.mean(np.diag(h)) * np.eye(2, dtype=np.float32)
  s = np.abs(w).max(0) / 7
  q0 = s * np.clip(np.round(w[0] / s), -7, 7)
  w1 = w[1] + (w[0] - q0) * hd[0, 1] / hd[1, 1]
  q1 = s * np.clip(np.round(w1 / s), -7, 7)
  q1 = np.where(np.abs(w).argmax(0) == 1, np.sign(w1) * 7 * s, q1)   # the pinned scale entry
  np.testing.assert_allclose(oneshot.gptq(w, h, "int4"), np.stack([q0, q1]), rtol=1e-6)


@pytest.mark.parametrize("fmt,act_order", [("int4", False), ("int4", True),
                                           ("mxfp4_e2m1", False)])
def test_gptq_dead_inputs(fmt, act_order):
  dead = (3, 40, 41, 95)
  _, w, h = _problem(12, dead=dead)
  w[3] = 100.0   # A dead input with the largest weights: its scale must not count.
  got = np.asarray(oneshot.gptq(w, h, fmt, blocksize=32, act_order=act_order))
  assert np.all(np.isfinite(got)) and np.all(got[list(dead)] == 0)
  want, _ = _gptq_reference(w, h, fmt, None, act_order, blocksize=32)
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
  np.testing.assert_array_equal(quant.quantize(got, fmt, **_rtn_kwargs(fmt, None)), got)


@hypothesis.settings(max_examples=5, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**16), log_scale=st.floats(-3, 3),
                  fmt=st.sampled_from(["int3", "int4", "mxfp4_e2m1"]), grouped=st.booleans())
def test_gptq_result_is_exactly_representable(seed, log_scale, fmt, grouped):
  """Any data, any weight scale (shapes fixed, so that examples share compilations)."""
  x, w, h = _problem(seed, n_in=64, n_out=12, tokens=96)
  w = w * np.float32(10.0**log_scale)
  group_size = 32 if grouped else None
  got = oneshot.gptq(w, h, fmt, blocksize=32, group_size=group_size)
  np.testing.assert_array_equal(quant.quantize(got, fmt, **_rtn_kwargs(fmt, group_size)), got)
  # And no worse than round-to-nearest on the layer's loss ||X dW||^2.
  rtn = quant.quantize(w, fmt, **_rtn_kwargs(fmt, group_size))
  def loss(k):
    return float(np.sum((x @ (np.asarray(k, np.float64) - w)) ** 2))
  assert loss(got) <= loss(rtn) * 1.05


# --------------------------------------------------------------------------- Wanda, magnitude


@pytest.mark.parametrize("sparsity,nm,seed", [(0.5, None, 0), (0.75, None, 1), (None, (2, 4), 2),
                                              (None, (1, 4), 3)])
def test_wanda_matches_reference(sparsity, nm, seed):
  rng = np.random.default_rng(seed)
  batches = [rng.standard_normal((4, 16, 64)).astype(np.float32)
             * rng.uniform(0.1, 5, 64).astype(np.float32) for _ in range(3)]
  w = rng.standard_normal((64, 48)).astype(np.float32)
  scaler_row = ref.wanda_scaler_row(batches)
  got = oneshot.wanda(w, np.sqrt(scaler_row), sparsity=sparsity, nm=nm)
  pruned = ref.prune_wanda_layer(w.T, scaler_row, sparsity or 0, prune_n=nm[1] - nm[0] if nm else 0,
                                 prune_m=nm[1] if nm else 0)
  np.testing.assert_array_equal(~np.asarray(got.mask), pruned.T)
  np.testing.assert_array_equal(got.kernel, np.where(pruned.T, 0, w))
  # The norm over the tokens gives the same masks (scaler_row = ||X_i||^2 / samples).
  x = np.concatenate([b.reshape(-1, 64) for b in batches])
  again = oneshot.wanda(w, np.linalg.norm(x, axis=0), sparsity=sparsity, nm=nm)
  np.testing.assert_array_equal(again.mask, got.mask)


def test_wanda_counts_round_and_ties_prune_the_higher_index():
  w = np.ones((10, 3), np.float32)
  got = oneshot.wanda(w, np.ones(10, np.float32), sparsity=0.35)   # 3.5 -> 4 (half to even)
  np.testing.assert_array_equal(np.sum(~np.asarray(got.mask), axis=0), [4, 4, 4])
  assert not np.any(got.mask[6:]) and np.all(got.mask[:6])
  # A dead input (norm 0) scores 0 everywhere and is pruned first.
  rng = np.random.default_rng(0)
  w = rng.standard_normal((8, 5)).astype(np.float32)
  norm = np.ones(8, np.float32)
  norm[2] = 0
  assert not np.any(oneshot.wanda(w, norm, sparsity=0.125).mask[2])


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**16), k=st.integers(0, 12), levels=st.integers(1, 6))
def test_column_bottom_k_prunes_the_k_smallest_higher_index_first(seed, k, levels):
  """Against a sort by (score, -row): heavily tied scores, zeros included."""
  from jaxprune.oneshot.wanda import column_bottom_k

  scores = np.random.default_rng(seed).integers(0, levels, (12, 5)).astype(np.float32) / 2
  got = np.asarray(jax.jit(column_bottom_k, static_argnums=1)(scores, k))
  rows = np.arange(12)
  for c in range(5):
    order = np.lexsort((-rows, scores[:, c]))
    want = np.ones(12, bool)
    want[order[:k]] = False
    np.testing.assert_array_equal(got[:, c], want)


def test_magnitude_is_the_layer_magnitude_mask():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((32, 16)).astype(np.float32)
  got = oneshot.magnitude(w, sparsity=0.7)
  assert np.sum(~np.asarray(got.mask)) == round(0.7 * w.size)
  assert np.abs(w[~np.asarray(got.mask)]).max() <= np.abs(w[np.asarray(got.mask)]).min()
  nm = oneshot.magnitude(w, nm=(2, 4))
  assert np.all(np.asarray(nm.mask).reshape(8, 4, 16).sum(1) == 2)


def test_layer_functions_jit():
  _, w, h = _problem(13, n_in=32, n_out=8)
  norm = jnp.sqrt(jnp.diag(h) / 2)
  f = jax.jit(lambda w, h, n: (oneshot.sparsegpt(w, h, sparsity=0.5).kernel,
                               oneshot.gptq(w, h, "int4"), oneshot.wanda(w, n, nm=(2, 4)).kernel))
  a, b, c = f(w, h, norm)
  np.testing.assert_array_equal(a, oneshot.sparsegpt(w, h, sparsity=0.5).kernel)
  np.testing.assert_array_equal(b, oneshot.gptq(w, h, "int4"))
  np.testing.assert_array_equal(c, oneshot.wanda(w, norm, nm=(2, 4)).kernel)


# --------------------------------------------------------------------------- OWL


def test_outlier_ratio_matches_reference():
  rng = np.random.default_rng(14)
  scores = [np.abs(rng.standard_t(2, (64, 32))).astype(np.float32) for _ in range(3)]
  flat = np.concatenate([s.ravel() for s in scores])
  for m in (3.0, 5.0, 7.0):
    got = float(oneshot.outlier_ratio(scores, m))
    assert got == pytest.approx(ref.check_outlier_mean(flat, m) / 100, abs=1e-7)
  assert float(oneshot.outlier_ratio(np.array([1.0, 1.0, 1.0, 9.0]), 2.0)) == 0.25


@pytest.mark.parametrize("target,lam", [(0.7, 0.08), (0.5, 0.2), (0.6, 0.0)])
def test_owl_sparsities_match_reference_and_mean_is_exact(target, lam):
  ratios = [5.1, 3.2, 7.7, 4.4, 6.0, 2.5]
  got = oneshot.owl_sparsities(ratios, target, lam=lam)
  want = ref.owl_layer_sparsities(ratios, target, lam) if lam else np.full(6, target)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
  assert sum(map(fractions.Fraction, got)) == fractions.Fraction(target) * len(got)
  assert max(got) - min(got) == pytest.approx(2 * lam, abs=1e-15)
  if lam:   # The most outliers: pruned least.
    assert np.argmin(got) == np.argmax(ratios)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(ratios=st.lists(st.floats(0, 30), min_size=1, max_size=40),
                  target=st.floats(0.3, 0.9), lam=st.floats(0, 0.1))
def test_owl_mean_is_the_target_exactly(ratios, target, lam):
  got = oneshot.owl_sparsities(ratios, target, lam=lam)
  assert len(got) == len(ratios) and all(0 <= s < 1 for s in got)
  assert sum(map(fractions.Fraction, got)) == fractions.Fraction(target) * len(got)


# --------------------------------------------------------------------------- bad input

_, _W, _H = _problem(15, n_in=32, n_out=8)


@pytest.mark.parametrize("call,match", [
    (lambda: oneshot.sparsegpt(_W, _H, sparsity=1.0), r"`sparsity` must be in \[0, 1\)"),
    (lambda: oneshot.sparsegpt(_W, _H, sparsity=-0.1), r"`sparsity` must be in \[0, 1\)"),
    (lambda: oneshot.sparsegpt(_W, _H, sparsity=0.5, nm=(2, 4)), "either `sparsity`"),
    (lambda: oneshot.sparsegpt(_W, _H), "give `sparsity`"),
    (lambda: oneshot.sparsegpt(_W, _H[:16], sparsity=0.5), "`hessian` must be a square"),
    (lambda: oneshot.sparsegpt(_W, _H[:16, :16], sparsity=0.5), "kernel has 32 inputs"),
    (lambda: oneshot.sparsegpt(_W, _H, sparsity=0.5, damp=0.0), "`damp` must be"),
    (lambda: oneshot.sparsegpt(_W, _H, sparsity=0.5, damp=-1), "`damp` must be"),
    (lambda: oneshot.sparsegpt(_W, _H, nm=(2, 4), blocksize=6), "`blocksize` = 6 must be a "
                                                                 "multiple of m = 4"),
    (lambda: oneshot.sparsegpt(_W, _H, nm=(2, 5)), "m = 5 must divide the kernel's 32 inputs"),
    (lambda: oneshot.sparsegpt(_W, _H, nm=(5, 4)), r"`n` must be in \[1, m\]"),
    (lambda: oneshot.sparsegpt(_W[None], _H, sparsity=0.5), "2-D Flax kernel"),
    (lambda: oneshot.sparsegpt(_W, _H, sparsity=0.5, quantize="fp8_e4m3"), "int and MX"),
    (lambda: oneshot.sparsegpt(_W, _H, sparsity=0.5, group_size=8), "give `quantize`"),
    (lambda: oneshot.sparsegpt(_W, _H, nm=(2, 4), quantize="int4", group_size=2),
     "multiple of m = 4"),
    (lambda: oneshot.sparsegpt(_W.astype(jnp.bfloat16), _H, sparsity=0.5, quantize="int4"),
     "float32 kernel"),
    (lambda: oneshot.gptq(_W, _H, "int9"), "Unknown format"),
    (lambda: oneshot.gptq(_W, _H, "int4", group_size=5), "`group_size` = 5 must divide"),
    (lambda: oneshot.gptq(_W, _H, "int4", damp=float("nan")), "`damp` must be"),
    (lambda: oneshot.gptq(_W, _H.T[:, :8], "int4"), "`hessian` must be a square"),
    (lambda: oneshot.gptq(_W.astype(jnp.float16), _H, "int4"), "must be float32"),
    (lambda: oneshot.gptq(_W, _H, "int4", blocksize=0), "`blocksize` must be >= 1"),
    (lambda: oneshot.wanda(_W, np.ones(31), sparsity=0.5), "`input_norm` must have shape"),
    (lambda: oneshot.wanda(_W, np.ones(32), sparsity=1.5), r"`sparsity` must be in \[0, 1\)"),
    (lambda: oneshot.owl_sparsities([1, 2], 1.0), r"`target` must be in \[0, 1\)"),
    (lambda: oneshot.owl_sparsities([1, 2], 0.5, lam=0.6), "`lam` = 0.6 moves"),
    (lambda: oneshot.owl_sparsities([1, math.nan], 0.5), "finite numbers"),
    (lambda: oneshot.outlier_ratio(np.ones(3), 0.0), "`threshold`"),
])
def test_bad_input_raises_naming_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()
