"""Scaling-law data on disk: one CSV row per training run.

Columns ``N``, ``D`` and ``loss`` are required; any others (``sparsity``,
``N_avg``, ``N_final``, schedule fields, a run's config as JSON, ...) are kept.
Floats round-trip exactly (``repr``), NaN as an empty cell. The same functions
are :func:`jaxprune.scaling.read_csv` and :func:`jaxprune.scaling.write_csv`.
"""

from __future__ import annotations

import csv
import math
import numbers
import os
from collections.abc import Mapping, Sequence

import numpy as np

REQUIRED_COLUMNS = ("N", "D", "loss")


def _check_columns(names, source: str) -> None:
  missing = [c for c in REQUIRED_COLUMNS if c not in names]
  if missing:
    raise ValueError(
        f"{source} is missing required column(s) {missing}; it has {list(names)}."
    )


def read_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads scaling-law data: column name -> array.

  Required columns ``N``, ``D``, ``loss`` (numeric); any others (``sparsity``,
  ``N_avg``, ``N_final``, schedule fields, ...) are float64 arrays if every
  non-empty cell parses as a number, else arrays of strings. Empty numeric
  cells become NaN (dropped with a warning by :func:`jaxprune.scaling.fit`).
  """
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    names = reader.fieldnames or []
    _check_columns(names, f"CSV file {os.fspath(path)!r}")
    rows = list(reader)
  out = {}
  for name in names:
    cells = [row[name] if row[name] is not None else "" for row in rows]
    try:
      out[name] = np.array([float(c) if c.strip() else np.nan for c in cells], np.float64)
    except ValueError:
      if name in REQUIRED_COLUMNS:
        raise ValueError(f"Column {name!r} of {os.fspath(path)!r} must be numeric.") from None
      out[name] = np.array(cells, dtype=str)
  return out


def write_csv(
    path: str | os.PathLike, rows: Mapping[str, Sequence] | Sequence[Mapping[str, object]]
) -> None:
  """Writes scaling-law data read back exactly by :func:`read_csv`.

  Args:
    path: file to (over)write.
    rows: columns (name -> values, as :func:`read_csv` returns) or records
      (a list of dicts, e.g. one per run; missing cells are left empty). Must
      contain ``N``, ``D`` and ``loss``. Floats are written with ``repr`` (exact
      round trip) and NaN as an empty cell.
  """
  if isinstance(rows, Mapping):
    names = list(rows)
    columns = [list(np.ravel(np.asarray(rows[name], dtype=object))) for name in names]
    lengths = {name: len(c) for name, c in zip(names, columns, strict=True)}
    if len(set(lengths.values())) > 1:
      raise ValueError(f"`rows` columns must have the same length, got {lengths}.")
    records = [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]
  else:
    records = [dict(r) for r in rows]
    names = list(dict.fromkeys(k for r in records for k in r))
  _check_columns(names, "`rows`")
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=names)
    writer.writeheader()
    for record in records:
      writer.writerow({k: _cell(v) for k, v in record.items()})


def _cell(value) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, (bool, np.bool_)):
    return str(bool(value))
  if isinstance(value, numbers.Integral):
    return str(int(value))
  if isinstance(value, numbers.Real):
    return "" if math.isnan(value) else repr(float(value))
  return str(value)
