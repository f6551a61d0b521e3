"""Test oracle: a literal NumPy float32 port of torchao's NVFP4 quantization.

Ports, from github.com/pytorch/ao at commit 36027d8 (``torchao/prototype/mx_formats/``),
``per_tensor_amax_to_scale`` and ``nvfp4_quantize`` (``nvfp4_tensor.py``, the
two-level path with a per-tensor scale), ``NVFP4Tensor.dequantize`` /
``get_hp_scales``, ``pack_uint4`` / ``unpack_uint4`` (``kernels.py``) and
``_f32_to_floatx_unpacked`` / ``_floatx_unpacked_to_f32``
(``torchao/prototype/custom_fp_utils.py``, called by ``f32_to_f4_unpacked`` /
``f4_unpacked_to_f32``), statement by statement, with ``torch`` replaced by
``numpy`` on float32 arrays. This is the PyTorch *CPU* path: NumPy, like PyTorch
on CPU, divides and multiplies float32 with IEEE rounding and keeps subnormals.
(PyTorch on CUDA divides by a Python scalar by multiplying with its reciprocal,
so ``max_abs / 6.0`` and ``amax / 2688.0`` can differ there by an ulp.)

Notes on the port:

* ``x.to(torch.float8_e4m3fn)`` is ``ml_dtypes``' cast (round to nearest even);
  its input is always clamped to ``[E4M3_EPS, 448] = [2^-6, 448]`` first (NaN
  passes the clamp and casts to NaN in both), so the two libraries' different
  overflow rules never matter.
* ``torch.clamp`` and ``np.clip`` both propagate NaN; ``torch.amax`` and
  ``np.max`` both return NaN for a NaN input.
* ``Tensor.__rtruediv__`` is ``self.reciprocal() * other``: ``1.0 / t`` is the
  correctly rounded reciprocal (times 1.0, exact).
* ``int32 -> uint8`` conversions wrap modulo 256 (as C's conversion).

This file deliberately follows the reference rather than ``jaxprune.quant``:
it returns NaN for an all-zero tensor, as torchao does.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

F32 = np.float32
F8E4M3_MAX = 448.0
F4_E2M1_MAX = 6.0
E4M3_EPS = 2.0**-6  # torch.finfo(torch.float8_e4m3fn).tiny, the smallest normal

EBITS_F32, MBITS_F32 = 8, 23
F32_EXP_BIAS = 127


def _n_ones(n: int) -> int:
  return (1 << n) - 1


def f32_to_floatx_unpacked(x: np.ndarray, ebits: int, mbits: int) -> np.ndarray:
  """``_f32_to_floatx_unpacked``: float32 to sub-byte float codes (RNE, saturating)."""
  assert x.dtype == np.float32
  exp_bias = _n_ones(ebits - 1)
  max_int = _n_ones(ebits + mbits)
  sign_mask = 1 << (ebits + mbits)
  magic_adder = _n_ones(MBITS_F32 - mbits - 1)
  max_normal = 2 ** (_n_ones(ebits) - exp_bias) * (_n_ones(mbits + 1) / (2**mbits))
  min_normal = 2 ** (1 - exp_bias)
  denorm_exp = (F32_EXP_BIAS - exp_bias) + (MBITS_F32 - mbits) + 1
  denorm_mask_int = denorm_exp << MBITS_F32
  denorm_mask_float = np.array(denorm_mask_int, np.int32).view(F32)

  x = x.view(np.int32)
  sign = x & np.int32(-(2**31))  # 0x80000000 as an int32
  x = x ^ sign
  x = x.view(F32)

  with np.errstate(invalid="ignore"):
    saturate_mask = x >= max_normal
    denormal_mask = np.logical_and(np.logical_not(saturate_mask), x < min_normal)
  normal_mask = np.logical_not(np.logical_or(saturate_mask, denormal_mask))

  denormal_x = (x + denorm_mask_float).view(np.int32)
  denormal_x = denormal_x - np.int32(denorm_mask_int)
  denormal_x = denormal_x.astype(np.uint8)

  normal_x = x.view(np.int32)
  mant_odd = (normal_x >> (MBITS_F32 - mbits)) & 1
  val_to_add = ((exp_bias - F32_EXP_BIAS) << MBITS_F32) + magic_adder
  normal_x = normal_x + np.int32(val_to_add)
  normal_x = normal_x + mant_odd
  normal_x = normal_x >> (MBITS_F32 - mbits)
  normal_x = normal_x.astype(np.uint8)

  out = np.full(x.shape, max_int, np.uint8)
  out = np.where(denormal_mask, denormal_x, out)
  out = np.where(normal_mask, normal_x, out)

  sign_lp = sign >> (MBITS_F32 + EBITS_F32 - mbits - ebits)
  sign_lp = sign_lp.astype(np.uint8)
  sign_lp = sign_lp & np.uint8(sign_mask)
  return (out | sign_lp).astype(np.uint8)


def floatx_unpacked_to_f32(x: np.ndarray, ebits: int, mbits: int) -> np.ndarray:
  """``_floatx_unpacked_to_f32`` for ``mbits == 1`` (its fast path; E2M1 is all we port)."""
  assert x.dtype == np.uint8 and mbits == 1
  sign_mask = 1 << (ebits + mbits)
  exp_bias = _n_ones(ebits - 1)
  mantissa_mask = _n_ones(mbits)
  sign_lp = x & np.uint8(sign_mask)
  x_pos = x ^ sign_lp
  zero_mask = x_pos == 0
  denormal_mask = np.logical_and(x_pos > 0, (x_pos >> mbits) == 0)
  exp_biased_lp = x_pos >> mbits
  exp_biased_f32 = exp_biased_lp.astype(np.int32) - exp_bias + F32_EXP_BIAS
  exp_biased_f32 = exp_biased_f32.astype(np.int32) << MBITS_F32
  mantissa_lp_int32 = (x_pos & mantissa_mask).astype(np.int32)
  mantissa_f32 = mantissa_lp_int32 << (MBITS_F32 - mbits)
  result = exp_biased_f32 | mantissa_f32
  result[zero_mask] = 0
  denormal_exp_biased = 1 - exp_bias + F32_EXP_BIAS
  result[denormal_mask] = (denormal_exp_biased - mbits) << MBITS_F32
  sign_f32 = sign_lp.astype(np.int32) << (MBITS_F32 - mbits + EBITS_F32 - ebits)
  result = result | sign_f32
  return result.view(F32)


def f32_to_f4_unpacked(x: np.ndarray) -> np.ndarray:
  return f32_to_floatx_unpacked(x, 2, 1)


def f4_unpacked_to_f32(x: np.ndarray) -> np.ndarray:
  return floatx_unpacked_to_f32(x, 2, 1)


def pack_uint4(uint8_data: np.ndarray) -> np.ndarray:
  shape = uint8_data.shape
  assert shape[-1] % 2 == 0
  flat = np.ascontiguousarray(uint8_data).reshape(-1)
  return (flat[::2] | flat[1::2] << 4).reshape(*shape[:-1], shape[-1] // 2)


def unpack_uint4(uint8_data: np.ndarray) -> np.ndarray:
  shape = uint8_data.shape
  first_elements = (uint8_data & 0b1111).astype(np.uint8)
  second_elements = (uint8_data >> 4).astype(np.uint8)
  return np.stack([first_elements, second_elements], axis=-1).reshape(*shape[:-1], shape[-1] * 2)


def per_tensor_amax_to_scale(amax) -> np.ndarray:
  """``amax.to(torch.float32) / (F8E4M3_MAX * F4_E2M1_MAX)``."""
  return np.asarray(amax, F32) / F32(F8E4M3_MAX * F4_E2M1_MAX)


def nvfp4_quantize(data_hp: np.ndarray, block_size: int, per_tensor_scale: np.ndarray):
  """``nvfp4_quantize`` with a per-tensor scale: ``(block scales as e4m3, packed codes)``."""
  assert data_hp.dtype in (np.float32, ml_dtypes.bfloat16)
  assert data_hp.shape[-1] % block_size == 0
  assert block_size == 16
  orig_shape = data_hp.shape
  data_hp = data_hp.astype(F32).reshape(orig_shape[0], -1, block_size)

  max_abs = np.max(np.abs(data_hp), axis=-1)
  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    block_scale = max_abs / F32(F4_E2M1_MAX)
    block_scale_fp32 = block_scale.astype(F32)
    scaled_block_scales = block_scale_fp32 / per_tensor_scale
    scaled_block_scales_fp8 = np.clip(scaled_block_scales, F32(E4M3_EPS), F32(F8E4M3_MAX)).astype(
        ml_dtypes.float8_e4m3fn)
    scaled_block_scales_fp32 = scaled_block_scales_fp8.astype(F32)
    reciprocal_scale = (F32(1.0) / per_tensor_scale * F32(1.0)) / scaled_block_scales_fp32
    data_scaled = data_hp * reciprocal_scale[..., None]
    out_scales = scaled_block_scales_fp8

    data_scaled = np.clip(data_scaled, F32(-F4_E2M1_MAX), F32(F4_E2M1_MAX))
  data_scaled = data_scaled.reshape(orig_shape)
  data_lp = f32_to_f4_unpacked(data_scaled)
  data_lp = pack_uint4(data_lp)
  return out_scales, data_lp


def dequantize(qdata: np.ndarray, scale: np.ndarray, per_tensor_scale: np.ndarray,
               block_size: int = 16) -> np.ndarray:
  """``NVFP4Tensor.dequantize`` (2-D, not transposed, not swizzled), as float32."""
  m, k = qdata.shape[0], qdata.shape[1] * 2
  data_f32 = f4_unpacked_to_f32(unpack_uint4(qdata)).reshape(m, k // block_size, block_size)
  with np.errstate(invalid="ignore", over="ignore"):
    hp_scales = per_tensor_scale * scale.astype(F32)  # get_hp_scales
    return (data_f32 * hp_scales.reshape(m, k // block_size, 1).astype(F32)).reshape(m, k)


def fake_quantize(x: np.ndarray) -> np.ndarray:
  """What torchao's NVFP4 weight flow computes for a 2-D ``x`` (float32 or bfloat16), blocks
  along the last axis: ``per_tensor_scale = per_tensor_amax_to_scale(max |x|)``, then
  ``to_nvfp4`` and ``dequantize`` back to ``x``'s dtype."""
  amax = np.max(np.abs(x))
  per_tensor_scale = per_tensor_amax_to_scale(amax)
  scales, qdata = nvfp4_quantize(x, 16, per_tensor_scale)
  return dequantize(qdata, scales, per_tensor_scale).astype(x.dtype)
