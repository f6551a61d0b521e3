"""Sampling parametrized cases for the quick suite.

README's test command (``-m "not slow"``) has a budget of 8 minutes on 2 cores; ``.ci/run``
runs every case. :func:`quick_sample` keeps the first ``keep`` cases of a parametrization in
the quick suite (put the most telling ones first) and marks the rest ``slow``.
"""

from __future__ import annotations

import pytest


def quick_sample(cases, keep: int) -> list:
  """``cases`` for ``pytest.mark.parametrize``: the first ``keep`` quick, the others slow."""
  out = []
  for i, case in enumerate(cases):
    if i < keep:
      out.append(case)
    else:
      values = case if isinstance(case, tuple) else (case,)
      out.append(pytest.param(*values, marks=pytest.mark.slow))
  return out
