"""Dynamic sparse training (SET, RigL), random and saliency pruning."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune

try:
  from .nnx_models import Net, mse_step
except ImportError:
  from nnx_models import Net, mse_step


#: Every kernel, the output head included (the default selection leaves the head dense): the
#: tests that use it check both layers.
BOTH = jaxprune.select(head=None)


def _f(drop_fraction, t, end_step):
  return drop_fraction / 2 * (1 + math.cos(math.pi * min(t, end_step) / end_step))


def _num_drop(drop_fraction, t, end_step, active, size) -> set[int]:
  """floor(f(t) k), capped; both neighbours where f(t) k is an integer up to float32 rounding
  (cos(pi / 2) is -4.4e-8 in float32)."""
  x = _f(drop_fraction, t, end_step) * active
  return {min(math.floor(x + e), size - active) for e in (-1e-4, 1e-4)}


# ----------------------------------------------------------------------------
# The drop fraction and one connectivity update, by hand.


def test_drop_fraction_schedule_closed_form():
  f = jaxprune.drop_fraction_schedule(0.3, 1000)
  np.testing.assert_allclose(float(f(0)), 0.3, rtol=1e-6)
  np.testing.assert_allclose(float(f(500)), 0.15, rtol=1e-6)
  np.testing.assert_allclose(float(f(250)), 0.15 * (1 + math.sqrt(0.5)), rtol=1e-6)
  assert float(f(1000)) == 0.0 and float(f(5000)) == 0.0


def test_connectivity_update_hand_case():
  mask = jnp.array([[1, 1, 0, 0], [1, 0, 1, 0]], bool)
  weights = jnp.array([[0.5, -0.1, 0.0, 0.0], [-0.3, 0.0, 0.2, 0.0]])
  grow = jnp.array([[9.0, 9.0, 0.4, 0.7], [9.0, 0.1, 9.0, 0.7]])
  # Drop 2 active: |w| = 0.1 at (0, 1) and 0.2 at (1, 2). Grow 2 inactive: the 0.7s, with
  # (0, 3) and (1, 3) tied at 0.7 and both taken; the 9.0s are active and not candidates.
  new = jaxprune.connectivity_update(mask, weights, grow, 2, 4)
  np.testing.assert_array_equal(new, [[1, 0, 0, 1], [1, 0, 0, 1]])
  # A tie across the cut keeps the lower flat index: one to grow among two 0.7s.
  new = jaxprune.connectivity_update(mask, weights, grow, 1, 4)
  np.testing.assert_array_equal(new, [[1, 0, 0, 1], [1, 0, 1, 0]])
  # Nothing to move.
  np.testing.assert_array_equal(jaxprune.connectivity_update(mask, weights, grow, 0, 4), mask)


_connectivity_update = jax.jit(jaxprune.connectivity_update)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), size=st.sampled_from([2, 7, 64]))
def test_connectivity_update_properties(data, size):
  active = data.draw(st.integers(1, size - 1), label="active")
  num_drop = data.draw(st.integers(0, min(active, size - active)), label="num_drop")
  order = data.draw(st.permutations(range(size)), label="order")
  mask = np.zeros(size, bool)
  mask[list(order[:active])] = True
  distinct = st.lists(st.floats(-10, 10, width=32), min_size=size, max_size=size, unique=True)
  weights = np.asarray(data.draw(distinct, label="weights"), np.float32)
  assume_distinct = np.unique(np.abs(weights)).size == size
  grow = np.abs(np.asarray(data.draw(distinct, label="grow"), np.float32))
  new = np.asarray(_connectivity_update(
      jnp.asarray(mask), jnp.asarray(weights), jnp.asarray(grow), num_drop, active))
  dropped, grown = mask & ~new, new & ~mask
  assert new.sum() == active
  assert dropped.sum() == grown.sum() == num_drop
  assert not (dropped & grown).any()
  if num_drop and assume_distinct:
    # Every dropped |w| is below every kept one; every grown score above every not grown.
    assert np.abs(weights[dropped]).max() < np.abs(weights[mask & new]).min(initial=np.inf)
  if num_drop and np.unique(grow[~mask]).size == (~mask).sum():
    assert grow[grown].min() > grow[~mask & ~new].max(initial=-np.inf)


# ----------------------------------------------------------------------------
# RigL and SET against a step-by-step reference (plain pytree, SGD).


def _params(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"dense": {"kernel": jax.random.normal(k1, (16, 8)), "bias": jax.random.normal(k2, (8,))},
          "out": {"kernel": jax.random.normal(k3, (8, 4))}}


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_every_update_matches_the_rule(method):
  lr, sparsity, drop_fraction, every, end = 0.05, 0.75, 0.5, 3, 16
  make = jaxprune.rigl if method == "rigl" else jaxprune.set_pruning
  tx = make(optax.sgd(lr), sparsity, drop_fraction=drop_fraction, update_every=every,
            end_step=end, seed=3, select=BOTH)
  params = _params(jax.random.key(0))
  state = tx.init(params)
  update = jax.jit(tx.update)
  actives = {"dense": 32, "out": 8}
  for name, k in actives.items():
    assert int(state.masks[name]["kernel"].sum()) == k
  changed_steps = []
  for t in range(20):
    grads = jax.tree.map(lambda p, t=t: jax.random.normal(jax.random.key(100 + t), p.shape),
                         params)
    old = state.masks
    updates, state = update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    for name, k in actives.items():
      m_old = np.asarray(old[name]["kernel"])
      m_new = np.asarray(state.masks[name]["kernel"])
      w, g = np.asarray(params[name]["kernel"]), np.asarray(grads[name]["kernel"])
      p_new = np.asarray(new_params[name]["kernel"])
      size = m_old.size
      assert m_new.sum() == k                               # the active count never changes
      assert (p_new[~m_new] == 0).all()                     # inactive weights are exactly 0
      dropped, grown = m_old & ~m_new, m_new & ~m_old
      assert not (dropped & grown).any()
      expect = _num_drop(drop_fraction, t, end, k, size) if (
          t > 0 and t % every == 0 and t < end) else {0}
      assert dropped.sum() == grown.sum() and dropped.sum() in expect, (t, name)
      expect = dropped.sum()
      if expect:
        changed_steps.append(t)
        # Drop on the current weights (inactive ones are 0).
        assert np.abs(w[dropped]).max() <= np.abs(w[m_old & m_new]).min()
        assert (w[grown] == 0).all()                        # grown weights start from zero
        np.testing.assert_array_equal(p_new[grown], np.float32(-lr) * g[grown])  # and step
        if method == "rigl":                                # grown: largest |g| among inactive
          assert np.abs(g[grown]).min() >= np.abs(g[~m_old & ~m_new]).max()
      else:
        np.testing.assert_array_equal(m_new, m_old)
    np.testing.assert_array_equal(new_params["dense"]["bias"],  # bias: plain SGD, not pruned
                                  params["dense"]["bias"] - np.float32(lr) * grads["dense"]["bias"])
    params = new_params
  # At step 15, f = 0.0048 moves floor(0.15) = 0 of 32: no change.
  assert sorted(set(changed_steps)) == [3, 6, 9, 12]


def _zero_where(state, grown, treedef):
  """Zeroes, at ``grown``, every subtree of ``state`` with the params' tree structure."""
  def zero(s):
    if jax.tree.structure(s) != treedef:
      return s
    return jax.tree.map(lambda v, g: jnp.where(g, 0, v), s, grown)
  return jax.tree.map(zero, state, is_leaf=lambda s: jax.tree.structure(s) == treedef)


