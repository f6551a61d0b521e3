"""Sparsity then quantization: S->Q and Q->S, their errors, and a compressed export.

Harma et al. 2024, "Effective Interplay between Sparsity and Quantization: From
Theory to Practice" (https://arxiv.org/abs/2405.20935), show that magnitude
sparsity ``S`` and max-scaled quantization ``Q`` are not orthogonal (their errors
compound) and that sparsifying first is the optimal order. With ``M(s)`` the
magnitude mask of scores ``s`` (True = kept):

.. math::

   \\mathrm{SQ}(x) &= M(|x|) \\odot Q(M(|x|) \\odot x)
      \\qquad \\text{(scales computed on the sparse tensor)} \\\\
   \\mathrm{QS}(x) &= M(|Q(x)|) \\odot Q(x)

**Why S->Q wins** (the paper's theorem, here for the L1 error ``||x - C(x)||_1``,
the norm of the worked example in the tests, then for every ``L_p``). Let every sparsity group (an
N:M group, or the whole tensor for unstructured sparsity) lie inside one scaling
group of ``Q`` (a block, channel or the whole tensor; for NVFP4 a block of 16, and
the tensor holds every group). The group's largest
``|x|`` is kept, so ``Q`` sees the same ``amax``, the same scale, in both
orders. Keeping ``x_i`` instead of pruning it changes the
L1 error by ``-g(|x_i|)`` with

.. math::  g(a) = a - |a - Q(a)|,

which is continuous and nondecreasing in ``a`` for a round-to-nearest,
sign-symmetric ``Q`` (flat at ``Q(a)`` while ``a`` rounds down, slope 2 while
it rounds up). The top-``n`` by ``|x|`` (S->Q) therefore gain at least as much as
any other ``n`` entries (Q->S's top-``n`` by ``|Q(x)|``), so
``||x - SQ(x)||_1 <= ||x - QS(x)||_1``. The same argument with
``g_p(a) = a^p - |a - Q(a)|^p`` gives every ``L_p`` norm, ``p >= 1``. It does
*not* cover unstructured sparsity with per-block or per-channel scales: there
each scaling group has its own ``g``, and Q->S can win (see the tests).

Conventions of :func:`compress`:

* Pruned entries are exactly ``+0.0`` and every zero of the output is ``+0.0``
  (``quantize`` keeps the sign of a value that rounds to zero; a stored integer
  code has no ``-0``, and :func:`decompress` must match bit for bit).
* Ties: quantized values tie often, so Q->S leans on the tie rules of
  :mod:`jaxprune.masks`: in an N:M group the *lower* index along ``axis`` is kept;
  in an unstructured mask, among magnitudes equal to the threshold the *higher*
  row-major flat index is pruned first. S->Q uses the same rules on ``|x|``.
* NaN or +-inf: nothing is dropped silently. The masks rank NaN above every
  number (IEEE totalOrder) and +-inf above every finite value, so they are
  kept, and ``quantize`` makes its whole scaling group NaN. So the output is NaN
  at every kept entry whose scaling group holds a non-finite input, and ``+0.0``
  at pruned entries. :func:`error_analysis` and :func:`export_compressed` raise
  on non-finite leaves instead.

The per-layer error analysis is in :mod:`jaxprune.compress_errors`, the compressed
storage format (:func:`export_compressed`, :func:`save_compressed`) in
:mod:`jaxprune.compress_storage` and its size report in :mod:`jaxprune.compress_sizes`;
their public names can also be imported from here.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _checks, quant
from jaxprune import masks as masks_lib
from jaxprune import quant_bits as qb
from jaxprune import selection as selection_lib
from jaxprune.pruning import as_selection

ORDERS = ("sq", "qs")
QUANT_DEFAULTS = ("even", "absmax")  # quant.quantize's default `round` and `convention`

Quantizer = Callable[[jax.Array], jax.Array]
FormatLike = str | quant.Format | Quantizer | None


# ---------------------------------------------------------------------------
# compress: S->Q and Q->S.
# ---------------------------------------------------------------------------
def uniform_quantize(x: jax.Array, step: float) -> jax.Array:
  """Rounds ``x`` to the uniform grid ``step * Z``: ``Q(x) = step * RNE(x / step)``.

  No clipping and a fixed step (no scale from the data), as in the paper's
  worked examples; exact when ``step`` is a power of two. Pass it to
  :func:`compress` as ``fmt=functools.partial(uniform_quantize, step=0.25)``.
  Its gradient is zero almost everywhere (no straight-through estimator).
  """
  x = jnp.asarray(x)
  # float32: a correctly rounded division on every backend (XLA may multiply by 1 / step).
  q = qb.divide(x, step) if x.dtype == jnp.float32 else x / step
  return (jnp.round(q) * step).astype(x.dtype)


def _resolve_fmt(fmt: FormatLike) -> quant.Format | Quantizer | None:
  if fmt is None or (callable(fmt) and not isinstance(fmt, quant.Format)):
    return fmt
  return quant.get_format(fmt)


def check_nm(nm) -> tuple[int, int] | None:
  """``nm`` as a checked pair ``(n, m)`` of ints, or None; raises ``ValueError`` otherwise."""
  if nm is None:
    return None
  if isinstance(nm, str) or not isinstance(nm, Sequence) or len(nm) != 2:
    raise ValueError(f"`nm` must be a pair (n, m), got {nm!r}.")
  return _checks.check_nm(*nm)


def _check_args(dtype, fmt, sparsity, nm, order, block_size, granularity, options):
  """Validates :func:`compress`'s arguments; returns ``(fmt, nm)`` normalised.

  ``options``: ``round`` and ``convention``, which need a named ``fmt`` unless default.
  """
  if order not in ORDERS:
    raise ValueError(f"`order` must be one of {ORDERS}, got {order!r}.")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"compress expects floating-point input, got dtype {dtype}.")
  if sparsity is not None and nm is not None:
    raise ValueError("give either `sparsity` (unstructured) or `nm` (N:M), not both.")
  fmt = _resolve_fmt(fmt)
  nm = check_nm(nm)
  if sparsity is not None:
    _checks.check_sparsity("sparsity", sparsity)
  if fmt is None and sparsity is None and nm is None:
    raise ValueError("nothing to do: give a `fmt`, a `sparsity` or an `nm`.")
  if not isinstance(fmt, quant.Format) and (block_size is not None or granularity is not None
                                            or options != QUANT_DEFAULTS):
    raise ValueError("`block_size`, `granularity`, `round` and `convention` are settings of a "
                     f"named `fmt`, got fmt={fmt!r}.")
  return fmt, nm


def _settings(shape, dtype, fmt, nm, axis, block_size, granularity, options=QUANT_DEFAULTS):
  """``(axis, block_size, granularity)`` checked and resolved as ``quant.quantize`` does.

  Resolving here gives equal settings equal jit cache keys, in :func:`compress`
  and in the export alike.
  """
  ndim = len(shape)
  axis = _checks.check_int("axis", axis)
  if nm is not None:
    axis = masks_lib.check_nm_axis(shape, nm[1], axis, "x")
  elif -ndim <= axis < ndim:
    axis %= ndim
  if isinstance(fmt, quant.Format):
    spec = quant.make_spec(fmt, shape, dtype, axis, block_size, granularity, True, *options)
    block_size, granularity = spec.block_size or None, spec.granularity
  return axis, block_size, granularity


def _mask(scores: jax.Array, sparsity, nm, axis: int) -> jax.Array | None:
  """The magnitude mask of one structure (True = kept), or None without sparsity."""
  if nm is not None:
    return masks_lib.nm_mask(scores, *nm, axis=axis)
  if sparsity is not None:
    return masks_lib.magnitude_mask(scores, sparsity)
  return None


def _mask_of(x: jax.Array, sparsity, nm, axis: int) -> jax.Array | None:
  return _mask(jax.lax.stop_gradient(jnp.abs(x)), sparsity, nm, axis)


def _kept_or_zero(y: jax.Array, mask: jax.Array | None) -> jax.Array:
  """``y`` where ``mask``, else ``+0.0``; ``-0.0`` becomes ``+0.0`` too (compared on bits)."""
  uint = jnp.dtype(f"uint{8 * y.dtype.itemsize}")
  b = jax.lax.bitcast_convert_type(y, uint)
  zero = b == np.array(1 << (8 * y.dtype.itemsize - 1), uint)
  if mask is not None:
    zero = zero | ~mask
  return jnp.where(zero, jnp.zeros_like(y), y)


# The mask and the quantizer are jitted apart so that each compiles once per shape and setting
# and is shared by both orders and by every pairing of a structure with a format.
_mask_of_jit = jax.jit(_mask_of, static_argnums=(1, 2, 3))
_quantize_jit = jax.jit(quant.quantize, static_argnames=(
    "fmt", "axis", "block_size", "granularity", "symmetric", "round", "convention"))
_kept_or_zero_jit = jax.jit(_kept_or_zero)


def _compress_and_mask(x, fmt, sparsity, nm, axis, order, block_size, granularity,
                       options=QUANT_DEFAULTS):
  """:func:`compress` on checked, resolved arguments; also returns the mask (or None).

  A Python-number (or None) ``sparsity`` is a static jit argument; a traced one is not.
  ``options``: ``(round, convention)`` of ``quant.quantize``.
  """
  if sparsity is None or isinstance(sparsity, numbers.Real):
    mask_of = functools.partial(_mask_of_jit, sparsity=None if sparsity is None else
                                float(sparsity), nm=nm, axis=axis if nm else 0)
  else:
    mask_of = functools.partial(_mask_of, sparsity=sparsity, nm=nm, axis=axis)
  if isinstance(fmt, quant.Format):
    q = functools.partial(_quantize_jit, fmt=fmt, axis=0 if granularity == "tensor" else axis,
                          block_size=block_size, granularity=granularity, round=options[0],
                          convention=options[1])
  else:
    q = fmt
  if order == "sq":
    mask = mask_of(x)
    y = x if mask is None else jnp.where(mask, x, jnp.zeros_like(x))
    y = y if q is None else q(y)
  else:
    y = x if q is None else q(x)
    mask = mask_of(y)
  return _kept_or_zero_jit(y, mask), mask


def compress(
    x: jax.Array,
    fmt: FormatLike,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    axis: int = -1,
    order: str = "sq",
    block_size: int | None = None,
    granularity: str | None = None,
    round: str = "even",
    convention: str = "absmax",
) -> jax.Array:
  """Magnitude sparsity and fake quantization of ``x``, in either order.

  ``order='sq'`` (sparsify, then quantize; the optimal order, see the module
  docstring): ``M(|x|) * Q(M(|x|) * x)``, so the scales are those of the sparse
  tensor and pruned entries stay exactly 0. ``order='qs'``:
  ``M(|Q(x)|) * Q(x)``, the mask ranks the *quantized* magnitudes, which often
  tie: N:M keeps the lower index of a tie, unstructured prunes the higher
  row-major index first (:mod:`jaxprune.masks`). Every zero of the result is
  ``+0.0``. Jittable with the keyword arguments static (``sparsity`` may be
  traced). The gradient is ``mask`` (straight through the quantizer).

  Args:
    x: floating-point array.
    fmt: a name in ``quant.FORMATS`` or its ``quant.Format`` (unknown names
      raise ``quant.get_format``'s error), a callable quantizer such as
      ``functools.partial(uniform_quantize, step=0.25)``, or ``None`` to only
      sparsify.
    sparsity: unstructured: prune exactly ``round(sparsity * x.size)`` entries,
      in ``[0, 1)``.
    nm: ``(n, m)``: keep ``n`` of every ``m`` consecutive entries along ``axis``.
    axis: the N:M grouping axis, and the axis that channel scales are reduced
      over and blocks run along (so N:M groups lie inside blocks when ``m``
      divides ``block_size``). For an ``(in, out)`` Flax kernel use 0.
    order: ``'sq'`` or ``'qs'``.
    block_size, granularity, round, convention: as in ``quant.quantize`` (named
      formats only).

  Returns:
    An array of ``x``'s shape and dtype. Non-finite inputs: NaN at the kept
    entries of their scaling group, 0 at pruned entries (module docstring).

  Raises:
    ValueError: for an unknown ``fmt`` or ``order``, both ``sparsity`` and
      ``nm``, none of ``fmt``/``sparsity``/``nm``, integer ``x``, or settings
      ``quant.quantize`` / ``masks.nm_mask`` reject.
  """
  x = jnp.asarray(x)
  options = (round, convention)
  fmt, nm = _check_args(x.dtype, fmt, sparsity, nm, order, block_size, granularity, options)
  axis, block_size, granularity = _settings(x.shape, x.dtype, fmt, nm, axis, block_size,
                                            granularity, options)
  return _compress_and_mask(x, fmt, sparsity, nm, axis, order, block_size, granularity,
                            options)[0]


# ---------------------------------------------------------------------------
# Per-leaf settings shared by the error analysis and the export.
# ---------------------------------------------------------------------------
class LeafLayout(NamedTuple):
  """Static description of one leaf of :class:`CompressedParams`.

  ``axis`` is None for a leaf stored as is; otherwise the leaf is compressed
  with ``compress(w, fmt, nm=nm, sparsity=sparsity, axis=axis,
  block_size=block_size, granularity=granularity, round=round,
  convention=convention)`` (``fmt`` None: sparsity only; ``nm`` and ``sparsity``
  None: quantization only). ``granularity`` and ``block_size`` are the resolved
  ones (e.g. ``'block'`` and 32 for MX).
  """

  path: str
  shape: tuple[int, ...]
  dtype: str
  fmt: str | None = None
  nm: tuple[int, int] | None = None
  sparsity: float | None = None
  axis: int | None = None
  block_size: int | None = None
  granularity: str | None = None
  round: str = "even"
  convention: str = "absmax"

  @property
  def compressed(self) -> bool:
    return self.axis is not None


def leaf_layouts(params, select, fmt, sparsity, nm, axis, block_size, granularity,
                 options=QUANT_DEFAULTS):
  """One :class:`LeafLayout` per leaf of ``params`` (``axis`` None: not selected).

  ``options``: ``(round, convention)`` of ``quant.quantize``.
  """
  if sparsity is not None and nm is not None:
    raise ValueError("give either `sparsity` (unstructured) or `nm` (N:M), not both.")
  fmt = _resolve_fmt(fmt)
  if fmt is not None and not isinstance(fmt, quant.Format):
    raise ValueError(f"`fmt` must be a name in quant.FORMATS here, got {fmt!r}.")
  nm = check_nm(nm)
  if fmt is None and sparsity is None and nm is None:
    raise ValueError("nothing to do: give a `fmt`, a `sparsity` or an `nm`.")
  options = tuple(options)
  if fmt is None and (block_size is not None or granularity is not None
                      or options != QUANT_DEFAULTS):
    raise ValueError("`block_size`, `granularity`, `round` and `convention` need a `fmt`.")
  target = 1.0 - nm[0] / nm[1] if nm else (0.0 if sparsity is None else sparsity)
  # With an explicit `axis`, divisibility by m is checked along it below.
  specs = selection_lib.resolve(as_selection(select), params, target,
                                m=nm[1] if nm and axis is None else None)
  layouts = []
  for path, leaf, spec in zip(selection_lib.leaf_paths(params), jax.tree.leaves(params), specs,
                              strict=True):
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    if spec is not None:  # What compress returns: float64 is float32 unless x64 is on.
      dtype = jax.dtypes.canonicalize_dtype(dtype)
    shape = tuple(np.shape(leaf))
    if spec is None or math.prod(shape) == 0:
      layouts.append(LeafLayout(path, shape, str(dtype)))
      continue
    try:
      a, size, gran = _settings(shape, dtype, fmt, nm, spec.axis if axis is None else axis,
                                block_size, granularity, options)
      if not 0 <= a < len(shape):
        raise ValueError(f"`axis`={a} is out of range for shape {shape}.")
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
    layouts.append(LeafLayout(
        path, shape, str(dtype), None if fmt is None else fmt.name, nm,
        None if nm or sparsity is None else float(spec.sparsity), a, size, gran, *options))
  return layouts


def compress_leaf(x: np.ndarray, layout: LeafLayout, *, order: str = "sq",
                  quantized: bool = True, sparse: bool = True, dtype=None):
  """``(compress(x), mask)`` of one leaf with its layout's settings, as numpy arrays.

  ``quantized=False`` / ``sparse=False`` leave out the quantizer / the mask (the
  single compressions of the error analysis); ``mask`` is None without sparsity.
  """
  fmt = quant.get_format(layout.fmt) if quantized and layout.fmt else None
  nm = layout.nm if sparse else None
  sparsity = layout.sparsity if sparse else None
  x = jnp.asarray(x, dtype)
  if fmt is None and nm is None and sparsity is None:
    return np.asarray(x), None
  block = layout.block_size if fmt else None
  gran = layout.granularity if fmt else None
  y, mask = _compress_and_mask(x, fmt, sparsity, nm, layout.axis, order, block, gran,
                               (layout.round, layout.convention))
  return np.asarray(y), None if mask is None else np.asarray(mask)


def compress_params(
    params,
    fmt: str | quant.Format | None = None,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    order: str = "sq",
    select=None,
    axis: int | None = None,
    block_size: int | None = None,
    granularity: str | None = None,
    round: str = "even",
    convention: str = "absmax",
):
  """The fake-compressed parameter tree: :func:`compress` of every selected leaf.

  What a model computes after post-training compression. Each selected leaf
  ``w`` becomes ``compress(w, fmt, nm=nm, sparsity=..., axis=..., order=order,
  ...)`` with the per-leaf settings that :func:`error_analysis` and
  :func:`export_compressed` use, so with ``order='sq'`` it equals
  ``decompress(export_compressed(params, ...))`` bit for bit; other leaves are
  returned as they are. Compressed leaves come back as numpy arrays.

  Args:
    params: parameter tree.
    fmt: a name in ``quant.FORMATS``, or None to only sparsify.
    sparsity, nm, select, axis, block_size, granularity, round, convention: as in
      :func:`export_compressed`; none of ``sparsity``/``nm``: only quantize.
    order: ``'sq'`` or ``'qs'``.
  """
  if order not in ORDERS:
    raise ValueError(f"`order` must be one of {ORDERS}, got {order!r}.")
  layouts = leaf_layouts(params, select, fmt, sparsity, nm, axis, block_size, granularity,
                         (round, convention))
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([compress_leaf(leaf, lay, order=order)[0] if lay.compressed
                            else leaf for lay, leaf in zip(layouts, leaves, strict=True)])


def check_finite(path: str, x: np.ndarray) -> np.ndarray:
  """``x``, or a ``ValueError`` naming ``path`` if it holds a NaN or an inf."""
  if not np.all(np.isfinite(np.asarray(x, np.float32))):
    raise ValueError(f"{path}: non-finite weights (NaN or inf) cannot be compressed.")
  return x


# The other concepts, importable from here as before (loaded on first use, so that those
# modules can import this one without a cycle).
_ELSEWHERE = {
    "ErrorRow": "compress_errors", "ErrorAnalysis": "compress_errors",
    "error_analysis": "compress_errors",
    "CompressedParams": "compress_storage", "export_compressed": "compress_storage",
    "decompress": "compress_storage", "save_compressed": "compress_storage",
    "load_compressed": "compress_storage",
    "SizeRow": "compress_sizes", "SizeReport": "compress_sizes",
    "compressed_size_report": "compress_sizes",
}


def __getattr__(name: str):
  """``from jaxprune.compress import error_analysis`` etc. (PEP 562)."""
  if name in _ELSEWHERE:
    return getattr(importlib.import_module(f"jaxprune.{_ELSEWHERE[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
