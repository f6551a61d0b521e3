"""Test oracle: a literal NumPy float32 port of microxcaling's MX quantization.

Ports ``_get_format_params`` (mx/formats.py), ``_round_mantissa``,
``_quantize_elemwise_core`` (mx/elemwise_ops.py), ``_shared_exponents``,
``_reshape_to_blocks``, ``_undo_reshape_to_blocks`` and ``_quantize_mx``
(mx/mx_ops.py) of github.com/microsoft/microxcaling, for the non-CUDA path,
statement by statement, with ``torch`` replaced by ``numpy`` on float32 arrays
(NumPy keeps subnormals, like PyTorch on CPU). Only what ``_quantize_mx`` uses
is ported: of ``_round_mantissa``'s modes, ``'even'`` and ``'nearest'``
(microxcaling's default, ``sign(A) floor(|A| + 0.5)``), not ``'floor'`` or
``'dither'``. ``torch.sign(-0.0)`` is ``+0.0`` like ``np.sign``; ``np.log2`` on
float32 stands in for ``torch.log2``.

This file deliberately follows the reference rather than ``jaxprune.quant``.
"""

from __future__ import annotations

import numpy as np

FP32_EXPONENT_BIAS = 127
FP32_MIN_NORMAL = 2 ** (-FP32_EXPONENT_BIAS + 1)

F32 = np.float32


def _get_format_params(fmt):
  """Returns ``(ebits, mbits, emax, max_norm, min_norm)``; mbits counts sign and implicit bits."""
  if fmt == "int8":
    ebits, mbits = 0, 8
    emax = 0
  elif fmt == "fp8_e5m2":
    ebits, mbits = 5, 4
    emax = 2 ** (ebits - 1) - 1
  elif fmt == "fp8_e4m3":
    ebits, mbits = 4, 5
    emax = 2 ** (ebits - 1)
  elif fmt == "fp6_e3m2":
    ebits, mbits = 3, 4
    emax = 2 ** (ebits - 1)
  elif fmt == "fp6_e2m3":
    ebits, mbits = 2, 5
    emax = 2 ** (ebits - 1)
  elif fmt == "fp4_e2m1":
    ebits, mbits = 2, 3
    emax = 2 ** (ebits - 1)
  else:
    raise ValueError(fmt)
  if fmt != "fp8_e4m3":
    max_norm = 2**emax * float(2 ** (mbits - 1) - 1) / 2 ** (mbits - 2)
  else:
    max_norm = 2**emax * 1.75
  min_norm = 0 if ebits == 0 else 2 ** (2 - 2 ** (ebits - 1))
  return ebits, mbits, emax, max_norm, min_norm


def _safe_lshift(x, bits, exp):
  if exp is None:
    return x * F32(2**bits)
  return x / (F32(2) ** exp) * F32(2**bits)


def _safe_rshift(x, bits, exp):
  if exp is None:
    return x / F32(2**bits)
  return x / F32(2**bits) * (F32(2) ** exp)


def _round_mantissa(A, bits, round, clamp=False):
  if round == "even":
    absA = np.abs(A)
    # find 0.5, 2.5, 4.5 ...
    maskA = ((absA - F32(0.5)) % F32(2) == np.zeros_like(A)).astype(A.dtype)
    A = np.sign(A) * (np.floor(absA + F32(0.5)) - maskA)
  elif round == "nearest":
    A = np.sign(A) * np.floor(np.abs(A) + F32(0.5))
  else:
    raise ValueError(round)
  if clamp:
    max_mantissa = 2 ** (bits - 1) - 1
    A = np.clip(A, -max_mantissa, max_mantissa)
  return A


def _quantize_elemwise_core(A, bits, exp_bits, max_norm, round="nearest",
                            saturate_normals=False, allow_denorm=True):
  if not allow_denorm and exp_bits > 0:
    min_norm = 2 ** (2 - 2 ** (exp_bits - 1))
    out = (np.abs(A) >= min_norm).astype(A.dtype) * A
  else:
    out = A

  if exp_bits != 0:
    private_exp = np.floor(np.log2(np.abs(A) + (A == 0).astype(A.dtype)))
    # The minimum representable exponent for 8 exp bits is -126
    min_exp = -(2 ** (exp_bits - 1)) + 2
    private_exp = np.clip(private_exp, min_exp, None)
  else:
    private_exp = None

  # Scale up so appropriate number of bits are in the integer portion of the number
  out = _safe_lshift(out, bits - 2, private_exp)
  out = _round_mantissa(out, bits, round, clamp=False)
  # Undo scaling
  out = _safe_rshift(out, bits - 2, private_exp)

  # Set values > max_norm to Inf if desired, else clamp them
  if saturate_normals or exp_bits == 0:
    out = np.clip(out, F32(-max_norm), F32(max_norm))
  else:
    out = np.where(np.abs(out) > max_norm, np.sign(out) * F32(np.inf), out)

  # handle Inf/NaN
  out[A == F32(np.inf)] = np.inf
  out[A == -F32(np.inf)] = -np.inf
  out[A == F32(np.nan)] = np.nan  # never true, as in the reference
  return out


