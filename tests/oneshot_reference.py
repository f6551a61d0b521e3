"""numpy ports of the reference code of SparseGPT, GPTQ, Wanda and OWL: the test oracles.

Ported from (PyTorch, weights in the ``nn.Linear`` layout ``(out, in)``):

* IST-DASLab/sparsegpt ``sparsegpt.py``: ``SparseGPT.fasterprune``;
* IST-DASLab/gptq ``gptq.py``: ``GPTQ.fasterquant`` (with ``static_groups``);
* locuslab/wanda ``lib/prune.py``: ``prune_wanda`` (the per-layer part) and
  ``lib/layerwrapper.py``: ``WrappedGPT.add_batch``;
* luuyin/OWL ``lib/prune_all.py``: ``check_outlier_mean`` and the layerwise
  ratio adjustment of ``prune_wanda_outlier``.

Each port keeps the reference's loops, its order of operations and its
``(out, in)`` layout, so that the comparison with jaxprune's vectorised
``(in, out)`` code checks the layout handling too. The arithmetic dtype is
whatever the inputs are (the tests run float32, as the reference does).
Where jaxprune deliberately differs, the port takes a parameter and the
default is the reference's behaviour:

* ``count``: how many saliencies the unstructured mask prunes. The reference
  prunes those ``<= sort(tmp)[int(numel * sparsity)]``, i.e. ``int(numel *
  sparsity) + 1``; jaxprune prunes ``round(numel * sparsity)``.
* ``quantizer``: an object with ``find_params(x, first)`` (x: ``(out, cols)``,
  the columns starting at original column ``first``) and ``quantize(x, col)``
  for original column ``col``, like the reference's ``Quantizer`` (which
  ignores ``first`` and ``col``); the tests plug in jaxprune's symmetric
  absmax int grid (the reference's symmetric grid has ``2^k`` levels and a
  zero point), with or without jaxprune's pin (the entry that sets a scale
  rounds to ``+-q_max``), and an MX grid on a fixed block exponent.
* N:M: the reference's ``prunen`` is the number *pruned* per group of
  ``prunem`` (its "2:4" prunes 2); jaxprune's ``nm=(n, m)`` keeps ``n``.
"""

from __future__ import annotations

import copy

import numpy as np
import scipy.linalg


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
  """torch: ``cholesky(h)``, ``cholesky_inverse``, ``cholesky(upper=True)``."""
  lower = np.linalg.cholesky(h)
  inverse = scipy.linalg.cho_solve((lower, True), np.eye(h.shape[0], dtype=h.dtype))
  return np.linalg.cholesky(inverse).T.astype(h.dtype)


def add_batch(h: np.ndarray, nsamples: int, inp: np.ndarray) -> tuple[np.ndarray, int]:
  """``SparseGPT.add_batch`` / ``GPTQ.add_batch`` for an ``nn.Linear``: running mean of 2 x x^T."""
  if inp.ndim == 2:
    inp = inp[None]
    tmp = 1
  else:
    tmp = inp.shape[0]
  inp = inp.reshape(-1, inp.shape[-1]).T
  h = h * (nsamples / (nsamples + tmp))
  nsamples += tmp
  inp = np.sqrt(2 / nsamples).astype(h.dtype) * inp.astype(h.dtype)
  return h + inp @ inp.T, nsamples


