"""NVFP4: FP4 E2M1 elements, an FP8 E4M3 scale per block of 16 and a float32 scale per tensor.

The arithmetic of :func:`nvfp4`, on a whole tensor laid out as blocks (the last
axis is one block); the definitions are in :mod:`jaxprune.quant`. It follows
torchao's NVFP4 bit for bit (``torchao/prototype/mx_formats/nvfp4_tensor.py``:
``per_tensor_amax_to_scale``, ``nvfp4_quantize``, ``NVFP4Tensor.dequantize``;
``_f32_to_floatx_unpacked`` in ``torchao/prototype/custom_fp_utils.py`` for the
E2M1 rounding), PyTorch's CPU arithmetic, where every division and product is
rounded once. Here every one of them is computed on integer significands
(:func:`jaxprune.quant_bits.divide`, :func:`jaxprune.quant_bits.multiply`) and the
E4M3 and E2M1 roundings are integer shifts (:mod:`jaxprune.quant_elements`), so
every backend gives the same bits, fast math and flushed subnormals included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import quant_bits as qb
from jaxprune.quant_elements import round_magnitude
from jaxprune.quant_formats import get_format

BLOCK_SIZE = 16
#: ``448 * 6``: the per-tensor scale is ``amax / TENSOR_MAX``, so that the largest block's
#: scale is E4M3's largest value and its largest element E2M1's.
TENSOR_MAX = 448.0 * 6.0
#: Tensors whose per-tensor scale is below this give signed zeros. torchao's arithmetic breaks
#: down just below it: ``1 / (s_t s_b)`` is infinite for ``s_t <= 2^-122`` in blocks whose scale
#: is clamped to ``2^-6``, ``1 / s_t`` for ``s_t <= 2^-128``, and ``s_t = 0`` gives NaN. From
#: ``2^-120`` on, ``s_t s_b >= 2^-126`` is a normal float32.
MIN_TENSOR_SCALE = 2.0**-120
E4M3 = get_format("fp8_e4m3")  # the block scales: E4M3FN, normal range [2^-6, 448]
E2M1 = get_format("mxfp4_e2m1")  # the elements: 0, 0.5, 1, 1.5, 2, 3, 4, 6

_SMALLEST_SCALE = int(np.float32(2.0**-6).view(np.int32))  # torch.finfo(e4m3fn).tiny
_LARGEST_SCALE = int(np.float32(448.0).view(np.int32))
_MIN_TENSOR_SCALE = int(np.float32(MIN_TENSOR_SCALE).view(np.int32))


def tensor_scale(amax: jax.Array) -> jax.Array:
  """``s_t = fl(amax / 2688)`` from the bits ``amax`` of a finite ``max |x|`` (torchao's
  ``per_tensor_amax_to_scale``)."""
  return qb.divide(qb.from_bits(amax), TENSOR_MAX)


def block_scales(block_amax: jax.Array, s_t: jax.Array) -> jax.Array:
  """``s_b = e4m3(clip(fl(fl(block_amax / 6) / s_t), 2^-6, 448))`` as float32, from the bits of
  each block's ``max |x|`` and a per-tensor scale ``s_t >= MIN_TENSOR_SCALE``."""
  unscaled = qb.divide(qb.divide(qb.from_bits(block_amax), E2M1.max_normal), s_t)
  clipped = jnp.clip(qb.bits(unscaled), _SMALLEST_SCALE, _LARGEST_SCALE)  # sbs >= 0: as ints
  return round_magnitude(clipped, E4M3)


def codes(mag: jax.Array, s_t: jax.Array, s_b: jax.Array) -> jax.Array:
  """The E2M1 values ``e2m1(fl(|x| fl(fl(1 / s_t) / s_b)))`` (round half to even, saturating at
  6), from the bits ``mag`` of ``|x|``; ``s_b`` broadcasts onto ``mag``."""
  reciprocal = qb.divide(jnp.broadcast_to(qb.divide(1.0, s_t), s_b.shape), s_b)
  (reciprocal,) = qb.computed_once(qb.bits(s_t), reciprocal)  # s_t > 0
  return round_magnitude(qb.bits(qb.multiply(qb.from_bits(mag), reciprocal)) & qb.MAG, E2M1)


def scales(g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(s_t, s_b, flushed)`` of a tensor laid out as blocks ``g[..., :]`` (float32): the
  per-tensor scale, the block scales (shape ``g.shape[:-1] + (1,)``) and whether
  ``s_t < MIN_TENSOR_SCALE`` (then ``s_t`` is returned as 1 and ``s_b`` is meaningless).
  Non-finite entries count as 0."""
  mag = qb.bits(g) & qb.MAG
  mag = jnp.where(mag >= qb.INF_BITS, 0, mag)
  s_t = tensor_scale(jnp.max(mag))
  flushed = qb.bits(s_t) < _MIN_TENSOR_SCALE
  s_t = jnp.where(flushed, 1.0, s_t)
  (s_t,) = qb.computed_once(qb.bits(s_t), s_t)
  (s_b,) = qb.computed_once(qb.bits(s_t), block_scales(jnp.max(mag, axis=-1, keepdims=True), s_t))
  return s_t, s_b, flushed


def nvfp4(g: jax.Array) -> jax.Array:
  """NVFP4 fake quantization of a whole tensor laid out as blocks ``g[..., :]`` (float32).

  ``fl(c fl(s_t s_b))`` with the sign of ``x``; zeros where ``s_t < MIN_TENSOR_SCALE`` (an
  all-zero tensor included); all NaN if any entry is NaN or infinite.
  """
  mag = qb.bits(g) & qb.MAG
  amax = jnp.max(mag)
  s_t, s_b, flushed = scales(g)
  (scale,) = qb.computed_once(qb.bits(s_t), qb.multiply(s_b, s_t))
  q = qb.bits(qb.multiply(codes(mag, s_t, s_b), scale))
  # Selected as integers: a float select may flush subnormal results (XLA:CPU fast math).
  q = jnp.where(flushed, 0, q) | (qb.bits(g) & qb.SIGN)
  return qb.from_bits(jnp.where(amax >= qb.INF_BITS, 0x7FC00000, q))
