"""Sparsity schedules: Zhu-Gupta known answers, update steps, errors."""

import jax
import jax.numpy as jnp
import numpy as np
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
