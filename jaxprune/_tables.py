"""Aligned plain-text tables for the reports of :mod:`jaxprune.compress_errors` and
:mod:`jaxprune.compress_sizes`."""

from __future__ import annotations


def text_table(header: list[str], lines: list[list[str]], totals: list[list[str]]) -> str:
  """Left-aligned columns: the header, a rule, the lines, a rule, the totals."""
  widths = [max(len(c[i]) for c in [header, *lines, *totals]) for i in range(len(header))]

  def fmt(cells):
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

  rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
  return "\n".join([fmt(header), rule, *map(fmt, lines), rule, *map(fmt, totals)])