def test_grown_moments_are_reset_and_others_untouched():
  inner = optax.chain(optax.clip_by_global_norm(10.0), optax.adamw(1e-2, b1=0.9, b2=0.99))
  tx = jaxprune.rigl(inner, 0.5, drop_fraction=1.0, update_every=1, end_step=100)
  params = _params(jax.random.key(1))
  state = tx.init(params)
  update = jax.jit(tx.update)
  stale = 0   # grown weights whose moments, from an earlier life, had to be reset
  for t in range(6):
    grads = jax.tree.map(lambda p, t=t: jax.random.normal(jax.random.key(7 + t), p.shape), params)
    before = state
    updates, state = update(grads, state, params)
    grown = jax.tree.map(lambda new, was: new & ~was, state.masks, before.masks)
    # By hand: zero the moments of grown weights, then step on gradients under the new mask.
    fresh = _zero_where(before.inner_state, grown, jax.tree.structure(params))
    masked = jaxprune.pruning.mask_gradients(grads, state.masks)
    _, reference = inner.update(masked, fresh, params)
    adam, adam_ref, adam_before = state.inner_state[1][0], reference[1][0], before.inner_state[1][0]
    for moment, ref, old in ((adam.mu, adam_ref.mu, adam_before.mu),
                             (adam.nu, adam_ref.nu, adam_before.nu)):
      # (The clip's global norm sums in another order under jit than eagerly.)
      for a, b in zip(jax.tree.leaves(moment), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12)
      for name in ("dense", "out"):
        g = np.asarray(grown[name]["kernel"])
        stale += int((np.asarray(old[name]["kernel"])[g] != 0).sum())
    params = optax.apply_updates(params, updates)
  assert stale > 0


