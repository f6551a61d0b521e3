"""Is the sparsity invariant holding? Counters in the optimizer state, and :func:`check`.

A pruning transform lands pruned entries on exactly ``0.0`` by emitting
``-w`` for them (:mod:`jaxprune.pruning`). Three things can silently break
that, and each is counted in the state where the user can read it:

* **Transforms after the pruner** (``optax.chain(nm_pruning(adamw),
  clip_by_global_norm(1.0))``): they rescale ``-w``, so pruned weights only
  decay towards 0 (or, with ``scale(0.5)``, never reach it). Counted as
  ``violations``: at every ``update``, the pruned entries of the incoming
  params that are not exactly 0 (one fused reduction), summed over steps
  (SET and RigL, whose first forward pass is dense, from their second update).
* **Non-finite weights.** No update ``u`` gives ``w + u == 0`` for ``w`` NaN
  or ``±inf`` (``inf + u`` is ``inf`` or NaN), so ``apply_updates`` cannot
  land them: a pruned NaN or inf stays non-finite and is counted as a
  violation at every later step. Non-finite scores rank as the largest
  (:mod:`jaxprune.masks`), so pruning itself never picks a NaN weight unless
  an N:M group holds more than ``n`` of them.
* **A sparsity outside [0, 1)** from a plain callable schedule or an
  ``inject_hyperparams`` value (NaN, traced 1.5): clipped (NaN and negative
  values to 0, values >= 1 to keep one weight per layer) and counted as
  ``clipped`` update steps.

Counters are int32 and saturate at ``2^31 - 1`` instead of wrapping.
:func:`check` reads them from any state (``optax.chain``, ``MultiSteps``,
``nnx.Optimizer``, ``TrainState``) by duck typing, so it reads
:class:`jaxprune.PruningState` and the master-weight states alike.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

INT32_MAX = 2**31 - 1


def saturating_add(total: jax.Array | None, x: jax.Array) -> jax.Array:
  """``total + x`` for non-negative int32 counters, stopping at ``2^31 - 1``.

  ``total`` None (the counter of a state built before the counter existed,
  e.g. restored from an old checkpoint) starts from 0.
  """
  x = jnp.asarray(x, jnp.int32)
  if total is None:
    total = jnp.zeros([], jnp.int32)
  return total + jnp.minimum(x, INT32_MAX - total)


def is_nonzero(x: jax.Array) -> jax.Array:
  """``x != 0`` on the bit pattern: exact for subnormals (which CPUs compare as 0) and NaN."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x != 0
  bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"int{8 * x.dtype.itemsize}"))
  return bits & jnp.asarray(~(-1 << (8 * x.dtype.itemsize - 1)), bits.dtype) != 0


def count_violations(masks, params) -> jax.Array:
  """Pruned entries (``mask`` False) of ``params`` that are not exactly 0, as an int32 scalar.

  Leaves with a scalar mask (not pruned) are skipped. XLA fuses the per-leaf
  sums into the passes over ``params`` that the update makes anyway.
  """
  total = jnp.zeros([], jnp.int32)
  for m, p in zip(jax.tree.leaves(masks), jax.tree.leaves(params), strict=True):
    if jnp.ndim(m):
      total = total + jnp.sum(~m & is_nonzero(p), dtype=jnp.int32)
  return total


class Check(NamedTuple):
  """What :func:`check` found; ``str()`` says what to fix. ``ok`` when nothing is wrong.

  Attributes:
    violations: pruned entries that were not exactly 0 in the params given to
      ``update``, summed over steps (``PruningState.violations`` and, where
      present, the master-weight states' ``violations``).
    clipped_steps: update steps whose sparsity was outside [0, 1) or NaN.
    corrections: quantization-aware training's corrected entries
      (:func:`jaxprune.quantization_corrections`); expected to be rare, not an error.
    pruned_nonzero: with ``params``: pruned entries not exactly 0 now (None without).
    nonfinite_pruned: with ``params``: of those, the NaN or infinite ones.
    messages: one sentence per problem, with the fix.
  """

  violations: int
  clipped_steps: int
  corrections: int
  pruned_nonzero: int | None
  nonfinite_pruned: int | None
  messages: tuple[str, ...]

  @property
  def ok(self) -> bool:
    return not self.messages

  def __str__(self) -> str:
    if self.ok:
      return "jaxprune.check: ok (every pruned entry was exactly 0 at every step)."
    return "jaxprune.check found problems:\n" + "\n".join(f"- {m}" for m in self.messages)


