"""Learning masks with dense master weights: STE and SR-STE as drop-in transforms.

Straight-through methods keep dense weights ``W`` and train a model that sees a
compressed *view* of them, e.g. ``view(W) = E(W) * W`` with the N:M mask
``E(W)`` of ``|W|``. The gradient ``g`` is taken at the view and passed
straight through to ``W``. To keep the user's loop unchanged (no call before
the forward pass), the transform keeps ``W`` in its state and emits updates
that move the params onto the next view::

    W_{t+1} = W_t + inner_update(grad_fn(g_t, W_t, view(W_t)))
    params_{t+1} = view(W_{t+1})          # emitted as view(W_{t+1}) - params_t

Pruned entries are emitted as ``-params``, so they land on exactly ``0.0``;
kept entries land on ``view(W)`` up to the rounding of ``p + (v - p)``, which
is exact whenever ``p`` and ``v`` are within a factor of two of each other
(Sterbenz), i.e. in every ordinary step. A transform that needs more (e.g.
quantization-aware training, whose params must stay on a number grid) passes
a ``land_fn`` that checks the landing and counts what it corrects.

**Mixed precision.** The master weights are float32 when the params are
bfloat16 or float16 (:func:`master_dtype`; the layout TPU users need): the
inner optimizer is initialised on, and updates, the float32 master (so Adam's
moments are float32 too), the view is computed in float32 and cast to the
param dtype, and the updates of those params are float32, so that
``optax.apply_updates`` (which adds in float32 and casts back, as
``nnx.Optimizer`` and Flax's ``TrainState`` do) lands kept entries on exactly
the cast view and pruned entries on exactly ``0.0``. (An exact landing then
fails only if an entry shrinks by more than ``2^16`` in one step.) Memory per
selected parameter with bfloat16 params and Adam: 2 B params + 4 B master +
8 B moments = 14 B (float32 params: 4 + 4 + 8 = 16 B; dense AdamW in float32:
12 B). Parameters the transform does not select get the inner optimizer on
the params themselves, in their own dtype.

**Every step derives what it needs from the master.** The view of ``W_t``,
``view(W_t)``, is recomputed at the start of each update: it gives SR-STE its
mask ``E(W_t)`` and it is what the incoming params should be. So the first
update is the method's even without the ``params = tx.view(params)`` line
(whose only job is to give the first forward pass the view); and the state's
``violations`` counts the entries of the incoming params that are not the view
emitted last: all the entries the view changes at step 0 if that line was
left out, and at any step the entries that a transform placed after this one
in ``optax.chain`` moved (put master-weight transforms last). One fused
reduction per leaf; the entries that the previous update itself could not
land exactly (``unlanded``) are not counted.

When the inner optimizer is itself a :class:`ViewTransformation` (e.g.
quantization around SR-STE), the views compose: the inner transform's params
are this transform's master weights, which start from the inner view of the
params, and ``view(params)`` applies the inner view first.

Read the dense weights with :func:`master_params`; give the model the view of
its freshly initialised params with ``params = tx.view(params)``, so that the
very first forward pass already sees it.

Memory: one dense master copy of the selected parameters (4 bytes per
parameter in float32) and nothing more; masks are recomputed from ``|W|``
every step (one fused pass, see :func:`jaxprune.nm_mask`), twice: for the view
of ``W_t`` and of ``W_{t+1}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import _checks, invariants, pruning
from jaxprune import masks as masks_lib


class MasterWeightsState(NamedTuple):
  """State of a master-weight transform.

  Attributes:
    inner_state: the wrapped optimizer's state (built on the dense weights).
    master: a tree like params: the dense weights of selected leaves (in
      :func:`master_dtype`), a scalar placeholder for the others.
    count: number of ``update`` calls so far.
    corrections: for transforms that check where the params land (a
      ``land_fn``, e.g. :func:`jaxprune.quantization`), the number of entries,
      summed over all steps, that did not land on the view; ``None`` for the
      others.
    violations: int32, the number of entries of the incoming params, summed
      over steps (saturating at ``2^31 - 1``), that were not the view this
      transform emitted last (see the module docstring); ``None`` for
      transforms that do not check (those with a ``land_fn``, which count
      their own ``corrections``, and :func:`jaxprune.step_adam`).
    unlanded: int32, the entries of the last update that will not land
      exactly on the view (the rounding of ``p + (v - p)``); the next check
      does not count them as violations. ``None`` where ``violations`` is.
  """

  inner_state: optax.OptState
  master: Any
  count: jax.Array
  corrections: jax.Array | None = None
  violations: jax.Array | None = None
  unlanded: jax.Array | None = None


class ViewTransformation(NamedTuple):
  """An ``optax.GradientTransformation`` whose model sees a view of master weights.

  ``view(params)`` returns the params the model should start from (the view
  of ``params`` at step 0).
  """

  init: Callable
  update: Callable
  view: Callable


def _is_state(x) -> bool:
  return isinstance(x, MasterWeightsState)


def _outermost_states(opt_state) -> list[MasterWeightsState]:
  return [x for x in jax.tree.leaves(opt_state, is_leaf=_is_state) if _is_state(x)]


def master_states(opt_state) -> list[MasterWeightsState]:
  """The master-weight states in ``opt_state``, outermost first, each inside the previous.

  Raises unless there is exactly one at every level (a transform wrapping another, e.g.
  quantization around SR-STE, is a chain of two).
  """
  chain, level = [], opt_state
  while True:
    found = _outermost_states(level)
    if len(found) > 1 or (not found and not chain):
      raise ValueError(
          f"expected exactly one jaxprune master-weight state in `opt_state`, found {len(found)}"
          + (" inside another one." if chain else "."))
    if not found:
      return chain
    chain.append(found[0])
    level = found[0].inner_state


def master_state(opt_state) -> MasterWeightsState:
  """The innermost master-weight state of ``opt_state`` (see :func:`master_states`)."""
  return master_states(opt_state)[-1]




def _is_placeholder(w) -> bool:
  # Selected leaves are never scalars (selection rejects them), so a 0-d master leaf is a
  # placeholder for a leaf that the transform does not hold.
  return jnp.ndim(w) == 0


def master_params(opt_state, params=None):
  """The dense master weights held by a master-weight transform.

  When master-weight transforms are nested (e.g. ``jaxprune.quantization``
  around ``jaxprune.sr_ste``), each parameter is read from the innermost
  transform that holds it: for SR-STE's parameters, SR-STE's dense weights
  (not the sparse, unquantized weights that the quantization keeps between
  the two); for parameters only the outer transform selects, its master.
  Selected leaves are in :func:`master_dtype` (float32 for bfloat16 params).

  Args:
    opt_state: the optimizer state (the transform's own state, or any state
      that contains it, e.g. from ``optax.chain`` or ``nnx.Optimizer``).
    params: the current params; when given, leaves that are not selected are
      taken from it, so the result is a full parameter tree. Without it those
      leaves are scalar placeholders.
  """
  chain = master_states(opt_state)
  master = chain[-1].master
  for outer in reversed(chain[:-1]):
    master = jax.tree.map(lambda w, o: o if _is_placeholder(w) else w, master, outer.master)
  if params is None:
    return master
  return jax.tree.map(lambda w, p: p if _is_placeholder(w) and jnp.ndim(p) else w,
                      master, params)


def master_dtype(dtype) -> np.dtype:
  """The dtype of the master weights of params of ``dtype``.

  float32 for bfloat16, float16 (and narrower floats); the dtype itself for
  float32 and float64.
  """
  return np.dtype(jnp.promote_types(dtype, jnp.float32))


def _upcast(plan, params):
  """``params`` with each planned leaf in its master dtype (the others as they are)."""
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([
      x if p is None else jnp.asarray(x).astype(master_dtype(jnp.asarray(x).dtype))
      for p, x in zip(plan, leaves, strict=True)])


def dense_copy(plan, params):
  """The master tree: a copy of each planned leaf in its :func:`master_dtype`, a scalar
  placeholder for the others."""
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([
      jnp.zeros((), jnp.asarray(x).dtype) if p is None else
      jnp.array(x, dtype=master_dtype(jnp.asarray(x).dtype), copy=True)
      for p, x in zip(plan, leaves, strict=True)])


def _bits(x: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))


def _mismatches(a: jax.Array, b: jax.Array) -> jax.Array:
  """The entries (int32) where ``a`` and ``b`` differ, compared on the bit patterns (so that
  subnormals count, which CPUs compare as zero); ``+0.0`` and ``-0.0`` are equal."""
  ba, bb = _bits(a), _bits(b)
  magnitude = jnp.asarray(np.iinfo(ba.dtype).max >> 1, ba.dtype)
  same = (ba == bb) | ((ba | bb) & magnitude == 0)
  return jnp.sum(~same, dtype=jnp.int32)


def _landing(v: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(u, unlanded)``: the update that moves ``p`` onto ``v`` (``v`` in ``p``'s dtype), in at
  least float32, and the entries where ``p + u``, computed as ``optax.apply_updates`` does
  (in ``u``'s dtype, then cast to ``p``'s), is not ``v``.

  The barrier keeps XLA from simplifying ``p + (v - p)`` to ``v`` in the check.
  """
  dtype = jnp.promote_types(p.dtype, jnp.float32)
  u = v.astype(dtype) - p.astype(dtype)
  landed = (jax.lax.optimization_barrier(p) + u).astype(p.dtype)
  return u, _mismatches(landed, v)


