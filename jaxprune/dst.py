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
moments and take their first update. Everything runs inside ``update`` under
``jit``; the loop is the unchanged Optax loop.

The reference implementations order this differently. The original RigL
(google-research/rigl, ``rigl/sparse_optimizers_base.py``,
``SparseRigLOptimizerBase.apply_gradients``) takes *no* gradient step on an
update iteration: it only changes the masks, and TensorFlow's global step is
not incremented, so the next batch takes the step of the same global step.
SET there (``SparseSETOptimizerBase``) and ``rigl_tf2`` (``train.py``) take the
step first and decide on the updated weights (here that would cost a
materialised copy of the update on every step). :func:`rigl` with
``convention='reference'`` reproduces the original RigL.

The initial mask is uniformly random with the layer's exact count (Erdos-Renyi
for SET, uniform or ERK sparsities per layer, :func:`jaxprune.select`). The
first forward pass still sees the dense initial weights; the first update lands
the inactive ones on zero. ``drop_fraction=0`` is static random sparse
training (the same as :func:`jaxprune.random_pruning` at a fixed sparsity).

The state is a :class:`jaxprune.PruningState`. Its ``violations`` counts, at
every update from the second on, the inactive entries of the incoming params
that are not exactly 0 (a transform chained after this one, or params edited
outside the optimizer), summed over steps (:mod:`jaxprune.invariants`); read
it with :func:`jaxprune.check`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune import _checks, invariants
from jaxprune import masks as masks_lib
from jaxprune import pruning as pruning_lib
from jaxprune import selection as selection_lib

DISTRIBUTIONS = selection_lib.DISTRIBUTIONS

#: :func:`rigl`'s conventions. ``'algorithm1'`` (default): the module docstring's rule
#: (updates at ``0 < t < end_step``, drop and growth disjoint, a step on every call).
#: ``'reference'``: google-research/rigl's ``SparseRigLOptimizer`` (see :func:`rigl`).
CONVENTIONS = ("algorithm1", "reference")

#: Standard deviation of the noise the reference adds to the drop scores.
DROP_NOISE_STD = 1e-5


class _Layer(NamedTuple):
  """A selected leaf: its index in the flat params and its exact active count."""

  index: int
  shape: tuple[int, ...]
  active: int


def _active_layer(name: str, index: int, spec, x) -> _Layer:
  """The layer's :class:`_Layer`; raises, naming it, if its target leaves no active weight."""
  size = math.prod(jnp.shape(x))
  active = size - masks_lib.num_pruned(spec.sparsity, size)
  if active < 1:
    raise ValueError(
        f"jaxprune.{name}: {spec.path} (shape {tuple(jnp.shape(x))}) would keep no active "
        f"weight: sparsity {spec.sparsity:g} prunes round({spec.sparsity:g} * {size}) = {size} "
        f"of its {size} entries. Give it a lower sparsity (select(overrides={{{spec.path!r}: "
        "{'sparsity': s}})) or leave it out of `select`.")
  return _Layer(index, tuple(jnp.shape(x)), active)


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
  """Independent keys for the initial masks (0), SET's growth (1) and the reference's drop
  noise (2); built where used, so that constructing a transform touches no device."""
  return jax.random.fold_in(jax.random.key(seed), which)


def drop_noise(seed: int, step, index: int, shape) -> jax.Array:
  """The ``N(0, 1e-5^2)`` noise that ``convention='reference'`` adds to the drop scores of
  leaf ``index`` (its position in the flat params) at global step ``step``."""
  key = jax.random.fold_in(jax.random.fold_in(_stream(seed, 2), step), index)
  return DROP_NOISE_STD * jax.random.normal(key, shape, jnp.float32)