def test_sgd_momentum_trace_is_reset():
  tx = jaxprune.set_pruning(optax.sgd(0.1, momentum=0.9), 0.5, drop_fraction=1.0,
                            update_every=1, end_step=10)
  params = {"w": jnp.arange(1.0, 17.0).reshape(4, 4)}
  state = tx.init(params)
  stale = 0
  for t in range(6):
    before = state
    updates, state = tx.update({"w": jnp.ones((4, 4))}, state, params)
    params = optax.apply_updates(params, updates)
    grown = np.asarray(state.masks["w"] & ~before.masks["w"])
    if t:
      assert grown.sum() in _num_drop(1.0, t, 10, 8, 16)
    # A fresh trace: the gradient alone, not g + 0.9 * (an earlier life's trace).
    trace = np.asarray(state.inner_state[0].trace["w"])
    np.testing.assert_array_equal(trace[grown], 1.0)
    stale += int((np.asarray(before.inner_state[0].trace["w"])[grown] != 0).sum())
  assert stale > 0


# ----------------------------------------------------------------------------
# A real NNX model: biases and LayerNorm in the tree, invariants after every update.


@pytest.mark.parametrize("method", ["rigl", "set"])
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_nnx_model_with_biases_and_layernorm(method, distribution):
  make = jaxprune.rigl if method == "rigl" else jaxprune.set_pruning
  model = Net(nnx.Rngs(0), din=8, hidden=32, dout=8)
  tx = make(optax.adamw(1e-2), 0.8, drop_fraction=0.3, update_every=4, end_step=40,
            distribution=distribution, select=BOTH)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (64, 8))
  y = jax.random.normal(jax.random.key(2), (64, 8))
  step = mse_step(x, y)
  shapes = {"a": (8, 32), "b": (32, 8)}
  targets = (jaxprune.erk_sparsities(shapes, 0.8) if distribution == "erk"
             else dict.fromkeys(shapes, 0.8))
  active = {n: math.prod(s) - round(targets[n] * math.prod(s)) for n, s in shapes.items()}
  norm_scale = np.asarray(model.norm.scale[...])
  losses, moved = [], 0
  masks = {n: np.asarray(optimizer.opt_state.masks[n]["kernel"][...]) for n in shapes}
  previous = {n: np.asarray(getattr(model, n).kernel[...]) for n in shapes}
  for t in range(45):
    losses.append(float(step(model, optimizer)))
    state = optimizer.opt_state
    for n in shapes:
      mask = np.asarray(state.masks[n]["kernel"][...])
      kernel = np.asarray(getattr(model, n).kernel[...])
      assert mask.sum() == active[n]
      assert (kernel[~mask] == 0).all()
      assert (kernel != 0).sum() <= active[n]
      dropped, grown = masks[n] & ~mask, mask & ~masks[n]
      assert dropped.sum() == grown.sum() and not (dropped & grown).any()
      if grown.any():
        moved += int(grown.sum())
        assert t % 4 == 0 and 0 < t < 40
        assert (previous[n][grown] == 0).all()               # grown from zero
        # Fresh moments after one gradient g: mu = (1 - b1) g, nu = (1 - b2) g^2.
        mu = np.asarray(state.inner_state[0].mu[n]["kernel"][...])[grown]
        nu = np.asarray(state.inner_state[0].nu[n]["kernel"][...])[grown]
        np.testing.assert_allclose(nu, (1 - 0.999) / (1 - 0.9) ** 2 * mu**2, rtol=1e-4)
      previous[n] = kernel
      masks[n] = mask
    # Non-pruned leaves: biases and the norm are trained, dense, with scalar masks.
    assert np.ndim(state.masks["a"]["bias"][...]) == 0
    assert (np.asarray(model.a.bias[...]) != 0).all()
    assert not np.array_equal(np.asarray(model.norm.scale[...]), norm_scale)
  assert moved > 0
  assert losses[-1] < 0.8 * losses[0]