def _check_leaves(plan, params, land_fn, check_leaf) -> None:
  """Raises, naming the parameter, for selected leaves the transform cannot keep exact."""
  for leaf, x in zip(plan, jax.tree.leaves(params), strict=True):
    if leaf is None:
      continue
    dtype = np.dtype(jnp.asarray(x).dtype)
    if land_fn is not None and check_leaf is None and master_dtype(dtype) != dtype:
      raise ValueError(
          f"{leaf.path}: this transform lands the params exactly on a grid (a `land_fn`, e.g. "
          f"quantization-aware training), which needs params in their master dtype "
          f"{master_dtype(dtype)}, got {dtype}; use {master_dtype(dtype)} params or keep the "
          "parameter out of `select`.")
    if check_leaf is not None:
      check_leaf(leaf, dtype)


class _Views(NamedTuple):
  """How a master-weight transform computes the views of its leaves (see the engine's args)."""

  structure: Any
  sparsity: float
  mask_fn: Callable | None
  leaf_view_fn: Callable

  def masks(self, plan, leaves, step):
    if self.mask_fn is not None:
      return [None if p is None else self.mask_fn(p, w, step)
              for p, w in zip(plan, leaves, strict=True)]
    scores = [jnp.abs(w) for w in leaves]
    return pruning.mask_leaves(plan, scores, jnp.float32(self.sparsity), self.sparsity,
                               self.structure)

  def __call__(self, plan, leaves, step):
    """The view of every planned leaf of ``leaves`` at ``step`` (the others unchanged)."""
    masks = self.masks(plan, leaves, step)
    return [w if m is None else self.leaf_view_fn(p, w, m, step)
            for p, w, m in zip(plan, leaves, masks, strict=True)]