def reference_connectivity_update(mask: jax.Array, weights: jax.Array, grow_scores: jax.Array,
                                  noise: jax.Array, num_drop) -> jax.Array:
  """google-research/rigl's ``_get_update_op``: the new mask.

  Drop scores are ``|mask * weights| + noise`` over *all* entries; the
  ``k - num_drop`` largest are kept (``k`` active entries). Growth picks the
  ``num_drop`` largest ``grow_scores`` among all entries not kept, so a weight
  just dropped may come back (active before and after: its value and moments
  are kept). Ties keep the lower flat index (TensorFlow's ``top_k``).
  """
  size, num_drop = mask.size, jnp.asarray(num_drop, jnp.int32)
  num_active = jnp.sum(mask, dtype=jnp.int32)
  drop_scores = jnp.abs(jnp.where(mask, weights, 0).astype(jnp.float32)) + noise
  kept = masks_lib.bottom_k_masks([drop_scores], size - num_active + num_drop)[0]
  grow = jnp.where(kept, -1.0, grow_scores.astype(jnp.float32))
  grown = masks_lib.bottom_k_masks([grow], size - num_drop)[0]
  return kept | grown


def _violations(state: pruning_lib.PruningState, params) -> jax.Array:
  """``state.violations`` plus the inactive entries of ``params`` that are not exactly 0.

  Checked against the masks the previous update landed, from the second
  update on: the first forward pass sees the dense initial weights, which the
  first update lands on the initial mask (see the module docstring).
  """
  found = invariants.count_violations(state.masks, params)
  return invariants.saturating_add(state.violations, jnp.where(state.count > 0, found, 0))


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
    convention: str = "algorithm1",
) -> optax.GradientTransformation:
  """The shared engine of :func:`set_pruning` and :func:`rigl`."""
  _checks.check_inner(inner)
  if convention not in CONVENTIONS:
    raise ValueError(f"`convention` must be one of {CONVENTIONS}, got {convention!r}.")
  _checks.check_sparsity("sparsity", sparsity)
  if not (_checks.is_concrete(drop_fraction) and 0.0 <= float(drop_fraction) <= 1.0):
    raise ValueError(f"`drop_fraction` must be in [0, 1], got {drop_fraction!r}.")
  update_every = _checks.check_int("update_every", update_every, minimum=1)
  end_step = _checks.check_step("end_step", end_step, minimum=1)
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
    return [_active_layer(_NAMES[grow], i, spec, x)
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
        violations=jnp.zeros([], jnp.int32),
    )

  def grow_scores(layer: _Layer, grad, step):
    if grow == "gradient":
      return jnp.abs(grad)
    key = jax.random.fold_in(jax.random.fold_in(_stream(seed, 1), step), layer.index)
    return jax.random.uniform(key, layer.shape)

  if convention == "reference":
    return optax.GradientTransformation(init_fn, _reference_update_fn(
        inner, layers_of, fraction, update_every, end_step, seed))

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
                                             optax.safe_int32_increment(step),
                                             _violations(state, params))

  return optax.GradientTransformation(init_fn, update_fn)