def test_static_random_sparse_training_when_drop_fraction_is_zero():
  tx = jaxprune.set_pruning(optax.adam(1e-2), 0.9, drop_fraction=0.0, update_every=1,
                            end_step=100)
  params = _params(jax.random.key(2))
  state = tx.init(params)
  first = jax.tree.map(np.asarray, state.masks)
  update = jax.jit(tx.update)
  for _ in range(5):
    updates, state = update(jax.tree.map(jnp.ones_like, params), state, params)
    params = optax.apply_updates(params, updates)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(state.masks), strict=True):
    np.testing.assert_array_equal(a, b)


def test_seed_determines_masks_and_set_growth():
  params = _params(jax.random.key(3))
  a = jaxprune.set_pruning(optax.sgd(0.1), 0.5, end_step=10, seed=0).init(params).masks
  b = jaxprune.set_pruning(optax.sgd(0.1), 0.5, end_step=10, seed=0).init(params).masks
  c = jaxprune.set_pruning(optax.sgd(0.1), 0.5, end_step=10, seed=1).init(params).masks
  np.testing.assert_array_equal(a["dense"]["kernel"], b["dense"]["kernel"])
  assert not np.array_equal(a["dense"]["kernel"], c["dense"]["kernel"])


def test_sparsity_zero_keeps_everything_and_nothing_moves():
  tx = jaxprune.rigl(optax.sgd(0.1), 0.0, update_every=1, end_step=10)
  params = _params(jax.random.key(4))
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert all(bool(m.all()) for m in jax.tree.leaves(state.masks))


@pytest.mark.parametrize("make, match", [
    (lambda: jaxprune.rigl(optax.sgd(1.0), 1.0, end_step=10), r"`sparsity` must be in \[0, 1\)"),
    (lambda: jaxprune.rigl(optax.sgd(1.0), 0.5, drop_fraction=1.5, end_step=10),
     r"`drop_fraction` must be in \[0, 1\]"),
    (lambda: jaxprune.set_pruning(optax.sgd(1.0), 0.5, update_every=0, end_step=10),
     r"`update_every` must be >= 1"),
    (lambda: jaxprune.set_pruning(optax.sgd(1.0), 0.5, end_step=0), r"`end_step` must be >= 1"),
    (lambda: jaxprune.set_pruning(optax.sgd(1.0), 0.5, end_step=10, distribution="er"),
     r"`distribution` must be one of"),
    (lambda: jaxprune.rigl(optax.sgd(1.0), 0.5, end_step=10.0), r"`end_step` must be an integer"),
    (lambda: jaxprune.rigl(optax.sgd(1.0), 0.5, end_step=10, distribution="uniform",
                           select=jaxprune.select(distribution="erk")), r"contradicts"),
    (lambda: jaxprune.rigl(optax.adamw, 0.5, end_step=10),
     r"`inner` must be an optax.GradientTransformation, got the function adamw: call it"),
    (lambda: jaxprune.set_pruning(optax.sgd, 0.5, end_step=10), r"function sgd: call it"),
])
def test_bad_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_bad_trees():
  params = _params(jax.random.key(5))
  with pytest.raises(ValueError, match="matches no leaf"):
    jaxprune.rigl(optax.sgd(1.0), 0.5, end_step=10, select="attention").init(params)
  tx = jaxprune.rigl(optax.sgd(1.0), 0.5, end_step=10)
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update(params, state)
  with pytest.raises(ValueError, match="tree structure"):
    tx.update({"dense": params["dense"]}, state, params)


