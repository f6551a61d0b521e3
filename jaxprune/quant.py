"""Fake quantization: scaled integers, scaled FP8, OCP Microscaling (MX) and NVFP4.

``quantize(x, fmt)`` rounds ``x`` to a number format, multiplies back by the
format's scale and returns the result in ``x``'s dtype, so a model can be
trained or evaluated as if its tensors were stored in ``fmt``. The gradient is
straight-through: ``d quantize(x) / dx = I``.

Scaling groups
--------------
A *group* is the set of elements that share one scale:

* ``granularity='tensor'``: the whole array.
* ``granularity='channel'``: one scale per index of the dims other than
  ``axis``, i.e. the scale is reduced over ``axis``. For a Flax ``Dense`` kernel
  of shape ``(in, out)``, per-output-channel scales are ``axis=0``.
* ``granularity='block'``: ``block_size`` consecutive elements along ``axis``
  (``block_size`` must divide the size of ``axis``). MX formats always use
  blocks, of ``MX_BLOCK_SIZE = 32`` elements unless ``block_size`` is given;
  NVFP4 always uses blocks of ``NVFP4_BLOCK_SIZE = 16`` (and one more scale for
  the whole tensor).

Formats
-------
Below ``RNE`` is round-half-to-even, ``amax = max |x|`` over a group, and all
arithmetic is IEEE float32 (see *Arithmetic*).

**Scaled integers** ``'int2'`` ... ``'int8'`` (``k`` bits, ``q_max = 2^(k-1) - 1``):

.. math::

   s = amax / q_{max}, \\qquad
   Q(x) = s \\cdot \\mathrm{clip}(\\mathrm{RNE}(x / s), -q_{max}, q_{max}).

With ``symmetric=False`` (affine): ``lo = min(min x, 0)``, ``hi = max(max x, 0)``,
``s = (hi - lo) / (2^k - 1)``, integer zero point ``z = RNE(-lo / s)`` in
``[0, 2^k - 1]`` and ``Q(x) = s * (clip(RNE(x / s) + z, 0, 2^k - 1) - z)``, so
that 0 is exactly representable.

**Scaled FP8** ``'fp8_e4m3'`` (OCP E4M3FN: finite only, largest normal 448,
subnormals down to 2^-9) and ``'fp8_e5m2'`` (largest normal 57344, subnormals
down to 2^-16): ``s = amax / max_normal`` (``amax`` maps onto the largest
normal) and ``Q(x) = s * RNE_fmt(clip(x / s, -max_normal, max_normal))``, where
``RNE_fmt`` rounds to the nearest value of the format, *including its
subnormals*, ties to even (the same result as ``ml_dtypes`` casting after
saturation).

In both families an all-zero group has ``s = 0`` and output 0, outputs carry
the sign bit of ``x`` (a negative ``x`` that rounds to 0 gives ``-0.0``), and
the output is ``fl32(n * s)`` for an integer (or FP8 value) ``n`` whenever that
is a normal float32. Symmetric formats are idempotent, ``Q(Q(x)) == Q(x)``
bit for bit (``fl32(fl32(q_max * s) / q_max) == s`` for every float32 ``s``);
the affine variant is idempotent up to one ulp of the recomputed scale.

**MX** (OCP Microscaling Formats v1.0): ``'mxfp8_e4m3'``, ``'mxfp8_e5m2'``,
``'mxfp6_e3m2'``, ``'mxfp6_e2m3'``, ``'mxfp4_e2m1'``, ``'mxint8'``. Each block
shares an E8M0 power-of-two scale ``X = 2^e``. The result agrees bit for bit
(zeros' signs included) with ``mx.mx_ops._quantize_mx(A, scale_bits=8,
elem_format, block_size=..., axes=[axis], round='even')`` of Microsoft's
microxcaling library (its PyTorch path; default ``flush_fp32_subnorms=False``):

.. math::

   E &= \\lfloor \\mathrm{fl32}(\\log_2 amax) \\rfloor \\quad (amax = 0: E = -126) \\\\
   e &= \\max(E - e_{max}, -127) \\\\
   a_i &= x_i / 2^e \\\\
   p_i &= \\max(\\lfloor \\log_2 |a_i| \\rfloor, e_{min}) \\quad (p_i = 0 \\text{ for mxint8}) \\\\
   t_i &= |a_i| \\cdot 2^{m - p_i}, \\qquad
   r_i = \\lfloor t_i + 1/2 \\rfloor - [\\,t_i - 1/2 \\in 2\\mathbb{Z}\\,] \\\\
   Q(x_i) &= \\mathrm{sign}(a_i) \\cdot \\min(r_i \\cdot 2^{p_i - m}, max_{normal}) \\cdot 2^e

with the element parameters ``(e_max, e_min, m, max_normal)`` (``m`` = fraction
bits): e4m3 (8, -6, 3, 448), e5m2 (15, -14, 2, 57344), e3m2 (4, -2, 2, 28),
e2m3 (2, 0, 3, 7.5), e2m1 (2, 0, 1, 6), int8 (0, 0, 6, 127/64). So mxint8 is
the reference's sign-magnitude 1.6 fixed point: ``k / 64`` with ``|k| <= 127``
(its ``-2`` is never produced). Elements keep their format's subnormals
(``p_i`` is clamped at ``e_min``) and saturate at ``max_normal``. MX is
idempotent up to the sign of zeros (``-0.0`` gives ``+0.0``). Three details of
the reference's PyTorch path are kept on purpose and differ from the spec's
text (its CUDA kernels take ``E`` from the exponent bits instead):

* ``fl32(log2 amax)`` is log2 rounded to float32 (as ``torch.log2`` returns
  it), so for ``amax`` a few float32 ulps below a power of two ``2^k``
  (``|k| >= 3``; relative distance below about ``|k| * 2^-24 * ln 2``; 7456
  float32 values in all) the shared exponent is one larger than
  ``floor(log2 amax)``: the largest element rounds to ``2^k`` instead of
  saturating at ``max_normal * 2^e``, the others lose one bit. At the top of
  the range (``amax`` among the 44 largest finite float32) this gives
  ``E = 128``: mxint8 blocks become NaN (``e > 127``), and in the float
  formats elements that round to ``2^emax`` become ``2^128 = inf``.
* ``r_i`` is evaluated in float32: it is ``RNE(t_i)`` except for the single
  value ``t_i = 1/2 - 2^-25``, where ``t_i + 1/2`` rounds up to 1.
* ``sign(0) = +0``: a negative ``x_i`` whose element rounds to 0 gives
  ``-0.0``, but ``-0.0`` gives ``+0.0``, and so does a negative ``x_i`` for
  which ``x_i / 2^e`` underflows float32 to zero.

**NVFP4** ``'nvfp4'`` (NVIDIA's FP4 with two-level scaling): E2M1 elements
(``0, 0.5, 1, 1.5, 2, 3, 4, 6``), one E4M3 scale per block of 16 elements along
``axis`` and one float32 scale per tensor, which keeps the block scales inside
E4M3's range. With ``fl`` float32 rounding (every step rounded once, to nearest
even), ``amax`` over the whole tensor and ``b_amax`` over the block:

.. math::

   s_t &= \\mathrm{fl}(amax / 2688) \\qquad (2688 = 448 \\cdot 6) \\\\
   s_b &= \\mathrm{e4m3}(\\mathrm{clip}(\\mathrm{fl}(\\mathrm{fl}(b_{amax} / 6) / s_t),
          2^{-6}, 448)) \\\\
   c_i &= \\mathrm{e2m1}(\\mathrm{fl}(|x_i| \\cdot \\mathrm{fl}(\\mathrm{fl}(1 / s_t) / s_b))) \\\\
   Q(x_i) &= \\mathrm{sign}(x_i) \\cdot \\mathrm{fl}(c_i \\cdot \\mathrm{fl}(s_t \\cdot s_b))

where ``e4m3`` rounds to E4M3FN and ``e2m1`` to E2M1 (subnormal 0.5 included,
saturating at 6), both half to even. This is torchao's NVFP4 bit for bit (zeros'
signs included): ``per_tensor_amax_to_scale`` then ``nvfp4_quantize(x, 16,
per_tensor_scale)`` and ``NVFP4Tensor.dequantize`` of
``torchao/prototype/mx_formats/nvfp4_tensor.py``, with
``_f32_to_floatx_unpacked`` (``custom_fp_utils.py``) for ``e2m1``, on PyTorch's
CPU arithmetic. Details of the reference that are kept: the block scale is
clamped to E4M3's smallest *normal* value ``2^-6`` (torch's
``finfo(float8_e4m3fn).tiny``), so no block scale is an E4M3 subnormal: a block
that is tiny next to the tensor's largest (``b_amax < 2^-6 \\cdot 6 s_t``, about
``amax / 28672``) is rounded on the coarser grid of ``2^-6 s_t``, to 0 when below
``2^-8 s_t``; and the element is rounded from ``x`` times a rounded reciprocal,
not from a quotient. NaN or +-inf anywhere makes the whole tensor NaN, as in
the reference (through ``s_t``). One deliberate difference, where the reference
divides by zero or overflows: a tensor with ``s_t < 2^-120`` (``amax`` below
about ``2.0e-33``; every all-zero tensor) gives zeros with ``x``'s signs
(torchao: all NaN for an all-zero tensor; for ``s_t <= 2^-122``,
``1 / (s_t s_b)`` overflows in the blocks whose scale is clamped to ``2^-6``,
whose elements then become ``+-6 s_t s_b`` or NaN).

NVFP4 is not always idempotent in float32: ``Q(x)``'s largest entry is
``fl(6 fl(448 s_t))``, and ``fl(. / 2688)`` of it differs from ``s_t`` by an ulp
for about a third of all float32 ``s_t``; the codes and block scales repeat,
the outputs then move by an ulp. (With ``s_t`` of at most 19 significant bits,
``fl(6 fl(448 s_t)) = 2688 s_t`` exactly and ``Q`` is idempotent; QAT rounds
``s_t`` to 14, see :mod:`jaxprune.qat_grid`.) In bfloat16 it is idempotent: ``amax`` is a bfloat16
value, recomputed exactly.

Reference-exact modes
---------------------
``round='nearest'`` rounds ties half away from zero instead of to even, in
every family: the MX and FP8 element grids and the integers of int formats
(the affine zero point too). For MX it is microxcaling's default,
``_quantize_mx(..., round='nearest')``, whose ``_round_mantissa`` computes
``sign(A) floor(|A| + 1/2)`` in float32, and the default of Harma et al.'s MX
specs (``src/transformers/bfp/specs.py``, their copy of microxcaling's). The
result is bit-identical to it: the MX equations above with
``r_i = floor(t_i + 1/2)`` (in float32), and the same three details of the
reference's PyTorch path. Only exact ties
differ from ``'even'``: on 131,072 bf16-valued Gaussian inputs
(``jax.random.normal(key(0)).astype(bfloat16)``, blocks of 32 along the last
axis) ``'nearest'`` changes 4,202 elements in mxfp8_e4m3, 2,203 in
mxfp8_e5m2, 2,168 in mxfp6_e3m2, 3,233 in mxfp6_e2m3, 905 in mxfp4_e2m1 and
11,312 in mxint8 (bf16 has 8 significant bits, so an element with fewer
fraction bits often lands exactly halfway).

``convention='harma'`` (int formats, symmetric) is the quantizer of Harma et
al.'s code (parsa-epfl/quantization-sparsity-interplay,
``src/transformers/bfp/int_ops.py``, GPTQ's ``Quantizer(sym=True)``), bit for
bit: with ``D = 2 amax`` if the group has a negative element, else
``D = amax``,

.. math::

   s = D / (2^k - 1), \\qquad
   Q(x) = s \\cdot \\mathrm{clip}(\\mathrm{RNE}(x / s), -2^{k-1}, 2^{k-1} - 1).

Its level set is asymmetric (one more negative level); ``+-amax / s`` is
``+-(2^(k-1) - 1/2)`` up to the rounding of ``s``, so ``+amax`` becomes
``(2^(k-1) - 1) s`` and ``-amax`` one of its two neighbours. A group without
negative elements gets half the step and is clipped at about ``amax / 2``
(the reference's ``xmin = 0`` case, kept).
Every zero of the output is ``+0.0``. The step ``2 amax / (2^k - 1)`` is
finer than ``amax / (2^(k-1) - 1)``: on a 256 x 256 ``N(0, 1)`` matrix
(``numpy.random.default_rng(0)``), int4 per output channel,
``||Q(W) - W|| / ||W||`` is 0.1197 with ``'harma'`` and 0.1276 with
``'absmax'`` (per tensor 0.1821 and 0.1952; 1024 x 1024 per channel 0.1334
and 0.1427), about the ratio of the steps, 14/15. Where the reference's
``s`` would be subnormal (``amax`` below about ``2^-118``) it loses bits and
this keeps them; non-finite groups are NaN as below (the reference mixes NaN
and zeros). ``symmetric=False`` needs no convention: the affine variant is
the same quantizer as the reference's ``sym=False``, up to signs of zero.

Non-finite input
----------------
A NaN or +-inf anywhere in a group makes the whole group's output NaN, in
every family (for NVFP4 the group is the whole tensor). For MX this is what
the reference does (``amax`` is NaN or inf, the shared exponent becomes NaN);
for int and FP8 an infinite ``amax`` would otherwise make ``s`` infinite and
silently zero the rest of the group.

Arithmetic: the same bits on every backend
------------------------------------------
Everything is computed in float32: bfloat16, float16, float64 and FP8 inputs
are cast to float32 and the result is rounded back to nearest (bfloat16 on the
bits). XLA on GPUs and TPUs (and XLA:CPU with fast math) may divide by
multiplying with an approximate reciprocal, flushes subnormals and converts to
FP8 through float16, so no rounding decision here is left to float arithmetic
(:mod:`jaxprune.quant_bits`): divisions are correctly rounded on integer
significands, rounding to an element grid is an integer shift with round half to
even (:mod:`jaxprune.quant_elements`), exponents, multiplications by powers of
two and the max reductions are done on the bit patterns, and the only float
operations left are products and sums whose IEEE result is the same everywhere
(``n * s`` of normal numbers). Float32 subnormal inputs and outputs are therefore
exact too. Int and FP8 groups are first scaled by ``2^-floor(log2 amax)``
(exactly), which changes no result while ``s`` and ``n * s`` are normal and
keeps ``s`` normal for tiny groups.

bfloat16 inputs: MX results are bfloat16 values (at most 8 significant bits)
outside bfloat16's subnormal range, so they are exact. NVFP4 results are the
float32 ones rounded to bfloat16 (as torchao's ``dequantize(torch.bfloat16)``). Int and FP8 results
``n * s`` are rounded to bfloat16, and the symmetric formats still satisfy
``Q(Q(x)) == Q(x)`` in bfloat16 (bit for bit, normal range): ``amax`` is a
bfloat16 value, ``bf16(fl32(q_max * fl32(amax / q_max))) = amax``, so ``Q(x)``
has the same ``amax`` and scale ``s``; each ``bf16(n s) / s`` is within a
relative ``2^-8`` of ``n`` (``|n| <= 127``; FP8 elements are ``2^-4`` apart
relatively), so it rounds back to ``n``.

References: OCP Microscaling Formats (MX) v1.0 Specification (2023);
NVIDIA, "Introducing NVFP4 for Efficient and Accurate Low-Precision Inference"
(2025); github.com/pytorch/ao (``torchao/prototype/mx_formats/nvfp4_tensor.py``);
OCP 8-bit Floating Point Specification (OFP8) v1.0 (2023);
Rouhani et al., "Microscaling Data Formats for Deep Learning", 2023;
github.com/microsoft/microxcaling (``mx/mx_ops.py``, ``mx/elemwise_ops.py``).
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxprune import quant_bits as qb
from jaxprune import quant_blocks, quant_nvfp4, quant_scaled
from jaxprune.quant_blocks import LOG2_ROUND_UP as _LOG2_ROUND_UP  # noqa: F401
from jaxprune.quant_formats import FORMATS, Format, get_format, int_format

__all__ = ["CONVENTIONS", "FORMATS", "GRANULARITIES", "MX_BLOCK_SIZE", "NVFP4_BLOCK_SIZE",
           "ROUNDINGS", "Format", "Spec", "default_block_size", "get_format", "grouped",
           "int_format", "make_spec", "quantize"]

MX_BLOCK_SIZE = 32
NVFP4_BLOCK_SIZE = quant_nvfp4.BLOCK_SIZE
GRANULARITIES = ("tensor", "channel", "block")
ROUNDINGS = quant_blocks.MX_ROUNDING  # ('even', 'nearest'): ties to even / away from zero
CONVENTIONS = ("absmax", "harma")


# ---------------------------------------------------------------------------
# Argument checks, grouping and the public function.
# ---------------------------------------------------------------------------
class Spec(NamedTuple):
  """Resolved settings of one ``quantize`` call (see :func:`make_spec`)."""

  fmt: Format
  granularity: str
  axis: int
  block_size: int
  symmetric: bool
  round: str = "even"
  convention: str = "absmax"


def default_block_size(fmt: str | Format) -> int | None:
  """The block size of a block format: ``MX_BLOCK_SIZE`` (32) for MX, ``NVFP4_BLOCK_SIZE``
  (16) for NVFP4; None for int and FP8, which have no default block."""
  kind = get_format(fmt).kind
  return {"mx": MX_BLOCK_SIZE, "nvfp4": NVFP4_BLOCK_SIZE}.get(kind)


def _check_conventions(fmt: Format, symmetric, round, convention) -> None:
  if round not in ROUNDINGS:
    raise ValueError(f"`round` must be one of {ROUNDINGS}, got {round!r}.")
  if convention not in CONVENTIONS:
    raise ValueError(f"`convention` must be one of {CONVENTIONS}, got {convention!r}.")
  if convention == "harma" and (fmt.kind != "int" or not symmetric):
    raise ValueError(
      "`convention`='harma' is Harma et al.'s symmetric integer quantizer: it needs an int "
      f"format (int2 ... int8) and symmetric=True, got fmt={fmt.name!r}, "
      f"symmetric={symmetric!r}.")
  if round != "even" and fmt.kind == "nvfp4":
    raise ValueError(
      "`round`='nearest' is not defined for NVFP4: its reference (torchao) rounds elements and "
      "block scales half to even; use round='even'.")


def make_spec(fmt, shape, dtype, axis, block_size, granularity, symmetric,
              round="even", convention="absmax") -> Spec:
  """The :class:`Spec` of ``quantize(x, fmt, ...)`` for an ``x`` of ``shape`` and ``dtype``.

  Resolves the defaults (MX and NVFP4 blocks, a non-negative ``axis``) and
  raises the ``ValueError`` s that :func:`quantize` documents.
  """
  fmt = get_format(fmt)
  _check_conventions(fmt, symmetric, round, convention)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"quantize expects floating-point input, got dtype {dtype}.")
  if granularity is not None and granularity not in GRANULARITIES:
    raise ValueError(
      f"`granularity` must be one of {GRANULARITIES} or None, got {granularity!r}.")
  if block_size is not None and (
      isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral)
      or block_size < 1):
    raise ValueError(f"`block_size` must be a positive integer or None, got {block_size!r}.")
  if fmt.kind in ("mx", "nvfp4"):
    if granularity not in (None, "block"):
      raise ValueError(
        f"{fmt.kind.upper()} format {fmt.name!r} scales blocks: `granularity` must be "
        f"'block' or None, got {granularity!r}.")
    if fmt.kind == "nvfp4" and block_size not in (None, NVFP4_BLOCK_SIZE):
      raise ValueError(f"NVFP4 scales blocks of {NVFP4_BLOCK_SIZE} elements: `block_size` "
                       f"must be {NVFP4_BLOCK_SIZE} or None, got {block_size!r}.")
    granularity = "block"
    block_size = default_block_size(fmt) if block_size is None else block_size
  elif granularity is None:
    granularity = "tensor" if block_size is None else "block"
  if granularity == "block" and block_size is None:
    raise ValueError("granularity='block' needs a `block_size`.")
  if granularity != "block" and block_size is not None:
    raise ValueError(
      f"`block_size`={block_size} is only used with granularity='block', "
      f"got granularity={granularity!r}.")
  if not symmetric and fmt.kind != "int":
    raise ValueError(f"`symmetric`=False is only defined for int formats, got {fmt.name!r}.")
  if granularity == "tensor":
    axis = 0
  else:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not (
        -len(shape) <= axis < len(shape)):
      raise ValueError(f"`axis`={axis!r} is out of range for an array of shape {shape}.")
    size = shape[axis]
    if granularity == "block" and size % block_size:
      raise ValueError(
        f"`block_size`={block_size} must divide the size {size} of `axis`={axis} "
        f"(shape {shape}).")
    axis = int(axis) % len(shape)
  return Spec(fmt, granularity, axis, 0 if block_size is None else int(block_size),
              bool(symmetric), round, convention)


def group_axes(x: jax.Array, spec: Spec) -> tuple[jax.Array, int | None]:
  """``(g, axis)``: ``x`` reshaped (not transposed) so that each scaling group runs along
  ``axis`` of ``g`` (``None``: all of it, for ``'tensor'``); reductions over ``axis`` with
  ``keepdims=True`` broadcast back onto ``g``. Undo with ``reshape(x.shape)``."""
  if spec.granularity == "tensor":
    return x, None
  if spec.granularity == "channel":
    return x, spec.axis
  shape, a = x.shape, spec.axis
  blocks = (shape[a] // spec.block_size, spec.block_size)
  return x.reshape(shape[:a] + blocks + shape[a + 1:]), a + 1


def grouped(fn, x: jax.Array, spec: Spec) -> jax.Array:
  """Applies ``fn`` to ``x`` laid out as groups along a last axis, and lays it back."""
  if spec.granularity == "tensor":
    return fn(x.reshape(1, -1)).reshape(x.shape)
  g = jnp.moveaxis(x, spec.axis, -1)
  moved = g.shape
  if spec.granularity == "block":
    g = g.reshape(*moved[:-1], moved[-1] // spec.block_size, spec.block_size)
  return jnp.moveaxis(fn(g).reshape(moved), -1, spec.axis)


def _fake_quantize(x: jax.Array, spec: Spec) -> jax.Array:
  if x.size == 0:
    return x
  ties = "even" if spec.round == "even" else "away"
  if spec.fmt.kind == "mx":
    fn = functools.partial(quant_blocks.mx, fmt=spec.fmt, rounding=spec.round)
  elif spec.fmt.kind == "nvfp4":
    fn = quant_nvfp4.nvfp4  # the blocks of the whole tensor: it also needs the tensor's amax
  elif spec.convention == "harma":
    fn = functools.partial(quant_scaled.harma, fmt=spec.fmt, ties=ties)
  elif spec.symmetric:
    fn = functools.partial(quant_scaled.absmax, fmt=spec.fmt, ties=ties)
  else:
    fn = functools.partial(quant_scaled.affine, fmt=spec.fmt, ties=ties)
  layout = grouped
  if spec.fmt.kind == "mx":  # blocks reduced in place (a reshape; no transpose of axis 0)
    layout = _in_place
  if x.dtype == jnp.bfloat16:
    return qb.to_bfloat16(layout(fn, qb.from_bfloat16(x), spec))
  return layout(fn, x.astype(jnp.float32), spec).astype(x.dtype)


def _in_place(fn, x: jax.Array, spec: Spec) -> jax.Array:
  """Applies ``fn(g, axis=a)`` to ``x`` laid out by :func:`group_axes` (groups along ``a``)."""
  g, axis = group_axes(x, spec)
  return fn(g, axis=-1 if axis is None else axis).reshape(x.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _straight_through(x: jax.Array, spec: Spec) -> jax.Array:
  return _fake_quantize(x, spec)


@_straight_through.defjvp
def _straight_through_jvp(spec, primals, tangents):
  # The identity tangent map is linear, so reverse mode (grad, vjp) follows by transposition;
  # the primal output goes through _straight_through again for higher derivatives.
  ((x,), (dx,)) = primals, tangents
  return _straight_through(x, spec), dx


def quantize(
    x: jax.Array,
    fmt: str | Format,
    *,
    axis: int = -1,
    block_size: int | None = None,
    granularity: str | None = None,
    symmetric: bool = True,
    round: str = "even",
    convention: str = "absmax",
) -> jax.Array:
  """Fake-quantizes ``x`` to ``fmt``, with a straight-through gradient.

  Definitions of every format, the scaling groups and the handling of NaN, inf
  and subnormals are in the module docstring of ``jaxprune.quant``, including
  *Reference-exact modes* (``round='nearest'``, ``convention='harma'``).

  Args:
    x: floating-point array (float32, bfloat16, float16, ...). Computed in
      float32, returned in ``x.dtype``.
    fmt: a name in ``FORMATS`` (or its ``Format``).
    axis: the axis that channel scales are reduced over and that blocks run
      along. Ignored for ``granularity='tensor'``.
    block_size: elements per block along ``axis``; must divide its size.
      Default for MX formats: ``MX_BLOCK_SIZE`` (32); NVFP4: 16, the only
      size it takes (``'nvfp4'``: E2M1 elements, an E4M3 scale per 16 along
      ``axis`` and a float32 scale per tensor, as torchao computes them).
    granularity: ``'tensor'``, ``'channel'`` or ``'block'``. Default:
      ``'block'`` if ``block_size`` is given or ``fmt`` is MX or NVFP4, else
      ``'tensor'``.
    symmetric: int formats only; ``False`` selects the affine variant with an
      integer zero point.
    round: how ties are rounded: ``'even'`` (default; half to even) or
      ``'nearest'`` (half away from zero, microxcaling's default and Harma et
      al.'s MX setting). Applies to every format and convention: the element
      grid of MX and FP8, the integers of int formats (also the affine zero
      point). Only exact ties differ.
    convention: int formats: ``'absmax'`` (default; ``s = amax / (2^(k-1) - 1)``,
      levels ``+-(2^(k-1) - 1)``) or ``'harma'`` (Harma et al.'s symmetric
      quantizer: ``s = 2 amax / (2^k - 1)``, levels ``-2^(k-1) ... 2^(k-1) - 1``,
      bit-identical to their code; see the module docstring).

  Returns:
    An array of ``x``'s shape and dtype whose values are representable in
    ``fmt`` times their group's scale. ``d quantize(x) / dx`` is the identity.

  Raises:
    ValueError: for an unknown ``fmt``, ``round`` or ``convention``, non-floating
      ``x``, an out-of-range ``axis``, a ``block_size`` that does not divide the
      axis (NVFP4: an axis that 16 does not divide, or a ``block_size`` other
      than 16), inconsistent ``granularity`` / ``block_size`` / ``symmetric``,
      ``convention='harma'`` with a non-int format or ``symmetric=False``, or
      ``round='nearest'`` with NVFP4.
  """
  x = jnp.asarray(x)
  spec = make_spec(fmt, x.shape, x.dtype, axis, block_size, granularity, symmetric, round,
                   convention)
  return _straight_through(x, spec)