def fasterprune(w, h, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01,
                count=None, quantizer=None, protect=None):
  """``SparseGPT.fasterprune`` on an ``(out, in)`` weight; returns ``(W, pruned_mask)``.

  ``protect``: an ``(out, in)`` bool array of entries never pruned (their
  saliency is taken as infinite); jaxprune protects the entry that sets each
  int quantization scale. The reference has no such option.
  """
  w = w.copy()
  h = h.copy()
  rows, columns = w.shape
  if quantizer is not None:
    quantizer.find_params(w, 0)
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  damp = percdamp * np.mean(np.diag(h))
  diag = np.arange(columns)
  h[diag, diag] += damp
  hinv = _inverse_cholesky_upper(h)
  pruned = np.zeros_like(w, dtype=bool)

  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    n = i2 - i1
    w1 = w[:, i1:i2].copy()
    q1 = np.zeros_like(w1)
    err1 = np.zeros_like(w1)
    hinv1 = hinv[i1:i2, i1:i2]

    if prunen == 0:
      tmp = w1**2 / (np.diag(hinv1).reshape((1, -1)))**2
      if protect is not None:
        tmp = np.where(protect[:, i1:i2], np.inf, tmp)
      k = int(tmp.size * sparsity) + 1 if count is None else count(tmp.size)
      if k == 0:
        mask1 = np.zeros_like(tmp, dtype=bool)
      else:
        thresh = np.sort(tmp.flatten())[k - 1]
        mask1 = tmp <= thresh
    else:
      mask1 = np.zeros_like(w1, dtype=bool)

    for i in range(n):
      wc = w1[:, i]
      d = hinv1[i, i]
      if prunen != 0 and i % prunem == 0:
        tmp = w1[:, i:(i + prunem)]**2 / (np.diag(hinv1)[i:(i + prunem)].reshape((1, -1)))**2
        if protect is not None:
          tmp = np.where(protect[:, i1 + i:i1 + i + prunem], np.inf, tmp)
        smallest = np.argsort(tmp, axis=1, kind="stable")[:, :prunen]
        np.put_along_axis(mask1, i + smallest, True, axis=1)
      q = wc.copy()
      q[mask1[:, i]] = 0
      if quantizer is not None:
        q = quantizer.quantize(q, i1 + i)
      q1[:, i] = q
      e = (wc - q) / d
      w1[:, i:] -= np.outer(e, hinv1[i, i:])
      err1[:, i] = e

    w[:, i1:i2] = q1
    pruned[:, i1:i2] = mask1
    w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
  return w, pruned


