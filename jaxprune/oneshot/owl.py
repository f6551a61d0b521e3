"""OWL: outlier-weighed layerwise sparsity (Yin et al. 2024).

"Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning
LLMs to High Sparsity", ICML 2024 (https://arxiv.org/abs/2310.05175);
reference code luuyin/OWL, ``prune_wanda_outlier`` and ``check_outlier_mean``.

The layerwise outlier distribution: for layer ``l`` (a transformer block,
all of its linear layers together) with Wanda scores ``A = |W| * ||X||``, the
outlier ratio is the fraction of scores above ``M`` times their mean,

.. math::  D_l = \\frac{\\#\\{a \\in A_l : a > M \\bar A_l\\}}{|A_l|}.

Layers with more outliers are pruned less: with ``D`` min-max normalised to
``[0, 1]`` and scaled by ``2 lambda``,

.. math::

   \\hat D_l = 2\\lambda \\frac{D_l - \\min D}{\\max D - \\min D}, \\qquad
   s_l = S - (\\hat D_l - \\overline{\\hat D}),

so the per-layer sparsities span ``2 lambda`` and their mean is the target
``S``. (The reference computes densities ``1 - s_l`` the same way; it reports
the ratio in percent, which the normalisation cancels.)
"""

from __future__ import annotations

import fractions
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _checks

Array = jax.Array


def outlier_ratio(scores: Array | Sequence[Array], threshold: float = 5.0) -> Array:
  """Fraction of ``scores`` greater than ``threshold`` times their mean (OWL's ``D_l``).

  Args:
    scores: an array, or a sequence of arrays taken together (the Wanda scores
      ``|W| * ||X||`` of every linear layer of one transformer block).
    threshold: ``M`` (5 in the paper's LLaMA experiments).

  Returns:
    A float32 scalar in [0, 1]; jittable.
  """
  if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not (
      threshold > 0 and math.isfinite(threshold)):
    raise ValueError(f"`threshold` (OWL's M) must be a finite number > 0, got {threshold!r}.")
  leaves = [jnp.ravel(jnp.asarray(s, jnp.float32))
            for s in (scores if isinstance(scores, list | tuple) else [scores])]
  flat = jnp.concatenate(leaves)
  return jnp.mean((flat > jnp.mean(flat) * threshold).astype(jnp.float32))


def _exact_mean_fix(values: list[float], target: float) -> list[float]:
  """Moves the smallest value by the float residual so that ``sum(values) == n * target`` exactly.

  The sum is taken exactly (as rationals); the correction is the residual,
  representable at the finest spacing among the values (the smallest one).
  """
  goal = fractions.Fraction(target) * len(values)
  out = list(values)
  for _ in range(4):
    residual = goal - sum(map(fractions.Fraction, out))
    if residual == 0:
      return out
    i = int(np.argmin(out))
    out[i] = float(fractions.Fraction(out[i]) + residual)
  return out


def owl_sparsities(outlier_ratios: Sequence[float] | Array, target: float, *,
                   lam: float = 0.08) -> list[float]:
  """Per-layer sparsities from outlier ratios: more outliers, less pruning; mean ``target``.

  Args:
    outlier_ratios: ``D_l`` per layer (e.g. from :func:`outlier_ratio`).
    target: the mean sparsity ``S``, in [0, 1).
    lam: ``lambda``, half the spread of the sparsities (0.08 in the paper's
      LLaMA-7B setting); the sparsities span ``[S - 2 lambda + ..., ...]`` with
      ``max - min = 2 lambda`` unless every ratio is equal (then all are ``S``).

  Returns:
    A list of floats, one per layer, each in [0, 1), whose mean is ``target``
    (their sum equals ``len * target`` exactly, as rationals; the reference's
    float arithmetic leaves a rounding error).

  Raises:
    ValueError: for ``target`` outside [0, 1), ``lam < 0``, non-finite ratios,
      or a ``lam`` so large that a layer's sparsity leaves [0, 1) (the reference
      clips it to 0.01, which moves the mean off the target).
  """
  _checks.check_sparsity("target", target)
  if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not (
      lam >= 0 and math.isfinite(lam)):
    raise ValueError(f"`lam` (OWL's lambda) must be a finite number >= 0, got {lam!r}.")
  d = np.asarray(outlier_ratios, np.float64).reshape(-1)
  if d.size == 0 or not np.all(np.isfinite(d)):
    raise ValueError(f"`outlier_ratios` must be a non-empty sequence of finite numbers, got {d}.")
  spread = d.max() - d.min()
  scaled = (d - d.min()) / spread * 2 * lam if spread > 0 else np.zeros_like(d)
  out = _exact_mean_fix([float(target - (x - scaled.mean())) for x in scaled], float(target))
  bad = [(i, s) for i, s in enumerate(out) if not 0.0 <= s < 1.0]
  if bad:
    raise ValueError(f"`lam` = {lam} moves layer sparsities out of [0, 1) around the target "
                     f"{target}: {bad}; use a smaller `lam`.")
  return out
