"""Sparsity schedules: optax-style callables ``step -> sparsity``.

A sparsity schedule is a callable ``schedule(step) -> sparsity`` (as an
``optax.Schedule``) with two more members that pruning transforms use:

* ``schedule.is_update_step(step) -> bool``: whether masks are recomputed at
  ``step``. Between update steps a mask is held fixed.
* ``schedule.final_sparsity``: the sparsity the schedule ends at; per-layer
  targets (ERK, overrides) are expressed relative to it.

Both methods accept scalars or arrays of steps and work under ``jax.jit``.
A plain callable ``step -> sparsity`` is accepted by the transforms too; it is
treated as updating masks every step.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _checks


@runtime_checkable
class SparsitySchedule(Protocol):
  final_sparsity: float

  def __call__(self, step) -> jax.Array: ...

  def is_update_step(self, step) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class ConstantSchedule:
  """Constant sparsity; masks computed at step 0 and then every ``frequency`` steps."""

  sparsity: float
  frequency: int | None = None

  @property
  def final_sparsity(self) -> float:
    return self.sparsity

  def __call__(self, step) -> jax.Array:
    return jnp.full(jnp.shape(step), self.sparsity, jnp.float32)

  def is_update_step(self, step) -> jax.Array:
    step = jnp.asarray(step)
    if self.frequency is None:
      return step == 0
    return step % self.frequency == 0


@dataclasses.dataclass(frozen=True)
class OneShotSchedule:
  """Dense until ``step``; pruned to ``sparsity`` once at ``step``, then held."""

  sparsity: float
  step: int

  @property
  def final_sparsity(self) -> float:
    return self.sparsity

  def __call__(self, step) -> jax.Array:
    return jnp.where(jnp.asarray(step) >= self.step, jnp.float32(self.sparsity), 0.0)

  def is_update_step(self, step) -> jax.Array:
    return jnp.asarray(step) == self.step


@dataclasses.dataclass(frozen=True)
class PolynomialSchedule:
  """Gradual pruning of Zhu & Gupta (2017), as TF-MOT's ``PolynomialDecay``.

  .. math::
      p = \\mathrm{clip}\\left(\\frac{t - t_0}{t_1 - t_0}, 0, 1\\right), \\qquad
      s_t = s_f + (s_i - s_f) (1 - p)^{k}

  Masks are recomputed every ``frequency`` steps in ``[t_0, t_1]`` and at
  ``t_1``; before ``t_0`` no mask is applied.
  """

  init_sparsity: float
  final_sparsity: float
  begin_step: int
  end_step: int
  power: float = 3.0
  frequency: int = 1

  def __call__(self, step) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    p = jnp.clip((step - self.begin_step) / (self.end_step - self.begin_step), 0.0, 1.0)
    decay = (1.0 - p) ** self.power
    return self.final_sparsity + (self.init_sparsity - self.final_sparsity) * decay

  def is_update_step(self, step) -> jax.Array:
    step = jnp.asarray(step)
    in_window = (step >= self.begin_step) & (step <= self.end_step)
    on_grid = (step - self.begin_step) % self.frequency == 0
    return in_window & (on_grid | (step == self.end_step))


def constant_schedule(sparsity: float, *, frequency: int | None = None) -> ConstantSchedule:
  """Sparsity ``sparsity`` from step 0, masks recomputed every ``frequency`` steps.

  Args:
    sparsity: fraction of pruned weights, in [0, 1).
    frequency: recompute masks every ``frequency`` steps (>= 1); ``None``
      computes them once, at step 0, and holds them.
  """
  _checks.check_sparsity("sparsity", sparsity)
  if frequency is not None:
    frequency = _checks.check_int("frequency", frequency, minimum=1)
  return ConstantSchedule(sparsity, frequency)


def one_shot_schedule(sparsity: float, step: int = 0) -> OneShotSchedule:
  """Prune once to ``sparsity`` (in [0, 1)) at ``step`` (>= 0) and hold the mask."""
  _checks.check_sparsity("sparsity", sparsity)
  step = _checks.check_int("step", step, minimum=0)
  return OneShotSchedule(sparsity, step)


def polynomial_schedule(
    init_sparsity: float,
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    *,
    power: float = 3.0,
    frequency: int = 1,
) -> PolynomialSchedule:
  """Zhu & Gupta (2017) polynomial sparsity ramp; see :class:`PolynomialSchedule`.

  Args:
    init_sparsity: sparsity at ``begin_step``, in [0, 1).
    final_sparsity: sparsity from ``end_step`` on, in [0, 1).
    begin_step: first step of the ramp, >= 0.
    end_step: last step of the ramp, > ``begin_step``.
    power: exponent k > 0 (3 in the paper).
    frequency: masks are recomputed every ``frequency`` (>= 1) steps of the ramp.

  Known answer: ``init_sparsity=0, final_sparsity=0.9`` gives 0.7875 halfway.
  """
  _checks.check_sparsity("init_sparsity", init_sparsity)
  _checks.check_sparsity("final_sparsity", final_sparsity)
  begin_step = _checks.check_int("begin_step", begin_step, minimum=0)
  end_step = _checks.check_int("end_step", end_step)
  if end_step <= begin_step:
    raise ValueError(
        f"`end_step` must be > `begin_step` = {begin_step}, got end_step={end_step}."
    )
  if not power > 0:
    raise ValueError(f"`power` must be > 0, got {power}.")
  frequency = _checks.check_int("frequency", frequency, minimum=1)
  return PolynomialSchedule(
      float(init_sparsity), float(final_sparsity), begin_step, end_step, float(power), frequency
  )


def as_schedule(sparsity) -> SparsitySchedule | None:
  """A float becomes a :func:`constant_schedule`; a schedule is returned as is."""
  if sparsity is None:
    return None
  if callable(sparsity):
    return sparsity
  return constant_schedule(sparsity)


def is_update_step(schedule, step) -> jax.Array:
  """``schedule.is_update_step(step)``; every step for a plain callable."""
  fn = getattr(schedule, "is_update_step", None)
  if fn is None:
    return jnp.ones(jnp.shape(step), bool)
  return fn(step)


def applied_sparsity(schedule, num_steps: int) -> np.ndarray:
  """Host-side: the target sparsity in force during each of steps ``0..num_steps-1``.

  The value at step ``t`` is the schedule's value at the last update step
  ``<= t`` (masks are held between updates), and 0 before the first update.
  This is what a pruning transform actually applies, not the continuous curve.
  """
  steps = np.arange(num_steps)
  values = np.asarray(schedule(jnp.asarray(steps)), np.float64)
  updates = np.asarray(is_update_step(schedule, jnp.asarray(steps)), bool)
  last = np.maximum.accumulate(np.where(updates, steps, -1))
  return np.where(last >= 0, values[np.maximum(last, 0)], 0.0)