# ----------------------------------------------------------------------------
# The invariant counter: pruned entries of the incoming params that are not exactly 0.


DST = {
    "set": lambda inner: jaxprune.set_pruning(inner, 0.75, update_every=2, end_step=8, seed=1,
                                              select=BOTH),
    "rigl": lambda inner: jaxprune.rigl(inner, 0.75, update_every=2, end_step=8, seed=1,
                                        select=BOTH),
    "rigl_reference": lambda inner: jaxprune.rigl(inner, 0.75, update_every=2, end_step=8,
                                                  seed=1, select=BOTH, convention="reference"),
}


@pytest.mark.parametrize("after", [None, 0.5])
@pytest.mark.parametrize("method", sorted(DST))
def test_violations_count_pruned_entries_that_are_not_zero(method, after):
  """Alone, SET/RigL land every inactive entry on 0 (no violation at any step, masks moving
  at steps 2, 4, 6); with ``optax.scale(0.5)`` after them, the inactive entries only halve,
  and the counter is the hand count over the masks of the previous update, from the second
  update on (the first forward pass sees the dense initial weights)."""
  tx = DST[method](optax.sgd(0.05))
  if after is not None:
    tx = optax.chain(tx, optax.scale(after))
  update = jax.jit(tx.update)
  params = _params(jax.random.key(7))
  state = tx.init(params)
  dst_state = state if after is None else state[0]
  assert int(dst_state.violations) == 0
  expected = 0
  for t in range(10):
    grads = jax.tree.map(lambda p, t=t: jax.random.normal(jax.random.key(200 + t), p.shape),
                         params)
    if t > 0:
      for name in ("dense", "out"):
        mask = np.asarray(dst_state.masks[name]["kernel"])
        expected += int((np.asarray(params[name]["kernel"])[~mask] != 0).sum())
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    dst_state = state if after is None else state[0]
    assert int(dst_state.violations) == expected, t
  found = jaxprune.check(state, params)
  if after is None:
    assert expected == 0 and found.ok, str(found)
  else:
    assert expected > 0 and found.violations == expected and not found.ok
    assert "put the pruning transform last" in str(found)


def test_violations_of_a_restored_state_without_the_counter_start_from_zero():
  tx = jaxprune.rigl(optax.sgd(0.1), 0.5, update_every=2, end_step=8, select=BOTH)
  params = _params(jax.random.key(8))
  state = tx.init(params)._replace(violations=None)   # a state saved before the counter
  updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert int(state.violations) == 0     # the first update is not checked
  params = jax.tree.map(lambda p, u: p + 2 * u, params, updates)  # pruned entries land on -p
  expected = sum(int((np.asarray(params[n]["kernel"])[~np.asarray(state.masks[n]["kernel"])]
                      != 0).sum()) for n in ("dense", "out"))
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert expected > 0 and int(state.violations) == expected


# ----------------------------------------------------------------------------
# Saliency |w * g| and random scores for the Core pruners.


def test_saliency_pruning_hand_case():
  w = jnp.array([[4.0, 1.0, -2.0, 0.5]])
  g = jnp.array([[0.1, 3.0, 1.0, -8.0]])   # |w g| = 0.4, 3, 2, 4 ; |w| ranks differently
  params = {"layer": {"kernel": w}}
  tx = jaxprune.saliency_pruning(optax.sgd(0.0), 0.5, select="kernel")
  updates, state = tx.update({"layer": {"kernel": g}}, tx.init(params), params)
  np.testing.assert_array_equal(state.masks["layer"]["kernel"], [[0, 1, 0, 1]])
  np.testing.assert_array_equal(optax.apply_updates(params, updates)["layer"]["kernel"],
                                [[0.0, 1.0, 0.0, 0.5]])
  magnitude = jaxprune.magnitude_pruning(optax.sgd(0.0), 0.5, select="kernel")
  _, mstate = magnitude.update({"layer": {"kernel": g}}, magnitude.init(params), params)
  np.testing.assert_array_equal(mstate.masks["layer"]["kernel"], [[1, 0, 1, 0]])