def _off_view(plan, p_leaves, views) -> jax.Array:
  """The entries of the planned params that are not their view (one fused reduction each)."""
  return sum((_mismatches(p, v.astype(p.dtype)) for leaf, p, v in
              zip(plan, p_leaves, views, strict=True) if leaf is not None),
             jnp.zeros([], jnp.int32))


def _land(plan, u, views, p_leaves, land_fn, corrections):
  """``(updates, corrections, unlanded)``: the emitted updates that move the planned params
  onto their new views (the inner updates for the others), with the counts of the state."""
  out, unlanded = [], jnp.zeros([], jnp.int32)
  for leaf, d, v, p in zip(plan, u, views, p_leaves, strict=True):
    if leaf is None:
      out.append(d)
    elif land_fn is None:
      # Where the view is 0, v - p = -p exactly, so pruned entries land on 0.0.
      d, misses = _landing(v.astype(p.dtype), p)
      out.append(d)
      unlanded = unlanded + misses
    else:
      d, misses = land_fn(leaf, v, p)
      out.append(d.astype(p.dtype))
      corrections = invariants.saturating_add(corrections, misses)
  return out, corrections, unlanded


def master_weight_transform(
    inner: optax.GradientTransformation,
    *,
    select,
    structure,
    sparsity: float,
    view_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
    grad_fn: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
    mask_fn: Callable | None = None,
    leaf_view_fn: Callable | None = None,
    land_fn: Callable | None = None,
    check_leaf: Callable[[Any, np.dtype], None] | None = None,
) -> ViewTransformation:
  """The engine shared by straight-through methods.

  Args:
    inner: the optimizer that updates the dense master weights; may itself be
      a :class:`ViewTransformation` (see the module docstring).
    select: which parameters, see :func:`jaxprune.select`.
    structure: :data:`jaxprune.UNSTRUCTURED` or :func:`jaxprune.nm`.
    sparsity: target for unstructured masks (ignored for N:M).
    view_fn: ``(w, mask, step) -> view`` for one leaf, ``step`` being the
      step at which the view is used in a forward pass.
    grad_fn: ``(g, w, v, step) -> g_w``: the gradient the master receives
      from the gradient ``g`` taken at the view; ``v = view(w)`` at this step,
      from the master (what the params are when the loop keeps the
      invariant), ``g`` and ``v`` in the master's dtype; default
      straight-through ``g``.
    mask_fn: ``(leaf_plan, w, step) -> mask`` to override the structure's
      magnitude mask of ``|w|`` (e.g. for N:M patterns that change with the
      step); default: the structure's mask.
    leaf_view_fn: ``(leaf_plan, w, mask, step) -> view``, instead of
      ``view_fn``, for views that depend on the leaf (its path or axis).
    land_fn: ``(leaf_plan, v, p) -> (u, misses)``: the update that moves the
      params leaf ``p`` onto its new view ``v`` and the number of entries
      where ``p + u`` is not ``v``; default ``v - p``, not counted. When
      given, the state's ``corrections`` sums the misses, its
      ``violations`` is ``None``, and selected params must be in their
      master dtype (float32, not bfloat16), unless ``check_leaf`` is given:
      then the method says which dtypes its ``land_fn`` lands exactly (QAT
      lands bfloat16 params on bfloat16 grid points).
    check_leaf: ``(leaf_plan, dtype) -> None``, called at ``init`` for every
      selected leaf (after the engine's own checks) so that a method can
      reject what it cannot handle with a ``ValueError`` naming
      ``leaf_plan.path``; ``leaf_plan`` has ``path``, ``shape``, ``axis``
      (the leaf's grouping axis, non-negative) and ``sparsity``.

  The view is computed in the master's dtype and cast to the param dtype (see
  the module docstring for bfloat16 params).
  """
  _checks.check_inner(inner)
  if (view_fn is None) == (leaf_view_fn is None):
    raise ValueError("give exactly one of `view_fn` and `leaf_view_fn`.")
  if leaf_view_fn is None:
    leaf_view_fn = lambda leaf, w, mask, step: view_fn(w, mask, step)  # noqa: E731
  base_view = inner.view if isinstance(inner, ViewTransformation) else None
  selection = pruning.as_selection(select)
  view_leaves = _Views(structure, sparsity, mask_fn, leaf_view_fn)
  checks = land_fn is None   # A grid landing counts its own corrections instead.

  def plan_for(params):
    return pruning.plan(params, selection, sparsity, structure, "layer")

  @jax.jit
  def view(params):
    plan = plan_for(params)
    work = _upcast(plan, params)
    if base_view is not None:
      work = base_view(work)
    leaves, treedef = jax.tree.flatten(work)
    views = view_leaves(plan, leaves, jnp.zeros([], jnp.int32))
    return treedef.unflatten([v.astype(jnp.asarray(p).dtype) for v, p in
                              zip(views, jax.tree.leaves(params), strict=True)])

  def init_fn(params):
    plan = plan_for(params)
    _check_leaves(plan, params, land_fn, check_leaf)
    work = _upcast(plan, params)
    zero = jnp.zeros([], jnp.int32)
    return MasterWeightsState(
        inner.init(work), dense_copy(plan, work if base_view is None else base_view(work)),
        zero, corrections=None if checks else zero, violations=zero if checks else None,
        unlanded=zero if checks else None)

  def update_fn(updates, state, params=None):
    pruning.check_update_args("jaxprune master-weight transform", updates, params, state.master)
    plan, step = plan_for(params), state.count
    treedef, p_leaves = jax.tree.structure(params), jax.tree.leaves(params)
    w_leaves = [p if leaf is None else w for leaf, p, w in
                zip(plan, p_leaves, jax.tree.leaves(state.master), strict=True)]
    g_leaves = [g if leaf is None else g.astype(w.dtype) for leaf, g, w in
                zip(plan, jax.tree.leaves(updates), w_leaves, strict=True)]
    violations = state.violations
    if checks or grad_fn is not None:
      now = view_leaves(plan, w_leaves, step)  # view(W_t), from the master.
    if grad_fn is not None:
      g_leaves = [g if leaf is None else grad_fn(g, w, v, step)
                  for leaf, g, w, v in zip(plan, g_leaves, w_leaves, now, strict=True)]
    if checks:
      off = _off_view(plan, p_leaves, now) - state.unlanded
      violations = invariants.saturating_add(violations, jnp.maximum(off, 0))
    u, inner_state = inner.update(treedef.unflatten(g_leaves), state.inner_state,
                                  treedef.unflatten(w_leaves))
    u = jax.tree.leaves(u)
    new_w = [w if leaf is None else w + d.astype(w.dtype)
             for leaf, w, d in zip(plan, w_leaves, u, strict=True)]
    out, corrections, unlanded = _land(plan, u, view_leaves(plan, new_w, step + 1), p_leaves,
                                       land_fn, state.corrections)
    master = [m if leaf is None else w for leaf, m, w in
              zip(plan, jax.tree.leaves(state.master), new_w, strict=True)]
    return treedef.unflatten(out), MasterWeightsState(
        inner_state, treedef.unflatten(master), optax.safe_int32_increment(step), corrections,
        violations, unlanded if checks else None)

  return ViewTransformation(init_fn, update_fn, view)


