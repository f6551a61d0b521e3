"""Drop-in pruning transforms: gradual magnitude, saliency and random pruning; fixed N:M (ASP).

Each transform wraps an inner optimizer and keeps the user's loop unchanged::

    tx = jaxprune.magnitude_pruning(optax.adamw(1e-3), jaxprune.polynomial_schedule(
        0.0, 0.8, begin_step=1_000, end_step=10_000, frequency=100))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)

How the constraint is enforced (the ``optax.keep_params_nonnegative`` trick):
for a selected parameter ``w`` with mask ``M`` and inner update ``u``,

.. math::

    g \\leftarrow M \\odot g, \\qquad
    u' = \\begin{cases} u & M = 1 \\\\ -w & M = 0 \\end{cases}

so ``apply_updates`` lands pruned entries on exactly ``0.0`` and the inner
optimizer's moments never see a gradient for them (as NVIDIA's ASP does). At a
mask-update step the new mask is computed from the current weights (their
score: ``|w|``, ``|w * g|`` or random, before the step's update, as TF-MOT
does; already-pruned weights score lowest) and applied in the same step: the
gradient, the inner update and the weights all see it. Between mask updates
the extra work is elementwise selects that XLA fuses into the optimizer's
update.

The masks live in the state, one ``bool`` per parameter for selected leaves and
a scalar ``True`` for the others, so ``jax.tree.map`` over masks and params
always works (it broadcasts), and checkpoints and sharding of the optimizer
state carry the masks. Put the pruning transform last when chaining: a
transform after it would change the updates and break the invariant; the
state counts such breaks (``PruningState.violations``, read by
:func:`jaxprune.check`), as well as clipped out-of-range sparsities.

``optax.MultiSteps`` around a pruning transform calls it once per real
update, so the schedule counts real updates (with ``every_k_schedule=k``, a
schedule written in mini-steps reaches only step ``t / k``); put
``MultiSteps`` inside instead, ``magnitude_pruning(optax.MultiSteps(adamw,
k), schedule)``, to count mini-steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import _checks, invariants
from jaxprune import masks as masks_lib
from jaxprune import schedules as schedules_lib
from jaxprune import selection as selection_lib

SCOPES = ("layer", "global")

# The largest float32 below 1: where a sparsity >= 1 is clipped to.
_BELOW_ONE = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


class PruningState(NamedTuple):
  """State of a pruning transform.

  Attributes:
    inner_state: the wrapped optimizer's state.
    masks: a tree like params: ``bool`` masks (True = kept) for pruned
      leaves, a scalar ``True`` for the others.
    count: number of ``update`` calls so far (the schedule's step).
    violations: pruned entries of the params given to ``update`` that were
      not exactly 0, summed over steps (int32, saturating); see
      :mod:`jaxprune.invariants` and :func:`jaxprune.check`. None in states
      built by transforms that do not count them.
    clipped: update steps whose sparsity was outside [0, 1) or NaN and was
      clipped (int32, saturating); None where not counted.
  """

  inner_state: optax.OptState
  masks: Any
  count: jax.Array
  violations: jax.Array | None = None
  clipped: jax.Array | None = None


class _Leaf(NamedTuple):
  """What one selected leaf needs to build its mask."""

  path: str
  shape: tuple[int, ...]
  sparsity: float  # the leaf's final target
  axis: int
  in_global: bool  # shares the global threshold


def as_selection(select) -> selection_lib.Selection:
  """``None`` -> the default rule; regex(es) -> ``select(include=...)``."""
  if select is None:
    return selection_lib.select()
  if isinstance(select, selection_lib.Selection):
    return select
  if not (isinstance(select, str) or (isinstance(select, Sequence) and all(
      isinstance(r, str) for r in select))):
    raise ValueError(f"`select` must be None, a jaxprune.select(...), a regex or a list of "
                     f"regexes, got {select!r}.")
  return selection_lib.select(include=select)


def _final_sparsity(schedule) -> float | None:
  final = getattr(schedule, "final_sparsity", None)
  if final is None or not _checks.is_concrete(final):
    return None
  return float(final)


def plan_with_skipped(params, selection, final, structure, scope, *, tile: int | None = None):
  """:func:`plan`, and the layers skipped because their grouping axis cannot be tiled."""
  is_nm = isinstance(structure, masks_lib.NM)
  if tile is None and is_nm:
    tile = structure.m
  planned, skipped = selection_lib.plan_leaves(
      selection, params, m=tile, axis=structure.axis if is_nm else None)
  warn_skipped(skipped)
  specs = selection_lib.specs_of(selection, planned, 0.0 if final is None else final)
  plan = []
  for spec, p in zip(specs, planned, strict=True):
    if spec is None:
      plan.append(None)
      continue
    override = selection.override(spec.path)
    in_global = scope == "global" and (override is None or override.sparsity is None)
    plan.append(_Leaf(spec.path, p.shape, spec.sparsity, spec.axis, in_global))
  return plan, skipped


def plan(params, selection, final, structure, scope, *, tile: int | None = None
         ) -> list[_Leaf | None]:
  """Per-leaf plan, one entry per leaf of ``params``; raises on bad input.

  The hook every transform that prunes goes through (pruners, STE family,
  STEP, QAT): which leaves, each one's final target and grouping axis
  (:func:`jaxprune.selection.plan_leaves`). ``tile``: the size the grouping
  axis must be a multiple of (default: ``m`` for N:M); layers of the default
  selection that it does not divide are skipped and stay dense.
  """
  return plan_with_skipped(params, selection, final, structure, scope, tile=tile)[0]




class SkippedLayerWarning(UserWarning):
  """Layers of the default selection left dense because ``m`` cannot tile their grouping axis."""


def warn_skipped(skipped: Sequence[selection_lib.Skipped]) -> None:
  """One warning line listing the skipped layers (Python shows each distinct line once).

  Raised from :func:`plan`, so every transform that prunes N:M reports it;
  silence it with ``warnings.filterwarnings('ignore', category=SkippedLayerWarning)``.
  """
  if skipped:
    warnings.warn(
        f"jaxprune: {len(skipped)} layer(s) stay dense because their grouping axis cannot be "
        "tiled (as NVIDIA ASP does): " + "; ".join(f"{s.path} {s.shape} ({s.reason})"
                                                   for s in skipped),
        SkippedLayerWarning, stacklevel=3)


def _check_tree(name: str, tree, masks) -> None:
  """Raises if ``tree`` is not shaped like the params the state was built for."""
  if jax.tree.structure(tree) != jax.tree.structure(masks):
    raise ValueError(
        f"`{name}` does not have the tree structure of the params given to `init`:\n"
        f"  init:   {jax.tree.structure(masks)}\n  update: {jax.tree.structure(tree)}")
  paths = selection_lib.leaf_paths(tree)
  for path, x, mask in zip(paths, jax.tree.leaves(tree), jax.tree.leaves(masks), strict=True):
    if jnp.ndim(mask) and jnp.shape(x) != jnp.shape(mask):
      raise ValueError(f"`{name}` leaf {path!r} has shape {jnp.shape(x)} where `init` saw "
                       f"{jnp.shape(mask)}.")


def check_update_args(who: str, updates, params, like) -> None:
  """Raises unless ``params`` is given and both trees are shaped like ``like`` (from init)."""
  if params is None:
    raise ValueError(f"{who}: `update` needs `params`.")
  _check_tree("updates", updates, like)
  _check_tree("params", params, like)


def inner_update(inner, grads, inner_state, params):
  """``inner.update``, then checks that every update has its param's shape.

  Unpruned leaves have no mask that records their shape, so a leaf that
  changed shape since ``init`` is caught here: the inner state still holds the
  old shape and either broadcasts against the new one or fails.
  """
  try:
    updates, inner_state = inner.update(grads, inner_state, params)
  except TypeError as e:
    if "shape" not in str(e):
      raise
    raise ValueError(f"the inner optimizer failed on `params` whose shapes differ from those "
                     f"it saw at `init`; a params leaf changed shape? ({e})") from e
  paths = selection_lib.leaf_paths(params)
  for path, u, p in zip(paths, jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
    if jnp.shape(u) != jnp.shape(p):
      raise ValueError(f"`params` leaf {path!r} has shape {jnp.shape(p)}, but the inner "
                       f"optimizer's update has shape {jnp.shape(u)}: the leaf changed shape "
                       "since `init`.")
  return updates, inner_state


def checked_sparsity(schedule, step) -> tuple[jax.Array, jax.Array]:
  """``(s, clipped)``: the schedule's value at ``step`` in [0, 1) (float32), and if it was clipped.

  A Python or NumPy value outside [0, 1) raises (it is known on the host); a
  traced one (a plain callable of the step, ``inject_hyperparams``) is
  clipped: NaN and negative values to 0, values >= 1 to the largest float32
  below 1 (and the count to keep one weight per layer, see
  :func:`mask_leaves`).
  """
  s = schedule(step)
  if not isinstance(s, jax.Array | jax.core.Tracer):
    try:
      _checks.check_sparsity("sparsity", s)
    except ValueError as e:
      raise ValueError(f"the sparsity schedule {schedule!r} returned {s!r}: {e}") from None
  s = jnp.asarray(s, jnp.float32)
  if s.shape:
    raise ValueError(f"the sparsity schedule must return a scalar, got shape {s.shape}.")
  valid = (s >= 0.0) & (s < 1.0)
  return jnp.where(valid, s, jnp.where(s >= 1.0, _BELOW_ONE, 0.0)), ~valid


def mask_leaves(
    plan: Sequence[_Leaf | None],
    scores: Sequence[jax.Array],
    sparsity: jax.Array,
    final: float | None,
    structure,
    *,
    keep_one: jax.Array | bool = False,
) -> list[jax.Array | None]:
  """New masks for the planned leaves at target ``sparsity`` (None elsewhere).

  Each layer prunes ``round(sparsity / final * k_l)`` weights, where
  ``k_l = round(s_l * size_l)`` is its final count computed exactly on the
  host, so every layer hits its target exactly when the schedule ends.
  Where ``keep_one`` (a clipped sparsity, :func:`checked_sparsity`), at most
  ``size - 1`` are pruned: a layer (or, in global scope, the model) keeps a weight.
  """
  out: list[jax.Array | None] = [None] * len(plan)
  if isinstance(structure, masks_lib.NM):
    for i, leaf in enumerate(plan):
      if leaf is not None:
        mask = masks_lib.nm_mask(scores[i], structure.n, structure.m, axis=leaf.axis)
        out[i] = mask | (sparsity <= 0)
    return out

  def count(target: float, size: int) -> jax.Array:
    if final is None:  # a plain callable schedule: its value is the target.
      k = masks_lib.num_pruned(sparsity, size)
    else:
      fraction = sparsity / final if final > 0 else jnp.zeros_like(sparsity)
      k = jnp.round(fraction * masks_lib.num_pruned(target, size))
    k = jnp.clip(k, 0, size).astype(jnp.int32)
    return jnp.where(keep_one, jnp.minimum(k, size - 1), k)

  shared = [i for i, leaf in enumerate(plan) if leaf is not None and leaf.in_global]
  if shared:
    leaf_scores = [scores[i] for i in shared]
    total = sum(math.prod(plan[i].shape) for i in shared)
    for i, mask in zip(shared, masks_lib.bottom_k_masks(
        leaf_scores, count(plan[shared[0]].sparsity, total)), strict=True):
      out[i] = mask
  for i, leaf in enumerate(plan):
    if leaf is not None and not leaf.in_global:
      out[i] = masks_lib.bottom_k_masks([scores[i]], count(leaf.sparsity, math.prod(leaf.shape)))[0]
  return out


def _scores(score: str, plan, params, grads, key) -> list[jax.Array | None]:
  """float32 scores of the planned leaves (None elsewhere).

  ``'magnitude'``: ``|w|``. ``'saliency'``: ``|w * g|`` with this step's
  gradient, the first-order Taylor estimate of the loss change from removing
  ``w`` (Molchanov et al. 2017; SNIP, Lee et al. 2019, when pruned once at
  step 0). ``'random'``: uniform in [0, 1), a fresh draw per update step.
  """
  out: list[jax.Array | None] = [None] * len(plan)
  for i, leaf in enumerate(plan):
    if leaf is None:
      continue
    w = params[i].astype(jnp.float32)
    if score == "magnitude":
      out[i] = jnp.abs(w)
    elif score == "saliency":
      out[i] = jnp.abs(w * grads[i].astype(jnp.float32))
    else:
      out[i] = jax.random.uniform(jax.random.fold_in(key, i), leaf.shape)
  return out


def _normalized(s: jax.Array) -> jax.Array:
  """:func:`jaxprune.masks.l2_normalized` with the norm over the finite scores only.

  One NaN or inf must not turn a whole layer's scores into NaN (which would
  rank the layer above every other and push all pruning onto the rest);
  non-finite scores stay as they are and rank as the largest.
  """
  finite = jnp.isfinite(s)
  return jnp.where(finite, masks_lib.l2_normalized(jnp.where(finite, s, 0.0)), s)


def masked_update(updates, masks, params):
  """``where(mask, updates, -params)``: lands pruned entries on exactly zero.

  ``p + (-p)`` is exactly ``0.0`` for every finite ``p`` (``-0.0`` included).
  For a NaN or infinite ``p`` no update lands on 0 under ``apply_updates``
  (``p + u`` is NaN or inf for every ``u``); such entries stay non-finite and
  are counted as violations (:mod:`jaxprune.invariants`).
  """
  return jax.tree.map(
      lambda u, m, p: u if m.ndim == 0 else jnp.where(m, u, -p).astype(u.dtype),
      updates, masks, params)


def mask_gradients(grads, masks):
  """Zeroes the gradient of pruned entries (leaves with a scalar mask pass through)."""
  return jax.tree.map(lambda g, m: g if m.ndim == 0 else jnp.where(m, g, 0).astype(g.dtype),
                      grads, masks)


def _pruning_transform(
    inner: optax.GradientTransformation,
    schedule,
    *,
    structure,
    scope: str,
    select,
    normalize: bool,
    score: str = "magnitude",
    seed: int = 0,
) -> optax.GradientTransformation:
  """The shared engine of every pruner here: a score x a structure x a schedule."""
  _checks.check_inner(inner)
  selection = as_selection(select)

  def plan_for(params):
    final = _final_sparsity(schedule)
    if final is not None:
      _checks.check_sparsity("final_sparsity", final)
    if final is None and (selection.distribution != "uniform" or any(
        o.sparsity is not None for _, o in selection.overrides)):
      raise ValueError(
          "ERK and per-parameter sparsity overrides need a schedule with a concrete "
          "`final_sparsity` (e.g. jaxprune.polynomial_schedule), got "
          f"{schedule!r}.")
    return plan_with_skipped(params, selection, final, structure, scope)[0], final

  def init_fn(params):
    plan, _ = plan_for(params)
    checked_sparsity(schedule, jnp.zeros([], jnp.int32))
    leaves, treedef = jax.tree.flatten(params)
    masks = [jnp.ones((), bool) if leaf is None else jnp.ones(jnp.shape(x), bool)
             for leaf, x in zip(plan, leaves, strict=True)]
    zero = jnp.zeros([], jnp.int32)
    return PruningState(inner.init(params), treedef.unflatten(masks), zero, zero, zero)

  def update_fn(updates, state, params=None):
    check_update_args("jaxprune pruning transform", updates, params, state.masks)
    plan, final = plan_for(params)
    step = state.count
    sparsity, clipped = checked_sparsity(schedule, step)
    is_update = schedules_lib.is_update_step(schedule, step)

    def recompute():
      old = jax.tree.leaves(state.masks)
      scores = _scores(score, plan, jax.tree.leaves(params), jax.tree.leaves(updates),
                       jax.random.fold_in(jax.random.key(seed), step))
      for i, leaf in enumerate(plan):
        if leaf is not None:
          if normalize and leaf.in_global:
            scores[i] = _normalized(scores[i])
          # Pruned entries score below every other: they stay pruned as the target grows.
          scores[i] = jnp.where(old[i], scores[i], -1.0)
      fresh = mask_leaves(plan, scores, sparsity, final, structure, keep_one=clipped)
      return jax.tree.structure(state.masks).unflatten(
          [o if f is None else f for o, f in zip(old, fresh, strict=True)])

    # The branch reads only params and masks, which are materialised anyway, so
    # XLA keeps the optimizer update fused on steps without a mask update.
    masks = jax.lax.cond(is_update, recompute, lambda: state.masks)
    grads = mask_gradients(updates, masks)
    updates, inner_state = inner_update(inner, grads, state.inner_state, params)
    updates = masked_update(updates, masks, params)
    return updates, PruningState(
        inner_state, masks, optax.safe_int32_increment(step),
        invariants.saturating_add(state.violations,
                                  invariants.count_violations(state.masks, params)),
        invariants.saturating_add(state.clipped, clipped & is_update))

  return optax.GradientTransformation(init_fn, update_fn)


def magnitude_pruning(
    inner: optax.GradientTransformation,
    sparsity: float | Callable[[Any], Any],
    *,
    structure: masks_lib.Unstructured | masks_lib.NM = masks_lib.UNSTRUCTURED,
    scope: str = "layer",
    select=None,
    normalize: bool = False,
) -> optax.GradientTransformation:
  """Gradual magnitude pruning (Zhu & Gupta 2017) around any optimizer.

  At every update step of the sparsity schedule, each selected layer keeps its
  largest ``|w|`` and prunes exactly ``round(s_l(t) * size_l)`` weights, where
  ``s_l(t) = s(t) * s_l / s_final`` follows the schedule to the layer's target
  ``s_l`` (the global target for a uniform distribution, ERK's share, or an
  override). Pruned weights stay exactly zero afterwards. See the module
  docstring for how the constraint is enforced.

  Args:
    inner: the optimizer to wrap, e.g. ``optax.adamw(1e-3)``.
    sparsity: a float in [0, 1) (pruned once, at step 0) or a schedule
      ``step -> sparsity`` such as :func:`jaxprune.polynomial_schedule`;
      its ``is_update_step`` says when masks are recomputed (a plain
      callable: every step).
    structure: :data:`jaxprune.UNSTRUCTURED` or :func:`jaxprune.nm`. For
      N:M the kept count is fixed by ``n`` and ``m``; the schedule only
      says when masks are recomputed and, by a value of 0, when pruning is
      off.
    scope: ``'layer'`` (each layer its own threshold) or ``'global'`` (one
      threshold across all selected layers without a sparsity override;
      unstructured only).
    select: which parameters, see :func:`jaxprune.select`; a regex or list of
      regexes means ``select(include=...)``. Default: every kernel (never a
      bias, norm scale or embedding, whatever its rank) except the output
      head; for N:M, layers whose grouping axis ``m`` does not divide stay
      dense (a :class:`SkippedLayerWarning`, and listed by
      :func:`jaxprune.sparsity_summary`).
    normalize: with ``scope='global'``, divide each layer's scores by their
      L2 norm first (as JaxPruner's global pruners).

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`PruningState`.
  """
  return _scored_pruning(inner, sparsity, structure=structure, scope=scope, select=select,
                         normalize=normalize, score="magnitude", seed=0)


def saliency_pruning(
    inner: optax.GradientTransformation,
    sparsity: float | Callable[[Any], Any],
    *,
    structure: masks_lib.Unstructured | masks_lib.NM = masks_lib.UNSTRUCTURED,
    scope: str = "layer",
    select=None,
    normalize: bool = False,
) -> optax.GradientTransformation:
  """Pruning by saliency ``|w * g|`` (first-order Taylor) around any optimizer.

  :func:`magnitude_pruning` with the score ``|w * g|``, where ``g`` is the
  gradient given to ``update`` at the mask-update step (the first-order
  estimate of the loss change when ``w`` is removed; Molchanov et al. 2017).
  With a float ``sparsity`` the mask is computed once from the first step's
  gradient: SNIP (Lee et al. 2019), pruning at initialisation. SNIP ranks all
  connections together: ``saliency_pruning(inner, 0.9, scope='global')`` is
  the paper's method; the default ``scope='layer'`` ranks within each layer
  (as google-research/rigl's ``SparseSnipOptimizer`` does). Scores are
  single-batch estimates; already-pruned weights stay pruned (their score is
  below every other). Arguments as :func:`magnitude_pruning`.

  **Per layer by default.** With the default ``scope='layer'`` every layer
  keeps its own fraction ``1 - s`` (the ERK or override share with
  ``select``). The SNIP paper ranks ``|w * g|`` *globally*, across all
  layers, so that layers whose connections matter less lose more; for the
  paper's method pass ``scope='global'``::

      tx = jaxprune.saliency_pruning(optax.sgd(0.1, momentum=0.9), 0.9, scope="global")

  (The recipes' ``config.prune.score='saliency'`` keeps the per-layer
  ranking of their magnitude counterpart, so the two differ only in the score.)
  """
  return _scored_pruning(inner, sparsity, structure=structure, scope=scope, select=select,
                         normalize=normalize, score="saliency", seed=0)


def random_pruning(
    inner: optax.GradientTransformation,
    sparsity: float | Callable[[Any], Any],
    *,
    structure: masks_lib.Unstructured | masks_lib.NM = masks_lib.UNSTRUCTURED,
    select=None,
    seed: int = 0,
) -> optax.GradientTransformation:
  """Random pruning around any optimizer; a float ``sparsity`` is static random sparse training.

  Each selected layer prunes exactly ``round(s_l * size_l)`` weights chosen
  uniformly at random (for N:M, ``n`` random weights kept per group) at the
  schedule's update steps; with a float ``sparsity`` the random mask is drawn
  once, at the first step, and held: the classic random sparse baseline
  (e.g. Liu et al. 2022, "The Unreasonable Effectiveness of Random Pruning"),
  with per-layer sparsities from ``select``'s ``distribution`` (``'erk'``
  gives Erdos-Renyi-Kernel). With a schedule, each update prunes further
  random weights among the surviving ones. The draw depends only on ``seed``
  and the step, so a resumed run draws the same masks.

  Args:
    inner: the optimizer to wrap.
    sparsity: a float in [0, 1) or a schedule, as in :func:`magnitude_pruning`.
    structure: :data:`jaxprune.UNSTRUCTURED` or :func:`jaxprune.nm`.
    select: which parameters, see :func:`jaxprune.select`.
    seed: an integer seed for the random scores.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`PruningState`.
  """
  seed = _checks.check_int("seed", seed)
  return _scored_pruning(inner, sparsity, structure=structure, scope="layer", select=select,
                         normalize=False, score="random", seed=seed)


def _scored_pruning(inner, sparsity, *, structure, scope, select, normalize, score, seed):
  """Validates the arguments shared by the pruners, then builds the transform."""
  if not callable(sparsity):
    _checks.check_sparsity("sparsity", sparsity)
  if scope not in SCOPES:
    raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}.")
  if not isinstance(structure, masks_lib.Unstructured | masks_lib.NM):
    raise ValueError(
        f"`structure` must be jaxprune.UNSTRUCTURED or jaxprune.nm(n, m), got {structure!r}.")
  if isinstance(structure, masks_lib.NM):
    if scope == "global":
      raise ValueError("`scope='global'` needs `structure=UNSTRUCTURED`; N:M is per group.")
    if not callable(sparsity) and _checks.is_concrete(sparsity) and float(sparsity) not in (
        0.0, structure.sparsity):
      raise ValueError(
          f"`sparsity` = {sparsity} contradicts `structure` = {structure!r}, whose sparsity "
          f"is {structure.sparsity}; pass a schedule or {structure.sparsity}.")
  if scope == "global" and as_selection(select).distribution != "uniform":
    raise ValueError("`scope='global'` uses one threshold; `distribution` must be 'uniform'.")
  schedule = schedules_lib.as_schedule(sparsity)
  return _pruning_transform(inner, schedule, structure=structure, scope=scope, select=select,
                            normalize=normalize, score=score, seed=seed)


def nm_pruning(
    inner: optax.GradientTransformation,
    n: int = 2,
    m: int = 4,
    *,
    prune_step: int = 0,
    axis: int | None = None,
    select=None,
) -> optax.GradientTransformation:
  """NVIDIA ASP-style N:M sparsity (Mishra et al. 2021) around any optimizer.

  Dense training until ``prune_step``; at ``prune_step`` each selected
  kernel keeps the ``n`` largest ``|w|`` of every ``m`` consecutive weights
  along ``axis``, and the mask is held for the rest of training, with
  gradients and updates masked so that the inner optimizer's moments cannot
  move pruned weights off zero.

  Args:
    inner: the optimizer to wrap.
    n: weights kept per group, ``1 <= n <= m``.
    m: group size; must divide the grouping axis of every selected leaf.
    prune_step: the step (>= 0) at which the mask is computed.
    axis: the grouping axis for every leaf; ``None``: each layer's innermost
      reduction axis (:mod:`jaxprune.layouts`: ``in`` of a Flax ``(in, out)``
      or Equinox ``(out, in)`` kernel, the input channels of a conv,
      ``head_dim`` of an attention output), which is what 2:4 sparse tensor
      cores need. Per-parameter ``axis`` overrides in ``select`` take
      precedence. Layers of the default selection whose axis ``m`` does not
      divide stay dense, as in ASP.
    select: which parameters, see :func:`jaxprune.select`.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`PruningState`.
  """
  structure = masks_lib.nm(n, m, axis=axis)
  prune_step = _checks.check_step("prune_step", prune_step, minimum=0)
  schedule = schedules_lib.one_shot_schedule(structure.sparsity, prune_step)
  return _pruning_transform(
      inner, schedule, structure=structure, scope="layer", select=select, normalize=False)
