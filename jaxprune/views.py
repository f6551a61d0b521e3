"""What the model should see: the view of master-weight transforms, and schedule-free eval params.

Master-weight transforms (:func:`jaxprune.sr_ste`, :func:`jaxprune.ste`,
:func:`jaxprune.step_adam`, :func:`jaxprune.quantization`, ...) keep dense
weights in the optimizer state and give the model a *view* of them. The view
of the freshly initialised params is what the first forward pass should see:

    params = jaxprune.view(tx, params)

:func:`view` finds the view function wherever the transform sits: as the
transform itself, inside ``optax.chain``, ``optax.MultiSteps`` (or its
``gradient_transformation()``), ``optax.inject_hyperparams`` (built once from
its step-0 hyperparameters), and in the ``tx`` of an ``nnx.Optimizer`` or a
linen ``TrainState``. It walks the wrappers' attributes and closures (the
optax combinators keep their inner transforms there), so other wrappers that
keep their inner transform in a closure are found too.

:func:`schedule_free_eval_params` is ``optax.contrib.schedule_free_eval_params``
for a schedule-free optimizer wrapped by a pruning transform: it finds the
inner schedule-free state and applies the masks, so the evaluation params are
as sparse as the training params.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import invariants
from jaxprune.straight_through import ViewTransformation

_MAX_DEPTH = 64


def _step0_inner(freevars: dict[str, Any]):
  """The transform ``optax.inject_hyperparams`` builds, from its step-0 hyperparameters."""
  factory = freevars["inner_factory"]
  hparams = dict(freevars.get("other_hps", {}))
  hparams.update(freevars.get("numeric_hps", {}))
  for name, schedule in freevars.get("sched_hps", {}).items():
    hparams[name] = schedule(schedule.init())
  return factory(**hparams)


def _children(obj) -> list[Any]:
  """Where a wrapper may keep its inner transform: attributes, closures, partial arguments."""
  if isinstance(obj, tuple) and hasattr(obj, "init") and hasattr(obj, "update"):
    # A GradientTransformation: its `update` first. `optax.with_extra_args_support` (used by
    # chain and MultiSteps) closes over the whole transform there, while `init` may be a
    # transform's own init, whose closure holds the transforms it wraps.
    return [obj.update, obj.init, *obj]
  if isinstance(obj, (list, tuple)):
    return list(obj)
  if isinstance(obj, dict):
    return list(obj.values())
  if isinstance(obj, functools.partial):
    return [obj.func, *obj.args, *obj.keywords.values()]
  if inspect.ismethod(obj):
    return [obj.__self__, obj.__func__]
  if inspect.isfunction(obj):
    cells = obj.__closure__ or ()
    freevars = {}
    for name, cell in zip(obj.__code__.co_freevars, cells, strict=True):
      try:
        freevars[name] = cell.cell_contents
      except ValueError:  # an empty cell
        continue
    if "inner_factory" in freevars:  # optax.inject_hyperparams: its init knows every value.
      return [_step0_inner(freevars)] if "numeric_hps" in freevars else []
    return list(freevars.values())
  found = []
  for name in ("tx", "inner_opt", "_opt", "init", "update"):
    try:
      found.append(getattr(obj, name))
    except Exception:  # noqa: BLE001 - a property may raise; then there is nothing there.
      continue
  return found


def _find_views(obj, seen: set[int], depth: int) -> list[ViewTransformation]:
  if isinstance(obj, ViewTransformation):
    if id(obj.view) in seen:
      return []
    # Its functions' closures hold the transforms it wraps: never look for another view there.
    seen.update((id(obj.init), id(obj.update), id(obj.view)))
    return [obj]
  if id(obj) in seen or depth > _MAX_DEPTH or isinstance(
      obj, (str, bytes, int, float, bool, type(None), np.ndarray, jax.Array, type)):
    return []
  seen.add(id(obj))
  found = []
  for child in _children(obj):
    found.extend(_find_views(child, seen, depth + 1))
  return found


def view(tx, params):
  """The params a model should start from: the view of a master-weight transform.

  Args:
    tx: the transformation (``jaxprune.sr_ste(...)``, or any wrapping of it:
      ``optax.chain``, ``optax.MultiSteps``, ``optax.inject_hyperparams``), or
      an ``nnx.Optimizer`` or linen ``TrainState`` built with one.
    params: the freshly initialised params (an ``nnx.State``, linen params,
      Equinox arrays from ``eqx.filter(model, eqx.is_array)``).

  Returns:
    ``params`` with every selected leaf replaced by its view (e.g. N:M-masked).

  Raises:
    ValueError: when ``tx`` holds no master-weight transform (pruning
      transforms such as ``magnitude_pruning`` or ``rigl`` need no view: the
      params are what the model sees), when it holds several, or when given
      an optimizer *state*, which does not carry the view function.
  """
  if invariants.states(tx) and not callable(getattr(tx, "update", None)) and not hasattr(
      tx, "tx"):
    raise ValueError(
        "`tx` is an optimizer state; the view needs the transformation: pass `tx` itself (or "
        "the nnx.Optimizer / TrainState that holds it).")
  found = _find_views(tx, set(), 0)
  if not found:
    raise ValueError(
        f"`tx` ({type(tx).__name__}) holds no master-weight transform (sr_ste, ste, step_adam, "
        "gradient_flow, quantization): nothing to view. Pruning transforms (magnitude_pruning, "
        "nm_pruning, rigl, ...) need no view line; their params are what the model sees.")
  if len(found) > 1:
    raise ValueError(f"`tx` holds {len(found)} master-weight transforms; call `.view` of the "
                     "one whose params the model sees.")
  return found[0].view(params)


def _is_schedule_free(x) -> bool:
  return hasattr(x, "z") and hasattr(x, "b1") and hasattr(x, "base_optimizer_state")


def schedule_free_eval_params(opt_state, params):
  """``optax.contrib.schedule_free_eval_params`` through jaxprune's pruning transforms.

  For ``jaxprune.magnitude_pruning(optax.contrib.schedule_free_adamw(...), ...)``
  (or any pruning transform, ``rigl`` and ``set_pruning`` included, around a
  schedule-free optimizer, at any depth of ``optax.chain``): the evaluation
  point ``x = (y - (1 - b1) z) / b1`` of the inner schedule-free state, with
  the pruning masks applied, so pruned entries are exactly 0 (the inner state's
  ``z`` keeps the values pruned weights had, and ``x`` would not be sparse).

  Args:
    opt_state: the optimizer state, or an ``nnx.Optimizer`` / ``TrainState``.
    params: the current (training) params ``y``.

  Returns:
    The evaluation params, sparse like ``params``.

  Raises:
    ValueError: when there is no schedule-free state, or it sits inside a
      master-weight transform (whose inner params are the dense master
      weights, not ``params``).
  """
  if hasattr(opt_state, "opt_state") and not _is_schedule_free(opt_state):
    opt_state = opt_state.opt_state
  pruning_states = [s for s in invariants.states(opt_state) if hasattr(s, "masks")]
  if any(hasattr(s, "master") for s in invariants.states(opt_state)):
    raise ValueError("a schedule-free optimizer inside a master-weight transform evaluates the "
                     "dense master weights; compute its eval point from "
                     "jaxprune.master_params(opt_state) and take the transform's view.")
  free = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_schedule_free)
          if _is_schedule_free(x)]
  if len(free) != 1:
    raise ValueError(f"expected one optax.contrib schedule-free state in `opt_state`, found "
                     f"{len(free)}.")
  state = free[0]
  b1 = jnp.asarray(_array(state.b1))
  y_leaves, treedef = jax.tree.flatten(params)
  z_leaves = [_array(z) for z in jax.tree.leaves(state.z)]
  x = [((y - (1.0 - b1) * z) / b1).astype(jnp.asarray(y).dtype)
       for y, z in zip(y_leaves, z_leaves, strict=True)]
  for s in pruning_states:
    masks = [_array(m) for m in jax.tree.leaves(s.masks)]
    x = [v if jnp.ndim(m) == 0 else jnp.where(m, v, jnp.zeros_like(v))
         for v, m in zip(x, masks, strict=True)]
  return treedef.unflatten(x)


def _array(x):
  """The array of ``x``, unwrapping an ``nnx.Variable`` (as ``nnx.Optimizer`` stores state)."""
  return x if isinstance(x, jax.Array | np.ndarray) or not hasattr(x, "value") else x.value