def _masked_view(w, mask, step):
  del step
  return jnp.where(mask, w, jnp.zeros_like(w))


def ste(
    inner: optax.GradientTransformation,
    structure: masks_lib.Unstructured | masks_lib.NM,
    *,
    sparsity: float | None = None,
    select=None,
) -> ViewTransformation:
  """Straight-through estimator training of a sparse mask.

  The model sees ``E(W) * W``, where ``E`` is recomputed from ``|W|`` every
  step (N:M or unstructured magnitude), and the gradient at the view is
  passed unchanged to the dense weights ``W``, so pruned weights keep
  learning and can come back.

  Args:
    inner: the optimizer of the dense weights.
    structure: :func:`jaxprune.nm` ``(n, m, axis=...)`` or
      :data:`jaxprune.UNSTRUCTURED`.
    sparsity: for unstructured masks, the fraction pruned per layer, in
      [0, 1); must be left out for N:M.
    select: which parameters, see :func:`jaxprune.select`.
  """
  if isinstance(structure, masks_lib.NM):
    if sparsity is not None:
      raise ValueError("`sparsity` is set by `structure` for N:M; leave it out.")
    sparsity = structure.sparsity
  elif isinstance(structure, masks_lib.Unstructured):
    if sparsity is None:
      raise ValueError("unstructured STE needs `sparsity` in [0, 1).")
    _checks.check_sparsity("sparsity", sparsity)
  else:
    raise ValueError(
        f"`structure` must be jaxprune.UNSTRUCTURED or jaxprune.nm(n, m), got {structure!r}.")
  return master_weight_transform(inner, select=select, structure=structure,
                                 sparsity=float(sparsity), view_fn=_masked_view)


