"""Per-layer errors of sparsity, quantization and both, in each order (Harma et al. 2024).

:func:`error_analysis` measures, for each selected layer, the relative errors
``eps_S``, ``eps_Q``, ``eps_SQ``, ``eps_QS`` of :func:`jaxprune.compress` with the
layer's settings, and the orthogonality gap ``eps_SQ - (eps_S + eps_Q)`` of
Harma et al. 2024, "Effective Interplay between Sparsity and Quantization: From
Theory to Practice" (arXiv:2405.20935); see :mod:`jaxprune.compress` for the
theorem.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxprune import quant
from jaxprune._tables import text_table
from jaxprune.compress import check_finite, compress_leaf, leaf_layouts


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

    table = text_table(header, [cells(r) for r in self.rows], [cells(self.total)])
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
    round: str = "even",
    convention: str = "absmax",
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
    block_size, granularity, round, convention: as in ``quant.quantize``.

  Returns:
    An :class:`ErrorAnalysis`; ``str()`` of it is a table.
  """
  if fmt is None:
    raise ValueError("error_analysis needs a quantization `fmt`.")
  layouts = leaf_layouts(params, select, fmt, sparsity, nm, axis, block_size, granularity,
                         (round, convention))
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
    w = check_finite(lay.path, np.asarray(jax.device_get(leaf)))
    variants = [compress_leaf(w, lay, quantized=False)[0], compress_leaf(w, lay, sparse=False)[0],
                compress_leaf(w, lay)[0], compress_leaf(w, lay, order="qs")[0]]
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