def test_saliency_global_nm_and_gradual():
  params = _params(jax.random.key(6))
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(9), p.shape), params)
  tx = jaxprune.saliency_pruning(optax.sgd(0.0), 0.5, scope="global", select=BOTH)
  _, state = tx.update(grads, tx.init(params), params)
  scores = np.concatenate([np.abs(np.asarray(params[n]["kernel"] * grads[n]["kernel"])).ravel()
                           for n in ("dense", "out")])
  kept = np.concatenate([np.asarray(state.masks[n]["kernel"]).ravel() for n in ("dense", "out")])
  assert kept.sum() == 80 and scores[kept].min() > scores[~kept].max()
  nm = jaxprune.saliency_pruning(optax.sgd(0.0), 0.5, structure=jaxprune.nm(2, 4))
  _, state = nm.update(grads, nm.init(params), params)
  assert jaxprune.nm_valid(np.asarray(state.masks["dense"]["kernel"]), 2, 4, 0)


def test_gradual_pruning_keeps_pruned_weights_pruned_on_ties():
  # A live weight that is exactly 0 ties with the pruned ones: raising the target
  # must not revive a pruned weight in its place.
  schedule = jaxprune.polynomial_schedule(0.25, 0.5, 0, 1, frequency=1)
  params = {"w": jnp.array([[3.0, 0.0, 2.0, 1.0]])}
  tx = jaxprune.magnitude_pruning(optax.sgd(0.0), schedule, select="w")
  state = tx.init(params)
  masks = []
  for _ in range(2):
    updates, state = tx.update({"w": jnp.zeros((1, 4))}, state, params)
    params = optax.apply_updates(params, updates)
    masks.append(np.asarray(state.masks["w"]))
  np.testing.assert_array_equal(masks[0], [[1, 0, 1, 1]])
  np.testing.assert_array_equal(masks[1], [[1, 0, 1, 0]])


@settings(max_examples=8, deadline=None)
@given(sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 2**31 - 1),
       shape=hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=24))
def test_random_pruning_static_exact_count_and_held(sparsity, seed, shape):
  params = {"k": jnp.ones(shape)}
  tx = jaxprune.random_pruning(optax.sgd(0.1), sparsity, seed=seed, select="k")
  state = tx.init(params)
  update = jax.jit(tx.update)
  first = None
  for _ in range(2):
    updates, state = update({"k": jnp.ones(shape)}, state, params)
    params = optax.apply_updates(params, updates)
    mask = np.asarray(state.masks["k"])
    assert (~mask).sum() == round(sparsity * math.prod(shape))
    assert (np.asarray(params["k"])[~mask] == 0).all()
    first = mask if first is None else first
    np.testing.assert_array_equal(mask, first)


@pytest.mark.slow
def test_random_pruning_seeds_nm_and_gradual_nesting():
  params = {"k": jnp.ones((16, 16))}
  masks = [jaxprune.random_pruning(optax.sgd(0.0), 0.5, seed=s).update(
      {"k": jnp.ones((16, 16))}, jaxprune.random_pruning(optax.sgd(0.0), 0.5, seed=s).init(
          params), params)[1].masks["k"] for s in (0, 0, 1)]
  np.testing.assert_array_equal(masks[0], masks[1])
  assert not np.array_equal(masks[0], masks[2])
  nm = jaxprune.random_pruning(optax.sgd(0.0), 0.75, structure=jaxprune.nm(1, 4))
  _, state = nm.update({"k": jnp.ones((16, 16))}, nm.init(params), params)
  assert jaxprune.nm_valid(np.asarray(state.masks["k"]), 1, 4, 0)
  # Gradual random pruning: each update prunes further among the survivors.
  schedule = jaxprune.polynomial_schedule(0.0, 0.8, 0, 4, frequency=1)
  tx = jaxprune.random_pruning(optax.sgd(0.0), schedule, seed=2)
  state = tx.init(params)
  previous = np.ones((16, 16), bool)
  for t in range(5):
    _, state = tx.update({"k": jnp.ones((16, 16))}, state, params)
    mask = np.asarray(state.masks["k"])
    # As magnitude pruning: round(s(t) / s_final * k_final), k_final = round(0.8 * 256) = 205.
    assert (~mask).sum() == round(float(schedule(t)) / 0.8 * 205)
    assert not (mask & ~previous).any()
    previous = mask