def sr_ste(
    inner: optax.GradientTransformation,
    n: int = 2,
    m: int = 4,
    *,
    decay: float = 2e-4,
    axis: int | None = None,
    select=None,
) -> ViewTransformation:
  """Sparse-refined straight-through estimator (SR-STE), Zhou et al. 2021.

  "Learning N:M Fine-grained Structured Sparse Neural Networks From
  Scratch" (ICLR 2021). The forward pass sees ``E * W`` with ``E`` the N:M
  mask of ``|W|``, recomputed every step. The dense weights receive

  .. math::  \\tilde g = g + \\lambda_W (1 - E) \\odot W

  *before* the inner optimizer, so the refining term passes through momentum
  or Adam (unlike decoupled weight decay). ``E = E(W_t)`` is the mask of the
  forward pass, computed from the master weights (so also at the first step
  when the loop left out ``params = tx.view(params)``). As in the reference code
  (aojunzz/NM-sparsity, ``sparse_ops.Sparse.backward``:
  ``grad + decay * (1 - mask) * weight``). PyTorch stores Linear weights as
  ``(out, in)`` and groups along ``in``; the default here is the same
  reduction axis, read off each layer's layout (:mod:`jaxprune.layouts`).

  Args:
    inner: the optimizer of the dense weights (the paper uses SGD momentum).
    n: weights kept per group, ``1 <= n <= m``.
    m: group size.
    decay: the refining weight decay ``lambda_W >= 0`` (2e-4 in the paper).
    axis: the grouping axis; ``None``: each layer's reduction axis
      (:mod:`jaxprune.layouts`: axis 0 of a Flax ``(in, out)`` kernel, 1 of an Equinox
      ``(out, in)`` weight).
    select: which parameters, see :func:`jaxprune.select`.

  Memory: one dense float32 copy of the selected weights (also for bfloat16
  params, see :mod:`jaxprune.straight_through`); the mask costs nothing to
  store (it is recomputed).
  """
  structure = masks_lib.nm(n, m, axis=axis)
  if not decay >= 0:
    raise ValueError(f"`decay` must be >= 0, got {decay}.")

  def refine(g, w, v, step):
    del step
    # E(W_t) read off the exact zeros of the view of W_t (where E keeps a zero weight the term
    # is 0 either way): the mask of the forward pass, from the master, also at step 0.
    return g + (decay * jnp.where(invariants.is_nonzero(v), jnp.zeros_like(w), w)).astype(
        g.dtype)

  return master_weight_transform(inner, select=select, structure=structure,
                                 sparsity=structure.sparsity, view_fn=_masked_view,
                                 grad_fn=refine)
