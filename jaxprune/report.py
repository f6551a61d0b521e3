"""Per-layer sparsity summaries: how many weights are zero, and is N:M satisfied.

A report runs on the host with numpy (``jax.device_get``), once per evaluation,
not inside the training step.

>>> print(sparsity_summary(params, nm=(2, 4)))  # doctest: +SKIP
path                   shape   nnz/size  sparsity  pruned  2:4 ok
---------------------------------------------------------------
params/Dense_0/bias    (4,)    4/4       0.00%     no      -
params/Dense_0/kernel  (8, 4)  16/32     50.00%    yes     yes
---------------------------------------------------------------
total                          20/36     44.44%
total (pruned)                 16/32     50.00%            yes
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _checks
from jaxprune import selection as selection_lib
from jaxprune.masks import default_nm_axis


class Row(NamedTuple):
  """One leaf of the summary.

  ``nm_ok`` is True when every group of ``m`` consecutive elements along the
  leaf's N:M axis has at most ``n`` non-zeros, None when not applicable (no
  ``nm`` asked, ``ndim < 2``, or the axis size is not divisible by ``m``).
  ``selected`` says whether the leaf is in the selection (``select``, or the
  default one).
  """

  path: str
  shape: tuple[int, ...]
  size: int
  nnz: int
  sparsity: float
  nm_ok: bool | None
  selected: bool


def _fraction_zero(nnz: int, size: int) -> float:
  return 1.0 - nnz / size if size else 0.0


@dataclasses.dataclass(frozen=True)
class SparsitySummary:
  """Per-leaf rows plus totals over all rows and over the selected ("prunable") rows."""

  rows: tuple[Row, ...]
  nm: tuple[int, int] | None = None

  @property
  def total_size(self) -> int:
    return sum(r.size for r in self.rows)

  @property
  def total_nnz(self) -> int:
    return sum(r.nnz for r in self.rows)

  @property
  def total_sparsity(self) -> float:
    return _fraction_zero(self.total_nnz, self.total_size)

  @property
  def prunable_size(self) -> int:
    return sum(r.size for r in self.rows if r.selected)

  @property
  def prunable_nnz(self) -> int:
    return sum(r.nnz for r in self.rows if r.selected)

  @property
  def prunable_sparsity(self) -> float:
    return _fraction_zero(self.prunable_nnz, self.prunable_size)

  @property
  def nm_ok(self) -> bool | None:
    """True when every selected row that can be checked satisfies N:M; None if none can."""
    checked = [r.nm_ok for r in self.rows if r.selected and r.nm_ok is not None]
    return all(checked) if checked else None

  def as_dict(self) -> dict[str, Any]:
    """JSON-serialisable form (plain ints, floats, lists, None)."""
    return {
        "nm": list(self.nm) if self.nm else None,
        "nm_ok": self.nm_ok,
        "rows": [
            {"path": r.path, "shape": list(r.shape), "size": r.size, "nnz": r.nnz,
             "sparsity": r.sparsity, "nm_ok": r.nm_ok, "selected": r.selected}
            for r in self.rows
        ],
        "total_size": self.total_size,
        "total_nnz": self.total_nnz,
        "total_sparsity": self.total_sparsity,
        "prunable_size": self.prunable_size,
        "prunable_nnz": self.prunable_nnz,
        "prunable_sparsity": self.prunable_sparsity,
    }

  def table(self) -> str:
    """Aligned text table, one line per row, then the totals."""
    header = ["path", "shape", "nnz/size", "sparsity", "pruned"]
    if self.nm:
      header.append(f"{self.nm[0]}:{self.nm[1]} ok")
    nm_text = {True: "yes", False: "NO", None: "-"}
    lines = []
    for r in self.rows:
      line = [r.path, str(r.shape), f"{r.nnz}/{r.size}", f"{100 * r.sparsity:.2f}%",
              "yes" if r.selected else "no"]
      if self.nm:
        line.append(nm_text[r.nm_ok])
      lines.append(line)
    totals = [
        ["total", "", f"{self.total_nnz}/{self.total_size}",
         f"{100 * self.total_sparsity:.2f}%", "", ""],
        ["total (pruned)", "", f"{self.prunable_nnz}/{self.prunable_size}",
         f"{100 * self.prunable_sparsity:.2f}%", "", nm_text[self.nm_ok]],
    ]
    totals = [t[:len(header)] for t in totals]
    widths = [max(len(c[i]) for c in [header, *lines, *totals]) for i in range(len(header))]

    def fmt(cells):
      return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    rule = "-" * sum(widths + [2 * (len(widths) - 1)])
    return "\n".join([fmt(header), rule, *map(fmt, lines), rule, *map(fmt, totals)])

  def __str__(self) -> str:
    return self.table()


def nm_valid(x: np.ndarray, n: int, m: int, axis: int) -> bool | None:
  """Whether every ``m`` consecutive elements along ``axis`` hold at most ``n`` non-zeros.

  None when ``x.ndim < 2`` or ``x.shape[axis]`` is not divisible by ``m``.
  """
  x = np.asarray(x)
  if x.ndim < 2 or x.shape[axis] % m:
    return None
  groups = np.moveaxis(x != 0, axis, -1).reshape(-1, m)
  return bool((groups.sum(axis=-1) <= n).all())


def _is_numeric(leaf) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and not jnp.issubdtype(dtype, jax.dtypes.extended)


def sparsity_summary(
    params,
    *,
    nm: Sequence[int] | None = None,
    select: selection_lib.Selection | None = None,
) -> SparsitySummary:
  """Counts zeros per leaf of ``params``.

  Args:
    params: parameter tree (dict, linen params, ``nnx.State``, ...).
    nm: ``(n, m)`` to add an N:M validity column, checked along each row's N:M
      axis (the input axis of a kernel, or the ``axis`` override of ``select``).
    select: if given, only the leaves this :class:`~jaxprune.selection.Selection`
      selects are listed. Otherwise every numeric leaf with ``ndim >= 1`` is,
      and the prunable totals are over the default selection.

  Returns:
    A :class:`SparsitySummary`; ``str()`` of it is a readable table.
  """
  if nm is not None:
    nm = _checks.check_nm(*nm)
  paths, leaves = selection_lib._flatten(jax.device_get(params))
  rule = selection_lib.Selection()
  if select is not None:
    plan = selection_lib._plan(select, params)
  else:
    plan = [None] * len(paths)
  rows = []
  for path, leaf, planned in zip(paths, leaves, plan, strict=True):
    if select is not None and planned is None:
      continue
    leaf = np.asarray(leaf) if _is_numeric(leaf) else None
    if leaf is None or leaf.ndim < 1:
      continue
    if select is not None:  # Leaves whose override keeps them dense are listed, not pruned.
      selected = planned.fixed_sparsity != 0.0
    else:
      selected = rule.selects(path, leaf.shape, leaf.dtype)
    axis = planned.axis if planned is not None else default_nm_axis(leaf.ndim)
    nnz = int(np.count_nonzero(leaf))
    rows.append(Row(
        path=path,
        shape=tuple(leaf.shape),
        size=int(leaf.size),
        nnz=nnz,
        sparsity=_fraction_zero(nnz, leaf.size),
        nm_ok=nm_valid(leaf, *nm, axis) if nm else None,
        selected=selected,
    ))
  return SparsitySummary(rows=tuple(rows), nm=nm)
