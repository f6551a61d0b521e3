"""Dynamic sparse training: SET (Mocanu et al. 2018) and RigL (Evci et al. 2020).

The network is sparse from the first step, and every ``update_every`` steps
until ``end_step`` some connections are moved: in each selected layer with
``k`` active weights,

.. math::

    f(t) = \\frac{\\alpha}{2} \\left(1 + \\cos \\frac{\\pi t}{T_{end}}\\right), \\qquad
    d = \\min(\\lfloor f(t)\\, k \\rfloor,\\ \\text{size} - k),

the ``d`` active weights with the smallest ``|w|`` are dropped and ``d``
inactive ones are grown: chosen uniformly at random (SET) or those with the
largest ``|g|`` of the dense gradient at that step (RigL). Grown weights start
from zero and the inner optimizer's moments (Adam's ``mu`` and ``nu``,
momentum traces, any float state shaped like the params) are reset to zero for
them, so they do not inherit the stale moments of an earlier life. The active
count of every layer never changes, and the dropped and grown sets are disjoint
(grown weights are picked among the weights inactive *before* the drop; the
paper and its code may regrow a weight just dropped).

Within an update step, as Algorithm 1 of Evci et al. 2020: the drop is decided
on the current weights ``w_t`` and the growth on this step's gradient
``g_t = dL/dw`` at ``w_t`` (the gradient given to ``update``); then the step
is taken with the new mask: kept weights take the inner optimizer's update,
dropped ones land on exactly 0, grown ones start from 0 with freshly zeroed
moments and take their first update. (google-research/rigl's code instead
takes the step with the old mask and decides on the updated weights; that
differs by one optimizer step, and would cost here a materialised copy of the
update on every step.) Everything runs inside ``update`` under ``jit``; the
loop is the unchanged Optax loop.

The initial mask is uniformly random with the layer's exact count (Erdos-Renyi
for SET, uniform or ERK sparsities per layer, :func:`jaxprune.select`). The
first forward pass still sees the dense initial weights; the first update lands
the inactive ones on zero. ``drop_fraction=0`` is static random sparse
training (the same as :func:`jaxprune.random_pruning` at a fixed sparsity).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune import _checks
from jaxprune import masks as masks_lib
from jaxprune import pruning as pruning_lib
from jaxprune import selection as selection_lib

DISTRIBUTIONS = selection_lib.DISTRIBUTIONS


class _Layer(NamedTuple):
  """A selected leaf: its index in the flat params and its exact active count."""

  index: int
  shape: tuple[int, ...]
  active: int


def drop_fraction_schedule(drop_fraction: float, end_step: int) -> optax.Schedule:
  """``f(t) = drop_fraction / 2 * (1 + cos(pi * t / end_step))``, 0 after ``end_step``.

  The cosine decay of Evci et al. 2020 (``optax.cosine_decay_schedule``).
  """
  return optax.cosine_decay_schedule(drop_fraction, end_step)


def connectivity_update(mask: jax.Array, weights: jax.Array, grow_scores: jax.Array,
                        num_drop, num_active) -> jax.Array:
  """Drops the ``num_drop`` active entries of smallest ``|weights|`` and grows as many.

  Grown entries are the inactive ones (``~mask``) with the largest
  ``grow_scores`` (which must be ``>= 0`` or NaN); ties keep the lower flat
  index. Needs ``num_drop <= mask.size - num_active``.

  Args:
    mask: current bool mask with exactly ``num_active`` True entries.
    weights: the weights the drop is decided on.
    grow_scores: non-negative scores of the growth criterion.
    num_drop: int32 scalar (may be traced), ``0 <= num_drop <= size - num_active``.
    num_active: the number of active entries (may be traced).

  Returns:
    The new mask, again with exactly ``num_active`` True entries.
  """
  size = mask.size
  num_drop = jnp.asarray(num_drop, jnp.int32)
  # Scores of -1 put the entries that are not candidates below every candidate.
  drop_scores = jnp.where(mask, jnp.abs(weights).astype(jnp.float32), -1.0)
  kept = masks_lib.bottom_k_masks([drop_scores], size - num_active + num_drop)[0]
  grow = jnp.where(mask, -1.0, grow_scores.astype(jnp.float32))
  grown = masks_lib.bottom_k_masks([grow], size - num_drop)[0]   # the num_drop largest
  return kept | grown


def _stream(seed: int, which: int) -> jax.Array:
  """Independent keys for the initial masks (0) and SET's growth (1); built where used, so
  that constructing a transform touches no device."""
  return jax.random.fold_in(jax.random.key(seed), which)


def _reset_where(tree, grown, like):
  """Zeroes, at the grown positions, every float subtree of ``tree`` shaped like ``like``.

  Subtrees are found by structure (the params' tree structure and leaf
  shapes), so any optimizer's moments are found, at any nesting depth:
  ``optax.chain``, ``inject_hyperparams``, masked weight decay, jaxprune's own
  wrappers.
  """
  treedef = jax.tree.structure(like)
  shapes = [jnp.shape(x) for x in jax.tree.leaves(like)]

  def is_params_like(node) -> bool:
    if jax.tree.structure(node) != treedef:
      return False
    leaves = jax.tree.leaves(node)
    return all(jnp.shape(x) == s and jnp.issubdtype(jnp.result_type(x), jnp.floating)
               for x, s in zip(leaves, shapes, strict=True))

  def reset(node):
    if not is_params_like(node):
      return node
    return jax.tree.map(
        lambda v, g: v if jnp.ndim(g) == 0 else jnp.where(g, jnp.zeros_like(v), v), node, grown)

  return jax.tree.map(reset, tree, is_leaf=is_params_like)


def _dynamic_sparse(
    inner: optax.GradientTransformation,
    sparsity: float,
    *,
    grow: str,
    drop_fraction: float,
    update_every: int,
    end_step: int,
    distribution: str | None,
    select,
    seed: int,
) -> optax.GradientTransformation:
  """The shared engine of :func:`set_pruning` and :func:`rigl`."""
  _checks.check_sparsity("sparsity", sparsity)
  if not (_checks.is_concrete(drop_fraction) and 0.0 <= float(drop_fraction) <= 1.0):
    raise ValueError(f"`drop_fraction` must be in [0, 1], got {drop_fraction!r}.")
  update_every = _checks.check_int("update_every", update_every, minimum=1)
  end_step = _checks.check_int("end_step", end_step, minimum=1)
  seed = _checks.check_int("seed", seed)
  selection = pruning_lib.as_selection(select)
  if distribution is not None:
    if distribution not in DISTRIBUTIONS:
      raise ValueError(f"`distribution` must be one of {DISTRIBUTIONS}, got {distribution!r}.")
    if selection.distribution not in ("uniform", distribution):
      raise ValueError(f"`distribution`={distribution!r} contradicts the selection's "
                       f"distribution {selection.distribution!r}; give only one.")
    selection = dataclasses.replace(selection, distribution=distribution)
  sparsity, drop_fraction = float(sparsity), float(drop_fraction)
  fraction = drop_fraction_schedule(drop_fraction, end_step)

  def layers_of(params) -> list[_Layer]:
    specs = selection_lib.resolve(selection, params, sparsity)
    return [_Layer(i, tuple(jnp.shape(x)),
                   math.prod(jnp.shape(x)) - masks_lib.num_pruned(spec.sparsity, jnp.size(x)))
            for i, (spec, x) in enumerate(zip(specs, jax.tree.leaves(params), strict=True))
            if spec is not None]

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    masks = [jnp.ones((), bool)] * len(leaves)
    for layer in layers_of(params):
      size = math.prod(layer.shape)
      key = jax.random.fold_in(_stream(seed, 0), layer.index)
      masks[layer.index] = masks_lib.random_mask(key, layer.shape, (size - layer.active) / size)
    return pruning_lib.PruningState(
        inner_state=inner.init(params),
        masks=treedef.unflatten(masks),
        count=jnp.zeros([], jnp.int32),
    )

  def grow_scores(layer: _Layer, grad, step):
    if grow == "gradient":
      return jnp.abs(grad)
    key = jax.random.fold_in(jax.random.fold_in(_stream(seed, 1), step), layer.index)
    return jax.random.uniform(key, layer.shape)

  def update_fn(updates, state, params=None):
    pruning_lib.check_update_args(f"jaxprune.{_NAMES[grow]}", updates, params, state.masks)
    layers = layers_of(params)
    step, old = state.count, state.masks

    def reconnect():
      f = fraction(step)
      masks = jax.tree.leaves(old)
      p, g = jax.tree.leaves(params), jax.tree.leaves(updates)
      for layer in layers:
        i = layer.index
        inactive = math.prod(layer.shape) - layer.active
        num_drop = jnp.minimum(jnp.floor(f * layer.active), inactive).astype(jnp.int32)
        masks[i] = connectivity_update(
            masks[i], p[i], grow_scores(layer, g[i], step), num_drop, layer.active)
      return jax.tree.structure(old).unflatten(masks)

    # The branch reads only params, gradients and masks, which exist anyway: deciding on
    # the updated weights w + u instead would materialise u and cost ~0.8x of an Adam step.
    is_update = (step > 0) & (step % update_every == 0) & (step < end_step)
    masks = jax.lax.cond(is_update, reconnect, lambda: old)
    grown = jax.tree.map(lambda new, was: new & ~was if jnp.ndim(new) else jnp.zeros((), bool),
                         masks, old)
    inner_state = _reset_where(state.inner_state, grown, params)
    grads = pruning_lib.mask_gradients(updates, masks)
    inner_updates, inner_state = inner.update(grads, inner_state, params)
    # Kept and grown weights take the inner step (grown ones from 0, with fresh moments);
    # dropped ones land on 0.
    updates = pruning_lib.masked_update(inner_updates, masks, params)
    return updates, pruning_lib.PruningState(inner_state, masks,
                                             optax.safe_int32_increment(step))

  return optax.GradientTransformation(init_fn, update_fn)


_NAMES = {"random": "set_pruning", "gradient": "rigl"}

_ARGS_DOC = """
  Args:
    inner: the optimizer to wrap, e.g. ``optax.adamw(1e-3)``.
    sparsity: target sparsity in [0, 1), held from the first step.
    drop_fraction: ``alpha`` in [0, 1], the fraction of active weights moved
      at step 0 of the cosine decay (0: static random sparse training).
    update_every: steps between connectivity updates (``Delta T``), >= 1.
    end_step: ``T_end`` >= 1; no updates at or after it.
    distribution: ``'uniform'`` or ``'erk'`` per-layer sparsities (default: the
      selection's, uniform); see :func:`jaxprune.erk_sparsities`.
    select: which parameters, see :func:`jaxprune.select`. Default: kernels
      with ``ndim >= 2``, not embeddings or the output head; biases and norms
      stay dense.
    seed: seeds the initial masks and (SET) the random growth.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`jaxprune.PruningState`; its ``masks`` are the current connectivity.
"""


def set_pruning(
    inner: optax.GradientTransformation,
    sparsity: float,
    *,
    drop_fraction: float = 0.3,
    update_every: int = 100,
    end_step: int,
    distribution: str | None = None,
    select=None,
    seed: int = 0,
) -> optax.GradientTransformation:
  return _dynamic_sparse(inner, sparsity, grow="random", drop_fraction=drop_fraction,
                         update_every=update_every, end_step=end_step,
                         distribution=distribution, select=select, seed=seed)


def rigl(
    inner: optax.GradientTransformation,
    sparsity: float,
    *,
    drop_fraction: float = 0.3,
    update_every: int = 100,
    end_step: int,
    distribution: str | None = None,
    select=None,
    seed: int = 0,
) -> optax.GradientTransformation:
  return _dynamic_sparse(inner, sparsity, grow="gradient", drop_fraction=drop_fraction,
                         update_every=update_every, end_step=end_step,
                         distribution=distribution, select=select, seed=seed)


set_pruning.__doc__ = """Sparse Evolutionary Training (Mocanu et al. 2018) around any optimizer.

  Every ``update_every`` steps before ``end_step`` each selected layer drops
  the fraction ``f(t)`` of its active weights with the smallest ``|w|`` and
  regrows as many inactive weights chosen uniformly at random; see the module
  docstring for the exact rule.
""" + _ARGS_DOC

rigl.__doc__ = """RigL, "Rigging the Lottery" (Evci et al. 2020) around any optimizer.

  Every ``update_every`` steps before ``end_step`` each selected layer drops
  the fraction ``f(t)`` of its active weights with the smallest ``|w|`` and
  regrows the inactive weights with the largest ``|g|`` of the dense gradient
  at that step (the gradient given to ``update``, before masking); see the
  module docstring for the exact rule. Wrap the optimizer that sees raw
  gradients: ``rigl(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr)), ...)``.
""" + _ARGS_DOC
