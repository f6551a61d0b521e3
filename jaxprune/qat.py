"""Quantization-aware training (QAT) as a drop-in transform, with or without sparsity.

The model trains through fake quantization (Jacob et al. 2018, "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"):
it sees quantized weights, and the gradient taken there passes straight through
the rounding (the straight-through estimator of Bengio, Leonard and Courville
2013, "Estimating or Propagating Gradients Through Stochastic Neurons") to
float master weights ``W`` kept in the optimizer state. With ``Q`` the fake
quantizer below and ``M(s)`` the magnitude mask of scores ``s`` (True = kept),
the view the model sees is

.. math::

   \\text{order 'sq':}\\quad v(W) &= Q(M(|W|) \\odot W)
      \\qquad \\text{(scales computed on the sparse tensor)} \\\\
   \\text{order 'qs':}\\quad v(W) &= M(|Q(W)|) \\odot Q(W)

and each step is that of :func:`jaxprune.master_weight_transform`::

    W_{t+1} = W_t + inner_update(g_t)          # g_t: the gradient at the view
    params_{t+1} = v(W_{t+1})                  # emitted as an update, see below

Harma et al. 2024, "Effective Interplay between Sparsity and Quantization: From
Theory to Practice" (arXiv:2405.20935), show that sparsifying first is the
better order (see :mod:`jaxprune.compress`); ``'qs'`` is there to compare. In
``'qs'`` the mask ranks quantized magnitudes, which tie often: an N:M group keeps
the lower index of a tie (:func:`jaxprune.nm_mask`), an unstructured mask prunes
the higher row-major index first. ``M`` is N:M (``nm=(n, m)``, along the leaf's
axis) or unstructured at ``sparsity``, recomputed from ``|W|`` every step, so
pruned weights keep learning (STE). Sparsity may instead come from the inner
transform (:func:`jaxprune.nm_pruning`, :func:`jaxprune.magnitude_pruning`,
:func:`jaxprune.sr_ste`, ...): it then owns the (sparse) master weights and the
view is ``Q(W)``, whose scales are those of the sparse tensor and whose zeros stay
zeros.

The grid and the landing
------------------------
``Q`` is :func:`jaxprune.quant.quantize` with the int and FP8 scales (and NVFP4's
per-tensor scale) rounded to few significant bits (:mod:`jaxprune.qat_grid`,
:func:`snapped_quantize`; for bfloat16 params ``quantize`` itself), so that the
params can be moved onto the view exactly by an update. Every entry is checked against what
``optax.apply_updates`` will compute, and the rare entries that would miss are
corrected and counted (:mod:`jaxprune.qat_landing`, which also gives the proofs
and the measured counts).

**Guaranteed after every step, for every format** (selected float32 or bfloat16
leaves, values in the normal range): ``quant.quantize(p, fmt, axis=a,
block_size=..., granularity=...) == p`` bit for bit, with ``a`` the leaf's
axis; the sparsity structure holds (pruned entries are exactly ``+0.0``, N:M
groups have at most ``n`` non-zeros, unstructured leaves at least
``round(sparsity * size)`` zeros); and every zero is ``+0.0``.

Composition and master weights
------------------------------
``quantization(inner, ...)`` is a :class:`jaxprune.ViewTransformation`: the
loop is unchanged (``tx.update`` then ``optax.apply_updates``); give the model
its first view with ``params = tx.view(params)``. Put it last in an
``optax.chain``. When the inner transform is itself a master-weight transform
(:func:`jaxprune.sr_ste`, :func:`jaxprune.ste`, :func:`jaxprune.gradient_flow`,
:func:`jaxprune.step_adam`), the views compose: the inner transform's params are
this transform's ``W``, ``view(params) = v(inner.view(params))``, and the state
holds two master-weight states. (A master-weight transform inside an
``optax.chain`` composes from the first update on; for the first view too, pass
``ViewTransformation(chain.init, chain.update, transform.view)``.)
:func:`jaxprune.master_params` then returns, for each parameter, the master of
the innermost transform that holds it (for SR-STE, its dense weights; ``W`` for
parameters only this transform selects). This transform's own ``W`` (sparse, not
quantized) is the ``master`` of the outermost :class:`jaxprune.MasterWeightsState`.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune import _checks, pruning, quant
from jaxprune import masks as masks_lib
from jaxprune import quant_bits as qb
from jaxprune.compress import ORDERS, check_nm
from jaxprune.qat_grid import grid_quantize, scale_bits, snapped_quantize
from jaxprune.qat_landing import land
from jaxprune.straight_through import (
  MasterWeightsState,
  ViewTransformation,
  master_states,
  master_weight_transform,
)

__all__ = ["quantization", "quantization_corrections", "scale_bits", "snapped_quantize"]


class _Settings(NamedTuple):
  """The checked, shape-independent settings of :func:`quantization`."""

  fmt: quant.Format
  order: str
  axis: int | None
  block_size: int | None
  granularity: str | None
  structure: masks_lib.Unstructured | masks_lib.NM
  target: float
  own_sparsity: bool


def _check_settings(inner, fmt, sparsity, nm, order, axis, block_size, granularity) -> _Settings:
  """Construction: checks every setting that does not depend on the params."""
  fmt = quant.get_format(fmt)
  if order not in ORDERS:
    raise ValueError(f"`order` must be one of {ORDERS}, got {order!r}.")
  if sparsity is not None and nm is not None:
    raise ValueError("give either `sparsity` (unstructured) or `nm` (N:M), not both.")
  nm = check_nm(nm)
  if sparsity is not None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
      raise ValueError(f"`sparsity` must be a number in [0, 1), got {sparsity!r}.")
    _checks.check_sparsity("sparsity", sparsity)
    sparsity = float(sparsity)
  if axis is not None:
    axis = _checks.check_int("axis", axis)
  # The shape-independent settings are checked now, on a shape every block size divides.
  size = block_size if isinstance(block_size, numbers.Integral) and block_size > 0 else (
      quant.default_block_size(fmt) or 1)
  probe = quant.make_spec(fmt, (size,), jnp.float32, 0, block_size, granularity, True)
  if order == "qs" and nm is not None and probe.granularity == "block" and (
      probe.block_size % nm[1]):
    raise ValueError(
        f"order='qs' with nm={nm} needs the N:M groups inside the scaling blocks: m = {nm[1]} "
        f"must divide `block_size` = {probe.block_size}, or a block's largest entry could "
        "be pruned and the block's scale would change.")
  own_sparsity = nm is not None or bool(sparsity)
  if isinstance(inner, ViewTransformation):
    _check_inner_sparsity(order, own_sparsity)
  structure = masks_lib.nm(*nm, axis=axis) if nm is not None else masks_lib.UNSTRUCTURED
  target = structure.sparsity if nm is not None else (sparsity or 0.0)
  return _Settings(fmt, order, axis, block_size, granularity, structure, target, own_sparsity)


def _check_inner_sparsity(order: str, own_sparsity: bool) -> None:
  """Raises for the combinations that an inner transform owning sparsity rules out."""
  if order == "qs":
    raise ValueError(
        "order='qs' masks the quantized weights, so the mask must be this transform's "
        "(`sparsity` or `nm`), but the inner transform owns a mask computed on its own float "
        "weights. Use order='sq' with a pruning or master-weight inner (its zeros stay zeros "
        "and the scales are those of the sparse tensor), or a plain inner optimizer with "
        "`sparsity`/`nm` here.")
  if own_sparsity:
    raise ValueError(
        "sparsity comes either from `sparsity`/`nm` here or from the inner transform (a "
        "pruning or master-weight transform), not both.")


def _owns_sparsity(inner_state) -> bool:
  kinds = (pruning.PruningState, MasterWeightsState)
  return any(isinstance(x, kinds)
             for x in jax.tree.leaves(inner_state, is_leaf=lambda x: isinstance(x, kinds)))


def _leaf_spec(settings: _Settings, selection, leaf) -> quant.Spec:
  """The ``quantize`` settings of one selected leaf; raises naming the leaf."""
  leaf_axis = leaf.axis
  override = selection.override(leaf.path)
  if settings.axis is not None and (override is None or override.axis is None):
    leaf_axis = settings.axis
  try:
    return quant.make_spec(settings.fmt, leaf.shape, jnp.float32, leaf_axis, settings.block_size,
                           settings.granularity, True)
  except ValueError as e:
    raise ValueError(f"{leaf.path}: {e}") from None


# ---------------------------------------------------------------------------
# The view: v(W) = Q(M(|W|) W) ('sq') or M(|Q(W)|) Q(W) ('qs').
# ---------------------------------------------------------------------------
def _qs_mask(settings: _Settings, spec: quant.Spec, leaf, w: jax.Array) -> jax.Array:
  """``M(|Q(W)|)``: the mask of order ``'qs'``, ranking quantized magnitudes."""
  scores = [jnp.abs(grid_quantize(w, spec, scale_bits(settings.fmt)))]
  return pruning.mask_leaves([leaf], scores, jnp.float32(settings.target), settings.target,
                             settings.structure)[0]


def _leaf_view(settings: _Settings, spec: quant.Spec, w: jax.Array, mask) -> jax.Array:
  """``v(W)`` of one leaf, given its mask (``True`` where there is no sparsity)."""
  bits = scale_bits(settings.fmt)
  if settings.order == "qs":
    return jnp.where(mask, grid_quantize(w, spec, bits), jnp.zeros_like(w))
  return grid_quantize(jnp.where(mask, w, jnp.zeros_like(w)), spec, bits)


def _view_in(dtype, v: jax.Array, spec: quant.Spec) -> jax.Array:
  """The view ``v`` on the grid of params of ``dtype``: for bfloat16 params, ``v`` rounded to
  bfloat16 and quantized there (a fixed point of ``quantize``; no change if ``v`` is already
  a bfloat16 view)."""
  if dtype != jnp.bfloat16 or v.dtype == jnp.bfloat16:
    return v
  return grid_quantize(qb.to_bfloat16(v), spec, None)


def _check_leaf(spec_of, leaf, dtype) -> None:
  """``init``: a selected leaf is float32 or bfloat16 (the landing keeps both exact: bfloat16
  params land on bfloat16 grid points, :func:`_view_in`) and fits the format's settings."""
  if dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(
        f"{leaf.path}: quantization-aware training needs float32 or bfloat16 params, "
        f"got {dtype}; keep it out of `select` or cast it.")
  spec_of(leaf)


