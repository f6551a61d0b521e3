"""Masks against NumPy oracles (full sorts), hand-computed cases and invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxprune
from jaxprune import masks

SETTINGS = settings(max_examples=60, deadline=None)

# Jitted with the count as an argument: one compilation per shape. This is
# exactly magnitude_mask's code path (`bottom_k_masks` of `num_pruned`).
_bottom_k = jax.jit(lambda s, k: jaxprune.bottom_k_masks([s], k)[0])


def oracle_magnitude(scores_list, sparsity):
  """Prunes round(s * size) smallest; ties prune later leaves / higher indices first."""
  flat = np.concatenate([np.asarray(s, np.float32).ravel() for s in scores_list])
  k = int(round(sparsity * flat.size))
  order = np.lexsort((-np.arange(flat.size), flat))  # ascending score, then descending index
  keep = np.ones(flat.size, bool)
  keep[order[:k]] = False
  out, start = [], 0
  for s in scores_list:
    out.append(keep[start:start + np.size(s)].reshape(np.shape(s)))
    start += np.size(s)
  return out


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


@SETTINGS
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
  mask = np.asarray(_bottom_k(jnp.abs(x), masks.num_pruned(sparsity, x.size)))
  np.testing.assert_array_equal(mask, oracle_magnitude([np.abs(x)], sparsity)[0])
  assert (~mask).sum() == round(sparsity * x.size)


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


@settings(max_examples=30, deadline=None)
@given(st.lists(hnp.arrays(np.float32, st.sampled_from([(3,), (4, 5), (600,)]),
                           elements=tied_floats), min_size=1, max_size=4),
       st.floats(0.0, 0.999))
def test_global_magnitude_matches_oracle(leaves, sparsity):
  got = jaxprune.global_magnitude_masks([jnp.asarray(x) for x in leaves], sparsity)
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
