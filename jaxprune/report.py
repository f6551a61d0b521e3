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

N:M is checked along the axis each layer was pruned along: the same
:func:`jaxprune.selection.plan_leaves` the transforms use, given the same
``select`` and ``axis``. A ``note`` column names the output head and the
layers skipped because ``m`` cannot tile their grouping axis; with
``opt_state``, the pruned rows are read from the transform's masks and the
invariant counters (:func:`jaxprune.check`) are shown under the table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _checks, invariants, layouts, pruning
from jaxprune import selection as selection_lib


class Row(NamedTuple):
  """One leaf of the summary.

  ``nm_ok`` is True when every group of ``m`` consecutive elements along the
  leaf's grouping axis has at most ``n`` non-zeros, None when not applicable
  (no ``nm`` asked, or a leaf that is not pruned). ``selected`` says whether
  the leaf is pruned (in the selection, or a non-scalar mask in ``opt_state``).
  ``note``: ``'head'``, ``'skipped: ...'`` or ``'dense (override)'``.
  """

  path: str
  shape: tuple[int, ...]
  size: int
  nnz: int
  sparsity: float
  nm_ok: bool | None
  selected: bool
  note: str = ""


def _fraction_zero(nnz: int, size: int) -> float:
  return 1.0 - nnz / size if size else 0.0


@dataclasses.dataclass(frozen=True)
class SparsitySummary:
  """Per-leaf rows plus totals over all rows and over the selected ("prunable") rows.

  ``skipped`` lists the layers the default selection left dense because ``m``
  cannot tile them; ``violations`` and ``clipped_steps`` are the invariant
  counters of ``opt_state`` (None without it).
  """

  rows: tuple[Row, ...]
  nm: tuple[int, int] | None = None
  skipped: tuple[selection_lib.Skipped, ...] = ()
  violations: int | None = None
  clipped_steps: int | None = None

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
             "sparsity": r.sparsity, "nm_ok": r.nm_ok, "selected": r.selected, "note": r.note}
            for r in self.rows
        ],
        "skipped": [{"path": s.path, "shape": list(s.shape), "axis": s.axis, "reason": s.reason}
                    for s in self.skipped],
        "violations": self.violations,
        "clipped_steps": self.clipped_steps,
        "total_size": self.total_size,
        "total_nnz": self.total_nnz,
        "total_sparsity": self.total_sparsity,
        "prunable_size": self.prunable_size,
        "prunable_nnz": self.prunable_nnz,
        "prunable_sparsity": self.prunable_sparsity,
    }

  def table(self) -> str:
    """Aligned text table, one line per row, then the totals and any skipped layers."""
    header = ["path", "shape", "nnz/size", "sparsity", "pruned"]
    if self.nm:
      header.append(f"{self.nm[0]}:{self.nm[1]} ok")
    notes = any(r.note for r in self.rows)
    nm_text = {True: "yes", False: "NO", None: "-"}
    lines = []
    for r in self.rows:
      line = [r.path, str(r.shape), f"{r.nnz}/{r.size}", f"{100 * r.sparsity:.2f}%",
              "yes" if r.selected else "no"]
      if self.nm:
        line.append(nm_text[r.nm_ok])
      if notes:
        line.append(r.note)
      lines.append(line)
    if notes:
      header.append("note")
    totals = [
        ["total", "", f"{self.total_nnz}/{self.total_size}",
         f"{100 * self.total_sparsity:.2f}%", "", "", ""],
        ["total (pruned)", "", f"{self.prunable_nnz}/{self.prunable_size}",
         f"{100 * self.prunable_sparsity:.2f}%", "", nm_text[self.nm_ok], ""],
    ]
    if self.prunable_size in (0, self.total_size):   # One row says it all.
      totals = [totals[1] if self.prunable_size else totals[0]]
      totals[0][0] = "total"
    totals = [t[:len(header)] for t in totals]
    widths = [max(len(c[i]) for c in [header, *lines, *totals]) for i in range(len(header))]

    def fmt(cells):
      return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    rule = "-" * sum(widths + [2 * (len(widths) - 1)])
    out = [fmt(header), rule, *map(fmt, lines), rule, *map(fmt, totals)]
    if self.skipped:
      out.append("skipped (kept dense, as NVIDIA ASP): " + "; ".join(
          f"{s.path} {s.shape}: {s.reason}" for s in self.skipped))
    if self.violations:
      out.append(f"violations: {self.violations} pruned entries were not 0 at `update` "
                 "(see jaxprune.check)")
    if self.clipped_steps:
      out.append(f"clipped sparsity at {self.clipped_steps} update steps (see jaxprune.check)")
    return "\n".join(out)

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


