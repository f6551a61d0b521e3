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
group of ``Q`` (a block, channel or the whole tensor). The group's largest
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

Compressed export
-----------------
:func:`export_compressed` stores each selected leaf in its *canonical layout*
``w2 = moveaxis(w, axis, -1).reshape(R, L)``: rows are the other dims in
row-major order, ``L = shape[axis]`` and sparsity groups and scale blocks run
along a row (for an ``(in, out)`` Dense kernel with the default ``axis=0``, this
is the ``(out, in)`` layout of sparse tensor cores). Per leaf, a dict of numpy
arrays (all bit streams little-endian: code ``j`` occupies bits
``j*b .. j*b+b-1`` of the stream, e.g. the low nibble of a byte comes first):

* ``values``: the kept entries in row-major order of ``w2`` (N:M: group by
  group, ``n`` per group, in index order). Quantized: their integer codes,
  ``b = fmt.bits`` bits each, bit-packed into ``uint8`` when ``b < 8`` (int4 and
  mxfp4 two per byte, mxfp6 four per three bytes, intK at K bits), ``int8`` for
  int8 and mxint8 (two's complement ``k`` of ``k / 64``), ``uint8`` bit patterns
  for 8-bit floats. intK codes are ``K``-bit two's complement of ``n`` in
  ``[-q_max, q_max]``; float elements are ``ml_dtypes`` bit patterns
  (``float8_e4m3fn``, ``float8_e5m2``, ``float6_e3m2fn``, ``float6_e2m3fn``,
  ``float4_e2m1fn``). Without ``fmt``: the kept values themselves.
* ``scales`` (quantized only), one per scaling group, shape ``(1, 1)``
  (tensor), ``(R, 1)`` (channel) or ``(R, L / block_size)`` (block). int and FP8:
  ``float32`` ``s = fl32(amax / max_normal)`` with ``amax`` of the sparse group,
  value ``fl32(code * s)`` (bit-exact while ``s`` is a normal float32; the
  export refuses groups where it is not). MX: ``uint8`` E8M0 ``e + 127``, value
  ``code * 2^e`` (always exact in float32).
* ``index`` (N:M): the position in ``[0, m)`` of each kept value inside its
  group, ``ceil(log2 m)`` bits each (2 bits for 2:4), bit-packed into ``uint8``.
* ``mask`` (unstructured): ``np.packbits`` of the ``(R, L)`` keep-mask, 1 bit per
  weight.
* ``dense`` (leaves that are not selected, and empty ones): the leaf as is.

The metadata (paths, shapes, dtypes, settings) is the static
:class:`LeafLayout` per leaf; scale and bitmap overheads are counted in
:func:`compressed_size_report`, the metadata is not.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxprune import _checks, quant
from jaxprune import masks as masks_lib
from jaxprune import quant_bits as qb
from jaxprune import selection as selection_lib
from jaxprune.pruning import as_selection

ORDERS = ("sq", "qs")

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


def _check_nm(nm) -> tuple[int, int] | None:
  if nm is None:
    return None
  if isinstance(nm, str) or not isinstance(nm, Sequence) or len(nm) != 2:
    raise ValueError(f"`nm` must be a pair (n, m), got {nm!r}.")
  return _checks.check_nm(*nm)


def _check_args(dtype, fmt, sparsity, nm, order, block_size, granularity):
  """Validates :func:`compress`'s arguments; returns ``(fmt, nm)`` normalised."""
  if order not in ORDERS:
    raise ValueError(f"`order` must be one of {ORDERS}, got {order!r}.")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"compress expects floating-point input, got dtype {dtype}.")
  if sparsity is not None and nm is not None:
    raise ValueError("give either `sparsity` (unstructured) or `nm` (N:M), not both.")
  fmt = _resolve_fmt(fmt)
  nm = _check_nm(nm)
  if sparsity is not None:
    _checks.check_sparsity("sparsity", sparsity)
  if fmt is None and sparsity is None and nm is None:
    raise ValueError("nothing to do: give a `fmt`, a `sparsity` or an `nm`.")
  if not isinstance(fmt, quant.Format) and (block_size is not None or granularity is not None):
    raise ValueError("`block_size` and `granularity` are settings of a named `fmt`, got "
                     f"fmt={fmt!r}.")
  return fmt, nm


def _settings(shape, dtype, fmt, nm, axis, block_size, granularity):
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
    spec = quant._spec(fmt, shape, dtype, axis, block_size, granularity, True)
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
_quantize_jit = jax.jit(quant.quantize, static_argnames=("fmt", "axis", "block_size",
                                                         "granularity", "symmetric"))