def host_value(x) -> Any:
  """The array of ``x``, unwrapping an ``nnx.Variable`` (as ``nnx.Optimizer`` stores state)."""
  if x is None:
    return None
  if not isinstance(x, (jax.Array, np.ndarray, np.generic, int, float)) and hasattr(x, "value"):
    x = x.get_value() if hasattr(x, "get_value") else x.value  # `.value` is deprecated in nnx
  return np.asarray(jax.device_get(x))


def _is_counted(x) -> bool:
  return hasattr(x, "count") and hasattr(x, "inner_state") and (
      hasattr(x, "masks") or hasattr(x, "master"))


def states(opt_state) -> list[Any]:
  """Every jaxprune pruning or master-weight state in ``opt_state``, outer ones first.

  ``opt_state`` may be a state, or an object holding one in ``.opt_state``
  (``nnx.Optimizer``, linen ``TrainState``).
  """
  if hasattr(opt_state, "opt_state") and not _is_counted(opt_state):
    opt_state = opt_state.opt_state
  found = []
  for x in jax.tree.leaves(opt_state, is_leaf=_is_counted):
    if _is_counted(x):
      found.append(x)
      found.extend(states(x.inner_state))
  return found


def _total(found, field: str) -> int:
  return int(sum(int(host_value(getattr(s, field))) for s in found
                 if getattr(s, field, None) is not None))


def _pruned_now(found, params) -> tuple[int, int]:
  """Pruned entries of ``params`` that are not 0, and the non-finite ones among them."""
  nonzero = nonfinite = 0
  p_leaves = jax.tree.leaves(params)
  for s in found:
    masks = getattr(s, "masks", None)
    if masks is None:
      continue
    m_leaves = [host_value(m) for m in jax.tree.leaves(masks)]
    if len(m_leaves) != len(p_leaves):
      raise ValueError(f"`params` has {len(p_leaves)} leaves but the pruning state's masks "
                       f"have {len(m_leaves)}: pass the params the optimizer updates.")
    for m, p in zip(m_leaves, p_leaves, strict=True):
      if m.ndim:
        p = np.asarray(jax.device_get(p))
        pruned = ~m.astype(bool)
        nonzero += int(np.count_nonzero(pruned & (p != 0)))
        nonfinite += int(np.count_nonzero(pruned & ~np.isfinite(p)))
  return nonzero, nonfinite


def check(opt_state, params=None) -> Check:
  """Reads the invariant counters of every jaxprune state in ``opt_state`` and says what to fix.

  Args:
    opt_state: the optimizer state (any wrapping: ``optax.chain``,
      ``MultiSteps``, ``inject_hyperparams``), or an ``nnx.Optimizer`` or a
      linen ``TrainState``.
    params: the current params; when given, their pruned entries are checked
      now too (the counters only see params at the next ``update``).

  Returns:
    A :class:`Check`; ``print`` it, or assert ``check(...).ok`` in a test.

  Raises:
    ValueError: when ``opt_state`` holds no jaxprune state.
  """
  found = states(opt_state)
  if not found:
    raise ValueError(
        f"`opt_state` holds no jaxprune pruning or master-weight state (got "
        f"{type(opt_state).__name__}); pass the state of a jaxprune transform, or an "
        "nnx.Optimizer / TrainState built with one.")
  violations = _total(found, "violations")
  clipped = _total(found, "clipped")
  corrections = _total(found, "corrections")
  nonzero = nonfinite = None
  if params is not None:
    nonzero, nonfinite = _pruned_now(found, params)
  messages = []
  if violations or nonzero:
    messages.append(
        f"{violations} pruned entries (summed over steps) were not exactly 0 in the params given "
        "to `update`" + (f", and {nonzero} are not 0 now" if nonzero else "") + ". A transform "
        "after the pruning transform rescales its updates (clip_by_global_norm, scale, ...): put "
        "the pruning transform last, wrapping the others, e.g. magnitude_pruning(optax.chain("
        "optax.clip_by_global_norm(1.0), optax.adamw(lr)), ...); or the params were edited "
        "outside the optimizer.")
  if nonfinite:
    messages.append(
        f"{nonfinite} pruned entries are NaN or inf: no update can land a non-finite weight on "
        "0 (w + u is NaN or inf for every u). The run diverged: lower the learning rate or clip "
        "gradients inside the pruning transform, or restart from a finite checkpoint.")
  if clipped:
    messages.append(
        f"the sparsity was outside [0, 1) or NaN at {clipped} update steps and was clipped "
        "(NaN and negative values to 0, values >= 1 to keep one weight per layer): fix the "
        "schedule or the value given to optax.inject_hyperparams.")
  return Check(violations, clipped, corrections, nonzero, nonfinite, tuple(messages))
