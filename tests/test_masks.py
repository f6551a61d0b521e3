"""Masks against NumPy oracles (full sorts), hand-computed cases and invariants.

Every selection method of ``jaxprune.select_k`` is checked against the same
oracle, so they agree with each other bit for bit, on whatever backend the
tests run on.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxprune
from jaxprune import masks, select_k

SETTINGS = settings(max_examples=60, deadline=None)
METHODS = select_k.METHODS

# Jitted with the count as an argument: one compilation per shape and method.
# This is exactly magnitude_mask's code path (`bottom_k_masks` of `num_pruned`).
_BOTTOM_K = {m: jax.jit(lambda s, k, m=m: jaxprune.bottom_k_masks(s, k, method=m))
             for m in (*METHODS, None)}


def pruning_order(flat: np.ndarray) -> np.ndarray:
  """Indices in the documented pruning order, by float comparisons only.

  Ascending score with every NaN largest (after +inf) and -0.0 below +0.0;
  among equal scores the higher index first. NumPy compares subnormals
  exactly (no flushing).
  """
  flat = np.asarray(flat, np.float32)
  nan = np.isnan(flat)
  value = np.where(nan, 0.0, flat)
  positive = ~np.signbit(value)
  return np.lexsort((-np.arange(flat.size), positive, value, nan))


def oracle_bottom_k(scores_list, k):
  """Prunes the k first entries of the pruning order of the concatenated leaves."""
  flat = np.concatenate([np.asarray(s, np.float32).ravel() for s in scores_list])
  keep = np.ones(flat.size, bool)
  keep[pruning_order(flat)[:k]] = False
  out, start = [], 0
  for s in scores_list:
    out.append(keep[start:start + np.size(s)].reshape(np.shape(s)))
    start += np.size(s)
  return out


def oracle_magnitude(scores_list, sparsity):
  total = sum(np.size(s) for s in scores_list)
  return oracle_bottom_k(scores_list, int(round(sparsity * total)))


def oracle_nm(scores, n, m, axis):
  s = np.moveaxis(np.asarray(scores, np.float32), axis, -1)
  groups = s.reshape(-1, m)
  keep = np.zeros(groups.shape, bool)
  for r, g in enumerate(groups):
    keep[r, np.lexsort((np.arange(m), -g))[:n]] = True  # descending score, lower index first
  return np.moveaxis(keep.reshape(s.shape), -1, axis)


# Values drawn from a small set so that ties (and all-zero groups) are common.
tied_floats = st.sampled_from([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 3.5, -1.0])
any_floats = st.floats(-1e6, 1e6, width=32, allow_subnormal=True)


@st.composite
def nm_cases(draw):
  m = draw(st.sampled_from([1, 2, 4, 8, 16]))
  n = draw(st.integers(1, m))
  axis = draw(st.integers(0, 1))
  shape = [draw(st.integers(1, 4)), draw(st.integers(1, 4))]
  shape[axis] *= m
  elements = draw(st.sampled_from([tied_floats, any_floats]))
  x = draw(hnp.arrays(np.float32, shape, elements=elements))
  return x, n, m, axis


@settings(max_examples=40, deadline=None)
@given(nm_cases())
def test_nm_mask_matches_oracle(case):
  x, n, m, axis = case
  mask = np.asarray(jaxprune.nm_mask(jnp.abs(x), n, m, axis=axis))
  np.testing.assert_array_equal(mask, oracle_nm(np.abs(x), n, m, axis))
  # Invariant: exactly n kept in every group.
  per_group = np.moveaxis(mask, axis, -1).reshape(-1, m).sum(-1)
  assert (per_group == n).all()


def test_nm_mask_known_answers():
  x = jnp.array([[0.1, -0.5, 0.3, 0.2], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
  got = jaxprune.nm_mask(jnp.abs(x), 2, 4, axis=1)
  want = [[False, True, True, False], [True, True, False, False], [True, True, False, False]]
  np.testing.assert_array_equal(got, want)
  # Grouping along axis 0 (the input axis of a Flax kernel) is the transpose.
  np.testing.assert_array_equal(jaxprune.nm_mask(jnp.abs(x.T), 2, 4, axis=0), np.array(want).T)
  # A 4-D HWIO kernel groups along its input channels (axis 2) by default.
  assert jaxprune.default_nm_axis(4) == 2 and jaxprune.default_nm_axis(2) == 0


def test_nm_mask_nan_counts_as_largest_and_negative_axis():
  x = jnp.array([[jnp.nan, 0.0, 5.0, 1.0]])
  np.testing.assert_array_equal(jaxprune.nm_mask(x, 1, 4, axis=-1), [[True, False, False, False]])


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=3, m=2), r"`n` must be in \[1, m\]"),
    (dict(n=0, m=4), r"`n` must be >= 1"),
    (dict(n=2, m=3), r"`m` = 3 must divide the size 8 of axis 0"),
    (dict(n=2, m=4, axis=2), r"`axis` must be in \[-2, 2\)"),
    (dict(n=2.0, m=4), r"`n` must be an integer"),
])
def test_nm_mask_errors(kwargs, match):
  kwargs.setdefault("axis", 0)
  with pytest.raises(ValueError, match=match):
    jaxprune.nm_mask(jnp.ones((8, 4)), **kwargs)


# Scores where the edge cases of the total order meet: signed zeros and NaNs,
# infinities, subnormals, and repeated values.
_SPECIAL = np.array([0.0, -0.0, 1e-45, -1e-45, 1.0, 2.0, np.nan, -np.nan, np.inf, -np.inf,
                     *np.array([0x7F800001, -4194303], np.int32).view(np.float32)],
                    np.float32)  # + NaNs with payloads: signalling, negative
special_floats = st.sampled_from(list(_SPECIAL))
nonfinite_floats = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
# Leaf structures (one compilation each per method): one leaf, several of
# different sizes, and leaves above the 4,096-key sample of 'sample'.
_STRUCTURES = [((1,),), ((7,),), ((40, 70),), ((3,), (4, 5), (600,)), ((100, 100),),
               ((3000,), (2, 1250), (5,))]


@st.composite
def bottom_k_cases(draw, structure):
  kind = draw(st.sampled_from(["any", "special", "tied", "equal"]))
  if kind == "equal":
    value = draw(special_floats)
    leaves = [np.full(shape, value, np.float32) for shape in structure]
  else:
    elements = {"any": nonfinite_floats, "special": special_floats, "tied": tied_floats}[kind]
    leaves = [draw(hnp.arrays(np.float32, shape, elements=elements)) for shape in structure]
  total = sum(x.size for x in leaves)
  k = draw(st.one_of(st.sampled_from([0, total]), st.integers(0, total)))
  return leaves, k


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("structure", _STRUCTURES, ids=str)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_bottom_k_every_method_matches_oracle(method, structure, data):
  leaves, k = data.draw(bottom_k_cases(structure))
  got = _BOTTOM_K[method]([jnp.asarray(x) for x in leaves], k)
  for g, w in zip(got, oracle_bottom_k(leaves, k), strict=True):
    np.testing.assert_array_equal(np.asarray(g), w)


@st.composite
def magnitude_cases(draw):
  shape = draw(st.sampled_from([(1,), (7,), (3, 5), (40, 70), (2, 1500)]))
  elements = draw(st.sampled_from([tied_floats, any_floats]))
  x = draw(hnp.arrays(np.float32, shape, elements=elements))
  return x, draw(st.floats(0.0, 0.999))


@SETTINGS
@given(magnitude_cases())
def test_magnitude_mask_matches_oracle(case):
  x, sparsity = case
  mask = np.asarray(_BOTTOM_K[None]([jnp.abs(x)], masks.num_pruned(sparsity, x.size))[0])
  np.testing.assert_array_equal(mask, oracle_magnitude([np.abs(x)], sparsity)[0])
  assert (~mask).sum() == round(sparsity * x.size)


def _threshold_oracle(keys, rank):
  t = np.sort(keys)[rank]
  return t, int((keys < t).sum())


_pivot_select = jax.jit(select_k.pivot_select)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, (300,), elements=st.one_of(tied_floats, special_floats)),
       st.integers(0, 299), st.sampled_from([1, 3, 8]), st.data())
def test_pivot_select_is_exact_for_any_pivots(x, rank, num, data):
  # Pivots from the data (hits), from anywhere (bands inside, below and above all
  # pivots) and repeated: the answer must not depend on them.
  keys = np.asarray(select_k.compare_key(x))
  pool = st.one_of(st.sampled_from(list(keys)), st.integers(-2**31, 2**31 - 1))
  pivots = np.sort(np.array(data.draw(st.lists(pool, min_size=num, max_size=num)), np.int32))
  t, below, _ = _pivot_select([jnp.asarray(x)], jnp.int32(rank), jnp.asarray(pivots))
  assert (int(t), int(below)) == _threshold_oracle(keys, rank)


@pytest.mark.parametrize("bits", [1, 2, 8])
def test_bisect_select_any_digit_width(bits):
  # The default is 4 bits per round; other widths fix other digits, same answer.
  x = np.concatenate([np.random.default_rng(bits).standard_normal(500).astype(np.float32),
                      _SPECIAL, np.full(40, 2.0, np.float32)])
  keys = np.asarray(select_k.compare_key(x))
  select = jax.jit(lambda x, r: select_k._bisect_select([x], r, bits)[:2])
  for rank in (0, 17, 300, 520, keys.size - 1):
    t, below = select(jnp.asarray(x), jnp.int32(rank))
    assert (int(t), int(below)) == _threshold_oracle(keys, rank)


def test_radix_key_orders_as_compare_key():
  # Two expressions of one order (kept apart so that XLA does not merge them).
  x = np.concatenate([_SPECIAL, np.random.default_rng(0).standard_normal(100).astype(np.float32)])
  np.testing.assert_array_equal(select_k._radix_key(x), select_k._radix(select_k.compare_key(x)))


def test_method_table_and_errors():
  assert set(select_k.DEFAULT_METHOD.values()) <= set(METHODS)
  assert select_k.default_method() in METHODS
  with pytest.raises(ValueError, match=r"`method` must be one of"):
    jaxprune.magnitude_mask(jnp.ones(4), 0.5, method="argsort")


def test_magnitude_mask_known_answers():
  # The two smallest are the tied 1s; 75% also prunes the tied 2 with the higher index.
  x = jnp.array([3.0, 1.0, 2.0, 1.0, 2.0])
  np.testing.assert_array_equal(jaxprune.magnitude_mask(x, 0.4), [1, 0, 1, 0, 1])
  np.testing.assert_array_equal(jaxprune.magnitude_mask(x, 0.6), [1, 0, 1, 0, 0])
  np.testing.assert_array_equal(jaxprune.magnitude_mask(jnp.zeros(4), 0.5), [1, 1, 0, 0])
  np.testing.assert_array_equal(jaxprune.magnitude_mask(x, 0.0), np.ones(5, bool))


def test_magnitude_mask_ties_across_tie_blocks():
  # 5,000 equal scores span several 1,024-entry tie blocks; 3,333 highest indices go.
  x = jnp.ones((5000,))
  mask = np.asarray(jaxprune.magnitude_mask(x, 0.6666))
  assert mask[:1667].all() and not mask[1667:].any()


def test_magnitude_mask_extreme_values():
  x = jnp.array([jnp.inf, 1e-40, 0.0, -0.0, 3e38, jnp.nan, 1e-45, 7.0])
  mask = np.asarray(jaxprune.magnitude_mask(jnp.abs(x), 0.5))
  # Smallest four: the zeros (ties: index 3 before 2) and the two subnormals.
  np.testing.assert_array_equal(mask, [1, 0, 0, 0, 1, 1, 0, 1])


def test_magnitude_mask_traced_sparsity_under_jit():
  x = jax.random.normal(jax.random.key(0), (100,))
  f = jax.jit(lambda x, s: jaxprune.magnitude_mask(jnp.abs(x), s))
  for s in (0.0, 0.25, 0.9):
    assert int((~f(x, s)).sum()) == round(s * 100)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_magnitude_mask_sparsity_range(sparsity):
  with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\)"):
    jaxprune.magnitude_mask(jnp.ones(4), sparsity)


_global = jax.jit(jaxprune.global_magnitude_masks)


@settings(max_examples=20, deadline=None)
@given(st.lists(hnp.arrays(np.float32, st.sampled_from([(4, 5), (600,)]),
                           elements=tied_floats), min_size=1, max_size=3),
       st.floats(0.0, 0.999))
def test_global_magnitude_matches_oracle(leaves, sparsity):
  got = _global([jnp.asarray(x) for x in leaves], sparsity)
  for g, w in zip(got, oracle_magnitude(leaves, sparsity), strict=True):
    np.testing.assert_array_equal(np.asarray(g), w)


def test_global_magnitude_tree_and_normalization():
  scores = {"big": jnp.array([10.0, 11.0, 12.0, 13.0]), "small": jnp.array([0.1, 0.2, 0.3, 4.0])}
  plain = jaxprune.global_magnitude_masks(scores, 0.5)
  np.testing.assert_array_equal(plain["small"], [0, 0, 0, 0])
  np.testing.assert_array_equal(plain["big"], [1, 1, 1, 1])
  # Divided by their L2 norms (~23.0 and ~4.02), the small layer's 4.0 is the
  # largest score overall and big's 10 (0.43) the fourth smallest.
  normed = jaxprune.global_magnitude_masks(scores, 0.5, normalize=True)
  np.testing.assert_array_equal(normed["big"], [0, 1, 1, 1])
  np.testing.assert_array_equal(normed["small"], [0, 0, 0, 1])


def test_nonfinite_scores_rank_largest_and_minus_inf_smallest():
  # NaN of either sign and +inf are kept first: a NaN weight never pushes a healthy
  # weight out. -inf is pruned first. NaNs tie with each other (lower index kept).
  x = jnp.array([0.5, -jnp.nan, 3.0, jnp.inf, -jnp.inf, 1.0, jnp.nan, 2.0])
  for method in METHODS:
    got = np.asarray(jaxprune.magnitude_mask(x, 0.5, method=method))
    np.testing.assert_array_equal(got, [0, 1, 1, 1, 0, 0, 1, 0], err_msg=method)
    got = np.asarray(jaxprune.magnitude_mask(x, 0.75, method=method))
    np.testing.assert_array_equal(got, [0, 1, 0, 0, 0, 0, 1, 0], err_msg=method)
  # 7 of 8 pruned: the NaN with the higher index goes first.
  np.testing.assert_array_equal(jaxprune.bottom_k_masks([x], 7)[0], [0, 1, 0, 0, 0, 0, 0, 0])


def test_nan_weight_prunes_the_same_healthy_weights():
  w = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
  k = 700
  healthy = np.asarray(jaxprune.bottom_k_masks([jnp.abs(w)], k)[0])
  largest = np.unravel_index(np.argmax(np.abs(w)), w.shape)
  for where in [largest, (3, 4)]:
    with_nan, with_inf = w.copy(), w.copy()
    with_nan[where], with_inf[where] = -np.nan, np.inf
    sick = np.asarray(jaxprune.bottom_k_masks([jnp.abs(with_nan)], k)[0])
    assert sick[where] and (~sick).sum() == k
    # The NaN ranks as +inf would: largest; the finite weights keep their order.
    np.testing.assert_array_equal(sick, jaxprune.bottom_k_masks([jnp.abs(with_inf)], k)[0])
  # A NaN in place of a kept weight changes nothing.
  with_nan = w.copy()
  with_nan[largest] = np.nan
  np.testing.assert_array_equal(jaxprune.bottom_k_masks([jnp.abs(with_nan)], k)[0], healthy)


def test_nm_mask_nonfinite_groups_keep_exactly_n():
  x = jnp.array([[jnp.inf, jnp.inf, jnp.inf, 1.0], [-jnp.nan, 2.0, jnp.inf, jnp.nan],
                 [-jnp.inf, -jnp.inf, 0.0, -1.0]])
  got = np.asarray(jaxprune.nm_mask(x, 2, 4, axis=1))
  np.testing.assert_array_equal(got, [[1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 1]])
  assert (got.sum(1) == 2).all()


def test_l2_normalized_ignores_nonfinite_entries():
  s = np.array([3.0, 4.0, np.nan, np.inf, -np.nan], np.float32)
  got = np.asarray(masks.l2_normalized(s, eps=0.0))
  np.testing.assert_allclose(got[:2], [0.6, 0.8], rtol=1e-7)   # norm 5 of the finite entries
  assert np.isnan(got[2]) and np.isposinf(got[3]) and np.isnan(got[4])
  # Large finite scores: the squares would overflow float32; the norm does not.
  np.testing.assert_allclose(masks.l2_normalized(jnp.array([3e30, 4e30])), [0.6, 0.8], rtol=1e-6)
  # Otherwise the plain formula, bit for bit.
  x = jax.random.normal(jax.random.key(0), (1000,))
  np.testing.assert_array_equal(masks.l2_normalized(x), x / (jnp.linalg.norm(x) + 1e-8))
  np.testing.assert_array_equal(masks.l2_normalized(jnp.zeros(3)), np.zeros(3))


def test_global_normalize_with_a_nan_keeps_the_healthy_layer():
  # One NaN used to make its layer's norm, and so every score of that layer, NaN:
  # the whole layer was kept and the healthy layers pruned in its place.
  scores = {"big": jnp.array([10.0, 11.0, 12.0, 13.0]), "small": jnp.array([0.1, 0.2, 0.3, 4.0]),
            "z_nan": jnp.array([jnp.nan] + [5.0] * 7)}
  got = jaxprune.global_magnitude_masks(scores, 0.5, normalize=True)
  # z_nan's finite entries score 5 / sqrt(175) = 0.378, below big's smallest (10 / 23.1
  # = 0.433); its NaN ranks largest. The 8 pruned: small's 3 smallest, then 5 of the
  # tied 0.378s, the highest indices first.
  np.testing.assert_array_equal(got["small"], [0, 0, 0, 1])
  np.testing.assert_array_equal(got["big"], [1, 1, 1, 1])
  np.testing.assert_array_equal(got["z_nan"], [1, 1, 1, 0, 0, 0, 0, 0])


def test_random_masks():
  a = jaxprune.random_mask(jax.random.key(0), (64, 32), 0.75)
  b = jaxprune.random_mask(jax.random.key(1), (64, 32), 0.75)
  assert int((~a).sum()) == int((~b).sum()) == round(0.75 * 64 * 32)
  assert (a != b).any()
  c = jaxprune.random_nm_mask(jax.random.key(2), (16, 8), 1, 4, axis=0)
  assert (np.asarray(c).reshape(4, 4, 8).sum(1) == 1).all()


def test_bottom_k_masks_counts():
  scores = [jnp.arange(10.0), jnp.arange(5.0)]
  for k in (0, 1, 7, 15):
    got = jaxprune.bottom_k_masks(scores, k)
    assert sum(int((~g).sum()) for g in got) == k


def test_total_order_keeps_subnormals_apart_from_zero():
  # CPUs flush subnormals in float comparisons; masks compare bit patterns.
  x = jnp.array([[0.0, 1e-45, -0.0, 0.0]])
  np.testing.assert_array_equal(jaxprune.nm_mask(x, 1, 4, axis=1), [[False, True, False, False]])
  np.testing.assert_array_equal(jaxprune.magnitude_mask(jnp.array([1e-45, 0.0, 2e-45]), 1 / 3),
                                [True, False, True])
