"""Sparsity schedules: Zhu-Gupta known answers, update steps, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune


def test_polynomial_known_answer():
  sched = jaxprune.polynomial_schedule(0.0, 0.9, begin_step=100, end_step=300)
  # p = 0.5: 0.9 + (0 - 0.9) * 0.5**3 = 0.7875.
  assert float(sched(200)) == pytest.approx(0.7875, abs=1e-7)
  assert float(sched(100)) == 0.0
  assert float(sched(300)) == np.float32(0.9)
  assert float(sched(10_000)) == np.float32(0.9)
  assert float(sched(0)) == 0.0  # before begin: p is clipped to 0


@settings(max_examples=50, deadline=None)
@given(st.floats(0, 0.99), st.floats(0, 0.99), st.integers(0, 50), st.integers(1, 100),
       st.floats(0.5, 5), st.integers(0, 200))
def test_polynomial_matches_formula(s_i, s_f, begin, length, power, step):
  sched = jaxprune.polynomial_schedule(s_i, s_f, begin, begin + length, power=power)
  p = min(max((step - begin) / length, 0.0), 1.0)
  assert float(sched(step)) == pytest.approx(s_f + (s_i - s_f) * (1 - p) ** power, abs=1e-5)


def test_polynomial_update_steps_and_jit():
  sched = jaxprune.polynomial_schedule(0.0, 0.5, begin_step=10, end_step=25, frequency=4)
  steps = np.arange(40)
  updates = np.asarray(jax.jit(sched.is_update_step)(steps))
  # Every 4 steps from 10 inside [10, 25], plus the end step itself.
  assert steps[updates].tolist() == [10, 14, 18, 22, 25]


def test_constant_and_one_shot():
  const = jaxprune.constant_schedule(0.3)
  assert float(const(1234)) == np.float32(0.3)
  assert np.asarray(const.is_update_step(jnp.arange(5))).tolist() == [1, 0, 0, 0, 0]
  every = jaxprune.constant_schedule(0.3, frequency=2)
  assert np.asarray(every.is_update_step(jnp.arange(5))).tolist() == [1, 0, 1, 0, 1]
  shot = jaxprune.one_shot_schedule(0.5, step=3)
  assert np.asarray(shot(jnp.arange(5))).tolist() == [0, 0, 0, 0.5, 0.5]
  assert np.asarray(shot.is_update_step(jnp.arange(5))).tolist() == [0, 0, 0, 1, 0]


def test_applied_sparsity_holds_between_updates():
  sched = jaxprune.polynomial_schedule(0.0, 0.8, begin_step=2, end_step=8, frequency=3)
  applied = jaxprune.applied_sparsity(sched, 12)
  values = np.asarray(sched(jnp.arange(12)))
  # Updates at 2, 5, 8; nothing applied before step 2.
  expected = [0, 0] + [values[2]] * 3 + [values[5]] * 3 + [values[8]] * 4
  np.testing.assert_allclose(applied, expected)


poly = jaxprune.polynomial_schedule


@pytest.mark.parametrize("make, match", [
    (lambda: poly(0.0, 1.0, 0, 10), r"`final_sparsity` must be in \[0, 1\)"),
    (lambda: poly(-0.1, 0.5, 0, 10), r"`init_sparsity` must be in \[0, 1\)"),
    (lambda: poly(0.0, 0.5, 10, 10), r"`end_step` must be > `begin_step`"),
    (lambda: poly(0.0, 0.5, 0, 10, frequency=0), r"`frequency` must be >= 1"),
    (lambda: jaxprune.polynomial_schedule(0.0, 0.5, -1, 10), r"`begin_step` must be >= 0"),
    (lambda: jaxprune.polynomial_schedule(0.0, 0.5, 0, 10, power=0), r"`power` must be > 0"),
    (lambda: jaxprune.constant_schedule(1.2), r"`sparsity` must be in \[0, 1\)"),
    (lambda: jaxprune.constant_schedule(0.5, frequency=-3), r"`frequency` must be >= 1"),
    (lambda: jaxprune.one_shot_schedule(0.5, step=-1), r"`step` must be >= 0"),
])
def test_schedule_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


# ----------------------------------------------------------------------------
# Jin et al. (2025): a port of their MaxText training loop's schedule
# (tjingrant/sparse-llm-code, MaxText/train.py: calculate_per_step_sparsity and
# the 'global_gradual' branch), in float64 as Python computes it there.


def jin_percent_to_keep(step, start, end, frequency, sparsity):
  """``percent_to_keep_remaining`` at ``step``, or None where their loop does not prune."""
  if not (start <= step <= end and step % frequency == 0):
    return None
  assert (end - start) % frequency == 0
  num_pruning_iterations = (end - start) // frequency + 1
  per_step_sparsity = 1.0 - (1.0 - sparsity) ** (1.0 / num_pruning_iterations)
  current_pruning_iterations = (step - start) // frequency
  return (1.0 - per_step_sparsity) ** (current_pruning_iterations + 1)


@pytest.mark.parametrize("start, end, frequency, sparsity", [
    (200, 600, 10, 0.75), (10, 30, 2, 0.75), (0, 100, 100, 0.5), (30, 90, 15, 0.9),
    (5, 6, 1, 0.3),
])
def test_geometric_matches_a_port_of_jin_et_al(start, end, frequency, sparsity):
  sched = jaxprune.geometric_schedule(sparsity, start, end, frequency=frequency)
  steps = np.arange(end + 20)
  values = np.asarray(jax.jit(sched)(steps), np.float64)
  updates = np.asarray(jax.jit(sched.is_update_step)(steps))
  reference = [jin_percent_to_keep(int(t), start, end, frequency, sparsity) for t in steps]
  pruned_at = [t for t, r in zip(steps, reference, strict=True) if r is not None]
  assert steps[updates].tolist() == pruned_at
  for t, r in zip(steps, reference, strict=True):
    if r is not None:
      assert values[t] == pytest.approx(1.0 - r, abs=2e-7), t
  # What the transform applies between updates equals the schedule itself from the start on.
  np.testing.assert_array_equal(jaxprune.applied_sparsity(sched, len(steps))[start:],
                                values.astype(np.float32)[start:])
  assert (values[:start] == 0).all() and values[-1] == np.float32(sparsity)


def test_geometric_known_answer_and_off_grid_end():
  sched = jaxprune.geometric_schedule(0.75, 0, 40, frequency=10)
  assert sched.num_updates == 5
  assert float(sched(0)) == pytest.approx(1 - 0.25 ** 0.2, abs=1e-7)  # 0.2421
  assert float(sched(9)) == float(sched(0))
  assert float(sched(39)) == pytest.approx(1 - 0.25 ** 0.8, abs=1e-7)
  assert float(sched(40)) == np.float32(0.75)
  # end - begin not a multiple of frequency: the grid, then end_step itself is the last update.
  sched = jaxprune.geometric_schedule(0.5, 3, 10, frequency=4)
  assert np.flatnonzero(np.asarray(sched.is_update_step(np.arange(20)))).tolist() == [3, 7, 10]
  np.testing.assert_allclose(np.asarray(sched(np.array([3, 7, 10]))),
                             1 - 0.5 ** (np.arange(1, 4) / 3), atol=1e-7)


# ----------------------------------------------------------------------------
# TF-MOT's step convention: a port of PolynomialDecay.__call__ and
# PruningSchedule._should_prune_in_step (tensorflow/model-optimization,
# sparsity/keras/pruning_schedule.py) driven as prune_low_magnitude drives it
# (pruning_wrapper.py: pruning_step is incremented before the mask update of
# every training batch, from 0, so batch i sees i + 1).


def tfmot_polynomial(step, s_i, s_f, begin, end, power, frequency):
  in_range = begin <= step <= end
  turn = (step - begin) % frequency == 0
  p = min(1.0, max(0.0, np.float32(step - begin) / (end - begin)))
  return in_range and turn, (s_i - s_f) * (1 - p) ** power + s_f


@pytest.mark.parametrize("begin, end, frequency", [(0, 40, 10), (5, 37, 4), (12, 13, 1)])
def test_tfmot_convention_matches_a_port_of_tfmot(begin, end, frequency):
  sched = jaxprune.polynomial_schedule(0.1, 0.8, begin, end, frequency=frequency,
                                       convention="tfmot")
  batches = np.arange(end + 10)
  updates = np.asarray(sched.is_update_step(batches))
  values = np.asarray(sched(batches))
  for i in batches:
    should, sparsity = tfmot_polynomial(int(i) + 1, 0.1, 0.8, begin, end, 3.0, frequency)
    assert bool(updates[i]) == should, i
    if should:
      assert values[i] == pytest.approx(sparsity, abs=1e-6)
  # One batch earlier than the default convention, on the grid (never at batch 0 when begin=0).
  index = jaxprune.polynomial_schedule(0.1, 0.8, begin, end, frequency=frequency)
  grid = [t for t in range(begin, end + 1) if (t - begin) % frequency == 0]
  assert np.flatnonzero(updates).tolist() == [t - 1 for t in grid if t >= 1]
  np.testing.assert_array_equal(values[:-1], np.asarray(index(batches[1:])))


def test_unknown_convention_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r"`convention` must be one of \('index', 'tfmot'\), "
                                       r"got 'keras'"):
    jaxprune.polynomial_schedule(0.0, 0.5, 0, 10, convention="keras")


@pytest.mark.parametrize("make, match", [
    (lambda: jaxprune.geometric_schedule(1.0, 0, 10), r"`final_sparsity` must be in \[0, 1\)"),
    (lambda: jaxprune.geometric_schedule(0.5, 10, 10), r"`end_step` must be > `begin_step`"),
    (lambda: jaxprune.geometric_schedule(0.5, -1, 10), r"`begin_step` must be >= 0"),
    (lambda: jaxprune.geometric_schedule(0.5, 0, 10, frequency=0), r"`frequency` must be >= 1"),
])
def test_geometric_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def jin_prune(kernels, masks, num_to_keep):
  """Port of their ``prune(..., structure='none', scoring_method='magnitude')``: one global
  threshold over ``mask * kernel`` of all prunable kernels, new mask ``|w| >= t`` and old mask.
  They keep ``num_to_keep = int(percent_to_keep * N)``; the count is an argument here."""
  scores = np.concatenate([(m * k).ravel() for k, m in zip(kernels, masks, strict=True)])
  threshold = np.sort(np.abs(scores))[scores.size - num_to_keep]
  return [(np.abs(k) >= threshold) * m for k, m in zip(kernels, masks, strict=True)]


def test_jin_global_gradual_pruning_matches_a_port():
  # Their method = the geometric schedule + one global magnitude threshold; the weights move
  # between updates (SGD on fixed random gradients), so every update sees new magnitudes.
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.standard_normal((32, 16)), jnp.float32),
            "b": jnp.asarray(0.3 * rng.standard_normal((16, 8)), jnp.float32)}
  start, end, frequency, sparsity = 4, 16, 4, 0.8
  schedule = jaxprune.geometric_schedule(sparsity, start, end, frequency=frequency)
  # Both kernels share the threshold, as both are in the port (select(head=None): the default
  # selection would leave b, the last layer, dense).
  tx = jaxprune.magnitude_pruning(optax.sgd(0.05), schedule, scope="global",
                                  select=jaxprune.select(head=None))
  state, update = tx.init(params), jax.jit(tx.update)
  total = params["a"].size + params["b"].size
  masks, count_gaps = [np.ones(params["a"].shape), np.ones(params["b"].shape)], []
  for step in range(end + 3):
    keep = jin_percent_to_keep(step, start, end, frequency, sparsity)
    if keep is not None:  # their loop prunes before the step, on the current weights
      # Ours prunes round(s / s_f * round(s_f * N)) (float32); theirs N - int(keep * N).
      ours = total - round(float(np.float32(schedule(step)) / np.float32(sparsity))
                           * round(sparsity * total))
      count_gaps.append(int(keep * total) - ours)
      masks = jin_prune([np.asarray(params["a"]), np.asarray(params["b"])], masks, ours)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
                         params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for o, r in zip(jax.tree.leaves(state.masks), masks, strict=True):
      np.testing.assert_array_equal(o, r.astype(bool), err_msg=f"step {step}")
  # int() truncation keeps one weight fewer at some updates: at the first (427.99 -> 427) and
  # at the last, where (1 - per_step) ** 4 = 0.19999999999999998 prunes 513 of 640, not 80%.
  assert count_gaps == [-1, 0, 0, -1]
  assert sum(int(np.sum(m == 0)) for m in masks) == round(sparsity * total)