# ----------------------------------------------------------------------------
# convention='reference': google-research/rigl's SparseRigLOptimizer, against a port of its
# update (rigl/sparse_optimizers_base.py: generic_mask_update, _get_update_op,
# is_mask_update_iter and apply_gradients' cond) on the same weights, gradients and noise.


def reference_mask_update(mask, weights, grads, noise, drop_fraction):
  """Port of ``SparseRigLOptimizerBase.generic_mask_update`` + ``_get_update_op``.

  Returns the new mask and the new connections (grown where the old mask was 0)."""
  shape = mask.shape
  n_ones = int(mask.sum())
  n_prune = int(np.float32(n_ones) * np.float32(drop_fraction))
  n_keep = n_ones - n_prune
  score_drop = (np.abs(mask * weights) + noise).ravel()
  # tf.math.top_k: descending, the lower index first on ties.
  mask1 = np.zeros(mask.size, bool)
  mask1[np.argsort(-score_drop, kind="stable")[:n_keep]] = True
  score_grow = np.abs(grads).ravel()
  lifted = np.where(mask1, score_grow.min() - 1, score_grow)
  mask2 = np.zeros(mask.size, bool)
  mask2[np.argsort(-lifted, kind="stable")[:n_prune]] = True
  assert not (mask1 & mask2).any()
  new_connections = mask2 & ~mask.ravel()  # reinit_when_same=False
  return (mask1 | mask2).reshape(shape), new_connections.reshape(shape)


def test_reference_connectivity_update_may_regrow_a_just_dropped_weight():
  mask = np.array([[1, 1, 0, 0]], bool)
  w = np.array([[0.5, -0.1, 0.0, 0.0]], np.float32)
  g = np.array([[0.0, 3.0, 1.0, 0.5]], np.float32)  # the dropped -0.1 has the largest |g|
  noise = np.zeros_like(w)
  new = jaxprune.dst.reference_connectivity_update(jnp.asarray(mask), jnp.asarray(w),
                                                   jnp.asarray(g), jnp.asarray(noise), 1)
  np.testing.assert_array_equal(new, [[1, 1, 0, 0]])  # dropped and regrown: unchanged
  assert (reference_mask_update(mask, w, g, noise, 0.5)[0] == np.asarray(new)).all()
  # With the noise, an inactive entry can outrank an active weight below 1e-5.
  w = np.array([[0.5, 1e-7, 0.0, 0.0]], np.float32)
  noise = np.array([[0.0, -2e-6, 3e-6, 0.0]], np.float32)
  new = jaxprune.dst.reference_connectivity_update(jnp.asarray(mask), jnp.asarray(w),
                                                   jnp.asarray(g), jnp.asarray(noise), 0)
  np.testing.assert_array_equal(new, [[1, 0, 1, 0]])
  assert (reference_mask_update(mask, w, g, noise, 0.0)[0] == np.asarray(new)).all()