def _shared_exponents(A, method="max", axes=None, ebits=0):
  if method == "max":
    if axes is None:
      shared_exp = np.max(np.abs(A))
    else:
      shared_exp = A
      for axis in axes:
        shared_exp = np.max(np.abs(shared_exp), axis=axis, keepdims=True)
  else:
    raise ValueError(method)

  # log2(shared_exp) and truncate to integer
  shared_exp = np.floor(
    np.log2(shared_exp + F32(FP32_MIN_NORMAL) * (shared_exp == 0).astype(shared_exp.dtype)))

  if ebits > 0:
    emax = 2 ** (ebits - 1) - 1
    shared_exp[shared_exp > emax] = np.nan
    shared_exp[shared_exp < -emax] = -emax
  return shared_exp


def _reshape_to_blocks(A, axes, block_size):
  axes = sorted(x + A.ndim if x < 0 else x for x in axes)
  for i in range(len(axes)):
    axes[i] += i  # Shift axes due to added dimensions
    A = np.expand_dims(A, axes[i] + 1)

  orig_shape = A.shape
  pad = [[0, 0] for _ in orig_shape]
  do_padding = False
  for axis in axes:
    if orig_shape[axis] % block_size:
      pad[axis][1] = block_size - orig_shape[axis] % block_size
      do_padding = True
  if do_padding:
    A = np.pad(A, pad, mode="constant")

  def _reshape(shape, reshape_block_size):
    for axis in axes:
      if shape[axis] >= reshape_block_size:
        assert shape[axis] % reshape_block_size == 0
        shape[axis + 1] = reshape_block_size
        shape[axis] = shape[axis] // reshape_block_size
      else:
        shape[axis + 1] = shape[axis]
        shape[axis] = 1
    return shape

  padded_shape = A.shape
  A = A.reshape(_reshape(list(padded_shape), block_size))
  return A, axes, orig_shape, padded_shape


def _undo_reshape_to_blocks(A, padded_shape, orig_shape, axes):
  A = A.reshape(padded_shape)
  if list(padded_shape) != list(orig_shape):
    A = A[tuple(slice(0, x) for x in orig_shape)]
  for axis in reversed(axes):
    A = np.squeeze(A, axis=axis + 1)
  return A


def quantize_mx(A, scale_bits, elem_format, shared_exp_method="max", axes=None,
                block_size=0, round="nearest", flush_fp32_subnorms=False):
  """``_quantize_mx`` of mx/mx_ops.py (without the custom CUDA branches)."""
  A = np.array(A, dtype=np.float32)
  axes = [axes] if isinstance(axes, int) else axes
  axes = [x + A.ndim if x < 0 else x for x in axes]
  ebits, mbits, emax, max_norm, _ = _get_format_params(elem_format)

  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    if block_size > 0:
      A, axes, orig_shape, padded_shape = _reshape_to_blocks(A, axes, block_size)

    shared_exp_axes = [x + 1 for x in axes] if block_size > 0 else axes

    shared_exp = _shared_exponents(A, method=shared_exp_method, axes=shared_exp_axes, ebits=0)

    if flush_fp32_subnorms:
      A = A * (shared_exp > -FP32_EXPONENT_BIAS).astype(A.dtype)

    shared_exp = shared_exp - F32(emax)

    scale_emax = 2 ** (scale_bits - 1) - 1
    shared_exp[shared_exp > scale_emax] = np.nan
    shared_exp[shared_exp < -scale_emax] = -scale_emax

    A = A / (F32(2) ** shared_exp)
    A = _quantize_elemwise_core(A, mbits, ebits, max_norm, round=round,
                                allow_denorm=True, saturate_normals=True)
    A = A * (F32(2) ** shared_exp)

    if block_size:
      A = _undo_reshape_to_blocks(A, padded_shape, orig_shape, axes)
  return A


# jaxprune's MX names -> the reference's element format names.
ELEM_FORMAT = {
  "mxfp8_e4m3": "fp8_e4m3",
  "mxfp8_e5m2": "fp8_e5m2",
  "mxfp6_e3m2": "fp6_e3m2",
  "mxfp6_e2m3": "fp6_e2m3",
  "mxfp4_e2m1": "fp4_e2m1",
  "mxint8": "int8",
}