_kept_or_zero_jit = jax.jit(_kept_or_zero)


def _compress_and_mask(x, fmt, sparsity, nm, axis, order, block_size, granularity):
  """:func:`compress` on checked, resolved arguments; also returns the mask (or None).

  A Python-number (or None) ``sparsity`` is a static jit argument; a traced one is not.
  """
  if sparsity is None or isinstance(sparsity, numbers.Real):
    mask_of = functools.partial(_mask_of_jit, sparsity=None if sparsity is None else
                                float(sparsity), nm=nm, axis=axis if nm else 0)
  else:
    mask_of = functools.partial(_mask_of, sparsity=sparsity, nm=nm, axis=axis)
  if isinstance(fmt, quant.Format):
    q = functools.partial(_quantize_jit, fmt=fmt, axis=0 if granularity == "tensor" else axis,
                          block_size=block_size, granularity=granularity)
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
    block_size, granularity: as in ``quant.quantize`` (named formats only).

  Returns:
    An array of ``x``'s shape and dtype. Non-finite inputs: NaN at the kept
    entries of their scaling group, 0 at pruned entries (module docstring).

  Raises:
    ValueError: for an unknown ``fmt`` or ``order``, both ``sparsity`` and
      ``nm``, none of ``fmt``/``sparsity``/``nm``, integer ``x``, or settings
      ``quant.quantize`` / ``masks.nm_mask`` reject.
  """
  x = jnp.asarray(x)
  fmt, nm = _check_args(x.dtype, fmt, sparsity, nm, order, block_size, granularity)
  axis, block_size, granularity = _settings(x.shape, x.dtype, fmt, nm, axis, block_size,
                                            granularity)
  return _compress_and_mask(x, fmt, sparsity, nm, axis, order, block_size, granularity)[0]


# ---------------------------------------------------------------------------
# Per-leaf settings shared by the error analysis and the export.
# ---------------------------------------------------------------------------
class LeafLayout(NamedTuple):
  """Static description of one leaf of :class:`CompressedParams`.

  ``axis`` is None for a leaf stored as is; otherwise the leaf is compressed
  with ``compress(w, fmt, nm=nm, sparsity=sparsity, axis=axis,
  block_size=block_size, granularity=granularity)`` (``fmt`` None: sparsity
  only; ``nm`` and ``sparsity`` None: quantization only). ``granularity`` and
  ``block_size`` are the resolved ones (e.g. ``'block'`` and 32 for MX).
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

  @property
  def compressed(self) -> bool:
    return self.axis is not None


def _layouts(params, select, fmt, sparsity, nm, axis, block_size, granularity):
  """One :class:`LeafLayout` per leaf of ``params`` (``axis`` None: not selected)."""
  if sparsity is not None and nm is not None:
    raise ValueError("give either `sparsity` (unstructured) or `nm` (N:M), not both.")
  fmt = _resolve_fmt(fmt)
  if fmt is not None and not isinstance(fmt, quant.Format):
    raise ValueError(f"`fmt` must be a name in quant.FORMATS here, got {fmt!r}.")
  nm = _check_nm(nm)
  if fmt is None and sparsity is None and nm is None:
    raise ValueError("nothing to do: give a `fmt`, a `sparsity` or an `nm`.")
  if fmt is None and (block_size is not None or granularity is not None):
    raise ValueError("`block_size` and `granularity` need a `fmt`.")
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
                                block_size, granularity)
      if not 0 <= a < len(shape):
        raise ValueError(f"`axis`={a} is out of range for shape {shape}.")
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
    layouts.append(LeafLayout(
        path, shape, str(dtype), None if fmt is None else fmt.name, nm,
        None if nm or sparsity is None else float(spec.sparsity), a, size, gran))
  return layouts