def test_rigl_reference_convention_matches_a_port():
  rng = np.random.default_rng(5)
  x = rng.standard_normal((32, 16)).astype(np.float32)
  y = rng.standard_normal((32, 8)).astype(np.float32)
  # alpha = 0.45: f(t) k = 14.4, 10.8, 3.6, 0 at the four updates, away from the integers where
  # the float32 cosine (ours, and TF's cosine_decay) may land either side.
  lr, momentum, sparsity, alpha, every, end, seed = 0.05, 0.9, 0.75, 0.45, 3, 9, 4

  def grad(w):
    return (x.T @ (x @ w - y) / len(x)).astype(np.float32)

  tx = jaxprune.rigl(optax.sgd(lr, momentum=momentum), sparsity, drop_fraction=alpha,
                     update_every=every, end_step=end, select="k", seed=seed,
                     convention="reference")
  w0 = rng.standard_normal((16, 8)).astype(np.float32)
  state = tx.init({"k": jnp.asarray(w0)})
  mask = np.asarray(state.masks["k"])
  params = {"k": jnp.asarray(w0 * mask)}  # the reference's model is masked from the start
  # The reference's variables: weights (unmasked), momentum, masks; its global step.
  w_var, accum, global_step, last_update, update_calls = w0.copy(), np.zeros_like(w0), 0, -every, []
  update = jax.jit(tx.update)
  for call in range(18):
    g = grad(mask * w_var)
    if 0 <= global_step <= end and last_update + every <= global_step:
      fraction = np.float32(alpha / 2 * (1 + np.cos(np.pi * min(global_step, end) / end)))
      noise = np.asarray(jaxprune.dst.drop_noise(seed, global_step, 0, w0.shape))
      mask, new = reference_mask_update(mask, w_var, g, noise, fraction)
      w_var, accum = np.where(new, 0, w_var), np.where(new, 0, accum)
      last_update = global_step
      update_calls.append(call)
    else:  # apply_gradients: the masked gradient, TF's MomentumOptimizer
      accum = momentum * accum + mask * g
      w_var = w_var - np.float32(lr) * accum
      global_step += 1
    before = np.asarray(params["k"])
    updates, state = update({"k": jnp.asarray(grad(before))}, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(state.masks["k"], mask, err_msg=f"call {call}")
    np.testing.assert_allclose(params["k"], mask * w_var, rtol=1e-5, atol=1e-6)
    if call in update_calls:  # no gradient step: kept weights do not move
      kept = mask & (before != 0)
      np.testing.assert_array_equal(np.asarray(params["k"])[kept], before[kept])
  assert update_calls == [0, 4, 8, 12]  # global steps 0, 3, 6, 9: call k (every + 1)
  assert int(state.masks["k"].sum()) == 32


def test_unknown_dst_convention_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r"`convention` must be one of \('algorithm1', "
                                       r"'reference'\), got 'tf2'"):
    jaxprune.rigl(optax.sgd(0.1), 0.5, end_step=10, convention="tf2")


# ----------------------------------------------------------------------------
# SNIP as its authors ran it: a port of namhoonlee/snip-public (snip/model.py:
# get_sparse_mask, normalize_dict, create_sparse_mask), one global ranking.


def snip_reference_masks(weights, grads, target_sparsity):
  """Connection sensitivity |dL/dc| = |g * w| at c = 1, normalised over all layers, and the
  kappa = round(N (1 - s)) largest kept (tf.nn.top_k: the lower index first on ties)."""
  cs = np.concatenate([np.abs(g * w).ravel() for w, g in zip(weights, grads, strict=True)])
  cs = cs / cs.sum()
  kappa = int(round(cs.size * (1.0 - target_sparsity)))
  keep = np.zeros(cs.size, bool)
  keep[np.argsort(-cs, kind="stable")[:kappa]] = True
  return np.split(keep, np.cumsum([w.size for w in weights])[:-1])


def test_snip_global_scope_matches_a_port_of_the_reference():
  rng = np.random.default_rng(1)
  params = {"a": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
            "b": jnp.asarray(0.2 * rng.standard_normal((8, 4)), jnp.float32)}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  expected = snip_reference_masks([np.asarray(params[k]) for k in "ab"],
                                  [np.asarray(grads[k]) for k in "ab"], 0.8)
  # SNIP ranks every layer's connections, the last layer's included.
  tx = jaxprune.saliency_pruning(optax.sgd(0.1), 0.8, scope="global", select=BOTH)
  _, state = tx.update(grads, tx.init(params), params)
  for k, e in zip("ab", expected, strict=True):
    np.testing.assert_array_equal(np.asarray(state.masks[k]).ravel(), e)
  # The default per-layer ranking is a different mask (b's scores are smaller: 5x smaller w).
  tx = jaxprune.saliency_pruning(optax.sgd(0.1), 0.8, select=BOTH)
  _, state = tx.update(grads, tx.init(params), params)
  assert float(np.asarray(state.masks["b"]).mean()) == pytest.approx(0.1875)  # 6 of 32 kept
  assert expected[1].sum() < 6