def _reference_schedule(count, update_every: int, end_step: int):
  """``(is_update, global_step)`` of call ``count`` under the reference's step counting.

  Mask updates happen at global steps ``0, f, 2f, ... <= end_step`` (``f =
  update_every``), each on a call of its own that does not increment the
  global step, so the ``k``-th update is call ``k (f + 1)``.
  """
  period, num_updates = update_every + 1, end_step // update_every + 1
  is_update = (count % period == 0) & (count // period < num_updates)
  done = jnp.minimum((count + period - 1) // period, num_updates)  # update calls before this one
  return is_update, count - done


def _reference_update_fn(inner, layers_of, fraction, update_every, end_step, seed):
  """``update`` of ``rigl(..., convention='reference')``."""

  def update_fn(updates, state, params=None):
    pruning_lib.check_update_args("jaxprune.rigl", updates, params, state.masks)
    layers = layers_of(params)
    is_update, step = _reference_schedule(state.count, update_every, end_step)

    def reconnect():
      f = fraction(step)
      masks = jax.tree.leaves(state.masks)
      p, g = jax.tree.leaves(params), jax.tree.leaves(updates)
      for layer in layers:
        i = layer.index
        num_drop = (f * layer.active).astype(jnp.int32)  # float32, truncated: the reference's cast
        masks[i] = reference_connectivity_update(masks[i], p[i], jnp.abs(g[i]),
                                                 drop_noise(seed, step, i, layer.shape), num_drop)
      return jax.tree.structure(state.masks).unflatten(masks)

    masks = jax.lax.cond(is_update, reconnect, lambda: state.masks)
    grown = jax.tree.map(lambda new, was: new & ~was if jnp.ndim(new) else jnp.zeros((), bool),
                         masks, state.masks)
    stepped, inner_stepped = inner.update(pruning_lib.mask_gradients(updates, masks),
                                          state.inner_state, params)
    # An update call takes no step: the masks change, new connections start at 0 with zeroed
    # moments, and the inner state does not advance; the other calls are the masked step.
    inner_state = jax.tree.map(lambda a, b: jnp.where(is_update, a, b),
                               _reset_where(state.inner_state, grown, params), inner_stepped)
    stepped = jax.tree.map(lambda u: jnp.where(is_update, jnp.zeros_like(u), u), stepped)
    updates = pruning_lib.masked_update(stepped, masks, params)
    updates = jax.tree.map(lambda u, g, p: jnp.where(g, -p, u).astype(u.dtype) if jnp.ndim(g)
                           else u, updates, grown, params)   # new connections start at 0
    return updates, pruning_lib.PruningState(inner_state, masks,
                                             optax.safe_int32_increment(state.count),
                                             _violations(state, params))

  return update_fn


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
    :class:`jaxprune.PruningState`; its ``masks`` are the current connectivity,
    its ``violations`` the invariant counter (see the module docstring).
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
    convention: str = "algorithm1",
) -> optax.GradientTransformation:
  return _dynamic_sparse(inner, sparsity, grow="gradient", drop_fraction=drop_fraction,
                         update_every=update_every, end_step=end_step,
                         distribution=distribution, select=select, seed=seed,
                         convention=convention)


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

  ``convention='reference'`` follows google-research/rigl's
  ``SparseRigLOptimizer`` (``rigl/sparse_optimizers_base.py``) instead:

  * updates at global steps ``0, f, 2f, ... <= end_step`` (one at step 0),
    each on a call of its own that takes *no* gradient step (the inner
    optimizer's state does not advance) and does not advance the global step:
    the ``k``-th update is call ``k (update_every + 1)``, and the drop
    fraction and the noise use the global step ``k * update_every``;
  * ``d = int(f(t) k)`` (no cap); the drop scores are ``|w| + N(0, 1e-5^2)``
    over all entries (:func:`drop_noise`), the ``k - d`` largest are kept;
  * growth takes the ``d`` largest ``|g|`` among all entries not kept, so a
    weight dropped in this update may be regrown, keeping its value and its
    moments; only connections that were inactive start from 0 with zeroed
    moments (the reference's ``grow_init='zeros'``, ``initial_acc_scale=0``).

  Tested against a port of the reference's update on the same weights,
  gradients and noise (``tests/test_dst.py``): the same masks, params within
  2e-7 (float32 rounding) over 18 calls. The noise is drawn with JAX's
  generator, not TensorFlow's stateless one, and where ``f(t) k`` is an integer
  the float32 cosine may truncate to one weight fewer or more than TF's.
  The reference's model is masked from its first forward pass;
  here the first forward pass sees the params as given (mask them first to
  match it).
""" + _ARGS_DOC.replace("""    seed: seeds the initial masks and (SET) the random growth.
""", """    seed: seeds the initial masks and (SET) the random growth.
    convention: ``'algorithm1'`` (default) or ``'reference'`` (which also updates
      at ``end_step`` itself), see above.
""")
