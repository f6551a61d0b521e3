"""Test oracle: a NumPy float32 port of Harma et al.'s integer quantizer.

Ports ``quantize`` and ``Quantizer`` (``configure``, ``find_params(x, weight=True)``,
``quantize``) of ``src/transformers/bfp/int_ops.py`` in
github.com/parsa-epfl/quantization-sparsity-interplay (the code of Harma et al. 2024,
"Effective Interplay between Sparsity and Quantization: From Theory to Practice", itself
GPTQ's / SparseGPT's quantizer), statement by statement, with ``torch`` replaced by
``numpy`` on float32 arrays. Only the path the paper's weights take is ported:
``weight=True``, ``mse=False``, ``grouprows=1``, per tensor or per output channel (the
rows of a ``(out, in)`` weight). ``torch.round`` rounds half to even like ``np.round``;
the float32 division by ``maxq`` (an int64 tensor in the reference) is the float32 one.

This file deliberately follows the reference rather than ``jaxprune.quant``.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def quantize(x, scale, zero, maxq):
  q = np.clip(np.round(x / scale) + zero, F32(0), maxq)
  return scale * (q - zero)


class Quantizer:
  """``Quantizer`` with ``configure(bits, perchannel, sym)`` and ``find_params(x, weight=True)``."""

  def __init__(self, bits, perchannel=True, sym=True):
    self.maxq = F32(2**bits - 1)
    self.perchannel = perchannel
    self.sym = sym

  def find_params(self, x):
    x = np.asarray(x, F32)
    shape = x.shape
    if self.perchannel:
      x = x.reshape(shape[0], -1)
    else:
      x = x.reshape(1, -1)

    tmp = np.zeros(x.shape[0], F32)
    xmin = np.minimum(x.min(1), tmp)
    xmax = np.maximum(x.max(1), tmp)

    if self.sym:
      xmax = np.maximum(np.abs(xmin), xmax)
      tmp = xmin < 0
      if np.any(tmp):
        xmin[tmp] = -xmax[tmp]
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1

    self.scale = (xmax - xmin) / self.maxq
    if self.sym:
      self.zero = np.full_like(self.scale, (self.maxq + 1) / 2)
    else:
      self.zero = np.round(-xmin / self.scale)

    if not self.perchannel:
      self.scale = np.repeat(self.scale, shape[0])
      self.zero = np.repeat(self.zero, shape[0])
    shape = [-1] + [1] * (len(shape) - 1)
    self.scale = self.scale.reshape(shape)
    self.zero = self.zero.reshape(shape)

  def quantize(self, x):
    if self.ready():
      return quantize(np.asarray(x, F32), self.scale, self.zero, self.maxq)
    return x

  def ready(self):
    return np.all(self.scale != 0)


def harma_quantize(w, bits, *, perchannel=True, sym=True):
  """The reference's fake-quantized weight: ``find_params(w, weight=True)``, then ``quantize``."""
  quantizer = Quantizer(bits, perchannel=perchannel, sym=sym)
  quantizer.find_params(w)
  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    return quantizer.quantize(np.asarray(w, F32))