def fasterquant(w, h, quantizer, blocksize=128, percdamp=0.01, groupsize=-1, actorder=False,
                static_groups=False, find_params_before_dead=True):
  """``GPTQ.fasterquant`` on an ``(out, in)`` weight; returns ``Q``.

  ``find_params_before_dead``: the reference computes the per-channel scales
  before zeroing dead inputs (True); jaxprune after (False).
  """
  w = w.copy()
  h = h.copy()
  rows, columns = w.shape
  if find_params_before_dead:
    quantizer.find_params(w, 0)
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  if not find_params_before_dead:
    quantizer.find_params(w, 0)

  groups = []
  if static_groups:
    for i in range(0, columns, groupsize):
      g = copy.deepcopy(quantizer)
      g.find_params(w[:, i:(i + groupsize)], i)
      groups.append(g)

  if actorder:
    perm = np.argsort(-np.diag(h), kind="stable")
    w = w[:, perm]
    h = h[perm][:, perm]
    invperm = np.argsort(perm)

  q_all = np.zeros_like(w)
  damp = percdamp * np.mean(np.diag(h))
  diag = np.arange(columns)
  h[diag, diag] += damp
  hinv = _inverse_cholesky_upper(h)

  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    n = i2 - i1
    w1 = w[:, i1:i2].copy()
    q1 = np.zeros_like(w1)
    err1 = np.zeros_like(w1)
    hinv1 = hinv[i1:i2, i1:i2]

    for i in range(n):
      wc = w1[:, i]
      d = hinv1[i, i]
      if groupsize != -1:
        if not static_groups:
          if (i1 + i) % groupsize == 0:
            quantizer.find_params(w[:, (i1 + i):(i1 + i + groupsize)], i1 + i)
        else:
          idx = i1 + i
          if actorder:
            idx = perm[idx]
          quantizer = groups[idx // groupsize]
      q = quantizer.quantize(wc, perm[i1 + i] if actorder else i1 + i)
      q1[:, i] = q
      e = (wc - q) / d
      w1[:, i:] -= np.outer(e, hinv1[i, i:])
      err1[:, i] = e

    q_all[:, i1:i2] = q1
    w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

  if actorder:
    q_all = q_all[:, invperm]
  return q_all


class AbsmaxQuantizer:
  """jaxprune's symmetric int grid in the reference's ``Quantizer`` interface (per output row).

  ``scale = amax / q_max``, ``Q(x) = scale * clip(round(x / scale), -q_max, q_max)``;
  an all-zero row has scale 0 and quantizes to 0. With ``pin``, the column
  that held a row's ``amax`` (the first, on ties) rounds to ``sign(x) * q_max``.
  """

  def __init__(self, bits: int, pin: bool = False):
    self.q_max = 2 ** (bits - 1) - 1
    self.pin = pin

  def find_params(self, x, first):
    self.amax = np.max(np.abs(x), axis=1)
    self.pin_col = first + np.argmax(np.abs(x), axis=1)
    self.scale = (self.amax / np.float32(self.q_max)).astype(x.dtype)

  def quantize(self, x, col):
    safe = np.where(self.scale == 0, 1, self.scale).astype(x.dtype)
    n = np.clip(np.round(x / safe), -self.q_max, self.q_max)
    if self.pin:
      n = np.where(self.pin_col == col, np.where(x < 0, -self.q_max, self.q_max), n)
    return np.where(self.scale == 0, 0, n * self.scale).astype(x.dtype)


class MXQuantizer:
  """An MX grid on a fixed block exponent, per output row, from microxcaling's element rounding.

  ``find_params``: ``e = floor(log2 amax) - emax`` (``amax`` 0: the row rounds to
  0), as ``_shared_exponents``; ``quantize``: ``_quantize_elemwise_core`` of
  ``x / 2^e``, times ``2^e`` (``tests/mx_reference.py``).
  """

  def __init__(self, fmt: str):
    import mx_reference

    self.elem = mx_reference.ELEM_FORMAT[fmt]
    self.ebits, self.mbits, self.emax, self.max_norm, _ = mx_reference._get_format_params(
        self.elem)
    self.core = mx_reference._quantize_elemwise_core

  def find_params(self, x, first):
    amax = np.max(np.abs(x), axis=1)
    with np.errstate(divide="ignore"):
      self.e = np.maximum(np.floor(np.log2(amax)) - self.emax, -127)
    self.zero = amax == 0

  def quantize(self, x, col):
    e = np.where(self.zero, 0, self.e).astype(np.float32)
    a = x / np.float32(2) ** e
    q = self.core(a, self.mbits, self.ebits, self.max_norm, round="even",
                  allow_denorm=True, saturate_normals=True)
    return np.where(self.zero, 0, q * np.float32(2) ** e).astype(x.dtype)


def wanda_scaler_row(inputs) -> np.ndarray:
  """``WrappedGPT.add_batch`` over batches ``[batch, tokens, in]``: mean of ||x_i||^2 per sample."""
  scaler_row = None
  nsamples = 0
  for inp in inputs:
    if inp.ndim == 2:
      inp = inp[None]
    tmp = inp.shape[0]
    inp = inp.reshape(-1, inp.shape[-1]).T
    if scaler_row is None:
      scaler_row = np.zeros(inp.shape[0], np.float32)
    scaler_row *= nsamples / (nsamples + tmp)
    nsamples += tmp
    scaler_row += np.linalg.norm(inp.astype(np.float32), ord=2, axis=1)**2 / nsamples
  return scaler_row


def prune_wanda_layer(w, scaler_row, sparsity_ratio, prune_n=0, prune_m=0, count=None):
  """The per-layer part of ``prune_wanda`` on an ``(out, in)`` weight; returns the pruned mask."""
  w_metric = np.abs(w) * np.sqrt(scaler_row.reshape((1, -1)))
  w_mask = np.zeros_like(w_metric, dtype=bool)
  if prune_n != 0:
    for ii in range(w_metric.shape[1]):
      if ii % prune_m == 0:
        tmp = w_metric[:, ii:(ii + prune_m)]
        smallest = np.argsort(tmp, axis=1, kind="stable")[:, :prune_n]
        np.put_along_axis(w_mask, ii + smallest, True, axis=1)
  else:
    order = np.argsort(w_metric, axis=-1, kind="stable")
    k = int(w_metric.shape[1] * sparsity_ratio) if count is None else count(w_metric.shape[1])
    np.put_along_axis(w_mask, order[:, :k], True, axis=1)
  return w_mask


def check_outlier_mean(w_metric: np.ndarray, threshold: float) -> float:
  """OWL's ``check_outlier_mean``: percent of entries above ``mean * threshold``."""
  max_shred = np.mean(w_metric) * threshold
  return float(np.sum(w_metric > max_shred)) / w_metric.size * 100


def owl_layer_sparsities(all_layer_ratio, sparsity_ratio: float, lamda: float) -> np.ndarray:
  """The adjustment in ``prune_wanda_outlier``: densities, then ``1 - density`` per layer."""
  all_layer_ratio = np.array(all_layer_ratio)
  all_layer_ratio = ((all_layer_ratio - all_layer_ratio.min())
                     * (1 / (all_layer_ratio.max() - all_layer_ratio.min()) * lamda * 2))
  all_layer_ratio = all_layer_ratio - np.mean(all_layer_ratio) + (1 - sparsity_ratio)
  return 1 - all_layer_ratio