def _engine(inner, settings: _Settings, selection, spec_of) -> ViewTransformation:
  """The master-weight engine with QAT's phases: the mask, the view, the landing."""

  def mask_fn(leaf, w, step):  # the view's mask, when it is not the structure's of |W|
    del step
    if not settings.own_sparsity:
      return jnp.ones((), bool)
    return _qs_mask(settings, spec_of(leaf), leaf, w)

  def leaf_view(leaf, w, mask, step):
    del step
    return _leaf_view(settings, spec_of(leaf), w, mask)

  def land_fn(leaf, v, p):
    spec = spec_of(leaf)
    return land(_view_in(p.dtype, v, spec), p, spec)

  custom_mask = not settings.own_sparsity or settings.order == "qs"
  return master_weight_transform(
      inner, select=selection, structure=settings.structure, sparsity=settings.target,
      mask_fn=mask_fn if custom_mask else None, leaf_view_fn=leaf_view, land_fn=land_fn,
      check_leaf=functools.partial(_check_leaf, spec_of))


def quantization(
    inner: optax.GradientTransformation,
    fmt: str | quant.Format,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    order: str = "sq",
    axis: int | None = None,
    block_size: int | None = None,
    granularity: str | None = None,
    select=None,
) -> ViewTransformation:
  """Quantization-aware training around any optimizer, optionally sparse.

  The model sees ``Q(M(|W|) * W)`` (``order='sq'``) or ``M(|Q(W)|) * Q(W)``
  (``'qs'``) of float master weights ``W`` that the inner optimizer updates
  with the gradient taken at the view (straight-through). The equations, the
  grid (scales rounded to :func:`scale_bits` significant bits) and what is
  guaranteed after every step are in the module docstring of
  :mod:`jaxprune.qat`; in short, every selected parameter is exactly
  representable (``quant.quantize(p, fmt, axis=a, block_size=block_size,
  granularity=granularity) == p`` bit for bit, ``a`` the leaf's axis) and
  has its sparsity structure after every step, and the rare entries that
  cannot land on the view are corrected (a coarser group scale, or 0) and
  counted (:func:`quantization_corrections`).

  Usage::

      tx = jaxprune.quantization(optax.adam(1e-3), "int4", nm=(2, 4))
      # or sparsity from a pruning transform:
      tx = jaxprune.quantization(jaxprune.nm_pruning(optax.adam(1e-3), 2, 4), "mxfp4_e2m1")
      state = tx.init(params)
      params = tx.view(params)                      # the first forward pass sees Q(S(W))
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)

  Args:
    inner: the optimizer of the master weights; may be a pruning transform
      or a master-weight transform (then it owns the sparsity; see the module
      docstring).
    fmt: a name in :data:`jaxprune.quant.FORMATS` (or its ``Format``).
    sparsity: unstructured magnitude sparsity in [0, 1), per leaf (ERK and
      per-parameter overrides through ``select``).
    nm: ``(n, m)``: keep ``n`` of every ``m`` along the leaf's axis.
    order: ``'sq'`` (sparsify, then quantize with the sparse tensor's scales)
      or ``'qs'`` (quantize, then mask by quantized magnitude; needs
      ``sparsity`` or ``nm`` here, not an inner pruning transform, whose mask
      is computed on its own float weights).
    axis: the N:M grouping axis and the axis that channel scales are reduced
      over and blocks run along, for every leaf; ``None``: the input axis of
      a Flax kernel (0 for ``(in, out)``, ``ndim - 2`` for HWIO), where MX
      blocks and 2:4 groups run along the dot product. Per-parameter ``axis``
      overrides in ``select`` take precedence.
    block_size: elements per block (MX default 32, NVFP4 16); must divide the axis of
      every selected leaf.
    granularity: ``'tensor'``, ``'channel'`` or ``'block'``, as in
      :func:`jaxprune.quant.quantize` (default ``'tensor'``, or ``'block'``
      with ``block_size`` and for MX).
    select: which parameters, see :func:`jaxprune.select` (default: kernels,
      not embeddings or the output head).

  Returns:
    A :class:`jaxprune.ViewTransformation` whose state is a
    :class:`jaxprune.MasterWeightsState` (with ``corrections``).

  Raises:
    ValueError: at construction for an unknown ``fmt`` (listing the valid
      names), an ``order`` other than ``'sq'``/``'qs'``, both ``sparsity``
      and ``nm``, ``sparsity`` outside [0, 1), a bad ``nm``, inconsistent
      ``granularity``/``block_size``, ``order='qs'`` with ``nm`` and blocks
      that ``m`` does not divide, or a master-weight ``inner`` (which owns
      sparsity) with ``sparsity``/``nm`` or ``order='qs'``; at ``init`` for a
      selected leaf that is not float32 or bfloat16 or whose axis the block size does not
      divide (naming the leaf), and for a pruning transform found in the inner
      state with ``sparsity``/``nm`` or ``order='qs'``.
  """
  settings = _check_settings(inner, fmt, sparsity, nm, order, axis, block_size, granularity)
  selection = pruning.as_selection(select)
  spec_of = functools.partial(_leaf_spec, settings, selection)

  tx = _engine(inner, settings, selection, spec_of)

  def plan_of(params):
    return pruning.plan(params, selection, settings.target, settings.structure, "layer")

  def init_fn(params):
    state = tx.init(params)
    if _owns_sparsity(state.inner_state):
      _check_inner_sparsity(settings.order, settings.own_sparsity)
    return state

  @jax.jit
  def view(params):
    # With float32 masters for bfloat16 params the engine computes the view in float32 and
    # casts it: quantized again in bfloat16, it is on the grid (a no-op if it already was).
    views = jax.tree.leaves(tx.view(params))
    return jax.tree.structure(params).unflatten([
        v if leaf is None or v.dtype != jnp.bfloat16 else grid_quantize(v, spec_of(leaf), None)
        for leaf, v in zip(plan_of(params), views, strict=True)])

  return ViewTransformation(init_fn, tx.update, view)


def quantization_corrections(opt_state) -> jax.Array:
  """Entries whose params did not land on the view, summed over steps (:mod:`jaxprune.qat`).

  Each was corrected instead (its group given a coarser scale, or landed on 0).

  Args:
    opt_state: the state of :func:`quantization`, or any state that contains
      it (``optax.chain``, ``nnx.Optimizer``'s ``opt_state``).

  Returns:
    An int32 scalar (saturating at ``2^31 - 1``), summed over nested
    quantization transforms.
  """
  counts = [jnp.asarray(s.corrections) for s in master_states(opt_state)
            if s.corrections is not None]
  if not counts:
    raise ValueError("`opt_state` holds no jaxprune.quantization state.")
  return sum(counts[1:], counts[0])
