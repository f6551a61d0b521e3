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

**Step convention.** ``step`` is the number of ``update`` calls before this
one (optax's ``count``): the first batch is step 0, and a mask update at step
``t`` is decided on the weights that batch ``t`` sees and applied in that same
step. TF-MOT's ``prune_low_magnitude`` counts differently: its
``pruning_step`` is incremented before the mask update of every training
batch, so batch ``i`` evaluates the schedule at ``i + 1`` and step 0 never
occurs; with ``begin_step = 0`` its first update is at step ``frequency``
(batch ``frequency - 1``). The same ``PolynomialDecay`` arguments therefore
prune one batch earlier in TF-MOT than here. ``polynomial_schedule(...,
convention='tfmot')`` reproduces TF-MOT's steps exactly.
Jin et al.'s MaxText loop (:func:`geometric_schedule`) counts as we do.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _checks

#: Step conventions of :func:`polynomial_schedule`: ``'index'``, the batch index
#: (optax's ``count``, from 0); ``'tfmot'``, TF-MOT's ``pruning_step`` (batch index + 1).
CONVENTIONS = ("index", "tfmot")

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
  ``t_1``; before ``t_0`` no mask is applied. With ``convention='tfmot'``,
  ``t`` is the step plus one (see the module docstring).
  """

  init_sparsity: float
  final_sparsity: float
  begin_step: int
  end_step: int
  power: float = 3.0
  frequency: int = 1
  convention: str = "index"

  def _t(self, step) -> jax.Array:
    step = jnp.asarray(step)
    return step + 1 if self.convention == "tfmot" else step

  def __call__(self, step) -> jax.Array:
    step = self._t(step).astype(jnp.float32)
    p = jnp.clip((step - self.begin_step) / (self.end_step - self.begin_step), 0.0, 1.0)
    decay = (1.0 - p) ** self.power
    return self.final_sparsity + (self.init_sparsity - self.final_sparsity) * decay

  def is_update_step(self, step) -> jax.Array:
    step = self._t(step)
    in_window = (step >= self.begin_step) & (step <= self.end_step)
    on_grid = (step - self.begin_step) % self.frequency == 0
    if self.convention == "tfmot":  # TF-MOT prunes on the grid only (and end_step on it).
      return in_window & on_grid
    return in_window & (on_grid | (step == self.end_step))


@dataclasses.dataclass(frozen=True)
class GeometricSchedule:
  """Global gradual pruning of Jin et al. (2025), as their MaxText ``train.py``.

  "The Journey Matters: Average Parameter Count over Pre-training Unifies
  Sparse and Dense Scaling Laws" (arXiv:2501.12486); reference code:
  github.com/tjingrant/sparse-llm-code, ``MaxText/train.py``
  (``calculate_per_step_sparsity`` and the ``global_gradual`` branch of the
  training loop). Masks are updated at the ``n`` steps
  ``t_k = t_0 + k f`` (``k = 0 .. n - 1``, the last one at ``t_1``); each
  update removes the same fraction ``1 - (1 - s_f)^{1/n}`` of the weights
  still kept, so after update ``k``

  .. math::
      1 - s(t_k) = (1 - s_f)^{(k + 1) / n}, \\qquad
      n = \\lceil (t_1 - t_0) / f \\rceil + 1,

  and ``s(t)`` holds the value of the last update ``<= t`` (0 before
  ``t_0``). The reference asserts ``(t_1 - t_0) % f == 0`` and prunes where
  ``step % f == 0``; with ``t_0`` on that grid (as in its configs) the update
  steps and values are the same. When ``f`` does not divide ``t_1 - t_0``,
  the last update is at ``t_1`` itself, as in :class:`PolynomialSchedule`.
  Unlike the cubic ramp, the first update already prunes: 3.3% of the weights
  for ``s_f = 0.75`` and ``n = 41``.
  """

  final_sparsity: float
  begin_step: int
  end_step: int
  frequency: int = 1

  @property
  def num_updates(self) -> int:
    return -(-(self.end_step - self.begin_step) // self.frequency) + 1

  def __call__(self, step) -> jax.Array:
    step = jnp.asarray(step)
    k = jnp.where(step >= self.end_step, self.num_updates - 1,
                  (step - self.begin_step) // self.frequency)
    keep = jnp.float32(1.0 - self.final_sparsity) ** (
        (k + 1).astype(jnp.float32) / self.num_updates)
    sparsity = jnp.where(step >= self.end_step, jnp.float32(self.final_sparsity), 1.0 - keep)
    return jnp.where(step >= self.begin_step, sparsity, 0.0).astype(jnp.float32)

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
    frequency = _checks.check_step("frequency", frequency, minimum=1)
  return ConstantSchedule(sparsity, frequency)


def one_shot_schedule(sparsity: float, step: int = 0) -> OneShotSchedule:
  """Prune once to ``sparsity`` (in [0, 1)) at ``step`` (>= 0) and hold the mask."""
  _checks.check_sparsity("sparsity", sparsity)
  step = _checks.check_step("step", step, minimum=0)
  return OneShotSchedule(sparsity, step)


def polynomial_schedule(
    init_sparsity: float,
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    *,
    power: float = 3.0,
    frequency: int = 1,
    convention: str = "index",
) -> PolynomialSchedule:
  """Zhu & Gupta (2017) polynomial sparsity ramp; see :class:`PolynomialSchedule`.

  Args:
    init_sparsity: sparsity at ``begin_step``, in [0, 1).
    final_sparsity: sparsity from ``end_step`` on, in [0, 1).
    begin_step: first step of the ramp, >= 0.
    end_step: last step of the ramp, > ``begin_step``.
    power: exponent k > 0 (3 in the paper).
    frequency: masks are recomputed every ``frequency`` (>= 1) steps of the ramp.
    convention: ``'index'`` (default): ``step`` is the batch index, from 0;
      ``'tfmot'``: TF-MOT's ``PolynomialDecay`` under ``prune_low_magnitude``,
      which sees the batch index + 1 and updates only on the ``frequency``
      grid (one batch earlier than ``'index'``; see the module docstring).

  Known answer: ``init_sparsity=0, final_sparsity=0.9`` gives 0.7875 halfway.
  """
  _checks.check_sparsity("init_sparsity", init_sparsity)
  _checks.check_sparsity("final_sparsity", final_sparsity)
  begin_step, end_step = _check_window(begin_step, end_step)
  if not power > 0:
    raise ValueError(f"`power` must be > 0, got {power}.")
  frequency = _checks.check_step("frequency", frequency, minimum=1)
  if convention not in CONVENTIONS:
    raise ValueError(f"`convention` must be one of {CONVENTIONS}, got {convention!r}.")
  return PolynomialSchedule(float(init_sparsity), float(final_sparsity), begin_step, end_step,
                            float(power), frequency, convention)


def _check_window(begin_step, end_step) -> tuple[int, int]:
  begin_step = _checks.check_step("begin_step", begin_step, minimum=0)
  end_step = _checks.check_step("end_step", end_step, minimum=None)
  if end_step <= begin_step:
    raise ValueError(
        f"`end_step` must be > `begin_step` = {begin_step}, got end_step={end_step}.")
  return begin_step, end_step


def geometric_schedule(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    *,
    frequency: int = 1,
) -> GeometricSchedule:
  """Jin et al. (2025) geometric sparsity steps; see :class:`GeometricSchedule`.

  Their method prunes with one *global* magnitude threshold:
  ``jaxprune.magnitude_pruning(inner, geometric_schedule(...), scope='global')``
  (``recipes/gmp_global_geometric.py``).

  Args:
    final_sparsity: sparsity reached at ``end_step``, in [0, 1).
    begin_step: the first update, >= 0.
    end_step: the last update, > ``begin_step``.
    frequency: steps between updates, >= 1 (TF-MOT-like: every ``frequency``
      steps from ``begin_step``, and at ``end_step``).

  Known answer: ``geometric_schedule(0.75, 0, 40, frequency=10)`` (5 updates)
  gives ``1 - 0.25**0.2 = 0.2421`` at steps 0-9 and 0.75 from step 40.
  """
  _checks.check_sparsity("final_sparsity", final_sparsity)
  begin_step, end_step = _check_window(begin_step, end_step)
  frequency = _checks.check_step("frequency", frequency, minimum=1)
  return GeometricSchedule(float(final_sparsity), begin_step, end_step, frequency)


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


# ---------------------------------------------------------------------------
# Progressive gradient flow (jaxprune.gradient_flow): the mask value b_t of
# pruned weights (MDGF) and the N:M patterns over the sparse window (SDGF).
# ---------------------------------------------------------------------------

DECAYS = ("exp", "linear", "step")
STRUCTURE_SCHEDULES = ("sparsify", "fine")

#: The ``fine`` schedule's group sizes are ``m * 2**k`` for these ``k``.
_FINE_LEVELS = (3, 2, 1, 0)

#: ``b`` where the sparse window ends when ``coef`` is left to its default ('exp').
B_END = 0.01


def check_decay(decay) -> str:
  if decay not in DECAYS:
    raise ValueError(f"`decay` must be one of {DECAYS}, got {decay!r}.")
  return decay


def check_coef(coef) -> float:
  if (isinstance(coef, bool) or not isinstance(coef, numbers.Real)
      or not math.isfinite(coef) or coef <= 0):
    raise ValueError(f"`coef` must be a finite number > 0, got {coef!r}.")
  return float(coef)


def check_steps(total_steps, dense_steps, finetune_steps) -> tuple[int, int, int]:
  total = _checks.check_step("total_steps", total_steps, minimum=1)
  dense = _checks.check_step("dense_steps", dense_steps, minimum=0)
  finetune = _checks.check_step("finetune_steps", finetune_steps, minimum=0)
  if dense + finetune >= total:
    raise ValueError(
        f"`dense_steps` + `finetune_steps` must be < `total_steps` (the sparse window "
        f"must not be empty), got {dense} + {finetune} >= {total}.")
  return total, dense, finetune


def default_coef(decay: str, window: int) -> float:
  """The decay rate that brings ``b`` to its end value where the sparse window ends.

  .. math::  c = \\frac{\\ln(1 / b_{end})}{L} \\ (\\text{'exp'}), \\qquad
             c = \\frac{1}{L} \\ (\\text{'linear'}),

  with ``L = window`` the steps of the sparse window and ``b_end =``
  :data:`B_END` = 0.01: the exponential decay reaches 0.01 and the linear one
  reaches 0 at ``t = L``, the first step of the hard mask, so that the pruned
  weights hardly contribute any more when they are cut. ``'step'`` has no
  rate (1.0 is returned and not used).

  A fixed rate gives each run length another ``b`` at the hard mask. The
  authors' ViT-B config (``vit_base_training.yaml`` in
  abhibambhaniya/progressive_gradient_flow_nm_sparsity: ``decay_type: EXP``,
  ``decay_coef: 0.0001``; 350 epochs of about 1,251 steps, ~438k steps) has
  ``b`` below 0.01 after 46k steps (10.5% of training) and at ``e^{-44}`` by
  the end; ``c = 8e-4`` in an 800-step run with a 10% fine-tune phase leaves
  ``b = 0.56`` at step 720, where the hard mask arrives.

  Args:
    decay: ``'exp'``, ``'linear'`` or ``'step'``.
    window: ``L >= 1``.
  """
  decay = check_decay(decay)
  window = _checks.check_int("window", window, minimum=1)
  if decay == "exp":
    return math.log(1.0 / B_END) / window
  return 1.0 / window


def mask_decay(t, decay: str = "exp", coef: float | None = None) -> jax.Array:
  """``b_t``, the mask value of pruned weights ``t`` steps into the sparse window.

  .. math::

      b_t = \\begin{cases}
        e^{-c\\, t} & \\text{'exp' (MDGF-Exponential)} \\\\
        \\max(0, 1 - c\\, t) & \\text{'linear' (MDGF-Linear)} \\\\
        0 & \\text{'step'}
      \\end{cases} \\qquad (t \\ge 0),

  and ``b_t = 1`` for ``t < 0`` (the dense phase), so ``'step'`` is the unit
  step: dense, then a binary mask from the first sparse step on (the
  reference code's ``StepDecay``, i.e. STE after a dense warm-up). For
  ``'exp'`` the half-life is ``ln 2 / c``: ``b(ln 2 / c) = 0.5``. For
  ``'linear'`` the mask is binary from ``t = 1 / c`` on.

  Args:
    t: steps since the start of the sparse window, scalar or array; may be
      traced.
    decay: ``'exp'``, ``'linear'`` or ``'step'``.
    coef: the decay rate ``c > 0`` per step; needed by ``'exp'`` and
      ``'linear'`` (see :func:`default_coef`), unused by ``'step'``.

  Returns:
    ``b_t`` as float32, of the shape of ``t``.
  """
  decay = check_decay(decay)
  if decay == "step" and coef is None:
    coef = 1.0
  elif coef is None:
    raise ValueError(f"`coef` is needed by decay={decay!r}; see jaxprune.schedules."
                     "default_coef for the rate that fits a sparse window.")
  coef = check_coef(coef)
  t = jnp.asarray(t, jnp.float32)
  if decay == "exp":
    b = jnp.exp(-coef * jnp.maximum(t, 0.0))
  elif decay == "linear":
    b = jnp.clip(1.0 - coef * t, 0.0, 1.0)
  else:
    b = jnp.zeros_like(t)
  return jnp.where(t < 0, 1.0, b)


def _patterns(n: int, m: int, schedule: str) -> list[tuple[int, int]]:
  if schedule == "fine":
    return [(n << k, m << k) for k in _FINE_LEVELS]
  # (m-1):m, then m/2, m/4, ... kept per group while above n, then n:m.
  kept = [m - 1] + [m >> k for k in range(1, m.bit_length())]
  return [(k, m) for k in dict.fromkeys([k for k in kept if k > n] + [n])]


def structure_frames(
    n: int,
    m: int,
    schedule: str,
    *,
    total_steps: int,
    dense_steps: int = 0,
    finetune_steps: int = 0,
) -> list[tuple[int, int, int]]:
  """The SDGF patterns and the step at which each starts: ``[(start, n_k, m_k), ...]``.

  The sparse window ``[dense_steps, total_steps - finetune_steps)`` of
  ``L`` steps is cut into ``F`` equal frames, frame ``i`` starting at
  ``dense_steps + floor(i L / F)``; the last frame's pattern is the target
  ``n:m`` and also holds through the fine-tune phase.

  * ``'sparsify'`` (SdGf-Stepwise, fixed ``m``): ``(m-1):m, (m/2):m,
    (m/4):m, ...`` while above ``n``, then ``n:m``; e.g. 1:8 gives 7:8, 4:8,
    2:8, 1:8.
  * ``'fine'`` (SdGf-Geometric, fixed ratio): ``(n 2^k):(m 2^k)`` for
    ``k = 3, 2, 1, 0``; e.g. 1:8 gives 8:64, 4:32, 2:16, 1:8. Every group
    size must divide the grouping axis of every pruned parameter.

  Example: ``structure_frames(1, 8, 'sparsify', total_steps=100,
  dense_steps=10, finetune_steps=10)`` is ``[(10, 7, 8), (30, 4, 8),
  (50, 2, 8), (70, 1, 8)]``.

  Args:
    n: target kept per group, ``1 <= n <= m``.
    m: target group size.
    schedule: ``'sparsify'`` or ``'fine'``.
    total_steps: all training steps, ``>= 1``.
    dense_steps: dense steps at the start, ``>= 0``.
    finetune_steps: hard-mask steps at the end, ``>= 0``; the window between
      must hold at least one step per frame.
  """
  n, m = _checks.check_nm(n, m)
  if schedule not in STRUCTURE_SCHEDULES:
    raise ValueError(
        f"`structure_schedule` must be one of {STRUCTURE_SCHEDULES} or None, got {schedule!r}.")
  total, dense, finetune = check_steps(total_steps, dense_steps, finetune_steps)
  patterns = _patterns(n, m, schedule)
  window = total - dense - finetune
  if window < len(patterns):
    listed = ", ".join(f"{a}:{b}" for a, b in patterns)
    raise ValueError(
        f"`structure_schedule` = {schedule!r} has {len(patterns)} frames ({listed}) but the "
        f"sparse window [dense_steps, total_steps - finetune_steps) = [{dense}, "
        f"{total - finetune}) has only {window} steps; it needs at least one step per frame.")
  return [(dense + i * window // len(patterns), a, b) for i, (a, b) in enumerate(patterns)]