def _run(x: np.ndarray, layout: LeafLayout, *, order: str = "sq", quantized: bool = True,
         sparse: bool = True, dtype=None):
  """``(compress(x), mask)`` of one leaf with its layout's settings (as numpy)."""
  fmt = quant.get_format(layout.fmt) if quantized and layout.fmt else None
  nm = layout.nm if sparse else None
  sparsity = layout.sparsity if sparse else None
  x = jnp.asarray(x, dtype)
  if fmt is None and nm is None and sparsity is None:
    return np.asarray(x), None
  block = layout.block_size if fmt else None
  gran = layout.granularity if fmt else None
  y, mask = _compress_and_mask(x, fmt, sparsity, nm, layout.axis, order, block, gran)
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
    sparsity, nm, select, axis, block_size, granularity: as in
      :func:`export_compressed`; none of ``sparsity``/``nm``: only quantize.
    order: ``'sq'`` or ``'qs'``.
  """
  if order not in ORDERS:
    raise ValueError(f"`order` must be one of {ORDERS}, got {order!r}.")
  layouts = _layouts(params, select, fmt, sparsity, nm, axis, block_size, granularity)
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([_run(leaf, lay, order=order)[0] if lay.compressed else leaf
                            for lay, leaf in zip(layouts, leaves, strict=True)])


def _finite(path: str, x: np.ndarray) -> np.ndarray:
  if not np.all(np.isfinite(np.asarray(x, np.float32))):
    raise ValueError(f"{path}: non-finite weights (NaN or inf) cannot be compressed.")
  return x


# ---------------------------------------------------------------------------
# Error analysis.
# ---------------------------------------------------------------------------
class ErrorRow(NamedTuple):
  """Relative L2 errors ``||W - C(W)|| / ||W||`` of one layer (or the total).

  ``eps_s``: sparsify only; ``eps_q``: quantize only; ``eps_sq`` / ``eps_qs``:
  both, in each order; ``gap = eps_sq - (eps_s + eps_q)``, the orthogonality gap
  (positive: the errors compound beyond their sum). The ``out_`` fields are the
  same for the layer outputs ``X @ W`` over the given inputs ``X`` (None without
  inputs for this layer).
  """

  path: str
  shape: tuple[int, ...]
  eps_s: float
  eps_q: float
  eps_sq: float
  eps_qs: float
  gap: float
  out_eps_s: float | None = None
  out_eps_q: float | None = None
  out_eps_sq: float | None = None
  out_eps_qs: float | None = None
  out_gap: float | None = None


def _relative(err2: Sequence[float], ref2: float) -> list[float]:
  """``sqrt(err2 / ref2)``; 0 for a zero reference (``C(0) = 0``)."""
  return [math.sqrt(e / ref2) if ref2 > 0 else 0.0 for e in err2]


def _row(path, shape, w_err2, w_ref2, out_err2=None, out_ref2=None) -> ErrorRow:
  s, q, sq, qs = _relative(w_err2, w_ref2)
  out = [None] * 5
  if out_err2 is not None:
    os_, oq, osq, oqs = _relative(out_err2, out_ref2)
    out = [os_, oq, osq, oqs, osq - (os_ + oq)]
  return ErrorRow(path, shape, s, q, sq, qs, sq - (s + q), *out)


def _text_table(header: list[str], lines: list[list[str]], totals: list[list[str]]) -> str:
  widths = [max(len(c[i]) for c in [header, *lines, *totals]) for i in range(len(header))]

  def fmt(cells):
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

  rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
  return "\n".join([fmt(header), rule, *map(fmt, lines), rule, *map(fmt, totals)])


@dataclasses.dataclass(frozen=True)
class ErrorAnalysis:
  """Per-layer :class:`ErrorRow` s and their ``total`` (errors pooled over all rows)."""

  rows: tuple[ErrorRow, ...]
  total: ErrorRow
  description: str = ""

  def table(self) -> str:
    """Aligned text table in percent, one line per layer, then the total."""
    names = ["eps_s", "eps_q", "eps_sq", "eps_qs", "gap"]
    with_out = any(r.out_eps_s is not None for r in self.rows)
    header = ["path", "shape", *names] + [f"out_{n}" for n in names if with_out]

    def cells(r: ErrorRow) -> list[str]:
      values = list(r[2:7]) + (list(r[7:]) if with_out else [])
      return [r.path, str(r.shape) if r.shape else ""] + [
          "-" if v is None else f"{100 * v:.3f}%" for v in values]

    table = _text_table(header, [cells(r) for r in self.rows], [cells(self.total)])
    return f"{self.description}\n{table}" if self.description else table

  def __str__(self) -> str:
    return self.table()


def error_analysis(
    params,
    fmt: str | quant.Format,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    inputs: Mapping[str, Any] | None = None,
    select=None,
    axis: int | None = None,
    block_size: int | None = None,
    granularity: str | None = None,
) -> ErrorAnalysis:
  """Relative errors of sparsity, quantization and both (each order), per layer.

  For each selected leaf ``W`` and each compression ``C`` in
  ``{S, Q, S->Q, Q->S}`` (:func:`compress` with the leaf's settings),

  .. math::  \\epsilon_C = \\|W - C(W)\\|_2 / \\|W\\|_2, \\qquad
             \\text{gap} = \\epsilon_{SQ} - (\\epsilon_S + \\epsilon_Q),

  and, when ``inputs[path] = X`` of shape ``(batch, in)`` is given for a 2-D
  kernel ``(in, out)``, the same of the outputs: ``||XW - XC(W)|| / ||XW||``
  (``eps_s + eps_q`` is the orthogonality threshold of Harma et al. 2024: a
  positive gap means the two errors compound).
  Errors are computed in float64 on the host. The total pools the squared
  errors of all rows: ``sqrt(sum ||W - C(W)||^2 / sum ||W||^2)``.

  Args:
    params: parameter tree.
    fmt: quantization format (a name in ``quant.FORMATS``).
    sparsity: unstructured sparsity (per leaf as resolved by the selection,
      e.g. ERK or overrides), or
    nm: ``(n, m)``.
    inputs: mapping ``path -> X``; paths must be selected 2-D leaves.
    select: a ``Selection``, regex(es), or None for ``jaxprune.select()``.
    axis: N:M and scale axis for every leaf; None: each leaf's N:M axis from
      the selection (the input axis of a kernel).
    block_size, granularity: as in ``quant.quantize``.

  Returns:
    An :class:`ErrorAnalysis`; ``str()`` of it is a table.
  """
  if fmt is None:
    raise ValueError("error_analysis needs a quantization `fmt`.")
  layouts = _layouts(params, select, fmt, sparsity, nm, axis, block_size, granularity)
  by_path = {lay.path: lay for lay in layouts if lay.compressed}
  inputs = dict(inputs or {})
  for path, x in inputs.items():
    lay = by_path.get(path)
    if lay is None:
      raise ValueError(f"`inputs` path {path!r} is not a selected leaf; selected: "
                       f"{sorted(by_path)}.")
    if len(lay.shape) != 2 or np.ndim(x) != 2 or np.shape(x)[1] != lay.shape[0]:
      raise ValueError(f"`inputs[{path!r}]` must be (batch, {lay.shape[0]}) for a 2-D kernel "
                       f"(in, out); got inputs {np.shape(x)} for a leaf of shape {lay.shape}.")
  rows, w_tot, out_tot = [], np.zeros(5), np.zeros(5)
  for lay, leaf in zip(layouts, jax.tree.leaves(params), strict=True):
    if not lay.compressed:
      continue
    w = _finite(lay.path, np.asarray(jax.device_get(leaf)))
    variants = [_run(w, lay, quantized=False)[0], _run(w, lay, sparse=False)[0],
                _run(w, lay)[0], _run(w, lay, order="qs")[0]]
    w64 = w.astype(np.float64)
    w_err2 = [float(np.sum((w64 - c.astype(np.float64)) ** 2)) for c in variants]
    w_ref2 = float(np.sum(w64**2))
    w_tot += [*w_err2, w_ref2]
    out_err2 = out_ref2 = None
    if lay.path in inputs:
      x = np.asarray(inputs[lay.path], np.float64)
      y = x @ w64
      out_err2 = [float(np.sum((y - x @ c.astype(np.float64)) ** 2)) for c in variants]
      out_ref2 = float(np.sum(y**2))
      out_tot += [*out_err2, out_ref2]
    rows.append(_row(lay.path, lay.shape, w_err2, w_ref2, out_err2, out_ref2))
  total = _row("total", (), list(w_tot[:4]), w_tot[4],
               list(out_tot[:4]) if inputs else None, out_tot[4] if inputs else None)
  name = quant.get_format(fmt).name
  structure = f"{nm[0]}:{nm[1]}" if nm else ("quantization only" if sparsity is None
                                              else f"unstructured {sparsity:g}")
  return ErrorAnalysis(tuple(rows), total, f"{name}, {structure} (relative L2 errors)")


# ---------------------------------------------------------------------------
# Codes: packing and the element encodings.
# ---------------------------------------------------------------------------
def _pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
  """Little-endian bit stream of ``codes`` (each ``< 2^bits``) as ``uint8``."""
  codes = np.asarray(codes, np.uint8).reshape(-1)
  if bits == 8:
    return codes
  stream = (codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(stream.reshape(-1), bitorder="little")


def _unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
  """Inverse of :func:`_pack_bits`: ``count`` codes of ``bits`` bits, as ``uint8``."""
  if bits == 8:
    return np.asarray(packed, np.uint8)[:count]
  stream = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
  return (stream << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


_ELEMENT_DTYPES = {  # (ebits, mbits) -> ml_dtypes type whose bit patterns are the codes
    (4, 3): ml_dtypes.float8_e4m3fn,
    (5, 2): ml_dtypes.float8_e5m2,
    (3, 2): ml_dtypes.float6_e3m2fn,
    (2, 3): ml_dtypes.float6_e2m3fn,
    (2, 1): ml_dtypes.float4_e2m1fn,
}


def _element_codes(v: np.ndarray, fmt: quant.Format) -> np.ndarray:
  """Codes of element values ``v`` (float64): ``int8`` for integer elements, else ``uint8``."""
  if fmt.kind == "int":
    return np.rint(v).astype(np.int8)
  if fmt.name == "mxint8":
    return np.rint(v * 64.0).astype(np.int8)
  return v.astype(_ELEMENT_DTYPES[fmt.ebits, fmt.mbits]).view(np.uint8)


def _element_values(codes: np.ndarray, fmt: quant.Format) -> np.ndarray:
  """Inverse of :func:`_element_codes`, as float64."""
  if fmt.kind == "int":
    return codes.astype(np.float64)
  if fmt.name == "mxint8":
    return codes.astype(np.float64) / 64.0
  return codes.view(_ELEMENT_DTYPES[fmt.ebits, fmt.mbits]).astype(np.float64)


def _store_codes(codes: np.ndarray, fmt: quant.Format) -> np.ndarray:
  """Codes as stored: as they are at 8 bits, else their low ``fmt.bits`` bits packed."""
  if fmt.bits == 8:
    return codes
  return _pack_bits(codes.view(np.uint8) & ((1 << fmt.bits) - 1), fmt.bits)


def _load_codes(stored: np.ndarray, fmt: quant.Format, count: int) -> np.ndarray:
  """Inverse of :func:`_store_codes` (integer codes are sign-extended back to ``int8``)."""
  if fmt.bits == 8:
    return np.asarray(stored)
  codes = _unpack_bits(stored, fmt.bits, count)
  if fmt.kind != "int":
    return codes
  shift = np.uint8(8 - fmt.bits)
  return ((codes << shift).view(np.int8) >> shift).astype(np.int8)


def _rows(a: np.ndarray, axis: int) -> np.ndarray:
  """The canonical ``(R, L)`` layout: ``axis`` last, other dims flattened."""
  return np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])


def _unrows(a2: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
  moved = shape[:axis] + shape[axis + 1:] + (shape[axis],)
  return np.moveaxis(a2.reshape(moved), -1, axis)


def _scale_groups(a2: np.ndarray, lay: LeafLayout) -> np.ndarray:
  """``(R_s, C_s, group)`` view of ``a2`` with one scaling group per ``(r, c)``."""
  if lay.granularity == "tensor":
    return a2.reshape(1, 1, -1)
  if lay.granularity == "channel":
    return a2[:, None, :]
  return a2.reshape(a2.shape[0], -1, lay.block_size)


def _broadcast_scales(scales: np.ndarray, shape2: tuple[int, int]) -> np.ndarray:
  rows, cols = shape2
  return np.broadcast_to(np.repeat(scales, cols // scales.shape[1], axis=1), shape2)


def _encode_quantized(q2: np.ndarray, xs2: np.ndarray, lay: LeafLayout, fmt: quant.Format):
  """Element codes ``(R, L)`` and scales of the quantized float32 values ``q2``.

  ``xs2`` is the sparse input of the quantizer, whose group maxima give the
  int/FP8 scales; the MX shared exponent is read off the quantized block, whose
  largest magnitude is ``2^(e + emax)`` up to ``max_normal * 2^e``.
  """
  q64 = q2.astype(np.float64)
  if fmt.kind == "mx":
    top = np.abs(_scale_groups(q64, lay)).max(axis=-1)
    e = np.where(top > 0, np.frexp(top)[1] - 1 - fmt.emax, -126 - fmt.emax)
    e = np.maximum(e, -127)
    v = np.ldexp(q64, -_broadcast_scales(e, q2.shape))
    return _element_codes(v, fmt), (e + 127).astype(np.uint8)
  amax = np.abs(_scale_groups(xs2.astype(np.float64), lay)).max(axis=-1)
  s = (amax / fmt.max_normal).astype(np.float32)
  s_full = _broadcast_scales(s.astype(np.float64), q2.shape)
  v = np.divide(q64, s_full, out=np.zeros_like(q64), where=s_full > 0)
  return _element_codes(v, fmt), s


def _decode_quantized(codes2: np.ndarray, scales: np.ndarray, fmt: quant.Format) -> np.ndarray:
  v = _element_values(codes2, fmt)
  if fmt.kind == "mx":
    e = _broadcast_scales(scales.astype(np.int32) - 127, codes2.shape)
    return np.ldexp(v, e).astype(np.float32)
  return v.astype(np.float32) * _broadcast_scales(scales, codes2.shape)


def _index_bits(m: int) -> int:
  return (m - 1).bit_length()


# ---------------------------------------------------------------------------
# Export, decompression, Orbax.
# ---------------------------------------------------------------------------
@functools.partial(jax.tree_util.register_dataclass, data_fields=["leaves"],
                   meta_fields=["layouts", "treedef"])
@dataclasses.dataclass(frozen=True)
class CompressedParams:
  """A compressed parameter tree: per leaf a dict of numpy arrays and its layout.

  ``leaves[i]`` holds the arrays of leaf ``i`` (fields in the module docstring)
  and ``layouts[i]`` its static :class:`LeafLayout`; ``treedef`` rebuilds the
  original tree (None after :func:`load_compressed` without ``like``: nested
  dicts from the paths). A pytree whose leaves are the arrays.
  """

  leaves: tuple[dict[str, np.ndarray], ...]
  layouts: tuple[LeafLayout, ...]
  treedef: Any = None


def _encode(w: np.ndarray, lay: LeafLayout) -> dict[str, np.ndarray]:
  """The stored arrays of one selected leaf; checks that they decode bit-exactly."""
  fmt = quant.get_format(lay.fmt) if lay.fmt else None
  y, mask = _run(w, lay, dtype=jnp.float32 if fmt else None)
  a2 = _rows(y, lay.axis)
  m2 = None if mask is None else _rows(mask, lay.axis)
  fields = {}
  if fmt is None:
    codes2 = a2
  else:
    xs = w.astype(np.float32) if mask is None else np.where(mask, w.astype(np.float32), 0)
    codes2, fields["scales"] = _encode_quantized(a2, _rows(xs, lay.axis), lay, fmt)
  if lay.nm is not None:
    n, m = lay.nm
    groups = m2.reshape(-1, m)
    kept = codes2.reshape(-1, m)[groups]
    if _index_bits(m):
      fields["index"] = _pack_bits(np.nonzero(groups)[1], _index_bits(m))
  elif m2 is not None:
    kept = codes2[m2]
    fields["mask"] = np.packbits(m2.reshape(-1), bitorder="little")
  else:
    kept = codes2.reshape(-1)
  fields["values"] = kept if fmt is None else _store_codes(kept, fmt)
  expected = y if fmt is None or lay.dtype == "float32" else _run(w, lay)[0]
  decoded = _decode(fields, lay)
  if not np.array_equal(_bit_view(decoded), _bit_view(expected)):
    bad = int(np.sum(_bit_view(decoded) != _bit_view(expected)))
    raise ValueError(
        f"{lay.path}: {bad} entries would not decode to compress()'s values bit for bit, "
        "e.g. a scaling group with amax / max_normal below the float32 normal range "
        "(2^-126); rescale the leaf or use an MX format.")
  return {k: np.ascontiguousarray(v) for k, v in fields.items()}


def _bit_view(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(a).view(np.dtype(f"uint{8 * a.dtype.itemsize}"))


def _decode(fields: Mapping[str, np.ndarray], lay: LeafLayout) -> np.ndarray:
  """The leaf ``compress`` gives, from its stored arrays."""
  if not lay.compressed:
    return np.asarray(fields["dense"])
  fmt = quant.get_format(lay.fmt) if lay.fmt else None
  dtype = jnp.dtype(lay.dtype)
  length = lay.shape[lay.axis]
  rows = math.prod(lay.shape) // length
  if lay.nm is not None:
    n, m = lay.nm
    count = rows * length // m * n
    if _index_bits(m):
      index = _unpack_bits(fields["index"], _index_bits(m), count).astype(np.int64)
    else:
      index = np.zeros(count, np.int64)
    position = (np.arange(count) // n) * m + index  # flat position in (R, L)
  elif lay.sparsity is not None:
    bits = np.unpackbits(fields["mask"], count=rows * length, bitorder="little")
    position = np.flatnonzero(bits)
    count = position.size
  else:
    count = rows * length
    position = np.arange(count)
  values = np.asarray(fields["values"])
  if fmt is None:
    out = np.zeros(rows * length, dtype)
    out[position] = values
    return _unrows(out.reshape(rows, length), lay.shape, lay.axis)
  codes = _load_codes(values, fmt, count)
  full = np.zeros(rows * length, codes.dtype)
  full[position] = codes
  kept = np.zeros(rows * length, bool)
  kept[position] = True
  v = _decode_quantized(full.reshape(rows, length), np.asarray(fields["scales"]), fmt)
  v = np.where(kept.reshape(rows, length), v, np.float32(0)).astype(dtype)
  v[_bit_view(v) == (1 << (8 * v.dtype.itemsize - 1))] = 0  # -0.0 -> +0.0, as compress.
  return _unrows(v, lay.shape, lay.axis)


def export_compressed(
    params,
    *,
    fmt: str | quant.Format | None = None,
    nm: tuple[int, int] | None = None,
    sparsity: float | None = None,
    axis: int | None = None,
    select=None,
    block_size: int | None = None,
    granularity: str | None = None,
) -> CompressedParams:
  """Stores the selected leaves sparsified then quantized (S->Q), in real compressed form.

  Each selected leaf ``w`` becomes ``compress(w, fmt, nm=nm, sparsity=...,
  axis=..., order='sq', ...)`` stored as kept values (integer codes plus scales
  when quantized) with their positions (N:M indices or a bitmask); the layout is
  in the module docstring. Other leaves are stored as is.
  ``decompress(export_compressed(params, ...))`` equals ``compress`` of each
  selected leaf bit for bit (checked here: a leaf that cannot be stored
  exactly raises). Packing runs in numpy on the host.

  Args:
    params: parameter tree.
    fmt: a name in ``quant.FORMATS`` (symmetric int, FP8 or MX), or None to
      store sparse float values.
    nm: ``(n, m)`` N:M sparsity along each leaf's ``axis``.
    sparsity: unstructured sparsity; per leaf as the selection resolves it
      (uniform, ERK, overrides).
    axis: grouping and scale axis for every selected leaf; None: each leaf's
      N:M axis from the selection (the input axis of a kernel).
    select: a ``Selection``, regex(es), or None for ``jaxprune.select()``.
    block_size, granularity: as in ``quant.quantize``.

  Returns:
    A :class:`CompressedParams`.

  Raises:
    ValueError: for bad settings (as :func:`compress`), a non-finite selected
      leaf, or a leaf whose values cannot be stored bit-exactly.
  """
  layouts = _layouts(params, select, fmt, sparsity, nm, axis, block_size, granularity)
  leaves, treedef = jax.tree.flatten(params)
  stored = []
  for lay, leaf in zip(layouts, leaves, strict=True):
    w = np.asarray(jax.device_get(leaf))
    stored.append(_encode(_finite(lay.path, w), lay) if lay.compressed else {"dense": w})
  return CompressedParams(tuple(stored), tuple(layouts), treedef)


def _nested(paths: Sequence[str], leaves: Sequence[Any]) -> dict:
  tree: dict = {}
  for path, leaf in zip(paths, leaves, strict=True):
    *parents, name = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return tree


def decompress(compressed: CompressedParams):
  """The parameter tree of ``compressed``: numpy arrays, compressed leaves as ``compress`` gives.

  With ``compressed.treedef`` None (loaded without ``like``), nested dicts keyed
  by the ``'/'``-split paths.
  """
  leaves = [_decode(f, lay) for f, lay in zip(compressed.leaves, compressed.layouts,
                                               strict=True)]
  if compressed.treedef is None:
    return _nested([lay.path for lay in compressed.layouts], leaves)
  return compressed.treedef.unflatten(leaves)


def _layout_json(lay: LeafLayout) -> dict:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in lay._asdict().items()}


def _layout_from_json(d: Mapping[str, Any]) -> LeafLayout:
  d = dict(d)
  d["shape"] = tuple(d["shape"])
  d["nm"] = None if d["nm"] is None else tuple(d["nm"])
  return LeafLayout(**d)


def save_compressed(path: str | os.PathLike, compressed: CompressedParams) -> None:
  """Saves with Orbax: the arrays (``StandardSave``) and the layouts (``JsonSave``).

  ``path`` must not exist. Zero-size arrays, which Orbax refuses, are not
  written; their shapes are in the JSON.
  """
  import orbax.checkpoint as ocp

  arrays = {str(i): {k: v for k, v in f.items() if v.size}
            for i, f in enumerate(compressed.leaves)}
  meta = {
      "layouts": [_layout_json(lay) for lay in compressed.layouts],
      "arrays": [{k: [list(v.shape), v.dtype.name] for k, v in f.items()}
                 for f in compressed.leaves],
  }
  arrays = {k: v for k, v in arrays.items() if v}
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  checkpointer.save(os.fspath(os.path.abspath(path)), ocp.args.Composite(
      arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))


def load_compressed(path: str | os.PathLike, like=None) -> CompressedParams:
  """Loads what :func:`save_compressed` wrote.

  Args:
    path: the checkpoint directory.
    like: optionally a tree with the original structure (params, or
      ``jax.ShapeDtypeStruct`` s); its leaf paths must match. Without it,
      :func:`decompress` returns nested dicts.
  """
  import orbax.checkpoint as ocp

  path = os.fspath(os.path.abspath(path))
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  meta = checkpointer.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  specs = [{k: (tuple(s), np.dtype(d)) for k, (s, d) in f.items()} for f in meta["arrays"]]
  target = {str(i): {k: np.zeros(s, d) for k, (s, d) in f.items() if math.prod(s)}
            for i, f in enumerate(specs)}
  target = {k: v for k, v in target.items() if v}
  arrays = {}
  if target:
    arrays = checkpointer.restore(path, ocp.args.Composite(
        arrays=ocp.args.StandardRestore(target)))["arrays"]
  leaves = tuple(
      {k: np.asarray(arrays[str(i)][k]) if math.prod(s) else np.zeros(s, d)
       for k, (s, d) in f.items()} for i, f in enumerate(specs))
  layouts = tuple(_layout_from_json(d) for d in meta["layouts"])
  treedef = None
  if like is not None:
    paths = selection_lib.leaf_paths(like)
    if paths != [lay.path for lay in layouts]:
      raise ValueError(f"`like` has leaf paths {paths}, the checkpoint "
                       f"{[lay.path for lay in layouts]}.")
    treedef = jax.tree.structure(like)
  return CompressedParams(leaves, layouts, treedef)


# ---------------------------------------------------------------------------
# Sizes.
# ---------------------------------------------------------------------------
class SizeRow(NamedTuple):
  """Bytes of one leaf: dense, and stored (values + index/mask + scales)."""

  path: str
  shape: tuple[int, ...]
  scheme: str
  dense_bytes: int
  value_bytes: int
  index_bytes: int
  scale_bytes: int

  @property
  def stored_bytes(self) -> int:
    return self.value_bytes + self.index_bytes + self.scale_bytes

  @property
  def ratio(self) -> float:
    """``stored_bytes / dense_bytes`` (1 for an empty leaf)."""
    return self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0


@dataclasses.dataclass(frozen=True)
class SizeReport:
  """Per-leaf :class:`SizeRow` s and totals over all leaves and over the compressed ones."""

  rows: tuple[SizeRow, ...]

  def _sum(self, rows) -> SizeRow:
    rows = list(rows)
    return SizeRow("", (), "", *(sum(getattr(r, f) for r in rows) for f in SizeRow._fields[3:]))

  @property
  def total(self) -> SizeRow:
    return self._sum(self.rows)._replace(path="total")

  @property
  def total_compressed(self) -> SizeRow:
    return self._sum(r for r in self.rows if r.scheme != "dense")._replace(
        path="total (compressed)")

  def table(self) -> str:
    """Aligned text table: bytes per leaf, stored/dense ratio and bits per weight."""
    header = ["path", "shape", "scheme", "dense B", "values B", "index B", "scales B",
              "stored B", "ratio"]

    def cells(r: SizeRow) -> list[str]:
      return [r.path, str(r.shape) if r.shape else "", r.scheme, str(r.dense_bytes),
              str(r.value_bytes), str(r.index_bytes), str(r.scale_bytes), str(r.stored_bytes),
              f"{r.ratio:.4f}"]

    return _text_table(header, [cells(r) for r in self.rows],
                       [cells(self.total), cells(self.total_compressed)])

  def __str__(self) -> str:
    return self.table()


def _scheme(lay: LeafLayout) -> str:
  if not lay.compressed:
    return "dense"
  parts = [f"{lay.nm[0]}:{lay.nm[1]}" if lay.nm else (
      f"unstructured {lay.sparsity:g}" if lay.sparsity is not None else None), lay.fmt]
  if lay.fmt and lay.granularity != "tensor":
    parts.append(lay.granularity + (f" {lay.block_size}" if lay.block_size else ""))
  return " ".join(p for p in parts if p)


def compressed_size_report(compressed: CompressedParams) -> SizeReport:
  """Bytes per leaf, dense (``size * itemsize``) against stored (sum of its arrays).

  For a 1024 x 1024 float32 kernel, 2:4 + int4 stores ``0.5 * 4 + 0.5 * 2`` bits
  per weight plus one float32 scale: 393,220 bytes of 4,194,304 (9.4%).
  """
  rows = []
  for fields, lay in zip(compressed.leaves, compressed.layouts, strict=True):
    dense = math.prod(lay.shape) * np.dtype(jnp.dtype(lay.dtype)).itemsize
    nbytes = {k: int(v.nbytes) for k, v in fields.items()}
    rows.append(SizeRow(
        lay.path, lay.shape, _scheme(lay), dense,
        nbytes.get("values", 0) + nbytes.get("dense", 0),
        nbytes.get("index", 0) + nbytes.get("mask", 0), nbytes.get("scales", 0)))
  return SizeReport(tuple(rows))
