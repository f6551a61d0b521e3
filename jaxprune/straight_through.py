"""Learning masks with dense master weights: STE and SR-STE as drop-in transforms.

Straight-through methods keep dense weights ``W`` and train a model that sees a
compressed *view* of them, e.g. ``view(W) = E(W) * W`` with the N:M mask
``E(W)`` of ``|W|``. The gradient ``g`` is taken at the view and passed
straight through to ``W``. To keep the user's loop unchanged (no call before
the forward pass), the transform keeps ``W`` in its state and emits updates
that move the params onto the next view::

    W_{t+1} = W_t + inner_update(grad_fn(g_t, W_t))
    params_{t+1} = view(W_{t+1})          # emitted as view(W_{t+1}) - params_t

Pruned entries are emitted as ``-params``, so they land on exactly ``0.0``;
kept entries land on ``view(W)`` up to the rounding of ``p + (v - p)``, which
is exact whenever ``p`` and ``v`` are within a factor of two of each other
(Sterbenz), i.e. in every ordinary step.

Read the dense weights with :func:`master_params`; give the model the view of
its freshly initialised params with ``params = tx.view(params)``, so that the
very first forward pass already sees it.

Memory: one dense master copy of the selected parameters (4 bytes per
parameter in float32) and nothing more; masks are recomputed from ``|W|``
every step (one fused pass, see :func:`jaxprune.nm_mask`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune import _checks, pruning
from jaxprune import masks as masks_lib


class MasterWeightsState(NamedTuple):
  """State of a master-weight transform.

  Attributes:
    inner_state: the wrapped optimizer's state (built on the dense weights).
    master: a tree like params: the dense weights of selected leaves, a
      scalar placeholder for the others.
    count: number of ``update`` calls so far.
  """

  inner_state: optax.OptState
  master: Any
  count: jax.Array


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


def _find_state(opt_state) -> MasterWeightsState:
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_state) if _is_state(x)]
  if len(found) != 1:
    raise ValueError(
        f"expected exactly one jaxprune master-weight state in `opt_state`, found {len(found)}.")
  return found[0]


def master_params(opt_state, params=None):
  """The dense master weights held by a master-weight transform.

  Args:
    opt_state: the optimizer state (the transform's own state, or any state
      that contains it, e.g. from ``optax.chain`` or ``nnx.Optimizer``).
    params: the current params; when given, leaves that are not selected are
      taken from it, so the result is a full parameter tree. Without it those
      leaves are scalar placeholders.
  """
  state = _find_state(opt_state)
  if params is None:
    return state.master
  return jax.tree.map(lambda w, p: p if jnp.ndim(w) == 0 and jnp.ndim(p) else w,
                      state.master, params)


def dense_copy(plan, params):
  """The master tree: a copy of each planned leaf, a scalar placeholder for the others."""
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([
      jnp.zeros((), jnp.asarray(x).dtype) if p is None else jnp.array(x, copy=True)
      for p, x in zip(plan, leaves, strict=True)])


def master_weight_transform(
    inner: optax.GradientTransformation,
    *,
    select,
    structure,
    sparsity: float,
    view_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    grad_fn: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
    mask_fn: Callable | None = None,
) -> ViewTransformation:
  """The engine shared by straight-through methods.

  Args:
    inner: the optimizer that updates the dense master weights.
    select: which parameters, see :func:`jaxprune.select`.
    structure: :data:`jaxprune.UNSTRUCTURED` or :func:`jaxprune.nm`.
    sparsity: target for unstructured masks (ignored for N:M).
    view_fn: ``(w, mask, step) -> view`` for one leaf, ``step`` being the
      step at which the view is used in a forward pass.
    grad_fn: ``(g, w, p, step) -> g_w``: the gradient the master receives
      from the gradient ``g`` taken at the view ``p`` (the current params
      leaf); default straight-through ``g``.
    mask_fn: ``(leaf_plan, w, step) -> mask`` to override the structure's
      magnitude mask of ``|w|`` (e.g. for N:M patterns that change with the
      step); default: the structure's mask.
  """
  selection = pruning.as_selection(select)

  def plan_for(params):
    return pruning._plan(params, selection, sparsity, structure, "layer")

  def masks_of(plan, leaves, step):
    if mask_fn is not None:
      return [None if p is None else mask_fn(p, w, step) for p, w in zip(plan, leaves, strict=True)]
    scores = [jnp.abs(w) for w in leaves]
    return pruning._mask_leaves(plan, scores, jnp.float32(sparsity), sparsity, structure, False)

  def view_leaves(plan, leaves, step):
    masks = masks_of(plan, leaves, step)
    return [w if m is None else view_fn(w, m, step) for w, m in zip(leaves, masks, strict=True)]

  @jax.jit
  def view(params):
    plan = plan_for(params)
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten(view_leaves(plan, leaves, jnp.zeros([], jnp.int32)))

  def init_fn(params):
    return MasterWeightsState(
        inner_state=inner.init(params),
        master=dense_copy(plan_for(params), params),
        count=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None):
    pruning.check_update_args("jaxprune master-weight transform", updates, params, state.master)
    plan = plan_for(params)
    step = state.count
    treedef = jax.tree.structure(params)
    p_leaves = jax.tree.leaves(params)
    w_leaves = [p if plan_i is None else w for plan_i, p, w in
                zip(plan, p_leaves, jax.tree.leaves(state.master), strict=True)]
    g_leaves = jax.tree.leaves(updates)
    if grad_fn is not None:
      g_leaves = [g if plan_i is None else grad_fn(g, w, p, step)
                  for plan_i, g, w, p in zip(plan, g_leaves, w_leaves, p_leaves, strict=True)]
    u, inner_state = inner.update(treedef.unflatten(g_leaves), state.inner_state,
                                  treedef.unflatten(w_leaves))
    new_w = [w + d.astype(w.dtype) if plan_i is not None else w
             for plan_i, w, d in zip(plan, w_leaves, jax.tree.leaves(u), strict=True)]
    views = view_leaves(plan, new_w, step + 1)
    # Where the view is 0, v - p = -p exactly, so pruned entries land on 0.0.
    out = [d if plan_i is None else (v - p).astype(p.dtype)
           for plan_i, d, v, p in zip(plan, jax.tree.leaves(u), views, p_leaves, strict=True)]
    master = [m if plan_i is None else w for plan_i, m, w in
              zip(plan, jax.tree.leaves(state.master), new_w, strict=True)]
    return treedef.unflatten(out), MasterWeightsState(
        inner_state, treedef.unflatten(master), optax.safe_int32_increment(step))

  return ViewTransformation(init_fn, update_fn, view)


def is_nonzero(x: jax.Array) -> jax.Array:
  """``x != 0`` on the bit pattern: exact for subnormals, which CPUs compare as zero."""
  bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"int{8 * x.dtype.itemsize}"))
  return bits & jnp.asarray(~(-1 << (8 * x.dtype.itemsize - 1)), bits.dtype) != 0


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
  or Adam (unlike decoupled weight decay). ``E`` is the mask the forward pass
  used, read off the exact zeros of the params (the view of ``W``), which
  also saves recomputing it. As in the reference code
  (aojunzz/NM-sparsity, ``sparse_ops.Sparse.backward``:
  ``grad + decay * (1 - mask) * weight``). PyTorch stores Linear weights as
  ``(out, in)`` and groups along ``in``; for Flax's ``(in, out)`` kernels
  that is axis 0, the default here.

  Args:
    inner: the optimizer of the dense weights (the paper uses SGD momentum).
    n: weights kept per group, ``1 <= n <= m``.
    m: group size.
    decay: the refining weight decay ``lambda_W >= 0`` (2e-4 in the paper).
    axis: the grouping axis; ``None``: the input axis of a Flax kernel.
    select: which parameters, see :func:`jaxprune.select`.

  Memory: one dense float copy of the selected weights; the mask costs
  nothing to store (it is recomputed).
  """
  structure = masks_lib.nm(n, m, axis=axis)
  if not decay >= 0:
    raise ValueError(f"`decay` must be >= 0, got {decay}.")

  def refine(g, w, p, step):
    del step
    # E is the mask of the forward pass, read off the params' exact zeros.
    return g + (decay * jnp.where(is_nonzero(p), jnp.zeros_like(w), w)).astype(g.dtype)

  return master_weight_transform(inner, select=select, structure=structure,
                                 sparsity=structure.sparsity, view_fn=_masked_view,
                                 grad_fn=refine)