def _plan(selection, params, nm, axis, explicit):
  """Planned leaves (or None) and skipped layers, as the transforms plan them."""
  try:
    return selection_lib.plan_leaves(selection, params, m=nm[1] if nm else None, axis=axis)
  except ValueError as e:
    if explicit or "selects no leaf" not in str(e):
      raise
    return [None] * len(jax.tree.leaves(params)), ()


def _pruned_by_state(opt_state, num_leaves: int) -> tuple[list[bool] | None, int, int]:
  """Which leaves the masks in ``opt_state`` prune, and its violation and clipped counters."""
  found = invariants.states(opt_state)
  if not found:
    raise ValueError("`opt_state` holds no jaxprune pruning or master-weight state.")
  pruned = None
  for s in found:
    masks = getattr(s, "masks", None)
    if masks is not None:
      ndims = [np.ndim(invariants.host_value(m)) for m in jax.tree.leaves(masks)]
      if len(ndims) != num_leaves:
        raise ValueError(f"`opt_state`'s masks have {len(ndims)} leaves, `params` "
                         f"{num_leaves}: pass the params of this optimizer.")
      pruned = [a or bool(b) for a, b in zip(pruned or [False] * num_leaves, ndims,
                                             strict=True)]
  check = invariants.check(opt_state)
  return pruned, check.violations, check.clipped_steps


def sparsity_summary(
    params,
    *,
    nm: Sequence[int] | None = None,
    select: selection_lib.Selection | str | Sequence[str] | None = None,
    axis: int | None = None,
    opt_state=None,
) -> SparsitySummary:
  """Counts zeros per leaf of ``params``, and checks N:M along the axes the transform used.

  Args:
    params: parameter tree (dict, linen params, ``nnx.State``, Equinox arrays, ...).
    nm: ``(n, m)`` to add an N:M validity column for the pruned rows, checked
      along each row's grouping axis as the transforms plan it (its layout,
      or ``axis``, or an ``axis`` override of ``select``), and to list the
      layers skipped because ``m`` does not divide their axis.
    select: the transform's ``select`` (a :func:`jaxprune.select` or regexes);
      if given, only the leaves it selects (and skipped ones) are listed.
      Otherwise every numeric leaf with ``ndim >= 1`` is, and the prunable
      totals are over the default selection.
    axis: the transform's ``axis=`` (for every leaf without an override).
    opt_state: the optimizer state (or ``nnx.Optimizer``/``TrainState``): the
      pruned rows are then those its masks prune, and its invariant counters
      are reported (see :func:`jaxprune.check`).

  Returns:
    A :class:`SparsitySummary`; ``str()`` of it is a readable table.
  """
  if nm is not None:
    nm = _checks.check_nm(*nm)
  if axis is not None:
    axis = _checks.check_int("axis", axis)
  selection = pruning.as_selection(select)
  host = jax.device_get(params)
  infos = layouts.describe(host)
  heads = selection.heads(infos)
  if select is not None or nm is not None:
    plan, skipped = _plan(selection, params, nm, axis, explicit=select is not None)
    chosen = [p is not None and p.fixed_sparsity != 0.0 for p in plan]
  else:
    plan, skipped = [None] * len(infos), ()
    chosen = [selection.chooses(i, heads) and bool(i.shape) and math.prod(i.shape) > 0
              for i in infos]
  violations = clipped = None
  if opt_state is not None:
    pruned, violations, clipped = _pruned_by_state(opt_state, len(infos))
    chosen = pruned if pruned is not None else chosen
  skipped_paths = {s.path: s for s in skipped}
  rows = []
  for info, leaf, planned, selected in zip(infos, jax.tree.leaves(host), plan, chosen,
                                           strict=True):
    if select is not None and planned is None and info.path not in skipped_paths:
      continue
    leaf = np.asarray(leaf) if _is_numeric(leaf) else None
    if leaf is None or leaf.ndim < 1:
      continue
    note = ""
    if info.path in skipped_paths:
      note = f"skipped: {skipped_paths[info.path].reason}"
    elif planned is not None and planned.fixed_sparsity == 0.0:
      note = "dense (override)"
    elif info.path in heads and select is None:
      note = "head"
    nm_ok = None
    if nm and selected and planned is not None:
      nm_ok = nm_valid(leaf, *nm, planned.axis)
    nnz = int(np.count_nonzero(leaf))
    rows.append(Row(info.path, tuple(leaf.shape), int(leaf.size), nnz,
                    _fraction_zero(nnz, leaf.size), nm_ok, bool(selected), note))
  return SparsitySummary(tuple(rows), nm, tuple(skipped), violations, clipped)
